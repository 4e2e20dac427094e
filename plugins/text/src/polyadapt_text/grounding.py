"""Grounded answers: retrieved excerpts put into the prompt, citations read back out of the answer, and the
retrieval-augmented training prompts of ``text.retrieval`` (RAFT: Zhang et al. 2024, "RAFT: Adapting Language Model to
Domain Specific RAG").

The grounded user message is, in this order::

    Answer the question from the numbered excerpts below. Cite the excerpts you use as [n], e.g. [1].

    [1] fees.md#overdraft: The overdraft fee is $25 ...
    [2] fees.md#wires: ...

    Question: What is the overdraft fee?

It goes through the chat template (with the run's system prompt) like any user turn; a model without a chat template
gets the same text raw. Excerpts are numbered by rank, best first; when the prompt would be longer than its token
budget the lowest-ranked excerpts are cut first (the last one kept is shortened, never the question).

An answer cites excerpts as ``[1]``, ``[1][3]`` or ``[1, 2]``; numbers outside ``1..n`` are ignored.

Anything with ``text``, ``citation``, ``source``, ``score`` and ``chunk_id`` attributes is an excerpt here (the
``Hit`` objects of :mod:`polyadapt.retrieval`), and anything with ``search(query, top_k=...)`` is an index.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from polyadapt.errors import ConfigError

from .metrics import facts_present

if TYPE_CHECKING:
    from .data import TextSample
    from .modality import RetrievalSettings

#: the instruction that opens every grounded user message
GROUNDING_INSTRUCTION = (
    "Answer the question from the numbered excerpts below. Cite the excerpts you use as [n], e.g. [1]."
)
#: an excerpt shortened below this many tokens to fit the budget is left out instead
MIN_EXCERPT_TOKENS = 8
#: ``[1]``, ``[1, 2]``, ``[1,2,3]``
CITATION = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")


class Excerpt(Protocol):
    text: str
    source: str
    score: float
    chunk_id: str

    @property
    def citation(self) -> str: ...


class Searchable(Protocol):
    def search(self, query: str, top_k: int = ...) -> list[Any]: ...


def open_retrieval_index(reference: str, key: str) -> Any:
    """The index at ``reference`` (a directory or NAME@REF); a missing or unreadable one is a :class:`ConfigError`
    naming ``key`` (the option or config key that gave it)."""
    from polyadapt.errors import PolyadaptError
    from polyadapt.retrieval import open_index

    try:
        return open_index(reference)
    except PolyadaptError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# -- prompts ---------------------------------------------------------------------------------------------------------


_HEADING_LINE = re.compile(r"^\s*#{1,6}\s.*$", re.M)


def excerpt_body(text: str) -> str:
    """An excerpt's text on one line, without Markdown heading lines (the citation names the section)."""
    return " ".join(_HEADING_LINE.sub(" ", text).split())


def format_excerpt(number: int, excerpt: Excerpt, text: str | None = None) -> str:
    """``[n] citation: text`` on one line."""
    return f"[{number}] {excerpt.citation}: {excerpt_body(excerpt.text if text is None else text)}"


def grounded_message(
    question: str, excerpts: Sequence[Excerpt], texts: Sequence[str] | None = None,
    instruction: str = GROUNDING_INSTRUCTION,
) -> str:  # fmt: skip
    """The grounded user message (see the module docstring); ``texts`` replace the excerpts' texts (shortened)."""
    if not excerpts:
        return question
    texts = [e.text for e in excerpts] if texts is None else texts
    blocks = "\n\n".join(format_excerpt(i, e, t) for i, (e, t) in enumerate(zip(excerpts, texts, strict=True), 1))
    return f"{instruction}\n\n{blocks}\n\nQuestion: {question}"


def fit_excerpts(
    question: str,
    excerpts: Sequence[Excerpt],
    count: Callable[[str], int],
    budget: int,
    tokenizer: Any,
    protect: int | None = None,
) -> tuple[str, list[Excerpt]]:
    """The grounded message whose rendering ``count`` (tokens) is at most ``budget``, and the excerpts it kept (in
    their order, numbered from 1 again).

    The lowest-ranked excerpt (the last; never excerpt ``protect`` while another is left) is shortened by tokens or,
    once shorter than :data:`MIN_EXCERPT_TOKENS`, left out, until the message fits; with no excerpt left the question
    alone is returned (and truncated by the caller).
    """
    texts = [excerpt_body(e.text) for e in excerpts]
    alive = list(range(len(excerpts)))
    for _ in range(4 * len(excerpts) + 8):
        kept = [excerpts[i] for i in alive]
        message = grounded_message(question, kept, [texts[i] for i in alive])
        over = count(message) - budget
        if over <= 0 or not alive:
            return message, kept
        victim = next((i for i in reversed(alive) if i != protect), alive[-1])
        ids = tokenizer(texts[victim], add_special_tokens=False)["input_ids"]
        keep = len(ids) - over - 2  # the ellipsis and a merge may cost a token each
        if keep < MIN_EXCERPT_TOKENS:
            alive.remove(victim)
        else:
            texts[victim] = tokenizer.decode(ids[:keep]).rstrip() + " ..."
    return grounded_message(question, [], []), []


