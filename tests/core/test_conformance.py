"""The conformance suite (polyadapt.testing) on the toy plugin, installed the way a third-party plugin is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyadapt.testing import CHECKS, ModalityCase, check_modality, parametrize_with_checks


def make_toy(directory: Path) -> dict:
    import polyadapt_toy

    return {
        "modality": "toy",
        "base": str(polyadapt_toy.write_base(directory / "base")),
        "data": str(polyadapt_toy.write_data(directory / "data", n=16)),
        "output": str(directory / "run"),
        "peft": {"r": 4, "alpha": 8},
    }


def corrupt_toy(data: Path) -> Path:
    path = data / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = '{"x": [1, 2, 3, 4]}'
    path.write_text("\n".join(lines) + "\n")
    return path


TOY = ModalityCase("toy", make=make_toy, corrupt=corrupt_toy, infer_options={"x": "0.1,0.2,0.3,0.4"})
ALL = frozenset({"inference", "report", "multi_adapter", "batched_adapters"})


@parametrize_with_checks([TOY], capabilities={"toy": ALL})
def test_toy_modality_conforms(case, check, tmp_path, toy_plugins):
    check(case, tmp_path)


def test_the_suite_catches_a_modality_that_breaks_its_contract(tmp_path, toy, monkeypatch):
    # a held-out batch that draws fresh noise each time: exactly what the determinism check is for
    import torch

    def noisy_collate(self, items, training):
        return {
            "x": torch.tensor([i["x"] for i in items]) + torch.randn(len(items), 4),
            "y": torch.tensor([i["y"] for i in items]),
        }

    monkeypatch.setattr(toy.ToyRun, "collate", noisy_collate)
    from polyadapt.testing import check_heldout_batches_are_deterministic

    with pytest.raises(AssertionError, match="differs"):
        check_heldout_batches_are_deterministic(TOY, tmp_path)


def test_a_capability_without_its_protocol_is_refused_at_registration(toy, monkeypatch):
    from polyadapt.errors import PluginError
    from polyadapt.plugins import build_plugin_manager

    monkeypatch.setattr(toy.ToyModality, "capabilities", frozenset({"inference", "teleport"}))
    monkeypatch.delattr(toy.ToyRun, "infer")
    with pytest.raises(PluginError, match=r"unknown capability 'teleport'.*|lacks infer"):
        build_plugin_manager().get_modality("toy")


def test_check_modality_runs_every_check(tmp_path, toy_plugins):
    passed = check_modality(TOY, tmp_path)
    assert passed == [c.__name__ for c in CHECKS]
    assert json.loads((tmp_path / "check_declarations" / "base" / "config.json").read_text())["features"] == 4


def test_the_batched_adapter_check_fails_when_rows_do_not_get_their_adapter(tmp_path, toy, monkeypatch):
    from contextlib import nullcontext

    from polyadapt.testing import check_batched_adapters

    monkeypatch.setattr(toy.ToyRun, "adapter_batch", lambda self, names: nullcontext())
    with pytest.raises(AssertionError, match="mixed batch loss"):
        check_batched_adapters(TOY, tmp_path)
