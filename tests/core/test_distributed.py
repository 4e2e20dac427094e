"""The same command under `accelerate launch` with 2 processes (DDP over gloo on CPU)."""

from __future__ import annotations

import pytest

from polyadapt.manifest import read_manifest
from tests.launch import accelerate_launch


def test_two_process_run_completes_and_its_adapter_loads(toy_config, tmp_path, toy):
    config = toy_config(train={"max_steps": 6, "save_every": 3, "eval_every": 3})
    result = accelerate_launch(["adapt", str(config)])
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    manifest = read_manifest(run_dir).to_json()
    assert manifest["status"] == "complete"
    # Two processes of batch 8 see 16 samples per step.
    assert manifest["training"]["samples_seen"] == 6 * 16
    assert result.stdout.count("run: ") == 1  # only the main process reports
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-000003").glob("rng-*.safetensors")) == [
        "rng-0.safetensors", "rng-1.safetensors",
    ]  # fmt: skip

    import torch
    from peft import PeftModel

    from polyadapt.lifecycle import load_run

    loaded = load_run(run_dir)
    assert isinstance(loaded.run.model, PeftModel)
    with torch.no_grad():
        out = loaded.run.model(torch.zeros(2, 4))
    assert out.shape == (2,) and torch.isfinite(out).all()


@pytest.mark.gpu
def test_cuda_run_uses_bf16_autocast(toy_config):
    import torch

    import polyadapt

    assert torch.cuda.is_available()
    run_dir = polyadapt.adapt(toy_config(train={"max_steps": 5}))
    manifest = read_manifest(run_dir).to_json()
    assert manifest["hardware"]["cuda"] and manifest["status"] == "complete"
    assert manifest["metrics"]["after"]["eval_loss"] < manifest["metrics"]["before"]["eval_loss"]
