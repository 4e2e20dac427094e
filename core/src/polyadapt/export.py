"""Export formats: contributed by plugins through ``register_export_formats``, run by ``polyadapt export``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError, PolyadaptError, RunDirectoryError
from .manifest import now_iso, write_json_atomic


@dataclass(frozen=True)
class ExportFormat:
    """One export format. ``export(run, output_dir) -> dict`` writes into the new, empty ``output_dir`` and returns
    facts worth recording (a measured parity gap, file names); raise :class:`ExportError` to refuse."""

    name: str
    modality: str | None
    help: str
    export: Callable[[Any, Path], dict[str, Any] | None]


def export_run(run_dir: str | Path, format_name: str, output: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Export a finished run; on failure nothing is left at ``output``."""
    from .lifecycle import load_run
    from .plugins import get_plugin_manager

    run_dir, output = Path(run_dir), Path(output)
    run = load_run(run_dir)
    formats = get_plugin_manager().export_formats(run.config.modality)
    if format_name not in formats:
        known = ", ".join(sorted(formats)) or "none"
        raise ExportError(
            f"--format {format_name!r} is not available for modality {run.config.modality!r} (available: {known})"
        )
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise RunDirectoryError(f"{output} exists and is not empty; choose another --output or pass --overwrite")
        shutil.rmtree(output)
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        facts = formats[format_name].export(run, partial) or {}
    except PolyadaptError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ExportError(f"export {format_name!r} failed: {type(exc).__name__}: {exc}") from exc
    record = {"format": format_name, "run": str(run.run_dir.resolve()), "created": now_iso(), **facts}
    write_json_atomic(partial / "export.json", record)
    if output.exists():
        output.rmdir()
    partial.rename(output)
    return record


def merge_with_parity_gate(
    model: Any, outputs: Callable[[Any], Any], tolerance: float, setting: str, method: str
) -> tuple[Any, float]:
    """Fold a peft adapter into its base weights, refusing the merge when the outputs move.

    ``outputs(model)`` runs a fixed input and returns the tensor to compare (logits; padding positions left out); it is
    run in float32 on base+adapter and on the merged model. Returns ``(merged_model, max_abs_gap)``; raises
    :class:`ExportError` naming the measured gap and the ``setting`` that holds the tolerance when it is exceeded.
    """
    import torch

    if not hasattr(model, "merge_and_unload"):
        raise ExportError(f"peft.method {method!r} cannot be merged into the base weights; use the adapter")
    model = model.float().eval()
    with torch.no_grad():
        reference = outputs(model).float()
    merged = model.merge_and_unload().eval()
    if getattr(merged, "hf_quantizer", None) is not None:
        raise ExportError("the base model is held in quantized form; a merged model cannot be saved from it")
    with torch.no_grad():
        candidate = outputs(merged).float()
    gap = (reference - candidate).abs().max().item()
    if not gap <= tolerance:
        raise ExportError(
            f"merged export refused: the merged model's outputs differ from base+adapter by up to {gap:.3g} "
            f"(tolerance {setting} = {tolerance:g})"
        )
    return merged, gap
