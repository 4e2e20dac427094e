"""Whisper loading: the CTranslate2 reader inverts CTranslate2's converter, adapter targets, log-mel features."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from polyadapt.errors import ConfigError
from polyadapt_speech.data import SAMPLE_RATE

from .conftest import SAMPLES, sample_rows

# quantization -> largest allowed weight difference after the round trip (int8 keeps 127 levels per row)
CT2_CASES = [("float32", 0.0), ("float16", 2e-3), ("int8", 2e-2), ("int8_float16", 2e-2), ("bfloat16", 1e-2)]


@pytest.mark.parametrize(("quantization", "tolerance"), CT2_CASES, ids=[c[0] for c in CT2_CASES])
def test_ct2_round_trip_gives_back_the_weights(tmp_path, tiny_whisper, quantization, tolerance):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    from polyadapt_speech.ct2 import is_ct2_directory
    from polyadapt_speech.model import load_whisper

    out = tmp_path / "ct2"
    TransformersConverter(str(tiny_whisper), copy_files=["tokenizer.json"]).convert(str(out), quantization=quantization)
    assert is_ct2_directory(out) and not is_ct2_directory(tiny_whisper)
    original, _, _ = load_whisper(tiny_whisper)
    imported, processor, info = load_whisper(out)
    assert info["format"] == "ctranslate2"
    want, got = original.state_dict(), imported.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32
        gap = (got[name] - tensor).abs().max().item()
        assert gap <= tolerance * max(1.0, tensor.abs().max().item()), (name, gap)
    assert imported.config.encoder_layers == 2 and imported.config.d_model == 64
    assert imported.generation_config.no_timestamps_token_id == processor.tokenizer.convert_tokens_to_ids(
        "<|notimestamps|>"
    )
    del ctranslate2


def test_ct2_transcripts_match_ctranslate2_on_the_tiny_model(tmp_path, tiny_whisper):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    from polyadapt_speech.features import log_mel
    from polyadapt_speech.inference import generate_ids
    from polyadapt_speech.model import load_whisper, whisper_tokens

    out = tmp_path / "ct2"
    TransformersConverter(str(tiny_whisper), copy_files=["tokenizer.json"]).convert(str(out))
    model, processor, _ = load_whisper(out)
    tokens = whisper_tokens(processor.tokenizer, model.config.vocab_size)
    clips = [sf.read(SAMPLES / "test" / r["file_name"], dtype="float32")[0] for r in sample_rows("test")[:2]]
    prefix = tokens.prefix(None, "transcribe")
    ours = generate_ids(
        model, clips, device=torch.device("cpu"), prefix=prefix, prompt=[], num_beams=1, max_new_tokens=12
    ).tolist()
    reference = ctranslate2.models.Whisper(str(out), device="cpu", compute_type="float32")
    width = max(len(c) for c in clips)
    batch = torch.stack([torch.nn.functional.pad(torch.from_numpy(c), (0, width - len(c))) for c in clips])
    features = ctranslate2.StorageView.from_array(log_mel(batch).numpy())
    results = reference.generate(features, [prefix] * len(clips), beam_size=1, max_length=8)
    theirs = [r.sequences_ids[0] for r in results]
    # CTranslate2 counts max_length differently and leaves out the end token: compare what both produced
    assert all(len(t) >= 3 for t in theirs)
    assert [o[: len(t)] for o, t in zip(ours, theirs, strict=True)] == theirs


def test_reader_refuses_a_truncated_model_bin(tmp_path, tiny_whisper):
    pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    from polyadapt_speech.model import load_whisper

    out = tmp_path / "ct2"
    TransformersConverter(str(tiny_whisper), copy_files=["tokenizer.json"]).convert(str(out))
    data = (out / "model.bin").read_bytes()
    (out / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated CTranslate2 model"):
        load_whisper(out)


def test_a_directory_that_is_no_model_is_refused(tmp_path):
    from polyadapt_speech.model import load_whisper

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="neither a transformers model directory nor a CTranslate2"):
        load_whisper(tmp_path)


@pytest.mark.parametrize("layout", ["transformers", "ctranslate2"])
def test_the_vocabulary_is_read_from_the_files_without_the_weights(tmp_path, tiny_whisper, layout, monkeypatch):
    from polyadapt.config import ResolvedBase
    from polyadapt_speech import ct2, model
    from polyadapt_speech.model import load_whisper, read_vocabulary, whisper_tokens

    directory = tiny_whisper
    if layout == "ctranslate2":
        pytest.importorskip("ctranslate2")
        from ctranslate2.converters import TransformersConverter

        directory = tmp_path / "ct2"
        TransformersConverter(str(tiny_whisper), copy_files=["tokenizer.json"]).convert(str(directory))
    loaded, processor, _ = load_whisper(directory)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(ct2, "read_model_bin", no_weights)
    monkeypatch.setattr(model, "read_model_bin", no_weights)
    vocabulary = read_vocabulary(ResolvedBase(reference=str(directory), path=directory))
    assert vocabulary is not None
    assert vocabulary.max_target_positions == loaded.config.max_target_positions == 96
    assert vocabulary.tokens == whisper_tokens(processor.tokenizer, loaded.config.vocab_size)
    assert vocabulary.tokenizer.encode(" Fine.") == processor.tokenizer.encode(" Fine.")


def test_no_vocabulary_without_local_files(tmp_path):
    from polyadapt.config import ResolvedBase
    from polyadapt_speech.model import read_vocabulary

    assert read_vocabulary(None) is None
    assert read_vocabulary(ResolvedBase(reference="nobody/no-such-whisper", hub_id="nobody/no-such-whisper")) is None
    (tmp_path / "config.json").write_text("{}")
    assert read_vocabulary(ResolvedBase(reference=str(tmp_path), path=tmp_path)) is None


TARGET_CASES = [
    ("both", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, None),
    ("decoder", None, "model.decoder.layers."),
    ("encoder", None, "model.encoder.layers."),
]


@pytest.mark.parametrize(("scope", "leaves", "prefix"), TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
def test_target_modules_cover_attention_and_mlp(tiny_whisper, scope, leaves, prefix):
    from polyadapt_speech.model import load_whisper, target_modules

    model, _, _ = load_whisper(tiny_whisper)
    found = target_modules(model, scope)
    if leaves is not None:
        assert set(found) == leaves
    else:
        # 2 layers x (self q,k,v,out + fc1, fc2) for the encoder; the decoder adds cross-attention q,k,v,out
        assert all(name.startswith(prefix) for name in found)
        assert len(found) == (2 * 10 if scope == "decoder" else 2 * 6)
    assert "proj_out" not in found


def test_log_mel_matches_whisper_feature_extractor(tmp_path):
    from transformers import WhisperFeatureExtractor

    from polyadapt_speech.features import log_mel

    clips = [sf.read(SAMPLES / "train" / r["file_name"], dtype="float32")[0] for r in sample_rows("train")[:3]]
    clips.append(np.random.default_rng(0).normal(0, 0.1, SAMPLE_RATE * 31).astype(np.float32))  # trimmed to 30 s
    reference = WhisperFeatureExtractor(feature_size=80)(
        clips, sampling_rate=SAMPLE_RATE, return_tensors="np"
    ).input_features
    width = max(len(c) for c in clips)
    batch = torch.stack([torch.nn.functional.pad(torch.from_numpy(c), (0, width - len(c))) for c in clips])
    ours = log_mel(batch, 80).numpy()
    assert ours.shape == reference.shape == (4, 80, 3000)
    assert np.abs(ours - reference).max() < 1e-4


def test_spec_augment_and_speed_perturbation_change_the_input():
    from polyadapt_speech.features import log_mel, spec_augment, speed_perturb

    audio = torch.from_numpy(sf.read(SAMPLES / "train" / sample_rows("train")[0]["file_name"], dtype="float32")[0])
    features = log_mel(audio.unsqueeze(0).repeat(2, 1))
    torch.manual_seed(0)
    masked = spec_augment(features, freq_mask_bins := 20, 80, 2)
    assert masked.shape == features.shape
    changed = (masked != features).float().mean().item()
    assert 0.0 < changed < 0.7
    assert not torch.equal(masked[0] != features[0], masked[1] != features[1])  # each clip masked differently
    assert freq_mask_bins == 20
    faster = speed_perturb(audio, 1.1)
    assert abs(len(faster) - len(audio) / 1.1) < 20
    assert torch.equal(speed_perturb(audio, 1.0), audio)


def test_long_audio_is_cut_at_quiet_points_within_30_seconds():
    from polyadapt_speech.inference import split_long

    rate = SAMPLE_RATE
    t = np.arange(rate * 70) / rate
    audio = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    audio[int(27.0 * rate) : int(27.4 * rate)] = 0.0  # a pause inside the search window
    pieces = split_long(audio)
    assert len(pieces) == 3
    assert all(len(p) <= 30 * rate for p in pieces)
    assert sum(len(p) for p in pieces) == len(audio)
    assert 27.0 * rate <= len(pieces[0]) <= 27.4 * rate
    assert len(split_long(audio[: 10 * rate])) == 1


def test_copy_of_sample_clips_is_untouched(tmp_path):
    # the fixtures copy committed clips; the copies must be byte-identical so tests exercise the real data
    row = sample_rows("test")[0]
    shutil.copy(SAMPLES / "test" / row["file_name"], tmp_path / "x.wav")
    assert (tmp_path / "x.wav").read_bytes() == (SAMPLES / "test" / row["file_name"]).read_bytes()


def test_plugin_import_stays_light():
    """Loading the plugin (every polyadapt command does) imports no model or array library."""
    import subprocess
    import sys

    code = (
        "import sys, polyadapt_speech.plugin\n"
        "from polyadapt_speech.modality import SpeechModality\n"
        "SpeechModality().infer_params()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'numpy', 'torchaudio') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
