"""The conformance suite (polyadapt.testing) on the image modality, with a tiny pipeline built from configs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from polyadapt.testing import ModalityCase, parametrize_with_checks

from .conftest import RESOLUTION, save_tiny_pipeline, write_dataset


@lru_cache(maxsize=1)
def _base(root: str) -> Path:
    return save_tiny_pipeline(Path(root) / "base")


def make_image(directory: Path) -> dict:
    import tempfile

    base = _base(tempfile.gettempdir() + "/polyadapt-conformance-image")
    return {
        "modality": "image",
        "base": str(base),
        "data": str(write_dataset(directory / "data", train=4, test=2)),
        "output": str(directory / "run"),
        "peft": {"r": 4, "alpha": 4, "dropout": 0.0},
        "train": {"batch_size": 2, "precision": "fp32"},
        "image": {
            "resolution": RESOLUTION,
            "num_inference_steps": 2,
            "validation_seeds": [0],
            "num_validation_prompts": 1,
        },
    }


def corrupt_image(data: Path) -> Path:
    path = data / "train" / "img-1.png"
    path.write_bytes(b"not a png")
    return path


def _infer_options(directory: Path) -> dict:
    return {"prompt": "a gold circle", "n": 1, "seed": 0, "out": directory / "images"}


IMAGE = ModalityCase("image", make=make_image, corrupt=corrupt_image, infer_options=_infer_options)


@parametrize_with_checks([IMAGE], capabilities={"image": frozenset({"inference", "report", "multi_adapter"})})
def test_image_modality_conforms(case, check, tmp_path):
    check(case, tmp_path)
