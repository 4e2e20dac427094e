"""Training defaults that adapt: the rule's values, explicit values winning, the auto record in the manifest, the best
adapter kept, the not-improved warning and the epoch count."""

from __future__ import annotations

import json
import math

import pytest
import yaml

import polyadapt
from polyadapt.config import TrainConfig
from polyadapt.defaults import TrainingFacts, TrainingRule, resolve_training
from polyadapt.manifest import read_manifest

from .conftest import run_cli

TEXT_LIKE = TrainingRule(reference_lr=1e-3, reference_params=135e6, min_steps=150, amount="tokens", max_amount=20e6)


@pytest.mark.parametrize(
    "method,r,alpha,params,batch,expected",
    [
        ("lora", 8, 16, 135e6, 8, 1e-3),  # the reference point
        ("lora", 16, 32, 135e6, 8, 1e-3),  # same scale alpha/r = 2
        ("lora", 16, 16, 135e6, 8, 2e-3),  # half the scale: twice the rate
        ("dora", 8, 16, 135e6, 8, 1e-3),
        ("ia3", 8, 16, 135e6, 8, 3e-3),
        ("prefix", 8, 16, 135e6, 8, 1e-2),
        ("lora", 8, 16, 7e9, 8, 3.73e-4),  # (135M / 7B) ** 0.25 = 0.373
        ("lora", 8, 16, 135e6, 32, 2e-3),  # sqrt(32 / 8)
        ("lora", 8, 16, 135e6, 2, 5e-4),  # sqrt(2 / 8)
        ("lora", 8, 16, 1e3, 8, 4e-3),  # a tiny model: the size factor is clamped at 4
        ("prefix", 1, 64, 1e3, 512, 1e-2),  # everything up: clamped at 1e-2
        ("lora", 8, 64, 1e12, 1, 2.21e-5),  # every factor down, each clamped at 1/4 (size, scale), batch sqrt(1/8)
    ],
)
def test_the_learning_rate_rule(method, r, alpha, params, batch, expected):
    value, why = TEXT_LIKE.lr(method, r, alpha, int(params), batch)
    assert math.isclose(value, expected, rel_tol=1e-2), (value, why)
    assert "reference 0.001" in why


def test_the_learning_rate_never_leaves_its_range():
    image_like = TrainingRule(reference_lr=1e-4, reference_params=860e6, min_steps=400)
    assert image_like.lr("lora", 8, 64, int(1e12), 1)[0] == 1e-5
    assert "clamped" in image_like.lr("lora", 8, 64, int(1e12), 1)[1]