def prompt_text(tokenizer: Any, message: str, system: str | None) -> str:
    """The text the model is asked: the user message through the chat template (with ``system``), or raw."""
    from .batching import chat_messages, render

    if tokenizer.chat_template:
        return render(tokenizer, chat_messages([("user", message)], system), add_generation_prompt=True)
    return ((system + "\n") if system else "") + message


def grounded_prompt(
    tokenizer: Any, question: str, excerpts: Sequence[Excerpt], system: str | None, budget: int
) -> tuple[list[int], list[Excerpt]]:
    """Prompt token ids of ``question`` grounded in ``excerpts`` (at most ``budget`` tokens of excerpts and
    template: the question itself is never cut here), and the excerpts it numbers ``[1]..[n]``."""
    with_template = bool(tokenizer.chat_template)

    def ids(message: str) -> list[int]:
        return tokenizer(prompt_text(tokenizer, message, system), add_special_tokens=not with_template)["input_ids"]

    message, kept = fit_excerpts(question, excerpts, lambda m: len(ids(m)), budget, tokenizer)
    return ids(message), kept


# -- citations -------------------------------------------------------------------------------------------------------


def parse_citations(answer: str, count: int) -> list[int]:
    """The excerpt numbers ``answer`` cites, in the order first cited, each once; numbers outside ``1..count`` (and
    bracketed numbers that are not citations, like a year) are ignored."""
    cited: list[int] = []
    for match in CITATION.finditer(answer):
        for part in match.group(1).split(","):
            number = int(part)
            if 1 <= number <= count and number not in cited:
                cited.append(number)
    return cited


def strip_citations(answer: str) -> str:
    """``answer`` without its ``[n]`` markers (for scoring the answer's words)."""
    return " ".join(CITATION.sub(" ", answer).split())


@dataclass(frozen=True)
class Source:
    """One excerpt given to the model: its number in the prompt, where it comes from, its score, whether cited."""

    index: int
    citation: str
    source: str
    score: float
    cited: bool

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "citation": self.citation, "source": self.source, "score": self.score,
                "cited": self.cited}  # fmt: skip


def sources_of(answer: str, excerpts: Sequence[Excerpt]) -> list[Source]:
    """Every excerpt of the prompt, numbered as the model saw them, each marked cited or not by ``answer``."""
    cited = set(parse_citations(answer, len(excerpts)))
    return [
        Source(index=i, citation=e.citation, source=str(e.source), score=round(float(e.score), 6), cited=i in cited)
        for i, e in enumerate(excerpts, 1)
    ]


def format_sources(sources: Sequence[Source]) -> list[str]:
    """``Sources:`` then one ``[n] citation`` line per excerpt (``(cited)`` after those the answer cites)."""
    if not sources:
        return []
    return ["Sources:", *[f"[{s.index}] {s.citation}" + ("  (cited)" if s.cited else "") for s in sources]]


def holds_answer(excerpt: Excerpt, facts: Sequence[str]) -> bool:
    """Whether the excerpt states every fact (case and spacing ignored)."""
    return bool(facts) and facts_present(excerpt.text, facts)


def same_source(excerpt: Excerpt, source: str | None) -> bool:
    """Whether the excerpt comes from ``source`` (a file name, a path ending in it, or ``file#heading``)."""
    if not source:
        return False
    wanted = source.strip()
    if "#" in wanted:
        return excerpt.citation == wanted or excerpt.citation.endswith("/" + wanted)
    mine = str(excerpt.source)
    return mine == wanted or Path(mine).name == Path(wanted).name


# -- retrieval-augmented training (RAFT) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RaftChoice:
    """The excerpts of one training prompt, in prompt order, and the golden one's number (None: dropped or none
    found)."""

    excerpts: list[Any]
    golden: int | None
    dropped: bool


