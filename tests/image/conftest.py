"""Shared fixtures of the image tests: tiny random SD/SDXL pipelines saved like real ones, tiny datasets, configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

RESOLUTION = 16


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    # one thread: the machine is shared, and oversubscribed OpenMP threads slow each other down badly
    torch.set_num_threads(1)


def save_tiny_pipeline(directory: Path, seed: int = 0, prediction_type: str = "epsilon", xl: bool = False) -> Path:
    from polyadapt_image.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=seed, prediction_type=prediction_type, resolution=RESOLUTION, xl=xl)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A randomly initialised tiny Stable Diffusion pipeline directory (epsilon prediction)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "base")


@pytest.fixture(scope="session")
def tiny_base_v(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v") / "base", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_base_xl(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "base", xl=True)


def write_dataset(root: Path, train: int = 8, test: int = 4, seed: int = 0) -> Path:
    """Flat two-colour pictures with captions, in the imagefolder layout."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colours = {"navy": (22, 38, 84), "gold": (214, 168, 48), "teal": (0, 128, 128), "sand": (226, 204, 160)}
    for split, count in (("train", train), ("test", test)):
        directory = root / split
        directory.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            background, colour = rng.sample(list(colours), 2)
            image = Image.new("RGB", (24, 20), colours[background])
            ImageDraw.Draw(image).ellipse((4, 3, 18, 17), fill=colours[colour])
            name = f"img-{i}.png"
            image.save(directory / name)
            rows.append({"file_name": name, "text": f"a {colour} circle on a {background} background"})
        (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


@pytest.fixture
def make_config(tmp_path, tiny_base, dataset):
    """Write a config file for a tiny run; keyword arguments override sections (merged one level deep)."""

    def make(**sections) -> Path:
        raw = {
            "modality": "image",
            "base": str(tiny_base),
            "data": {"path": str(dataset)},
            "output": str(tmp_path / "run"),
            "peft": {"r": 4, "alpha": 4, "dropout": 0.0},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "precision": "fp32", "scheduler": "constant"},
            "eval": {"before": True},
            "image": {
                "resolution": RESOLUTION,
                "trigger": "in harbor style",
                "num_inference_steps": 2,
                "validation_seeds": [0],
                "num_validation_prompts": 2,
            },
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = str(value) if isinstance(value, Path) else value
        path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return make


def context_for(config_path: Path, run_dir: Path | None = None):
    """A RunContext on the CPU for calling the run's methods directly."""
    import torch

    from polyadapt.config import load_config
    from polyadapt.lifecycle import resolve_base
    from polyadapt.modality import RunContext

    config = load_config(config_path)
    return RunContext(
        config=config, base=resolve_base(config.base), device=torch.device("cpu"), dtype=torch.float32, run_dir=run_dir
    )


def load_data(config, path: Path | None = None):
    """The dataset of ``config`` as the lifecycle sees it (the modality's reader, then the core's held-out rule)."""
    from polyadapt.modality import DataContext
    from polyadapt_image.modality import ImageModality

    return ImageModality().load_data(DataContext(config=config, path=Path(path or config.data.path)))


def open_run(config_path: Path, adapter: bool = False, run_dir: Path | None = None):
    """``(run, splits)``: an ImageRun of the config with its base loaded (and a fresh adapter attached)."""
    from polyadapt_image.modality import ImageModality

    ctx = context_for(config_path, run_dir)
    run = ImageModality().open(ctx)
    run.load_base()
    if adapter:
        run.add_adapter()
    return run, load_data(ctx.config)
