"""The batching scheduler of one loaded base: one worker thread owns the model and runs every batch on it.

Requests to the same base, whatever their adapters, queue here. When the base is idle the worker waits for the first
job, then up to ``max_wait_ms`` for more (or until a batch is full), attaches their adapters through the
:class:`polyadapt.serve.cache.AdapterCache` (pinned while the job runs) and hands them to the backend; then it calls
``backend.step()`` until no job is active, admitting newly arrived jobs between steps when the backend has room
(continuous batching for token-by-token generation). A job whose adapter does not fit in the cache next to the ones
in use waits at the head of the queue, and nothing overtakes it: the running batch drains and its adapter gets a slot. Control calls (attach ahead of time, detach, retire a version) run on the same thread between
steps, so nothing else ever touches the model.

A plain class: tested with a fake backend, without HTTP or models.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .backend import Job, ServingBackend
from .cache import AdapterCache

log = logging.getLogger("polyadapt.serve")


class SchedulerClosed(RuntimeError):
    """The scheduler was stopped; no job is taken any more."""


class BatchScheduler:
    """Batches jobs for ``backend`` on one worker thread.

    :param on_batch: called with the rows of every forward pass (a metrics histogram).
    """

    def __init__(
        self,
        backend: ServingBackend,
        cache: AdapterCache,
        *,
        max_batch: int,
        max_wait_ms: float,
        name: str = "base",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.name = name
        self.on_batch = on_batch
        self._pending: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"polyadapt-serve-{name}", daemon=True)
        self.steps = 0

    # -- outside the worker --------------------------------------------------------------------------------------
    def start(self) -> BatchScheduler:
        self._thread.start()
        return self

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue ``job``; its future holds the backend's result (or the error)."""
        with self._wake:
            if self._closed:
                raise SchedulerClosed(f"the worker of {self.name} has stopped")
            self._pending.append(job)
            self._wake.notify()
        return job.future

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread between steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._closed:
                raise SchedulerClosed(f"the worker of {self.name} has stopped")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, fail the queued ones, let the active ones finish, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._run_calls()
            with self._wake:
                if self._closed and not self.backend.active:
                    break
                if not self.backend.active and not self._pending and not self._calls:
                    self._wake.wait(timeout=0.5)
                    continue
            if not self.backend.active:
                self._gather()
            self._admit()
            if self.backend.active:
                rows = self.backend.rows()
                try:
                    self.backend.step()
                except Exception as exc:  # a failed forward pass fails its batch, not the server
                    log.exception("%s: a batch failed", self.name)
                    self.backend.fail_all(exc)
                self.steps += 1
                if self.on_batch is not None and rows:
                    self.on_batch(rows)
        self._drain(SchedulerClosed(f"the server is stopping; {self.name} takes no more requests"))
        self._run_calls()
        try:
            self.backend.close()
        except Exception:  # noqa: BLE001 - shutdown goes on
            log.exception("%s: closing the backend failed", self.name)

    def _gather(self) -> None:
        """Idle: wait up to ``max_wait`` after the first job for a fuller batch."""
        with self._wake:
            if not self._pending:
                return
            deadline = self._pending[0].created + self.max_wait
            while len(self._pending) < self.backend.room() and not self._calls and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(timeout=left)

    def _admit(self) -> None:
        room = self.backend.room()
        if room <= 0 or self._closed:
            return
        taken: list[Job] = []
        with self._wake:
            chosen: list[Job] = []
            while self._pending and len(chosen) < room:
                job = self._pending[0]
                if job.cancelled.is_set():
                    self._pending.popleft()
                    job.fail(ConnectionAbortedError("the client went away"))
                    continue
                if not self.cache.fits([*(j.adapter for j in chosen), job.adapter]):
                    # first come, first served: nothing overtakes a job waiting for an adapter slot, so the running
                    # batch drains and its adapter gets one
                    break
                chosen.append(self._pending.popleft())
        for job in chosen:
            try:
                job.slot = self.cache.acquire(job.adapter)
            except Exception as exc:  # an adapter that cannot be attached fails its jobs only
                log.exception("%s: attaching %s failed", self.name, job.adapter.label if job.adapter else "?")
                job.fail(exc)
                continue
            job.future.add_done_callback(lambda _f, slot=job.slot: self.cache.release(slot))
            taken.append(job)
        if taken:
            try:
                self.backend.admit(taken)
            except Exception as exc:
                log.exception("%s: admitting a batch failed", self.name)
                for job in taken:
                    job.fail(exc)
                self.backend.fail_all(exc)

    def _run_calls(self) -> None:
        while True:
            with self._wake:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def _drain(self, error: BaseException) -> None:
        with self._wake:
            jobs, self._pending = list(self._pending), deque()
        for job in jobs:
            job.fail(error)