def raft_excerpts(
    index: Searchable, question: str, answer: str, facts: Sequence[str], settings: RetrievalSettings,
    rng: random.Random,
) -> RaftChoice:  # fmt: skip
    """The golden excerpt (the retrieved chunk holding ``facts``, found by searching the question, else the answer
    text; without facts, the answer text's best match) plus ``settings.distractors`` other retrieved chunks (none of
    them holding the facts), shuffled; the golden one left out with probability ``settings.drop_golden``."""
    wide = settings.distractors + settings.top_k + 4
    hits = index.search(question, top_k=wide)
    golden = next((h for h in hits if holds_answer(h, facts)), None)
    if golden is None:
        by_answer = index.search(answer, top_k=settings.top_k)
        golden = next((h for h in by_answer if holds_answer(h, facts)), None)
        if golden is None and not facts and by_answer:
            golden = by_answer[0]
    distractors = [
        h for h in hits
        if (golden is None or h.chunk_id != golden.chunk_id) and not holds_answer(h, facts)
    ][: settings.distractors]  # fmt: skip
    dropped = golden is not None and rng.random() < settings.drop_golden
    chosen = list(distractors) + ([golden] if golden is not None and not dropped else [])
    rng.shuffle(chosen)
    number = None if golden is None or dropped else chosen.index(golden) + 1
    return RaftChoice(excerpts=chosen, golden=number, dropped=dropped)


def question_turn(sample: TextSample) -> int | None:
    """The position in ``sample.messages`` of the user turn the last assistant reply answers (None: none)."""
    if sample.format != "chat":
        return None
    last = max(i for i, (role, _) in enumerate(sample.messages) if role == "assistant")
    users = [i for i, (role, _) in enumerate(sample.messages[:last]) if role == "user"]
    return users[-1] if users else None


def with_question(sample: TextSample, turn: int, content: str, answer_suffix: str = "") -> TextSample:
    """``sample`` with message ``turn`` replaced by ``content`` (and ``answer_suffix`` after the last reply)."""
    messages = list(sample.messages)
    messages[turn] = (messages[turn][0], content)
    if answer_suffix:
        last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
        messages[last] = (messages[last][0], messages[last][1] + answer_suffix)
    return replace(sample, messages=tuple(messages))


def sample_seed(seed: int, sample: TextSample) -> str:
    """The per-sample random seed: the run's seed and where the record is (file name and line), so a sample's draw
    does not depend on the order or the number of the others."""
    return f"{seed}:{Path(sample.source).name}:{sample.line}"


@dataclass(frozen=True)
class Grounding:
    """What grounding did to one sample: excerpts in its prompt, the golden one's number (None: not there) and
    whether it was dropped by design (``drop_golden``)."""

    excerpts: int
    golden: int | None = None
    dropped: bool = False


def ground_samples(
    samples: Sequence[TextSample], index: Searchable, settings: RetrievalSettings, *, training: bool, seed: int,
    count: Callable[[TextSample], int], budget: int, tokenizer: Any,
) -> list[tuple[TextSample, Grounding | None]]:  # fmt: skip
    """Chat samples with their question turn grounded in retrieved excerpts; other samples unchanged (None).

    Training samples get :func:`raft_excerpts` (golden + distractors, the golden dropped at ``drop_golden``, drawn
    from ``seed`` per sample) and, when ``settings.cite`` and the golden is there, `` [n]`` after the answer. Held-out
    samples get the top ``settings.top_k`` excerpts of the question, as at inference. ``count(sample)`` is the
    sample's length in tokens; excerpts are cut to keep it within ``budget``.
    """
    out: list[tuple[TextSample, Grounding | None]] = []
    for sample in samples:
        turn = question_turn(sample)
        if turn is None:
            out.append((sample, None))
            continue
        question = sample.messages[turn][1]
        answer = next(content for role, content in reversed(sample.messages) if role == "assistant")
        dropped = False
        if training:
            choice = raft_excerpts(
                index, question, answer, sample.answer_contains, settings, random.Random(sample_seed(seed, sample))
            )
            excerpts, golden, dropped = choice.excerpts, choice.golden, choice.dropped
        else:
            excerpts, golden = index.search(question, top_k=settings.top_k), None
        suffix = f" [{golden}]" if golden is not None and settings.cite else ""

        def length(message: str, sample: TextSample = sample, turn: int = turn, suffix: str = suffix) -> int:
            return count(with_question(sample, turn, message, suffix))

        protect = None if golden is None else golden - 1
        message, kept = fit_excerpts(question, excerpts, length, budget, tokenizer, protect=protect)
        if golden is not None:  # excerpts cut to fit renumber the rest; the golden one goes last
            chunk = excerpts[golden - 1]
            golden = next((n for n, e in enumerate(kept, 1) if e is chunk), None)
            suffix = f" [{golden}]" if golden is not None and settings.cite else ""
        out.append((with_question(sample, turn, message, suffix), Grounding(len(kept), golden, dropped)))
    return out
