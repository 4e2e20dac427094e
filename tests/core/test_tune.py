"""``polyadapt tune`` on the toy modality: real trial runs scored on their manifests, trials.json and best.yaml, a killed
study resumed, failing trials recorded, one-line errors, and the same search on a local Ray instance."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from polyadapt.config import load_config
from polyadapt.errors import TuneError
from polyadapt.manifest import read_manifest
from polyadapt.tune import INSTALL_HINT, parse_search, tune

from .conftest import run_cli


def trials_json(tmp_path) -> dict:
    return json.loads((tmp_path / "run-tune" / "trials.json").read_text())


def check_trials(tmp_path, expected_complete: int) -> dict:
    """Every complete trial is a complete run scored on its own manifest; best.yaml holds the best one's values."""
    data = trials_json(tmp_path)
    assert data["metric"] == "eval_loss" and data["higher_is_better"] is False
    complete = [t for t in data["trials"] if t["state"] == "complete"]
    assert len(complete) == expected_complete
    for trial in complete:
        manifest = read_manifest(tmp_path / "run-tune" / f"trial-{trial['number']:03d}")
        assert manifest.status == "complete"
        assert trial["value"] == manifest.metrics.after["eval_loss"]
        params, config = trial["params"], manifest.config
        assert config["train"]["lr"] == params["lr"] and config["train"]["epochs"] == params["epochs"]
        assert config["peft"]["r"] == params["r"] and config["peft"]["alpha"] == 2 * params["r"]
        assert config["output"] == str(tmp_path / "run-tune" / f"trial-{trial['number']:03d}")
    best = min(complete, key=lambda t: t["value"])
    assert data["best"] == best["number"]
    config = load_config(tmp_path / "run-tune" / "best.yaml")
    assert config.output == tmp_path / "run"
    assert config.train.lr == best["params"]["lr"] and config.train.epochs == best["params"]["epochs"]
    assert config.train.max_steps is None
    assert config.peft.r == best["params"]["r"] and config.peft.alpha == 2 * best["params"]["r"]
    return data


def test_two_trials_are_real_runs_with_trials_json_best_yaml_and_a_table(toy_config, tmp_path):
    from polyadapt.cli import cli

    result = CliRunner().invoke(cli, ["tune", str(toy_config()), "--trials", "2"])
    assert result.exit_code == 0, result.output
    data = check_trials(tmp_path, expected_complete=2)
    assert sorted(p.name for p in (tmp_path / "run-tune").iterdir() if p.name.startswith("trial-")) == [
        "trial-000",
        "trial-001",
    ]
    assert (tmp_path / "run-tune" / "study.db").exists() and not (tmp_path / "run").exists()
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["trial", "lr", "r", "epochs", "eval_loss", "state", "seconds"]
    best_row = next(line for line in lines[1:3] if line.startswith("*"))
    assert best_row.split()[1] == str(data["best"]) and "complete" in best_row
    assert f"best: trial {data['best']} (eval_loss" in result.stdout


