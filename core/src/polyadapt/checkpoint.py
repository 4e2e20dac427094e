"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory ``checkpoints/step-000120/`` holds the trainable (adapter) weights, the optimizer state, the
training state (scheduler, data position, early-stopping record) and each process's RNG states. It is written under a
temporary name and renamed when complete, so a directory with the final name is always whole.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .manifest import write_json_atomic

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STATE_FILE = "state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name, detached and contiguous on the CPU."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {
        "param_groups": state_dict["param_groups"],
        "scalars": scalars,
        "indices": list(state_dict["state"]),
    }


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["indices"]}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state[int(index)][name] = value
    for index, entry in meta["scalars"].items():
        state[int(index)].update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict[str, Any],
    process_index: int,
    is_main_process: bool,
    wait: Any,
    keep: int,
) -> Path:
    """Write a complete checkpoint for ``step``; every process calls it (each writes its RNG state).

    ``wait`` is a barrier (``accelerator.wait_for_everyone``).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:06d}"
    partial = root / f".step-{step:06d}.partial"
    if is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    wait()
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(partial / f"rng-{process_index}.safetensors"))
    write_json_atomic(partial / f"rng-{process_index}.json", rng_meta)
    if is_main_process:
        save_file(trainable_state(model), str(partial / ADAPTER_FILE))
        opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, str(partial / OPTIMIZER_TENSORS))
        write_json_atomic(partial / OPTIMIZER_JSON, opt_meta)
        write_json_atomic(partial / STATE_FILE, training_state)
    wait()
    if is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    wait()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists())


def load_checkpoint(
    checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, process_index: int
) -> dict[str, Any]:
    """Restore weights, optimizer and this process's RNG from ``checkpoint``; return the training state."""
    load_trainable_state(model, load_file(str(checkpoint / ADAPTER_FILE)))
    meta = json.loads((checkpoint / OPTIMIZER_JSON).read_text())
    optimizer.load_state_dict(_join_optimizer_state(load_file(str(checkpoint / OPTIMIZER_TENSORS)), meta))
    rng_file = checkpoint / f"rng-{process_index}.safetensors"
    if not rng_file.exists():  # resumed with more processes than saved: fall back to rank 0's stream
        rng_file = checkpoint / "rng-0.safetensors"
    _set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))
    return json.loads((checkpoint / STATE_FILE).read_text())
