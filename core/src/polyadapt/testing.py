"""The conformance suite a plugin author runs against their own modality (like scikit-learn's ``check_estimator``).

Describe a tiny instance of your modality with a :class:`ModalityCase` (a function that writes a small base model and
dataset and returns the raw config, and one that breaks a sample), then in your tests::

    from polyadapt.testing import ModalityCase, parametrize_with_checks

    CASE = ModalityCase("video", make=write_tiny_video_run, corrupt=break_one_clip)

    @parametrize_with_checks([CASE])
    def test_conformance(case, check, tmp_path):
        check(case, tmp_path)

or call :func:`check_modality` to run every check at once. Each check is a plain function ``check(case, directory)``
that raises ``AssertionError`` naming what is wrong. The checks (:data:`CHECKS`, in this order):

- ``check_declarations``: name, settings schema, metrics, PEFT methods and capabilities are well formed, and every
  declared capability's protocol is implemented by the run class;
- ``check_fail_fast``: a PEFT method or an early-stopping metric the modality does not support is refused by config
  validation, naming what is supported, before any model loads;
- ``check_doctor_loads_no_model``: reading and validating the data builds no ``torch.nn.Module``;
- ``check_bad_sample_is_reported``: a broken sample comes back as a Problem naming its file, never as an exception;
- ``check_heldout_batches_are_deterministic``: preparing and collating held-out data twice gives identical tensors
  and identical losses;
- ``check_loss_weight_is_consistent``: a batch's loss is the ``loss_weight``-weighted mean of its rows' losses (what
  makes the held-out loss exact);
- ``check_save_then_load_gives_identical_outputs``: an adapter saved and loaded into a fresh base gives the loss it
  gave before saving;
- ``check_evaluation_leaves_the_model_as_found``: ``evaluate``, ``evaluate_general`` and ``on_evaluate`` change
  neither the mode of any module nor any trainable weight;
- ``check_inference`` (capability ``inference``): ``infer`` answers lines of text with the case's options;
- ``check_multi_adapter`` (``multi_adapter``): two adapters on one base, switched by name, each give exactly what
  they give alone; ``None`` gives the base; deleting one keeps the other;
- ``check_batched_adapters`` (``batched_adapters``): one batch whose rows use different adapters (and the base) gives
  each row what that adapter gives alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .config import AdaptConfig
    from .modality import DatasetSplits, Modality, ModalityRun


@dataclass(frozen=True)
class ModalityCase:
    """A tiny, offline instance of a modality for the checks.

    :param id: the test id.
    :param make: ``make(directory) -> dict`` writes a tiny base model and dataset under ``directory`` and returns the
        raw config mapping (``modality``, ``base``, ``data``, ``output``... as in a YAML file). The dataset needs at
        least two training and two held-out samples.
    :param corrupt: ``corrupt(data_path) -> Path`` breaks one sample of the dataset at ``data_path`` (invalid record,
        unreadable file...) and returns the file whose name the Problem must carry.
    :param infer_options: options passed to ``run.infer`` (the ``inference`` capability), or a function of the
        directory returning them (for files it must write).
    :param tolerance: largest allowed difference between two losses that should be equal.
    :param perturb: standard deviation of the seeded noise added to a fresh adapter's weights, so that it is not the
        identity and adapters differ from each other and from the base.
    """

    id: str
    make: Callable[[Path], dict[str, Any]]
    corrupt: Callable[[Path], Path]
    infer_options: dict[str, Any] | Callable[[Path], dict[str, Any]] | None = None
    tolerance: float = 1e-5
    perturb: float = 0.05

    def __repr__(self) -> str:
        return f"ModalityCase({self.id!r})"


# -- helpers --------------------------------------------------------------------------------------------------------


def _config(case: ModalityCase, directory: Path, **changes: Any) -> AdaptConfig:
    from .config import validate_config

    raw = case.make(directory)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            raw[section] = {**(raw.get(section) or {}), name: value}
        else:
            raw[section] = value
    return validate_config(raw)


def _modality(config: AdaptConfig) -> Modality:
    from .plugins import get_plugin_manager

    return get_plugin_manager().get_modality(config.modality)


def _splits(config: AdaptConfig) -> DatasetSplits:
    from .lifecycle import read_data, try_resolve_base

    splits, _ = read_data(_modality(config), config, base=try_resolve_base(config.base))
    assert len(splits.train) >= 2 and len(splits.validation) >= 2, "the case needs 2+ train and 2+ held-out samples"
    return splits


def _open(config: AdaptConfig, run_dir: Path | None = None) -> ModalityRun:
    import torch

    from .lifecycle import resolve_base
    from .modality import RunContext

    ctx = RunContext(
        config=config, base=resolve_base(config.base), device=torch.device("cpu"), dtype=torch.float32, run_dir=run_dir
    )
    from .recipe import freeze_base

    run = _modality(config).open(ctx)
    run.load_base()
    freeze_base(run)
    run.model.to(ctx.device)
    return run


def _perturb(run: ModalityRun, scale: float, seed: int) -> None:
    """Seeded noise on every trainable weight, so the adapter is not the identity."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in run.trainable_modules():
            for parameter in module.parameters():
                if parameter.requires_grad:
                    noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                    parameter.add_(noise.to(parameter.dtype) * scale)


