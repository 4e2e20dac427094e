"""The text modality's declarations, and the configs it refuses at validation, before any model loads."""

from __future__ import annotations

import pytest
import yaml

import polyadapt
from polyadapt.config import validate_config
from polyadapt.errors import ConfigError
from polyadapt.modality import PROTOCOLS, capability_problems


def test_declarations_match_what_the_run_implements(modality):
    from polyadapt_text.modality import TextRun

    assert modality.name == "text" and modality.run_class is TextRun
    assert modality.peft_methods == ("lora", "dora", "ia3", "prefix")
    assert modality.capabilities == {"inference", "report", "multi_adapter", "batched_adapters"}
    assert capability_problems(modality) == []
    for capability in modality.capabilities:
        assert issubclass(TextRun, PROTOCOLS[capability])
    assert TextRun.peft_task_type == "CAUSAL_LM"
    assert set(modality.metrics) == {
        "perplexity", "exact_match", "token_f1", "fact_accuracy",
        # preference objectives (text.objective: dpo | ipo | orpo | simpo)
        "preference_accuracy", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "compliance",
    }  # fmt: skip


def raw_config(base, data, **sections):
    raw = {"modality": "text", "base": str(base), "data": {"path": str(data)}, "output": str(data.parent / "run")}
    raw.update(sections)
    return raw


REFUSED = [
    (
        {"peft": {"method": "prefix"}, "text": {"packing": True}},
        "text.packing: not supported with peft.method 'prefix'",
    ),
    ({"peft": {"method": "loha"}}, "peft.method"),
    ({"train": {"early_stopping_metric": "bleu", "eval_every": 5}}, "train.early_stopping_metric: 'bleu'"),
]


@pytest.mark.parametrize(("sections", "message"), REFUSED, ids=["packing+prefix", "unknown method", "metric"])
def test_configs_the_modality_cannot_run_are_refused_at_validation(tiny_llama, chat_data, sections, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(raw_config(tiny_llama, chat_data, **sections))


def test_methods_outside_peft_methods_are_refused_naming_the_supported_ones(tiny_llama, chat_data, monkeypatch):
    from polyadapt_text.modality import TextModality

    # a method the core's schema knows but this modality would not train
    monkeypatch.setattr(TextModality, "peft_methods", ("lora", "dora", "ia3"))
    with pytest.raises(ConfigError, match=r"peft.method: 'prefix' is not supported by the text modality") as caught:
        validate_config(raw_config(tiny_llama, chat_data, peft={"method": "prefix"}))
    assert "supported: lora, dora, ia3" in str(caught.value)


def test_refused_config_never_loads_the_base(tiny_llama, chat_data, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("polyadapt_text.model.load_causal_lm", no_loading)
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(raw_config(tiny_llama, chat_data, peft={"method": "prefix"}, text={"packing": True}))
    )
    with pytest.raises(ConfigError, match="text.packing"):
        polyadapt.adapt(path)
    assert not (chat_data.parent / "run").exists()


def test_packing_with_other_methods_and_prefix_without_packing_validate(tiny_llama, chat_data):
    validate_config(raw_config(tiny_llama, chat_data, peft={"method": "lora"}, text={"packing": True}))
    validate_config(raw_config(tiny_llama, chat_data, peft={"method": "prefix"}))


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "AutoModelForCausalLM.from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct'",
        ),
        ("/models/tiny.Q8_0.gguf", "gguf = Path('/models/tiny.Q8_0.gguf')"),
    ],
    ids=["hub id", "gguf file"],
)
def test_usage_loads_with_transformers_and_peft_alone(modality, tmp_path, base, expected):
    usage = modality.usage(tmp_path / "run", base)
    assert expected in usage
    assert "from peft import PeftModel" in usage
    assert f"PeftModel.from_pretrained(base, {str((tmp_path / 'run').resolve())!r})" in usage
    assert "import polyadapt" not in usage


def test_library_warnings_a_user_cannot_act_on_are_not_shown(modality, tiny_llama, chat_data, tmp_path):
    import warnings

    from .builders import make_config, make_ctx

    config = make_config(tiny_llama, chat_data, train={"grad_checkpointing": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = modality.open(make_ctx(config))
        run.load_base()
        run.add_adapter()
        run.save_adapter(tmp_path / "adapter")
        again = modality.open(make_ctx(config))
        again.load_base()
        again.load_adapter(tmp_path / "adapter")
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if "is_gradient_checkpointing" in m or "config file" in m], shown
