"""Typed errors. The library raises these; only the CLI turns them into one-line messages."""

from __future__ import annotations

from typing import Any


class PolyadaptError(Exception):
    """Base of every error polyadapt raises on purpose. The CLI exits 2 on these."""

    exit_code = 2


class ConfigError(PolyadaptError):
    """The configuration is invalid. ``problems`` holds every problem found, one line each."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{where}{len(self.problems)} problems in the configuration:\n{lines}"
        super().__init__(message)


class DataError(PolyadaptError):
    """The data is invalid. ``problems`` holds every bad sample found (``polyadapt.data.Problem``)."""

    def __init__(self, message: str, problems: list | None = None):
        self.problems = list(problems or [])
        if self.problems:
            shown = "\n".join(f"  - {p}" for p in self.problems[:200])
            more = len(self.problems) - 200
            tail = f"\n  ... and {more} more" if more > 0 else ""
            message = f"{message}\n{shown}{tail}"
        super().__init__(message)


class PluginError(PolyadaptError):
    """A plugin or modality is missing, failed to load, or broke its contract."""


class RunDirectoryError(PolyadaptError):
    """The output/run directory is in a state that forbids the operation (exists, incomplete, not a run)."""


class TrainingDivergedError(PolyadaptError):
    """The loss became NaN or infinite. ``step`` is the optimizer step at which it happened."""

    def __init__(self, step: int, value: float, checkpoint: str | None):
        self.step = step
        self.value = value
        self.checkpoint = checkpoint
        kept = f"; last good checkpoint kept at {checkpoint}" if checkpoint else "; no checkpoint was saved before it"
        super().__init__(f"loss became {value} at step {step}{kept}")


class ExportError(PolyadaptError):
    """An export failed, for example because the parity gate measured too large a gap."""


class TuneError(PolyadaptError):
    """``polyadapt tune`` cannot run, or every trial failed. ``result`` holds the trials when there are any (a
    :class:`polyadapt.tune.TuneResult`)."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class RegistryError(PolyadaptError):
    """A registry operation is refused or the registry cannot be read: an unknown name or version, a bad reference,
    a file whose digest does not match, a delete while an alias points at the version."""


class PromotionRefused(RegistryError):
    """``promote`` found failed gate conditions. ``conditions`` holds every condition checked
    (:class:`polyadapt.registry.gate.Condition`), passed and failed."""

    def __init__(self, label: str, alias: str, conditions: list[Any]) -> None:
        self.conditions = list(conditions)
        failed = [c for c in self.conditions if not c.passed]
        lines = "\n".join(f"  - {c.name}: {c.detail}" for c in failed)
        super().__init__(
            f"promotion of {label} to @{alias} refused: {len(failed)} condition(s) failed\n{lines}\n"
            "(--force --reason TEXT overrides; the history records it)"
        )
