"""Config validation: typed, up front, every problem at once, each naming the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from polyadapt.config import apply_overrides, load_config, read_yaml, validate_config
from polyadapt.errors import ConfigError


@pytest.fixture
def raw(toy_config):
    return yaml.safe_load(toy_config().read_text())


def test_a_valid_config_loads_with_defaults_and_the_modality_section(raw):
    raw["toy"] = {"hidden": 32}
    config = validate_config(raw)
    assert config.peft.method == "lora" and config.train.precision == "auto"
    assert config.settings.hidden == 32
    assert config.to_dict()["toy"]["hidden"] == 32


@pytest.mark.parametrize(
    "path,value,expected",
    [
        ("train.lr", -1, "train.lr: -1 is invalid: Input should be greater than 0"),
        (
            "train.precision",
            "fp8",
            "train.precision: 'fp8' is invalid: Input should be 'auto', 'fp32', 'bf16' or 'fp16'",
        ),
        ("peft.method", "adalora", "peft.method: 'adalora' is invalid"),
        ("peft.r", 0, "peft.r: 0 is invalid"),
        ("train.batch_size", "eight", "train.batch_size: 'eight' is invalid"),
        ("data.on_bad_sample", "ignore", "data.on_bad_sample: 'ignore' is invalid: Input should be 'fail' or 'skip'"),
        ("data.path", "/does/not/exist", "data.path: '/does/not/exist' does not exist"),
        ("peft.target_modules", 3, "peft.target_modules: 3 is invalid"),
        ("toy.hidden", "wide", "toy.hidden: 'wide' is invalid"),
        ("train.epochs", 2, "train: set either max_steps or epochs, not both"),
    ],
)
def test_invalid_values_name_key_value_and_what_is_allowed(raw, path, value, expected):
    config = apply_overrides(raw, [f"{path}={yaml.safe_dump(value).splitlines()[0]}"])
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "section,key,valid",
    [(None, "outptu", "output"), ("train", "learning_rate", "lr"), ("peft", "rank", "r"), ("toy", "hiden", "hidden")],
)
def test_unknown_keys_are_rejected_listing_the_valid_keys(raw, section, key, valid):
    target = raw if section is None else raw.setdefault(section, {})
    target[key] = 1
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    message = str(err.value)
    dotted = key if section is None else f"{section}.{key}"
    assert f"{dotted}: unknown key; valid keys here:" in message
    assert valid in message.split(f"{dotted}: unknown key; valid keys here:")[1].splitlines()[0]


def test_all_problems_are_reported_at_once(raw):
    raw["train"].update(lr=0, batch_size=0, shuffle=True)
    raw["peft"]["method"] = "magic"
    raw["bogus"] = 1
    raw["toy"] = {"hidden": "x"}
    with pytest.raises(ConfigError) as err:
        validate_config(raw, source="cfg.yaml")
    assert len(err.value.problems) == 6
    assert str(err.value).startswith("cfg.yaml: 6 problems in the configuration:")


def test_unknown_modality_says_which_are_installed(raw):
    raw["modality"] = "video"
    with pytest.raises(ConfigError, match=r"modality: modality 'video' is not installed \(installed: .*toy"):
        validate_config(raw)


def test_set_overrides_parse_yaml_values_and_create_sections(raw):
    out = apply_overrides(raw, ["train.lr=1e-3", "train.trackers=[tensorboard]", "eval.before=false", "toy.hidden=8"])
    assert out["train"]["lr"] == 1e-3 and out["train"]["trackers"] == ["tensorboard"]
    assert out["eval"]["before"] is False and out["toy"]["hidden"] == 8
    assert raw.get("eval") is None  # the original is untouched
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides(raw, ["train.lr"])
    with pytest.raises(ConfigError, match="output is not a section"):
        apply_overrides(raw, ["output.x=1"])


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modality: toy\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(tmp_path / "list.yaml")


def test_load_config_applies_overrides(toy_config):
    config = load_config(toy_config(), ["train.max_steps=3"])
    assert config.train.max_steps == 3


def make_package(root: Path, name: str) -> Path:
    package = root / name
    (package / "weights").mkdir(parents=True)
    # Importing this package would fail: resolving pkg:// must locate it without running its code.
    (package / "__init__.py").write_text("raise RuntimeError('package code ran')\n")
    (package / "weights" / "model.gguf").write_bytes(b"GGUF")
    return package


def test_pkg_base_resolves_inside_an_installed_package_without_importing_it(tmp_path, monkeypatch):
    from polyadapt.lifecycle import resolve_base

    package = make_package(tmp_path, "shipped_model_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    resolved = resolve_base("pkg://shipped_model_pkg/weights/model.gguf")
    assert resolved.path == (package / "weights" / "model.gguf").resolve()
    assert resolved.hub_id is None
    import sys

    assert "shipped_model_pkg" not in sys.modules


@pytest.mark.parametrize(
    "reference,message",
    [
        ("pkg://no_such_package_xyz/model.bin", "package 'no_such_package_xyz' is not installed"),
        ("pkg://shipped_model_pkg/missing.bin", "'missing.bin' does not exist inside package"),
        ("pkg://shipped_model_pkg/../../etc/passwd", "escapes the package directory"),
        ("./no/such/dir", "neither an existing path nor a hub id"),
    ],
)
def test_bad_base_references_are_explained(tmp_path, monkeypatch, reference, message):
    from polyadapt.lifecycle import resolve_base

    make_package(tmp_path, "shipped_model_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_base(reference)


def test_hub_ids_and_local_paths_resolve(tmp_path):
    from polyadapt.lifecycle import resolve_base

    assert resolve_base("HuggingFaceTB/SmolLM2-135M").hub_id == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_base(str(tmp_path)).path == tmp_path.resolve()


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["peft.method=ia3"], "peft.method: 'ia3' is not supported by the toy modality (supported: lora, dora)"),
        (
            ["train.early_stopping_metric=maee", "train.early_stopping_patience=2", "train.eval_every=2"],
            "train.early_stopping_metric: 'maee' is not a metric the toy modality reports "
            "(valid: eval_loss, mae, max_abs_error)",
        ),
        (
            ["train.early_stopping_patience=2", "train.eval_every=null"],
            "train: early_stopping_patience needs eval_every",
        ),
        (["peft.method=dora", "toy.hidden=2"], "toy.hidden: dora needs at least 4 hidden units"),
        (["train.num_workers=2"], "train.num_workers: unknown key"),
    ],
)
def test_what_the_modality_cannot_run_fails_at_validation(raw, overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(apply_overrides(raw, overrides))
    assert expected in str(err.value)


def test_a_bad_combination_fails_before_any_model_or_data_is_touched(toy_config, tmp_path):
    from .conftest import run_cli

    config = toy_config(train={"early_stopping_patience": 2, "eval_every": None})
    result = run_cli("adapt", str(config))
    assert result.returncode == 2 and "early_stopping_patience needs eval_every" in result.stderr
    assert not (tmp_path / "run").exists()


def test_data_may_be_given_as_a_directory(raw):
    raw["data"] = raw["data"]["path"]
    assert validate_config(raw).data.path == Path(raw["data"])
