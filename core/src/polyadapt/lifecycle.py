"""The lifecycle every modality shares: adapt -> evaluate (before vs after, held out) -> version (manifest) -> serve.

Data flows one way: config -> plugin manager -> modality (model, data, loss) -> the core loop -> adapter + manifest.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import AdaptConfig, ResolvedBase, load_config, validate_config
from .data import enforce_bad_sample_policy, fingerprint, sha256_file
from .errors import ConfigError, RunDirectoryError
from .manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    base_weights_digest,
    hardware_info,
    library_versions,
    now_iso,
    plugin_versions,
    read_manifest,
    write_json_atomic,
)
from .plugins import get_plugin_manager

if TYPE_CHECKING:
    import torch

    from .modality import DatasetSplits, EvalResult, Modality, ModelBundle, PreparedSplit, RunContext

REPORT_JSON = "report.json"


@dataclass
class LoadedRun:
    """A finished run, loaded for evaluation, inference or export: the base model with the run's adapter attached."""

    run_dir: Path
    config: AdaptConfig
    manifest: dict[str, Any]
    modality: Modality
    bundle: ModelBundle
    ctx: RunContext


# -- shared steps -------------------------------------------------------------------------------------------------


def resolve_base(reference: str) -> ResolvedBase:
    resolved = get_plugin_manager().hook.resolve_base(reference=reference)
    if resolved is None:
        raise ConfigError(f"base: cannot resolve {reference!r}")
    return resolved


def read_data(modality: Modality, config: AdaptConfig, path: Path | None = None) -> tuple[DatasetSplits, list[dict]]:
    """The modality reads the dataset; polyadapt applies ``data.on_bad_sample`` to the bad samples it found."""
    path = Path(path or config.data.path)
    splits = modality.load_data(config, path)
    skipped = enforce_bad_sample_policy(list(splits.problems), config.data.on_bad_sample, str(path))
    return splits, skipped


def resolve_precision(precision: str) -> str:
    """accelerate's mixed-precision name for ``train.precision``."""
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: 'fp16' needs a CUDA GPU and none was found (use auto, fp32 or bf16)")
    return {"fp32": "no"}.get(precision, precision)


