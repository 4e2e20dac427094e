"""Answer metrics: normalisation, exact match, token F1, fact accuracy, perplexity."""

from __future__ import annotations

import math

import pytest

from polyadapt_text.metrics import answer_metrics, exact_match, facts_present, perplexity, score_example, token_f1


@pytest.mark.parametrize(
    ("prediction", "reference", "em", "f1"),
    [
        ("The fee is $6.", "the fee is $6", 1.0, 1.0),
        ("A fee of 6", "fee of 6", 1.0, 1.0),
        ("fee is six", "fee is 6", 0.0, 2 / 3),
        ("", "fee", 0.0, 0.0),
        ("completely different", "fee is 6", 0.0, 0.0),
    ],
)
def test_exact_match_and_token_f1(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("prediction", "facts", "ok"),
    [
        ("The daily ATM limit is $800.", ["$800"], True),
        ("Open 9 AM  to 5 PM on weekdays", ["9 am to 5 pm"], True),
        ("The minimum opening deposit is $25.", ["$25", "opening deposit"], True),
        ("The overdraft fee is $25.", ["$25", "opening deposit"], False),
        ("The limit is $80.", ["$800"], False),
    ],
)
def test_fact_accuracy_needs_every_fact(prediction, facts, ok):
    assert facts_present(prediction, facts) is ok


def test_answer_metrics_average_over_examples_with_facts():
    examples = [
        score_example("q1", "It is $6.", "It is $6.", ["$6"]),
        score_example("q2", "It is $800.", "No idea.", ["$800"]),
        score_example("q3", "Hello there.", "Hello there.", []),
    ]
    metrics = answer_metrics(examples)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["fact_accuracy"] == 0.5


def test_perplexity_is_exp_of_loss_and_infinite_when_missing():
    assert perplexity(math.log(12.5)) == pytest.approx(12.5)
    assert perplexity(None) == math.inf
    assert perplexity(float("nan")) == math.inf
