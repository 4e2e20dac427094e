"""Personal data in the text of every modality's samples (``data.pii``): found, reported masked, or redacted.

What is found, and by what (Presidio's recognizers, called directly: no ``AnalyzerEngine``, whose default NLP engine
would load or download a spaCy model)::

    EMAIL        EmailRecognizer; its domain check uses tldextract's bundled suffix list, never fetched
    PHONE        PhoneRecognizer (phonenumbers, regions US GB DE FR IL IN CA BR), with 7 to 15 digits (E.164's
                 limit); a bare digit run counts only after a phone word ("call", "phone", "mobile"...), so an
                 order number is not a phone
    CARD         CreditCardRecognizer, then python-stdnum's Luhn check
    IBAN         IbanRecognizer, then python-stdnum's IBAN checksum
    NATIONAL_ID  UsSsnRecognizer (then stdnum.us.ssn) and UkNinoRecognizer (Presidio's pattern: stdnum has no NINO)
    PERSON       SpacyRecognizer, only when a spaCy English pipeline is installed locally (never downloaded);
                 without one, names are not detected and the scan says so

A sample takes part by implementing :class:`TextFields` (its free text by field name, a copy with fields replaced,
and the file and line it came from); the modality decides nothing else. The policy:

- ``report`` (default): findings are listed by file, line, field and type with the value masked
  (``j***@***.com``, a card's last four digits), never in full; training proceeds on the data as written.
- ``redact``: the run trains on in-memory copies in which each value is replaced by a typed placeholder
  (:data:`PLACEHOLDERS`); the user's files are only read, never written.
- ``fail``: a :class:`polyadapt.errors.DataError` listing every finding (the CLI exits 2).

Held-out data is scanned and redacted in the same way as train: the adapted model is scored on what it was trained to
write (a held-out answer that names a phone number then expects ``<PHONE>``), so the metrics before and after stay
comparable. What a run found is recorded in the manifest under ``data.details.pii`` (counts per type, the policy, the
first findings, masked).
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from .config import AdaptConfig
    from .modality import DatasetSplits

PII_POLICIES = ("report", "redact", "fail")
#: what ``redact`` writes in place of a value of each type
PLACEHOLDERS = {
    "EMAIL": "<EMAIL>",
    "PHONE": "<PHONE>",
    "CARD": "<CARD>",
    "IBAN": "<IBAN>",
    "NATIONAL_ID": "<NATIONAL_ID>",
    "PERSON": "<PERSON>",
}
PII_TYPES = tuple(PLACEHOLDERS)
#: Presidio's entity names -> polyadapt's types
ENTITY_TYPES = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "US_SSN": "NATIONAL_ID",
    "UK_NINO": "NATIONAL_ID",
    "PERSON": "PERSON",
}
#: spaCy English pipelines used for names when one is installed, most accurate first; never downloaded
SPACY_MODELS = ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm")
#: Presidio's "very weak" patterns (any 9-digit number as an SSN) score 0.05; without an NLP engine nothing raises
#: them from context, so they would only add false positives
MIN_SCORE = 0.3
#: words that make a bare digit run (no "+", space or dash) a phone number when they come just before it
PHONE_WORDS = re.compile(
    r"\b(phone|telephone|tel|call|mobile|cell|cellphone|fax|whatsapp|ring|text me|reach me|my number)\b", re.I
)
PHONE_CONTEXT_CHARS = 40
#: digits a phone number has: a subscriber number with its area code at least, E.164's 15 at most
PHONE_DIGITS = (7, 15)
#: findings kept in the manifest (the counts cover all of them)
RECORDED_FINDINGS = 50
SHOWN_FINDINGS = 20


@runtime_checkable
class TextFields(Protocol):
    """What a sample implements for ``data.pii`` to scan it: text records, speech transcripts, image captions."""

    def text_fields(self) -> dict[str, str]:
        """The sample's free text that may hold personal data, by field name (``"messages[1].content"``,
        ``"transcription"``, ``"caption"``). Labels a metric compares with the output (``answer_contains``) belong
        here too, so that redaction keeps them consistent with the text."""
        ...

    def with_text_fields(self, fields: dict[str, str]) -> Any:
        """A copy of the sample with the named fields replaced (the others unchanged)."""
        ...

    def text_location(self) -> tuple[str, int | None]:
        """The file the sample was read from, as the user named it, and its line there (None when it has none)."""
        ...


@dataclass(frozen=True)
class Span:
    """One value found in a text: its type, offsets, Presidio's score and the recognizer that found it."""

    type: str
    start: int
    end: int
    score: float
    recognizer: str


