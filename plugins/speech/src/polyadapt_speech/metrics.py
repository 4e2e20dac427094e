"""Transcript metrics: WER and CER after a documented normaliser, and domain-term recall.

The normaliser is transformers' ``EnglishTextNormalizer`` (the Whisper paper's): lower case; punctuation, bracketed
asides and filler words ("um", "uh") removed; contractions and spelled-out numbers standardised ("twenty five" ->
"25", "five dollars" -> "$5"); whitespace collapsed. It is built with an empty British->American spelling table
(that table is a separate download; the plugin never downloads), so "colour" and "color" stay different words.
"""

from __future__ import annotations

import difflib
import html
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _normalizer() -> Any:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def normalize(text: str) -> str:
    """The text as scored: see the module docstring for what changes."""
    return " ".join(_normalizer()(text).split())


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus WER and CER (jiwer) over normalised texts; pairs whose reference normalises to nothing are left out."""
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return {}
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


def _occurrences(term: str, text: str) -> int:
    if not term:
        return 0
    return len(re.findall(rf"(?<!\S){re.escape(term)}(?!\S)", text))


def term_recall(references: Sequence[str], hypotheses: Sequence[str], glossary: Sequence[str]) -> dict[str, float]:
    """Domain-term recall: of every glossary-term occurrence in the (normalised) references, the fraction that the
    hypothesis of the same clip also contains (a term said twice must be recognised twice).

    :return: ``{"term_recall": ..., "term_occurrences": n}``, or ``{}`` when no reference contains a term.
    """
    terms = [normalize(t) for t in glossary]
    found = total = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        ref, hyp = normalize(reference), normalize(hypothesis)
        for term in terms:
            wanted = _occurrences(term, ref)
            if wanted:
                total += wanted
                found += min(wanted, _occurrences(term, hyp))
    if not total:
        return {}
    return {"term_recall": found / total, "term_occurrences": float(total)}


def marked_diff(reference: str, hypothesis: str) -> str:
    """HTML of ``hypothesis`` with the words that differ from ``reference`` marked (both normalised).

    Substituted and inserted words are wrapped in ``<mark>``; reference words the hypothesis dropped appear struck
    through in ``<del>``.
    """
    ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
    out: list[str] = []
    for op, r1, r2, h1, h2 in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape(" ".join(hyp[h1:h2])))
            continue
        if op in ("delete", "replace") and r2 > r1:
            out.append(f"<del>{html.escape(' '.join(ref[r1:r2]))}</del>")
        if op in ("insert", "replace") and h2 > h1:
            out.append(f"<mark>{html.escape(' '.join(hyp[h1:h2]))}</mark>")
    return " ".join(out)
