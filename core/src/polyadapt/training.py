"""THE training loop, shared by every modality.

One function, :func:`train_loop`: for each optimizer step it draws ``grad_accum`` micro-batches, runs forward and loss
(the modality's), backward (accelerate: DDP, mixed precision), clipping, optimizer and LR-schedule step; then logs,
evaluates, early-stops and checkpoints. Data order is a pure function of (seed, epoch), so a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from .errors import ConfigError, TrainingDivergedError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .modality import ModalityRun, PreparedSplit

METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.safetensors"


@dataclass
class TrainState:
    """Where training stands. Saved in every checkpoint; callbacks may read it but must not change it."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)


# -- data order -------------------------------------------------------------------------------------------------------


def epoch_batches(
    num_items: int,
    global_batch: int,
    seed: int,
    epoch: int,
    lengths: Sequence[int] | None = None,
    group_by_length: bool = False,
) -> list[list[int]]:
    """The global batches of one epoch, as item indices; deterministic in (seed, epoch).

    With ``group_by_length``, items are shuffled, cut into windows of 50 batches, sorted by length inside each window
    and the batches shuffled again: similar lengths share a batch (less padding) while the order stays random.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(num_items))
    rng.shuffle(order)
    if group_by_length and lengths is not None:
        window = global_batch * 50
        grouped: list[int] = []
        for start in range(0, num_items, window):
            grouped.extend(sorted(order[start : start + window], key=lambda i: -lengths[i]))
        order = grouped
    batches = [order[i : i + global_batch] for i in range(0, num_items, global_batch)]
    if group_by_length and lengths is not None:
        rng.shuffle(batches)
    return batches


def shard(batch: list[int], process_index: int, num_processes: int) -> list[int]:
    """This process's share of a global batch; short last batches wrap around so every process gets the same size."""
    if num_processes == 1:
        return batch
    per = math.ceil(len(batch) / num_processes)
    padded = batch + [batch[i % len(batch)] for i in range(per * num_processes - len(batch))]
    return padded[process_index * per : (process_index + 1) * per]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors go to ``device`` (non-blocking from pinned memory on CUDA); everything else is left as is."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True) if batch.device.type == "cpu" else batch.to(device)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


# -- schedule ---------------------------------------------------------------------------------------------------------


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def count_steps(train_cfg: Any, num_items: int, global_batch: int) -> int:
    if "auto" in (train_cfg.max_steps, train_cfg.epochs):
        raise ConfigError("train: the length is still 'auto' (polyadapt.defaults.resolve_training chooses it)")
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps
    batches_per_epoch = math.ceil(num_items / global_batch)
    epochs = train_cfg.epochs if train_cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / train_cfg.grad_accum))


# -- evaluation loss --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(
    accelerator: Accelerator,
    run: ModalityRun,
    model: torch.nn.Module,
    split: PreparedSplit,
    batch_size: int,
) -> float | None:
    """Mean loss over ``split`` (batches weighted by ``run.loss_weight``), sharded over processes and reduced; the
    model's mode and adapter weights are as before afterwards (:func:`polyadapt.evaluation.evaluating`)."""
    n = len(split.items)
    if n == 0:
        return None
    from .evaluation import evaluating

    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    indices = list(range(n))
    with evaluating(model):
        for start in range(0, n, batch_size * accelerator.num_processes):
            global_batch = indices[start : start + batch_size * accelerator.num_processes]
            mine = global_batch[accelerator.process_index :: accelerator.num_processes]
            if not mine:
                continue
            batch = run.collate([split.items[i] for i in mine], training=False)
            weight = run.loss_weight(batch)
            batch = move_to_device(batch, accelerator.device)
            with accelerator.autocast():
                loss = run.loss(model, batch)
            total[0] += loss.detach().double() * weight
            total[1] += weight
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


# -- the loop ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    state: TrainState
    history: list[dict[str, Any]]
    seconds: float
    #: full passes over the training items, and the fraction of passes made (batches drawn / batches per epoch)
    epochs_completed: int = 0
    epochs: float = 0.0


