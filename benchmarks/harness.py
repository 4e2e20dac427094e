"""What every throughput benchmark shares: step timing after warm-up, peak memory, and one process per measured run."""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from typing import Any


def peak_memory(device: str) -> float:
    """Peak memory in MiB: CUDA allocated, or the process's resident set size."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Wall time and work units (tokens, clips...) of the optimizer steps after the warm-up ones."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device = warmup, device
        self.steps = 0
        self.units = 0
        self.started: float | None = None
        self.seconds = 0.0

    def step_done(self, units: int) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            sync(self.device)
            self.started = time.perf_counter()
        elif self.steps > self.warmup:
            self.units += units

    def stop(self) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - (self.started or time.perf_counter())


def _child(function: Callable[[dict], dict], args: dict, queue: Any) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    queue.put(function(args))


def measure(function: Callable[[dict], dict], args: dict) -> dict:
    """Run ``function(args)`` in a fresh process, so runs share no allocator state, caches or peak memory."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result
