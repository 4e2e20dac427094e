"""Composing two real speech runs: ``cat`` with weights (1, 1) is Whisper with both updates merged, by PEFT itself."""

from __future__ import annotations

import torch

import polyadapt
from polyadapt.compose import compose

from .conftest import write_config, write_dataset


def test_cat_gives_the_logits_of_whisper_with_both_adapters_merged(tiny_whisper, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    data = write_dataset(tmp_path / "data", train=3, test=2)
    runs = []
    for i in range(2):
        path = write_config(
            tmp_path / f"run-{i}.yaml", tiny_whisper, data, tmp_path / f"run-{i}",
            train={"max_steps": 3, "seed": i, "lr": 0.02}, eval={"before": False, "general_data": None},
        )  # fmt: skip
        runs.append(polyadapt.adapt(path))
    out = tmp_path / "composed"
    compose([str(r) for r in runs], out, evaluate=False)
    base = lambda: WhisperForConditionalGeneration.from_pretrained(str(tiny_whisper)).eval()  # noqa: E731
    merged = PeftModel.from_pretrained(base(), str(runs[0])).merge_and_unload()
    merged = PeftModel.from_pretrained(merged, str(runs[1])).merge_and_unload().eval()
    composed = PeftModel.from_pretrained(base(), str(out)).eval()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, base().config.num_mel_bins, 3000, generator=generator)
    decoder = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    with torch.no_grad():
        expected = merged(input_features=features, decoder_input_ids=decoder).logits
        got = composed(input_features=features, decoder_input_ids=decoder).logits
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, base()(input_features=features, decoder_input_ids=decoder).logits, atol=1e-4)
