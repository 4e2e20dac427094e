"""``polyadapt compose``: one adapter from several, computed on their updates, then judged on every parent's data.

Each parent's layer is read as its update ``delta_i = s_i * B_i @ A_i`` (:mod:`polyadapt.lora`), and every method
is defined on the weighted updates ``w_i * delta_i``:

- ``cat`` (exact): ``A`` stacks the parents' ``A_i``, ``B`` the ``w_i * s_i * B_i``, so ``B @ A`` *is* the weighted
  sum of the updates (negative weights included); the rank is the sum of the ranks.
- ``svd``: the same exact sum, truncated to rank ``R`` by a singular value decomposition computed on the stacked
  factors (QR of each side, SVD of the small core), so no dense matrix is formed; its error in Frobenius norm is the
  norm of the discarded singular values, recorded per layer.
- ``ties``, ``dare_ties``, ``dare_linear``, ``magnitude_prune``: the dense weighted updates, pruned (``--density``:
  the fraction kept; by magnitude, or at random and rescaled by ``1/density`` for DARE), with TIES's sign election
  (per entry, the sign of the sum) and disjoint mean where named, then factorised to rank ``R`` by SVD.

Layers a parent does not adapt contribute nothing; every layer gets the same rank (zero-padded where it needs
fewer), so the output is an ordinary LoRA with ``r = lora_alpha = R``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RunDirectoryError
from .lora import LoraAdapter, LoraLayer, read_adapter, write_adapter

if TYPE_CHECKING:
    import torch

    from .manifest import Manifest

METHODS = ("cat", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
COMPOSITION_FILE = "composition.json"


@dataclass
class Composed:
    """The composed layers (scale 1, rank ``rank``) and the per-layer truncation error where there is one."""

    layers: dict[str, LoraLayer]
    rank: int
    #: relative Frobenius error of the factorised layer against the method's dense result, per layer
    errors: dict[str, float] = field(default_factory=dict)


# -- the methods, on factors -----------------------------------------------------------------------------------------
def compose_layers(
    parents: list[LoraAdapter], weights: list[float], method: str = "cat", *, rank: int | None = None,
    density: float | None = None, seed: int = 0,
) -> Composed:  # fmt: skip
    """Compose ``parents`` with ``weights`` by ``method``; see the module docstring."""
    import torch

    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if len(weights) != len(parents):
        raise ConfigError(f"--weights: {len(weights)} weight(s) for {len(parents)} adapters")
    if method in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise ConfigError(f"--method {method} needs --density in (0, 1] (the fraction of each update kept)")
    if method == "cat" and rank is not None:
        raise ConfigError("--rank does not apply to cat: its rank is the sum of the parents' ranks (use svd)")
    keys = sorted(set().union(*(p.layers for p in parents)))
    _check_shapes(parents, keys)
    stacked = {key: _stack(parents, weights, key) for key in keys}
    full = max(a.shape[0] for a, _ in stacked.values())
    target = full if rank is None else rank
    if target < 1:
        raise ConfigError(f"--rank {rank}: must be at least 1")
    layers: dict[str, LoraLayer] = {}
    errors: dict[str, float] = {}
    generator = torch.Generator().manual_seed(seed)
    for key in keys:
        A, B = stacked[key]
        if method == "cat":
            layers[key] = LoraLayer(_pad(A, target, 0), _pad(B, target, 1), 1.0)
            continue
        if method == "svd":
            B_r, A_r, error = _truncate_factors(B, A, target)
        else:
            dense = _merge_dense(parents, weights, key, method, density, generator)
            B_r, A_r, error = _truncate_dense(dense, target)
        layers[key] = LoraLayer(_pad(A_r, target, 0), _pad(B_r, target, 1), 1.0)
        errors[key] = error
    return Composed(layers=layers, rank=target, errors=errors)


def _check_shapes(parents: list[LoraAdapter], keys: list[str]) -> None:
    for key in keys:
        shapes = {
            (p.source, (int(p.layers[key].B.shape[0]), int(p.layers[key].A.shape[1])))
            for p in parents
            if key in p.layers
        }
        if len({shape for _, shape in shapes}) > 1:
            found = ", ".join(f"{source}: {shape[0]}x{shape[1]}" for source, shape in sorted(shapes))
            raise ConfigError(f"layer {key} has different shapes in the adapters ({found}): not one base")


def _stack(parents: list[LoraAdapter], weights: list[float], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    As, Bs = [], []
    for parent, weight in zip(parents, weights, strict=True):
        layer = parent.layers.get(key)
        if layer is not None:
            As.append(layer.A.float())
            Bs.append(weight * layer.scale * layer.B.float())
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _pad(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    import torch

    missing = rank - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, torch.zeros(shape, dtype=tensor.dtype)], dim=dim)


def _truncate_factors(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factors of ``B @ A`` without forming it: QR of each side, SVD of the small core."""
    import torch

    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    return _split(Qb @ U, S, Vh @ Qa.T, rank)