def train_loop(
    *,
    accelerator: Accelerator,
    run: ModalityRun,
    train_split: PreparedSplit,
    eval_split: PreparedSplit | None,
    run_dir: Path,
    callbacks: Sequence[Any] = (),
    resume_from: Path | None = None,
    extra_eval: Callable[[], dict[str, float]] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train ``run.model`` (its adapter parameters) on ``train_split``; return the final state and log history.

    ``extra_eval`` computes the modality's metrics when ``train.early_stopping_metric`` is not ``eval_loss``.
    """
    from .evaluation import evaluating

    ctx = run.ctx
    cfg = ctx.config.train
    # without periodic evaluation there is nothing to stop on: early stopping left `auto` means none
    periodic = cfg.eval_every is not None
    unresolved = [k for k in cfg.auto_keys if k != "length" and (periodic or not k.startswith("early_stopping"))]
    if unresolved:
        raise ConfigError(
            f"train: {', '.join(unresolved)} still 'auto' (polyadapt.defaults.resolve_training chooses them first)"
        )
    eval_batch = ctx.config.eval.batch_size or cfg.batch_size
    is_main = accelerator.is_main_process
    num_items = len(train_split.items)
    if num_items == 0:
        raise ConfigError(f"data.path: no training samples in {ctx.config.data.path}")
    global_batch = cfg.batch_size * accelerator.num_processes
    if accelerator.device.type == "cpu" and cfg.cpu_mmap_threshold_kib is not None:
        from .cpu_memory import fix_mmap_threshold

        fix_mmap_threshold(cfg.cpu_mmap_threshold_kib * 1024)

    params = [p for m in run.trainable_modules() for p in m.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("peft: the adapter has no trainable parameters (check peft.target_modules)")
    state = TrainState(total_steps=count_steps(cfg, num_items, global_batch))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, state.total_steps)
    )
    model, optimizer = accelerator.prepare(run.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    metrics_path = run_dir / METRICS_FILE
    if resume_from is not None:
        saved = load_checkpoint(resume_from, unwrapped, optimizer, accelerator.process_index)
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["train_state"])
        history = [r for r in _read_metrics(metrics_path) if r.get("step", 0) <= state.step]
    else:
        history = []
    if is_main:
        _write_metrics(metrics_path, history)

    stop_metric = cfg.early_stopping_metric if periodic else "eval_loss"
    higher_better = False if stop_metric == "eval_loss" else run.modality.higher_is_better(stop_metric)
    best_path = run_dir / "checkpoints" / BEST_FILE

    def call(hook: str, *args: Any) -> None:
        if is_main:
            for cb in callbacks:
                method = getattr(cb, hook, None)
                if method is not None:
                    method(*args)

    def micro_batches() -> Iterator[list[int]]:
        while True:
            batches = epoch_batches(
                num_items, global_batch, cfg.seed, state.epoch, train_split.lengths, cfg.group_by_length
            )
            while state.batch_in_epoch < len(batches):
                batch = batches[state.batch_in_epoch]
                state.batch_in_epoch += 1
                yield shard(batch, accelerator.process_index, accelerator.num_processes)
            state.epoch += 1
            state.batch_in_epoch = 0

    def run_eval() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_split is not None and len(eval_split.items):
            loss = evaluate_loss(accelerator, run, model, eval_split, eval_batch)
            if loss is not None:
                metrics["eval_loss"] = loss
        if stop_metric != "eval_loss" and extra_eval is not None:
            metrics.update(extra_eval())
        return metrics

    def checkpoint() -> Path:
        training_state = {"train_state": asdict(state), "scheduler": scheduler.state_dict()}
        path = save_checkpoint(
            run_dir, state.step, unwrapped, optimizer, training_state,
            accelerator.process_index, is_main, accelerator.wait_for_everyone, cfg.keep_checkpoints,
        )  # fmt: skip
        call("on_save", state, path)
        return path

    call("on_train_begin", state)
    model.train()
    data = micro_batches()
    progress = None
    if is_main and show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=state.total_steps, initial=state.step, desc="adapt", unit="step", dynamic_ncols=True, mininterval=1.0
        )
    started = time.perf_counter()
    window_start, window_samples = started, 0
    last_checkpoint = list_checkpoints(run_dir)[-1] if resume_from is not None else None

    while state.step < state.total_steps and not state.stopped_early:
        loss_sum = torch.zeros((), device=accelerator.device)
        samples = 0
        for micro in range(cfg.grad_accum):
            indices = next(data)
            batch = run.collate([train_split.items[i] for i in indices], training=True)
            samples += batch_size_of(batch)
            batch = move_to_device(batch, accelerator.device)
            sync = micro == cfg.grad_accum - 1
            with accelerator.no_sync(model) if not sync else nullcontext(), accelerator.autocast():
                loss = run.loss(model, batch)
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().float()
        mean_loss = accelerator.reduce(loss_sum / cfg.grad_accum, reduction="mean")
        loss_value = float(mean_loss)
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            if progress is not None:
                progress.close()
            raise TrainingDivergedError(state.step + 1, loss_value, str(last_checkpoint) if last_checkpoint else None)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += samples * accelerator.num_processes
        window_samples += samples * accelerator.num_processes

        if state.step % cfg.log_every == 0 or state.step == state.total_steps:
            now = time.perf_counter()
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_second": window_samples / max(now - window_start, 1e-9),
                "elapsed": now - started,
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            window_start, window_samples = now, 0
            history.append(record)
            if is_main:
                _append_metrics(metrics_path, record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
            call("on_log", state, record)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_second']:.1f}"
                )
        if progress is not None:
            progress.update(1)

        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < state.total_steps:
            metrics = run_eval()
            _record_eval(state, metrics, stop_metric, higher_better, cfg.early_stopping_patience)
            if state.best_step == state.step and is_main:
                _save_best(unwrapped, best_path)
            record = {"step": state.step, **{f"eval/{k}": v for k, v in metrics.items()}}
            history.append(record)
            if is_main:
                _append_metrics(metrics_path, record)
                accelerator.log(record, step=state.step)
            if is_main:
                with evaluating(run):
                    run.on_evaluate(state.step, metrics)
            call("on_evaluate", state, metrics)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < state.total_steps:
            last_checkpoint = checkpoint()

    if progress is not None:
        progress.close()
    if cfg.eval_every and state.best_step is not None and best_path.exists():
        # Periodic evaluation keeps the best evaluated adapter, not the last (`load_best_model_at_end`); the last
        # one is evaluated too, unless the run stopped early (it stops right after an evaluation).
        if not state.stopped_early:
            final = run_eval()
            _record_eval(state, final, stop_metric, higher_better, None)
            record = {"step": state.step, **{f"eval/{k}": v for k, v in final.items()}}
            history.append(record)
            if is_main:
                _append_metrics(metrics_path, record)
        if state.best_step != state.step:
            from safetensors.torch import load_file

            load_trainable_state(unwrapped, load_file(str(best_path)))
    accelerator.wait_for_everyone()
    run.model = unwrapped
    call("on_train_end", state)
    batches_per_epoch = math.ceil(num_items / global_batch)
    drawn = state.epoch * batches_per_epoch + state.batch_in_epoch
    return TrainResult(
        state=state, history=history, seconds=time.perf_counter() - started,
        epochs_completed=drawn // batches_per_epoch, epochs=round(drawn / batches_per_epoch, 3),
    )  # fmt: skip


def _record_eval(
    state: TrainState, metrics: dict[str, float], name: str, higher_better: bool, patience: int | None
) -> None:
    state.last_eval = dict(metrics)
    value = metrics.get(name)
    if value is None:
        return
    improved = state.best_metric is None or (value > state.best_metric if higher_better else value < state.best_metric)
    if improved:
        state.best_metric, state.best_step = value, state.step
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
        if patience and state.evals_without_improvement >= patience:
            state.stopped_early = True


def _save_best(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(trainable_state(model), str(tmp))
    tmp.replace(path)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