def _batch_loss(run: ModalityRun, items: Sequence[Any]) -> float:
    from .evaluation import evaluating
    from .training import move_to_device

    with evaluating(run):
        batch = move_to_device(run.collate(list(items), training=False), run.ctx.device)
        return float(run.loss(run.model, batch))


def _rows_loss(run: ModalityRun, items: Sequence[Any], names: Sequence[str | None] | None = None) -> float:
    """The ``loss_weight``-weighted mean of the single-row losses of ``items`` (row i with adapter ``names[i]``)."""
    total = weight = 0.0
    for i, item in enumerate(items):
        if names is not None:
            run.set_adapter(names[i])
        w = run.loss_weight(run.collate([item], training=False))
        total += w * _batch_loss(run, [item])
        weight += w
    return total / weight


def _close(a: float, b: float, tolerance: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


def _snapshot(run: ModalityRun) -> tuple[list[tuple[str, bool]], list[torch.Tensor]]:
    modes = [(name, m.training) for module in run.trainable_modules() for name, m in module.named_modules()]
    weights = [p.detach().clone() for module in run.trainable_modules() for p in module.parameters() if p.requires_grad]
    return modes, weights


def _adapter_dir(case: ModalityCase, config: AdaptConfig, directory: Path, seed: int) -> tuple[Path, float]:
    """A fresh adapter with seeded noise, saved under ``directory``; returns it and its held-out batch loss."""
    run = _open(config)
    run.add_adapter()
    run.model.to(run.ctx.device)
    _perturb(run, case.perturb, seed)
    items = run.prepare(_splits(config).validation[:2], False).items
    loss = _batch_loss(run, items)
    directory.mkdir(parents=True, exist_ok=True)
    run.save_adapter(directory)
    return directory, loss


@contextmanager
def _no_modules_built() -> Iterator[None]:
    import torch

    original = torch.nn.Module.__init__

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a model was built while only data should be read: {type(self).__name__}")

    torch.nn.Module.__init__ = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.__init__ = original  # type: ignore[method-assign]


# -- the checks -----------------------------------------------------------------------------------------------------


def check_declarations(case: ModalityCase, directory: Path) -> None:
    """The modality's declarations are well formed and its capabilities' protocols are implemented."""
    from .config import PEFT_METHODS
    from .modality import ModalityRun, ModalitySettings, capability_problems

    config = _config(case, directory)
    modality = _modality(config)
    assert isinstance(modality.name, str) and modality.name == config.modality
    assert issubclass(modality.settings_model, ModalitySettings), "settings_model must subclass ModalitySettings"
    assert issubclass(modality.run_class, ModalityRun), "run_class must subclass ModalityRun"
    assert modality.peft_methods and set(modality.peft_methods) <= set(PEFT_METHODS), modality.peft_methods
    assert all(isinstance(v, bool) for v in modality.metrics.values()), "metrics map names to higher-is-better"
    reported = modality.reported_metrics(config)
    assert modality.primary_metric in reported, f"primary_metric {modality.primary_metric!r} is not reported"
    assert not capability_problems(modality), capability_problems(modality)
    assert modality.check_config(config) == [], "the case's own config must be valid"


def check_fail_fast(case: ModalityCase, directory: Path) -> None:
    """Unsupported PEFT methods and unknown early-stopping metrics are refused at validation, naming the valid ones."""
    from .config import PEFT_METHODS
    from .errors import ConfigError

    config = _config(case, directory)
    modality = _modality(config)
    for method in PEFT_METHODS:
        if method in modality.peft_methods:
            continue
        try:
            _config(case, directory, peft__method=method)
        except ConfigError as exc:
            assert "peft.method" in str(exc) and modality.peft_methods[0] in str(exc), str(exc)
        else:
            raise AssertionError(f"peft.method {method!r} is not supported yet was accepted")
    try:
        _config(case, directory, train__early_stopping_metric="no_such_metric")
    except ConfigError as exc:
        assert "train.early_stopping_metric" in str(exc) and "eval_loss" in str(exc), str(exc)
    else:
        raise AssertionError("an early-stopping metric the modality does not report was accepted")


def check_doctor_loads_no_model(case: ModalityCase, directory: Path) -> None:
    """``doctor`` (reading and validating the data) builds no model."""
    from .lifecycle import doctor

    config = _config(case, directory)
    with _no_modules_built():
        splits, summary = doctor(config)
    assert not splits.problems, [str(p) for p in splits.problems]
    assert summary


def check_bad_sample_is_reported(case: ModalityCase, directory: Path) -> None:
    """A broken sample is a Problem naming its file, not an exception; the other samples are still read."""
    from .lifecycle import try_resolve_base
    from .modality import DataContext

    config = _config(case, directory)
    modality = _modality(config)
    ctx = DataContext(config=config, path=Path(config.data.path), base=try_resolve_base(config.base))
    good = modality.load_data(ctx)
    broken = case.corrupt(Path(config.data.path))
    splits = modality.load_data(ctx)
    assert splits.problems, "the broken sample was not reported"
    assert any(Path(broken).name in str(p) for p in splits.problems), [str(p) for p in splits.problems]
    kept = len(splits.train) + len(splits.validation)
    assert 0 < kept < len(good.train) + len(good.validation), "the broken sample must be left out, the others kept"


def check_training_rule_resolves(case: ModalityCase, directory: Path) -> None:
    """The modality's :class:`polyadapt.defaults.TrainingRule` turns a config that sets no training value into a
    concrete one (nothing left ``auto``, learning rate in range, at least one step), whose ``auto`` stop metric is one
    the modality reports."""
    from .config import validate_config
    from .defaults import LR_RANGE, TrainingFacts, resolve_training
    from .training import count_steps

    raw = case.make(directory)
    raw["train"] = {}
    config = validate_config(raw)
    modality = _modality(config)
    splits = _splits(config)
    metric = modality.auto_stop_metric(config, list(splits.validation))
    assert metric in modality.reported_metrics(config), f"auto stop metric {metric!r} is not reported"
    facts = TrainingFacts(items=len(splits.train), params=1_000_000, heldout=len(splits.validation))
    resolved = resolve_training(config, modality.training_rule, facts, metric)
    train = resolved.config.train
    assert not train.auto_keys, train
    assert LR_RANGE[0] <= train.lr <= LR_RANGE[1] and count_steps(train, len(splits.train), train.batch_size) >= 1
    assert all(set(choice) == {"value", "rule"} for choice in resolved.choices.values()), resolved.choices


def check_heldout_batches_are_deterministic(case: ModalityCase, directory: Path) -> None:
    """Held-out items and batches are the same every time, and so is their loss."""
    import torch

    config = _config(case, directory)
    samples = _splits(config).validation[:2]
    run = _open(config)
    first, second = run.prepare(samples, False).items, run.prepare(samples, False).items
    a, b = run.collate(list(first), training=False), run.collate(list(second), training=False)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"held-out batch key {key!r} differs between two collations"
    assert _batch_loss(run, first) == _batch_loss(run, first), "the held-out loss differs between two evaluations"


def check_loss_weight_is_consistent(case: ModalityCase, directory: Path) -> None:
    """The loss of a batch is the ``loss_weight``-weighted mean of its rows' losses."""
    config = _config(case, directory)
    run = _open(config)
    items = run.prepare(_splits(config).validation[:2], False).items
    together, apart = _batch_loss(run, items), _rows_loss(run, items)
    assert _close(together, apart, max(case.tolerance, 1e-4)), (
        f"batch loss {together} != weighted mean of row losses {apart}"
    )


def check_save_then_load_gives_identical_outputs(case: ModalityCase, directory: Path) -> None:
    """A saved adapter, loaded into a fresh base, gives the loss it gave when it was saved."""
    config = _config(case, directory)
    saved, before = _adapter_dir(case, config, directory / "adapter", seed=1)
    run = _open(config)
    base_loss = _batch_loss(run, run.prepare(_splits(config).validation[:2], False).items)
    run.load_adapter(saved)
    after = _batch_loss(run, run.prepare(_splits(config).validation[:2], False).items)
    assert _close(before, after, case.tolerance), f"loss {before} before saving, {after} after loading"
    assert not _close(before, base_loss, case.tolerance), "the loaded adapter changes nothing (was it attached?)"


def check_evaluation_leaves_the_model_as_found(case: ModalityCase, directory: Path) -> None:
    """``evaluate``, ``evaluate_general`` and ``on_evaluate`` change neither module modes nor trainable weights."""
    import torch

    from .evaluation import evaluating

    config = _config(case, directory, eval__max_samples=2)
    samples = _splits(config).validation[:2]
    run = _open(config, run_dir=directory / "run")
    run.add_adapter()
    run.model.to(run.ctx.device)
    _perturb(run, case.perturb, seed=3)
    for module in run.trainable_modules():
        module.train()
    found = _snapshot(run)
    with evaluating(run):
        inside = _snapshot(run)
        run.evaluate(samples, None)
        run.evaluate_general(samples, None)
        run.on_evaluate(1, {"eval_loss": 1.0})
        now = _snapshot(run)
        assert now[0] == inside[0], "evaluate/evaluate_general/on_evaluate changed the mode of a module"
        assert all(torch.equal(a, b) for a, b in zip(now[1], inside[1], strict=True)), "a trainable weight changed"
    after = _snapshot(run)
    assert after[0] == found[0], "the model's modes are not restored after evaluation"
    assert all(torch.equal(a, b) for a, b in zip(after[1], found[1], strict=True))


def check_inference(case: ModalityCase, directory: Path) -> None:
    """``infer`` with the case's options answers lines of text."""
    from .evaluation import evaluating

    config = _config(case, directory)
    saved, _ = _adapter_dir(case, config, directory / "adapter", seed=1)
    run = _open(config, run_dir=directory)
    run.load_adapter(saved)
    options = case.infer_options(directory) if callable(case.infer_options) else dict(case.infer_options or {})
    params = {p.name for p in _modality(config).infer_params()}
    assert set(options) <= params, f"options {sorted(set(options) - params)} are not infer_params"
    with evaluating(run):
        lines = run.infer(options)
    assert isinstance(lines, list) and lines and all(isinstance(line, str) for line in lines), lines


def check_multi_adapter(case: ModalityCase, directory: Path) -> None:
    """Two adapters on one base, switched by name, each give what they give alone; None gives the base."""
    config = _config(case, directory)
    first, loss_a = _adapter_dir(case, config, directory / "a", seed=1)
    second, loss_b = _adapter_dir(case, config, directory / "b", seed=2)
    run = _open(config)
    items = run.prepare(_splits(config).validation[:2], False).items
    base = _batch_loss(run, items)
    run.load_adapter(first, "a")
    run.load_adapter(second, "b")
    assert run.adapter_names() == ["a", "b"], run.adapter_names()
    for name, expected in (("a", loss_a), ("b", loss_b), (None, base), ("a", loss_a)):
        run.set_adapter(name)
        got = _batch_loss(run, items)
        assert _close(got, expected, case.tolerance), f"adapter {name!r}: loss {got}, alone {expected}"
    run.delete_adapter("a")
    assert run.adapter_names() == ["b"]
    run.set_adapter("b")
    assert _close(_batch_loss(run, items), loss_b, case.tolerance), "deleting 'a' changed 'b'"


def check_batched_adapters(case: ModalityCase, directory: Path) -> None:
    """One batch whose rows use different adapters gives each row what that adapter gives alone."""
    config = _config(case, directory)
    first, _ = _adapter_dir(case, config, directory / "a", seed=1)
    second, _ = _adapter_dir(case, config, directory / "b", seed=2)
    run = _open(config)
    run.load_adapter(first, "a")
    run.load_adapter(second, "b")
    samples = _splits(config).validation
    items = run.prepare([samples[i % len(samples)] for i in range(3)], False).items
    names = ["a", None, "b"]
    alone = _rows_loss(run, items, names)
    run.set_adapter("a")
    with run.adapter_batch(names):
        mixed = _batch_loss(run, items)
    assert _close(mixed, alone, max(case.tolerance, 1e-4)), f"mixed batch loss {mixed}, rows alone {alone}"


CHECKS: tuple[Callable[[ModalityCase, Path], None], ...] = (
    check_declarations,
    check_fail_fast,
    check_doctor_loads_no_model,
    check_bad_sample_is_reported,
    check_training_rule_resolves,
    check_heldout_batches_are_deterministic,
    check_loss_weight_is_consistent,
    check_save_then_load_gives_identical_outputs,
    check_evaluation_leaves_the_model_as_found,
    check_inference,
    check_multi_adapter,
    check_batched_adapters,
)

_NEEDS = {
    check_inference: "inference",
    check_multi_adapter: "multi_adapter",
    check_batched_adapters: "batched_adapters",
}


def checks_for(case: ModalityCase, capabilities: frozenset[str] | None = None) -> list[Callable]:
    """The checks that apply to ``case``: every general check, and one per declared capability."""
    if capabilities is None:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            capabilities = _modality(_config(case, Path(directory))).capabilities
    return [c for c in CHECKS if c not in _NEEDS or _NEEDS[c] in capabilities]


def check_modality(case: ModalityCase, directory: Path) -> list[str]:
    """Run every applicable check, each in its own subdirectory; return the names of those that passed."""
    passed = []
    for check in checks_for(case):
        sub = Path(directory) / check.__name__
        sub.mkdir(parents=True, exist_ok=True)
        check(case, sub)
        passed.append(check.__name__)
    return passed


def parametrize_with_checks(
    cases: Sequence[ModalityCase], capabilities: dict[str, frozenset[str]] | None = None
) -> Any:
    """A ``pytest.mark.parametrize`` over ``(case, check)`` pairs, ids ``<case id>-<check name>``.

    Capabilities are read from each case's modality (building its config once); pass ``capabilities`` (case id ->
    capabilities) to avoid that at collection time.
    """
    import pytest

    pairs = [(case, check) for case in cases for check in checks_for(case, (capabilities or {}).get(case.id))]
    return pytest.mark.parametrize(
        ("case", "check"), pairs, ids=[f"{case.id}-{check.__name__.removeprefix('check_')}" for case, check in pairs]
    )


__all__ = ["CHECKS", "ModalityCase", "check_modality", "checks_for", "parametrize_with_checks"]
