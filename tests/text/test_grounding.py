"""Grounded prompts (order, numbering, fitting the budget, the chat template), citation parsing, and the RAFT training
prompts of ``text.retrieval`` (golden kept or dropped at the configured rate, distractors, determinism)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pytest

from polyadapt_text.data import TextSample
from polyadapt_text.grounding import (
    GROUNDING_INSTRUCTION,
    fit_excerpts,
    format_sources,
    ground_samples,
    grounded_message,
    grounded_prompt,
    parse_citations,
    raft_excerpts,
    sources_of,
    strip_citations,
)
from polyadapt_text.modality import RetrievalSettings
from tests.text.builders import build_tokenizer


@dataclass(frozen=True)
class Chunk:
    """Stands for an index hit: the attributes grounding reads."""

    chunk_id: str
    text: str
    source: str
    heading: str | None = None
    score: float = 0.0

    @property
    def citation(self) -> str:
        return f"{self.source}#{self.heading}" if self.heading else self.source


class WordIndex:
    """A search by shared words over fixed chunks (ties by order): known rankings for the tests."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self.queries: list[str] = []

    def search(self, query: str, top_k: int = 4, mode: str = "hybrid") -> list[Chunk]:
        self.queries.append(query)
        words = set(re.findall(r"\w+", query.lower()))
        scored = [(len(words & set(re.findall(r"\w+", c.text.lower()))), -i, c) for i, c in enumerate(self.chunks)]
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [Chunk(c.chunk_id, c.text, c.source, c.heading, float(s)) for s, _, c in scored[:top_k]]