def _truncate_dense(dense: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    import torch

    U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
    return _split(U, S, Vh, rank)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    keep = min(rank, S.shape[0])
    total = float(S.square().sum().sqrt())
    error = float(S[keep:].square().sum().sqrt()) / total if total > 0 else 0.0
    root = S[:keep].sqrt()
    B = (U[:, :keep] * root).float()
    A = (root[:, None] * Vh[:keep]).float()
    return B, A, error


def _merge_dense(
    parents: list[LoraAdapter], weights: list[float], key: str, method: str, density: float, generator: torch.Generator
) -> torch.Tensor:
    import torch

    updates = []
    for parent, weight in zip(parents, weights, strict=True):
        layer = parent.layers.get(key)
        if layer is None:
            continue
        delta = layer.delta()
        if method in ("ties", "magnitude_prune"):
            delta = delta * _top_mask(delta, density)
        else:  # dare: drop at random, rescale what is kept
            keep = torch.rand(delta.shape, generator=generator) < density
            delta = delta * keep / density
        updates.append(weight * delta)
    stacked = torch.stack(updates)
    if method in ("magnitude_prune", "dare_linear"):
        return stacked.sum(0)
    sign = torch.sign(stacked.sum(0))  # TIES: the elected sign per entry
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0).clamp(min=1)
    return (stacked * agree).sum(0) / count


def _top_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    import torch

    k = max(1, int(round(density * delta.numel())))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return (delta.abs() >= threshold).to(delta.dtype) if k < delta.numel() else torch.ones_like(delta)


# -- the command -----------------------------------------------------------------------------------------------------
@dataclass
class Parent:
    reference: str
    path: Path
    manifest: Manifest
    adapter: LoraAdapter


def open_parents(references: list[str], registry: str | None = None) -> list[Parent]:
    """Each parent's verified run directory, manifest and LoRA; the checks that need no model."""
    from .lifecycle import open_run
    from .registry import looks_like_ref, resolve_run
    from .registry.registry import base_digest

    if len(references) < 2:
        raise ConfigError("compose needs at least two adapters")
    parents = []
    for reference in references:
        path = resolve_run(reference, registry) if looks_like_ref(reference) else Path(reference)
        path, manifest, _ = open_run(path)
        parents.append(Parent(reference, path, manifest, read_adapter(path, reference)))
    first = parents[0]
    for parent in parents[1:]:
        if parent.manifest.modality != first.manifest.modality:
            raise ConfigError(
                f"{parent.reference} is a {parent.manifest.modality} adapter and {first.reference} a "
                f"{first.manifest.modality} one: compose adapters of one modality"
            )
        mine = base_digest(parent.manifest.base.weights_sha256, parent.manifest.base.reference)
        theirs = base_digest(first.manifest.base.weights_sha256, first.manifest.base.reference)
        if mine != theirs:
            raise ConfigError(
                f"{parent.reference} was trained on base {parent.manifest.base.reference} (weights sha256 "
                f"{mine[:16]}...) and {first.reference} on {first.manifest.base.reference} ({theirs[:16]}...): "
                "compose adapters of one base"
            )
        if parent.adapter.layout != first.adapter.layout:
            raise ConfigError(
                f"{parent.reference} is a {parent.adapter.layout} LoRA, {first.reference} a {first.adapter.layout} one"
            )
    return parents


