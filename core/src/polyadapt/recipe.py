"""``polyadapt adapt`` as a recipe in named phases, read top to bottom::

    setup -> evaluate_before -> train -> evaluate_after -> finalize

Each phase is a method of :class:`AdaptRecipe`; its state is typed attributes on the recipe. The run directory's state
machine (running -> failed | complete) is :class:`polyadapt.rundir.RunDirectory`'s; the lineage is a typed
:class:`polyadapt.manifest.Manifest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import AdaptConfig, load_config
from .data import fingerprint, sha256_file
from .errors import ConfigError
from .manifest import (
    MANIFEST_NAME,
    AdapterRecord,
    BaseRecord,
    DataRecord,
    Manifest,
    TrainingRecord,
    base_weights_digest,
    hardware_info,
    library_versions,
    now_iso,
    plugin_versions,
)
from .report import REPORT_HTML, REPORT_JSON
from .rundir import RunDirectory

if TYPE_CHECKING:
    from .modality import DatasetSplits, EvalResult, Modality, ModalityRun, PreparedSplit
    from .plugins import PolyadaptPluginManager
    from .training import TrainResult


class AdaptRecipe:
    """One ``adapt``: call :meth:`run`, or the phases one by one (tests and notebooks do)."""

    def __init__(
        self,
        config: AdaptConfig | str | Path,
        *,
        plugin_manager: PolyadaptPluginManager,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.pm = plugin_manager
        self.config = config if isinstance(config, AdaptConfig) else load_config(config, plugin_manager=plugin_manager)
        self.resume = resume
        self.overwrite = overwrite
        self.modality: Modality = self.pm.get_modality(self.config.modality)
        self.rundir = RunDirectory(self.config.output)
        self.accelerator: Any = None
        self.base: Any = None
        self.manifest: Manifest | None = None
        self.modality_run: ModalityRun | None = None
        self.splits: DatasetSplits | None = None
        self.eval_samples: list[Any] = []
        self.train_split: PreparedSplit | None = None
        self.eval_split: PreparedSplit | None = None
        self.general: tuple[list[Any], PreparedSplit] | None = None
        self.before: EvalResult | None = None
        self.after: EvalResult | None = None
        self.general_after: EvalResult | None = None
        self.result: TrainResult | None = None
        self.resume_from: Path | None = None
        #: the finished run whose adapter this one continues (``peft.init_from``), or None for a fresh adapter
        self.parent: Any = None

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return self.rundir.path

    # -- the whole recipe --------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Every phase in order; the run directory ends ``complete``, or ``failed`` with the error."""
        self.setup()
        try:
            self.load()
            self.evaluate_before()
            self.train()
            self.evaluate_after()
            self.finalize()
        except BaseException as exc:
            if self.is_main and self.manifest is not None:
                self.rundir.fail(self.manifest, exc)
            raise
        return self.run_dir

    # -- phases ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything that needs no model: the base reference, the data (bad-sample policy applied), the general set
        (``eval.general_data: auto`` resolved), the accelerator, the run directory claimed and the manifest started."""
        from .checkpoint import list_checkpoints
        from .defaults import resolve_general_data
        from .lifecycle import make_accelerator, read_data, resolve_base, resolve_parent_adapter

        general = resolve_general_data(self.config)
        config = self.config = general.config
        base = resolve_base(config.base, self.pm)
        self.splits, skipped = read_data(self.modality, config, base=base)
        self.parent = resolve_parent_adapter(config, base, self.pm)
        self.eval_samples = limit(self.splits.validation, config.eval.max_samples)
        self.accelerator = make_accelerator(config, self.run_dir)
        previous = self.rundir.claim(config, self.resume, self.overwrite) if self.is_main else None
        self.accelerator.wait_for_everyone()
        if self.resume:
            self.resume_from = (list_checkpoints(self.run_dir) or [None])[-1]
        self.base = base
        self.manifest = Manifest(
            status="running",
            polyadapt_version=_version(),
            plugins=plugin_versions(self.pm),
            modality=config.modality,
            base=BaseRecord(reference=base.reference, path=str(base.path) if base.path else None, hub_id=base.hub_id),
            config=config.to_dict(),
            data=data_record(config, self.splits, skipped),
            seed=config.train.seed,
            hardware=hardware_info(),
            libraries=library_versions(),
            started=previous.started if previous else now_iso(),
            resumed=[*(previous.resumed if previous else []), *([now_iso()] if previous else [])],
        )
        self.manifest.auto.update(general.choices)
        if self.parent is not None:
            self.manifest.parents = [self.parent.lineage()]
        if previous is not None:
            # a resumed run keeps the base model's metrics measured when it started
            self.manifest.metrics.before = previous.metrics.before
            self.manifest.metrics.general_before = previous.metrics.general_before
        if self.is_main:
            self.manifest.base.weights_sha256 = base_weights_digest(base.path)
            self.rundir.save(self.manifest)

    def load(self) -> None:
        """Open the modality's run, load the base and prepare every split."""
        from accelerate.utils import set_seed

        from .lifecycle import compute_dtype
        from .modality import RunContext

        set_seed(self.config.train.seed)
        ctx = RunContext(
            config=self.config, base=self.base, device=self.accelerator.device,
            dtype=compute_dtype(self.accelerator.mixed_precision), run_dir=self.run_dir,
            is_main_process=self.is_main, num_processes=self.accelerator.num_processes,
        )  # fmt: skip
        run = self.modality_run = self.modality.open(ctx)
        run.load_base()
        freeze_base(run)
        run.model.to(ctx.device)
        if self.parent is not None:
            # the parent adapter is there before anything is measured: "before" is the parent, not the bare base
            run.load_adapter(self.parent.path)
        for key, value in run.info.items():
            setattr(self.manifest.base, key, value)
        self.adopt_settings(run)
        self.train_split = run.prepare(self.splits.train, True)
        self.eval_split = run.prepare(self.eval_samples, False)
        self.manifest.data.prepared = {"train": self.train_split.stats, "validation": self.eval_split.stats}
        self.resolve_training()
        self.general = general_data(self.modality, run, self.config, self.base)

    def adopt_settings(self, run: ModalityRun) -> None:
        """Take the modality section as the run resolved it on loading its base (``auto`` values it chose from the
        base, recorded in ``run.auto``) into the config and the manifest."""
        from dataclasses import replace

        settings = run.settings
        if settings is not None and settings != self.config.settings:
            self.config = self.config.model_copy(update={"settings": settings})
            run.ctx = replace(run.ctx, config=self.config)
            self.manifest.config = self.config.to_dict()
        self.manifest.auto.update(run.auto)

    def resolve_training(self) -> None:
        """Choose every ``auto`` train value (:mod:`polyadapt.defaults`) now that the data and the model are known;
        print the choices with their reasons and record them in the manifest."""
        from dataclasses import replace

        from .defaults import TrainingFacts, resolve_training

        run, rule = self.modality_run, self.modality.training_rule
        facts = TrainingFacts(
            items=len(self.train_split.items),
            params=sum(p.numel() for m in run.trainable_modules() for p in m.parameters()),
            amount=self.train_split.stats.get(rule.amount) if rule.amount else None,
            heldout=len(self.eval_split.items),
            num_processes=self.accelerator.num_processes,
        )
        metric = self.modality.auto_stop_metric(self.config, self.eval_samples)
        resolved = resolve_training(self.config, rule, facts, metric)
        self.config = resolved.config
        run.ctx = replace(run.ctx, config=self.config)
        self.manifest.config = self.config.to_dict()
        self.manifest.auto.update(resolved.choices)
        if self.is_main and self.manifest.auto:
            import click

            click.echo("auto training values (set them in the config to override):", err=True)
            for key, choice in self.manifest.auto.items():
                click.echo(f"  {key} = {choice['value']}  <- {choice['rule']}", err=True)

    def evaluate_before(self) -> None:
        """The base model's held-out (and general-data) metrics, unless a resumed run measured them already."""
        config, manifest = self.config, self.manifest
        if not config.eval.before or manifest.metrics.before is not None:
            return
        self.before = self.measure(self.eval_samples, self.eval_split)
        general_before = self.measure(*self.general, general=True) if self.general is not None else None
        if self.is_main:
            manifest.metrics.before = self.before.metrics if self.before else None
            manifest.metrics.general_before = general_before.metrics if general_before else None
            self.rundir.save(manifest)

    def train(self) -> None:
        """Attach a fresh adapter (or make the ``peft.init_from`` one trainable) and run the shared loop on it."""
        from accelerate.utils import set_seed

        from .adapters import count_parameters
        from .training import train_loop

        config, run = self.config, self.modality_run
        set_seed(config.train.seed)
        run.add_adapter()
        run.model.to(self.accelerator.device)
        self.manifest.adapter = AdapterRecord(
            method=config.peft.method,
            parameters=count_parameters(run.trainable_modules()),
        )
        if config.train.trackers:
            self.accelerator.init_trackers("polyadapt", config=_flat_hparams(config))
        extra_eval = self._metric_eval if self.config.train.early_stopping_metric != "eval_loss" else None
        self.result = train_loop(
            accelerator=self.accelerator, run=run, train_split=self.train_split, eval_split=self.eval_split,
            run_dir=self.run_dir, callbacks=self.pm.callbacks(config), resume_from=self.resume_from,
            extra_eval=extra_eval,
        )  # fmt: skip
        if config.train.trackers:
            self.accelerator.end_training()

    def evaluate_after(self) -> None:
        """The adapted model's held-out (and general-data) metrics."""
        self.after = self.measure(self.eval_samples, self.eval_split)
        self.general_after = self.measure(*self.general, general=True) if self.general is not None else None

    def finalize(self) -> None:
        """Save the adapter, write the reports, the model card and the complete manifest (main process only)."""
        from .modality import EvalResult, ReportSections
        from .report import write_model_card, write_reports

        if self.is_main:
            run, manifest, state = self.modality_run, self.manifest, self.result.state
            run.save_adapter(self.run_dir)
            before = self.before
            if before is None and manifest.metrics.before is not None:
                before = EvalResult(metrics=manifest.metrics.before)
            manifest.metrics.after = self.after.metrics
            manifest.metrics.general_after = self.general_after.metrics if self.general_after else None
            manifest.training = TrainingRecord(
                steps=state.step, total_steps=state.total_steps, epochs_completed=self.result.epochs_completed,
                epochs=self.result.epochs,
                samples_seen=state.samples_seen, seconds=round(self.result.seconds, 3),
                stopped_early=state.stopped_early, best_step=state.best_step, best_metric=state.best_metric,
                resumed_from=str(self.resume_from) if self.resume_from else None,
            )  # fmt: skip
            manifest.adapter.files = adapter_files(self.run_dir)
            verdict = judge(self.modality, manifest)
            sections = run.report_sections(before, self.after, self.run_dir) if isinstance(run, ReportSections) else []
            write_reports(
                self.run_dir, self.modality, manifest.to_json(), before, self.after,
                plugin_metrics=self.pm.metrics(self.modality.name), sections=sections,
                general=(manifest.metrics.general_before, manifest.metrics.general_after),
            )  # fmt: skip
            write_model_card(
                self.run_dir, self.modality, manifest.to_json(), self.modality.usage(self.run_dir, self.base.reference)
            )
            self.rundir.complete(manifest)
            if verdict is not None:
                import click

                click.echo(verdict, err=True)
        self.accelerator.wait_for_everyone()

    # -- helpers -----------------------------------------------------------------------------------------------------
    def measure(self, samples: list[Any], prepared: PreparedSplit, general: bool = False) -> EvalResult | None:
        return measure(self.accelerator, self.modality_run, samples, prepared, self.pm, general=general)

    def _metric_eval(self) -> dict[str, float]:
        """The modality's metrics on the held-out split, computed on the main process and shared with the others."""
        from accelerate.utils import broadcast_object_list

        from .evaluation import evaluating

        box: list[Any] = [None]
        if self.is_main:
            with evaluating(self.modality_run):
                box = [self.modality_run.evaluate(self.eval_samples, None).metrics]
        broadcast_object_list(box)
        return box[0]


