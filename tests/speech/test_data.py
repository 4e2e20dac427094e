"""Reading audiofolder datasets: good audio in any format is accepted, every bad sample is named with its reason."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from polyadapt.errors import DataError
from polyadapt_speech.data import SAMPLE_RATE

from .conftest import SAMPLES, sample_rows, write_config, write_dataset

RATE = SAMPLE_RATE


def _tone(seconds: float, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _broken(kind: str, folder):
    """Write one bad audio file of ``kind`` into ``folder``; return its file name."""
    good = SAMPLES / "train" / sample_rows("train")[0]["file_name"]
    if kind == "truncated header":
        (folder / "clip.wav").write_bytes(good.read_bytes()[:20])
    elif kind == "random bytes":
        (folder / "clip.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "zero samples":
        sf.write(folder / "clip.wav", np.zeros(0, dtype=np.float32), RATE)
    elif kind == "silence":
        sf.write(folder / "clip.wav", np.zeros(RATE, dtype=np.float32), RATE)
    elif kind == "too short":
        sf.write(folder / "clip.wav", _tone(0.05), RATE)
    elif kind == "three minutes":
        sf.write(folder / "clip.wav", _tone(180.0, rate=8000), 8000)
    elif kind == "missing file":
        return "nowhere.wav"
    elif kind == "escapes root":
        return "../../outside.wav"
    return "clip.wav"


BAD_CASES = [
    ("truncated header", "unreadable or corrupt audio"),
    ("random bytes", "unreadable or corrupt audio"),
    ("zero samples", "zero-length audio"),
    ("silence", "silent audio"),
    ("too short", "too short"),
    ("three minutes", "too long (180.0 s > 30 s)"),
    ("missing file", "audio file not found"),
    ("escapes root", "path escapes the dataset directory"),
]


def _load(config_path, base=True):
    """The dataset as ``adapt`` reads it: with the base resolved (its tokenizer measures transcriptions), or without."""
    from polyadapt.config import load_config
    from polyadapt.lifecycle import resolve_base
    from polyadapt.modality import DataContext
    from polyadapt.plugins import get_plugin_manager

    config = load_config(config_path)
    resolved = resolve_base(config.base) if base else None
    return get_plugin_manager().get_modality("speech").load_data(DataContext(config, config.data.path, resolved))


@pytest.mark.parametrize(("kind", "reason"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_every_bad_audio_case_is_named_with_file_line_and_reason(tmp_path, tiny_whisper, kind, reason):
    data = write_dataset(tmp_path / "data", train=3, test=2)
    name = _broken(kind, data / "train")
    if kind == "escapes root":
        sf.write(tmp_path / "outside.wav", _tone(1.0), RATE)
    with open(data / "train" / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write(f"{name},A clip that should never be used.\n")
    splits = _load(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run"))
    assert len(splits.problems) == 1
    problem = splits.problems[0]
    assert problem.file.endswith("train/metadata.csv")
    assert problem.line == 5  # header + 3 good rows + the bad one
    assert name in problem.reason and reason in problem.reason
    assert len(splits.train) + len(splits.validation) == 5  # the good clips only; nothing substituted


def test_eight_bit_stereo_44k_is_mixed_to_mono_and_resampled(tmp_path, tiny_whisper):
    data = write_dataset(tmp_path / "data", train=2, test=1)
    left, right = _tone(1.0, rate=44_100), _tone(1.0, rate=44_100, amplitude=0.1)
    sf.write(data / "train" / "stereo.wav", np.stack([left, right], axis=1), 44_100, subtype="PCM_U8")
    assert sf.info(data / "train" / "stereo.wav").channels == 2
    with open(data / "train" / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write("stereo.wav,An eight bit stereo clip.\n")
    splits = _load(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run"))
    assert not splits.problems
    clip = next(s for s in splits.train if s.file.endswith("stereo.wav"))
    assert clip.audio.ndim == 1 and clip.audio.dtype == np.float32
    assert abs(len(clip.audio) - RATE) <= 2
    assert 0.15 < np.abs(clip.audio).max() < 0.25  # the mean of the two channels' amplitudes


FORMATS = [("flac", {"subtype": "PCM_24"}), ("ogg", {"format": "OGG", "subtype": "VORBIS"}), ("mp3", {"format": "MP3"})]


@pytest.mark.parametrize(("suffix", "options"), FORMATS, ids=[f[0] for f in FORMATS])
def test_compressed_formats_at_other_rates_are_read(tmp_path, tiny_whisper, suffix, options):
    data = write_dataset(tmp_path / "data", train=1, test=1)
    source, _ = sf.read(SAMPLES / "train" / sample_rows("train")[1]["file_name"], dtype="float32")
    import torchaudio

    resampled = torchaudio.functional.resample(torch.from_numpy(source), RATE, 22_050).numpy()
    sf.write(data / "train" / f"clip.{suffix}", resampled, 22_050, **options)
    with open(data / "train" / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write(f"clip.{suffix},A compressed clip.\n")
    splits = _load(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run"))
    assert not splits.problems
    clip = next(s for s in splits.train if s.file.endswith(suffix))
    # back at 16 kHz; mp3 encoders add some padding at the ends
    assert abs(len(clip.audio) - len(source)) < 0.1 * RATE


@pytest.mark.parametrize(
    ("speech", "allowed"),
    [({"max_label_length": 50}, 50), ({}, 93), ({"prompt_glossary": True}, None)],
    ids=["max_label_length", "decoder length", "glossary prompt"],
)
def test_transcript_problems_and_jsonl_lines(tmp_path, tiny_whisper, speech, allowed):
    data = write_dataset(tmp_path / "data", train=2, test=1)
    folder = data / "train"
    first = sample_rows("train")[0]["file_name"]
    (folder / "metadata.csv").unlink()
    lines = [
        json.dumps({"file_name": first, "transcription": "Fine."}),
        json.dumps({"file_name": first, "transcription": "   "}),
        "{not json",
        json.dumps({"file_name": first, "transcription": "word " * 300}),
    ]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", speech=speech)
    splits = _load(config)
    reasons = {p.line: p.reason for p in splits.problems}
    assert set(reasons) == {2, 3, 4}, reasons
    assert "empty transcription" in reasons[2]
    assert "invalid JSON" in reasons[3]
    if allowed is None:  # the glossary prompt takes decoder positions of its own
        allowed = int(reasons[4].rsplit("(", 1)[1].rstrip(")"))
        assert 0 < allowed < 93
    assert f"more than the decoder allows ({allowed})" in reasons[4]
    assert all(p.file.endswith("metadata.jsonl") for p in splits.problems)


def test_a_clip_language_the_model_lacks_is_a_bad_sample(tmp_path, tiny_whisper):
    data = write_dataset(tmp_path / "data", train=3, test=1)
    rows = sample_rows("train")[:3]
    with open(data / "train" / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "transcription", "language"])
        for row, language in zip(rows, ["en", "de", ""], strict=True):
            writer.writerow([row["file_name"], row["transcription"], language])
    splits = _load(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run"))
    assert [(p.line, p.split) for p in splits.problems] == [(3, "train")]
    assert rows[1]["file_name"] in splits.problems[0].reason and "English-only" in splits.problems[0].reason
    assert [s.language for s in splits.train] == ["en", None]


def test_without_the_base_transcriptions_are_left_to_prepare_and_a_warning_says_so(tmp_path, tiny_whisper):
    data = write_dataset(tmp_path / "data", train=2, test=1)
    with open(data / "train" / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write(f"{sample_rows('train')[0]['file_name']},{'word ' * 300}\n")
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run")
    splits = _load(config, base=False)
    assert not splits.problems and len(splits.train) == 3
    assert any("transcription lengths are checked when the run prepares" in w for w in splits.warnings)
    assert len(_load(config).problems) == 1


def test_a_speech_language_the_model_lacks_is_one_config_error(tmp_path, tiny_whisper):
    from polyadapt.errors import ConfigError

    data = write_dataset(tmp_path / "data", train=2, test=1)
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", speech={"language": "de"})
    with pytest.raises(ConfigError, match=r"speech.language: language 'de': this is an English-only"):
        _load(config)


def test_doctor_names_a_transcription_too_long_without_loading_the_model(tmp_path, tiny_whisper, monkeypatch):
    from click.testing import CliRunner

    import polyadapt_speech.model
    from polyadapt.cli import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("doctor loaded the model")

    monkeypatch.setattr(polyadapt_speech.model, "load_whisper", no_loading)
    data = write_dataset(tmp_path / "data", train=2, test=1)
    with open(data / "train" / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write(f"{sample_rows('train')[0]['file_name']},{'word ' * 300}\n")
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run")
    result = CliRunner().invoke(cli, ["doctor", str(config)])
    assert result.exit_code != 0
    assert "train/metadata.csv:4" in result.output and "more than the decoder allows (93)" in result.output


def test_a_directory_without_any_split_is_the_cores_data_error(tmp_path, tiny_whisper):
    data = tmp_path / "data"
    (data / "notes").mkdir(parents=True)
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run")
    with pytest.raises(DataError, match="holds no dataset") as caught:
        _load(config)
    assert "train/, validation/ or test/" in str(caught.value)


def test_every_split_found_is_read_and_validation_is_held_out(tmp_path, tiny_whisper):
    data = write_dataset(tmp_path / "data", train=3, test=2)
    shutil.copytree(data / "test", data / "validation")
    (data / "validation" / "metadata.csv").write_text(
        (data / "test" / "metadata.csv").read_text(encoding="utf-8").splitlines()[0]
        + "\n"
        + (data / "test" / "metadata.csv").read_text(encoding="utf-8").splitlines()[1]
        + "\n",
        encoding="utf-8",
    )
    splits = _load(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run"))
    assert splits.heldout == {"source": "validation"}
    assert (len(splits.train), len(splits.validation)) == (3, 1)
    assert {"train_seconds", "validation_seconds", "test_seconds"} <= set(splits.details)


def test_training_fails_listing_bad_samples_and_skip_records_them(tmp_path, tiny_whisper):
    import polyadapt

    data = write_dataset(tmp_path / "data", train=3, test=2)
    sf.write(data / "train" / "quiet.wav", np.zeros(RATE, dtype=np.float32), RATE)
    with open(data / "train" / "metadata.csv", "a", encoding="utf-8") as handle:
        handle.write("quiet.wav,Nothing here.\n")
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", train={"max_steps": 1})
    with pytest.raises(DataError, match="quiet.wav: silent audio"):
        polyadapt.adapt(config)
    config = write_config(
        tmp_path / "c.yaml",
        tiny_whisper,
        data,
        tmp_path / "run",
        train={"max_steps": 1},
        data={"on_bad_sample": "skip"},
        eval={"before": False},
    )
    run = polyadapt.adapt(config)
    manifest = json.loads((run / "polyadapt.json").read_text())
    assert "quiet.wav" in json.dumps(manifest["data"]["bad_samples_skipped"])


def test_root_metadata_gets_a_deterministic_holdout(tmp_path, tiny_whisper):
    data = write_dataset(tmp_path / "data", train=6, test=0)
    shutil.rmtree(data / "test")
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", data={"holdout": 0.34})
    first, second = _load(config), _load(config)
    assert len(first.validation) == 2 and len(first.train) == 4
    assert [s.file for s in first.validation] == [s.file for s in second.validation]
    assert first.heldout["source"] == "holdout" and len(first.heldout["indices"]) == 2


def test_long_form_accepts_long_held_out_clips_but_never_long_training_clips(tmp_path, tiny_whisper):
    data = write_dataset(tmp_path / "data", train=2, test=1)
    for split in ("train", "test"):
        sf.write(data / split / "long.wav", _tone(40.0), RATE)
        with open(data / split / "metadata.csv", "a", encoding="utf-8") as handle:
            handle.write("long.wav,A forty second clip.\n")
    config = write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", speech={"long_form": True})
    splits = _load(config)
    assert [p.split for p in splits.problems] == ["train"]
    assert "training clips must fit Whisper's 30 s window" in splits.problems[0].reason
    assert any(s.file.endswith("long.wav") for s in splits.validation)


def test_a_general_subdirectory_is_not_read_as_data(tmp_path, tiny_whisper):
    data = write_dataset(tmp_path / "data", train=3, test=2)
    general = write_dataset(data / "general", train=2, test=2, glossary=False)
    splits = _load(write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run"))
    assert (len(splits.train), len(splits.validation)) == (3, 2)
    assert not any(general in f.parents for f in splits.files)


def test_the_demo_general_set_is_everyday_speech_without_domain_terms(tmp_path, tiny_whisper):
    from polyadapt.config import load_config
    from polyadapt.defaults import resolve_general_data
    from polyadapt.lifecycle import resolve_base
    from polyadapt.modality import DataContext
    from polyadapt.plugins import get_plugin_manager
    from polyadapt_speech.data import dataset_glossary

    config = load_config(write_config(tmp_path / "c.yaml", tiny_whisper, SAMPLES, tmp_path / "run"))
    config = resolve_general_data(config).config
    assert config.eval.general_data == SAMPLES / "general"
    ctx = DataContext(config, config.eval.general_data, resolve_base(config.base), general=True)
    splits = get_plugin_manager().get_modality("speech").load_data(ctx)
    assert len(splits.validation) == 6 and not splits.problems and not splits.train
    words = {w.lower() for term in dataset_glossary(SAMPLES) for w in term.split()}
    assert not any(w.strip(".,?!").lower() in words for s in splits.validation for w in s.text.split())