@dataclass(frozen=True)
class Finding:
    """One value found in a sample, as reported: where, in which field, its type and the value masked."""

    file: str
    line: int | None
    field: str
    type: str
    masked: str
    split: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.type} {self.masked} in {self.field}"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# -- availability ---------------------------------------------------------------------------------------------------


@lru_cache
def missing_libraries() -> tuple[str, ...]:
    """The libraries ``data.pii`` needs that are not installed (``pip install 'polyadapt[pii]'``)."""
    needed = {
        "presidio_analyzer": "presidio-analyzer",
        "presidio_anonymizer": "presidio-anonymizer",
        "stdnum": "python-stdnum",
        "phonenumbers": "phonenumbers",
        "tldextract": "tldextract",
    }
    return tuple(dist for module, dist in needed.items() if importlib.util.find_spec(module) is None)


@lru_cache
def spacy_english_model() -> str | None:
    """The name of an installed spaCy English pipeline for names (:data:`SPACY_MODELS`), or None. Only installed
    packages count: nothing is downloaded."""
    if importlib.util.find_spec("spacy") is None:
        return None
    import spacy.util

    return next((name for name in SPACY_MODELS if spacy.util.is_package(name)), None)


def names_unavailable_reason() -> str:
    return f"no spaCy English pipeline is installed locally ({', '.join(SPACY_MODELS)}; none is downloaded)"


# -- finding and redacting -----------------------------------------------------------------------------------------


class PiiScanner:
    """Finds personal data in a text with Presidio's recognizers, validated with python-stdnum, and redacts it with
    Presidio's anonymizer.

    :param allow: values that are not personal data (an organisation's own support line): never reported or redacted.
        Compared ignoring case, spaces and punctuation.
    :param names_model: a spaCy pipeline (an installed package name or a directory) whose ``PERSON`` entities are
        names; None: names are not detected.
    """

    def __init__(self, allow: Sequence[str] = (), names_model: str | None = None) -> None:
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            PhoneRecognizer,
            UkNinoRecognizer,
            UsSsnRecognizer,
        )

        class OfflineEmailRecognizer(EmailRecognizer):
            # Presidio's check calls tldextract's default extractor, which fetches the public suffix list.
            def validate_result(self, pattern_text: str) -> bool:
                return _suffix_extractor()(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

        self.recognizers = [
            OfflineEmailRecognizer(),
            PhoneRecognizer(),
            CreditCardRecognizer(),
            IbanRecognizer(),
            UsSsnRecognizer(),
            UkNinoRecognizer(),
        ]
        self.allow = {_compact(value) for value in allow}
        self.nlp_engine = None
        self.names_model = names_model
        if names_model is not None:
            from presidio_analyzer.nlp_engine import SpacyNlpEngine
            from presidio_analyzer.predefined_recognizers import SpacyRecognizer

            # SpacyNlpEngine downloads a model it cannot find; names_model is an installed package or a directory.
            self.nlp_engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": names_model}])
            self.nlp_engine.load()
            self.recognizers.append(SpacyRecognizer(supported_entities=["PERSON"]))

    @property
    def types(self) -> tuple[str, ...]:
        """The types this scanner detects."""
        return tuple(t for t in PII_TYPES if t != "PERSON" or self.nlp_engine is not None)

    def find(self, text: str) -> list[Span]:
        """Every validated value in ``text``, non-overlapping (the higher score, then the longer span, wins), in
        order."""
        artifacts = self.nlp_engine.process_text(text, "en") if self.nlp_engine is not None else None
        candidates: list[Span] = []
        for recognizer in self.recognizers:
            for result in recognizer.analyze(text, recognizer.supported_entities, artifacts):
                kind = ENTITY_TYPES.get(result.entity_type)
                value = text[result.start : result.end]
                if kind is None or result.score < MIN_SCORE or _compact(value) in self.allow:
                    continue
                if _valid(kind, result.entity_type, value, text, result.start):
                    candidates.append(Span(kind, result.start, result.end, result.score, recognizer.name))
        kept: list[Span] = []
        for span in sorted(candidates, key=lambda s: (-s.score, -(s.end - s.start), s.start)):
            if all(span.end <= other.start or span.start >= other.end for other in kept):
                kept.append(span)
        return sorted(kept, key=lambda s: s.start)

    def redact(self, text: str, spans: Sequence[Span]) -> str:
        """``text`` with each span replaced by its type's placeholder (Presidio's anonymizer, ``replace``)."""
        if not spans:
            return text
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        results = [RecognizerResult(s.type, s.start, s.end, s.score) for s in spans]
        operators = {t: OperatorConfig("replace", {"new_value": p}) for t, p in PLACEHOLDERS.items()}
        return _anonymizer(AnonymizerEngine).anonymize(text, results, operators).text


@lru_cache
def _anonymizer(engine: type) -> Any:
    return engine()


@lru_cache
def _suffix_extractor() -> Any:
    import tldextract

    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


@lru_cache(maxsize=8)
def make_scanner(allow: tuple[str, ...] = (), names_model: str | None = None) -> PiiScanner:
    """A scanner, made once per settings (loading the recognizers and a spaCy pipeline takes seconds)."""
    return PiiScanner(allow, names_model)


def _compact(value: str) -> str:
    return re.sub(r"[\W_]+", "", value).lower()


def _valid(kind: str, entity: str, value: str, text: str, start: int) -> bool:
    """python-stdnum's checksum on top of Presidio's, and the phone rules that keep plain numbers out."""
    from stdnum import iban, luhn
    from stdnum.us import ssn

    digits = re.sub(r"\D", "", value)
    if kind == "CARD":
        return 13 <= len(digits) <= 19 and luhn.is_valid(digits)
    if kind == "IBAN":
        return iban.is_valid(value)
    if entity == "US_SSN":
        return ssn.is_valid(digits)
    if kind == "PHONE":
        if not PHONE_DIGITS[0] <= len(digits) <= PHONE_DIGITS[1]:
            return False  # a page range, or a card number failing Luhn
        if re.fullmatch(r"\d{3}-\d{2}-\d{4}", value.strip()):
            return False  # the SSN layout; an invalid SSN is not a phone either
        if re.fullmatch(r"\d+", value.strip()):
            return bool(PHONE_WORDS.search(text[max(0, start - PHONE_CONTEXT_CHARS) : start]))
    return True


def mask(kind: str, value: str) -> str:
    """``value`` with enough hidden that it cannot be read back: an e-mail keeps its first letter and top-level
    domain (``j***@***.com``), a card and an IBAN their last four characters (an IBAN also its country), a name its
    initials, anything else its last two characters."""
    value = value.strip()
    if kind == "EMAIL" and "@" in value:
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}***@***.{domain.rsplit('.', 1)[-1]}"
    if kind == "PERSON":
        return " ".join(f"{word[:1]}***" for word in value.split())
    compact = re.sub(r"[\W_]+", "", value)
    if kind == "IBAN":
        return f"{compact[:2]}{'*' * max(0, len(compact) - 6)}{compact[-4:]}"
    keep = 4 if kind == "CARD" else 2
    return "*" * max(0, len(compact) - keep) + compact[-keep:]


