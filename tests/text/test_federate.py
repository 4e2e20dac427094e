"""``polyadapt federate`` end to end on tiny text models: two sites, two rounds, through the CLI, into a run directory
that ``open_run`` verifies, whose adapter peft loads and whose per-site metrics include fact accuracy. GPT-2's Conv1D
layers (weights stored transposed) go through ``stack``'s merging of earlier rounds into the base."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

import polyadapt.cli
from tests.text.builders import chat_records, write_jsonl

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("kind", "method"), [("llama", "ffa"), ("gpt2", "stack")])
def test_two_sites_two_rounds_through_the_cli(tiny_bases, tmp_path, kind, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from polyadapt.lifecycle import open_run
    from polyadapt.lora import read_adapter

    sites = []
    for i in range(2):
        site = tmp_path / f"branch-{i}"
        write_jsonl(site / "train.jsonl", chat_records(8 + 4 * i, offset=3 * i))
        write_jsonl(site / "validation.jsonl", chat_records(3, with_facts=True, offset=100 + 3 * i))
        sites.append(site)
    config = tmp_path / "fed.yaml"
    config.write_text(yaml.safe_dump({
        "modality": "text", "base": str(tiny_bases[kind]), "data": str(sites[0]), "output": str(tmp_path / "run"),
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 3, "lr": 0.02, "batch_size": 4, "precision": "fp32"},
        "eval": {"general_data": None}, "text": {"max_length": 64, "max_new_tokens": 8},
    }))  # fmt: skip
    result = CliRunner().invoke(
        polyadapt.cli.cli,
        ["federate", str(config), "--sites", ",".join(map(str, sites)), "--rounds", "2", "--aggregate", method],
    )
    assert result.exit_code == 0, result.output
    run_dir, manifest, _ = open_run(tmp_path / "run")
    federation = manifest.federation
    assert [r["round"] for r in federation["history"]] == [1, 2]
    assert max(r["relative_error_vs_exact_mean"] for r in federation["history"]) < 1e-5
    for site in federation["sites"]:
        assert "fact_accuracy" in site["metrics_after"] and "fact_accuracy" in site["metrics_before"]
    assert manifest.metrics.after["eval_loss"] < manifest.metrics.before["eval_loss"]
    assert read_adapter(run_dir).ranks == {4}
    # the saved adapter is the one that was evaluated
    from polyadapt.lifecycle import evaluate

    report = evaluate(run_dir, data=sites[0])
    loss = {row["metric"]: row["after"] for row in report["metrics"]}["eval_loss"]
    assert loss == pytest.approx(federation["sites"][0]["metrics_after"]["eval_loss"], rel=1e-4)
    # peft loads the run directory as it is, and the adapter changes the base's output
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_bases[kind])).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(run_dir)).eval()(input_ids=ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)
    assert json.loads((run_dir / "report.json").read_text())["metrics"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merging_earlier_rounds_into_the_base_equals_running_them_as_an_adapter(tiny_bases, tmp_path, kind):
    """``stack`` trains each round on the base with the earlier rounds merged in; merged or attached, the model
    computes the same (GPT-2 stores its weights transposed)."""
    from polyadapt.federated.model import BaseOffset, fresh_layers, lora_modules, read_layers, write_layers
    from polyadapt.lora import LoraLayer
    from tests.text.builders import make_config, open_run

    write_jsonl(tmp_path / "data" / "train.jsonl", chat_records(4))
    run = open_run(make_config(tiny_bases[kind], tmp_path / "data", tmp_path / "run"))
    run.add_adapter()
    modules = lora_modules(run.model)
    initial = read_layers(modules)
    generator = torch.Generator().manual_seed(0)
    merged = {k: LoraLayer(v.A, 0.1 * torch.randn(v.B.shape, generator=generator), 1.0) for k, v in initial.items()}
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    run.model.eval()
    with torch.no_grad():
        write_layers(modules, {k: LoraLayer(v.A, v.B / initial[k].scale, initial[k].scale) for k, v in merged.items()})
        attached = run.model(input_ids=ids).logits
        write_layers(modules, fresh_layers(initial, 1))  # B = 0: the adapter adds nothing
        offset = BaseOffset(modules)
        offset.set(merged)
        in_base = run.model(input_ids=ids).logits
        offset.clear()
        plain = run.model(input_ids=ids).logits
    assert torch.allclose(attached, in_base, atol=1e-5)
    assert not torch.allclose(plain, in_base, atol=1e-3)
