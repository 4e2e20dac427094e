"""The shared training loop on the toy modality: learning, resume, divergence, data order, accumulation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polyadapt
from polyadapt.errors import TrainingDivergedError
from polyadapt.manifest import read_manifest
from polyadapt.training import count_steps, epoch_batches, lr_lambda, shard

from .conftest import run_cli


def read_history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_held_out_metrics_improve(toy_config):
    run_dir = polyadapt.adapt(toy_config(train={"max_steps": 30}))
    losses = [r["loss"] for r in read_history(run_dir) if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    metrics = read_manifest(run_dir).to_json()["metrics"]
    assert metrics["after"]["eval_loss"] < 0.5 * metrics["before"]["eval_loss"]
    assert metrics["after"]["mae"] < metrics["before"]["mae"]
    assert "max_abs_error" in metrics["after"]  # contributed through register_metrics


def test_a_run_killed_mid_way_resumes_to_the_same_adapter(toy_config, tmp_path):
    steps = {"max_steps": 16, "save_every": 4, "keep_checkpoints": 3, "eval_every": 4}
    reference = polyadapt.adapt(toy_config("ref.yaml", output=str(tmp_path / "ref"), train=steps))
    config = toy_config("crash.yaml", output=str(tmp_path / "crash"), train=steps)
    killed = run_cli("adapt", str(config), env={"POLYADAPT_TOY_KILL_AT_STEP": "8"})
    assert killed.returncode != 0
    crashed = tmp_path / "crash"
    assert read_manifest(crashed).status == "running"  # never looks complete
    assert not (crashed / "adapter_model.safetensors").exists()
    refused = run_cli("adapt", str(config))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    run_cli("adapt", str(config), "--resume", check=True)
    expected = load_file(str(reference / "adapter_model.safetensors"))
    actual = load_file(str(crashed / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)
    manifest = read_manifest(crashed).to_json()
    assert manifest["status"] == "complete" and manifest["training"]["resumed_from"].endswith("step-000008")
    assert len(manifest["resumed"]) == 1
    steps_logged = [r["step"] for r in read_history(crashed) if "loss" in r]
    assert steps_logged == list(range(1, 17))


def test_resume_refuses_a_changed_config(toy_config, tmp_path):
    config = toy_config(train={"max_steps": 8, "save_every": 4})
    run_cli("adapt", str(config), env={"POLYADAPT_TOY_KILL_AT_STEP": "4"})
    changed = toy_config(train={"max_steps": 8, "save_every": 4, "lr": 0.5})
    result = run_cli("adapt", str(changed), "--resume")
    assert result.returncode == 2 and "train.lr" in result.stderr


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(toy_config, tmp_path):
    config = toy_config(train={"max_steps": 20, "save_every": 3}, toy={"explode_after_calls": 7})
    with pytest.raises(TrainingDivergedError) as err:
        polyadapt.adapt(config)
    assert err.value.step == 8
    assert "loss became nan at step 8" in str(err.value)
    assert err.value.checkpoint.endswith("step-000006")
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "step-000006" / "trainable.safetensors").exists()
    manifest = read_manifest(run_dir).to_json()
    assert manifest["status"] == "failed" and "step 8" in manifest["error"]
    result = run_cli("adapt", str(config), "--overwrite")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: loss became nan at step 8")
    assert "Traceback" not in result.stderr


def test_gradient_accumulation_matches_a_larger_batch(toy_config, tmp_path):
    # No dropout, no clipping: two micro-batches of 4 must give the update of one batch of 8.
    common = {"max_steps": 3, "max_grad_norm": None, "scheduler": "constant"}
    peft = {"dropout": 0.0}
    one = polyadapt.adapt(
        toy_config("a.yaml", output=str(tmp_path / "a"), peft=peft, train={**common, "batch_size": 8})
    )
    two = polyadapt.adapt(
        toy_config("b.yaml", output=str(tmp_path / "b"), peft=peft, train={**common, "batch_size": 4, "grad_accum": 2})
    )
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    # Same samples per step only if the global order matches: batch 8 = two consecutive batches of 4.
    first = epoch_batches(57, 8, 3, 0)[:3]
    second = epoch_batches(57, 4, 3, 0)[:6]
    assert [i for b8 in first for i in b8] == [i for b4 in second for i in b4]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_early_stopping_stops_and_keeps_the_best_adapter(toy_config, tmp_path):
    # A learning rate this large diverges from the optimum after a few steps; patience 2 must stop the run.
    config = toy_config(
        train={"max_steps": 60, "lr": 3.0, "eval_every": 2, "early_stopping_patience": 2, "scheduler": "constant"}
    )
    run_dir = polyadapt.adapt(config)
    training = read_manifest(run_dir).to_json()["training"]
    assert training["stopped_early"] and training["steps"] < 60
    evals = [r["eval/eval_loss"] for r in read_history(run_dir) if "eval/eval_loss" in r]
    after = read_manifest(run_dir).to_json()["metrics"]["after"]["eval_loss"]
    assert math.isclose(after, min(evals + [after]), rel_tol=1e-5)


def test_epoch_order_is_deterministic_and_covers_every_item():
    a = epoch_batches(50, 8, seed=1, epoch=0)
    assert a == epoch_batches(50, 8, seed=1, epoch=0)
    assert a != epoch_batches(50, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(50))


def test_group_by_length_puts_similar_lengths_together():
    lengths = [(i * 37) % 100 for i in range(400)]
    grouped = epoch_batches(400, 8, 0, 0, lengths, group_by_length=True)
    plain = epoch_batches(400, 8, 0, 0, lengths, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(400))

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(grouped) < 0.2 * spread(plain)


def test_shards_split_a_global_batch_evenly():
    assert shard([1, 2, 3, 4], 0, 2) == [1, 2] and shard([1, 2, 3, 4], 1, 2) == [3, 4]
    assert shard([1, 2, 3], 1, 2) == [3, 1]  # wraps so both processes step together


def test_schedule_warms_up_then_decays():
    f = lr_lambda("cosine", warmup=4, total=20)
    assert f(0) < f(3) < 1.0 and math.isclose(f(4), 1.0) and f(19) < 0.05
    assert lr_lambda("linear", 0, 10)(10) == 0.0 and lr_lambda("constant", 0, 10)(9) == 1.0


def test_step_count_from_epochs():
    from polyadapt.config import TrainConfig

    assert count_steps(TrainConfig(epochs=2, batch_size=8), 64, 8) == 16
    assert count_steps(TrainConfig(epochs=1, batch_size=8, grad_accum=4), 64, 8) == 2
    assert count_steps(TrainConfig(max_steps=7), 64, 8) == 7


def test_tensorboard_tracker_writes_event_files(toy_config, tmp_path):
    run_dir = polyadapt.adapt(toy_config(train={"max_steps": 3, "trackers": ["tensorboard"]}))
    events = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_training_callbacks_from_plugins_see_every_step(toy_config, toy, monkeypatch):
    seen = []

    class Recorder:
        def on_train_begin(self, state):
            seen.append(("begin", state.step))

        def on_log(self, state, logs):
            seen.append(("log", logs["step"]))

        def on_evaluate(self, state, metrics):
            seen.append(("eval", round(metrics["eval_loss"], 6) > 0))

        def on_train_end(self, state):
            seen.append(("end", state.step))

    monkeypatch.setattr(toy, "training_callbacks", polyadapt.hookimpl(lambda config: [Recorder()]))
    from polyadapt.plugins import reset_plugin_manager

    reset_plugin_manager()
    polyadapt.adapt(toy_config(train={"max_steps": 4, "eval_every": 2}))
    assert seen == [("begin", 0), ("log", 1), ("log", 2), ("eval", True), ("log", 3), ("log", 4), ("end", 4)]


def test_the_run_sees_the_model_being_trained_after_each_periodic_evaluation(toy_config, toy, monkeypatch):
    calls = []

    def on_evaluate(self, step, metrics):
        lora = [n for n, _ in self.model.named_parameters() if "lora_" in n]
        calls.append((step, sorted(metrics), bool(lora), self.ctx.run_dir is not None, self.model.training))
        self.model.train()  # whatever it does, the loop's `evaluating` puts the model back as it was

    monkeypatch.setattr(toy.ToyRun, "on_evaluate", on_evaluate)
    run_dir = polyadapt.adapt(toy_config(train={"max_steps": 6, "eval_every": 2}))
    # at steps 2 and 4; the last step's evaluation is the final one, not a periodic one
    assert calls == [(2, ["eval_loss"], True, True, False), (4, ["eval_loss"], True, True, False)]
    assert read_manifest(run_dir).status == "complete"


def test_train_loop_called_directly_without_periodic_evaluation_needs_no_early_stopping_keys(toy_config, tmp_path):
    # The library use the benchmarks make of the loop: explicit length, lr and warmup, eval_every null, and the
    # early-stopping keys left at their `auto` default, which mean "none" when nothing is evaluated periodically.
    from polyadapt.config import ResolvedBase, load_config
    from polyadapt.lifecycle import make_accelerator
    from polyadapt.modality import DataContext, RunContext
    from polyadapt.plugins import get_plugin_manager
    from polyadapt.training import train_loop

    config = load_config(toy_config(train={"max_steps": 5, "warmup_steps": 0, "eval_every": None}))
    assert config.train.early_stopping_patience == "auto" and config.train.early_stopping_metric == "auto"
    accelerator = make_accelerator(config, tmp_path)
    ctx = RunContext(
        config=config, base=ResolvedBase(reference=str(config.base), path=Path(config.base)), device=accelerator.device,
        dtype=torch.float32, run_dir=tmp_path,
    )  # fmt: skip
    run = get_plugin_manager().get_modality("toy").open(ctx)
    run.load_base()
    run.model.requires_grad_(False)
    run.add_adapter()
    found = run.modality.read_data(DataContext(config=config, path=config.data.path))
    prepared = run.prepare(found.splits["train"], training=True)
    result = train_loop(accelerator=accelerator, run=run, train_split=prepared, eval_split=None, run_dir=tmp_path,
                        show_progress=False)  # fmt: skip
    assert result.state.step == 5 and result.state.best_step is None and not result.state.stopped_early
    losses = [r["loss"] for r in read_history(tmp_path) if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize(("threshold", "expected"), [(None, []), (512, [512 * 1024])])
def test_cpu_training_fixes_the_mmap_threshold_unless_told_not_to(threshold, expected, toy_config, monkeypatch):
    import polyadapt.cpu_memory

    calls = []
    monkeypatch.setattr(polyadapt.cpu_memory, "fix_mmap_threshold", lambda size, trim=None: calls.append(size))
    config = toy_config("mmap.yaml", train={"max_steps": 2, "cpu_mmap_threshold_kib": threshold})
    polyadapt.adapt(config)
    assert calls == expected


MMAP_PROBE = """
import ctypes, sys
from polyadapt.cpu_memory import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(1 << 20)
size = 3 << 19  # 1.5 MiB: mmapped at first; freeing it raises glibc's own threshold above it
first = libc.malloc(size)
libc.free(ctypes.c_void_p(first))
before = libc.mallinfo2().hblks
second = libc.malloc(size)
print(libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(second))
"""


def test_a_fixed_mmap_threshold_keeps_activation_sized_blocks_out_of_the_heap():
    """glibc alone serves a re-allocated 1.5 MiB block from its heap (it raised its threshold when the first was
    freed); with the threshold fixed at 1 MiB the block is mmapped again, so freeing it gives it back."""
    import subprocess
    import sys

    from polyadapt.cpu_memory import fix_mmap_threshold, is_glibc

    if not is_glibc():
        assert fix_mmap_threshold(1 << 20) is False
        return
    mmapped = {
        mode: int(subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], capture_output=True, text=True,
                                 check=True).stdout)
        for mode in ("default", "fixed")
    }  # fmt: skip
    assert mmapped == {"default": 0, "fixed": 1}
