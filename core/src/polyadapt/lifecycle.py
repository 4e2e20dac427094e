"""The lifecycle every modality shares: adapt -> evaluate (before vs after, held out) -> version (manifest) -> serve.

Data flows one way: config -> plugin manager -> modality (model, data, loss) -> the core loop -> adapter + manifest.
``adapt`` is :class:`polyadapt.recipe.AdaptRecipe`; this module holds the steps every command shares and the commands
on finished runs (``evaluate``, ``doctor``, loading a run for ``infer`` and ``export``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import AdaptConfig, ResolvedBase, validate_config
from .data import enforce_bad_sample_policy, fingerprint
from .errors import ConfigError, PolyadaptError
from .manifest import Manifest, now_iso
from .plugins import get_plugin_manager
from .rundir import RunDirectory

if TYPE_CHECKING:
    import torch

    from .modality import DatasetSplits, Modality, ModalityRun, RunContext
    from .plugins import PolyadaptPluginManager


@dataclass
class LoadedRun:
    """A finished run, loaded for evaluation, inference or export: the base model with the run's adapter attached
    (``run.model``), and what the run directory records."""

    run_dir: Path
    config: AdaptConfig
    manifest: Manifest
    modality: Modality
    run: ModalityRun

    @property
    def ctx(self) -> RunContext:
        return self.run.ctx


# -- shared steps -------------------------------------------------------------------------------------------------


def resolve_base(reference: str, pm: PolyadaptPluginManager | None = None) -> ResolvedBase:
    resolved = (pm or get_plugin_manager()).hook.resolve_base(reference=reference)
    if resolved is None:
        raise ConfigError(f"base: cannot resolve {reference!r}")
    return resolved


def try_resolve_base(reference: str, pm: PolyadaptPluginManager | None = None) -> ResolvedBase | None:
    """The resolved base, or None when it cannot be resolved (``doctor`` reads data without it)."""
    try:
        return resolve_base(reference, pm)
    except PolyadaptError:
        return None


def read_data(
    modality: Modality, config: AdaptConfig, path: Path | None = None, base: ResolvedBase | None = None
) -> tuple[DatasetSplits, list[dict]]:
    """The modality reads the dataset; polyadapt picks the held-out split and applies ``data.on_bad_sample``, then
    ``data.pii`` (:func:`polyadapt.pii.apply_pii_policy`: with ``redact`` the splits returned are redacted copies)."""
    from .modality import DataContext
    from .pii import apply_pii_policy

    path = Path(path or config.data.path)
    splits = modality.load_data(DataContext(config=config, path=path, base=base))
    skipped = enforce_bad_sample_policy(list(splits.problems), config.data.on_bad_sample, str(path))
    splits, _ = apply_pii_policy(splits, config, str(path))
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


def make_accelerator(config: AdaptConfig, run_dir: Path, trackers: bool = True) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several runs in one process (tests, notebooks) each get their own precision settings.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    kwargs: dict[str, Any] = {}
    if trackers and config.train.trackers:
        kwargs = {"log_with": list(config.train.trackers), "project_dir": str(run_dir / "logs")}
    import torch

    # Without CUDA, accelerate only forms a process group (gloo) when told it runs on CPU.
    cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=resolve_precision(config.train.precision), cpu=cpu, **kwargs)


# -- adapt --------------------------------------------------------------------------------------------------------


def adapt(
    config: AdaptConfig | str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    plugin_manager: PolyadaptPluginManager | None = None,
) -> Path:
    """Run the whole lifecycle for one config; return the run directory (see :func:`polyadapt.adapt`)."""
    from .recipe import AdaptRecipe

    recipe = AdaptRecipe(
        config, plugin_manager=plugin_manager or get_plugin_manager(), resume=resume, overwrite=overwrite
    )
    return recipe.run()


# -- finished runs ------------------------------------------------------------------------------------------------


def open_run(run_dir: str | Path, pm: PolyadaptPluginManager | None = None) -> tuple[Path, Manifest, AdaptConfig]:
    """Read a finished run's manifest and config; refuse incomplete runs and adapter files whose sha256 differs from
    the manifest's. ``run_dir`` may be a registry reference (``NAME@REF``), pulled into the local cache first."""
    from .registry import looks_like_ref

    if looks_like_ref(run_dir):
        from .registry import resolve_run

        run_dir = resolve_run(run_dir)
    rundir = RunDirectory(run_dir)
    manifest = rundir.complete_manifest()
    rundir.verify_files(manifest)
    config = validate_config(
        manifest.config, source=str(rundir.manifest_path), plugin_manager=pm or get_plugin_manager(), check_paths=False
    )
    return rundir.path, manifest, config


