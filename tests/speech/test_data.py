"""Reading audiofolder datasets: good audio in any format is accepted, every bad sample is named with its reason."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from polyadapt.errors import DataError

from .conftest import SAMPLES, sample_rows, write_config, write_dataset

RATE = 16_000


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


def _load(config_path):
    from polyadapt.config import load_config
    from polyadapt.plugins import get_plugin_manager

    config = load_config(config_path)
    return get_plugin_manager().get_modality("speech").load_data(config, config.data.path)


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


def test_transcript_problems_and_jsonl_lines(tmp_path, tiny_whisper):
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
    splits = _load(
        write_config(tmp_path / "c.yaml", tiny_whisper, data, tmp_path / "run", speech={"max_label_length": 100})
    )
    found = {(p.line, p.reason.split(":")[-1].strip()[:20]) for p in splits.problems}
    reasons = {p.line: p.reason for p in splits.problems}
    assert set(reasons) == {2, 3, 4}, found
    assert "empty transcription" in reasons[2]
    assert "invalid JSON" in reasons[3]
    assert "more than the decoder allows (100)" in reasons[4]
    assert all(p.file.endswith("metadata.jsonl") for p in splits.problems)


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
