"""Transcription serving throughput: polyadapt's engine (every window of the requests admitted together decoded in
one ``generate``, row *i* with its clip's LoRA adapter) against a naive server that answers one request at a time with
``set_adapter`` + the same ``generate_ids`` decoding code, and against one merged model (an adapter folded into the
base) served by the same engine: the upper bound, which tells what mixing adapters costs. The sibling of
``serve_throughput.py`` (text).

Model: a tiny Whisper built from a config (2+2 layers, 64 wide, 80 mel bins) with a byte-level BPE tokenizer trained
locally on the sample transcripts, random weights, as ``tests/speech/conftest.py`` builds it (nothing is downloaded);
four LoRA adapters (r=8 on the attention and MLP projections of encoder and decoder) adapted for two steps with
``polyadapt.adapt`` at a high learning rate from different seeds and clips, so each has its own non-zero weights.
Traffic: ``--requests`` uploads of the committed clips of sample_data/speech/test (WAV bytes, as a client sends
them), each for one of the four adapters at random (the merged model gets the same clips), greedy, at most
``--max-tokens`` tokens per clip, sent by ``--clients`` concurrent clients in a closed loop. The three servers are
measured one after another, each in its own process, on the engine API (no HTTP on any side).

Reported: seconds of audio transcribed per second of wall time (the audio of all requests / wall time from the first
request to the last answer), p50/p95 request latency, the ratios side by side, and how many transcripts the naive
server and polyadapt agree on (both greedy with the same adapters; they must agree on all).

Run: ``python benchmarks/serve_transcription.py [--requests 48] [--clients 16] [--max-tokens 24] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from harness import measure
from serve_throughput import closed_loop, print_comparison, summary

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / "sample_data" / "speech" / "test"
ADAPTERS = ("a0", "a1", "a2", "a3")
KEY = "benchmark-key"


# -- the base, the adapters and the traffic ------------------------------------------------------------------------
def build_base(directory: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.speech.conftest import build_whisper

    build_whisper(directory)


def build_runs(root: Path, max_tokens: int) -> dict[str, str]:
    """Four adapters, each adapted for two steps (lr 2e-2) on its own four clips, from its own seed."""
    sys.path.insert(0, str(ROOT))
    import polyadapt
    from polyadapt.config import validate_config
    from tests.speech.conftest import SAMPLES, sample_rows

    rows = sample_rows("train")
    runs = {}
    for i, name in enumerate(ADAPTERS):
        data = root / f"data-{name}"
        for split, chosen in (("train", rows[i * 4 : i * 4 + 4]), ("test", sample_rows("test")[:2])):
            folder = data / split
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                shutil.copy(SAMPLES / split / row["file_name"], folder / row["file_name"])
            with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=["file_name", "transcription"])
                writer.writeheader()
                writer.writerows(chosen)
        config = validate_config({
            "modality": "speech", "base": str(root / "base"), "data": {"path": str(data)},
            "output": str(root / name), "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 2, "lr": 2e-2, "batch_size": 2, "scheduler": "constant", "precision": "fp32",
                      "seed": i, "eval_every": None, "early_stopping_patience": None},
            "eval": {"batch_size": 2, "before": False},
            "speech": {"max_new_tokens": max_tokens},
        })  # fmt: skip
        runs[name] = str(polyadapt.adapt(config))
    return runs


def merge(base: Path, run: str, output: Path) -> None:
    """``run``'s adapter folded into the base: the base's directory (tokenizer, processor) with merged weights."""
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    shutil.copytree(base, output)
    model = WhisperForConditionalGeneration.from_pretrained(str(base))
    PeftModel.from_pretrained(model, run).merge_and_unload().save_pretrained(str(output), safe_serialization=True)


def traffic(count: int, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """``count`` requests: (adapter, file name, WAV bytes) of the committed test clips, adapters drawn at random."""
    clips = sorted(CLIPS.glob("*.wav"))
    rng = random.Random(seed)
    return [
        (rng.choice(ADAPTERS), clips[i % len(clips)].name, clips[i % len(clips)].read_bytes()) for i in range(count)
    ]


def _speech(max_tokens: int) -> dict:
    return {"max_new_tokens": max_tokens}


# -- the three servers ---------------------------------------------------------------------------------------------
def run_engine(args: dict) -> dict:
    """polyadapt's engine: the base with four adapters (``merged``: the merged model alone, as a base)."""
    import torch

    from polyadapt.serve.config import read_keys, validate_serve_config
    from polyadapt.serve.engine import Engine

    torch.set_num_threads(args["threads"])
    os.environ["BENCH_KEY"] = KEY
    merged = args["merged"]
    base = args["merged_dir"] if merged else args["base"]
    config = validate_serve_config({
        "bases": {"base": {"modality": "speech", "base": base, "speech": _speech(args["max_tokens"])}},
        "adapters": {} if merged else {name: {"base": "base", "from": path} for name, path in args["runs"].items()},
        "tenants": {"bench": {"key_env": "BENCH_KEY", "models": ["base", *([] if merged else ADAPTERS)]}},
        "limits": {"max_batch": args["clients"], "max_wait_ms": 5, "max_loaded_adapters": 4},
    })  # fmt: skip
    engine = Engine.start(config, read_keys(config), follow=False)

    def answer(request):
        adapter, filename, audio = request
        target = engine.resolve("base" if merged else adapter, "bench", "transcriptions")
        spec = target.worker.backend.transcription_spec(audio, filename, target.adapter, None, None)
        return engine.submit(target, spec).future.result()

    try:
        for name in [] if merged else ADAPTERS:  # warm-up: every adapter attached, first forward passes
            answer((name, *args["requests"][0][1:]))
        answer(args["requests"][0])
        seconds, latencies, results = closed_loop(args["clients"], args["requests"], answer)
    finally:
        engine.close()
    return {"seconds": seconds, "latencies": latencies, "tokens": sum(r.duration for r in results),
            "answers": [r.text for r in results]}  # fmt: skip


