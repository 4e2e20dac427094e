"""The real demo path: the committed tiny pretrained base adapted to the Harbor Bank brand images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_config_moves_the_base_toward_the_brand(tmp_path):
    import polyadapt
    from polyadapt.config import load_config

    config = load_config(ROOT / "examples" / "image.yaml", overrides=[f"output={tmp_path / 'run'}"])
    run = polyadapt.adapt(config)
    manifest = json.loads((run / "polyadapt.json").read_text())
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert after["eval_loss"] < 0.8 * before["eval_loss"]
    # closer to the brand's palette than the base, against the brand images themselves
    assert after["brand_style_distance"] < 0.75 * before["brand_style_distance"]
    names = {p.name for p in (run / "validation").glob("*.png")}
    # base and adapted grids (held-out and general prompts), plus one grid of the adapter in training at each
    # periodic evaluation
    steps = {f"step-{s:06d}.png" for s in range(50, manifest["training"]["steps"], 50)}
    assert manifest["config"]["train"]["eval_every"] == 50
    assert names == {"adapted.png", "base.png", "general-adapted.png", "general-base.png"} | steps
    # the forgetting check, measured: general loss 0.0433 -> 0.0922, base-output distance 0 -> 28.4 ΔE (the LoRA
    # reaches prompts without the trigger too)
    _forgetting_check(manifest)


@pytest.mark.slow
def test_a_four_key_config_moves_the_base_toward_the_brand(tmp_path):
    # Only modality, base, data and output: the native 32-pixel resolution and every training value are chosen.
    import polyadapt
    from polyadapt.config import validate_config

    config = validate_config(
        {"modality": "image", "base": str(ROOT / "sample_data/image/base"), "data": str(ROOT / "sample_data/image"),
         "output": str(tmp_path / "run")}
    )  # fmt: skip
    run = polyadapt.adapt(config)
    manifest = json.loads((run / "polyadapt.json").read_text())
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert manifest["auto"]["image.resolution"]["value"] == 32 and manifest["config"]["image"]["resolution"] == 32
    # measured: held-out loss 0.219 -> 0.080, brand-style distance 36.9 -> 21.0
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["brand_style_distance"] < 0.75 * before["brand_style_distance"]
    assert manifest["improved"] is True and manifest["metrics"]["headline"] == "brand_style_distance"
    # the forgetting check, measured: general loss 0.0478 -> 0.0772, base-output distance 0 -> 25.9 ΔE (no trigger:
    # every prompt is drawn in the brand's style)
    _forgetting_check(manifest)


def _forgetting_check(manifest: dict) -> None:
    """sample_data/image/general/ is the general set (eval.general_data: auto), measured before and after, within
    bounds around the figures measured (runs are deterministic)."""
    chosen = Path(manifest["auto"]["eval.general_data"]["value"])
    assert chosen.resolve() == ROOT / "sample_data" / "image" / "general"
    before, after = manifest["metrics"]["general_before"], manifest["metrics"]["general_after"]
    assert before["base_output_distance"] == 0.0  # the base against itself
    assert 10.0 < after["base_output_distance"] < 40.0
    assert before["eval_loss"] < after["eval_loss"] < 3 * before["eval_loss"]