def inference_context(
    config: AdaptConfig, run_dir: Path | None, pm: PolyadaptPluginManager | None = None
) -> RunContext:
    import torch

    from .modality import RunContext

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(resolve_precision(config.train.precision)) if device.type == "cuda" else torch.float32
    return RunContext(config=config, base=resolve_base(config.base, pm), device=device, dtype=dtype, run_dir=run_dir)


def open_base(config: AdaptConfig, run_dir: Path | None, pm: PolyadaptPluginManager | None = None) -> ModalityRun:
    """A run of ``config``'s modality with its base model loaded on the inference device, no adapter attached."""
    pm = pm or get_plugin_manager()
    from .recipe import freeze_base

    run = pm.get_modality(config.modality).open(inference_context(config, run_dir, pm))
    run.load_base()
    freeze_base(run)
    run.model.to(run.ctx.device)
    run.model.eval()
    return run


def load_run(run_dir: str | Path, pm: PolyadaptPluginManager | None = None) -> LoadedRun:
    """Load a finished run: its base model with the adapter attached, ready for inference or export."""
    pm = pm or get_plugin_manager()
    run_dir, manifest, config = open_run(run_dir, pm)
    run = open_base(config, run_dir, pm)
    run.load_adapter(run_dir)
    run.model.to(run.ctx.device)
    run.model.eval()
    return LoadedRun(run_dir=run_dir, config=config, manifest=manifest, modality=run.modality, run=run)


def evaluate(
    run_dir: str | Path,
    data: str | Path | None = None,
    max_samples: int | None = None,
    plugin_manager: PolyadaptPluginManager | None = None,
) -> dict[str, Any]:
    """Base vs adapted on held-out data (the run's, or ``data``); updates report.json/report.html and the manifest."""
    from .modality import ReportSections
    from .recipe import limit, measure
    from .report import write_reports

    pm = plugin_manager or get_plugin_manager()
    run_dir, manifest, config = open_run(run_dir, pm)
    if max_samples is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"max_samples": max_samples})})
    data_path = Path(data) if data is not None else Path(config.data.path)
    if not data_path.exists():
        raise ConfigError(f"--data: {str(data_path)!r} does not exist")
    modality = pm.get_modality(config.modality)
    splits, skipped = read_data(modality, config, data_path, base=try_resolve_base(config.base, pm))
    samples = limit(splits.validation, config.eval.max_samples)
    if not samples:
        raise ConfigError(f"--data: {data_path} has no held-out samples")
    accelerator = make_accelerator(config, run_dir, trackers=False)
    run = open_base(config, run_dir, pm)
    prepared = run.prepare(samples, False)
    before = measure(accelerator, run, samples, prepared, pm)
    run.load_adapter(run_dir)
    run.model.to(run.ctx.device)
    after = measure(accelerator, run, samples, prepared, pm)
    record = {
        "when": now_iso(),
        "data": str(data_path),
        "fingerprint": fingerprint(splits.files, root=data_path)["sha256"],
        "samples": len(samples),
        "bad_samples_skipped": len(skipped),
        "before": before.metrics,
        "after": after.metrics,
    }
    manifest.evaluations.append(record)
    sections = run.report_sections(before, after, run_dir) if isinstance(run, ReportSections) else []
    report = write_reports(
        run_dir, modality, manifest.to_json(), before, after,
        plugin_metrics=pm.metrics(modality.name), sections=sections, evaluated_on=record,
    )  # fmt: skip
    RunDirectory(run_dir).save(manifest)
    return report


