"""Evaluation shared by every modality: the ``evaluating`` context, extra metrics from plugins, before/after tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .modality import ModalityRun


@dataclass(frozen=True)
class Metric:
    """An extra metric contributed through ``register_metrics``: ``compute(examples) -> float`` over the per-sample
    records of a modality's evaluation."""

    name: str
    compute: Callable[[list[dict[str, Any]]], float]
    modality: str | None = None
    higher_is_better: bool = True


@contextmanager
def evaluating(target: ModalityRun | torch.nn.Module | list[torch.nn.Module]) -> Iterator[None]:
    """Evaluation mode without gradients for the block; afterwards every module's mode, its trainable weights and its
    active PEFT adapter are what they were before.

    polyadapt puts it around every evaluation, ``on_evaluate`` and inference call, so a modality never has to put its
    model in eval mode or back. ``target`` is a run (its ``trainable_modules()``), a module or a list of modules.
    """
    import torch

    modules = target.trainable_modules() if hasattr(target, "trainable_modules") else target
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    # trainable weights are the adapter's: small, so a copy is cheap, and a restored copy makes evaluation harmless
    saved = [[(p, p.detach().clone()) for p in module.parameters() if p.requires_grad] for module in modules]
    active = [getattr(module, "active_adapter", None) if hasattr(module, "set_adapter") else None for module in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for pairs in saved:
                for parameter, copy in pairs:
                    if not torch.equal(parameter, copy):
                        parameter.copy_(copy)
        for module, name in zip(modules, active, strict=True):
            if name is not None and isinstance(name, str) and getattr(module, "active_adapter", None) != name:
                module.set_adapter(name)
        for pairs in modes:
            for module, mode in pairs:
                module.training = mode


def add_plugin_metrics(result: Any, metrics: list[Metric]) -> None:
    """Compute the metrics plugins contributed (``register_metrics``) over ``result.examples``, in place."""
    for metric in metrics:
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
