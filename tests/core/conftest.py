"""The core tests run against a toy modality installed the way a third-party plugin is: a dist-info with an entry point
on the import path (tests/core/plugins), next to a plugin whose dependency is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def toy_plugins(monkeypatch):
    from polyadapt.plugins import reset_plugin_manager

    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
    import importlib

    importlib.invalidate_caches()
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def toy(toy_plugins):
    import polyadapt_toy

    return polyadapt_toy


@pytest.fixture
def toy_config(tmp_path, toy):
    """Write a base, a dataset and a config; return a function making config files with overrides."""
    base = toy.write_base(tmp_path / "base")
    data = toy.write_data(tmp_path / "data")

    def make(name: str = "config.yaml", **sections) -> Path:
        config = {
            "modality": "toy",
            "base": str(base),
            "data": {"path": str(data)},
            "output": str(tmp_path / "run"),
            "peft": {"method": "lora", "r": 4, "alpha": 8},
            "train": {"max_steps": 12, "lr": 0.02, "batch_size": 8, "seed": 3, "log_every": 1},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return path

    return make


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (the way users do)."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "polyadapt", *args], capture_output=True, text=True, env=full_env, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"polyadapt {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def postgres_server_url():
    """A real PostgreSQL server for the session (Debian's binaries); skipped with the reason when they are missing,
    unless POLYADAPT_REQUIRE_POSTGRES is set (CI), where a missing server fails."""
    from tests.postgres import MISSING, postgres_server, server_binaries

    if server_binaries() is None:
        if os.environ.get("POLYADAPT_REQUIRE_POSTGRES"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    with postgres_server() as url:
        yield url