def run_naive(args: dict) -> dict:
    """One request at a time: take the lock, ``set_adapter``, ``generate_ids`` (polyadapt's decoding), release."""

    import torch
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    from polyadapt_speech.data import SAMPLE_RATE, read_audio
    from polyadapt_speech.inference import generate_ids, split_long
    from polyadapt_speech.model import load_tokenizer, whisper_tokens

    torch.set_num_threads(args["threads"])
    tokenizer = load_tokenizer(Path(args["base"]))
    model = WhisperForConditionalGeneration.from_pretrained(args["base"])
    tokens = whisper_tokens(tokenizer, model.config.vocab_size)
    prefix = tokens.prefix(None, "transcribe")
    budget = max(1, min(args["max_tokens"], model.config.max_target_positions - len(prefix)))
    runs = args["runs"]
    model = PeftModel.from_pretrained(model, runs[ADAPTERS[0]], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(runs[name], adapter_name=name)
    model.eval()
    lock = threading.Lock()

    def answer(request):
        adapter, filename, audio = request
        with tempfile.NamedTemporaryFile(suffix=Path(filename).suffix) as handle:
            handle.write(audio)
            handle.flush()
            samples = read_audio(Path(handle.name))
        pieces = split_long(samples)
        with lock, torch.no_grad():
            model.set_adapter(adapter)
            ids = generate_ids(model, pieces, device=torch.device("cpu"), prefix=prefix, prompt=[], num_beams=1,
                               max_new_tokens=budget)  # fmt: skip
            texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return len(samples) / SAMPLE_RATE, " ".join(t for t in texts if t)

    answer(args["requests"][0])
    seconds, latencies, results = closed_loop(args["clients"], args["requests"], answer)
    return {"seconds": seconds, "latencies": latencies, "tokens": sum(d for d, _ in results),
            "answers": [t for _, t in results]}  # fmt: skip


# -- report --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more only pay on idle cores)")
    parser.add_argument("--json", action="store_true", help="Also print the figures as JSON.")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="serve-speech-bench-") as tmp:
        root = Path(tmp)
        print(f"building the tiny Whisper base and four adapters in {root} ...", file=sys.stderr)
        build_base(root / "base")
        runs = build_runs(root, options.max_tokens)
        merge(root / "base", runs["a0"], root / "merged")
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
    for f in figures.values():
        f["audio_s_per_s"], f["audio_s"] = f.pop("tokens_per_s"), f.pop("tokens")
    agree = sum(a == b for a, b in zip(ours["answers"], naive["answers"], strict=True))
    print(f"\n{options.requests} transcriptions of the sample test clips ({figures['polyadapt']['audio_s']:.1f} s of "
          f"audio) over 4 adapters, {options.clients} concurrent clients, greedy, at most {options.max_tokens} "
          f"tokens each; tiny Whisper base, {options.threads} CPU threads\n")  # fmt: skip
    print_comparison(figures, "audio s/s", "audio_s_per_s", "set_adapter + generate_ids")
    empty = sum(not str(a).strip() for a in ours["answers"])
    print(f"transcripts identical to the naive server's: {agree}/{options.requests} ({empty} empty)")
    if options.json:
        print(json.dumps({**figures, "agree": agree}, indent=2))


if __name__ == "__main__":
    main()
