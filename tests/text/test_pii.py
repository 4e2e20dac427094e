"""data.pii on text records: every type found in every format and redacted; the files unchanged by redact; fail exits
2 naming file and line; the manifest, model card and report show counts, never a value."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import polyadapt
from polyadapt.errors import DataError
from polyadapt.lifecycle import read_data
from polyadapt.pii import missing_libraries
from polyadapt.plugins import get_plugin_manager
from tests.text.builders import chat_records, make_config, write_jsonl

pytestmark = pytest.mark.skipif(bool(missing_libraries()), reason="polyadapt[pii] is not installed")

VALUES = {
    "EMAIL": "dana.whitfield@example.com",
    "PHONE": "+44 20 7946 0958",
    "CARD": "4539 1488 0343 6467",
    "IBAN": "GB82 WEST 1234 5698 7654 32",
    "NATIONAL_ID": "536-90-4399",
}


def chat(user: str, assistant: str, facts: list[str] | None = None) -> dict:
    record: dict = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
    if facts:
        record["answer_contains"] = facts
    return record


def write_pii_dataset(root: Path) -> Path:
    """train: one chat per type (the value in the user's words) after two clean ones; validation: a held-out answer
    and its fact naming a phone number, and a clean record."""
    planted = [
        chat(f"My {kind.lower()} is {value}. What is the fee?", "The fee is $6.") for kind, value in VALUES.items()
    ]
    write_jsonl(root / "train.jsonl", [*chat_records(2), *planted, chat("Order 1234567890 status?", "It shipped.")])
    write_jsonl(
        root / "validation.jsonl",
        [
            chat("Which number do I call?", "Call us on +49 30 901820 any time.", ["+49 30 901820"]),
            chat("What is the HarborFlex monthly fee?", "The monthly fee is $6.", ["$6"]),
        ],
    )
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polyadapt", *args], capture_output=True, text=True, timeout=600)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


@pytest.fixture
def pii_data(tmp_path) -> Path:
    return write_pii_dataset(tmp_path / "data")


def read(config):
    return read_data(get_plugin_manager().get_modality("text"), config)[0]


def test_every_type_is_found_in_chat_records_with_file_line_and_field(tiny_llama, pii_data):
    splits = read(make_config(tiny_llama, pii_data))
    record = splits.details["pii"]
    assert record["counts"] == {"EMAIL": 1, "PHONE": 3, "CARD": 1, "IBAN": 1, "NATIONAL_ID": 1}
    where = {(f["file"].rsplit("/", 1)[-1], f["line"], f["field"], f["type"]) for f in record["findings"]}
    assert ("train.jsonl", 3, "messages[0].content", "EMAIL") in where
    assert ("train.jsonl", 7, "messages[0].content", "NATIONAL_ID") in where
    assert ("validation.jsonl", 1, "answer_contains[0]", "PHONE") in where
    assert ("validation.jsonl", 1, "messages[1].content", "PHONE") in where
    assert record["records"] == 10 and record["records_with_findings"] == 6  # the order number is not a phone


def test_redact_replaces_values_in_train_held_out_text_and_facts(tiny_llama, pii_data):
    splits = read(make_config(tiny_llama, pii_data, data={"pii": "redact"}))
    users = [s.messages[0][1] for s in splits.train]
    for kind, value in VALUES.items():
        assert f"My {kind.lower()} is <{kind}>. What is the fee?" in users
        assert not any(value in u for u in users)
    held = next(s for s in splits.validation if s.answer_contains == ("<PHONE>",))
    assert held.messages[1][1] == "Call us on <PHONE> any time."


@pytest.mark.parametrize(
    ("records", "fields", "redacted"),
    [
        (
            [{"text": f"Write to {VALUES['EMAIL']} or pay with {VALUES['CARD']}."}],
            {"text"},
            "Write to <EMAIL> or pay with <CARD>.",
        ),
        (
            [{"prompt": f"IBAN {VALUES['IBAN']}?", "completion": f" Noted, SSN {VALUES['NATIONAL_ID']}."}],
            {"prompt", "completion"},
            "IBAN <IBAN>?\n Noted, SSN <NATIONAL_ID>.",
        ),
    ],
    ids=["text", "prompt_completion"],
)
def test_every_format_is_scanned_and_redacted(tmp_path, tiny_llama, records, fields, redacted):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(
        data / "validation.jsonl", [{"text": "clean"}] if "text" in fields else [{"prompt": "a", "completion": "b"}]
    )
    splits = read(make_config(tiny_llama, data, data={"pii": "redact"}))
    found = {f["field"] for f in splits.details["pii"]["findings"]}
    assert found == fields
    assert splits.train[0].content() == redacted


def test_fail_refuses_the_data_naming_file_and_line(tiny_llama, pii_data):
    with pytest.raises(DataError) as info:
        read(make_config(tiny_llama, pii_data, data={"pii": "fail"}))
    message = str(info.value)
    assert f"{pii_data / 'train.jsonl'}:3: EMAIL d***@***.com in messages[0].content" in message
    assert not any(v in message for v in VALUES.values())


def test_doctor_and_adapt_exit_2_under_fail_with_file_and_line(tmp_path, tiny_llama, pii_data):
    import yaml

    config = tmp_path / "c.yaml"
    output = tmp_path / "run"
    raw = {"modality": "text", "base": str(tiny_llama), "data": {"path": str(pii_data), "pii": "fail"}}
    config.write_text(yaml.safe_dump({**raw, "output": str(output)}))
    doctor = run_cli("doctor", str(config))
    shown = doctor.stdout + doctor.stderr
    assert doctor.returncode == 2, shown
    assert f"{pii_data / 'train.jsonl'}:4" in shown and "PHONE" in shown
    assert not any(v in shown for v in VALUES.values())
    adapt = run_cli("adapt", str(config))
    assert adapt.returncode == 2
    assert "personal-data finding(s)" in adapt.stderr and f"{pii_data / 'validation.jsonl'}:1" in adapt.stderr
    assert not output.exists()


def test_doctor_lists_findings_masked_under_report(tmp_path, tiny_llama, pii_data):
    from polyadapt.lifecycle import doctor

    splits, summary = doctor(make_config(tiny_llama, pii_data))
    text = "\n".join(summary)
    assert "personal data (data.pii: report): 7 finding(s) in 6 of 10 record(s)" in text
    assert f"{pii_data / 'train.jsonl'}:5: CARD ************6467 in messages[0].content" in text
    assert not splits.problems and not any(v in text for v in VALUES.values())


def test_adapt_with_redact_trains_on_copies_and_leaves_the_files_byte_identical(tmp_path, tiny_llama, pii_data):
    before = digests(pii_data)
    config = make_config(
        tiny_llama, pii_data, tmp_path / "run", data={"pii": "redact"},
        train={"max_steps": 2, "batch_size": 4, "precision": "fp32"}, text={"max_length": 64, "max_new_tokens": 4},
    )  # fmt: skip
    run = polyadapt.adapt(config)
    assert digests(pii_data) == before
    manifest = json.loads((run / "polyadapt.json").read_text())
    pii = manifest["data"]["details"]["pii"]
    assert pii["policy"] == "redact" and pii["redacted"] is True
    assert pii["counts"] == {"EMAIL": 1, "PHONE": 3, "CARD": 1, "IBAN": 1, "NATIONAL_ID": 1}
    card = (run / "README.md").read_text()
    assert "- personal data: EMAIL 1, PHONE 3, CARD 1, IBAN 1, NATIONAL_ID 1 in 10 records (data.pii: redact)" in card
    report = (run / "report.html").read_text()
    assert "personal data" in report and "&lt;PHONE&gt;" in report  # the held-out sample as evaluated, redacted
    for name in ("polyadapt.json", "README.md", "report.html", "report.json"):
        written = (run / name).read_text()
        assert not any(v in written for v in [*VALUES.values(), "+49 30 901820"]), name


def test_the_demo_set_is_found_and_redacted_except_the_banks_own_line(tmp_path, monkeypatch):
    from polyadapt.config import load_config

    monkeypatch.chdir(Path(__file__).parents[2])  # the example's paths are relative to the repository
    splits = read(load_config("examples/text-pii.yaml", overrides=[f"output={tmp_path / 'run'}"]))
    record = splits.details["pii"]
    assert record["counts"] == {"EMAIL": 3, "PHONE": 2, "CARD": 2, "IBAN": 2, "NATIONAL_ID": 2}
    assert all("1-800-555-0142" in s.content() for s in splits.validation if "Mooring" in s.content())
    clean = [s for s in splits.train if "order 1234567890" in s.content() or "4539 1488 0343 6468" in s.content()]
    assert len(clean) == 2  # the order number and the Luhn-failing card stay as written