def test_a_killed_study_resumes_without_rerunning_finished_trials(toy_config, tmp_path):
    import optuna

    from polyadapt.cli import cli

    config = str(toy_config(train={"save_every": 1}))
    tune(config, 1)
    first = (tmp_path / "run-tune" / "trial-000" / "polyadapt.json").read_bytes()

    killed = run_cli("tune", config, "--trials", "2", env={"POLYADAPT_TOY_KILL_AT_STEP": "2"})
    assert killed.returncode != 0  # SIGKILL in the middle of trial 1
    storage = f"sqlite:///{tmp_path / 'run-tune' / 'study.db'}"
    study = optuna.load_study(study_name="polyadapt-tune-run", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    assert read_manifest(tmp_path / "run-tune" / "trial-001").status == "running"

    resumed = CliRunner().invoke(cli, ["tune", config, "--trials", "2"])
    assert resumed.exit_code == 0, resumed.output
    data = check_trials(tmp_path, expected_complete=2)
    numbers = [(t["number"], t["state"], t["retry_of"]) for t in data["trials"]]
    assert numbers == [(0, "complete", None), (1, "failed", None), (2, "complete", 1)]
    assert data["trials"][2]["params"] == data["trials"][1]["params"]  # the killed trial's values ran again
    assert "interrupted" in data["trials"][1]["error"]
    assert read_manifest(tmp_path / "run-tune" / "trial-001").status == "failed"
    assert (tmp_path / "run-tune" / "trial-000" / "polyadapt.json").read_bytes() == first
    assert "trial 0 complete" not in resumed.stderr and "trial 2 complete" in resumed.stderr

    again = tune(config, 2)  # nothing missing: nothing runs
    assert again.ran == [] and not (tmp_path / "run-tune" / "trial-003").exists()
    assert len(trials_json(tmp_path)["trials"]) == 3

    with pytest.raises(TuneError, match=r"holds a study of another config \(it differs in train.seed\)"):
        tune(config, 2, overrides=["train.seed=4"])


def test_failing_trials_are_recorded_and_all_failing_is_exit_2(toy_config, tmp_path):
    from polyadapt.cli import cli

    config = toy_config(toy={"explode_after_calls": 1})
    result = CliRunner().invoke(cli, ["tune", str(config), "--trials", "2", "--search", "lr"])
    assert result.exit_code == 2
    assert "error: every trial failed; the first error: trial 0: TrainingDivergedError: loss became nan" in (
        result.stderr
    )
    data = trials_json(tmp_path)
    assert [(t["number"], t["state"]) for t in data["trials"]] == [(0, "failed"), (1, "failed")]
    assert all(t["error"].startswith("TrainingDivergedError") for t in data["trials"])
    assert data["best"] is None and not (tmp_path / "run-tune" / "best.yaml").exists()
    assert "failed" in result.stdout.splitlines()[1]  # the table is printed all the same


@pytest.mark.parametrize(
    "search,expected",
    [
        ("lr,r,epochs", ("lr", "r", "epochs")),
        (" epochs , lr,lr", ("epochs", "lr")),
        ("lr,depth", "unknown name 'depth' (valid: lr, r, epochs)"),
        ("warmup,depth", "unknown names 'warmup', 'depth' (valid: lr, r, epochs)"),
        (",", "name at least one of lr, r, epochs"),
    ],
)
def test_parse_search(search, expected):
    if isinstance(expected, tuple):
        assert parse_search(search) == expected
    else:
        with pytest.raises(TuneError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            parse_search(search)


def test_unknown_search_name_is_one_line_and_exit_2(toy_config, tmp_path):
    result = run_cli("tune", str(toy_config()), "--trials", "2", "--search", "lr,depth")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --search: unknown name 'depth' (valid: lr, r, epochs)"
    assert not (tmp_path / "run-tune").exists()


def test_missing_optuna_names_the_extra(toy_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(TuneError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        tune(toy_config(), 1)
    assert not (tmp_path / "run-tune").exists()


def test_two_ray_tune_trials_on_a_local_ray_instance(toy_config, tmp_path, monkeypatch):
    """In this process, with the toy plugin on ``sys.path`` only: the workers find it through the import path tune
    hands them."""
    import ray

    from polyadapt.cli import cli

    monkeypatch.delenv("PYTHONPATH", raising=False)

    result = CliRunner().invoke(cli, ["tune", str(toy_config()), "--trials", "2", "--backend", "ray"])
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()  # the Ray instance tune started is shut down
    check_trials(tmp_path, expected_complete=2)
    assert (tmp_path / "run-tune" / "ray").is_dir()  # Ray Tune's own experiment files stay inside run-tune/
    lines = result.stdout.splitlines()  # the table only: Ray's output goes to stderr
    assert lines[0].split() == ["trial", "lr", "r", "epochs", "eval_loss", "state", "seconds"]
    assert sum(line.startswith("*") for line in lines) == 1
