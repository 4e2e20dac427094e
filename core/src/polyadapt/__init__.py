"""polyadapt: one lifecycle (adapt, evaluate, version, export, serve) for adapting text, speech and image models.

Importing this package is cheap: torch and the modality libraries are imported only when a run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    DataError,
    ExportError,
    PluginError,
    PolyadaptError,
    RunDirectoryError,
    TrainingDivergedError,
)
from .hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathlib import Path

    from .config import AdaptConfig


def adapt(config: AdaptConfig | str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Adapt the config's base model to its data; return the run directory. Same call for every modality."""
    from .lifecycle import adapt as _adapt

    return _adapt(config, resume=resume, overwrite=overwrite)


def evaluate(run_dir: str | Path, data: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate base vs adapted model of a finished run on held-out data; update its report. Returns report.json."""
    from .lifecycle import evaluate as _evaluate

    return _evaluate(run_dir, data=data, **options)


__all__ = [
    "ConfigError",
    "DataError",
    "ExportError",
    "PluginError",
    "PolyadaptError",
    "RunDirectoryError",
    "TrainingDivergedError",
    "__version__",
    "adapt",
    "evaluate",
    "hookimpl",
]
