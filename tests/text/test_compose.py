"""Composing two real text runs: ``cat`` with weights (1, 1) is the base with both updates merged, by PEFT itself."""

from __future__ import annotations

import pytest

import polyadapt
from polyadapt.compose import compose
from tests.text.builders import chat_records, make_config, write_jsonl

torch = pytest.importorskip("torch")


def test_cat_gives_the_logits_of_the_base_with_both_adapters_merged(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runs = []
    for i in range(2):
        write_jsonl(tmp_path / f"data-{i}" / "train.jsonl", chat_records(8, offset=20 * i))
        write_jsonl(tmp_path / f"data-{i}" / "validation.jsonl", chat_records(2, offset=50 + i))
        config = make_config(
            tiny_llama, tmp_path / f"data-{i}", tmp_path / f"run-{i}",
            train={"max_steps": 4, "lr": 0.05, "seed": i}, eval={"before": False, "general_data": None},
        )  # fmt: skip
        runs.append(polyadapt.adapt(config))
    out = tmp_path / "composed"
    assert compose([str(r) for r in runs], out, evaluate=False)["rank"] == 8
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 40]])
    base = lambda: AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()  # noqa: E731
    merged = PeftModel.from_pretrained(base(), str(runs[0])).merge_and_unload()
    merged = PeftModel.from_pretrained(merged, str(runs[1])).merge_and_unload().eval()
    composed = PeftModel.from_pretrained(base(), str(out)).eval()
    with torch.no_grad():
        expected, got = merged(input_ids=ids).logits, composed(input_ids=ids).logits
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, base()(input_ids=ids).logits, atol=1e-3)
