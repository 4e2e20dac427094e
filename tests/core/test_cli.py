"""The CLI end to end on the toy plugin: adapt, evaluate, infer, export, doctor, and one-line errors with exit 2."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from polyadapt.manifest import read_manifest

from .conftest import run_cli


@pytest.fixture
def run_dir(toy_config, tmp_path):
    result = run_cli("adapt", str(toy_config()), "--set", "train.max_steps=10", check=True)
    assert "eval_loss" in result.stdout and "report.html" in result.stdout
    return tmp_path / "run"


def test_adapt_evaluate_infer_export(run_dir, tmp_path, toy):
    manifest = read_manifest(run_dir).to_json()
    assert manifest["status"] == "complete" and manifest["config"]["train"]["max_steps"] == 10

    other = toy.write_data(tmp_path / "other", n=16, seed=9)
    evaluated = run_cli("evaluate", str(run_dir), "--data", str(other), check=True)
    assert "eval_loss" in evaluated.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["evaluated_on"]["data"] == str(other) and report["evaluated_on"]["samples"] == 8
    assert len(read_manifest(run_dir).to_json()["evaluations"]) == 1

    predicted = run_cli("infer", str(run_dir), "--x", "0.1,0.2,0.3,0.4", check=True)
    assert float(predicted.stdout.strip())  # a number came back
    assert "--x" in run_cli("infer", str(run_dir), "--help", check=True).stdout

    out = tmp_path / "merged"
    exported = run_cli("export", str(run_dir), "--format", "merged", "--output", str(out), check=True)
    assert json.loads(exported.stdout)["format"] == "merged"
    merged = load_file(str(out / "model.safetensors"))
    assert "encoder.weight" in merged and not any("lora" in k for k in merged)
    assert (out / "export.json").exists()
    again = run_cli("export", str(run_dir), "--format", "merged", "--output", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_unknown_export_format_lists_the_available_ones(run_dir, tmp_path):
    result = run_cli("export", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "'onnx' is not available for modality 'toy' (available: merged)" in result.stderr
    assert not (tmp_path / "x").exists()


def test_doctor_lists_every_bad_sample_and_exits_2(toy_config, tmp_path):
    config = toy_config()
    assert run_cli("doctor", str(config), check=True).stdout.strip().endswith("config and data are valid")
    data = tmp_path / "data" / "validation.jsonl"
    data.write_text(data.read_text() + '{"x": 1}\n[1, 2]\n')
    result = run_cli("doctor", str(config))
    assert result.returncode == 2
    assert (
        f"{data}:17: needs keys 'x' and 'y'" in result.stderr
        and f"{data}:18: expected a JSON object, got list" in result.stderr
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["adapt", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["adapt", "{config}", "--set", "train.lr=-1"], "train.lr: -1 is invalid"),
        (["adapt", "{config}", "--set", "train.precision=fp16"], "'fp16' needs a CUDA GPU"),
        (["evaluate", "{tmp}/nowhere"], "is not a directory"),
        (["infer", "{tmp}"], "is not a polyadapt run"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(toy_config, tmp_path, args, expected):
    config = toy_config()
    args = [a.format(config=config, tmp=tmp_path) for a in args]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(toy_config):
    result = run_cli("--debug", "adapt", str(toy_config()), "--set", "train.lr=-1")
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr
