"""``export --format vllm``: the files vLLM's LoRA loader expects, the serve command, and what it refuses."""

from __future__ import annotations

import json
import shlex

import pytest

import polyadapt
from polyadapt.errors import ExportError
from polyadapt.export import export_run
from tests.text.builders import chat_records, make_config, write_jsonl


def finished(tiny_llama, tmp_path, name: str, **peft):
    data = tmp_path / "data"
    if not data.exists():
        write_jsonl(data / "train.jsonl", chat_records(8))
        write_jsonl(data / "validation.jsonl", chat_records(2, offset=40))
    config = make_config(
        tiny_llama, data, tmp_path / name, peft={"method": "lora", "r": 4, "alpha": 8, **peft},
        train={"max_steps": 2}, eval={"before": False, "general_data": None},
    )  # fmt: skip
    return polyadapt.adapt(config)


def test_the_adapter_and_the_serve_command_are_what_vllm_loads(tiny_llama, tmp_path):
    from safetensors import safe_open

    run = finished(tiny_llama, tmp_path, "bank-voice")
    record = export_run(run, "vllm", tmp_path / "vllm")
    adapter = tmp_path / "vllm" / "bank-voice"
    assert record["adapters"] == {"bank-voice": "bank-voice"} and record["max_lora_rank"] == 8
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert not config.get("use_dora") and config.get("bias", "none") == "none" and not config.get("modules_to_save")
    assert set(config["target_modules"]) >= {"q_proj", "v_proj"}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(
        k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
    )
    assert (adapter / "adapter_model.safetensors").read_bytes() == (run / "adapter_model.safetensors").read_bytes()
    command = (tmp_path / "vllm" / "serve.sh").read_text().splitlines()[-1]
    words = shlex.split(command.replace('$(dirname "$0")', "DIR"))
    assert words[:3] == ["vllm", "serve", str(tiny_llama)]
    assert "--enable-lora" in words and words[words.index("--max-lora-rank") + 1] == "8"
    assert words[words.index("--lora-modules") + 1] == "bank-voice=DIR/bank-voice"


def test_a_dora_adapter_is_refused_and_nothing_is_written(tiny_llama, tmp_path):
    run = finished(tiny_llama, tmp_path, "dora", method="dora")
    with pytest.raises(ExportError, match="use_dora is true \\(vLLM has no DoRA\\)"):
        export_run(run, "vllm", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_a_registry_version_is_named_after_its_name_and_version(tmp_path):
    from polyadapt_text.export import vllm_adapter_name

    assert vllm_adapter_name(tmp_path / "registry" / "support" / "v3-0123456789abcdef") == "support-v3"
    assert vllm_adapter_name(tmp_path / "runs" / "bank voice") == "bank-voice"
