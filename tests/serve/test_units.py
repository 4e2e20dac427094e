"""The server's plain classes without HTTP or models: config validation, keys, the adapter LRU cache, the batching
scheduler (with a fake backend), routes."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from polyadapt.errors import ConfigError
from polyadapt.serve.auth import Keyring
from polyadapt.serve.backend import Job, ServingBackend
from polyadapt.serve.cache import AdapterCache, CacheFull
from polyadapt.serve.config import Limits, read_keys, validate_serve_config
from polyadapt.serve.routing import Route, Router, sticky_point
from polyadapt.serve.scheduler import BatchScheduler


@dataclass(frozen=True)
class FakeVersion:
    slot: str
    label: str = ""


# -- config --------------------------------------------------------------------------------------------------------
def test_config_reports_every_problem_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    raw = {
        "bases": {
            "smol": {"modality": "text", "base": "x", "colour": 1},
            "bad name": {"modality": "nope", "base": "y"},
        },
        "adapters": {
            "a": {"base": "missing", "from": str(tmp_path / "gone")},
            "b": {"base": "smol", "from": "harbor@production"},
            "c": {"base": "smol", "frm": str(run)},
        },
        "routes": {"r": {"split": {"a": 1, "zzz": 1}}, "w": {"split": {"a": 0}}},
        "tenants": {"t": {"key_env": "1X", "models": ["a", "nothing"]}},
        "limits": {"max_tokens": 0},
    }
    with pytest.raises(ConfigError) as caught:
        validate_serve_config(raw, source="serve.yaml")
    problems = "\n".join(caught.value.problems)
    for expected in (
        "limits.max_tokens: 0 is invalid",
        "adapters.c.frm: unknown key; valid keys here: base, from",
        "routes.w.split: weights must be greater than 0",
        "bases.smol.colour: unknown key",
        "bases.bad name.modality: modality 'nope' is not installed",
        "bases.bad name: 'bad name' is not a valid model name",
        "adapters.a.base: 'missing' is not a base",
        "adapters.a.from:",
        "adapters.b.from: 'harbor@production' is a registry reference; set registry:",
        "routes.r.split.zzz: not an adapter or a base",
        "tenants.t.key_env: '1X' is not an environment variable name",
        "tenants.t.models: 'nothing' is not a base, adapter or route",
    ):
        assert expected in problems, (expected, problems)
    assert str(caught.value).startswith("serve.yaml: ")


def test_keys_come_from_the_environment_and_must_differ():
    raw = {
        "bases": {"b": {"modality": "text", "base": "x"}},
        "tenants": {"one": {"key_env": "K1", "models": ["b"]}, "two": {"key_env": "K2", "models": ["b"]}},
        "admin_key_env": "KA",
    }
    config = validate_serve_config(raw)
    with pytest.raises(ConfigError) as caught:
        read_keys(config, {"K1": "same", "K2": "same"})
    text = str(caught.value)
    assert "$KA is not set" in text and "one, two have the same key" in text
    keys = read_keys(config, {"K1": "k1", "K2": "k2", "KA": "ka"})
    assert keys.tenants == {"one": "k1", "two": "k2"} and keys.admin == "ka"
    ring = Keyring(keys.tenants, keys.admin)
    assert ring.tenant("k2") == "two" and ring.tenant("k3") is None and ring.tenant(None) is None
    assert ring.is_admin("ka") and not ring.is_admin("k1")


# -- cache ---------------------------------------------------------------------------------------------------------
def test_cache_evicts_the_least_recently_used_unpinned_adapter():
    attached: list[str] = []
    detached: list[str] = []
    sizes: list[int] = []
    cache = AdapterCache(2, lambda v: attached.append(v.slot), detached.append, on_change=sizes.append)
    a, b, c = FakeVersion("a"), FakeVersion("b"), FakeVersion("c")
    assert cache.acquire(None) is None
    cache.release(cache.acquire(a))
    held = cache.acquire(b)
    cache.release(cache.acquire(a))  # a is now the most recently used
    cache.acquire(c)  # b is pinned, so a goes even though it was used last
    assert detached == ["a"] and cache.slots == ["b", "c"]
    with pytest.raises(CacheFull):
        cache.acquire(a)
    assert not cache.fits([a]) and cache.fits([b, c])
    cache.release(held)
    cache.acquire(a)
    assert detached == ["a", "b"] and attached == ["a", "b", "c", "a"]
    assert cache.loads == 4 and cache.evictions == 2 and sizes[-1] == 2


def test_a_retired_adapter_goes_when_its_last_job_ends():
    detached: list[str] = []
    cache = AdapterCache(4, lambda v: None, detached.append)
    v1 = FakeVersion("v1")
    cache.acquire(v1)
    assert cache.retire("v1") and detached == []
    cache.release("v1")
    assert detached == ["v1"] and "v1" not in cache
    assert not cache.retire("v1")


# -- scheduler -----------------------------------------------------------------------------------------------------
class FakeBackend(ServingBackend):
    """Each job needs ``spec`` steps; rows may join between steps. Records every forward pass's rows."""

    def __init__(self, max_batch: int) -> None:
        self.limits = Limits(max_batch=max_batch)
        self.running: list[list] = []
        self.passes: list[list[tuple[str | None, int]]] = []
        self.lock = threading.Lock()

    @property
    def active(self) -> int:
        return len(self.running)

    def room(self) -> int:
        return self.limits.max_batch - len(self.running)

    def admit(self, jobs) -> None:
        self.running += [[job, 0] for job in jobs]

    def step(self) -> None:
        self.passes.append([(entry[0].slot, id(entry[0])) for entry in self.running])
        for entry in self.running:
            entry[1] += 1
            if entry[1] >= entry[0].spec:
                entry[0].finish((entry[0].slot, len(self.passes)))
        self.running = [e for e in self.running if not e[0].done]
        time.sleep(0.001)


