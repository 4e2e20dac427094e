"""Evaluation shared by every modality: held-out loss, extra metrics from plugins, before/after comparison."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """An extra metric contributed through ``register_metrics``: ``compute(examples) -> float`` over the per-sample
    records of a modality's evaluation."""

    name: str
    compute: Callable[[list[dict[str, Any]]], float]
    modality: str | None = None
    higher_is_better: bool = True


def add_plugin_metrics(result: Any, modality: str) -> None:
    """Compute the metrics plugins contributed (``register_metrics``) over ``result.examples``, in place."""
    from .plugins import get_plugin_manager

    for metric in get_plugin_manager().metrics(modality):
        if metric.name not in result.metrics and result.examples:
            result.metrics[metric.name] = float(metric.compute(result.examples))


def compare(
    before: dict[str, float] | None, after: dict[str, float], higher_is_better: Callable[[str], bool]
) -> list[dict[str, Any]]:
    """Rows of the before/after table: value before, after, change, and whether the change is an improvement."""
    rows = []
    for name, value in after.items():
        old = (before or {}).get(name)
        higher = higher_is_better(name)
        row: dict[str, Any] = {"metric": name, "before": old, "after": value, "higher_is_better": higher}
        if old is not None:
            row["change"] = value - old
            # None when nothing moved (counts, saturated scores): neither better nor worse
            row["improved"] = None if value == old else (value > old if higher else value < old)
        rows.append(row)
    return rows
