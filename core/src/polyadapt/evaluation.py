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
