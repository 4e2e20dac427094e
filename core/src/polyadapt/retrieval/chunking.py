"""Documents into chunks of at most ``chunk_tokens`` of the embedding model's tokens, ``overlap`` tokens shared by
neighbours. A chunk never crosses a heading: each section (a heading to the next) is windowed on its own, so a
chunk's heading is the nearest heading above all of its text, and its citation names the section that holds it.

A chunk also keeps its ``context``, the path of headings it sits under (``TideSaver savings > Withdrawals``), because
a section often never names its subject ("Each month includes 6 free withdrawals"): BM25 and the embedder see the
context before the text (:attr:`Chunk.search_text`), while ``text`` stays the exact span of the source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .documents import Document

_SLUG_DROP = re.compile(r"[^\w\s-]")
_SLUG_SPACE = re.compile(r"[\s_-]+")


@dataclass(frozen=True)
class Chunk:
    """A span ``[start, end)`` of a document's text (``text`` is exactly that slice), with its source and heading."""

    chunk_id: str
    source: str
    heading: str | None
    start: int
    end: int
    text: str
    record: str | None = None
    context: str = ""

    @property
    def search_text(self) -> str:
        """What BM25 and the embedder index: the heading path, then the text."""
        return f"{self.context}\n{self.text}" if self.context else self.text

    def as_dict(self) -> dict[str, Any]:
        found = {
            "chunk_id": self.chunk_id, "source": self.source, "heading": self.heading, "start": self.start,
            "end": self.end, "text": self.text,
        }  # fmt: skip
        if self.record is not None:
            found["record"] = self.record
        if self.context:
            found["context"] = self.context
        return found

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chunk:
        return cls(
            chunk_id=data["chunk_id"], source=data["source"], heading=data.get("heading"), start=int(data["start"]),
            end=int(data["end"]), text=data["text"], record=data.get("record"), context=data.get("context", ""),
        )  # fmt: skip


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return _SLUG_SPACE.sub("-", _SLUG_DROP.sub("", heading.lower()).strip()).strip("-")


def citation(source: str, heading: str | None) -> str:
    """``fees.md#overdraft``, or the source alone when the chunk has no heading."""
    anchor = slug(heading) if heading else ""
    return f"{source}#{anchor}" if anchor else source


def sections(document: Document) -> list[tuple[int, int, str | None, str]]:
    """The (start, end, heading, context) of the text before the first heading (headed by the document's title, if
    any) and of each heading's section; ``context`` is the path of headings down to the section's own, joined by
    ``" > "``. A heading followed directly by another heading holds nothing and is left out."""
    text = document.text
    bounds = [(offset, level, title) for offset, level, title in document.headings if 0 <= offset < len(text)]
    found: list[tuple[int, int, str | None, str]] = []
    lead_end = bounds[0][0] if bounds else len(text)
    if text[:lead_end].strip():
        found.append((0, lead_end, document.title, document.title or ""))
    above: list[tuple[int, str]] = [(0, document.title)] if document.title else []
    for i, (offset, level, title) in enumerate(bounds):
        while above and above[-1][0] >= level:
            above.pop()
        above.append((level, title))
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(text)
        if text[offset:end].partition("\n")[2].strip():
            found.append((offset, end, title, " > ".join(t for _, t in above)))
    return found


def chunk_document(document: Document, tokenizer: Any, *, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Window every section of ``document`` in tokens of ``tokenizer`` (a ``tokenizers.Tokenizer``): windows of
    ``chunk_tokens`` starting every ``chunk_tokens - overlap`` tokens; spans come from the tokenizer's offsets, so
    ``chunk.text == document.text[chunk.start:chunk.end]``."""
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap {overlap} must be >= 0 and below chunk_tokens {chunk_tokens}")
    step = chunk_tokens - overlap
    chunks: list[Chunk] = []
    prefix = document.source if document.record is None else f"{document.source}:{document.record}"
    for start, end, heading, context in sections(document):
        piece = document.text[start:end]
        offsets = [(a, b) for a, b in tokenizer.encode(piece, add_special_tokens=False).offsets if b > a]
        if not offsets:
            continue
        first = 0
        while True:
            window = offsets[first : first + chunk_tokens]
            span_start, span_end = start + window[0][0], start + window[-1][1]
            chunks.append(
                Chunk(
                    chunk_id=f"{prefix}:{len(chunks)}",
                    source=document.source,
                    heading=heading,
                    start=span_start,
                    end=span_end,
                    text=document.text[span_start:span_end],
                    record=document.record,
                    context=context,
                )
            )
            if first + chunk_tokens >= len(offsets):
                break
            first += step
    return chunks
