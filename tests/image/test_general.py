"""General data for images: read without the trigger, scored against the base's own images (base_output_distance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import polyadapt
from polyadapt.config import load_config
from polyadapt.evaluation import evaluating
from polyadapt.modality import DataContext
from polyadapt_image.metrics import base_output_distance
from polyadapt_image.modality import ImageModality

from .conftest import open_run, write_dataset
from .test_adapters import trained_looking_lora


def _general(dataset: Path) -> Path:
    return write_dataset(dataset / "general", train=0, test=2, seed=5)


def test_the_reader_skips_general_and_general_data_keeps_its_captions(make_config, dataset):
    config = load_config(make_config())
    without = ImageModality().load_data(DataContext(config=config, path=dataset))
    general = _general(dataset)
    splits = ImageModality().load_data(DataContext(config=config, path=dataset))
    assert [s.key for s in splits.train] == [s.key for s in without.train] and splits.files == without.files
    read = ImageModality().load_data(DataContext(config=config, path=general, general=True))
    assert len(read.validation) == 2 and not any("harbor style" in s.caption for s in read.validation)
    assert read.details["trigger"] is None
    # the same directory read as training data gets the trigger
    as_data = ImageModality().load_data(DataContext(config=config, path=general))
    assert all(s.caption.endswith(", in harbor style") for s in as_data.validation)


def test_the_distance_is_zero_between_equal_images_and_grows_with_the_change():
    from PIL import Image

    grey = [Image.new("RGB", (8, 8), (128, 128, 128)), Image.new("RGB", (8, 8), (20, 40, 60))]
    assert base_output_distance(grey, grey) == 0.0
    lighter = [Image.new("RGB", (8, 8), (140, 140, 140)), grey[1]]
    much = [Image.new("RGB", (8, 8), (250, 250, 250)), grey[1]]
    assert 0 < base_output_distance(lighter, grey) < base_output_distance(much, grey)


def test_base_output_distance_is_zero_for_the_base_and_positive_for_an_adapter(make_config, dataset, tmp_path):
    lora = trained_looking_lora(make_config, tmp_path / "lora", seed=3)
    config = make_config()
    general = (
        ImageModality()
        .load_data(DataContext(config=load_config(config), path=_general(dataset), general=True))
        .validation
    )
    base_run, _ = open_run(config)
    with evaluating(base_run):
        before = base_run.evaluate_general(general, None)
    assert before.metrics["base_output_distance"] == 0.0
    assert set(base_run.base_images) == set(zip(*_pairs(general), strict=True))  # every (prompt, seed) drawn

    # a fresh run with the adapter: no "before" images, so it draws the base's with the LoRA off
    run, _ = open_run(config)
    run.load_adapter(lora)
    with evaluating(run):
        adapted = [np.asarray(image) for image in run.generate(*_pairs(general))]
        after = run.evaluate_general(general, None)
        again = [np.asarray(image) for image in run.generate(*_pairs(general))]
    assert after.metrics["base_output_distance"] > 1.0
    assert run.active_adapters() == ["default"]
    assert all(np.array_equal(a, b) for a, b in zip(adapted, again, strict=True))  # the LoRA is back on
    for pair, image in base_run.base_images.items():
        assert np.array_equal(np.asarray(run.base_images[pair]), np.asarray(image))


def _pairs(samples) -> tuple[list[str], list[int]]:
    return [s.caption for s in samples], [0] * len(samples)


def test_adapt_measures_the_general_set_of_the_data_directory(make_config, dataset, tmp_path):
    _general(dataset)
    run = polyadapt.adapt(make_config(peft={"init_weights": False}))
    manifest = json.loads((run / "polyadapt.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["auto"]["eval.general_data"]["value"] == str(dataset / "general")
    assert metrics["general_before"]["base_output_distance"] == 0.0
    assert metrics["general_after"]["base_output_distance"] > 0.0
    assert "eval_loss" in metrics["general_after"] and "brand_style_distance" not in metrics["general_after"]
    assert {"general-base.png", "general-adapted.png"} <= {p.name for p in (run / "validation").glob("*.png")}
    report = json.loads((run / "report.json").read_text())
    row = next(r for r in report["general_metrics"] if r["metric"] == "base_output_distance")
    assert row["higher_is_better"] is False and row["improved"] is False


def test_the_demo_general_set_has_generic_prompts_only():
    root = Path(__file__).resolve().parents[2] / "sample_data" / "image"
    config = load_config(root.parents[1] / "examples" / "image.yaml")
    splits = ImageModality().load_data(DataContext(config=config, path=root / "general", general=True))
    assert len(splits.validation) == 4 and not splits.problems and not splits.train
    brand = ("navy", "teal", "sand", "gold", "foam", "harbor", "anchor", "lighthouse", "sailboat", "waves")
    assert not any(word in s.caption for s in splits.validation for word in brand)