POLICY = [
    Chunk("c0", "The overdraft fee is $25 per item, at most three a day.", "fees.md", "overdraft"),
    Chunk("c1", "Wire transfers cost $30 outgoing and $15 incoming.", "fees.md", "wires"),
    Chunk("c2", "Branches open Monday to Friday from 9 am to 5 pm.", "branches.md", "hours"),
    Chunk("c3", "TideSaver pays 3.10% APY with six free withdrawals a month.", "savings.md", "tidesaver"),
    Chunk("c4", "The Anchor Card daily ATM limit is $800.", "cards.md", "limits"),
    Chunk("c5", "Overdraft protection links a savings account; the transfer fee is $10.", "fees.md", "protection"),
    Chunk("c6", "Lost cards are replaced free once a year.", "cards.md", "lost"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def settings(**changes) -> RetrievalSettings:
    return RetrievalSettings(**{"index": "unused", "top_k": 4, "distractors": 3, "drop_golden": 0.2, **changes})


# -- grounded prompts ------------------------------------------------------------------------------------------------


def test_grounded_message_numbers_excerpts_by_rank_after_the_instruction_and_before_the_question():
    message = grounded_message("What is the overdraft fee?", POLICY[:3])
    assert message.startswith(GROUNDING_INSTRUCTION)
    lines = [line for line in message.splitlines() if line.startswith("[")]
    assert lines == [
        "[1] fees.md#overdraft: The overdraft fee is $25 per item, at most three a day.",
        "[2] fees.md#wires: Wire transfers cost $30 outgoing and $15 incoming.",
        "[3] branches.md#hours: Branches open Monday to Friday from 9 am to 5 pm.",
    ]
    assert message.rstrip().endswith("Question: What is the overdraft fee?")
    assert grounded_message("Just the question?", []) == "Just the question?"


def test_grounded_prompt_goes_through_the_chat_template_with_the_system_prompt(tokenizer):
    ids, kept = grounded_prompt(tokenizer, "What is the overdraft fee?", POLICY[:2], "You are Harbor Bank.", 4096)
    text = tokenizer.decode(ids)
    assert kept == POLICY[:2]
    assert text.startswith(
        "<|im_start|>system\nYou are Harbor Bank.<|im_end|>\n<|im_start|>user\n" + GROUNDING_INSTRUCTION
    )
    assert "[1] fees.md#overdraft: The overdraft fee is $25" in text
    assert text.endswith("Question: What is the overdraft fee?<|im_end|>\n<|im_start|>assistant\n")


def test_grounded_prompt_is_raw_text_without_a_chat_template(tokenizer):
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        ids, _ = grounded_prompt(tokenizer, "What is the overdraft fee?", POLICY[:1], None, 4096)
    finally:
        tokenizer.chat_template = template
    assert tokenizer.decode(ids, skip_special_tokens=True) == grounded_message("What is the overdraft fee?", POLICY[:1])


@pytest.mark.parametrize("budget", [60, 170, 250, 400])
def test_a_prompt_over_budget_loses_its_lowest_ranked_excerpts_first(tokenizer, budget):
    question = "What is the overdraft fee?"
    full, _ = grounded_prompt(tokenizer, question, POLICY, None, 100_000)
    bare, _ = grounded_prompt(tokenizer, question, [], None, 100_000)
    assert len(bare) < budget < len(full)
    ids, kept = grounded_prompt(tokenizer, question, POLICY, None, budget)
    assert len(ids) <= budget
    assert kept == POLICY[: len(kept)] and len(kept) < len(POLICY)
    assert bool(kept) == (budget > 150)  # an excerpt shortened to a few tokens is left out
    text = tokenizer.decode(ids)
    numbers = [int(n) for n in re.findall(r"^\[(\d+)\] ", text, flags=re.M)]
    assert numbers == list(range(1, len(kept) + 1))
    ending = f"Question: {question}" if kept else f"user\n{question}"
    assert text.endswith(f"{ending}<|im_end|>\n<|im_start|>assistant\n")
    for excerpt in kept[:-1]:  # only the last one kept may be shortened
        assert excerpt.text in text


def test_fit_excerpts_keeps_the_question_when_nothing_else_fits(tokenizer):
    message, kept = fit_excerpts("What is the overdraft fee?", POLICY, lambda m: len(m), 10, tokenizer)
    assert kept == [] and message == "What is the overdraft fee?"


# -- citations -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "count", "cited"),
    [
        ("The fee is $25 [1].", 4, [1]),
        ("It is $25 [1][3].", 4, [1, 3]),
        ("See [1, 2] and [2,3].", 4, [1, 2, 3]),
        ("Cited [ 2 ] once and [2] again.", 4, [2]),
        ("Out of range [5] and [0] are ignored, [4] is not.", 4, [4]),
        ("No citation at all.", 4, []),
        ("A year [2024] is not a citation.", 4, []),
        ("Three [3] of none.", 0, []),
    ],
)
def test_parse_citations(answer, count, cited):
    assert parse_citations(answer, count) == cited


def test_sources_mark_what_the_answer_cites_and_strip_leaves_the_words():
    answer = "The overdraft fee is $25 [2][9]."
    sources = sources_of(answer, POLICY[1:4])
    assert [(s.index, s.citation, s.cited) for s in sources] == [
        (1, "fees.md#wires", False), (2, "branches.md#hours", True), (3, "savings.md#tidesaver", False),
    ]  # fmt: skip
    assert format_sources(sources) == [
        "Sources:", "[1] fees.md#wires", "[2] branches.md#hours  (cited)", "[3] savings.md#tidesaver",
    ]  # fmt: skip
    assert strip_citations(answer) == "The overdraft fee is $25 ."
    assert format_sources([]) == []


# -- RAFT training prompts -------------------------------------------------------------------------------------------


def test_raft_excerpts_hold_the_golden_chunk_and_distinct_distractors():
    index = WordIndex(POLICY)
    for seed in range(20):
        choice = raft_excerpts(
            index, "What is the overdraft fee per item?", "It is $25.", ["$25"], settings(drop_golden=0.0),
            random.Random(seed),
        )  # fmt: skip
        ids = [c.chunk_id for c in choice.excerpts]
        assert len(ids) == 4 and len(set(ids)) == 4
        assert choice.golden is not None and choice.excerpts[choice.golden - 1].chunk_id == "c0"
        assert not choice.dropped
        assert all("$25" not in c.text for i, c in enumerate(choice.excerpts, 1) if i != choice.golden)
    positions = {
        raft_excerpts(index, "overdraft fee", "$25", ["$25"], settings(drop_golden=0.0), random.Random(s)).golden
        for s in range(40)
    }
    assert len(positions) > 1, "the golden chunk always sits at the same number: the adapter could learn the slot"


def test_the_golden_chunk_is_found_by_the_answer_when_the_question_misses_it():
    fillers = [Chunk(f"f{i}", f"How much per month is service {i}? It costs ${i}.", "misc.md") for i in range(12)]
    index = WordIndex(POLICY + fillers)
    choice = raft_excerpts(
        index, "How much per replacement?", "Replacement is free once a year.", ["free once a year"],
        settings(drop_golden=0.0, distractors=2), random.Random(0),
    )  # fmt: skip
    assert choice.golden is not None and choice.excerpts[choice.golden - 1].chunk_id == "c6"
    assert len(index.queries) == 2 and index.queries[1] == "Replacement is free once a year."


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_the_golden_chunk_is_dropped_at_the_configured_rate(rate):
    index = WordIndex(POLICY)
    trials = 400
    dropped = 0
    for seed in range(trials):
        choice = raft_excerpts(index, "overdraft fee", "$25", ["$25"], settings(drop_golden=rate), random.Random(seed))
        assert choice.dropped == (choice.golden is None)
        if choice.dropped:
            dropped += 1
            assert all(c.chunk_id != "c0" for c in choice.excerpts) and len(choice.excerpts) == 3
    assert abs(dropped / trials - rate) <= 0.06, dropped


def _chats(n: int) -> list[TextSample]:
    questions = [
        ("What is the overdraft fee?", "The overdraft fee is $25.", ("$25",)),
        ("What is the ATM limit?", "The daily ATM limit is $800.", ("$800",)),
        ("What APY does TideSaver pay?", "TideSaver pays 3.10% APY.", ("3.10%",)),
    ]
    samples = []
    for i in range(n):
        question, answer, facts = questions[i % len(questions)]
        samples.append(TextSample(
            format="chat", source="/data/train.jsonl", line=i + 1,
            messages=(("system", "Be brief."), ("user", f"{question} (ticket {i})"), ("assistant", answer)),
            answer_contains=facts,
        ))  # fmt: skip
    return samples


def test_ground_samples_is_deterministic_from_the_seed_and_cites_the_golden_chunk(tokenizer):
    index = WordIndex(POLICY)
    samples = _chats(30) + [TextSample(format="text", source="/data/train.jsonl", line=99, text="plain")]

    def run(seed: int):
        return ground_samples(
            samples, index, settings(drop_golden=0.3), training=True, seed=seed, count=lambda s: 0, budget=10_000,
            tokenizer=tokenizer,
        )  # fmt: skip

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert [s for s, _ in first] != [s for s, _ in other]
    assert first[-1] == (samples[-1], None)
    for (sample, info), original in zip(first[:-1], samples[:-1], strict=True):
        system, (role, user), (_, reply) = sample.messages
        assert system == ("system", "Be brief.") and role == "user"
        assert user.startswith(GROUNDING_INSTRUCTION)
        assert user.endswith(f"Question: {original.messages[1][1]}")
        if info.golden is None:
            assert info.dropped and reply == original.messages[2][1]
        else:
            assert reply == f"{original.messages[2][1]} [{info.golden}]"
            golden_line = next(line for line in user.splitlines() if line.startswith(f"[{info.golden}] "))
            assert original.answer_contains[0] in golden_line
    dropped = sum(info.dropped for _, info in first[:-1])
    assert 0 < dropped < 30
    # the draw of a sample depends on the seed and where it is, not on the samples beside it
    alone = ground_samples(samples[5:6], index, settings(drop_golden=0.3), training=True, seed=7,
                           count=lambda s: 0, budget=10_000, tokenizer=tokenizer)  # fmt: skip
    assert alone == first[5:6]


def test_held_out_samples_get_the_top_k_chunks_and_keep_their_answer(tokenizer):
    index = WordIndex(POLICY)
    grounded = ground_samples(
        _chats(3), index, settings(top_k=2), training=False, seed=0, count=lambda s: 0, budget=10_000,
        tokenizer=tokenizer,
    )  # fmt: skip
    for (sample, info), original in zip(grounded, _chats(3), strict=True):
        assert info.excerpts == 2 and info.golden is None
        assert sample.messages[2] == original.messages[2]
        assert sample.messages[1][1].count("\n[") == 2


def test_training_prompts_are_cut_to_fit_max_length_without_losing_the_answer(tokenizer):
    from polyadapt_text.batching import encode

    def count(sample):
        return len(encode(sample, tokenizer, None, True)[0])

    grounded = ground_samples(
        _chats(6), WordIndex(POLICY), settings(drop_golden=0.0), training=True, seed=0, count=count, budget=80,
        tokenizer=tokenizer,
    )  # fmt: skip
    for sample, info in grounded:
        assert count(sample) <= 80
        assert info.excerpts < 4
        reply = sample.messages[2][1]
        assert reply.split(" [")[0] in {"The overdraft fee is $25.", "The daily ATM limit is $800.",
                                       "TideSaver pays 3.10% APY."}  # fmt: skip
        if info.golden is None:
            assert "[" not in reply


def test_retrieval_settings_are_validated():
    from pydantic import ValidationError

    from polyadapt_text.modality import TextSettings

    for bad in ({"top_k": 0}, {"drop_golden": 1.5}, {"distractors": -1}, {"unknown": 1}, {}):
        with pytest.raises(ValidationError):
            TextSettings(retrieval={"index": "x", **bad} if bad != {} else {})
    assert TextSettings(retrieval={"index": "idx"}).retrieval == RetrievalSettings(
        index="idx", top_k=4, distractors=3, drop_golden=0.2
    )


def test_distractors_are_cut_before_the_golden_chunk(tokenizer):
    from polyadapt_text.batching import encode
    from polyadapt_text.grounding import with_question

    def count(sample):
        return len(encode(sample, tokenizer, None, True)[0])

    sample = _chats(1)[0]
    golden_only = with_question(sample, 1, grounded_message(sample.messages[1][1], POLICY[:1]), " [1]")
    budget = count(golden_only) + 4
    for seed in range(8):
        ((grounded, info),) = ground_samples(
            [sample], WordIndex(POLICY), settings(drop_golden=0.0), training=True, seed=seed, count=count,
            budget=budget, tokenizer=tokenizer,
        )  # fmt: skip
        assert count(grounded) <= budget
        assert info.golden is not None and info.excerpts <= 2
        user, reply = grounded.messages[1][1], grounded.messages[2][1]
        assert f"[{info.golden}] fees.md#overdraft: The overdraft fee is $25" in user
        assert reply.endswith(f" [{info.golden}]")


def test_retrieval_is_refused_with_a_preference_objective(tiny_llama, chat_data):
    from polyadapt.errors import ConfigError
    from tests.text.builders import make_config

    with pytest.raises(ConfigError, match=r"text\.retrieval: grounds chat prompts for objective sft only, not 'dpo'"):
        make_config(tiny_llama, chat_data, text={"retrieval": {"index": "idx"}, "objective": "dpo"})
