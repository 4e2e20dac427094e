"""Reading and validating a speech dataset in the Hugging Face *audiofolder* layout.

::

    data/
      glossary.txt              optional: one domain term per line (term recall, optional decoder prompt)
      train/metadata.csv        file_name,transcription[,language]
      train/clip_001.wav ...
      test/metadata.jsonl       or validation/; {"file_name": ..., "transcription": ..., "language": ...}

A directory with only ``metadata.csv``/``.jsonl`` at its root (no split folders) is one training split from which
``data.holdout`` is cut. Audio can be wav, flac, ogg or mp3 at any rate, depth and channel count: it is read with
soundfile (librosa as a fallback), mixed to mono and resampled to 16 kHz with torchaudio. Every bad sample becomes a
:class:`polyadapt.data.Problem` naming the metadata file and line; a bad sample is never replaced by another one.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polyadapt.data import Problem, deterministic_holdout, read_jsonl, resolve_inside

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1
MAX_SECONDS = 30.0
#: peak amplitude below which a clip counts as silent (-60 dBFS)
SILENCE_PEAK = 1e-3
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
HELD_OUT_SPLITS = ("validation", "test")


@dataclass
class SpeechSample:
    """One validated utterance: 16 kHz mono float32 ``audio``, its transcript and where it came from."""

    audio: np.ndarray
    text: str
    file: str
    line: int
    language: str | None = None

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


class AudioReadError(Exception):
    """The file could not be decoded as audio."""


def read_audio(path: Path) -> np.ndarray:
    """Decode ``path`` to 16 kHz mono float32 (soundfile first, librosa for formats soundfile lacks)."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as first:  # noqa: BLE001 - soundfile raises several types for bad files
        try:
            import warnings

            import librosa

            with warnings.catch_warnings():
                # librosa warns before trying audioread; the outcome is reported either way
                warnings.simplefilter("ignore")
                mono, rate = librosa.load(str(path), sr=None, mono=True)
            data = np.asarray(mono, dtype=np.float32)[:, None]
        except Exception:  # noqa: BLE001
            raise AudioReadError(f"unreadable or corrupt audio ({first})") from None
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE and len(mono):
        import torch
        import torchaudio

        mono = torchaudio.functional.resample(
            torch.from_numpy(np.ascontiguousarray(mono)), int(rate), SAMPLE_RATE
        ).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def read_metadata(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[Problem]]:
    """Rows of ``metadata.csv``/``metadata.jsonl`` with their line numbers, and the rows that cannot be parsed."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[Problem] = []
    name = str(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            for key in ("file_name", "transcription"):
                if key not in header:
                    return [], [
                        Problem(
                            name, f"the header has no {key!r} column (found: {', '.join(header) or 'none'})", line=1
                        )
                    ]
            for row in reader:
                rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    else:
        rows, problems = read_jsonl(path, name)
    return rows, problems


def load_split(
    folder: Path,
    root: Path,
    *,
    split: str,
    long_form: bool = False,
    count_tokens: Callable[[str], int] | None = None,
    max_label_tokens: int | None = None,
) -> tuple[list[SpeechSample], list[Problem], list[Path]]:
    """Validate and decode one split folder; returns its good samples, its problems and the files read."""
    metadata = next((folder / n for n in ("metadata.csv", "metadata.jsonl") if (folder / n).is_file()), None)
    if metadata is None:
        return [], [Problem(str(folder), "no metadata.csv or metadata.jsonl", split=split)], []
    rows, problems = read_metadata(metadata)
    problems = [Problem(p.file, p.reason, p.line, split) for p in problems]
    samples: list[SpeechSample] = []
    files = [metadata]
    where = str(metadata)

    def bad(line: int, reason: str) -> None:
        problems.append(Problem(where, reason, line=line, split=split))

    for line, row in rows:
        file_name = row.get("file_name")
        text = row.get("transcription")
        language = row.get("language") or None
        if not isinstance(file_name, str) or not file_name.strip():
            bad(line, "file_name is missing or empty")
            continue
        shown = file_name
        if not isinstance(text, str) or not text.strip():
            bad(line, f"{shown}: empty transcription")
            continue
        text = " ".join(text.split())
        # relative to the split folder, but may point anywhere inside the dataset root (never outside it)
        audio_path = resolve_inside(root, str(folder.resolve().relative_to(root.resolve()) / file_name))
        if audio_path is None:
            bad(line, f"{shown}: path escapes the dataset directory")
            continue
        if not audio_path.is_file():
            bad(line, f"{shown}: audio file not found")
            continue
        if audio_path.suffix.lower() not in AUDIO_SUFFIXES:
            bad(line, f"{shown}: unsupported audio type {audio_path.suffix!r} (use {', '.join(AUDIO_SUFFIXES)})")
            continue
        files.append(audio_path)
        try:
            audio = read_audio(audio_path)
        except AudioReadError as exc:
            bad(line, f"{shown}: {exc}")
            continue
        seconds = len(audio) / SAMPLE_RATE
        if len(audio) == 0:
            bad(line, f"{shown}: zero-length audio (no samples)")
            continue
        if not np.isfinite(audio).all():
            bad(line, f"{shown}: audio holds NaN or infinite samples")
            continue
        if seconds < MIN_SECONDS:
            bad(line, f"{shown}: too short ({seconds:.3f} s < {MIN_SECONDS} s)")
            continue
        if seconds > MAX_SECONDS and not (long_form and split != "train"):
            hint = (
                " (long-form clips are accepted in held-out splits with speech.long_form: true)"
                if not long_form
                else " (training clips must fit Whisper's 30 s window)"
            )
            bad(line, f"{shown}: too long ({seconds:.1f} s > {MAX_SECONDS:.0f} s){hint}")
            continue
        peak = float(np.abs(audio).max())
        if peak < SILENCE_PEAK:
            level = 20 * math.log10(peak) if peak > 0 else float("-inf")
            bad(line, f"{shown}: silent audio (peak {level:.0f} dBFS)")
            continue
        if count_tokens is not None and max_label_tokens is not None:
            tokens = count_tokens(text)
            if tokens > max_label_tokens:
                bad(
                    line,
                    f"{shown}: transcription is {tokens} tokens, more than the decoder allows ({max_label_tokens})",
                )
                continue
        samples.append(SpeechSample(audio=audio, text=text, file=str(audio_path), line=line, language=language))
    return samples, problems, files


def read_glossary(path: Path) -> list[str]:
    """Terms of ``glossary.txt`` (one per line; blank lines and ``#`` comments ignored), in file order, deduplicated."""
    terms: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        term = raw.strip()
        if term and not term.startswith("#") and term not in terms:
            terms.append(term)
    return terms


def find_splits(path: Path) -> tuple[Path | None, Path | None]:
    """``(train_folder, held_out_folder)`` of an audiofolder dataset; a root metadata file counts as train."""
    train = path / "train" if (path / "train").is_dir() else None
    held = next((path / n for n in HELD_OUT_SPLITS if (path / n).is_dir()), None)
    if train is None and held is None and any((path / n).is_file() for n in ("metadata.csv", "metadata.jsonl")):
        train = path
    return train, held


def load_dataset(
    path: Path,
    *,
    holdout: float,
    seed: int,
    long_form: bool = False,
    count_tokens: Callable[[str], int] | None = None,
    max_label_tokens: int | None = None,
) -> dict[str, Any]:
    """Read a whole audiofolder dataset: train/validation samples, problems, files, glossary and split details."""
    path = Path(path)
    train_dir, held_dir = find_splits(path)
    problems: list[Problem] = []
    files: list[Path] = []
    details: dict[str, Any] = {}
    if train_dir is None and held_dir is None:
        problems.append(Problem(str(path), "no train/, validation/ or test/ folder and no metadata.csv/metadata.jsonl"))
    options = {"long_form": long_form, "count_tokens": count_tokens, "max_label_tokens": max_label_tokens}
    train: list[SpeechSample] = []
    validation: list[SpeechSample] = []
    if train_dir is not None:
        train, found, read = load_split(train_dir, path, split="train", **options)
        problems += found
        files += read
    if held_dir is not None:
        validation, found, read = load_split(held_dir, path, split=held_dir.name, **options)
        problems += found
        files += read
        details["validation"] = f"{held_dir.name}/ ({len(validation)} clips)"
    elif train:
        train, validation, indices = deterministic_holdout(train, holdout, seed)
        details["validation"] = f"{len(validation)} clips held out of train/ (data.holdout={holdout}, seed={seed})"
        details["holdout_lines"] = [s.line for s in validation]
    glossary: list[str] = []
    if (path / "glossary.txt").is_file():
        glossary = read_glossary(path / "glossary.txt")
        files.append(path / "glossary.txt")
        details["glossary_terms"] = len(glossary)
    details["train_seconds"] = round(sum(s.seconds for s in train), 2)
    details["validation_seconds"] = round(sum(s.seconds for s in validation), 2)
    return {
        "train": train,
        "validation": validation,
        "problems": problems,
        "files": files,
        "glossary": glossary,
        "details": details,
    }