# -- the policy -----------------------------------------------------------------------------------------------------


@dataclass
class PiiScan:
    """What a scan of a dataset found, and what the policy did with it."""

    policy: str
    findings: list[Finding] = field(default_factory=list)
    records: int = 0
    records_with_findings: int = 0
    types: tuple[str, ...] = ()
    not_detected: dict[str, str] = field(default_factory=dict)
    #: why nothing was scanned (None when the data was scanned)
    unscanned: str | None = None
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        """Findings per type, every detected type present (zero when none was found)."""
        found = Counter(f.type for f in self.findings)
        return {t: found.get(t, 0) for t in (self.types or PII_TYPES)}

    @property
    def redacted(self) -> bool:
        return self.policy == "redact" and bool(self.findings)

    def as_record(self) -> dict[str, Any]:
        """The manifest's ``data.details.pii``: policy, counts per type, the first findings (masked)."""
        record: dict[str, Any] = {"policy": self.policy}
        if self.unscanned is not None:
            return {**record, "scanned": False, "reason": self.unscanned}
        record.update(
            scanned=True,
            records=self.records,
            records_with_findings=self.records_with_findings,
            counts=self.counts,
            total=len(self.findings),
            redacted=self.redacted,
            placeholders={t: PLACEHOLDERS[t] for t in self.types},
            not_detected=dict(self.not_detected),
            findings=[f.as_dict() for f in self.findings[:RECORDED_FINDINGS]],
        )
        return record

    def summary(self) -> list[str]:
        """Lines for ``doctor``: the counts, the first findings (masked; under ``fail`` they are the error's, not
        these lines), what is not detected."""
        if self.unscanned is not None:
            return [f"personal data (data.pii: {self.policy}): not scanned: {self.unscanned}"]
        counts = ", ".join(f"{t} {n}" for t, n in self.counts.items() if n) or "none"
        done = {
            "report": "",
            "redact": "; adapt trains on copies with typed placeholders (the files are not changed)",
            "fail": "; adapt refuses this data",
        }[self.policy]
        lines = [
            f"personal data (data.pii: {self.policy}): {len(self.findings)} finding(s) in "
            f"{self.records_with_findings} of {self.records} record(s): {counts}{done if self.findings else ''}"
        ]
        if self.policy == "fail":
            return lines + [f"personal data: {t} is not detected: {why}" for t, why in self.not_detected.items()]
        lines += [f"  {f}" for f in self.findings[:SHOWN_FINDINGS]]  # under fail, the error lists every one
        if len(self.findings) > SHOWN_FINDINGS:
            lines.append(f"  ... and {len(self.findings) - SHOWN_FINDINGS} more")
        lines += [f"personal data: {t} is not detected: {why}" for t, why in self.not_detected.items()]
        return lines

    def problems(self) -> list[Any]:
        """The findings as :class:`polyadapt.data.Problem` (how ``doctor`` lists them under ``fail``)."""
        from .data import Problem

        return [
            Problem(f.file, f"personal data (data.pii: fail): {f.type} {f.masked} in {f.field}", f.line, f.split)
            for f in self.findings
        ]


