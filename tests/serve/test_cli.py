"""``polyadapt serve``: a config it cannot serve exits 2 listing every problem, before any model loads; a real
server process starts, answers and stops."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from polyadapt.cli import cli
from tests.serve.conftest import serve_process

pytestmark = pytest.mark.timeout(300)


def test_a_config_it_cannot_serve_exits_2_with_every_problem(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "bases": {"b": {"modality": "text", "base": "x", "colour": 1}},
        "adapters": {"a": {"base": "nope", "from": str(tmp_path / "missing")}},
        "tenants": {"t": {"key_env": "NO_SUCH_KEY_VARIABLE", "models": ["a", "ghost"]}},
        "limits": {"max_batch": 0},
    }))  # fmt: skip
    result = CliRunner().invoke(cli, ["serve", str(path)])
    assert result.exit_code == 2
    for line in ("5 problems", "limits.max_batch", "bases.b.colour", "adapters.a.base", "adapters.a.from",
                 "tenants.t.models: 'ghost'"):  # fmt: skip
        assert line in result.output, result.output
    path.write_text(yaml.safe_dump({"bases": {"b": {"modality": "text", "base": "x"}},
                                    "tenants": {"t": {"key_env": "NO_SUCH_KEY_VARIABLE", "models": ["b"]}}}))  # fmt: skip
    result = CliRunner().invoke(cli, ["serve", str(path)])
    assert result.exit_code == 2 and "$NO_SUCH_KEY_VARIABLE is not set" in result.output


def test_polyadapt_serve_runs_a_real_server_that_answers_and_stops(tiny_world, tmp_path):
    from polyadapt.serve.server import free_port

    openai = pytest.importorskip("openai")
    config = {
        "bases": {"tiny": {"modality": "text", "base": str(tiny_world["bases"]["tiny"])}},
        "adapters": {"a0": {"base": "tiny", "from": str(tiny_world["runs"]["a0"])}},
        "tenants": {"t": {"key_env": "CLI_TEST_KEY", "models": ["a0"]}},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "serve.log"
    with serve_process([str(path), "--port", str(port), "--log-level", "warning"], log,
                       env={"CLI_TEST_KEY": "cli-key"}) as process:  # fmt: skip
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.role == "assistant"
    assert process.returncode == 0, log.read_text()
