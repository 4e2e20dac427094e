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
    assert sorted(p.name for p in (run / "validation").glob("*.png")) == ["adapted.png", "base.png"]
