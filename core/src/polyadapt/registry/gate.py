"""The promotion gate: held-out evidence a version must show before an alias moves to it.

Three kinds of condition, each reported with its numbers whether it passed or not:

- **gain**: the headline metric (``metrics.headline`` of the run) beats the base by at least ``min_gain``, in the
  metric's own units and direction (``min_gain=0.05`` on fact accuracy: five points better than the base);
- **forgetting**: every general-data metric (``eval.general_data``, measured before and after) regresses by at most
  ``max_forgetting``, relative to the base's value (``0.05``: at most 5% worse). A version with no general-data
  metrics fails this condition: the gate cannot tell what it forgot;
- **incumbent**: it is no worse on the headline metric than the version the alias holds now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import Version

DEFAULT_MIN_GAIN = 0.0
DEFAULT_MAX_FORGETTING = 0.05


@dataclass(frozen=True)
class Condition:
    """One gate condition: its name (``gain``, ``forgetting:<metric>``, ``incumbent``), whether it passed and its
    numbers in words."""

    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


def improvement(before: float, after: float, higher_is_better: bool) -> float:
    """How much better ``after`` is than ``before`` in the metric's direction (negative: worse)."""
    return after - before if higher_is_better else before - after


def relative_regression(before: float, after: float, higher_is_better: bool) -> float:
    """How much worse ``after`` is than ``before``, as a fraction of ``before`` (0 when it is not worse)."""
    worse = -improvement(before, after, higher_is_better)
    if worse <= 0:
        return 0.0
    return math.inf if before == 0 else worse / abs(before)


def conditions(
    candidate: Version, incumbent: Version | None, *, min_gain: float, max_forgetting: float
) -> list[Condition]:
    """Every condition for moving an alias from ``incumbent`` (None: the alias is new) to ``candidate``."""
    summary = candidate.summary
    metrics = summary.get("metrics") or {}
    directions = summary.get("directions") or {}
    found: list[Condition] = []

    headline = candidate.headline
    before, after = (metrics.get("before") or {}), (metrics.get("after") or {})
    if headline is None or headline not in after:
        found.append(Condition("gain", False, "the run records no headline metric after adaptation"))
    elif headline not in before:
        found.append(Condition("gain", False, f"{headline}: the run has no 'before' value (eval.before was off)"))
    else:
        higher = directions.get(headline, True)
        gain = improvement(before[headline], after[headline], higher)
        found.append(
            Condition(
                "gain", gain >= min_gain and gain > 0,
                f"{headline} {before[headline]:.4g} -> {after[headline]:.4g} "
                f"({'+' if gain >= 0 else ''}{gain:.4g} {'better' if gain >= 0 else 'worse'}; needs >= {min_gain:g} "
                f"and above the base)",
            )
        )  # fmt: skip

    general_before = metrics.get("general_before") or {}
    general_after = metrics.get("general_after") or {}
    shared = [m for m in general_after if m in general_before]
    if not shared:
        found.append(
            Condition(
                "forgetting", False,
                "no general-data metrics recorded (adapt with eval.general_data, or a data directory with general/)",
            )
        )  # fmt: skip
    for metric in shared:
        higher = directions.get(metric, True)
        old, new = general_before[metric], general_after[metric]
        regression = relative_regression(old, new, higher)
        found.append(
            Condition(
                f"forgetting:{metric}", regression <= max_forgetting,
                f"{metric} {old:.4g} -> {new:.4g} on general data ({regression:.1%} worse; budget {max_forgetting:.1%})",
            )
        )  # fmt: skip

    if incumbent is not None and incumbent.version != candidate.version:
        theirs = (incumbent.summary.get("metrics") or {}).get("after") or {}
        if headline is None or headline not in after or headline not in theirs:
            found.append(
                Condition(
                    "incumbent", False,
                    f"cannot compare with {incumbent.label}: headline {headline!r} vs {incumbent.headline!r}",
                )
            )  # fmt: skip
        else:
            higher = directions.get(headline, True)
            delta = improvement(theirs[headline], after[headline], higher)
            same_data = incumbent.data_fingerprint == candidate.data_fingerprint
            note = "" if same_data else " (the two were measured on different data snapshots)"
            found.append(
                Condition(
                    "incumbent", delta >= 0,
                    f"{headline} {after[headline]:.4g} vs {theirs[headline]:.4g} for {incumbent.label} "
                    f"({'no worse' if delta >= 0 else 'worse'}){note}",
                )
            )  # fmt: skip
    return found
