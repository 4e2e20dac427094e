"""The four-way comparison of ``polyadapt evaluate RUN --retrieve INDEX``: what the adapter and the retrieval layer
each contribute, measured on the same held-out questions.

Systems, in this order: the base model alone, the base with retrieved excerpts in its prompt, the adapter alone, and
the adapter with excerpts (labelled "retrieval-trained adapter + retrieval" when the run was trained with the
modality's ``retrieval`` section). Every question is retrieved for once; both grounded systems see the same excerpts.

Metrics: ``fact_accuracy`` and ``token_f1`` (the modality's answer metrics), ``recall@k`` (a retrieved chunk states
every fact of the question's ``answer_contains``), ``source_recall@k`` (a retrieved chunk comes from the question's
``source``, when questions name one) and ``citation_accuracy`` (the answer cites an excerpt that holds the answer).
With questions that also give the facts of the previous version (``answer_contains_v1``), ``old_value`` is the share
of answers stating that previous value instead of the current one.

The held-out questions are the run's held-out split, or ``--data``: a dataset the modality reads, or JSONL files of
``{"question": ..., "answer_contains": [...], "answer": ..., "source": ...}`` records (``answer_v2`` / ``answer_v1``
stand for ``answer``; other keys are kept aside).
The result goes into the run's report.json (``retrieval``), report.md and report.html, replacing an earlier
comparison on the same data, index and ``k`` and keeping everything else, and into the manifest's ``evaluations``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from .modality import EvalResult
    from .plugins import PolyadaptPluginManager

RETRIEVAL_MD = "report.md"
#: the markers around the comparison's section of report.html (replaced on the next comparison)
HTML_START, HTML_END = "<!-- polyadapt:retrieval -->", "<!-- /polyadapt:retrieval -->"
QUESTION_KEYS = ("question", "answer_contains", "answer", "reference", "source", "id")


@dataclass(frozen=True)
class Question:
    """One held-out question: what is asked, the reference answer, the facts a right answer states, where it is
    answered (``source``: a file name or ``file#heading``) and, for a changed fact, the facts it used to be."""

    question: str
    reference: str
    facts: tuple[str, ...] = ()
    source: str | None = None
    id: str | None = None
    where: str = ""
    old_facts: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@runtime_checkable
class GroundedAnswers(Protocol):
    """A run that answers questions with or without excerpts and scores the answers (checked on the modality's
    ``run_class`` before any model loads)."""

    def grounded_eval(self, questions: Sequence[Question], excerpts: Sequence[Sequence[Any]] | None = None) -> Any:
        """An ``EvalResult``: the modality's answer metrics, ``citation_accuracy`` with excerpts, per-question
        examples (with ``prediction``)."""
        ...


# -- questions -------------------------------------------------------------------------------------------------------


def _contains(text: str, facts: Sequence[str]) -> bool:
    haystack = " ".join(text.lower().split())
    return bool(facts) and all(" ".join(f.lower().split()) in haystack for f in facts)


def _strings(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str) and value.strip():
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    return None


def question_of(record: dict[str, Any], where: str) -> Question:
    """A question record as a :class:`Question`; a :class:`DataError` naming ``where`` (file:line) when it is bad."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    facts = _strings(record.get("answer_contains", []))
    if facts is None and record.get("answer_contains") != []:
        raise DataError(f"{where}: 'answer_contains' must be a list of non-empty strings")
    facts = facts or ()
    reference = next((record[k] for k in ("answer", "reference", "answer_v2", "answer_v1") if k in record), None)
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: the answer must be a string")
    if not facts and not reference:
        raise DataError(f"{where}: give 'answer_contains' (the facts a right answer states) or 'answer'")
    source = record.get("source")
    if source is not None and not isinstance(source, str):
        raise DataError(f"{where}: 'source' must be a string (a file name or file#heading)")
    old = _strings(record.get("answer_contains_v1", [])) or ()
    if old and facts and _contains(" ".join(old), facts):
        old = ()  # the old answer states the new facts too: it cannot tell the two apart
    ident = record.get("id")
    return Question(
        question=question, reference=reference or "; ".join(facts), facts=facts, source=source,
        id=None if ident is None else str(ident), where=where, old_facts=old,
        extra={k: v for k, v in record.items() if k not in QUESTION_KEYS},
    )  # fmt: skip


def is_question_file(path: Path) -> bool:
    """Whether the JSONL file's first record is a question record (has ``question``)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "question" in record
    return False


def read_questions(path: Path) -> list[Question]:
    """Every question of a question JSONL file, or of every such file in a directory (sorted by name)."""
    from .data import read_jsonl

    files = [path] if path.is_file() else sorted(p for p in path.glob("*.jsonl") if is_question_file(p))
    questions: list[Question] = []
    for file in files:
        records, problems = read_jsonl(file, str(file))
        if problems:
            raise DataError(f"{len(problems)} bad line(s) in {file}", problems)
        questions += [question_of(record, f"{file}:{line}") for line, record in records]
    return questions


# -- scores ----------------------------------------------------------------------------------------------------------


def same_source(hit: Any, source: str | None) -> bool:
    """Whether ``hit`` comes from ``source`` (its file name, or ``file#heading`` matching its citation)."""
    if not source:
        return False
    if "#" in source:
        return hit.citation == source or str(hit.citation).endswith("/" + source)
    return str(hit.source) == source or Path(str(hit.source)).name == Path(source).name


def retrieval_recall(questions: Sequence[Question], hits: Sequence[Sequence[Any]]) -> dict[str, float]:
    """``recall``: the share of questions (with facts) whose retrieved chunks include one stating every fact;
    ``source_recall``: the share of questions (with a source) whose chunks include one from that source."""
    scores: dict[str, float] = {}
    with_facts = [(q, h) for q, h in zip(questions, hits, strict=True) if q.facts]
    if with_facts:
        scores["recall"] = sum(any(_contains(x.text, q.facts) for x in h) for q, h in with_facts) / len(with_facts)
    with_source = [(q, h) for q, h in zip(questions, hits, strict=True) if q.source]
    if with_source:
        found = sum(any(same_source(x, q.source) for x in h) for q, h in with_source)
        scores["source_recall"] = found / len(with_source)
    return scores


def old_value_rate(questions: Sequence[Question], result: EvalResult) -> float | None:
    """The share of questions with an old value whose answer states the old value and not the new one."""
    pairs = [(q, e) for q, e in zip(questions, result.examples, strict=True) if q.old_facts]
    if not pairs:
        return None
    stale = sum(_contains(e["prediction"], q.old_facts) and not _contains(e["prediction"], q.facts) for q, e in pairs)
    return stale / len(pairs)


# -- the comparison --------------------------------------------------------------------------------------------------


def index_label(reference: str, registry: str | None = None) -> str:
    """``NAME@vN`` (the version a registry reference resolves to now), else the reference as given."""
    from .registry.refs import looks_like_ref

    if not looks_like_ref(reference):
        return str(reference)
    from .registry import open as open_registry

    reg = open_registry(registry, create=False)
    try:
        return reg.get(str(reference)).label
    finally:
        reg.close()


def compare(
    run_dir: str | Path,
    index: str,
    data: str | Path | None = None,
    top_k: int | None = None,
    max_samples: int | None = None,
    plugin_manager: PolyadaptPluginManager | None = None,
) -> dict[str, Any]:
    """Score the four systems of the module docstring on the held-out questions; write them into the run's reports;
    return the comparison (``systems``: one row per system)."""
    from .evaluation import evaluating
    from .lifecycle import open_base, open_run, read_data, try_resolve_base
    from .plugins import get_plugin_manager
    from .retrieval import open_index

    pm = plugin_manager or get_plugin_manager()
    run_dir, manifest, config = open_run(run_dir, pm)
    modality = pm.get_modality(config.modality)
    if not callable(getattr(modality.run_class, "grounded_eval", None)):
        raise ConfigError(f"--retrieve: the {modality.name} modality cannot answer from retrieved excerpts")
    trained_with = getattr(config.settings, "retrieval", None)
    k = top_k or (trained_with.top_k if trained_with is not None else 4)
    questions, data_path = _heldout(modality, config, data, read_data, try_resolve_base, pm)
    limit = max_samples or config.eval.max_samples
    questions = questions[:limit] if limit else questions
    if not questions:
        raise ConfigError(f"--data: {data_path} has no held-out questions")
    from .errors import PolyadaptError

    try:
        opened = open_index(index)
    except PolyadaptError as exc:
        raise ConfigError(f"--retrieve: {exc}") from None
    hits = [list(opened.search(q.question, top_k=k)) for q in questions]
    recall = retrieval_recall(questions, hits)

    run = open_base(config, run_dir, pm)
    if not isinstance(run, GroundedAnswers):
        raise ConfigError(f"--retrieve: the {modality.name} modality's runs have no grounded_eval")
    results: list[tuple[str, bool, EvalResult]] = []
    with evaluating(run):
        results.append(("base", False, run.grounded_eval(questions, None)))
        results.append(("base + retrieval", True, run.grounded_eval(questions, hits)))
    run.load_adapter(run_dir)
    run.model.to(run.ctx.device)
    adapter = "retrieval-trained adapter" if trained_with is not None else "adapter"
    with evaluating(run):
        results.append((adapter, False, run.grounded_eval(questions, None)))
        results.append((f"{adapter} + retrieval", True, run.grounded_eval(questions, hits)))

    systems = []
    for name, grounded, result in results:
        row: dict[str, Any] = {"system": name, "retrieval": grounded}
        for metric in ("fact_accuracy", "token_f1", "exact_match"):
            if metric in result.metrics:
                row[metric] = round(result.metrics[metric], 6)
        if grounded:
            row.update({f"{m}@{k}": round(v, 6) for m, v in recall.items()})
            if "citation_accuracy" in result.metrics:
                row["citation_accuracy"] = round(result.metrics["citation_accuracy"], 6)
        stale = old_value_rate(questions, result)
        if stale is not None:
            row["old_value"] = round(stale, 6)
        systems.append(row)
    from .data import fingerprint
    from .manifest import now_iso

    files = [data_path] if data_path.is_file() else sorted(p for p in data_path.rglob("*.jsonl"))
    comparison = {
        "when": now_iso(),
        "data": str(data_path),
        "fingerprint": fingerprint(files, root=data_path if data_path.is_dir() else data_path.parent)["sha256"],
        "questions": len(questions),
        "index": index_label(index),
        "index_documents": ((getattr(opened, "manifest", None) or {}).get("documents") or {}).get("fingerprint"),
        "top_k": k,
        "trained_with_retrieval": trained_with is not None,
        "systems": systems,
        "examples": {name: result.examples[:10] for name, _, result in results},
    }
    write_comparison(run_dir, comparison)
    from .rundir import RunDirectory

    manifest.evaluations.append({"kind": "retrieval", **{k_: v for k_, v in comparison.items() if k_ != "examples"}})
    RunDirectory(run_dir).save(manifest)
    return comparison


def _heldout(
    modality: Any, config: Any, data: str | Path | None, read_data: Any, try_resolve_base: Any, pm: Any
) -> tuple[list[Question], Path]:
    """The questions of ``--data`` (question files, or a dataset the modality reads), else of the run's held-out
    split."""
    path = Path(data) if data is not None else Path(config.data.path)
    if not path.exists():
        raise ConfigError(f"--data: {str(path)!r} does not exist")
    if (path.is_file() and is_question_file(path)) or (
        path.is_dir() and any(is_question_file(p) for p in path.glob("*.jsonl"))
        and not any((path / f).is_file() for f in ("train.jsonl", "validation.jsonl", "test.jsonl"))
    ):  # fmt: skip
        return read_questions(path), path
    splits, _ = read_data(modality, config, path, base=try_resolve_base(config.base, pm))
    if not hasattr(modality, "heldout_questions"):
        raise ConfigError(f"--data: the {modality.name} modality cannot turn its samples into questions")
    return [Question(**q) for q in modality.heldout_questions(splits.validation)], path


# -- reports ---------------------------------------------------------------------------------------------------------

COLUMNS = ("fact_accuracy", "token_f1", "recall", "source_recall", "citation_accuracy", "old_value")


def _columns(comparison: dict[str, Any]) -> list[str]:
    k = comparison["top_k"]
    present = {key for row in comparison["systems"] for key in row}
    names = [c if c in present else f"{c}@{k}" for c in COLUMNS]
    return [c for c in names if c in present]


def format_table(comparison: dict[str, Any]) -> str:
    """The comparison as a fixed-width text table (``-``: not measured for that system)."""
    columns = _columns(comparison)
    width = max(len(r["system"]) for r in comparison["systems"]) + 2
    lines = [
        f"{comparison['questions']} questions from {comparison['data']}, index {comparison['index']}, "
        f"top {comparison['top_k']}",
        f"{'system':<{width}}" + "".join(f"{c:>{max(len(c), 8) + 2}}" for c in columns),
    ]
    for row in comparison["systems"]:
        cells = "".join(f"{('-' if row.get(c) is None else f'{row[c]:.3f}'):>{max(len(c), 8) + 2}}" for c in columns)
        lines.append(f"{row['system']:<{width}}{cells}")
    return "\n".join(lines)


def markdown_table(comparison: dict[str, Any]) -> str:
    columns = _columns(comparison)
    lines = [
        f"### {Path(comparison['data']).name}: index `{comparison['index']}`, top {comparison['top_k']}",
        "",
        f"{comparison['questions']} questions from `{comparison['data']}` ({comparison['when']}).",
        "",
        "| system | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for row in comparison["systems"]:
        cells = " | ".join("–" if row.get(c) is None else f"{row[c]:.3f}" for c in columns)
        lines.append(f"| {row['system']} | {cells} |")
    return "\n".join(lines)


def _key(comparison: dict[str, Any]) -> tuple[str, str, int]:
    return (comparison["data"], comparison["index"], comparison["top_k"])


def write_comparison(run_dir: Path, comparison: dict[str, Any]) -> None:
    """Add ``comparison`` to report.json's ``retrieval`` list (replacing one on the same data, index and k), then
    render every comparison there into report.md and into report.html's retrieval section."""
    from .manifest import write_json_atomic
    from .report import REPORT_HTML, REPORT_JSON

    path = run_dir / REPORT_JSON
    report = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    kept = [c for c in report.get("retrieval") or [] if _key(c) != _key(comparison)]
    report["retrieval"] = [*kept, comparison]
    write_json_atomic(path, report)
    tables = [markdown_table(c) for c in report["retrieval"]]
    (run_dir / RETRIEVAL_MD).write_text(
        "## Adapter and retrieval: the four-way comparison\n\n" + "\n\n".join(tables) + "\n", encoding="utf-8"
    )
    page = run_dir / REPORT_HTML
    if page.exists():
        text = page.read_text(encoding="utf-8")
        if HTML_START in text and HTML_END in text:
            text = text[: text.index(HTML_START)] + text[text.index(HTML_END) + len(HTML_END) :]
        text = text.replace("</body>", _html(report["retrieval"]) + "</body>", 1)
        page.write_text(text, encoding="utf-8")


def _html(comparisons: list[dict[str, Any]]) -> str:
    parts = [HTML_START, "<h2>Adapter and retrieval: the four-way comparison</h2>"]
    for comparison in comparisons:
        columns = _columns(comparison)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        rows = "".join(
            f"<tr><td>{html.escape(r['system'])}</td>"
            + "".join(f"<td>{'–' if r.get(c) is None else f'{r[c]:.3f}'}</td>" for c in columns)
            + "</tr>"
            for r in comparison["systems"]
        )
        parts.append(
            f"<p class=sub>{comparison['questions']} questions from <code>{html.escape(comparison['data'])}</code>, "
            f"index <code>{html.escape(comparison['index'])}</code>, top {comparison['top_k']}</p>"
            f"<table><thead><tr><th>system</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
        )
    parts.append(HTML_END)
    return "\n".join(parts) + "\n"


__all__ = ["Question", "compare", "format_table", "read_questions", "retrieval_recall"]
