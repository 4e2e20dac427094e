"""Retrieval beside the adapter, end to end on a tiny model and a tiny real index: a run trained with ``text.retrieval``
(RAFT prompts), the four-way comparison of ``polyadapt evaluate --retrieve`` (every system scored, the reports kept and
extended), ``polyadapt infer --retrieve`` through the CLI, and recall@k on a hand-made case."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from polyadapt.cli import cli
from polyadapt.errors import DataError
from polyadapt.retrieval_eval import Question, read_questions, retrieval_recall
from tests.text.builders import VOCAB, build_model, build_tokenizer, chat_records, make_config, write_jsonl

pytestmark = pytest.mark.timeout(600)

DOCS = {
    "branches.md": "# Branches\n\n## Hours\n\nBranches open Monday to Friday from 9 am to 5 pm. "
    "Saturday hours are 9 am to 1 pm.\n\n## Holidays\n\nBranches close on public holidays.\n",
    "fees.md": "# Fees\n\n## Checking\n\nThe HarborFlex monthly fee is $6, waived with a $500 balance.\n\n"
    "## Transfers\n\nHarborPay sends up to $2,500 a day. Instant transfers cost 1%.\n",
    "savings.md": "# Savings\n\n## TideSaver\n\nTideSaver pays 3.10% APY with six free withdrawals a month.\n",
    "cards.md": "# Cards\n\n## Limits\n\nThe Anchor Card daily ATM limit is $800.\n",
}
QUESTIONS = [
    {"question": "What APY does TideSaver pay?", "answer": "TideSaver pays 3.10% APY.", "answer_contains": ["3.10%"],
     "source": "savings.md", "answer_contains_v1": ["2.90%"]},
    {"question": "What is the Anchor Card ATM limit?", "answer_contains": ["$800"], "source": "cards.md#limits"},
    {"question": "When are branches open on Saturday?", "answer_contains": ["9 am to 1 pm"], "source": "branches.md"},
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny LLaMA base, an index of :data:`DOCS`, a plain run and a run trained with ``text.retrieval``."""
    import torch

    torch.set_num_threads(2)
    import polyadapt
    from polyadapt.retrieval import build_index

    root = tmp_path_factory.mktemp("retrieval")
    base = root / "llama"
    build_tokenizer(base)
    build_model("llama", base, VOCAB)
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    index = root / "index"
    build_index(docs, index, chunk_tokens=64, overlap=8).close()
    data = root / "data"
    write_jsonl(data / "train.jsonl", chat_records(12))
    write_jsonl(data / "validation.jsonl", chat_records(3, with_facts=True, offset=60))
    write_jsonl(root / "questions.jsonl", QUESTIONS)
    train = {"max_steps": 3, "lr": 0.05, "batch_size": 4, "seed": 0, "eval_every": None,
             "early_stopping_patience": None}  # fmt: skip
    text = {"max_length": 384, "max_new_tokens": 6}
    plain = polyadapt.adapt(make_config(base, data, root / "plain", train=train, eval={"before": False}, text=text))
    retrieval = {"index": str(index), "top_k": 2, "distractors": 1, "drop_golden": 0.25}
    trained = polyadapt.adapt(
        make_config(base, data, root / "raft", train=train, eval={"before": False},
                    text={**text, "retrieval": retrieval})
    )  # fmt: skip
    return {"root": root, "index": index, "plain": plain, "raft": trained, "questions": root / "questions.jsonl",
            "data": data}  # fmt: skip


@dataclass(frozen=True)
class Hit:
    text: str
    source: str
    heading: str | None = None

    @property
    def citation(self) -> str:
        return f"{self.source}#{self.heading}" if self.heading else self.source


def test_recall_at_k_on_a_hand_made_case():
    questions = [
        Question("fee?", "$6", facts=("$6",), source="fees.md"),
        Question("apy?", "3.10%", facts=("3.10%",), source="savings.md#tidesaver"),
        Question("hours?", "9 am", facts=("9 am",)),
        Question("limit?", "$800", facts=("$800",), source="cards.md"),
    ]
    hits = [
        [Hit("The monthly fee is $6.", "fees.md", "checking"), Hit("other", "cards.md")],  # answer and source
        [Hit("TideSaver pays 2.90% APY", "savings.md", "tidesaver")],  # the source, an old value: not the answer
        [Hit("closed on holidays", "branches.md"), Hit("Open from 9  AM to 5 pm", "branches.md")],  # case, spaces
        [Hit("no", "fees.md"), Hit("still no", "savings.md")],  # neither
    ]
    scores = retrieval_recall(questions, hits)
    assert scores == {"recall": 2 / 4, "source_recall": 2 / 3}


