"""End to end on a tiny Whisper: adapt, reload, vanilla PEFT load, infer, merged and ct2 export."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import polyadapt
from polyadapt_speech.data import SAMPLE_RATE

from .conftest import write_config, write_dataset


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_whisper):
    root = tmp_path_factory.mktemp("speech-run")
    data = write_dataset(root / "data", train=6, test=3)
    general = write_dataset(root / "general", train=0, test=2, glossary=False)
    config = write_config(
        root / "config.yaml",
        tiny_whisper,
        data,
        root / "run",
        train={"max_steps": 15},
        eval={"general_data": str(general)},
    )
    return polyadapt.adapt(config)


def _logits(model, run):
    from polyadapt_speech.export import parity_inputs

    with torch.no_grad():
        return model(**parity_inputs(run, torch.device("cpu"))).logits


def test_loss_falls_and_metrics_are_reported(finished_run):
    manifest = json.loads((finished_run / "polyadapt.json").read_text())
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert after["eval_loss"] < before["eval_loss"]
    for key in ("wer", "cer", "term_recall"):
        assert key in before and key in after
    # the forgetting check: the same metrics on eval.general_data, before and after
    assert "wer" in manifest["metrics"]["general_before"] and "wer" in manifest["metrics"]["general_after"]
    losses = [
        json.loads(line)["loss"]
        for line in (finished_run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (finished_run / "adapter_config.json").is_file() and (finished_run / "adapter_model.safetensors").is_file()
    assert manifest["data"]["heldout"] == {"source": "test"}
    assert manifest["data"]["prepared"]["validation"]["clips"] == 3
    report = (finished_run / "report.html").read_text()
    assert "Transcripts" in report and "<th>adapted</th>" in report


def test_reload_matches_vanilla_peft_and_differs_from_base(finished_run, tiny_whisper):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    from polyadapt.lifecycle import load_run

    run = load_run(finished_run).run
    ours = _logits(run.model, run)
    again = _logits(load_run(finished_run).run.model, run)
    assert torch.equal(ours, again)
    base = WhisperForConditionalGeneration.from_pretrained(str(tiny_whisper)).eval()
    base_logits = _logits(base, run)
    vanilla = PeftModel.from_pretrained(base, str(finished_run)).eval()
    assert torch.allclose(_logits(vanilla, run), ours, atol=1e-5)
    assert not torch.allclose(base_logits, ours, atol=1e-3)


def test_the_model_cards_snippet_loads_the_adapter_with_vanilla_peft(finished_run, monkeypatch):
    """The python block of the run's README.md runs as written: WhisperForConditionalGeneration, then
    PeftModel.from_pretrained, then a transcription of one clip."""
    import re

    import soundfile as sf
    from peft import PeftModel

    from polyadapt.lifecycle import load_run

    card = (finished_run / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "WhisperForConditionalGeneration.from_pretrained" in code and "PeftModel.from_pretrained" in code
    clip = sorted((finished_run.parent / "data" / "test").glob("*.wav"))[0]
    scope = {"audio": sf.read(clip, dtype="float32")[0]}
    exec(compile(code, "README.md", "exec"), scope)
    assert isinstance(scope["model"], PeftModel) and isinstance(scope["ids"], torch.Tensor)
    run = load_run(finished_run).run
    assert torch.allclose(_logits(scope["model"], run), _logits(run.model, run), atol=1e-5)


def test_evaluate_reproduces_the_after_metrics(finished_run):
    manifest = json.loads((finished_run / "polyadapt.json").read_text())
    polyadapt.evaluate(finished_run)
    record = json.loads((finished_run / "polyadapt.json").read_text())["evaluations"][-1]
    for key in ("eval_loss", "wer", "cer"):
        assert record["after"][key] == pytest.approx(manifest["metrics"]["after"][key], abs=1e-6)
        assert record["before"][key] == pytest.approx(manifest["metrics"]["before"][key], abs=1e-6)


def test_infer_prints_one_line_per_file(finished_run):
    from polyadapt.cli import cli

    clips = sorted((finished_run.parent / "data" / "test").glob("*.wav"))[:2]
    result = CliRunner().invoke(cli, ["infer", str(finished_run), *map(str, clips)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == [str(c) for c in clips]


def test_infer_names_an_unreadable_file(finished_run, tmp_path):
    from polyadapt.cli import cli

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF1234WAVEnot really")
    result = CliRunner().invoke(cli, ["infer", str(finished_run), str(bad)])
    assert result.exit_code == 2
    assert "bad.wav" in result.output and "unreadable or corrupt audio" in result.output


def test_merged_export_runs_in_the_asr_pipeline(finished_run, tmp_path):
    from transformers import pipeline

    from polyadapt.export import export_run

    record = export_run(finished_run, "merged", tmp_path / "merged")
    assert record["parity"]["max_abs_logit_gap"] <= record["parity"]["tolerance"]
    clip = sorted((finished_run.parent / "data" / "test").glob("*.wav"))[0]
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "merged"), device="cpu")
    import soundfile as sf

    audio, rate = sf.read(clip, dtype="float32")
    out = asr({"raw": audio, "sampling_rate": rate}, generate_kwargs={"max_new_tokens": 5})
    assert isinstance(out["text"], str)


def test_ct2_export_reads_back_as_the_merged_weights(finished_run, tmp_path):
    pytest.importorskip("ctranslate2")
    from polyadapt.export import export_run
    from polyadapt_speech.model import load_whisper

    export_run(finished_run, "merged", tmp_path / "merged")
    record = export_run(finished_run, "ct2", tmp_path / "ct2")
    assert "model.bin" in record["files"] and "tokenizer.json" in record["files"]
    merged, _, _ = load_whisper(tmp_path / "merged")
    imported, _, info = load_whisper(tmp_path / "ct2")
    assert info["format"] == "ctranslate2"
    want, got = merged.state_dict(), imported.state_dict()
    assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-6


def test_infer_stitches_audio_longer_than_30_seconds(finished_run, tmp_path):
    import numpy as np
    import soundfile as sf

    from polyadapt.cli import cli

    clips = [sf.read(c, dtype="float32")[0] for c in sorted((finished_run.parent / "data" / "train").glob("*.wav"))]
    gap = np.zeros(8000, dtype=np.float32)
    long = np.concatenate([part for clip in clips * 2 for part in (clip, gap)])
    assert len(long) > 30 * SAMPLE_RATE
    sf.write(tmp_path / "long.wav", long, SAMPLE_RATE)
    result = CliRunner().invoke(cli, ["infer", str(finished_run), str(tmp_path / "long.wav")])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines() if "\t" in line] == [str(tmp_path / "long.wav")]