@pytest.mark.parametrize(
    "items,tokens_per_item,epochs,steps",
    [
        (40, 50, 10.0, 50),  # 5 steps an epoch: raised toward 150 steps, capped at 10 epochs
        (100, 50, 10.0, 130),  # 13 steps an epoch: 150 / 13 = 11.5, capped at 10 epochs
        (181, 50, 6.52, 150),  # 23 steps an epoch: raised to 150 steps
        (400, 50, 3.0, 150),  # 50 steps an epoch: 3 epochs are 150 steps already
        (1_000, 50, 3.0, 375),  # the target
        (20_000, 50, 2.5, 6_250),  # 3 epochs would be 60,000 samples: cut to 50,000
        (100_000, 50, 1.0, 12_500),  # never below one epoch, never ten
        (5_000, 2_000, 2.0, 1_250),  # 10M tokens an epoch: cut to 20M tokens
    ],
)
def test_the_length_rule_small_and_large_sets(items, tokens_per_item, epochs, steps, raw_config):
    facts = TrainingFacts(items=items, params=135_000_000, amount=items * tokens_per_item, heldout=20)
    resolved = resolve_training(raw_config, TEXT_LIKE, facts)
    train = resolved.config.train
    assert train.epochs == epochs and train.max_steps is None
    from polyadapt.training import count_steps

    assert count_steps(train, items, 8) == steps
    assert f"-> {steps} steps" in resolved.choices["train.epochs"]["rule"]
    assert train.warmup_steps == round(0.05 * steps)
    assert train.eval_every == (math.ceil(steps / 8) if steps >= 16 else max(1, steps // 2))
    assert train.early_stopping_patience == 3 and train.early_stopping_metric == "eval_loss"


def test_explicit_values_always_win(raw_config):
    explicit = {"lr": 5e-4, "epochs": 2, "warmup_steps": 0, "eval_every": None, "early_stopping_patience": None}
    config = raw_config.model_copy(update={"train": TrainConfig(**explicit, early_stopping_metric="eval_loss")})
    resolved = resolve_training(config, TEXT_LIKE, TrainingFacts(items=10, params=1, heldout=5))
    assert resolved.choices == {}
    train = resolved.config.train
    assert (train.lr, train.epochs, train.warmup_steps, train.eval_every, train.early_stopping_patience) == (
        5e-4, 2.0, 0, None, None,
    )  # fmt: skip
    steps = resolve_training(
        raw_config.model_copy(update={"train": TrainConfig(max_steps=7)}), TEXT_LIKE, TrainingFacts(10, 1, heldout=5)
    )
    assert steps.config.train.max_steps == 7 and "train.epochs" not in steps.choices
    assert steps.config.train.warmup_steps == 0  # 5% of 7 steps


def test_no_held_out_samples_means_no_periodic_evaluation(raw_config):
    resolved = resolve_training(raw_config, TEXT_LIKE, TrainingFacts(items=100, params=1, heldout=0))
    assert resolved.config.train.eval_every is None and resolved.config.train.early_stopping_patience is None


def test_a_four_key_config_prints_and_records_every_choice(toy_config, tmp_path):
    config = tmp_path / "four.yaml"
    full = yaml.safe_load(toy_config().read_text())
    config.write_text(yaml.safe_dump({k: full[k] for k in ("modality", "base", "data", "output")}))
    result = run_cli("adapt", str(config), check=True)
    assert "auto training values" in result.stderr and "train.lr = " in result.stderr
    manifest = read_manifest(tmp_path / "run")
    for key in ("train.lr", "train.epochs", "train.warmup_steps", "train.eval_every", "train.early_stopping_patience"):
        assert set(manifest.auto[key]) == {"value", "rule"}, key
    train = manifest.config["train"]
    assert train["lr"] == manifest.auto["train.lr"]["value"] and train["lr"] != "auto"
    assert train["epochs"] == manifest.auto["train.epochs"]["value"]
    # the adapter learned, and the manifest says so
    assert manifest.improved is True and manifest.metrics.headline == "eval_loss"
    assert manifest.metrics.after["eval_loss"] < manifest.metrics.before["eval_loss"]
    assert "NOT better" not in result.stderr
    # the held-out points of the loss curve are in the history and the report
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in history if "eval/eval_loss" in r]
    assert len(evals) >= 8
    assert "class='eval'" in (tmp_path / "run" / "report.html").read_text()
    # resuming the same four-key file compares equal to the resolved config it recorded
    refused = run_cli("adapt", str(config), "--resume")
    assert refused.returncode == 2 and "holds a complete run" in refused.stderr


def test_periodic_evaluation_keeps_the_best_adapter_without_early_stopping(toy_config):
    # A learning rate this large overshoots after a few steps; with no patience the run goes on to the end, but the
    # adapter it keeps is the best one evaluated.
    config = toy_config(
        train={"max_steps": 30, "lr": 3.0, "eval_every": 2, "early_stopping_patience": None, "scheduler": "constant"}
    )
    run_dir = polyadapt.adapt(config)
    manifest = read_manifest(run_dir).to_json()
    training = manifest["training"]
    assert not training["stopped_early"] and training["steps"] == 30
    assert training["best_step"] < 30
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/eval_loss"] for r in history if "eval/eval_loss" in r]
    assert evals[-1] > min(evals)  # the last adapter is not the best one...
    assert math.isclose(manifest["metrics"]["after"]["eval_loss"], min(evals), rel_tol=1e-5)  # ...the kept one is


def test_a_model_that_did_not_improve_gets_a_warning_that_cannot_be_missed(toy_config, tmp_path):
    config = toy_config(train={"max_steps": 2, "lr": 1e-9, "eval_every": None})
    result = run_cli("adapt", str(config), check=True)
    assert "WARNING: the adapted model is NOT better than the base on eval_loss" in result.stderr
    assert "too few steps: 2 optimizer steps" in result.stderr and "polyadapt tune" in result.stderr
    manifest = json.loads((tmp_path / "run" / "polyadapt.json").read_text())
    assert manifest["improved"] is False and manifest["metrics"]["headline"] == "eval_loss"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["improved"] is False and "NOT better" in report["warning"]
    assert "role=alert" in (tmp_path / "run" / "report.html").read_text()


def test_the_manifest_counts_the_epochs_trained(toy_config, toy):
    # the toy set has 57 training items: batches of 8 make 8 batches an epoch
    run_dir = polyadapt.adapt(toy_config(train={"max_steps": 20}))
    training = read_manifest(run_dir).to_json()["training"]
    assert training["epochs_completed"] == 2 and training["epochs"] == 2.5
    run_dir = polyadapt.adapt(toy_config(train={"epochs": 1, "max_steps": None}, output=str(run_dir) + "-one"))
    training = read_manifest(run_dir).to_json()["training"]
    assert training["epochs_completed"] == 1 and training["epochs"] == 1.0 and training["steps"] == 8


@pytest.fixture
def raw_config(tmp_path):
    from polyadapt.config import AdaptConfig

    return AdaptConfig.model_validate(
        {"modality": "x", "base": "b", "data": {"path": str(tmp_path)}, "output": str(tmp_path / "o")}
    )
