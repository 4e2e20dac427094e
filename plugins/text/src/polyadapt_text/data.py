"""Reading and validating text datasets: JSONL files in three formats, the directory layout, duplicates and leakage.

Formats, detected per file from the first record that is a JSON object (or forced with ``text.format``)::

    {"text": "..."}                                         continued pretraining
    {"prompt": "...", "completion": "..."}                  instruction tuning
    {"messages": [{"role": "user", "content": "..."}, ...]} chat, rendered with the tokenizer's chat template
    {"prompt": ..., "chosen": ..., "rejected": ...}         preference pairs (:mod:`polyadapt_text.preference`)

Every record may also carry ``"answer_contains": ["fact", ...]`` (for fact accuracy) and an ``"id"``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from polyadapt.data import HELDOUT_SPLITS, Problem
from polyadapt.data import read_jsonl as read_records
from polyadapt.modality import DataFound

FORMATS = ("text", "prompt_completion", "chat", "preference")
ROLES = ("system", "user", "assistant")
OPTIONAL_KEYS = ("answer_contains", "id")
REQUIRED_KEYS = {
    "text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
}  # fmt: skip
#: the file of each split in a dataset directory
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
#: what a dataset directory holds (the message when it holds none)
LAYOUT = "train.jsonl with validation.jsonl or test.jsonl, any of them alone, or one JSONL file"
LEAKAGE_SHOWN = 20


@dataclass(frozen=True)
class TextSample:
    """One validated record. ``messages`` is a tuple of ``(role, content)`` pairs for chat records."""

    format: str
    source: str
    line: int
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    answer_contains: tuple[str, ...] = ()
    id: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def content(self) -> str:
        """All the record's text, in order, for duplicate and leakage checks."""
        if self.format == "text":
            return self.text
        if self.format == "prompt_completion":
            return f"{self.prompt}\n{self.completion}"
        return "\n".join(f"{role}: {content}" for role, content in self.messages)

    # -- polyadapt.pii.TextFields: what ``data.pii`` scans and redacts --------------------------------------------
    def text_fields(self) -> dict[str, str]:
        """Every string of the record, by field name; ``answer_contains`` too, so a redacted answer still matches."""
        if self.format == "text":
            fields = {"text": self.text}
        elif self.format == "prompt_completion":
            fields = {"prompt": self.prompt, "completion": self.completion}
        else:
            fields = {f"messages[{i}].content": content for i, (_, content) in enumerate(self.messages)}
        fields.update({f"answer_contains[{i}]": answer for i, answer in enumerate(self.answer_contains)})
        return fields

    def with_text_fields(self, fields: dict[str, str]) -> TextSample:
        """A copy with the fields :meth:`text_fields` names replaced."""
        changes: dict[str, Any] = {k: fields[k] for k in ("text", "prompt", "completion") if k in fields}
        if self.messages:
            changes["messages"] = tuple(
                (role, fields.get(f"messages[{i}].content", content)) for i, (role, content) in enumerate(self.messages)
            )
        if self.answer_contains:
            changes["answer_contains"] = tuple(
                fields.get(f"answer_contains[{i}]", answer) for i, answer in enumerate(self.answer_contains)
            )
        return replace(self, **changes)

    def text_location(self) -> tuple[str, int | None]:
        return self.source, self.line


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: two texts equal after this are near-duplicates."""
    return _SPACE.sub(" ", _PUNCTUATION.sub(" ", text.lower())).strip()


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys indicate, or None."""
    if "messages" in record:
        return "chat"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _nonempty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def parse_record(record: dict[str, Any], fmt: str, source: str, line: int) -> tuple[TextSample | None, str | None]:
    """Validate one JSON object against ``fmt``: the sample, or the reason it is bad."""
    if fmt == "preference":
        from .preference import parse_pair

        return parse_pair(record, source, line)  # type: ignore[return-value]
    allowed = REQUIRED_KEYS[fmt] + OPTIONAL_KEYS
    missing = [k for k in REQUIRED_KEYS[fmt] if k not in record]
    if missing:
        return None, f"missing key {missing[0]!r} (format {fmt}: keys {', '.join(REQUIRED_KEYS[fmt])})"
    unknown = [k for k in record if k not in allowed]
    if unknown:
        return None, f"unknown key {unknown[0]!r} (format {fmt} allows {', '.join(allowed)})"
    answers = record.get("answer_contains", [])
    if not isinstance(answers, list) or not all(_nonempty_string(a) for a in answers):
        return None, "'answer_contains' must be a list of non-empty strings"
    ident = record.get("id")
    if ident is not None and not isinstance(ident, (str, int)):
        return None, "'id' must be a string or a number"
    common = {
        "source": source,
        "line": line,
        "answer_contains": tuple(answers),
        "id": None if ident is None else str(ident),
    }
    if fmt == "text":
        if not isinstance(record["text"], str):
            return None, f"'text' must be a string, got {type(record['text']).__name__}"
        if not record["text"].strip():
            return None, "empty content in 'text'"
        return TextSample(format=fmt, text=record["text"], **common), None
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                return None, f"{key!r} must be a string, got {type(record[key]).__name__}"
            if not record[key].strip():
                return None, f"empty content in {key!r}"
        return TextSample(format=fmt, prompt=record["prompt"], completion=record["completion"], **common), None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return None, "'messages' must be a non-empty list of {role, content} objects"
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return None, f"messages[{i}] must be an object with 'role' and 'content'"
        extra = [k for k in message if k not in ("role", "content")]
        if extra:
            return None, f"messages[{i}]: unknown key {extra[0]!r} (allowed: role, content)"
        if "role" not in message or "content" not in message:
            return None, f"messages[{i}]: missing key {'role' if 'role' not in message else 'content'!r}"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return None, f"messages[{i}]: unknown role {role!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return None, f"messages[{i}]: 'content' must be a string, got {type(content).__name__}"
        if not content.strip():
            return None, f"messages[{i}]: empty content"
        pairs.append((role, content))
    if not any(role == "assistant" for role, _ in pairs):
        return None, "'messages' has no assistant message to learn from"
    if pairs[0][0] == "assistant":
        return None, "'messages' must start with a system or user message"
    late_system = next((i for i, (role, _) in enumerate(pairs) if role == "system" and i > 0), None)
    if late_system is not None:
        return None, f"messages[{late_system}]: a system message may only come first"
    return TextSample(format=fmt, messages=tuple(pairs), **common), None


