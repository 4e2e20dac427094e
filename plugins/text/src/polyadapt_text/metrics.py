"""Answer metrics on generated text: exact match, token F1 (SQuAD-style normalisation) and fact accuracy."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall between the normalised answers."""
    pred, ref = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def facts_present(prediction: str, facts: Sequence[str]) -> bool:
    """Every fact appears in the prediction, case-insensitively, ignoring differences in spacing."""
    haystack = " ".join(prediction.lower().split())
    return all(" ".join(fact.lower().split()) in haystack for fact in facts)


def perplexity(loss: float | None) -> float:
    """``exp(loss)``; infinite for a missing or overflowing loss."""
    if loss is None or not math.isfinite(loss):
        return math.inf
    return math.exp(min(loss, 700.0))


def answer_metrics(examples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean exact match and token F1 over the examples, and fact accuracy over those with ``answer_contains``."""
    if not examples:
        return {}
    metrics = {
        "exact_match": sum(e["exact_match"] for e in examples) / len(examples),
        "token_f1": sum(e["token_f1"] for e in examples) / len(examples),
    }
    with_facts = [e for e in examples if e.get("answer_contains")]
    if with_facts:
        metrics["fact_accuracy"] = sum(e["facts_ok"] for e in with_facts) / len(with_facts)
    return metrics


def score_example(prompt: str, reference: str, prediction: str, facts: Sequence[str]) -> dict[str, Any]:
    """One evaluation record: what was asked, expected and answered, and its scores."""
    record: dict[str, Any] = {
        "prompt": prompt,
        "reference": reference,
        "prediction": prediction,
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
    }
    if facts:
        record["answer_contains"] = list(facts)
        record["facts_ok"] = float(facts_present(prediction, facts))
    return record