def scan_samples(
    splits: dict[str, Sequence[Any]], scanner: PiiScanner, redact: bool = False
) -> tuple[dict[str, list[Any]], PiiScan]:
    """Scan every sample of ``splits`` (split name -> samples implementing :class:`TextFields`); with ``redact``,
    return copies of the samples with placeholders (the others are returned as they are)."""
    started = time.perf_counter()
    scan = PiiScan(policy="redact" if redact else "report", types=scanner.types)
    out: dict[str, list[Any]] = {}
    for split, samples in splits.items():
        kept = []
        for sample in samples:
            scan.records += 1
            file, line = sample.text_location()
            found_before = len(scan.findings)
            replaced: dict[str, str] = {}
            for name, text in sample.text_fields().items():
                spans = scanner.find(text)
                scan.findings += [
                    Finding(file, line, name, s.type, mask(s.type, text[s.start : s.end]), split) for s in spans
                ]
                if spans and redact:
                    replaced[name] = scanner.redact(text, spans)
            scan.records_with_findings += len(scan.findings) > found_before
            kept.append(sample.with_text_fields(replaced) if replaced else sample)
        out[split] = kept
    scan.seconds = time.perf_counter() - started
    return out, scan


def apply_pii_policy(
    splits: DatasetSplits, config: AdaptConfig, where: str, raise_on_fail: bool = True
) -> tuple[DatasetSplits, PiiScan]:
    """Apply ``data.pii`` to the dataset as the run uses it (train and the held-out split).

    ``report`` returns the splits unchanged, ``redact`` returns copies whose samples carry placeholders, ``fail`` raises
    a :class:`DataError` listing every finding (unless ``raise_on_fail`` is False: ``doctor`` lists them as problems).
    The scan's record is added to ``splits.details["pii"]`` and, when something is found under ``report``, a warning.
    Samples that do not implement :class:`TextFields` are not scanned (said in the record).
    """
    policy = config.data.pii
    samples = [*splits.train, *splits.validation]
    missing = missing_libraries()
    if missing:
        if policy != "report":
            raise ConfigError(
                f"data.pii: {policy!r} needs {', '.join(missing)} (pip install 'polyadapt[pii]'), which is not installed"
            )
        scan = PiiScan(policy=policy, unscanned=f"{', '.join(missing)} not installed (pip install 'polyadapt[pii]')")
    elif samples and not all(isinstance(s, TextFields) for s in samples):
        scan = PiiScan(policy=policy, unscanned="this modality's samples expose no text fields")
    else:
        names_model = spacy_english_model()
        scanner = make_scanner(tuple(config.data.pii_allow), names_model)
        redacted, scan = scan_samples(
            {"train": splits.train, "validation": splits.validation}, scanner, redact=policy == "redact"
        )
        scan.policy = policy
        if names_model is None:
            scan.not_detected["PERSON"] = names_unavailable_reason()
        if policy == "redact":
            splits = replace(splits, train=redacted["train"], validation=redacted["validation"])
    splits = replace(splits, details={**splits.details, "pii": scan.as_record()}, warnings=list(splits.warnings))
    if scan.findings and policy == "fail" and raise_on_fail:
        raise DataError(
            f"{len(scan.findings)} personal-data finding(s) in {where} (data.pii: fail; set data.pii: redact to train "
            "on redacted copies, or list values that are not personal data in data.pii_allow)",
            [str(f) for f in scan.findings],
        )
    if scan.findings and policy == "report":
        counts = ", ".join(f"{t} {n}" for t, n in scan.counts.items() if n)
        splits.warnings.append(
            f"personal data found in {where}: {counts} (data.pii: report; `polyadapt doctor` lists them, "
            "data.pii: redact trains on redacted copies)"
        )
    return splits, scan


__all__ = [
    "PII_POLICIES",
    "PLACEHOLDERS",
    "Finding",
    "PiiScan",
    "PiiScanner",
    "TextFields",
    "apply_pii_policy",
    "mask",
    "scan_samples",
]
