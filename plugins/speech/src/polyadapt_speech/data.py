"""Reading and validating a speech dataset in the Hugging Face *audiofolder* layout.

::

    data/
      glossary.txt              optional: one domain term per line (term recall, optional decoder prompt)
      train/metadata.csv        file_name,transcription[,language]
      train/clip_001.wav ...
      test/metadata.jsonl       or validation/; {"file_name": ..., "transcription": ..., "language": ...}

A directory with only ``metadata.csv``/``.jsonl`` at its root (no split folders) is one training split; polyadapt
picks the held-out split (validation, else test, else a ``data.holdout`` cut of train). Audio can be wav, flac, ogg or
mp3 at any rate, depth and channel count: it is read with soundfile (librosa as a fallback), mixed to mono and
resampled to 16 kHz with torchaudio. Every bad sample becomes a :class:`polyadapt.data.Problem` naming the metadata
file and line, never an exception; a bad sample is never replaced by another one.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from polyadapt.data import Problem, read_jsonl, resolve_inside
from polyadapt.modality import DataFound

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1
MAX_SECONDS = 30.0
#: peak amplitude below which a clip counts as silent (-60 dBFS)
SILENCE_PEAK = 1e-3
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
SPLITS = ("train", "validation", "test")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
GLOSSARY_FILE = "glossary.txt"


@dataclass
class SpeechSample:
    """One validated utterance: 16 kHz mono float32 ``audio``, its transcript and where it came from (``file`` the
    audio, ``metadata`` the metadata file whose ``line`` lists it)."""

    audio: np.ndarray
    text: str
    file: str
    line: int
    language: str | None = None
    metadata: str | None = None

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    # -- polyadapt.pii.TextFields: the transcript is what ``data.pii`` scans and redacts (the audio is unchanged) ---
    def text_fields(self) -> dict[str, str]:
        return {"transcription": self.text}

    def with_text_fields(self, fields: dict[str, str]) -> SpeechSample:
        return replace(self, text=fields.get("transcription", self.text))

    def text_location(self) -> tuple[str, int | None]:
        return self.metadata or self.file, self.line


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
    label_problem: Callable[[str, str | None], str | None] | None = None,
) -> tuple[list[SpeechSample], list[Problem], list[Path]]:
    """Validate and decode one split folder; returns its good samples, its problems and the files read.

    ``label_problem(text, language)`` says why a transcription does not fit the decoder (None when it does); without
    it (no tokenizer before the model loads) transcriptions are measured when the run prepares them.
    """
    metadata = next((folder / n for n in METADATA_FILES if (folder / n).is_file()), None)
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
        reason = label_problem(text, language) if label_problem is not None else None
        if reason is not None:
            bad(line, f"{shown}: {reason}")
            continue
        samples.append(
            SpeechSample(audio=audio, text=text, file=str(audio_path), line=line, language=language, metadata=where)
        )
    return samples, problems, files


def read_glossary(path: Path) -> list[str]:
    """Terms of ``glossary.txt`` (one per line; blank lines and ``#`` comments ignored), in file order, deduplicated."""
    terms: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        term = raw.strip()
        if term and not term.startswith("#") and term not in terms:
            terms.append(term)
    return terms


def dataset_glossary(root: Path) -> list[str]:
    """The terms of ``glossary.txt`` next to the split folders; empty when there is none."""
    file = Path(root) / GLOSSARY_FILE
    return read_glossary(file) if file.is_file() else []


def find_splits(path: Path) -> dict[str, Path]:
    """The split folders of an audiofolder dataset, by split name; a metadata file at the root (and no split folder)
    is the train split."""
    found = {name: path / name for name in SPLITS if (path / name).is_dir()}
    if not found and any((path / n).is_file() for n in METADATA_FILES):
        found["train"] = path
    return found


def read_dataset(
    path: Path,
    *,
    long_form: bool = False,
    label_problem: Callable[[str, str | None], str | None] | None = None,
) -> DataFound:
    """Every split of an audiofolder dataset found on disk, its bad samples, the files read and the glossary size."""
    path = Path(path)
    found = DataFound(splits={})
    for split, folder in find_splits(path).items():
        samples, problems, files = load_split(
            folder, path, split=split, long_form=long_form, label_problem=label_problem
        )
        found.problems += problems
        if not files:  # a folder without metadata is a problem, not an empty split
            continue
        found.splits[split] = samples
        found.files += files
        found.details[f"{split}_seconds"] = round(sum(s.seconds for s in samples), 2)
    glossary = dataset_glossary(path)
    if (path / GLOSSARY_FILE).is_file():
        found.files.append(path / GLOSSARY_FILE)
        found.details["glossary_terms"] = len(glossary)
    if found.splits and not glossary:
        found.warnings.append(f"{path}: no {GLOSSARY_FILE}, so no domain-term recall is measured")
    return found
