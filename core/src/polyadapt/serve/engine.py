"""The server's typed core: bases loaded once, adapters by name and version, routes, tenants' access, one batching
worker per base. No HTTP here: the routers call :meth:`Engine.resolve` then :meth:`Engine.submit`.

Startup resolves every adapter first (registry references pulled and verified, each checked against its base), so a
config that cannot be served fails with every problem at once before any model loads; then each base loads on the
inference device and its worker starts. Registry aliases are re-read by a :class:`RegistryFollower`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PolyadaptError
from .adapters import AdapterSource, BaseIdentity, RegistryFollower, check_version, open_source
from .backend import AdapterVersion, BackendContext, BackendSpec, Job, ServingBackend
from .cache import AdapterCache
from .errors import APIError, model_not_found
from .metrics import ServeMetrics
from .retrieval import ServedIndex, open_indexes
from .routing import Decision, Route, Router
from .scheduler import BatchScheduler

if TYPE_CHECKING:
    from ..config import AdaptConfig
    from .config import Keys, ServeConfig

log = logging.getLogger("polyadapt.serve")


@dataclass
class BaseWorker:
    """One loaded base: its backend (which owns the model), adapter cache and batching scheduler."""

    name: str
    modality: str
    config: AdaptConfig
    spec: BackendSpec
    identity: BaseIdentity
    backend: ServingBackend
    cache: AdapterCache
    scheduler: BatchScheduler

    @property
    def label(self) -> str:
        return f"{self.name}@base"


@dataclass(frozen=True)
class Target:
    """What one request is served by: the name it asked for, the adapter or base chosen (after a route), the
    worker of that base and the adapter version (None: the base alone)."""

    requested: str
    served: str
    worker: BaseWorker
    adapter: AdapterVersion | None
    decision: Decision | None = None

    @property
    def label(self) -> str:
        """What ``x-polyadapt-adapter`` says: the adapter version, or ``BASE@base``."""
        return self.adapter.label if self.adapter is not None else self.worker.label


class Engine:
    """Build with :meth:`start`; close with :meth:`close`."""

    def __init__(self, config: ServeConfig, keys: Keys, metrics: ServeMetrics | None = None) -> None:
        self.config = config
        self.keys = keys
        self.metrics = metrics or ServeMetrics()
        self.workers: dict[str, BaseWorker] = {}
        self._sources: dict[str, AdapterSource] = {}
        self.access: dict[str, set[str]] = {name: set(t.models) for name, t in config.tenants.items()}
        self.router = Router(
            {name: Route(name, dict(r.split), r.sticky) for name, r in config.routes.items()},
            on_decision=lambda d: self.metrics.route_decisions.labels(d.route, d.target).inc(),
        )
        self.follower: RegistryFollower | None = None
        #: the index grounding each adapter or route with ``retrieve:``
        self.indexes: dict[str, ServedIndex] = {}
        self.started = time.time()
        self._lock = threading.RLock()

    # -- startup and shutdown ------------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: ServeConfig, keys: Keys, *, plugin_manager: Any = None, follow: bool = True) -> Engine:
        """Resolve and check every adapter, load every base, start the workers (and the registry follower)."""
        from ..lifecycle import resolve_base
        from ..plugins import get_plugin_manager

        pm = plugin_manager or get_plugin_manager()
        engine = cls(config, keys)
        problems: list[str] = []
        backends = pm.serving_backends()
        identities: dict[str, BaseIdentity] = {}
        for name, base_config in config.base_configs.items():
            try:
                identities[name] = BaseIdentity(name, resolve_base(base_config.base, pm))
            except PolyadaptError as exc:
                problems.append(f"bases.{name}.base: {exc}")
        for name, entry in config.adapters.items():
            if entry.base not in identities:
                continue
            modality = config.base_configs[entry.base].modality
            try:
                engine._sources[name] = open_source(
                    name,
                    entry.base,
                    entry.source,
                    config.registry,
                    modality,
                    identities[entry.base],
                    pm,
                    backends[modality].peft_methods,
                )
            except ConfigError as exc:
                problems.extend(exc.problems)
        try:
            engine.indexes = open_indexes(config)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        try:
            for name, base_config in config.base_configs.items():
                engine._load_base(name, base_config, backends[base_config.modality], identities[name], pm)
        except BaseException:
            engine.close()
            raise
        for source in engine._sources.values():
            engine.metrics.adapter_version.labels(source.name).set(source.current.version or 0)
        if follow and config.registry is not None and any(s.followed for s in engine._sources.values()):
            engine.follower = RegistryFollower(engine, config.registry, config.registry_poll_seconds).start()
        return engine

    def _load_base(self, name: str, config: AdaptConfig, spec: BackendSpec, identity: BaseIdentity, pm: Any) -> None:
        from ..lifecycle import open_base

        log.info("loading base %s (%s, %s)", name, config.modality, config.base)
        try:
            run = open_base(config, None, pm)
        except PolyadaptError as exc:
            raise ConfigError(f"bases.{name}: {exc}") from None
        limits = self.config.limits
        backend = spec.factory(BackendContext(name=name, run=run, config=config, limits=limits))
        gauge = self.metrics.loaded_adapters.labels(name)
        loads = self.metrics.adapter_loads.labels(name)

        def attach(version: AdapterVersion) -> None:
            log.info("base %s: attaching %s as %s", name, version.label, version.slot)
            backend.attach(version)
            loads.inc()

        cache = AdapterCache(limits.max_loaded_adapters, attach, backend.detach, on_change=gauge.set)
        gauge.set(0)
        rows = self.metrics.batch_rows.labels(name)
        scheduler = BatchScheduler(
            backend, cache, max_batch=limits.max_batch, max_wait_ms=limits.max_wait_ms, name=name,
            on_batch=rows.observe,
        )  # fmt: skip
        self.workers[name] = BaseWorker(name, config.modality, config, spec, identity, backend, cache, scheduler)
        scheduler.start()

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        for worker in self.workers.values():
            worker.scheduler.close()

    # -- names ---------------------------------------------------------------------------------------------------
    def sources(self) -> list[AdapterSource]:
        with self._lock:
            return list(self._sources.values())

    def source(self, name: str) -> AdapterSource | None:
        with self._lock:
            return self._sources.get(name)

    def resolve(self, model: str, tenant: str, endpoint: str, user: str | None = None) -> Target:
        """The target of a request for ``model`` by ``tenant`` at ``endpoint``. A model the tenant may not use is
        a 404 exactly like one that does not exist; a model of another modality than the endpoint's is a 400."""
        with self._lock:
            if model not in self.access.get(tenant, ()):
                raise model_not_found(model)
            decision = None
            served = model
            if model in self.router:
                decision = self.router.decide(model, user)
                served = decision.target
            if served in self.workers:
                worker, adapter = self.workers[served], None
            elif served in self._sources:
                source = self._sources[served]
                worker, adapter = self.workers[source.base], source.current
            else:  # configured for the tenant but removed by an admin since
                raise model_not_found(model)
        if endpoint not in worker.spec.endpoints:
            raise APIError(
                400, f"The model '{model}' is a {worker.modality} model; it does not serve this endpoint "
                f"(it serves: {', '.join(sorted(worker.spec.endpoints))}).", param="model", code="wrong_endpoint",
            )  # fmt: skip
        return Target(requested=model, served=served, worker=worker, adapter=adapter, decision=decision)

    def index_for(self, target: Target) -> ServedIndex | None:
        """The index grounding ``target``'s requests: its route's ``retrieve:``, else its adapter's (None: none)."""
        return self.indexes.get(target.requested) or self.indexes.get(target.served)

    def submit(self, target: Target, spec: Any, on_event: Any = None) -> Job:
        job = Job(spec=spec, adapter=target.adapter, on_event=on_event)
        target.worker.scheduler.submit(job)
        return job

    def models_for(self, tenant: str) -> list[dict[str, Any]]:
        """The OpenAI model objects ``tenant`` may use: each with its base as ``parent`` and its version."""
        created = int(self.started)
        listed = []
        with self._lock:
            for name in sorted(self.access.get(tenant, ())):
                item: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "polyadapt"}
                if name in self.workers:
                    worker = self.workers[name]
                    item.update(parent=None, root=name, modality=worker.modality, version=worker.label,
                                base=worker.config.base)  # fmt: skip
                elif name in self._sources:
                    source = self._sources[name]
                    item.update(parent=source.base, root=source.base, modality=self.workers[source.base].modality,
                                version=source.current.label)  # fmt: skip
                elif name in self.router:
                    route = self.router.routes[name]
                    bases = {self._base_of(t) for t in route.targets}
                    parent = bases.pop() if len(bases) == 1 else None
                    item.update(parent=parent, root=parent, modality=self.config.modality_of(name), version=None,
                                route={t: round(w, 6) for t, w in zip(route.targets, route.weights, strict=True)})  # fmt: skip
                else:
                    continue
                listed.append(item)
        return listed

    def _base_of(self, name: str) -> str | None:
        if name in self.workers:
            return name
        source = self._sources.get(name)
        return source.base if source else None

    # -- versions ------------------------------------------------------------------------------------------------
    def swap(self, source: AdapterSource, version: AdapterVersion) -> None:
        """Serve ``version`` for ``source`` from now on (a registry alias moved); the old version is detached once
        its running jobs finish."""
        worker = self.workers[source.base]
        problems = check_version(version, worker.modality, worker.identity, worker.spec.peft_methods)
        if problems:
            raise ConfigError(problems)
        with self._lock:
            old = source.current
            source.current = version
        log.info("adapter %s: now serving %s (was %s)", source.name, version.label, old.label)
        self.metrics.adapter_version.labels(source.name).set(version.version or 0)
        self.metrics.version_changes.labels(source.name).inc()
        if old.slot != version.slot:
            worker.scheduler.call(lambda: worker.cache.retire(old.slot))

    # -- admin ---------------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, base: str, source: str, tenants: list[str]) -> AdapterSource:
        """Serve a registry version under ``name`` on ``base`` (replacing an adapter of that name), for ``tenants``."""
        from ..registry import looks_like_ref
        from .config import MODEL_NAME

        if not MODEL_NAME.match(name) or name.startswith("__"):
            raise APIError(400, f"'{name}' is not a valid model name", param="name")
        if not looks_like_ref(source):
            raise APIError(400, "'from' must be a registry reference NAME@REF; a request cannot name a server path",
                           param="from")  # fmt: skip
        if self.config.registry is None:
            raise APIError(400, "this server has no registry configured", param="from")
        if base not in self.workers:
            raise APIError(400, f"'{base}' is not a base of this server (bases: {', '.join(sorted(self.workers))})",
                           param="base")  # fmt: skip
        with self._lock:
            if name in self.workers or name in self.router:
                raise APIError(400, f"'{name}' is a base or a route; choose another adapter name", param="name")
        unknown = [t for t in tenants if t not in self.access]
        if unknown:
            raise APIError(400, f"unknown tenant(s): {', '.join(unknown)}", param="tenants")
        worker = self.workers[base]
        try:
            added = open_source(
                name,
                base,
                source,
                self.config.registry,
                worker.modality,
                worker.identity,
                methods=worker.spec.peft_methods,
            )
        except ConfigError as exc:
            raise APIError(400, "; ".join(exc.problems), param="from") from None
        with self._lock:
            previous = self._sources.get(name)
            self._sources[name] = added
            for tenant in tenants:
                self.access[tenant].add(name)
        self.metrics.adapter_version.labels(name).set(added.current.version or 0)
        if previous is not None and previous.current.slot != added.current.slot:
            old = self.workers[previous.base]
            old.scheduler.call(lambda: old.cache.retire(previous.current.slot))
        if self.follower is None and added.followed:
            self.follower = RegistryFollower(self, self.config.registry, self.config.registry_poll_seconds).start()
        return added

    def remove_adapter(self, name: str) -> AdapterSource:
        with self._lock:
            source = self._sources.pop(name, None)
        if source is None:
            raise APIError(404, f"no adapter named '{name}'", param="name", code="adapter_not_found")
        worker = self.workers[source.base]
        worker.scheduler.call(lambda: worker.cache.retire(source.current.slot)).result(timeout=60)
        return source

    def load(self, name: str, timeout: float = 300) -> AdapterSource:
        """Attach the adapter's current version now (instead of at its first request)."""
        source = self._admin_source(name)
        worker = self.workers[source.base]

        def warm() -> None:
            slot = worker.cache.acquire(source.current)
            worker.cache.release(slot)

        self._wait(worker.scheduler.call(warm), timeout)
        return source

    def unload(self, name: str, timeout: float = 60) -> bool:
        """Detach the adapter's current version (it stays servable and attaches again on demand)."""
        source = self._admin_source(name)
        worker = self.workers[source.base]
        return bool(self._wait(worker.scheduler.call(lambda: worker.cache.retire(source.current.slot)), timeout))

    def adapters_state(self) -> list[dict[str, Any]]:
        rows = []
        for source in self.sources():
            worker = self.workers[source.base]
            rows.append({
                "name": source.name, "base": source.base, "from": source.source, "version": source.current.label,
                "followed": source.followed, "loaded": source.current.slot in worker.cache,
                "tenants": sorted(t for t, models in self.access.items() if source.name in models),
            })  # fmt: skip
        return rows

    def _admin_source(self, name: str) -> AdapterSource:
        source = self.source(name)
        if source is None:
            raise APIError(404, f"no adapter named '{name}'", param="name", code="adapter_not_found")
        return source

    @staticmethod
    def _wait(future: concurrent.futures.Future, timeout: float) -> Any:
        try:
            return future.result(timeout=timeout)
        except PolyadaptError as exc:
            raise APIError(400, str(exc)) from None

    # -- health --------------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "uptime_seconds": round(time.time() - self.started, 1),
            "bases": {
                name: {
                    "modality": w.modality, "loaded_adapters": len(w.cache), "queued": w.scheduler.queued,
                    "active": w.backend.active,
                }
                for name, w in self.workers.items()
            },
            "adapters": len(self._sources),
            "registry_polls": self.follower.polls if self.follower else 0,
        }  # fmt: skip
