"""Reading text datasets: formats, layouts, every bad-input case, duplicates and leakage."""

from __future__ import annotations

import json

import pytest

from polyadapt.errors import DataError
from polyadapt.modality import DataContext
from polyadapt_text.data import find_leakage, read_jsonl, read_text_dataset
from tests.text.builders import chat_records, make_config, prompt_records, text_records, write_jsonl


@pytest.fixture
def load(tiny_llama, modality):
    """A function: (data path, config sections) -> the dataset as polyadapt uses it (held-out split chosen)."""

    def load(path, **sections):
        config = make_config(tiny_llama, path, **sections)
        return modality.load_data(DataContext(config=config, path=path))

    return load


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (text_records(3), "text"),
        (prompt_records(3), "prompt_completion"),
        (chat_records(3), "chat"),
    ],
)
def test_format_detected_per_file(tmp_path, records, expected):
    samples, problems, used = read_jsonl(write_jsonl(tmp_path / "train.jsonl", records))
    assert used == expected
    assert problems == []
    assert [s.format for s in samples] == [expected] * 3


def test_each_file_of_a_directory_gets_its_own_format(tmp_path, load):
    write_jsonl(tmp_path / "train.jsonl", prompt_records(4))
    write_jsonl(tmp_path / "validation.jsonl", chat_records(2))
    splits = load(tmp_path)
    assert splits.details["formats"] == {"train.jsonl": "prompt_completion", "validation.jsonl": "chat"}
    assert (len(splits.train), len(splits.validation)) == (4, 2)


def test_forced_format_rejects_other_records(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", chat_records(2))
    samples, problems, used = read_jsonl(path, "prompt_completion")
    assert used == "prompt_completion" and samples == []
    assert [p.line for p in problems] == [1, 2]
    assert "missing key 'prompt'" in problems[0].reason


BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object, got list"),
    ('{"prompt": "hi"}', "missing key 'messages'"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "extra": 1}',
        "unknown key 'extra'",
    ),
    ('{"messages": []}', "non-empty list"),
    (
        '{"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "yo"}]}',
        "messages[0]: empty content",
    ),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}', "unknown role 'bot'"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}',
        "'content' must be a string",
    ),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}', "missing key 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer_contains": "yo"}',
        "answer_contains",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}',
        "system message may only come first",
    ),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_chat_line_is_named_with_its_reason(tmp_path, line, reason):
    good = json.dumps(chat_records(1)[0])
    path = write_jsonl(tmp_path / "train.jsonl", [good, line, good.replace("ticket 0", "ticket 9")])
    samples, problems, _ = read_jsonl(path)
    assert len(samples) == 2
    assert len(problems) == 1
    assert problems[0].line == 2 and problems[0].file == str(path)
    assert reason in problems[0].reason


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"text": ""}, "empty content in 'text'"),
        ({"text": 5}, "'text' must be a string"),
        ({"prompt": "q", "completion": "  "}, "empty content in 'completion'"),
        ({"prompt": "q"}, "missing key 'completion'"),
        ({"prompt": "q", "completion": "a", "answer": "a"}, "unknown key 'answer'"),
    ],
)
def test_bad_text_and_prompt_records(tmp_path, record, reason):
    first = text_records(1)[0] if "text" in record else prompt_records(1)[0]
    samples, problems, _ = read_jsonl(write_jsonl(tmp_path / "train.jsonl", [first, record]))
    assert [(p.line, reason in p.reason) for p in problems] == [(2, True)]


def test_undecidable_format_is_a_problem_per_line(tmp_path):
    _, problems, used = read_jsonl(write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}]))
    assert used is None
    assert "cannot tell the format" in problems[0].reason and problems[0].line == 1


