"""The conformance suite (polyadapt.testing) on the speech modality, with a tiny Whisper built from a config."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from polyadapt.testing import ModalityCase, parametrize_with_checks

from .conftest import SAMPLES, build_whisper, sample_rows, write_dataset


@lru_cache(maxsize=1)
def _base(root: str) -> Path:
    directory = Path(root) / "whisper"
    if not (directory / "config.json").exists():
        build_whisper(directory)
    return directory


def make_speech(directory: Path) -> dict:
    base = _base(tempfile.gettempdir() + "/polyadapt-conformance-speech")
    return {
        "modality": "speech",
        "base": str(base),
        "data": str(write_dataset(directory / "data", train=3, test=3)),
        "output": str(directory / "run"),
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"batch_size": 3, "precision": "fp32"},
        "speech": {"max_new_tokens": 8},
    }


def corrupt_speech(data: Path) -> Path:
    path = data / "train" / sample_rows("train")[1]["file_name"]
    path.write_bytes(b"RIFF but not audio")
    return path


def _infer_options(directory: Path) -> dict:
    return {"audio": (SAMPLES / "test" / sample_rows("test")[0]["file_name"],)}


SPEECH = ModalityCase("speech", make=make_speech, corrupt=corrupt_speech, infer_options=_infer_options, tolerance=1e-4)
ALL = frozenset({"inference", "report", "multi_adapter", "batched_adapters"})


@parametrize_with_checks([SPEECH], capabilities={"speech": ALL})
def test_speech_modality_conforms(case, check, tmp_path):
    check(case, tmp_path)