def measure(
    accelerator: Any,
    run: ModalityRun,
    samples: list[Any],
    prepared: PreparedSplit,
    pm: PolyadaptPluginManager,
    general: bool = False,
) -> EvalResult | None:
    """Held-out loss (every process) and the modality's metrics (main process) of the run's current model; with
    ``general``, on the general set, scored by ``run.evaluate_general``."""
    from .evaluation import add_plugin_metrics, evaluating
    from .training import evaluate_loss

    config = run.ctx.config
    batch = config.eval.batch_size or config.train.batch_size
    loss = evaluate_loss(accelerator, run, run.model, prepared, batch)
    result = None
    if accelerator.is_main_process:
        with evaluating(run):
            result = (run.evaluate_general if general else run.evaluate)(samples, loss)
        if loss is not None:
            result.metrics = {"eval_loss": loss, **result.metrics}
        add_plugin_metrics(result, pm.metrics(run.modality.name))
    accelerator.wait_for_everyone()
    return result


def judge(modality: Modality, manifest: Manifest) -> str | None:
    """Set ``manifest.metrics.headline`` and ``manifest.improved``; return the warning to print when the adapted model
    is not better than the base on the headline metric (None when it is, or when there is no "before")."""
    from .defaults import not_improved_warning

    before, after = manifest.metrics.before, manifest.metrics.after or {}
    name = modality.headline_metric(after)
    manifest.metrics.headline = name
    if not before or name is None or name not in before:
        manifest.improved = None
        return None
    higher = modality.higher_is_better(name)
    b, a = round(before[name], 6), round(after[name], 6)
    manifest.improved = a > b if higher else a < b
    return None if manifest.improved else not_improved_warning(modality, manifest)


