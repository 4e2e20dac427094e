"""Training defaults that adapt: every ``train`` value left ``auto`` is chosen, when the run starts, from what is known
before training, by the modality's :class:`TrainingRule`.

**Learning rate.** The modality's reference rate for LoRA (found at ``reference_params`` base parameters, scale
``alpha / r = 2`` and a global batch of 8) is scaled by

* the method: DoRA x1, IA3 x3, prefix tuning x10 (they move fewer, differently scaled parameters);
* the LoRA scale: ``2 / (alpha / r)``, clamped to [1/4, 4] (peft multiplies every update by ``alpha / r``);
* the model size: ``(reference_params / params) ** 0.25`` (about ``1 / sqrt(width)``, since parameters grow with
  the square of the width), clamped to [1/4, 4];
* the batch: ``sqrt(global_batch / 8)``, clamped to [1/4, 4] (Adam's square-root rule);

and the result clamped to [1e-5, 1e-2].

**Length.** ``target_epochs`` passes over the training items, raised so the run makes at least ``min_steps``
optimizer steps (a 100-sample set gets enough updates) but to no more than ``max_epochs``, then lowered so it sees
at most ``max_samples`` items and ``max_amount`` tokens or seconds of audio (a 100,000-sample set does not get ten
epochs), never below one epoch.

**Held-out-driven training.** Evaluation on the held-out split about ``evaluations`` times per run
(``eval_every``), the best adapter kept (not the last), early stopping after ``patience`` evaluations without
improvement, on the modality's metric (``stop_metric``; the loss where generation metrics are too slow to repeat).
Warmup: 5% of the steps.

**General data.** ``eval.general_data: auto`` (the default) is the data directory's ``general/`` subdirectory when it
has one, else no general set (:func:`resolve_general_data`); an explicit path or ``null`` wins. The modalities' readers
never read ``general/`` as training or held-out data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import AUTO, GENERAL_DIR

if TYPE_CHECKING:
    from .config import AdaptConfig

#: learning-rate multiplier of each PEFT method relative to LoRA
METHOD_LR = {"lora": 1.0, "dora": 1.0, "ia3": 3.0, "prefix": 10.0}
REFERENCE_SCALE = 2.0
REFERENCE_BATCH = 8
LR_RANGE = (1e-5, 1e-2)
WARMUP_FRACTION = 0.05


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


@dataclass(frozen=True)
class TrainingRule:
    """A modality's defaults. ``amount`` names what ``max_amount`` counts (``"tokens"``, ``"seconds"`` or None) and
    is read from the prepared training split's statistics."""

    reference_lr: float
    reference_params: float
    min_steps: int
    target_epochs: float = 3.0
    max_epochs: float = 10.0
    max_samples: int = 50_000
    amount: str | None = None
    max_amount: float | None = None
    evaluations: int = 8
    patience: int = 3
    stop_metric: str = "eval_loss"

    # -- learning rate -----------------------------------------------------------------------------------------------
    def lr(self, method: str, r: int, alpha: float, params: int, global_batch: int) -> tuple[float, str]:
        parts = [
            f"reference {self.reference_lr:g} (LoRA, {_count(self.reference_params)} parameters, scale 2, batch 8)"
        ]
        value = self.reference_lr
        method_factor = METHOD_LR.get(method, 1.0)
        if method_factor != 1.0:
            parts.append(f"x{method_factor:g} for {method}")
        value *= method_factor
        if method in ("lora", "dora"):
            scale = alpha / r
            factor = _clamp(REFERENCE_SCALE / scale, 0.25, 4.0)
            if factor != 1.0:
                parts.append(f"x{factor:.3g} for scale alpha/r = {scale:g}")
            value *= factor
        size = _clamp((self.reference_params / max(params, 1)) ** 0.25, 0.25, 4.0)
        parts.append(f"x{size:.3g} for {_count(params)} base parameters")
        value *= size
        batch = _clamp(math.sqrt(global_batch / REFERENCE_BATCH), 0.25, 4.0)
        if batch != 1.0:
            parts.append(f"x{batch:.3g} for global batch {global_batch}")
        value *= batch
        clamped = _clamp(value, *LR_RANGE)
        if clamped != value:
            parts.append(f"clamped to [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]")
        return float(f"{clamped:.3g}"), ", ".join(parts)

    # -- length ------------------------------------------------------------------------------------------------------
    def epochs(self, items: int, steps_per_epoch: float, amount_per_epoch: float | None) -> tuple[float, str]:
        epochs, why = self.target_epochs, [f"target {self.target_epochs:g} epochs"]
        if steps_per_epoch * epochs < self.min_steps:
            raised = min(self.max_epochs, self.min_steps / steps_per_epoch)
            why.append(
                f"raised to {raised:.3g} for at least {self.min_steps} steps"
                + (f" (at most {self.max_epochs:g} epochs)" if raised == self.max_epochs else "")
            )
            epochs = raised
        caps = [(self.max_samples / items, f"{self.max_samples} samples")]
        if self.max_amount is not None and amount_per_epoch:
            caps.append((self.max_amount / amount_per_epoch, f"{_count(self.max_amount)} {self.amount}"))
        for cap, what in caps:
            if epochs > cap:
                epochs = max(1.0, cap)
                why.append(f"cut to {epochs:.3g} to see at most {what}" + (" (one epoch at least)" if cap < 1 else ""))
        return round(epochs, 2), ", ".join(why)