def test_question_files_are_read_and_bad_records_named(tmp_path):
    good = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    questions = read_questions(good)
    assert [q.facts for q in questions] == [("3.10%",), ("$800",), ("9 am to 1 pm",)]
    assert questions[0].reference == "TideSaver pays 3.10% APY." and questions[1].reference == "$800"
    assert questions[0].old_facts == ("2.90%",) and questions[1].old_facts == ()
    bad = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], {"question": "", "answer_contains": ["x"]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 'question' must be a non-empty string"):
        read_questions(bad)
    with pytest.raises(DataError, match=r"bad2\.jsonl:1: give 'answer_contains'"):
        read_questions(write_jsonl(tmp_path / "bad2.jsonl", [{"question": "why?"}]))


def test_a_run_trained_with_retrieval_records_its_raft_prompts(world):
    manifest = json.loads((world["raft"] / "polyadapt.json").read_text())
    train = manifest["data"]["prepared"]["train"]["retrieval"]
    held_out = manifest["data"]["prepared"]["validation"]["retrieval"]
    assert train["index"] == str(world["index"]) and train["grounded"] == 12
    assert train["with_golden"] + train["golden_dropped"] + train["golden_not_found"] == 12
    assert train["with_golden"] > 0 and train["seed"] == 0
    from polyadapt.retrieval import open_index

    assert train["documents_fingerprint"] == open_index(world["index"]).manifest["documents"]["fingerprint"]
    assert held_out["grounded"] == 3 and held_out["excerpts"] == 6
    plain = json.loads((world["plain"] / "polyadapt.json").read_text())
    assert "retrieval" not in plain["data"]["prepared"]["train"]


def test_evaluate_retrieve_scores_four_systems_and_keeps_the_report(world):
    run = world["raft"]
    before = json.loads((run / "report.json").read_text())
    args = ["evaluate", str(run), "--retrieve", str(world["index"]), "--data", str(world["questions"]), "--top-k", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    names = ["base", "base + retrieval", "retrieval-trained adapter", "retrieval-trained adapter + retrieval"]
    for name in names:
        assert name in result.output
    report = json.loads((run / "report.json").read_text())
    assert report["metrics"] == before["metrics"] and report["examples"] == before["examples"]
    (comparison,) = report["retrieval"]
    assert [s["system"] for s in comparison["systems"]] == names
    assert comparison["questions"] == 3 and comparison["top_k"] == 2
    from polyadapt.retrieval import open_index

    index = open_index(world["index"])
    expected = retrieval_recall(read_questions(world["questions"]),
                                [index.search(q["question"], top_k=2) for q in QUESTIONS])  # fmt: skip
    for row in comparison["systems"]:
        assert 0.0 <= row["fact_accuracy"] <= 1.0 and 0.0 <= row["token_f1"] <= 1.0
        assert "old_value" in row  # the first question gives its old value
        if row["retrieval"]:
            assert row["recall@2"] == pytest.approx(expected["recall"])
            assert row["source_recall@2"] == pytest.approx(expected["source_recall"])
            assert 0.0 <= row["citation_accuracy"] <= 1.0
        else:
            assert "recall@2" not in row and "citation_accuracy" not in row
    assert "retrieval-trained adapter + retrieval" in (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    assert page.count("four-way comparison") == 1 and "Held-out metrics, before vs after" in page
    # the same comparison again replaces itself; another k is added beside it
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert CliRunner().invoke(cli, [*args[:-1], "1"]).exit_code == 0
    report = json.loads((run / "report.json").read_text())
    assert sorted(c["top_k"] for c in report["retrieval"]) == [1, 2]
    assert (run / "report.html").read_text().count("four-way comparison") == 1
    manifest = json.loads((run / "polyadapt.json").read_text())
    assert [e.get("kind") for e in manifest["evaluations"]].count("retrieval") == 3


def test_evaluate_retrieve_on_the_runs_own_held_out_split_labels_a_plain_adapter(world):
    result = CliRunner().invoke(cli, ["evaluate", str(world["plain"]), "--retrieve", str(world["index"])])
    assert result.exit_code == 0, result.output
    (comparison,) = json.loads((world["plain"] / "report.json").read_text())["retrieval"]
    assert [s["system"] for s in comparison["systems"]][2:] == ["adapter", "adapter + retrieval"]
    assert comparison["questions"] == 3 and comparison["top_k"] == 4
    assert all("source_recall@4" not in s for s in comparison["systems"])  # chat records name no source


def test_evaluate_retrieve_refuses_a_missing_index_and_a_stray_top_k(world, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", str(world["plain"]), "--retrieve", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "--retrieve:" in result.output and "does not exist" in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(world["plain"]), "--top-k", "3"])
    assert result.exit_code == 2 and "--top-k: only with --retrieve" in result.output


def test_infer_retrieve_puts_the_chunks_in_the_prompt_and_prints_the_sources(world, monkeypatch):
    import polyadapt_text.modality as text_modality

    asked: list[list[int]] = []
    generate = text_modality.TextRun.generate

    def spy(self, prompts, *args, **kwargs):
        asked.extend(prompts)
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(text_modality.TextRun, "generate", spy)
    args = ["infer", str(world["raft"]), "--prompt", "What APY does TideSaver pay?", "--retrieve",
            str(world["index"]), "--top-k", "2", "--max-new-tokens", "4"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index("Sources:")
    listed = [line for line in lines[start + 1 :] if line.strip()]
    assert len(listed) == 2 and listed[0].startswith("[1] savings.md#tidesaver")
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(world["root"] / "llama")).decode(asked[0])
    assert "[1] savings.md#tidesaver: TideSaver pays 3.10% APY" in prompt and "<|im_start|>user" in prompt
    plain = CliRunner().invoke(cli, [*args[:4], "--max-new-tokens", "4"])
    assert plain.exit_code == 0 and "Sources:" not in plain.output
    missing = CliRunner().invoke(cli, [*args[:4], "--retrieve", str(world["root"] / "missing")])
    assert missing.exit_code == 2 and "--retrieve:" in missing.output
    stray = CliRunner().invoke(cli, [*args[:4], "--top-k", "2"])
    assert stray.exit_code == 2 and "--top-k: only with --retrieve" in stray.output
