"""``polyadapt federate`` as a recipe in named phases, read top to bottom::

    setup -> load -> evaluate_before -> attach -> rounds -> finalize

``setup`` reads every site's data before any model loads (a broken site is named there); ``rounds`` runs the
federated rounds through a transport (:mod:`polyadapt.federated.simulation`); ``finalize`` writes an ordinary run
directory (adapter files, ``polyadapt.json`` with a ``federation`` section, reports) that the registry, ``compose``
and ``serve`` take like any other run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..config import AdaptConfig, FederateConfig, load_config
from ..errors import ConfigError, DataError, PolyadaptError
from ..manifest import AdapterRecord, BaseRecord, DataRecord, Manifest, TrainingRecord, now_iso
from ..rundir import RunDirectory
from .aggregate import EXACT, GlobalAdapter, weights_of

if TYPE_CHECKING:
    from ..lora import LoraLayer
    from ..modality import DatasetSplits, EvalResult, Modality, ModalityRun, PreparedSplit
    from ..plugins import PolyadaptPluginManager
    from .simulation import LocalTraining, Reply, SiteClient, Transport

#: the per-round history written to the run directory's metrics.jsonl (the report's curve: mean local loss per round)
METRICS_FILE = "metrics.jsonl"


@dataclass
class Site:
    """One site as the server knows it: a name, where its data is (the simulation reads it there), what was read."""

    name: str
    path: Path
    splits: DatasetSplits | None = None
    fingerprint: str | None = None
    skipped_samples: list[dict] = field(default_factory=list)
    error: str | None = None
    train: PreparedSplit | None = None
    validation: list[Any] = field(default_factory=list)
    validation_prepared: PreparedSplit | None = None
    before: EvalResult | None = None
    after: EvalResult | None = None

    @property
    def samples(self) -> int:
        return len(self.splits.train) if self.splits is not None else 0


def site_names(paths: list[Path]) -> list[str]:
    """Each site's name: its directory's name, numbered when two are the same."""
    names = [p.resolve().name or str(p) for p in paths]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class FederatedRecipe:
    """One ``federate``: call :meth:`run`, or the phases one by one."""

    def __init__(
        self, config: AdaptConfig | str | Path, sites: list[str | Path], *, plugin_manager: PolyadaptPluginManager,
        rounds: int | None = None, aggregate: str | None = None, output: str | Path | None = None,
        overwrite: bool = False, transport: Transport | str | None = None,
    ) -> None:  # fmt: skip
        self.pm = plugin_manager
        config = config if isinstance(config, AdaptConfig) else load_config(config, plugin_manager=plugin_manager)
        section = config.federate or FederateConfig()
        chosen = transport if isinstance(transport, str) else None  # --transport overrides federate.transport
        update = {
            k: v for k, v in (("rounds", rounds), ("aggregate", aggregate), ("transport", chosen)) if v is not None
        }
        try:
            section = FederateConfig.model_validate({**section.model_dump(), **update})
        except ValueError as exc:
            raise ConfigError(f"federate: {exc}") from None
        changes: dict[str, Any] = {"federate": section}
        if output is not None:
            changes["output"] = Path(output)
        self.config = config.model_copy(update=changes)
        self.section = section
        self.method = section.aggregate
        if self.config.peft.method != "lora":
            raise ConfigError(
                f"peft.method: federate aggregates LoRA factors; {self.config.peft.method!r} is not LoRA (use lora)"
            )
        if len(sites) < 1:
            raise ConfigError("--sites: name at least one site directory")
        paths = [Path(s) for s in sites]
        self.sites = [Site(name, path) for name, path in zip(site_names(paths), paths, strict=True)]
        self.overwrite = overwrite
        # a transport object is used as given; a name (or none) picks one from federate.transport
        self.transport = transport if chosen is None and transport is not None else make_transport(section.transport)
        self.modality: Modality = self.pm.get_modality(self.config.modality)
        self.rundir = RunDirectory(self.config.output)
        self.manifest: Manifest | None = None
        self.accelerator: Any = None
        self.base: Any = None
        self.run_model: ModalityRun | None = None
        self.local: LocalTraining | None = None
        self.clients: list[SiteClient] = []
        self.state: GlobalAdapter | None = None
        self.history: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.full_model_bytes = 0
        self.truncation: dict[str, float] = {}
        self.auto: dict[str, dict[str, Any]] = {}

    @property
    def active(self) -> list[Site]:
        return [s for s in self.sites if s.error is None]

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
            self.attach()
            self.rounds()
            self.finalize()
        except BaseException as exc:
            if self.manifest is not None:
                self.rundir.fail(self.manifest, exc)
            raise
        return self.run_dir

    # -- phases ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Read every site's data (``data.on_bad_sample`` applied per site) before any model loads. A site whose data
        cannot be used is named with the reason; with ``federate.on_site_failure: fail`` (the default) the run stops
        there (exit 2, nothing written), with ``skip`` it goes on without that site. Then claim the run directory."""
        from ..data import fingerprint
        from ..lifecycle import read_data, resolve_base

        self.base = resolve_base(self.config.base, self.pm)
        for site in self.sites:
            try:
                if not site.path.is_dir():
                    raise ConfigError(f"{site.path} is not a directory")
                site_config = self.config.model_copy(
                    update={"data": self.config.data.model_copy(update={"path": site.path})}
                )
                site.splits, site.skipped_samples = read_data(self.modality, site_config, site.path, base=self.base)
                if not site.splits.train:
                    raise ConfigError(f"{site.path} holds no training samples")
                site.fingerprint = fingerprint(site.splits.files, root=site.path)["sha256"]
            except PolyadaptError as exc:
                site.error = str(exc)
        broken = [s for s in self.sites if s.error is not None]
        if broken and self.section.on_site_failure == "fail":
            lines = "\n".join(f"  - site {s.name} ({s.path}): {s.error}" for s in broken)
            raise DataError(
                f"{len(broken)} of {len(self.sites)} site(s) cannot take part (the others are untouched; "
                f"federate.on_site_failure: skip runs without them):\n{lines}"
            )
        for site in broken:
            click.echo(f"site {site.name} ({site.path}) skipped for every round: {site.error}", err=True)
            self.skipped.append({"site": site.name, "round": "all", "reason": site.error})
        if not self.active:
            raise DataError("no site can take part: every site's data is broken")
        self.rundir.claim(self.config, resume=False, overwrite=self.overwrite)
        self.manifest = self._start_manifest()
        self.rundir.save(self.manifest)

    def load(self) -> None:
        """Open the modality's run, load the base once, prepare every site's splits and choose the ``auto`` values."""
        from ..lifecycle import make_accelerator

        config = self.config
        self.accelerator = make_accelerator(config, self.run_dir, trackers=False)
        if self.accelerator.num_processes > 1:
            raise ConfigError("federate runs its sites in one process; launch it without accelerate/torchrun")
        run = self.run_model = open_model(self.modality, config, self.base, self.accelerator, self.run_dir)
        for key, value in run.info.items():
            setattr(self.manifest.base, key, value)
        self.full_model_bytes = sum(
            p.numel() * p.element_size() for m in run.trainable_modules() for p in m.parameters()
        )
        for site in self.active:
            prepare_site(run, site, config)
        self._resolve_training()

    def evaluate_before(self) -> None:
        """The base model on every site's held-out samples (``eval.before``)."""
        if not self.config.eval.before:
            return
        for site in self.active:
            site.before = self._measure(site)
        self.manifest.metrics.before = self._pooled("before")
        self.rundir.save(self.manifest)

    def attach(self) -> None:
        """Attach the adapter from the shared seed (every site would make the same one) and set up the sites."""
        from .simulation import SiteClient

        self.local = attach_lora(self.run_model, self.config, self.accelerator)
        self.state = GlobalAdapter(layers=self.local.initial)
        self.clients = [
            SiteClient(site.name, index, site.samples, site.train, self.local)
            for index, site in enumerate(self.sites)
            if site.error is None
        ]

    def rounds(self) -> None:
        """Every round through the transport: the server's message to every site, each site's local training and
        update, then :meth:`finish_round`."""
        self.transport.run(self, self.clients, self.section.rounds)

    def message(self) -> bytes:
        """What the server sends every site for the next round: the global adapter's travelling factors."""
        from .aggregate import download
        from .simulation import encode

        return encode(download(self.method, self.state))

    def site_spec(self, sites: list[SiteClient]) -> dict[str, Any]:
        """See :meth:`polyadapt.federated.simulation.RoundServer.site_spec`."""
        import os

        paths = {s.name: str(s.path.resolve()) for s in self.sites}
        return {
            "config": self.config.to_dict(), "cwd": os.getcwd(),
            "sites": [{"name": c.name, "path": paths[c.name], "index": c.index} for c in sites],
        }  # fmt: skip

    def finish_round(self, number: int, message: bytes, sent: int, replies: list[Reply]) -> None:
        """One round's replies in: the aggregate (the next round's start), its distance from the exact weighted mean
        of the updates, the bytes (``message`` went to ``sent`` sites) and the privacy budget spent so far."""
        from .aggregate import aggregate, applied_delta, exact_mean, relative_error
        from .simulation import decode, kib, round_start

        total = self.section.rounds
        label = "exact" if EXACT[self.method] else "INEXACT"
        failed = [r for r in replies if r.error is not None]
        for reply in failed:
            if self.section.on_site_failure == "fail":
                raise PolyadaptError(f"round {number}: site {reply.site} failed: {reply.error}")
            click.echo(f"round {number}: site {reply.site} skipped this round: {reply.error}", err=True)
            self.skipped.append({"site": reply.site, "round": number, "reason": reply.error})
        good = [r for r in replies if r.error is None]
        if not good:
            raise PolyadaptError(f"round {number}: no site returned an update")
        start = round_start(self.method, self.state, number, self.local.initial, self.local.seed)
        updates = [decode(r.message) for r in good]
        weights = weights_of([r.samples for r in good])
        new = aggregate(self.method, self.state, start, updates, weights)
        error = relative_error(applied_delta(self.method, self.state, new, start), exact_mean(start, updates, weights))
        self.state = new
        up = sum(len(r.message) for r in good)
        down = len(message) * sent
        record: dict[str, Any] = {
            "round": number, "sites": [r.site for r in good], "weights": weights,
            "relative_error_vs_exact_mean": error, "exact": EXACT[self.method],
            "bytes_up": up, "bytes_down": down, "bytes_per_site_up": {r.site: len(r.message) for r in good},
            "full_model_bytes_per_site_and_way": self.full_model_bytes,
            "rank": self.state.merged_rank if self.method == "stack" else self.config.peft.r,
            "local": {r.site: r.summary for r in good},
        }  # fmt: skip
        losses = [(r.summary.get("last_loss"), w) for r, w in zip(good, weights, strict=True)]
        if all(loss is not None for loss, _ in losses):
            record["mean_local_loss"] = sum(loss * w for loss, w in losses)
        budget = ""
        if self.section.dp is not None:
            from .privacy import gaussian_epsilon

            epsilon = gaussian_epsilon(self.section.dp.noise_multiplier, number, self.section.dp.delta)
            record["epsilon"] = epsilon
            record["delta"] = self.section.dp.delta
            budget = f", epsilon {epsilon:.3g} (delta {self.section.dp.delta:g}, per site)"
        self.history.append(record)
        self._append_metrics(record)
        loss = f", mean local loss {record['mean_local_loss']:.4f}" if "mean_local_loss" in record else ""
        full = 2 * sent * self.full_model_bytes
        click.echo(
            f"round {number}/{total} [{self.method}, {label}]: {len(good)} site(s){loss}; aggregate vs exact mean "
            f"of updates: relative error {error:.3g}; sent {kib(up)} up + {kib(down)} down "
            f"({(up + down) / full:.2%} of sending the full model both ways){budget}",
            err=True,
        )

    def finalize(self) -> None:
        """The final adapter into the run directory (``stack``: reduced to ``peft.r`` by SVD, the discarded energy
        reported), every site's held-out metrics, the reports and the complete manifest."""
        from ..recipe import adapter_files, judge
        from ..report import write_model_card, write_reports
        from .aggregate import final_layers
        from .model import write_layers

        rank = self.config.peft.r
        layers, self.truncation = final_layers(self.method, self.state, rank)
        run, local = self.run_model, self.local
        if self.method == "stack":
            local.offset.clear()
            write_layers(local.modules, _as_peft(layers, local.initial))
        else:
            write_layers(local.modules, layers)
        self._save_adapter(layers)
        for site in self.active:
            site.after = self._measure(site)
        manifest = self.manifest
        manifest.metrics.after = self._pooled("after")
        steps = sum(s.get("steps", 0) for r in self.history for s in r["local"].values())
        manifest.training = TrainingRecord(
            steps=steps, total_steps=steps, epochs_completed=0, epochs=None,
            samples_seen=sum(s.get("samples_seen", 0) for r in self.history for s in r["local"].values()),
            seconds=round(sum(s.get("seconds", 0.0) for r in self.history for s in r["local"].values()), 3),
            stopped_early=False,
        )  # fmt: skip
        from ..adapters import count_parameters

        manifest.adapter = AdapterRecord(
            method="lora", parameters=count_parameters(run.trainable_modules()), files=adapter_files(self.run_dir)
        )
        manifest.federation = self._federation_record()
        verdict = judge(self.modality, manifest)
        before = _pooled_result(self.active, "before", manifest.metrics.before)
        after = _pooled_result(self.active, "after", manifest.metrics.after)
        write_reports(
            self.run_dir, self.modality, manifest.to_json(), before, after,
            plugin_metrics=self.pm.metrics(self.modality.name),
        )  # fmt: skip
        write_model_card(
            self.run_dir, self.modality, manifest.to_json(), self.modality.usage(self.run_dir, self.base.reference)
        )
        self.rundir.complete(manifest)
        if verdict is not None:
            click.echo(verdict, err=True)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _resolve_training(self) -> None:
        """The ``auto`` train values, chosen as ``adapt`` chooses them, for one round's local training: no periodic
        evaluation inside a round (the global adapter is what is evaluated), one local epoch per round when the
        length is unset."""
        from dataclasses import replace

        from ..config import AUTO
        from ..defaults import TrainingFacts, resolve_training

        train, choices = self.config.train, {}
        update: dict[str, Any] = {"eval_every": None, "early_stopping_patience": None}
        if train.early_stopping_metric == AUTO:
            update["early_stopping_metric"] = "eval_loss"
        if train.eval_every not in (None, AUTO) or train.early_stopping_patience not in (None, AUTO):
            click.echo("federate: train.eval_every and early stopping do not apply inside a round; ignored", err=True)
        choices["train.eval_every"] = {"value": None, "rule": "federate: no periodic evaluation inside a round"}
        if train.length_is_auto:
            update.update(epochs=1.0, max_steps=None)
            choices["train.epochs"] = {"value": 1.0, "rule": "federate: one local epoch per site and round"}
        config = self.config.model_copy(update={"train": train.model_copy(update=update)})
        run, rule = self.run_model, self.modality.training_rule
        largest = max(self.active, key=lambda s: len(s.train.items))
        facts = TrainingFacts(
            items=len(largest.train.items),
            params=sum(p.numel() for m in run.trainable_modules() for p in m.parameters()),
            amount=largest.train.stats.get(rule.amount) if rule.amount else None,
            heldout=0,
        )
        resolved = resolve_training(config, rule, facts, "eval_loss")
        choices.update({k: v for k, v in resolved.choices.items() if k not in choices})
        self.config = resolved.config
        run.ctx = replace(run.ctx, config=self.config)
        self.manifest.config = self.config.to_dict()
        self.manifest.auto.update(choices)
        self.rundir.save(self.manifest)

    def _measure(self, site: Site) -> EvalResult | None:
        from ..recipe import measure

        if not site.validation:
            return None
        return measure(self.accelerator, self.run_model, site.validation, site.validation_prepared, self.pm)

    def _pooled(self, which: str) -> dict[str, float] | None:
        """Each metric's mean over the sites, weighted by their held-out sample counts."""
        results = [(getattr(s, which), len(s.validation)) for s in self.active if getattr(s, which) is not None]
        if not results:
            return None
        keys = set.intersection(*(set(r.metrics) for r, _ in results))
        total = sum(n for _, n in results)
        return {k: sum(r.metrics[k] * n for r, n in results) / total for k in sorted(keys)}

    def _save_adapter(self, layers: dict[str, LoraLayer]) -> None:
        """ffa/fedavg: the adapter as peft saves it; stack: the reduced factors in the same layout (scale 1)."""
        from ..lora import read_adapter, write_adapter

        if self.method != "stack":
            self.run_model.save_adapter(self.run_dir)
            return
        with tempfile.TemporaryDirectory(prefix=".federate-", dir=self.run_dir) as scratch:
            self.run_model.save_adapter(Path(scratch))
            like = read_adapter(Path(scratch), "federated adapter")
        write_adapter(self.run_dir, like, layers, self.config.peft.r)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        row = {"step": record["round"], "round": record["round"]}
        for key in ("mean_local_loss", "relative_error_vs_exact_mean", "epsilon", "bytes_up", "bytes_down"):
            if key in record:
                row["loss" if key == "mean_local_loss" else key] = record[key]
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def _start_manifest(self) -> Manifest:
        from ..manifest import base_weights_digest, hardware_info, library_versions, plugin_versions
        from ..recipe import _version

        config, sites = self.config, self.active
        digests = sorted(s.fingerprint for s in sites)
        return Manifest(
            status="running", polyadapt_version=_version(), plugins=plugin_versions(self.pm),
            modality=config.modality,
            base=BaseRecord(
                reference=self.base.reference, path=str(self.base.path) if self.base.path else None,
                hub_id=self.base.hub_id, weights_sha256=base_weights_digest(self.base.path),
            ),
            config=config.to_dict(),
            data=DataRecord(
                path=str(config.data.path),
                fingerprint={"sha256": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
                             "sites": {s.name: s.fingerprint for s in sites}},
                counts={"train": sum(len(s.splits.train) for s in sites),
                        "validation": sum(len(s.splits.validation) for s in sites)},
                heldout={"source": "sites"},
                bad_samples_skipped=[{**p, "site": s.name} for s in sites for p in s.skipped_samples],
                details={"federated": True, "sites": [s.name for s in sites]},
            ),
            seed=config.train.seed, hardware=hardware_info(), libraries=library_versions(), started=now_iso(),
        )  # fmt: skip

    def _federation_record(self) -> dict[str, Any]:
        dp = self.section.dp
        last = self.history[-1] if self.history else {}
        return {
            "aggregate": self.method,
            "exact": EXACT[self.method],
            "transport": self.transport.name,
            "rounds": self.section.rounds,
            "weighting": "sample count",
            "sites": [
                {
                    "name": s.name, "data_fingerprint": s.fingerprint, "train_samples": s.samples,
                    "validation_samples": len(s.validation),
                    "metrics_before": s.before.metrics if s.before else None,
                    "metrics_after": s.after.metrics if s.after else None,
                }
                for s in self.active
            ],
            "skipped": self.skipped,
            "dp": None if dp is None else {
                "clip": dp.clip, "noise_multiplier": dp.noise_multiplier, "delta": dp.delta,
                "epsilon": last.get("epsilon"),
                "accounting": "RDP of the Gaussian mechanism composed over rounds; per site (site-level), every site "
                              "in every round (no subsampling amplification); clip and noise applied at the site",
            },
            "final_rank": self.config.peft.r,
            "stack_discarded_energy": None if self.method != "stack" else {
                "max": max(self.truncation.values(), default=0.0),
                "mean": sum(self.truncation.values()) / max(1, len(self.truncation)),
                "per_layer": self.truncation,
            },
            "bytes": {
                "full_model_per_site_and_way": self.full_model_bytes,
                "per_round": [{"round": r["round"], "up": r["bytes_up"], "down": r["bytes_down"]} for r in self.history],
            },
            "history": self.history,
        }  # fmt: skip


