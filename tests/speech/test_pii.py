"""data.pii on speech transcripts: every type found with the metadata file and line, and redacted in the transcript
the decoder learns (the audio is not changed); the dataset's files byte-identical."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from polyadapt.config import load_config
from polyadapt.errors import DataError
from polyadapt.lifecycle import read_data
from polyadapt.pii import missing_libraries
from polyadapt.plugins import get_plugin_manager
from tests.speech.conftest import write_config, write_dataset

pytestmark = pytest.mark.skipif(bool(missing_libraries()), reason="polyadapt[pii] is not installed")

TRANSCRIPTS = {
    "train": [
        ("please call me back on +44 20 7946 0958", "PHONE"),
        ("my card number is 4539 1488 0343 6467", "CARD"),
        ("write to dana.whitfield@example.com", "EMAIL"),
    ],
    "test": [("the refund goes to GB82 WEST 1234 5698 7654 32", "IBAN"), ("my social is 536-90-4399", "NATIONAL_ID")],
}


def write_pii_dataset(root: Path) -> Path:
    write_dataset(root, train=3, test=2)
    for split, planted in TRANSCRIPTS.items():
        metadata = root / split / "metadata.csv"
        with open(metadata, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        for row, (text, _) in zip(rows, planted, strict=True):
            row["transcription"] = text
        with open(metadata, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file_name", "transcription"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def read(tmp_path: Path, policy: str):
    data = write_pii_dataset(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path, data, tmp_path / "run", data={"pii": policy}))
    return data, read_data(get_plugin_manager().get_modality("speech"), config)[0]


def test_every_type_is_found_in_transcripts_with_metadata_file_and_line(tmp_path):
    data, splits = read(tmp_path, "report")
    findings = splits.details["pii"]["findings"]
    got = {(Path(f["file"]).relative_to(data).as_posix(), f["line"], f["type"], f["field"]) for f in findings}
    expected = {
        (f"{split}/metadata.csv", line, kind, "transcription")
        for split, planted in TRANSCRIPTS.items()
        for line, (_, kind) in enumerate(planted, start=2)  # line 1 is the header
    }
    assert got == expected
    values = ("+44 20 7946 0958", "4539 1488 0343 6467", "dana.whitfield@example.com", "GB82 WEST", "536-90-4399")
    assert not any(value in str(findings) for value in values)


def test_redact_changes_the_transcripts_not_the_audio_nor_the_files(tmp_path):
    data = write_pii_dataset(tmp_path / "data")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.rglob("*")) if p.is_file()}
    _, plain = read(tmp_path, "report")
    _, splits = read(tmp_path, "redact")
    texts = sorted(s.text for s in [*splits.train, *splits.validation])
    assert texts == sorted(
        [
            "please call me back on <PHONE>",
            "my card number is <CARD>",
            "write to <EMAIL>",
            "the refund goes to <IBAN>",
            "my social is <NATIONAL_ID>",
        ]
    )
    by_file = {s.file: s for s in plain.train}
    for sample in splits.train:
        assert (sample.audio == by_file[sample.file].audio).all()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before


def test_fail_names_the_metadata_file_and_line(tmp_path):
    with pytest.raises(DataError) as info:
        read(tmp_path, "fail")
    assert f"{tmp_path / 'data' / 'train' / 'metadata.csv'}:3: CARD ************6467 in transcription" in str(
        info.value
    )