def doctor(
    config: AdaptConfig, plugin_manager: PolyadaptPluginManager | None = None
) -> tuple[DatasetSplits, list[str]]:
    """Validate the data without loading any model; return the splits and a summary. Bad samples are in
    ``splits.problems``."""
    from .defaults import resolve_general_data
    from .modality import DataContext
    from .pii import apply_pii_policy

    config = resolve_general_data(config).config
    pm = plugin_manager or get_plugin_manager()
    modality = pm.get_modality(config.modality)
    base = try_resolve_base(config.base, pm)
    splits = modality.load_data(DataContext(config=config, path=Path(config.data.path), base=base))
    warnings = list(splits.warnings)  # the scan's own warning repeats its summary below
    splits, scan = apply_pii_policy(splits, config, str(config.data.path), raise_on_fail=False)
    if config.data.pii == "fail":
        splits.problems.extend(scan.problems())
    summary = [
        f"train: {len(splits.train)} samples, held-out: {len(splits.validation)} samples "
        f"({_heldout_words(splits.heldout)})",
        *[f"dropped {n} sample(s): {reason}" for reason, n in splits.dropped.items()],
        *[f"warning: {w}" for w in warnings],
        *scan.summary(),
    ]
    if config.eval.general_data is not None:
        general = modality.load_data(
            DataContext(config=config, path=Path(config.eval.general_data), base=base, general=True)
        )
        splits.problems.extend(general.problems)
        summary.append(f"general data: {len(general.validation) or len(general.train)} samples")
    return splits, summary


# -- a parent adapter (peft.init_from) ---------------------------------------------------------------------------


@dataclass
class ParentAdapter:
    """The finished run whose adapter a new run continues training (``peft.init_from``), verified."""

    reference: str
    path: Path
    manifest: Manifest

    def lineage(self) -> dict[str, Any]:
        """What the new run's manifest records of it under ``parents``: where it came from, its adapter digests,
        data and metrics, and its own parents."""
        import hashlib
        import json

        from .registry import looks_like_ref

        manifest = self.manifest
        files = dict(manifest.adapter.files) if manifest.adapter else {}
        record: dict[str, Any] = {
            "role": "init_from", "reference": self.reference, "path": str(self.path.resolve()),
            "method": manifest.adapter.method if manifest.adapter else None,
            "objective": (manifest.config.get(manifest.modality) or {}).get("objective", "sft"),
            "adapter_files": files,
            "adapter_sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
            "data": {"path": manifest.data.path, "fingerprint": manifest.data.fingerprint.get("sha256"),
                     "counts": dict(manifest.data.counts)},
            "headline": manifest.metrics.headline, "metrics": {"after": manifest.metrics.after},
            "parents": list(manifest.parents),
        }  # fmt: skip
        if looks_like_ref(self.reference):
            record["registry"] = {"name": self.reference.partition("@")[0], "version": self.path.name.split("-")[0]}
        return record


def resolve_parent_adapter(
    config: AdaptConfig, base: ResolvedBase, pm: PolyadaptPluginManager | None = None
) -> ParentAdapter | None:
    """``peft.init_from`` resolved (a run directory, or ``NAME@REF`` pulled from the registry) and checked before any
    model loads: a complete run with intact adapter files, of the same modality, base weights and PEFT method."""
    from .manifest import base_weights_digest

    reference = config.peft.init_from
    if reference is None:
        return None
    try:
        path, manifest, _ = open_run(reference, pm)
    except PolyadaptError as exc:
        raise ConfigError(f"peft.init_from: {exc}") from None
    if manifest.modality != config.modality:
        raise ConfigError(
            f"peft.init_from: {reference} is a {manifest.modality} adapter; this run is {config.modality}"
        )
    ours = base_weights_digest(base.path) if base.path is not None else {}
    theirs = manifest.base.weights_sha256
    same = ours == theirs if ours and theirs else manifest.base.reference == base.reference
    if not same:
        raise ConfigError(
            f"peft.init_from: {reference} was trained on base {manifest.base.reference}, whose weights differ from "
            f"this run's base {base.reference}"
        )
    method = manifest.adapter.method if manifest.adapter else None
    if method != config.peft.method:
        raise ConfigError(
            f"peft.method: {config.peft.method!r}, but the peft.init_from adapter {reference} is {method!r}; "
            "set peft.method to match it"
        )
    return ParentAdapter(reference=str(reference), path=path, manifest=manifest)


def _heldout_words(heldout: dict[str, Any]) -> str:
    if heldout.get("source") == "holdout":
        return f"cut from train: data.holdout={heldout['fraction']}, seed {heldout['seed']}"
    return f"the {heldout.get('source')} split"


__all__ = [
    "LoadedRun", "ParentAdapter", "adapt", "doctor", "evaluate", "load_run", "open_base", "open_run",
    "resolve_parent_adapter",
]  # fmt: skip
