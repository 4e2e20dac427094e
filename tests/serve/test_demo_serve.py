"""The end of ``make demo`` (examples/demo.py ``serve_demo``): the runs served by ``polyadapt serve`` in a subprocess,
one request per modality with the official ``openai`` client, and the server stopped afterwards."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import copy_clip

pytestmark = pytest.mark.timeout(480)
ROOT = Path(__file__).resolve().parents[2]


def _demo():
    spec = importlib.util.spec_from_file_location("polyadapt_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_demo_serves_its_runs_answers_once_per_modality_and_stops_the_server(tiny_world, tmp_path):
    demo = _demo()
    runs = tiny_world["runs"]
    result = demo.serve_demo(
        [runs["a0"], runs["calls"], runs["brand"]], tmp_path, clip=copy_clip(tmp_path), max_tokens=4,
        startup_timeout=240, request_timeout=120, env={"OMP_NUM_THREADS": "1"}, echo=False,
    )  # fmt: skip
    answers = result.answers
    assert {a["modality"] for a in answers.values()} == {"text", "speech", "image"}, answers
    for name in (runs["a0"].name, runs["calls"].name, runs["brand"].name):
        assert answers[name]["adapter"].startswith(f"{name}@run:"), answers[name]
        assert answers[name]["answer"], answers[name]
    assert (tmp_path / f"demo-serve-{runs['brand'].name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the server is gone: it exited (and was reaped), its pid no longer exists
    assert result.process.poll() == 0, result.log.read_text()[-4000:]  # stopped cleanly by the interrupt
    with pytest.raises(ProcessLookupError):
        os.kill(result.process.pid, 0)
    assert os.environ.get(demo.KEY_ENV) is None  # the key lived only in the server's environment