def read_jsonl(path: Path, fmt: str = "auto") -> tuple[list[TextSample], list[Problem], str | None]:
    """Read one JSONL file. ``fmt='auto'`` detects the format from the first JSON object in the file.

    :return: the good samples, a problem per bad line, and the format used (None if none could be decided).
    """
    source = str(path)
    decoded, problems = read_records(path, source)
    chosen = None if fmt == "auto" else fmt
    detected_at = None
    if chosen is None:
        for number, record in decoded:
            if found := detect_format(record):
                chosen, detected_at = found, number
                break
    samples: list[TextSample] = []
    for number, record in decoded:
        if chosen is None:
            keys = ", ".join(sorted(record))
            problems.append(
                Problem(
                    source,
                    f"cannot tell the format from keys [{keys}]: expected text, prompt+completion, messages or prompt+chosen+rejected",
                    number,
                )
            )
            continue
        sample, reason = parse_record(record, chosen, source, number)
        if sample is None:
            if detected_at is not None and detect_format(record) not in (None, chosen):
                reason += (
                    f"; the file's format is {chosen} (detected at line {detected_at}), set text.format to override"
                )
            problems.append(Problem(source, reason, number))
        else:
            samples.append(sample)
    problems.sort(key=lambda p: p.line or 0)
    return samples, problems, chosen


def deduplicate(samples: Sequence[TextSample]) -> tuple[list[TextSample], dict[str, int], list[str]]:
    """Drop exact duplicates (same content) and near-duplicates (same normalised content), keeping the first.

    :return: kept samples, counts by reason, and one line per dropped sample naming the one it repeats.
    """
    kept: list[TextSample] = []
    exact: dict[str, TextSample] = {}
    near: dict[str, TextSample] = {}
    counts = {"exact_duplicate": 0, "near_duplicate": 0}
    notes: list[str] = []
    for sample in samples:
        content = sample.content()
        key = normalise(content)
        if content in exact:
            counts["exact_duplicate"] += 1
            notes.append(f"{sample.where}: exact duplicate of {exact[content].where}")
        elif key in near:
            counts["near_duplicate"] += 1
            notes.append(f"{sample.where}: near-duplicate of {near[key].where}")
        else:
            exact[content] = sample
            near[key] = sample
            kept.append(sample)
    return kept, {k: v for k, v in counts.items() if v}, notes


def find_leakage(train: Sequence[TextSample], validation: Sequence[TextSample]) -> list[tuple[str, str]]:
    """Held-out records whose normalised content also appears in train: ``(validation place, train place)``."""
    seen = {}
    for sample in train:
        seen.setdefault(normalise(sample.content()), sample.where)
    return [(s.where, seen[k]) for s in validation if (k := normalise(s.content())) in seen]


def read_text_dataset(path: Path, fmt: str = "auto", drop_duplicates: bool = True) -> DataFound:
    """Read a dataset directory (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``: the ones present) or a single
    JSONL file (the train split).

    Only the splits found are returned; polyadapt chooses the held-out one. Duplicates are dropped from train, and
    held-out records that also appear in train are reported as leakage.
    """
    path = Path(path)
    if path.is_file():
        present = {"train": path}
    elif path.is_dir():
        present = {split: path / name for split, name in SPLIT_FILES.items() if (path / name).is_file()}
    else:
        present = {}
    details: dict[str, Any] = {}
    warnings: list[str] = []
    problems: list[Problem] = []
    formats: dict[str, str | None] = {}
    splits: dict[str, list[TextSample]] = {}
    for split, file in present.items():
        samples, bad, used = read_jsonl(file, fmt)
        formats[file.name] = used
        problems.extend(Problem(p.file, p.reason, p.line, split) for p in bad)
        splits[split] = samples
    if formats:
        details["formats"] = formats
    if "validation" in splits and "test" in splits:
        warnings.append(
            f"both {SPLIT_FILES['validation']} and {SPLIT_FILES['test']} exist; the validation split is held out"
        )

    dropped: dict[str, int] = {}
    if drop_duplicates and "train" in splits:
        splits["train"], dropped, notes = deduplicate(splits["train"])
        if notes:
            warnings.append(f"dropped {len(notes)} duplicate training record(s), first: {notes[0]}")
            details["duplicates"] = notes[:LEAKAGE_SHOWN]

    train = splits.get("train", [])
    leaks = [pair for split in HELDOUT_SPLITS if split in splits for pair in find_leakage(train, splits[split])]
    if leaks:
        shown = "; ".join(f"{v} = {t}" for v, t in leaks[:3])
        warnings.append(f"{len(leaks)} held-out record(s) also appear in train (leakage): {shown}")
        details["leakage"] = {"count": len(leaks), "pairs": [list(p) for p in leaks[:LEAKAGE_SHOWN]]}
    return DataFound(
        splits=splits,
        files=list(present.values()),
        problems=problems,
        dropped=dropped,
        warnings=warnings,
        details=details,
    )