def make_scheduler(max_batch=4, capacity=2, wait_ms=30):
    backend = FakeBackend(max_batch)
    cache = AdapterCache(capacity, lambda v: None, lambda s: None)
    batches: list[int] = []
    scheduler = BatchScheduler(backend, cache, max_batch=max_batch, max_wait_ms=wait_ms, on_batch=batches.append)
    return scheduler.start(), backend, cache, batches


def test_scheduler_batches_concurrent_jobs_and_joins_new_ones_between_steps():
    scheduler, backend, cache, batches = make_scheduler(max_batch=4, capacity=4, wait_ms=20)
    try:
        a, b = FakeVersion("a"), FakeVersion("b")
        first = [scheduler.submit(Job(spec=200, adapter=v)) for v in (a, b, None)]
        time.sleep(0.08)
        late = scheduler.submit(Job(spec=1, adapter=a))
        results = [f.result(timeout=10) for f in [*first, late]]
        assert [r[0] for r in results] == ["a", "b", None, "a"]
        # the three first jobs waited for each other and shared their first pass; the late one joined a later pass
        assert len(backend.passes[0]) == 3 and max(len(p) for p in backend.passes) == 4
        assert batches[0] == 3
        assert cache.in_use("a") == 0 and cache.in_use("b") == 0
    finally:
        scheduler.close()


def test_scheduler_never_exceeds_the_cache_and_serves_first_come_first_served():
    scheduler, backend, cache, _ = make_scheduler(max_batch=8, capacity=2, wait_ms=5)
    try:
        versions = [FakeVersion(name) for name in "abcd"]
        futures = [scheduler.submit(Job(spec=2, adapter=versions[i % 4])) for i in range(16)]
        for future in futures:
            future.result(timeout=10)
        for rows in backend.passes:
            assert len({slot for slot, _ in rows if slot}) <= 2
        assert len(cache) <= 2
    finally:
        scheduler.close()


def test_a_failed_pass_fails_its_jobs_and_the_scheduler_goes_on():
    scheduler, backend, _, _ = make_scheduler()
    try:
        original = backend.step

        def broken() -> None:
            backend.step = original
            raise RuntimeError("boom")

        def fail_all(error):
            for job, _ in backend.running:
                job.fail(error)
            backend.running = []

        backend.fail_all = fail_all
        backend.step = broken
        with pytest.raises(RuntimeError, match="boom"):
            scheduler.submit(Job(spec=1)).result(timeout=10)
        assert scheduler.submit(Job(spec=1)).result(timeout=10)[0] is None
        assert scheduler.call(lambda: threading.current_thread().name).result(timeout=10) == "polyadapt-serve-base"
    finally:
        scheduler.close()


# -- routes --------------------------------------------------------------------------------------------------------
def test_routes_split_by_weight_and_stick_to_a_user():
    decisions = []
    draws = iter([0.05, 0.95, 0.5])
    router = Router({"ab": Route("ab", {"x": 9, "y": 1}, sticky="user")}, rng=lambda: next(draws),
                    on_decision=decisions.append)  # fmt: skip
    assert [router.decide("ab").target for _ in range(3)] == ["x", "y", "x"]
    chosen = {router.decide("ab", user="alice").target for _ in range(5)}
    assert len(chosen) == 1 and chosen.pop() == ("x" if sticky_point("ab", "alice") < 0.9 else "y")
    assert decisions[-1].sticky and not decisions[0].sticky
    share = sum(Route("r", {"x": 0.9, "y": 0.1}).pick(sticky_point("r", f"user{i}")) == "x" for i in range(2000))
    assert 0.87 < share / 2000 < 0.93
