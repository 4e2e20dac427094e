"""The general set (``eval.general_data``): ``auto`` takes the data directory's general/, an explicit path or null wins,
the forgetting check's metrics reach the manifest and the report, and doctor checks the general set too."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

import polyadapt
from polyadapt.config import AdaptConfig, validate_config
from polyadapt.defaults import resolve_general_data
from polyadapt.errors import ConfigError
from polyadapt.manifest import read_manifest


def _config(tmp_path, general="unset") -> AdaptConfig:
    raw = {"modality": "x", "base": "b", "data": {"path": str(tmp_path / "data")}, "output": str(tmp_path / "o")}
    if general != "unset":
        raw["eval"] = {"general_data": general}
    (tmp_path / "data").mkdir(exist_ok=True)
    return AdaptConfig.model_validate(raw)


@pytest.mark.parametrize(
    ("has_general", "setting", "expected", "recorded"),
    [
        (True, "unset", "data/general", True),  # the default is auto
        (True, "auto", "data/general", True),
        (False, "auto", None, True),  # no general/: no forgetting check, and the choice says why
        (True, None, None, False),  # null wins over a general/ subdirectory
        (True, "elsewhere", "elsewhere", False),  # an explicit path wins
    ],
)
def test_auto_takes_the_general_subdirectory_and_explicit_values_win(
    tmp_path, has_general, setting, expected, recorded
):
    (tmp_path / "elsewhere").mkdir()
    if has_general:
        (tmp_path / "data" / "general").mkdir(parents=True)
    setting = str(tmp_path / setting) if setting == "elsewhere" else setting
    resolved = resolve_general_data(_config(tmp_path, setting))
    want = None if expected is None else tmp_path / expected
    assert resolved.config.eval.general_data == want
    if recorded:
        choice = resolved.choices["eval.general_data"]
        assert choice["value"] == (None if want is None else str(want))
        assert "general/ subdirectory" in choice["rule"]
    else:
        assert resolved.choices == {}


def test_an_explicit_general_path_that_does_not_exist_is_refused_at_validation(toy_config, tmp_path):
    from polyadapt.config import load_config

    with pytest.raises(ConfigError, match="eval.general_data: .*nowhere.* does not exist"):
        load_config(toy_config(eval={"general_data": str(tmp_path / "nowhere")}))


def _with_general(toy, tmp_path):
    """The toy config's data directory gets a general/ set of its own (other weights: the adapter forgets it)."""
    general = toy.write_data(tmp_path / "data" / "general", n=16, seed=21)
    (general / "train.jsonl").unlink()  # only validation.jsonl: the held-out split of the general set
    return general


def test_the_manifest_and_report_get_the_forgetting_check_from_general(toy_config, toy, tmp_path):
    general = _with_general(toy, tmp_path)
    run = polyadapt.adapt(toy_config())
    manifest = read_manifest(run)
    assert manifest.auto["eval.general_data"]["value"] == str(general)
    assert manifest.config["eval"]["general_data"] == str(general)
    general_before, general_after = manifest.metrics.general_before, manifest.metrics.general_after
    assert set(general_before) >= {"eval_loss", "mae"} and set(general_after) >= {"eval_loss", "mae"}
    assert general_before["eval_loss"] != manifest.metrics.before["eval_loss"]  # a different set was measured
    # the training data is what the reader found outside general/: the same counts and files as without it
    assert manifest.data.counts == {"train": 64, "validation": 16}
    assert not any("general" in name for name in manifest.data.fingerprint["files"])
    report = json.loads((run / "report.json").read_text())
    assert {row["metric"] for row in report["general_metrics"]} >= {"eval_loss", "mae"}
    assert "Forgetting check (general data)" in (run / "report.html").read_text()


def test_null_turns_the_forgetting_check_off_and_no_general_dir_means_none(toy_config, toy, tmp_path):
    _with_general(toy, tmp_path)
    run = polyadapt.adapt(toy_config(eval={"general_data": None}))
    manifest = read_manifest(run)
    assert manifest.metrics.general_before is None and manifest.metrics.general_after is None
    assert "eval.general_data" not in manifest.auto
    shutil.rmtree(tmp_path / "data" / "general")
    run = polyadapt.adapt(toy_config(output=str(tmp_path / "run-none")))
    manifest = read_manifest(run)
    assert manifest.metrics.general_after is None
    assert manifest.auto["eval.general_data"]["value"] is None


def test_doctor_checks_the_general_set_too(toy_config, toy, tmp_path):
    from polyadapt.lifecycle import doctor

    general = _with_general(toy, tmp_path)
    config = validate_config(yaml.safe_load(toy_config().read_text()))
    splits, summary = doctor(config)
    assert not splits.problems and "general data: 8 samples" in summary
    (general / "validation.jsonl").write_text((general / "validation.jsonl").read_text() + '{"x": [1]}\n')
    splits, _ = doctor(config)
    assert [p.reason for p in splits.problems] == ["needs keys 'x' and 'y'"]
    assert "general" in splits.problems[0].file
