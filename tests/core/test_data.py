"""Data helpers every modality uses."""

from polyadapt.data import Problem, deterministic_holdout, read_jsonl, resolve_inside


def test_read_jsonl_keeps_line_numbers_and_names_every_bad_line(tmp_path):
    path = tmp_path / "metadata.jsonl"
    path.write_text('{"a": 1}\n\n{broken\n[1, 2]\n{"b": 2}\n')
    records, problems = read_jsonl(path, "metadata.jsonl", split="train", expected="an object with a")
    assert records == [(1, {"a": 1}), (5, {"b": 2})]
    assert [str(p) for p in problems] == [
        "metadata.jsonl:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "metadata.jsonl:4: expected an object with a, got list",
    ]
    assert all(p.split == "train" for p in problems)
    path.write_bytes(b'{"a": "\xff"}\n')
    records, problems = read_jsonl(path, "metadata.jsonl")
    assert records == [] and problems[0].reason.startswith("not UTF-8 text") and "at byte 7" in problems[0].reason


def test_resolve_inside_rejects_escaping_paths(tmp_path):
    assert resolve_inside(tmp_path, "a/b.wav") == tmp_path.resolve() / "a" / "b.wav"
    assert resolve_inside(tmp_path, "../outside.wav") is None
    assert resolve_inside(tmp_path, "/etc/passwd") is None


def test_holdout_is_deterministic_and_never_empties_train():
    items = list(range(20))
    train, held, indices = deterministic_holdout(items, 0.25, seed=7)
    assert (train, held, indices) == deterministic_holdout(items, 0.25, seed=7)
    assert len(held) == 5 and sorted(train + held) == items and held == indices
    assert deterministic_holdout([1, 2], 0.9, seed=0)[0] == [1] or deterministic_holdout([1, 2], 0.9, seed=0)[0] == [2]
    assert deterministic_holdout([1], 0.5, seed=0) == ([1], [], [])
    assert str(Problem("f.jsonl", "bad", line=3)) == "f.jsonl:3: bad"
