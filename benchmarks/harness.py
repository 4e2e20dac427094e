"""What every throughput benchmark shares: step timing after warm-up, peak memory, and one process per measured run.

Peak memory on a GPU is the CUDA allocator's peak of *allocated* bytes (its cache of freed blocks left out). On a CPU it
is the peak resident set size, which with glibc's default ``malloc`` also holds freed memory the heap keeps: freed
tensors below glibc's (self-raising, up to 32 MiB) mmap threshold stay in a heap that fragments from step to step, and
how much of it stays resident depends on the order of allocations more than on their sizes (the same model, batches
and loss, 2.3 GB live at most, peaked at 2.9 GB of RSS in one training loop and at 3.8 GB in a plain one).
``measure(..., live_memory=True)`` therefore repeats a CPU run in a process whose ``malloc`` returns every freed block
of 128 KiB or more to the system at once, so its RSS follows the memory the run really holds, the CPU counterpart of
the CUDA figure. That run is slower (every large tensor is fresh, zeroed pages), so timings come from the first,
default run only.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queues
import resource
import time
from collections.abc import Callable
from typing import Any

_LIVE_THRESHOLD = 128 * 1024


def peak_memory(device: str) -> float:
    """Peak memory in MiB: CUDA allocated, or the process's resident set size."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory(device: str) -> float:
    """Memory in use now, in MiB: CUDA allocated, or the process's resident set size (Linux; else its peak)."""
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def return_freed_memory() -> bool:
    """Make glibc's ``malloc`` hand every freed block of 128 KiB or more back to the system (a fixed mmap threshold,
    which also stops it raising that threshold itself, and a fixed trim threshold). False where that is not glibc."""
    from polyadapt.cpu_memory import fix_mmap_threshold

    return fix_mmap_threshold(_LIVE_THRESHOLD, trim=_LIVE_THRESHOLD)


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
        self.per_step: list[int] = []  # units of every step, warm-up included
        self.started: float | None = None
        self.seconds = 0.0

    def step_done(self, units: int) -> None:
        self.steps += 1
        self.per_step.append(units)
        if self.steps == self.warmup:
            sync(self.device)
            self.started = time.perf_counter()
        elif self.steps > self.warmup:
            self.units += units

    def stop(self) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - (self.started or time.perf_counter())


def _child(function: Callable[[dict], dict], args: dict, queue: Any, live: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if live and not return_freed_memory():
        queue.put(None)
        return
    queue.put(function({**args, "live": live}))


def measure(function: Callable[[dict], dict], args: dict, live_memory: bool = False) -> dict:
    """Run ``function(args)`` in a fresh process, so runs share no allocator state, caches or peak memory.

    ``function`` returns a dict with ``peak_mib`` (from :func:`peak_memory`). With ``live_memory`` (meant for CPU runs),
    it runs once more in a fresh process that returns freed memory at once (:func:`return_freed_memory`); then
    ``peak_mib`` is that run's peak, ``rss_peak_mib`` the first run's, and ``live`` holds the second run's whole
    result. Where that cannot be arranged (not glibc), the result is the first run's alone.
    """
    result = _run(function, args, live=False)
    if live_memory:
        live = _run(function, args, live=True)
        if live is not None:
            result = {**result, "rss_peak_mib": result["peak_mib"], "peak_mib": live["peak_mib"], "live": live}
    return result


def _run(function: Callable[[dict], dict], args: dict, live: bool) -> dict | None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, args, queue, live))
    process.start()
    while True:  # a child that dies (import error, out of memory) must not leave the parent waiting forever
        try:
            result = queue.get(timeout=1.0)
            break
        except queues.Empty:
            if not process.is_alive():
                raise RuntimeError(
                    f"{function.__name__} died (exit code {process.exitcode}) without a result"
                ) from None
    process.join()
    return result


def live_memory_train(args: dict) -> dict:
    """``train`` keys for a polyadapt run: in the live-memory run, leave the harness's 128 KiB mmap threshold alone
    (a ``train.cpu_mmap_threshold_kib`` would replace it); in the timed run, nothing (the product's default)."""
    return {"cpu_mmap_threshold_kib": None} if args.get("live") else {}