@dataclass(frozen=True)
class TrainingFacts:
    """What is known before training: items per epoch (after packing), their tokens or seconds, base parameters."""

    items: int
    params: int
    amount: float | None = None
    heldout: int = 0
    num_processes: int = 1


@dataclass
class Resolved:
    """The resolved config and, per dotted key chosen, ``{"value": ..., "rule": ...}`` (the manifest's ``auto``)."""

    config: AdaptConfig
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_training(
    config: AdaptConfig, rule: TrainingRule, facts: TrainingFacts, stop_metric: str | None = None
) -> Resolved:
    """``config`` with every ``auto`` train value chosen by ``rule`` from ``facts``; explicit values are kept."""
    train = config.train
    choices: dict[str, dict[str, Any]] = {}
    update: dict[str, Any] = {}
    global_batch = train.batch_size * train.grad_accum * facts.num_processes
    if train.lr == AUTO:
        value, why = rule.lr(config.peft.method, config.peft.r, config.peft.alpha, facts.params, global_batch)
        update["lr"] = value
        choices["train.lr"] = {"value": value, "rule": why}
    from .training import count_steps

    steps_per_epoch = math.ceil(facts.items / (train.batch_size * facts.num_processes)) / train.grad_accum
    if train.length_is_auto:
        epochs, why = rule.epochs(facts.items, steps_per_epoch, facts.amount)
        update.update(epochs=epochs, max_steps=None)
    else:  # one of them is set; the other may say auto, which means unset
        update.update(
            max_steps=train.max_steps if isinstance(train.max_steps, int) else None,
            epochs=train.epochs if isinstance(train.epochs, float | int) else None,
        )
    length = train.model_copy(update={"max_steps": update["max_steps"], "epochs": update["epochs"]})
    steps = count_steps(length, facts.items, train.batch_size * facts.num_processes)
    if train.length_is_auto:
        choices["train.epochs"] = {
            "value": update["epochs"],
            "rule": f"{why}; {facts.items} items, {steps_per_epoch:.3g} steps per epoch -> {steps} steps",
        }
    if train.warmup_steps == AUTO:
        warmup = round(WARMUP_FRACTION * steps)
        update["warmup_steps"] = warmup
        choices["train.warmup_steps"] = {"value": warmup, "rule": f"{WARMUP_FRACTION:.0%} of {steps} steps"}
    eval_every = train.eval_every
    if eval_every == AUTO:
        if facts.heldout == 0:
            eval_every, why = None, "no held-out samples"
        elif steps < 2 * rule.evaluations:
            eval_every, why = max(1, steps // 2), f"twice in {steps} steps"
        else:
            eval_every = math.ceil(steps / rule.evaluations)
            why = f"about {rule.evaluations} held-out evaluations in {steps} steps; the best adapter is kept"
        update["eval_every"] = eval_every
        choices["train.eval_every"] = {"value": eval_every, "rule": why}
    if train.early_stopping_patience == AUTO:
        patience = rule.patience if eval_every is not None else None
        update["early_stopping_patience"] = patience
        choices["train.early_stopping_patience"] = {
            "value": patience,
            "rule": f"stop after {rule.patience} evaluations without improvement"
            if patience
            else "no periodic evaluation",
        }
    if train.early_stopping_metric == AUTO:
        metric = stop_metric or rule.stop_metric
        update["early_stopping_metric"] = metric
        choices["train.early_stopping_metric"] = {"value": metric, "rule": "the modality's held-out metric"}
    resolved = config.model_copy(update={"train": train.model_copy(update=update)})
    return Resolved(config=resolved, choices=choices)


def resolve_general_data(config: AdaptConfig) -> Resolved:
    """``config`` with ``eval.general_data: auto`` resolved to ``<data.path>/general`` when that directory exists, else
    to null, and its ``{"value": ..., "rule": ...}`` under ``eval.general_data`` in ``choices``; an explicit path or
    null is kept, with no choice recorded. Needs no model: ``doctor`` and ``adapt`` resolve it the same way."""
    from pathlib import Path

    evaluation = config.eval
    if evaluation.general_data != AUTO:
        return Resolved(config=config)
    candidate = Path(config.data.path) / GENERAL_DIR
    if candidate.is_dir():
        path, rule = candidate, f"the data directory's {GENERAL_DIR}/ subdirectory"
    else:
        path, rule = None, f"no {GENERAL_DIR}/ subdirectory in {config.data.path}: no forgetting check"
    resolved = config.model_copy(update={"eval": evaluation.model_copy(update={"general_data": path})})
    choice = {"value": None if path is None else str(path), "rule": rule}
    return Resolved(config=resolved, choices={"eval.general_data": choice})


def not_improved_warning(modality: Any, manifest: Any) -> str:
    """The warning printed at the end of ``adapt`` (and shown in the report) when the adapted model is not better than
    the base on the headline metric, with the likely causes read from the manifest."""
    name = manifest.metrics.headline
    before, after = manifest.metrics.before[name], manifest.metrics.after[name]
    train = manifest.config.get("train", {})
    training = manifest.training
    causes = []
    rule = modality.training_rule
    if training is not None and training.steps < rule.min_steps:
        causes.append(
            f"too few steps: {training.steps} optimizer steps (the {modality.name} rule asks for at least "
            f"{rule.min_steps}); raise train.epochs or train.max_steps"
        )
    if training is not None and training.best_step is not None and training.best_step <= max(1, training.steps // 4):
        causes.append(
            f"the best held-out evaluation came early (step {training.best_step} of {training.steps}): the "
            "learning rate may be too high, or the training data does not teach what the held-out split asks"
        )
    causes.append(f"learning rate {train.get('lr')}: try `polyadapt tune CONFIG --search lr,epochs` (or set train.lr)")
    counts = manifest.data.counts
    causes.append(
        f"data: {counts.get('train')} training / {counts.get('validation')} held-out samples; check that the "
        "training samples state what the held-out samples ask, in the same format"
    )
    bar = "!" * 100
    lines = [
        bar,
        f"WARNING: the adapted model is NOT better than the base on {name} "
        f"({before:.4g} before, {after:.4g} after; {'higher' if modality.higher_is_better(name) else 'lower'} is "
        "better). Likely causes:",
        *[f"  - {cause}" for cause in causes],
        bar,
    ]
    return "\n".join(lines)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


__all__ = ["TrainingFacts", "TrainingRule", "not_improved_warning", "resolve_general_data", "resolve_training"]