def _as_peft(layers: dict[str, LoraLayer], initial: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """Scale-1 factors as the attached adapter's factors (``B`` divided by its scale), so that the model computes
    exactly the adapter that is saved."""
    from ..lora import LoraLayer

    return {key: LoraLayer(layer.A, layer.B / initial[key].scale, initial[key].scale) for key, layer in layers.items()}


def _pooled_result(sites: list[Site], which: str, metrics: dict[str, float] | None) -> EvalResult | None:
    from ..modality import EvalResult

    if metrics is None:
        return None
    examples = [e for s in sites if getattr(s, which) is not None for e in getattr(s, which).examples]
    return EvalResult(metrics=metrics, examples=examples)


def federate(
    config: AdaptConfig | str | Path, sites: list[str | Path], *, rounds: int | None = None,
    aggregate: str | None = None, output: str | Path | None = None, overwrite: bool = False,
    plugin_manager: PolyadaptPluginManager | None = None, transport: Transport | str | None = None,
) -> Path:  # fmt: skip
    """Federated LoRA over ``sites`` (dataset directories, each read as ``config.data`` would be); return the run
    directory. ``rounds``/``aggregate``/``output`` override the config's ``federate.rounds``,
    ``federate.aggregate`` and ``output``."""
    from ..plugins import get_plugin_manager

    recipe = FederatedRecipe(
        config, list(sites), plugin_manager=plugin_manager or get_plugin_manager(), rounds=rounds,
        aggregate=aggregate, output=output, overwrite=overwrite, transport=transport,
    )  # fmt: skip
    return recipe.run()


def make_transport(name: str) -> Transport:
    """``federate.transport``: ``simulation`` (every site in this process) or ``flower`` (Flower's simulation
    runtime; checked here, before any data is read or model loaded)."""
    if name == "flower":
        from .flower import FlowerTransport

        return FlowerTransport()
    from .simulation import InProcessTransport

    return InProcessTransport()


# -- what the server and every site do alike: open the model, prepare a site, attach the shared adapter ---------------
def open_model(modality: Modality, config: AdaptConfig, base: Any, accelerator: Any, run_dir: Path) -> ModalityRun:
    """The modality's run with the base loaded, frozen and on the accelerator's device (a PEFT LoRA run)."""
    from accelerate.utils import set_seed

    from ..lifecycle import compute_dtype
    from ..modality import RunContext
    from ..peft_run import PeftRun
    from ..recipe import freeze_base

    set_seed(config.train.seed)
    ctx = RunContext(
        config=config, base=base, device=accelerator.device, dtype=compute_dtype(accelerator.mixed_precision),
        run_dir=run_dir,
    )  # fmt: skip
    run = modality.open(ctx)
    if not isinstance(run, PeftRun):
        raise ConfigError(f"the {modality.name} modality's adapter is not a PEFT LoRA; federate needs one")
    run.load_base()
    freeze_base(run)
    run.model.to(ctx.device)
    return run


def prepare_site(run: ModalityRun, site: Site, config: AdaptConfig) -> None:
    """A site's training split and held-out samples, prepared by the modality's run."""
    from ..recipe import limit

    site.train = run.prepare(site.splits.train, True)
    site.validation = limit(site.splits.validation, config.eval.max_samples)
    site.validation_prepared = run.prepare(site.validation, False)


def attach_lora(run: ModalityRun, config: AdaptConfig, accelerator: Any) -> LocalTraining:
    """Attach the adapter from ``train.seed``: every site, in any process, draws the same initial factors."""
    from accelerate.utils import set_seed

    from .model import lora_modules, read_layers
    from .simulation import LocalTraining

    set_seed(config.train.seed)
    run.add_adapter()
    run.model.to(accelerator.device)
    modules = lora_modules(run.model)
    if not modules:
        raise ConfigError("peft.target_modules: the adapter has no LoRA layers to federate")
    section = config.federate or FederateConfig()
    return LocalTraining(
        run=run, accelerator=accelerator, modules=modules, initial=read_layers(modules), method=section.aggregate,
        seed=config.train.seed, dp=section.dp,
    )  # fmt: skip
