"""data.pii on image captions: every type found with the metadata file and line, and redacted in the caption the
model trains on (the trigger kept); the dataset's files byte-identical."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from polyadapt.config import load_config
from polyadapt.errors import DataError
from polyadapt.lifecycle import read_data
from polyadapt.pii import missing_libraries
from polyadapt.plugins import get_plugin_manager
from tests.image.conftest import write_dataset

pytestmark = pytest.mark.skipif(bool(missing_libraries()), reason="polyadapt[pii] is not installed")

CAPTIONS = {
    "train": [
        ("a flyer reading dana.whitfield@example.com", "EMAIL"),
        ("a sign with the number +44 20 7946 0958", "PHONE"),
        ("a card printed 4539 1488 0343 6467", "CARD"),
        ("a cheque to GB82 WEST 1234 5698 7654 32", "IBAN"),
    ],
    "test": [("a form with SSN 536-90-4399", "NATIONAL_ID"), ("a lighthouse at dusk", None)],
}
TRIGGER = "in harbor style"


def write_pii_dataset(root: Path) -> Path:
    write_dataset(root, train=4, test=2)
    for split, captions in CAPTIONS.items():
        metadata = root / split / "metadata.jsonl"
        rows = [json.loads(line) for line in metadata.read_text().splitlines()]
        for row, (caption, _) in zip(rows, captions, strict=True):
            row["text"] = caption
        metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def read(tmp_path: Path, policy: str):
    data = tmp_path / "data"
    if not data.exists():
        write_pii_dataset(data)
    raw = {
        "modality": "image",
        "base": str(tmp_path),
        "data": {"path": str(data), "pii": policy},
        "output": str(tmp_path / "run"),
        "image": {"trigger": TRIGGER},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return data, read_data(get_plugin_manager().get_modality("image"), load_config(tmp_path / "c.yaml"))[0]


def test_every_type_is_found_in_captions_with_metadata_file_and_line(tmp_path):
    data, splits = read(tmp_path, "report")
    got = {(f["file"], f["line"], f["type"], f["field"]) for f in splits.details["pii"]["findings"]}
    expected = {
        (str(data / split / "metadata.jsonl"), line, kind, "caption")
        for split, captions in CAPTIONS.items()
        for line, (_, kind) in enumerate(captions, start=1)
        if kind
    }
    assert got == expected


def test_redact_changes_captions_keeps_the_trigger_and_the_files(tmp_path):
    data = write_pii_dataset(tmp_path / "data")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.rglob("*")) if p.is_file()}
    _, splits = read(tmp_path, "redact")
    captions = sorted(s.caption for s in [*splits.train, *splits.validation])
    assert captions == sorted(
        [
            f"a flyer reading <EMAIL>, {TRIGGER}",
            f"a sign with the number <PHONE>, {TRIGGER}",
            f"a card printed <CARD>, {TRIGGER}",
            f"a cheque to <IBAN>, {TRIGGER}",
            f"a form with SSN <NATIONAL_ID>, {TRIGGER}",
            f"a lighthouse at dusk, {TRIGGER}",
        ]
    )
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before


def test_fail_names_the_metadata_file_and_line(tmp_path):
    with pytest.raises(DataError) as info:
        read(tmp_path, "fail")
    assert f"{tmp_path / 'data' / 'train' / 'metadata.jsonl'}:2: PHONE" in str(info.value)
