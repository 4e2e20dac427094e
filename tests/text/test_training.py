"""Adaptation through polyadapt's real lifecycle and loop: every PEFT method trains, packing and checkpointing run."""

from __future__ import annotations

import json

import pytest

import polyadapt
from tests.text.builders import make_config

CASES = [
    ("llama", "lora", {}),
    ("llama", "dora", {}),
    ("llama", "ia3", {"lr": 0.05}),
    ("llama", "prefix", {"lr": 0.05}),
    ("gpt2", "lora", {}),
]


@pytest.mark.parametrize(("kind", "method", "train"), CASES, ids=[f"{k}-{m}" for k, m, _ in CASES])
def test_each_method_lowers_the_held_out_loss(tmp_path, tiny_bases, chat_data, kind, method, train):
    config = make_config(
        tiny_bases[kind], chat_data, tmp_path / "run", peft={"method": method},
        train={"max_steps": 12, "lr": 0.02, "batch_size": 4, "precision": "fp32", **train},
        text={"max_length": 64, "generate_eval": False},
    )  # fmt: skip
    run = polyadapt.adapt(config)
    metrics = json.loads((run / "polyadapt.json").read_text())["metrics"]
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"] - 0.05
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"]
    assert (run / "adapter_config.json").exists() and (run / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("options", [{"packing": True}, {"packing": False, "grad": True}], ids=["packing", "grad-ckpt"])
def test_packing_and_gradient_checkpointing_train(tmp_path, tiny_llama, chat_data, options):
    config = make_config(
        tiny_llama, chat_data, tmp_path / "run",
        train={"max_steps": 8, "lr": 0.02, "batch_size": 2, "precision": "fp32", "grad_checkpointing": options.get("grad", False)},
        text={"max_length": 128, "packing": options["packing"], "generate_eval": False},
    )  # fmt: skip
    run = polyadapt.adapt(config)
    manifest = json.loads((run / "polyadapt.json").read_text())
    assert manifest["metrics"]["after"]["eval_loss"] < manifest["metrics"]["before"]["eval_loss"]
    prepared = manifest["data"]["prepared"]["train"]
    if options["packing"]:
        assert prepared["packed_rows"] < prepared["items"]
        assert 0 < prepared["packing_efficiency"] <= 1


def test_generation_metrics_and_report_examples(tmp_path, tiny_llama, chat_data):
    config = make_config(tiny_llama, chat_data, tmp_path / "run", train={"max_steps": 2, "precision": "fp32"})
    run = polyadapt.adapt(config)
    metrics = json.loads((run / "polyadapt.json").read_text())["metrics"]
    for name in ("perplexity", "exact_match", "token_f1", "fact_accuracy"):
        assert name in metrics["before"] and name in metrics["after"]
    report = (run / "report.html").read_text()
    assert "Sample answers: base vs adapted" in report
    assert "What APY does TideSaver pay?" in report


def test_two_process_run_with_packing_and_the_fused_loss(tmp_path, tiny_llama, chat_data):
    """Under DDP the model still runs through its wrapper up to the bypassed head, and the run trains."""
    import yaml

    from polyadapt.manifest import read_manifest
    from tests.launch import accelerate_launch

    raw = {
        "modality": "text", "base": str(tiny_llama), "data": {"path": str(chat_data)}, "output": str(tmp_path / "run"),
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "lr": 0.02, "batch_size": 2, "precision": "fp32", "seed": 0},
        "text": {"max_length": 128, "packing": True, "generate_eval": False},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = accelerate_launch(["adapt", str(path)])
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "run")
    assert manifest.status == "complete"
    assert manifest.data.prepared["train"]["fused_loss"] is True
    assert manifest.training.samples_seen == 6 * 2 * 2  # two processes of batch 2
    assert manifest.metrics.after["eval_loss"] < manifest.metrics.before["eval_loss"]
