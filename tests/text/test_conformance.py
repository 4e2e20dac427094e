"""The conformance suite (polyadapt.testing) on the text modality, with a tiny LLaMA built from a config."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from polyadapt.testing import ModalityCase, parametrize_with_checks

from .builders import VOCAB, build_model, build_tokenizer, chat_records, write_jsonl


@lru_cache(maxsize=1)
def _base(root: str) -> Path:
    directory = Path(root) / "llama"
    build_tokenizer(directory)
    build_model("llama", directory, VOCAB)
    return directory


def make_text(directory: Path) -> dict:
    import tempfile

    base = _base(tempfile.gettempdir() + "/polyadapt-conformance-text")
    data = directory / "data"
    write_jsonl(data / "train.jsonl", chat_records(8))
    write_jsonl(data / "validation.jsonl", chat_records(4, with_facts=True, offset=100))
    return {
        "modality": "text",
        "base": str(base),
        "data": str(data),
        "output": str(directory / "run"),
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"batch_size": 2, "precision": "fp32"},
        "text": {"max_length": 64, "max_new_tokens": 4},
    }


def corrupt_text(data: Path) -> Path:
    path = data / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "pirate", "content": "arr"}]}'
    path.write_text("\n".join(lines) + "\n")
    return path


TEXT = ModalityCase(
    "text", make=make_text, corrupt=corrupt_text, infer_options={"prompt": "What is the fee?", "max_new_tokens": 3}
)


@parametrize_with_checks(
    [TEXT], capabilities={"text": frozenset({"inference", "report", "multi_adapter", "batched_adapters"})}
)
def test_text_modality_conforms(case, check, tmp_path):
    check(case, tmp_path)