def test_blank_lines_are_ignored_and_lines_counted_from_one(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n" + json.dumps(text_records(1)[0]) + "\n\n{bad\n")
    samples, problems, _ = read_jsonl(path)
    assert samples[0].line == 2
    assert problems[0].line == 4


def test_bad_samples_reach_the_core_policy(tmp_path, modality, tiny_llama):
    from polyadapt.lifecycle import read_data
    from tests.text.builders import make_config

    write_jsonl(tmp_path / "data" / "train.jsonl", [*chat_records(4), '{"messages": 1}'])
    config = make_config(tiny_llama, tmp_path / "data")
    with pytest.raises(DataError) as caught:
        read_data(modality, config)
    assert "train.jsonl:5" in str(caught.value)
    skip = make_config(tiny_llama, tmp_path / "data", data={"on_bad_sample": "skip"})
    splits, skipped = read_data(modality, skip)
    assert len(splits.train) + len(splits.validation) == 4
    assert skipped[0]["line"] == 5


def test_directory_without_a_split_is_a_data_error(tmp_path, load):
    (tmp_path / "notes.txt").write_text("x")
    assert read_text_dataset(tmp_path).splits == {}
    with pytest.raises(DataError, match="expected train.jsonl"):
        load(tmp_path)


def test_only_the_splits_found_are_read(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", chat_records(5))
    write_jsonl(tmp_path / "test.jsonl", chat_records(2, offset=50))
    found = read_text_dataset(tmp_path)
    assert {split: len(samples) for split, samples in found.splits.items()} == {"train": 5, "test": 2}
    assert [f.name for f in found.files] == ["train.jsonl", "test.jsonl"]


def test_holdout_is_cut_by_the_core_deterministically(tmp_path, load):
    write_jsonl(tmp_path / "train.jsonl", chat_records(30))
    first = load(tmp_path, data={"holdout": 0.2}, train={"seed": 5})
    again = load(tmp_path, data={"holdout": 0.2}, train={"seed": 5})
    other = load(tmp_path, data={"holdout": 0.2}, train={"seed": 6})
    assert len(first.validation) == 6 and len(first.train) == 24
    assert first.heldout["source"] == "holdout" and first.heldout["fraction"] == 0.2
    assert first.heldout["indices"] == again.heldout["indices"] != other.heldout["indices"]
    assert [s.where for s in first.validation] == [s.where for s in again.validation]


def test_single_jsonl_file_is_the_train_split(tmp_path, load):
    path = write_jsonl(tmp_path / "notes.jsonl", text_records(10))
    splits = load(path)
    assert splits.heldout["source"] == "holdout"
    assert len(splits.train) + len(splits.validation) == 10 and splits.validation


def test_test_file_serves_as_held_out_split(tmp_path, load):
    write_jsonl(tmp_path / "train.jsonl", chat_records(5))
    write_jsonl(tmp_path / "test.jsonl", chat_records(2, offset=50))
    splits = load(tmp_path)
    assert len(splits.validation) == 2 and splits.heldout == {"source": "test"}


def test_validation_file_wins_over_test_file(tmp_path, load):
    write_jsonl(tmp_path / "train.jsonl", chat_records(5))
    write_jsonl(tmp_path / "validation.jsonl", chat_records(3, offset=50))
    write_jsonl(tmp_path / "test.jsonl", chat_records(2, offset=70))
    splits = load(tmp_path)
    assert len(splits.validation) == 3 and splits.heldout == {"source": "validation"}
    assert any("both validation.jsonl and test.jsonl" in w for w in splits.warnings)


def test_held_out_file_alone_gives_an_empty_train(tmp_path, load):
    write_jsonl(tmp_path / "validation.jsonl", chat_records(3))
    splits = load(tmp_path)
    assert len(splits.train) == 0 and len(splits.validation) == 3


def test_exact_and_near_duplicates_dropped_with_counts(tmp_path, load):
    records = chat_records(4)
    near = json.loads(json.dumps(records[1]))
    near["messages"][0]["content"] = near["messages"][0]["content"].upper() + "!!"
    write_jsonl(tmp_path / "train.jsonl", [*records, records[0], records[0], near])
    write_jsonl(tmp_path / "validation.jsonl", chat_records(1, offset=70))
    splits = load(tmp_path)
    assert len(splits.train) == 4
    assert splits.dropped == {"exact_duplicate": 2, "near_duplicate": 1}
    assert any("duplicate" in w for w in splits.warnings)
    kept = load(tmp_path, text={"drop_duplicates": False})
    assert len(kept.train) == 7 and kept.dropped == {}


def test_leakage_between_train_and_validation_is_reported(tmp_path, load):
    records = chat_records(6)
    leaked = json.loads(json.dumps(records[2]))
    leaked["messages"][1]["content"] = leaked["messages"][1]["content"].lower()
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "validation.jsonl", [leaked, *chat_records(2, offset=40)])
    splits = load(tmp_path)
    assert splits.details["leakage"]["count"] == 1
    assert splits.details["leakage"]["pairs"][0] == [
        f"{tmp_path / 'validation.jsonl'}:1",
        f"{tmp_path / 'train.jsonl'}:3",
    ]
    assert any("leakage" in w for w in splits.warnings)


def test_doctor_lists_problems_with_file_and_line(tmp_path, tiny_llama):
    import subprocess
    import sys

    import yaml

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [*chat_records(3), '{"messages": [{"role": "robot", "content": "x"}]}'])
    config = {"modality": "text", "base": str(tiny_llama), "data": {"path": str(data)}, "output": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "polyadapt", "doctor", str(tmp_path / "c.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert f"{data / 'train.jsonl'}:4" in done.stdout + done.stderr
    assert "unknown role 'robot'" in done.stdout + done.stderr


def test_a_general_subdirectory_is_not_read_as_data(tmp_path, load):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", chat_records(5))
    write_jsonl(data / "validation.jsonl", chat_records(2, offset=50))
    write_jsonl(data / "general" / "train.jsonl", chat_records(4, offset=80))
    write_jsonl(data / "general" / "validation.jsonl", chat_records(3, offset=90))
    splits = load(data)
    assert (len(splits.train), len(splits.validation)) == (5, 2)
    assert splits.files == [data / "train.jsonl", data / "validation.jsonl"]


def test_the_demo_general_set_asks_outside_the_domain_and_checks_facts():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sample_data" / "text"
    found = read_text_dataset(root / "general")
    general = found.splits["validation"]
    assert list(found.splits) == ["validation"] and not found.problems and len(general) == 12
    assert all(s.answer_contains and s.format == "chat" for s in general)
    words = ("harbor", "tidesaver", "anchor", "mooring", "lighthouse", "fair winds", "bank")
    assert not any(w in s.content().lower() for s in general for w in words)
    train = read_text_dataset(root).splits["train"]
    assert not find_leakage(train, general)