def freeze_base(run: ModalityRun) -> None:
    """No base weight is ever trained (only the adapter added later is): frozen right after loading, so that
    ``evaluating`` has no base weight to save and restore, and nothing can update one by mistake."""
    for module in run.trainable_modules():
        module.requires_grad_(False)


def limit(samples: Any, max_samples: int | None) -> list[Any]:
    samples = list(samples)
    return samples if max_samples is None else samples[:max_samples]


def data_record(config: AdaptConfig, splits: DatasetSplits, skipped: list[dict]) -> DataRecord:
    return DataRecord(
        path=str(config.data.path),
        fingerprint=fingerprint(splits.files, root=Path(config.data.path)),
        counts={"train": len(splits.train), "validation": len(splits.validation)},
        heldout=dict(splits.heldout),
        dropped=dict(splits.dropped),
        bad_samples_skipped=skipped,
        warnings=list(splits.warnings),
        details=dict(splits.details),
    )


def adapter_files(run_dir: Path) -> dict[str, str]:
    """sha256 of the adapter's files in the run directory (what the registry checks on push and pull)."""
    own = {MANIFEST_NAME, REPORT_JSON, REPORT_HTML}
    return {
        p.name: sha256_file(p)
        for p in sorted(run_dir.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".json") and p.name not in own
    }


def general_data(modality: Modality, run: ModalityRun, config: AdaptConfig, base: Any) -> tuple | None:
    """The forgetting check's samples (``eval.general_data``, already resolved from ``auto``): its held-out split, or
    all of it, read as general data (:attr:`polyadapt.modality.DataContext.general`) and prepared."""
    from .data import enforce_bad_sample_policy
    from .modality import DataContext

    path = config.eval.general_data
    if path is None:
        return None
    splits = modality.load_data(DataContext(config=config, path=Path(path), base=base, general=True))
    enforce_bad_sample_policy(list(splits.problems), config.data.on_bad_sample, str(path))
    samples = limit(list(splits.validation) or list(splits.train), config.eval.max_samples)
    if not samples:
        raise ConfigError(f"eval.general_data: {path} holds no samples")
    return samples, run.prepare(samples, False)


def _version() -> str:
    from . import __version__

    return __version__


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


__all__ = ["AdaptRecipe", "measure"]
