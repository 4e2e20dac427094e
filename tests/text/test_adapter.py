"""The adapter as a standard PEFT directory, reload, the merged export and its parity gate, and inference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import polyadapt
from polyadapt.errors import ExportError
from tests.text.builders import chat_records, make_config, write_jsonl

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def finished_run(tiny_bases, tmp_path_factory) -> Path:
    """One finished LoRA run on the tiny LLaMA, shared by the tests of this module (read-only)."""
    root = tmp_path_factory.mktemp("adapter")
    write_jsonl(root / "data" / "train.jsonl", chat_records(16))
    write_jsonl(root / "data" / "validation.jsonl", chat_records(4, with_facts=True, offset=60))
    config = make_config(
        tiny_bases["llama"], root / "data", root / "run",
        train={"max_steps": 6, "lr": 0.05, "batch_size": 4, "precision": "fp32"},
        text={"max_length": 64, "max_new_tokens": 4},
    )  # fmt: skip
    return polyadapt.adapt(config)


PROBE = "What is the HarborFlex monthly fee?"


def probe_ids(tokenizer):
    return tokenizer(PROBE, return_tensors="pt")["input_ids"]


def test_adapter_is_a_plain_lora_directory(finished_run):
    config = json.loads((finished_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # what vLLM's LoRA loader refuses or ignores: extra trained modules, DoRA, biases
    assert not config.get("modules_to_save")
    assert not config.get("use_dora")
    assert config.get("bias", "none") == "none"
    from safetensors import safe_open

    with safe_open(str(finished_run / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_vanilla_peft_reproduces_polyadapt_logits_exactly(finished_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyadapt.lifecycle import load_run

    run = load_run(finished_run).run
    ids = probe_ids(run.tokenizer)
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(finished_run)).eval()
    plain_base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    with torch.no_grad():
        ours = run.model(input_ids=ids).logits
        theirs = vanilla(input_ids=ids).logits
        base = plain_base(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, base, atol=1e-3), "the adapter changed nothing"
    assert AutoTokenizer.from_pretrained(str(tiny_llama))(PROBE)["input_ids"] == ids[0].tolist()


def test_saved_adapter_reloads_to_identical_logits(tmp_path, tiny_llama, chat_data):
    from tests.text.builders import open_run

    config = make_config(tiny_llama, chat_data, tmp_path / "run")
    run = open_run(config)
    run.add_adapter()
    with torch.no_grad():
        for param in run.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    run.model.eval()
    ids = probe_ids(run.tokenizer)
    with torch.no_grad():
        before = run.model(input_ids=ids).logits
    run.save_adapter(tmp_path / "adapter")
    fresh = open_run(config)
    fresh.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        after = fresh.model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_merged_export_passes_the_parity_gate(finished_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyadapt.export import export_run

    record = export_run(finished_run, "merged", tmp_path / "merged")
    parity = record["parity"]
    assert parity["max_abs_logit_gap"] <= parity["tolerance"] == 1e-3
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    manifest = json.loads((finished_run / "polyadapt.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(manifest["base"]["path"])
    adapted = PeftModel.from_pretrained(base, str(finished_run)).eval()
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-3, rtol=0)
    assert not any(k for k in merged.state_dict() if "lora" in k)


def test_corrupted_merge_is_refused_with_the_measured_gap(finished_run, tmp_path, monkeypatch):
    from peft import LoraModel

    from polyadapt.export import export_run

    real_merge = LoraModel.merge_and_unload

    def corrupted(self, *args, **kwargs):
        merged = real_merge(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].self_attn.v_proj.weight.mul_(1.5)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted)
    with pytest.raises(ExportError, match=r"differ from base\+adapter by up to [0-9.e+-]+ \(tolerance"):
        export_run(finished_run, "merged", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_prefix_tuning_cannot_be_merged(tmp_path, tiny_llama, chat_data):
    from polyadapt.export import export_run

    config = make_config(
        tiny_llama, chat_data, tmp_path / "run", peft={"method": "prefix"},
        train={"max_steps": 1, "precision": "fp32"}, text={"generate_eval": False},
    )  # fmt: skip
    run = polyadapt.adapt(config)
    with pytest.raises(ExportError, match="cannot be merged"):
        export_run(run, "merged", tmp_path / "merged")


def test_infer_command_prints_an_answer(finished_run):
    done = subprocess.run(
        [sys.executable, "-m", "polyadapt", "infer", str(finished_run), "--prompt", PROBE, "--max-new-tokens", "5",
         "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_infer_is_deterministic_when_greedy(finished_run):
    from polyadapt.evaluation import evaluating
    from polyadapt.lifecycle import load_run

    run = load_run(finished_run).run
    options = {"prompt": PROBE, "system": None, "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    with evaluating(run):
        first = run.infer(options)
        assert first == run.infer(options)
        sampled = [run.infer({**options, "temperature": 1.5, "seed": s}) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]


def test_prefix_tuned_generation_uses_the_prefix(tiny_llama):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyadapt_text.inference import _decode_without_cache, generate

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    prompts = [tokenizer(PROBE)["input_ids"], tokenizer("Hi")["input_ids"]]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        reference = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        manual = _decode_without_cache(base, ids, torch.ones_like(ids), 6, None, 0, 0.0, 1.0)
    assert manual.tolist() == reference.tolist()

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
        PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 3)
    batched = generate(model, tokenizer, prompts, 6, batch_size=2)
    alone = [generate(model, tokenizer, [p], 6)[0] for p in prompts]
    assert batched == alone
    assert batched != generate(base, tokenizer, prompts, 6, batch_size=2)


def usage_code(run_dir: Path) -> str:
    """The python block of the run's model card (README.md), under "Loading it"."""
    card = (run_dir / "README.md").read_text()
    section = card.split("## Loading it", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_model_card_snippet_loads_the_adapter_with_vanilla_peft(finished_run):
    from polyadapt.lifecycle import load_run

    code = usage_code(finished_run)
    assert "AutoModelForCausalLM.from_pretrained" in code and "PeftModel.from_pretrained" in code
    assert "polyadapt" not in code.replace(str(finished_run.resolve()), "")
    namespace: dict = {}
    exec(code, namespace)
    run = load_run(finished_run).run
    ids = probe_ids(namespace["tokenizer"])
    with torch.no_grad():
        theirs = namespace["model"].eval()(input_ids=ids).logits
        ours = run.model(input_ids=ids).logits
    assert torch.equal(theirs, ours)


def perturbed_adapter(config, directory: Path, seed: int) -> Path:
    """A LoRA adapter with random weights (so that it visibly changes the answers), saved in ``directory``."""
    from tests.text.builders import open_run

    run = open_run(config)
    run.add_adapter()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in run.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    run.save_adapter(directory)
    return directory


@pytest.fixture(scope="module")
def two_adapters(tiny_bases, tmp_path_factory):
    """A run with two different LoRA adapters attached as "a" and "b" (eval batches of 3 rows)."""
    from tests.text.builders import open_run

    root = tmp_path_factory.mktemp("two")
    write_jsonl(root / "data" / "train.jsonl", chat_records(4))
    config = make_config(tiny_bases["llama"], root / "data", root / "run", eval={"batch_size": 3})
    run = open_run(config)
    run.load_adapter(perturbed_adapter(config, root / "a", seed=1), "a")
    run.load_adapter(perturbed_adapter(config, root / "b", seed=2), "b")
    return run


PROMPTS = [PROBE, "Hi", "What APY does TideSaver pay on savings?", "When are you open?"]


def test_mixed_adapter_batch_answers_each_row_as_its_adapter_alone(two_adapters):
    from polyadapt.evaluation import evaluating
    from polyadapt_text.inference import prompt_ids

    run = two_adapters
    assert run.adapter_names() == ["a", "b"]
    prompts = [prompt_ids(run.tokenizer, p, None) for p in PROMPTS]
    names = ["a", "b", None, "a"]
    with evaluating(run):
        mixed = run.generate(prompts, adapters=names, max_new_tokens=8)
        alone = {}
        for name in ("a", "b", None):
            run.set_adapter(name)
            alone[name] = run.generate(prompts, max_new_tokens=8)
        run.set_adapter("a")
    assert mixed == [alone[name][row] for row, name in enumerate(names)]
    # the adapters really answer differently, so the comparison above could fail
    assert alone["a"] != alone["b"] and alone["a"] != alone[None] and alone["b"] != alone[None]


def test_mixed_adapter_batch_gives_the_same_greedy_tokens_per_row(two_adapters):
    from polyadapt.evaluation import evaluating
    from polyadapt_text.inference import prompt_ids

    run = two_adapters
    prompts = [prompt_ids(run.tokenizer, p, None) for p in PROMPTS[:2]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[run.tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": run.tokenizer.pad_token_id}

    def greedy():
        return run.model.generate(input_ids=ids, attention_mask=mask, **options)[:, width:].tolist()

    with evaluating(run):
        with run.adapter_batch(["a", "b"]):
            mixed = greedy()
        run.set_adapter("a")
        only_a = greedy()
        run.set_adapter("b")
        only_b = greedy()
        run.set_adapter("a")
    assert mixed == [only_a[0], only_b[1]]
    assert only_a != only_b


def test_mixed_batches_refuse_adapters_peft_cannot_mix(tiny_llama, chat_data, tmp_path):
    from polyadapt.errors import ConfigError
    from polyadapt.evaluation import evaluating
    from tests.text.builders import open_run

    run = open_run(make_config(tiny_llama, chat_data, tmp_path / "run", peft={"method": "dora"}))
    run.add_adapter()
    prompts = [run.tokenizer("Hi")["input_ids"]]
    with evaluating(run), pytest.raises(ConfigError, match="only LoRA adapters"):
        run.generate(prompts, adapters=["default"], max_new_tokens=2)
    with evaluating(run), pytest.raises(ConfigError, match="one per prompt"):
        run.generate(prompts, adapters=["default", None], max_new_tokens=2)
