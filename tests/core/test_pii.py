"""data.pii in the core: every type found, validated and redacted; false positives kept out; masks that hide the
value; the report / redact / fail policies on any sample that exposes its text; names only with a local spaCy pipeline."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from polyadapt.errors import ConfigError, DataError
from polyadapt.modality import DatasetSplits
from polyadapt.pii import (
    PLACEHOLDERS,
    TextFields,
    apply_pii_policy,
    make_scanner,
    mask,
    missing_libraries,
    scan_samples,
)

pytestmark = pytest.mark.skipif(bool(missing_libraries()), reason="polyadapt[pii] is not installed")

#: (type, value) planted in a sentence; every value passes its checksum
PLANTED = [
    ("EMAIL", "dana.whitfield@example.com"),
    ("EMAIL", "m.okafor@harbor-mail.example.org"),
    ("PHONE", "+44 20 7946 0958"),
    ("PHONE", "(415) 555-2671"),
    ("PHONE", "+49 30 901820"),
    ("CARD", "4539 1488 0343 6467"),
    ("CARD", "5425233430109903"),
    ("IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("IBAN", "DE89370400440532013000"),
    ("NATIONAL_ID", "536-90-4399"),
    ("NATIONAL_ID", "AB 12 34 56 C"),
]

#: text holding numbers and addresses that are not personal data (or fail their checksum)
CLEAN = [
    "My order 1234567890 has not arrived.",  # a bare digit run with no phone word before it
    "Ticket 5551234567 was closed yesterday.",
    "Is 4539 1488 0343 6468 my card? It fails Luhn.",
    "The IBAN GB82 WEST 1234 5698 7654 33 has a bad check digit.",
    "SSN-like 078-05-1120 is the famous invalid one, and 219-09-9999 too.",
    "A nine-digit reference 123456789 is not an SSN.",
    "The fee is $2,500 a day, 3.10% APY, 1,000 points = $10, due 2024-01-17 at 3 pm.",
    "Write to a@b.c is not an address with a real domain.",
    "ISBN 978-0-306-40615-7 and the years 1990-2024.",
]


@dataclass(frozen=True)
class Note:
    """A sample of a modality that exposes one text field (what a third-party modality would implement)."""

    body: str
    file: str = "notes.jsonl"
    line: int = 1

    def text_fields(self) -> dict[str, str]:
        return {"body": self.body}

    def with_text_fields(self, fields: dict[str, str]) -> Note:
        return replace(self, body=fields.get("body", self.body))

    def text_location(self) -> tuple[str, int | None]:
        return self.file, self.line


class Config:
    """The slice of AdaptConfig the policy reads."""

    def __init__(self, pii: str = "report", allow: tuple[str, ...] = ()) -> None:
        self.data = type("Data", (), {"pii": pii, "pii_allow": list(allow)})()


def splits_of(train: list, validation: list | None = None) -> DatasetSplits:
    return DatasetSplits(train=train, validation=validation or [])


@pytest.fixture(scope="module")
def scanner():
    return make_scanner()


@pytest.mark.parametrize(("kind", "value"), PLANTED)
def test_each_type_is_found_and_redacted(scanner, kind, value):
    text = f"Customer wrote: {value} - please help."
    spans = scanner.find(text)
    assert [(s.type, text[s.start : s.end]) for s in spans] == [(kind, value)]
    redacted = scanner.redact(text, spans)
    assert redacted == f"Customer wrote: {PLACEHOLDERS[kind]} - please help."


@pytest.mark.parametrize("text", CLEAN)
def test_numbers_that_are_not_personal_data_are_not_found(scanner, text):
    assert scanner.find(text) == []


def test_a_bare_digit_run_is_a_phone_only_after_a_phone_word(scanner):
    assert scanner.find("Order 4155552671 shipped.") == []
    found = scanner.find("Please call 4155552671 tonight.")
    assert [s.type for s in found] == ["PHONE"]


def test_several_values_in_one_text_do_not_overlap(scanner):
    text = "Mail dana@example.com, card 4539 1488 0343 6467, phone +44 20 7946 0958."
    spans = scanner.find(text)
    assert [s.type for s in spans] == ["EMAIL", "CARD", "PHONE"]
    assert scanner.redact(text, spans) == "Mail <EMAIL>, card <CARD>, phone <PHONE>."


@pytest.mark.parametrize(("kind", "value"), PLANTED)
def test_the_mask_never_holds_the_value(kind, value):
    masked = mask(kind, value)
    compact = "".join(c for c in value if c.isalnum())
    assert value not in masked and compact not in masked.replace(" ", "")
    assert "*" in masked


def test_masks_keep_what_identifies_the_finding_and_no_more():
    assert mask("EMAIL", "jane.doe@example.com") == "j***@***.com"
    assert mask("CARD", "4539 1488 0343 6467") == "************6467"
    assert mask("IBAN", "GB82 WEST 1234 5698 7654 32").startswith("GB")
    assert mask("PERSON", "Dana Whitfield") == "D*** W***"


def test_allowed_values_are_neither_reported_nor_redacted():
    allowed = make_scanner(("1-800-555-0142",))
    assert allowed.find("Call the Mooring Line on 1 800 555 0142.") == []
    assert [s.type for s in make_scanner().find("Call the Mooring Line on 1 800 555 0142.")] == ["PHONE"]


def test_report_lists_findings_masked_and_changes_nothing():
    train = [Note("Mail me: dana.whitfield@example.com", line=1), Note("nothing here", line=2)]
    held = [Note("card 4539 1488 0343 6467", file="held.jsonl", line=7)]
    splits, scan = apply_pii_policy(splits_of(train, held), Config("report"), "data")
    assert list(splits.train) == train and list(splits.validation) == held
    assert [str(f) for f in scan.findings] == [
        "notes.jsonl:1: EMAIL d***@***.com in body",
        "held.jsonl:7: CARD ************6467 in body",
    ]
    record = splits.details["pii"]
    assert record["policy"] == "report" and record["records"] == 3 and record["records_with_findings"] == 2
    assert record["counts"]["EMAIL"] == 1 and record["counts"]["CARD"] == 1 and record["counts"]["PHONE"] == 0
    assert not record["redacted"]
    assert any("personal data found" in w for w in splits.warnings)
    shown = "\n".join([*scan.summary(), repr(record), *splits.warnings])
    assert "dana.whitfield@example.com" not in shown and "4539 1488 0343 6467" not in shown


def test_redact_replaces_values_in_train_and_held_out_copies():
    train = [Note("Mail me: dana.whitfield@example.com")]
    held = [Note("IBAN DE89370400440532013000 please")]
    splits, scan = apply_pii_policy(splits_of(train, held), Config("redact"), "data")
    assert [n.body for n in splits.train] == ["Mail me: <EMAIL>"]
    assert [n.body for n in splits.validation] == ["IBAN <IBAN> please"]
    assert train[0].body == "Mail me: dana.whitfield@example.com"  # the samples read are not changed
    assert splits.details["pii"]["redacted"] is True
    assert not any("personal data found" in w for w in splits.warnings)


def test_fail_raises_listing_every_finding_with_file_and_line():
    train = [Note("call +44 20 7946 0958", line=3), Note("SSN 536-90-4399", line=9)]
    with pytest.raises(DataError) as info:
        apply_pii_policy(splits_of(train), Config("fail"), "data")
    message = str(info.value)
    assert "2 personal-data finding(s) in data" in message
    assert "notes.jsonl:3: PHONE" in message and "notes.jsonl:9: NATIONAL_ID" in message
    assert "536-90-4399" not in message and "7946 0958" not in message


def test_fail_without_findings_passes():
    splits, scan = apply_pii_policy(splits_of([Note("no personal data")]), Config("fail"), "data")
    assert scan.findings == [] and splits.details["pii"]["total"] == 0


def test_samples_without_text_fields_are_not_scanned_and_say_so():
    splits, scan = apply_pii_policy(splits_of([object()]), Config("redact"), "data")
    assert splits.details["pii"] == {
        "policy": "redact",
        "scanned": False,
        "reason": "this modality's samples expose no text fields",
    }
    assert "not scanned" in scan.summary()[0]


def test_without_the_libraries_report_says_so_and_redact_refuses(monkeypatch):
    import polyadapt.pii as pii

    monkeypatch.setattr(pii, "missing_libraries", lambda: ("presidio-analyzer",))
    splits, _ = apply_pii_policy(splits_of([Note("dana@example.com")]), Config("report"), "data")
    assert splits.details["pii"]["scanned"] is False
    with pytest.raises(ConfigError, match="data.pii: 'redact' needs presidio-analyzer"):
        apply_pii_policy(splits_of([Note("dana@example.com")]), Config("redact"), "data")


def test_names_are_not_detected_without_a_spacy_pipeline(monkeypatch, scanner):
    import polyadapt.pii as pii

    monkeypatch.setattr(pii, "spacy_english_model", lambda: None)
    assert "PERSON" not in scanner.types
    splits, scan = apply_pii_policy(splits_of([Note("I am Dana Whitfield")]), Config("redact"), "data")
    assert scan.findings == [] and "spaCy" in splits.details["pii"]["not_detected"]["PERSON"]
    assert any("PERSON is not detected" in line for line in scan.summary())


def test_names_are_found_with_a_local_spacy_pipeline(tmp_path, monkeypatch):
    spacy = pytest.importorskip("spacy")
    import polyadapt.pii as pii

    # a pipeline on disk whose entity ruler marks one name, standing in for an installed en_core_web_* package
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Dana Whitfield"}])
    nlp.to_disk(tmp_path / "names")
    monkeypatch.setattr(pii, "spacy_english_model", lambda: str(tmp_path / "names"))
    splits, scan = apply_pii_policy(
        splits_of([Note("I am Dana Whitfield, dana@example.com")]), Config("redact"), "data"
    )
    assert [n.body for n in splits.train] == ["I am <PERSON>, <EMAIL>"]
    assert [f.masked for f in scan.findings] == ["D*** W***", "d***@***.com"]
    assert "PERSON" not in splits.details["pii"]["not_detected"]


def test_scan_counts_records_and_fields(scanner):
    samples = {"train": [Note("a@example.com and b@example.com"), Note("clean")], "validation": [Note("clean")]}
    _, scan = scan_samples(samples, scanner)
    assert scan.records == 3 and scan.records_with_findings == 1 and scan.counts["EMAIL"] == 2


def test_the_protocol_is_what_the_policy_checks():
    assert isinstance(Note("x"), TextFields)
    assert not isinstance(object(), TextFields)


def test_data_pii_is_validated_with_the_key_named():
    from polyadapt.config import DataConfig

    assert DataConfig(path=".").pii == "report"
    with pytest.raises(ValueError, match="pii"):
        DataConfig(path=".", pii="scrub")


def test_report_words_name_policy_and_counts():
    from polyadapt.report import pii_words

    record = {
        "policy": "redact",
        "scanned": True,
        "records": 16,
        "counts": {"EMAIL": 3, "PHONE": 0},
        "total": 3,
        "redacted": True,
        "not_detected": {"PERSON": "no spaCy"},
    }
    words = pii_words(record)
    assert words.startswith("EMAIL 3 in 16 records (data.pii: redact): redacted")
    assert "PHONE" not in words and "not detected: PERSON" in words
