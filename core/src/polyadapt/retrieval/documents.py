"""Reading a document folder: Markdown, plain text, HTML and JSONL, each checked before anything is indexed.

Every problem is collected first and raised together (:class:`polyadapt.errors.DataError`), the way ``doctor`` lists
them: an unreadable, empty, binary or oversized file, a bad JSONL line, or a folder with no documents at all.

Spans are character offsets into :attr:`Document.text`: for Markdown and plain text that is the file's decoded text
exactly (no newline translation), for HTML the visible text the parser extracts, for JSONL the record's ``text``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import DataError

#: the largest document read; bigger files are reported, not indexed (split them, or raise the limit)
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
MARKDOWN = (".md", ".markdown")
TEXT = (".txt", ".text")
HTML = (".html", ".htm")
JSONL = (".jsonl",)
SUFFIXES = MARKDOWN + TEXT + HTML + JSONL
_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass(frozen=True)
class DocumentProblem:
    """A file that cannot be indexed, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Document:
    """One document: ``source`` is its path relative to the folder (POSIX), ``headings`` the (offset, level, title)
    of each heading in ``text`` (level 1 for ``#`` and ``<h1>``). A JSONL file gives one document per record, all with the file as ``source``, the record's
    ``id`` as ``record`` and its ``title`` (not part of ``text``) as ``title``."""

    source: str
    text: str
    headings: tuple[tuple[int, int, str], ...] = ()
    record: str | None = None
    title: str | None = None


@dataclass
class Corpus:
    """The documents of a folder and the sha256 of every file they came from."""

    root: Path
    documents: list[Document] = field(default_factory=list)
    fingerprints: dict[str, dict[str, int | str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """One digest over every file's path and sha256."""
        payload = json.dumps({k: v["sha256"] for k, v in sorted(self.fingerprints.items())}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def read_documents(root: str | Path, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> Corpus:
    """Read every supported file under ``root`` (hidden files and folders are left out); raise
    :class:`DataError` listing every problem at once."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory of documents")
    corpus = Corpus(root=root)
    problems: list[DocumentProblem] = []
    for path in sorted(p for p in root.rglob("*") if not _hidden(p.relative_to(root))):
        if path.is_dir():
            continue
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() not in SUFFIXES:
            corpus.skipped.append(relative)
            continue
        found = _read_one(path, relative, max_bytes, problems)
        if found is None:
            continue
        data, documents = found
        corpus.fingerprints[relative] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        corpus.documents.extend(documents)
    if problems:
        raise DataError(f"{root}: {len(problems)} document(s) cannot be indexed", problems)
    if not corpus.documents:
        kinds = ", ".join(SUFFIXES)
        raise DataError(f"{root}: no documents to index (looked for {kinds})")
    return corpus


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_one(
    path: Path, relative: str, max_bytes: int, problems: list[DocumentProblem]
) -> tuple[bytes, list[Document]] | None:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            problems.append(DocumentProblem(relative, f"oversized: {size} bytes (the limit is {max_bytes})"))
            return None
        data = path.read_bytes()
    except OSError as exc:
        problems.append(DocumentProblem(relative, f"unreadable: {exc.strerror or exc}"))
        return None
    if b"\x00" in data[:8192]:
        problems.append(DocumentProblem(relative, "binary: it contains NUL bytes"))
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append(DocumentProblem(relative, f"binary or not UTF-8: undecodable byte at offset {exc.start}"))
        return None
    if not text.strip():
        problems.append(DocumentProblem(relative, "empty: no text"))
        return None
    suffix = path.suffix.lower()
    if suffix in MARKDOWN:
        return data, [Document(relative, text, markdown_headings(text))]
    if suffix in HTML:
        body, headings = html_text(text)
        if not body.strip():
            problems.append(DocumentProblem(relative, "empty: the HTML has no visible text"))
            return None
        return data, [Document(relative, body, headings)]
    if suffix in JSONL:
        documents = _jsonl_documents(text, relative, problems)
        return (data, documents) if documents is not None else None
    return data, [Document(relative, text)]


def markdown_headings(text: str) -> tuple[tuple[int, int, str], ...]:
    """The (offset of the line, level, title) of every ATX heading (``## Title``), skipping fenced code blocks."""
    found: list[tuple[int, int, str]] = []
    offset = 0
    fenced = False
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        if _FENCE.match(bare):
            fenced = not fenced
        elif not fenced:
            match = _ATX.match(bare)
            if match and match.group(2).strip():
                found.append((offset, len(match.group(1)), match.group(2).strip()))
        offset += len(line)
    return tuple(found)


class _TextExtractor(HTMLParser):
    BLOCKS = {
        "p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "blockquote",
        "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "hr",
    }  # fmt: skip
    HIDDEN = {"script", "style", "head", "title", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.headings: list[tuple[int, int, str]] = []
        self._hidden = 0
        self._heading: list[str] | None = None

    def _add(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def _break(self) -> None:
        if self.parts and not self.parts[-1].endswith("\n"):
            self._add("\n")

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self._hidden += 1
        elif tag in self.BLOCKS:
            self._break()
            if re.fullmatch(r"h[1-6]", tag):
                self._heading = []
                self.headings.append((self.length, int(tag[1]), ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.BLOCKS:
            if re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
                offset, level, _ = self.headings[-1]
                title = " ".join("".join(self._heading).split())
                if title:
                    self.headings[-1] = (offset, level, title)
                else:
                    self.headings.pop()
                self._heading = None
            self._break()

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip() and (not self.parts or self.parts[-1].endswith((" ", "\n"))):
            return
        if self._heading is not None:
            self._heading.append(text)
        self._add(text)


def html_text(source: str) -> tuple[str, tuple[tuple[int, int, str], ...]]:
    """The visible text of an HTML page (block elements on their own lines) and its h1-h6 headings with their
    offsets in that text."""
    parser = _TextExtractor()
    parser.feed(source)
    parser.close()
    return "".join(parser.parts), tuple(parser.headings)


def _jsonl_documents(text: str, relative: str, problems: list[DocumentProblem]) -> list[Document] | None:
    documents: list[Document] = []
    bad = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            problems.append(DocumentProblem(f"{relative}:{number}", f"not JSON ({exc.msg})"))
            bad = True
            continue
        body = record.get("text") if isinstance(record, dict) else None
        if not isinstance(body, str) or not body.strip():
            problems.append(DocumentProblem(f"{relative}:{number}", "expected an object with a non-empty 'text'"))
            bad = True
            continue
        title = record.get("title")
        ident = record.get("id", number)
        documents.append(Document(relative, body, record=str(ident), title=str(title) if title else None))
    if bad:
        return None
    if not documents:
        problems.append(DocumentProblem(relative, "empty: no records"))
        return None
    return documents