def compose(
    references: list[str], output: str | Path, *, weights: list[float] | None = None, method: str = "cat",
    rank: int | None = None, density: float | None = None, seed: int = 0, evaluate: bool = True,
    overwrite: bool = False, registry: str | None = None, max_samples: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Compose the adapters ``references`` (run directories or ``NAME@REF``) into a new run directory at ``output``;
    evaluate it on each parent's held-out data and the general data unless ``evaluate`` is False. Returns the
    composition record (also ``composition.json`` in the run)."""
    from .manifest import AdapterRecord, DataRecord, now_iso
    from .rundir import RunDirectory

    output = Path(output)
    parents = open_parents(references, registry)
    weights = [1.0] * len(parents) if weights is None else [float(w) for w in weights]
    composed = compose_layers([p.adapter for p in parents], weights, method, rank=rank, density=density, seed=seed)
    _claim(output, overwrite)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        written = write_adapter(partial, parents[0].adapter, composed.layers, composed.rank)
        first = parents[0].manifest
        config = json.loads(json.dumps(first.config))
        config["output"] = str(output)
        config.setdefault("peft", {}).update(method="lora", r=composed.rank, alpha=float(composed.rank), dropout=0.0)
        record = {
            "method": method, "weights": weights, "rank": composed.rank, "density": density,
            "seed": seed if method.startswith("dare") else None,
            "max_relative_error": max(composed.errors.values(), default=0.0),
        }  # fmt: skip
        manifest = first.model_copy(deep=True)
        manifest.status, manifest.config, manifest.started, manifest.finished = "running", config, now_iso(), None
        manifest.auto, manifest.evaluations, manifest.resumed, manifest.training = {}, [], [], None
        manifest.metrics = type(first.metrics)()
        manifest.improved = None
        manifest.data = DataRecord(
            path=first.data.path,
            fingerprint={"sha256": _combined([p.manifest.data.fingerprint.get("sha256", "") for p in parents])},
            counts={"train": 0, "validation": first.data.counts.get("validation", 0)},
            heldout=dict(first.data.heldout),
            details={"composed_from": [p.manifest.data.fingerprint.get("sha256") for p in parents]},
        )
        manifest.parents = [_lineage(p, w) for p, w in zip(parents, weights, strict=True)]
        manifest.composition = record
        from .data import sha256_file

        trainable = sum(layer.A.numel() + layer.B.numel() for layer in composed.layers.values())
        manifest.adapter = AdapterRecord(
            method="lora", parameters={"trainable": trainable, "total": first.adapter.parameters.get("total", 0)},
            files={name: sha256_file(partial / name) for name in written},
        )  # fmt: skip
        manifest.status, manifest.finished = "complete", now_iso()
        RunDirectory(partial).save(manifest)
        if output.exists():
            shutil.rmtree(output)
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result = {"output": str(output), **record, "parents": [p.reference for p in parents], "table": []}
    if evaluate:
        result["table"] = judge(output, parents, max_samples=max_samples)
    from .manifest import write_json_atomic

    write_json_atomic(output / COMPOSITION_FILE, result)
    return result


def _claim(output: Path, overwrite: bool) -> None:
    from .manifest import read_manifest

    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise RunDirectoryError(f"{output} exists and is not empty; choose another --output or pass --overwrite")
        if read_manifest(output) is None:
            raise RunDirectoryError(f"{output} is not a polyadapt run; refusing to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)


def _combined(digests: list[str]) -> str:
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _lineage(parent: Parent, weight: float) -> dict[str, Any]:
    manifest = parent.manifest
    return {
        "reference": parent.reference, "path": str(parent.path.resolve()), "weight": weight,
        "rank": sorted(parent.adapter.ranks), "method": manifest.adapter.method if manifest.adapter else None,
        "adapter_files": dict(manifest.adapter.files) if manifest.adapter else {},
        "data": {"path": manifest.data.path, "fingerprint": manifest.data.fingerprint.get("sha256"),
                 "counts": dict(manifest.data.counts)},
        "headline": manifest.metrics.headline, "metrics": {"before": manifest.metrics.before, "after": manifest.metrics.after},
        "parents": list(manifest.parents),
    }  # fmt: skip


# -- judged, not assumed ---------------------------------------------------------------------------------------------
def judge(output: Path, parents: list[Parent], max_samples: int | None = None) -> list[dict[str, Any]]:
    """Base, each parent on its own held-out set, and the composition on every set (and on the general data): one
    row per set with the headline metric and the share of the parent's gain the composition keeps. The composed run's
    manifest gets the base vs composed metrics on the first parent's set (and the general data), its report, and one
    ``evaluations`` entry per set."""
    from .config import validate_config
    from .data import fingerprint
    from .lifecycle import make_accelerator, open_base, open_run, read_data, try_resolve_base
    from .manifest import now_iso
    from .plugins import get_plugin_manager
    from .recipe import general_data as read_general
    from .recipe import judge as judge_headline
    from .recipe import limit, measure
    from .registry.gate import improvement
    from .report import write_model_card, write_reports
    from .rundir import RunDirectory

    pm = get_plugin_manager()
    output, manifest, config = open_run(output, pm)
    modality = pm.get_modality(config.modality)
    base_ref = try_resolve_base(config.base, pm)
    sets: list[tuple[str, Path, list[Any]]] = []
    digests: list[str] = []
    for parent in parents:
        parent_config = validate_config(
            parent.manifest.config, source=parent.reference, plugin_manager=pm, check_paths=False
        )
        path = Path(parent.manifest.data.path)
        if not path.exists():
            raise ConfigError(f"{parent.reference}: its held-out data {path} is not here; pass --no-eval to skip")
        splits, _ = read_data(modality, parent_config, path, base=base_ref)
        samples = limit(splits.validation, max_samples or config.eval.max_samples)
        sets.append((f"{parent.reference} held-out", path, samples))
        digests.append(fingerprint(splits.files, root=path)["sha256"])
    general_path = _general_data(parents[0].manifest)
    accelerator = make_accelerator(config, output, trackers=False)
    run = open_base(config, output, pm)
    prepared = [run.prepare(samples, False) for _, _, samples in sets]
    general, general_prepared = None, None
    if general_path is not None and general_path.exists():
        with_general = config.model_copy(update={"eval": config.eval.model_copy(update={"general_data": general_path})})
        general, general_prepared = read_general(modality, run, with_general, base_ref)

    def on_all(names: list[int]) -> dict[int, Any]:
        return {i: measure(accelerator, run, sets[i][2], prepared[i], pm) for i in names}

    def on_general() -> Any:
        return measure(accelerator, run, general, general_prepared, pm, general=True) if general else None

    every = list(range(len(sets)))
    base, base_general = on_all(every), on_general()
    own, own_general = {}, {}
    for i, parent in enumerate(parents):
        name = f"parent-{i}"
        run.load_adapter(parent.path, name=name)
        run.model.to(run.ctx.device)
        own[i] = on_all([i])[i]
        own_general[i] = on_general()
        run.delete_adapter(name)
    run.load_adapter(output, name="composed")
    run.model.to(run.ctx.device)
    composed, composed_general = on_all(every), on_general()

    table = []
    for i, (label, path, samples) in enumerate(sets):
        metric = modality.headline_metric(base[i].metrics)
        higher = modality.higher_is_better(metric) if metric else True
        b, p, c = (r.metrics.get(metric) for r in (base[i], own[i], composed[i]))
        gain = improvement(b, p, higher) if None not in (b, p) else None
        kept = improvement(b, c, higher) / gain if gain and gain > 0 and c is not None else None
        table.append({"set": label, "samples": len(samples), "metric": metric, "base": b, "parent": p,
                      "composed": c, "kept": kept})  # fmt: skip
        manifest.evaluations.append({
            "when": now_iso(), "data": str(path), "samples": len(samples), "composition": True,
            "fingerprint": digests[i],
            "before": base[i].metrics, "after": composed[i].metrics, "parent": own[i].metrics,
        })  # fmt: skip
    if general:
        metric = modality.headline_metric(base_general.metrics) or "eval_loss"
        table.append({
            "set": f"general ({general_path})", "samples": len(general), "metric": metric,
            "base": base_general.metrics.get(metric), "parent": None, "composed": composed_general.metrics.get(metric),
            "kept": None, "parents": [own_general[i].metrics.get(metric) for i in own_general],
        })  # fmt: skip
    manifest.metrics.before, manifest.metrics.after = base[0].metrics, composed[0].metrics
    if general:
        manifest.metrics.general_before = base_general.metrics
        manifest.metrics.general_after = composed_general.metrics
    judge_headline(modality, manifest)
    write_reports(
        output, modality, manifest.to_json(), base[0], composed[0], plugin_metrics=pm.metrics(modality.name),
        general=(manifest.metrics.general_before, manifest.metrics.general_after),
    )  # fmt: skip
    write_model_card(output, modality, manifest.to_json(), modality.usage(output, manifest.base.reference))
    RunDirectory(output).save(manifest)
    return table


def _general_data(manifest: Manifest) -> Path | None:
    """The general data a run was checked on: its resolved ``eval.general_data`` (or the value ``auto`` chose)."""
    chosen = (manifest.auto.get("eval.general_data") or {}).get("value")
    value = chosen if chosen is not None else (manifest.config.get("eval") or {}).get("general_data")
    return Path(value) if value not in (None, "auto") else None


def format_table(table: list[dict[str, Any]]) -> str:
    """The composition table as text: base, parent on its own set, composed, share of the parent's gain kept."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}"

    width = max([len(r["set"]) for r in table] + [3])
    lines = [f"{'set':<{width}}  {'metric':<16} {'base':>9} {'parent':>9} {'composed':>9} {'kept':>7}"]
    for row in table:
        kept = "-" if row["kept"] is None else f"{row['kept']:.0%}"
        lines.append(
            f"{row['set']:<{width}}  {row['metric'] or '-':<16} {cell(row['base']):>9} {cell(row['parent']):>9} "
            f"{cell(row['composed']):>9} {kept:>7}"
        )
    return "\n".join(lines)
