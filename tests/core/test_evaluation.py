"""The before/after comparison behind report.json, report.html and the demo table."""

from polyadapt.evaluation import compare


def test_compare_says_better_worse_or_same_by_direction():
    def higher(name):
        return name in ("accuracy", "count")

    rows = {
        r["metric"]: r
        for r in compare(
            {"loss": 2.0, "accuracy": 0.5, "count": 26, "wer": 0.1},
            {"loss": 1.0, "accuracy": 0.4, "count": 26, "wer": 0.1, "new": 3.0},
            higher,
        )
    }
    assert rows["loss"]["improved"] is True and rows["loss"]["change"] == -1.0
    assert rows["accuracy"]["improved"] is False
    assert rows["count"]["improved"] is None and rows["wer"]["improved"] is None
    assert rows["new"]["before"] is None and "improved" not in rows["new"]