def compute_dtype(mixed_precision: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def make_accelerator(config: AdaptConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several runs in one process (tests, notebooks) each get their own precision settings.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    kwargs: dict[str, Any] = {}
    if config.train.trackers:
        kwargs = {"log_with": list(config.train.trackers), "project_dir": str(run_dir / "logs")}
    import torch

    # Without CUDA, accelerate only forms a process group (gloo) when told it runs on CPU.
    cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=resolve_precision(config.train.precision), cpu=cpu, **kwargs)


def measure(
    accelerator: Any, modality: Modality, bundle: ModelBundle, samples: Any, prepared: PreparedSplit, ctx: RunContext
) -> EvalResult | None:
    """Held-out loss (every process) and the modality's metrics (main process) of the current ``bundle.model``."""
    from .evaluation import add_plugin_metrics
    from .training import evaluate_loss

    batch = ctx.config.eval.batch_size or ctx.config.train.batch_size
    loss = evaluate_loss(accelerator, modality, bundle, bundle.model, prepared, batch)
    result = None
    if accelerator.is_main_process:
        bundle.model.eval()
        result = modality.evaluate(bundle, samples, ctx, loss)
        if loss is not None:
            result.metrics = {"eval_loss": loss, **result.metrics}
        add_plugin_metrics(result, ctx.config.modality)
    accelerator.wait_for_everyone()
    return result


def limit(samples: Any, max_samples: int | None) -> Any:
    return samples if max_samples is None else samples[:max_samples]


# -- run directory ------------------------------------------------------------------------------------------------


def claim_run_dir(run_dir: Path, config: AdaptConfig, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Make ``run_dir`` ready; return the previous manifest when resuming. Never touches a directory it did not make."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            raise RunDirectoryError(f"--resume: {run_dir} holds no run to resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    try:
        manifest = read_manifest(run_dir)
    except ValueError as exc:
        raise RunDirectoryError(
            f"{run_dir / MANIFEST_NAME} is not valid JSON ({exc}); refusing to touch {run_dir}"
        ) from None
    if manifest is None:
        raise RunDirectoryError(f"{run_dir} exists, is not empty and is not a polyadapt run; choose another output")
    status = manifest.get("status")
    if overwrite:
        shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        return None
    if status == "complete":
        raise RunDirectoryError(f"{run_dir} holds a complete run; pass --overwrite to replace it")
    if not resume:
        raise RunDirectoryError(
            f"{run_dir} holds an unfinished run (status: {status}); pass --resume to continue it or --overwrite to restart"
        )
    previous = manifest.get("config", {})
    current = config.to_dict()
    changed = sorted(_diff_keys(previous, current))
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the run's in {', '.join(changed)}; resume with the same config"
        )
    return manifest


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


# -- adapt --------------------------------------------------------------------------------------------------------


def adapt(config: AdaptConfig | str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the whole lifecycle for one config; return the run directory (see :func:`polyadapt.adapt`)."""
    from accelerate.utils import set_seed

    from .adapters import count_parameters
    from .checkpoint import list_checkpoints
    from .modality import RunContext
    from .report import write_reports
    from .training import train_loop

    pm = get_plugin_manager()
    if not isinstance(config, AdaptConfig):
        config = load_config(config)
    modality = pm.get_modality(config.modality)
    base = resolve_base(config.base)
    splits, skipped = read_data(modality, config)
    run_dir = Path(config.output)
    accelerator = make_accelerator(config, run_dir)
    is_main = accelerator.is_main_process
    previous = claim_run_dir(run_dir, config, resume, overwrite) if is_main else None
    accelerator.wait_for_everyone()
    resume_from = (list_checkpoints(run_dir) or [None])[-1] if resume else None

    manifest: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "status": "running",
        "polyadapt_version": _version(),
        "plugins": plugin_versions(pm),
        "modality": config.modality,
        "base": {"reference": base.reference, "path": str(base.path) if base.path else None, "hub_id": base.hub_id},
        "config": config.to_dict(),
        "data": _data_record(config, splits, skipped),
        "seed": config.train.seed,
        "hardware": hardware_info(),
        "libraries": library_versions(),
        "started": (previous or {}).get("started", now_iso()),
        "resumed": [*((previous or {}).get("resumed", [])), *([now_iso()] if previous else [])],
        # A resumed run keeps the base model's metrics measured when it started.
        "metrics": {k: (previous or {}).get("metrics", {}).get(k) for k in ("before", "general_before")},
    }
    if is_main:
        manifest["base"]["weights_sha256"] = base_weights_digest(base.path)
        write_json_atomic(run_dir / MANIFEST_NAME, manifest)
    try:
        set_seed(config.train.seed)
        ctx = RunContext(
            config=config, base=base, device=accelerator.device, dtype=compute_dtype(accelerator.mixed_precision),
            run_dir=run_dir, is_main_process=is_main, num_processes=accelerator.num_processes,
        )  # fmt: skip
        bundle = modality.load_base(ctx)
        bundle.model.to(accelerator.device)
        manifest["base"].update(bundle.info)
        eval_samples = limit(splits.validation, config.eval.max_samples)
        train_prep = modality.prepare(bundle, splits.train, ctx, True)
        eval_prep = modality.prepare(bundle, eval_samples, ctx, False)
        manifest["data"]["prepared"] = {"train": train_prep.stats, "validation": eval_prep.stats}
        general = _general_data(modality, config, bundle, ctx)

        before = general_before = None
        if config.eval.before and manifest["metrics"]["before"] is None:
            before = measure(accelerator, modality, bundle, eval_samples, eval_prep, ctx)
            if general is not None:
                general_before = measure(accelerator, modality, bundle, general[0], general[1], ctx)
            if is_main:
                manifest["metrics"]["before"] = before.metrics if before else None
                manifest["metrics"]["general_before"] = general_before.metrics if general_before else None
                write_json_atomic(run_dir / MANIFEST_NAME, manifest)

        set_seed(config.train.seed)
        modality.add_adapter(bundle, ctx)
        bundle.model.to(accelerator.device)
        manifest["adapter"] = {"parameters": count_parameters(bundle.model), "method": config.peft.method}
        if config.train.trackers:
            accelerator.init_trackers("polyadapt", config=_flat_hparams(config))
        callbacks = pm.callbacks(config)
        extra_eval = None
        if config.train.early_stopping_metric != "eval_loss":

            def extra_eval() -> dict[str, float]:
                from accelerate.utils import broadcast_object_list

                box = [modality.evaluate(bundle, eval_samples, ctx, None).metrics if is_main else None]
                broadcast_object_list(box)
                return box[0]

        result = train_loop(
            accelerator=accelerator, modality=modality, bundle=bundle, ctx=ctx, train_split=train_prep,
            eval_split=eval_prep, run_dir=run_dir, callbacks=callbacks, resume_from=resume_from, extra_eval=extra_eval,
        )  # fmt: skip
        after = measure(accelerator, modality, bundle, eval_samples, eval_prep, ctx)
        general_after = measure(accelerator, modality, bundle, general[0], general[1], ctx) if general else None
        if config.train.trackers:
            accelerator.end_training()
        if is_main:
            modality.save_adapter(bundle, run_dir)
            before_result = before
            if before_result is None and manifest["metrics"]["before"] is not None:
                from .modality import EvalResult

                before_result = EvalResult(metrics=manifest["metrics"]["before"])
            manifest["metrics"].update(
                after=after.metrics,
                general_after=general_after.metrics if general_after else None,
            )
            manifest["training"] = {
                "steps": result.state.step,
                "total_steps": result.state.total_steps,
                "epochs_completed": result.state.epoch,
                "samples_seen": result.state.samples_seen,
                "seconds": round(result.seconds, 3),
                "stopped_early": result.state.stopped_early,
                "best_step": result.state.best_step,
                "best_metric": result.state.best_metric,
                "resumed_from": str(resume_from) if resume_from else None,
            }
            manifest["adapter"]["files"] = {
                p.name: sha256_file(p)
                for p in sorted(run_dir.iterdir())
                if p.is_file() and p.suffix in (".safetensors", ".json") and p.name not in (MANIFEST_NAME, REPORT_JSON)
            }
            write_reports(
                run_dir, modality, manifest, before_result, after,
                general=(manifest["metrics"].get("general_before"), manifest["metrics"].get("general_after")),
            )  # fmt: skip
            manifest["finished"] = now_iso()
            manifest["status"] = "complete"
            write_json_atomic(run_dir / MANIFEST_NAME, manifest)
        accelerator.wait_for_everyone()
    except BaseException as exc:
        if is_main:
            manifest["status"] = "failed"
            manifest["error"] = f"{type(exc).__name__}: {exc}"
            manifest["finished"] = now_iso()
            write_json_atomic(run_dir / MANIFEST_NAME, manifest)
        raise
    return run_dir


def _version() -> str:
    from . import __version__

    return __version__


def _data_record(config: AdaptConfig, splits: DatasetSplits, skipped: list[dict]) -> dict[str, Any]:
    return {
        "path": str(config.data.path),
        "fingerprint": fingerprint(splits.files, root=Path(config.data.path)),
        "counts": {"train": len(splits.train), "validation": len(splits.validation)},
        "dropped": dict(splits.dropped),
        "bad_samples_skipped": skipped,
        "warnings": list(splits.warnings),
        "details": dict(splits.details),
    }


def _general_data(modality: Modality, config: AdaptConfig, bundle: ModelBundle, ctx: RunContext) -> tuple | None:
    """The forgetting check's samples (``eval.general_data``): its held-out split, or all of it."""
    if config.eval.general_data is None:
        return None
    splits, _ = read_data(modality, config, config.eval.general_data)
    samples = limit(list(splits.validation) or list(splits.train), config.eval.max_samples)
    return samples, modality.prepare(bundle, samples, ctx, False)


def _flat_hparams(config: AdaptConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}/")
        else:
            flat[prefix.rstrip("/")] = node if isinstance(node, int | float | str | bool) else str(node)

    walk(config.to_dict(), "")
    return flat


# -- finished runs ------------------------------------------------------------------------------------------------


def open_run(run_dir: str | Path) -> tuple[Path, dict[str, Any], AdaptConfig]:
    """Read a finished run's manifest and config; refuse incomplete runs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir} is not a directory")
    try:
        manifest = read_manifest(run_dir)
    except ValueError as exc:
        raise RunDirectoryError(f"{run_dir / MANIFEST_NAME} is not valid JSON: {exc}") from None
    if manifest is None:
        raise RunDirectoryError(f"{run_dir} is not a polyadapt run (no {MANIFEST_NAME})")
    if manifest.get("status") != "complete":
        raise RunDirectoryError(f"{run_dir} is not a complete run (status: {manifest.get('status')})")
    config = validate_config(manifest["config"], source=str(run_dir / MANIFEST_NAME), check_paths=False)
    return run_dir, manifest, config


def inference_context(config: AdaptConfig, run_dir: Path | None) -> RunContext:
    import torch

    from .modality import RunContext

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(resolve_precision(config.train.precision)) if device.type == "cuda" else torch.float32
    return RunContext(config=config, base=resolve_base(config.base), device=device, dtype=dtype, run_dir=run_dir)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a finished run: its base model with the adapter attached, ready for inference or export."""
    run_dir, manifest, config = open_run(run_dir)
    modality = get_plugin_manager().get_modality(config.modality)
    ctx = inference_context(config, run_dir)
    bundle = modality.load_base(ctx)
    modality.load_adapter(bundle, run_dir, ctx)
    bundle.model.to(ctx.device)
    bundle.model.eval()
    return LoadedRun(run_dir=run_dir, config=config, manifest=manifest, modality=modality, bundle=bundle, ctx=ctx)


def evaluate(run_dir: str | Path, data: str | Path | None = None, max_samples: int | None = None) -> dict[str, Any]:
    """Base vs adapted on held-out data (the run's, or ``data``); updates report.json/report.html and the manifest."""
    from .report import write_reports

    run_dir, manifest, config = open_run(run_dir)
    if max_samples is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"max_samples": max_samples})})
    data_path = Path(data) if data is not None else Path(config.data.path)
    if not data_path.exists():
        raise ConfigError(f"--data: {str(data_path)!r} does not exist")
    modality = get_plugin_manager().get_modality(config.modality)
    splits, skipped = read_data(modality, config, data_path)
    samples = limit(list(splits.validation), config.eval.max_samples)
    if not samples:
        raise ConfigError(f"--data: {data_path} has no held-out samples")
    accelerator = make_accelerator(
        config.model_copy(update={"train": config.train.model_copy(update={"trackers": []})}), run_dir
    )
    ctx = inference_context(config, run_dir)
    bundle = modality.load_base(ctx)
    bundle.model.to(ctx.device)
    prepared = modality.prepare(bundle, samples, ctx, False)
    before = measure(accelerator, modality, bundle, samples, prepared, ctx)
    modality.load_adapter(bundle, run_dir, ctx)
    bundle.model.to(ctx.device)
    after = measure(accelerator, modality, bundle, samples, prepared, ctx)
    record = {
        "when": now_iso(),
        "data": str(data_path),
        "fingerprint": fingerprint(splits.files, root=data_path)["sha256"],
        "samples": len(samples),
        "bad_samples_skipped": len(skipped),
        "before": before.metrics,
        "after": after.metrics,
    }
    manifest.setdefault("evaluations", []).append(record)
    report = write_reports(run_dir, modality, manifest, before, after, evaluated_on=record)
    write_json_atomic(run_dir / MANIFEST_NAME, manifest)
    return report


def doctor(config: AdaptConfig) -> tuple[DatasetSplits, list[str]]:
    """Validate the data without training; return the splits and a summary. Bad samples are in ``splits.problems``."""
    pm = get_plugin_manager()
    modality = pm.get_modality(config.modality)
    splits = modality.load_data(config, Path(config.data.path))
    summary = [
        f"train: {len(splits.train)} samples, held-out: {len(splits.validation)} samples",
        *[f"dropped {n} sample(s): {reason}" for reason, n in splits.dropped.items()],
        *[f"warning: {w}" for w in splits.warnings],
    ]
    if config.eval.general_data is not None:
        general = modality.load_data(config, Path(config.eval.general_data))
        splits.problems.extend(general.problems)
        summary.append(f"general data: {len(general.validation) or len(general.train)} samples")
    return splits, summary


__all__ = ["LoadedRun", "adapt", "doctor", "evaluate", "load_run", "open_run"]
