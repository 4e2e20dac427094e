"""Where served adapters come from: run directories and registry references, resolved to verified versions, and the
follower that re-reads registry aliases so a promotion or a rollback is served without a restart.

A run directory is one fixed version. ``NAME@ALIAS`` (or ``NAME``, the latest) is re-read every
``registry_poll_seconds``: when the alias points somewhere else, the new version is pulled into the local cache (its
digests checked), checked against the base, and new requests get it; jobs already running finish on the old one,
which is then detached. ``NAME@vN`` is pinned and never re-read.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PolyadaptError
from .backend import AdapterVersion

if TYPE_CHECKING:
    from ..config import ResolvedBase
    from ..registry import Ref

log = logging.getLogger("polyadapt.serve")


class BaseIdentity:
    """What an adapter's manifest must match to be served on a base: the reference, the path, or the weights."""

    def __init__(self, name: str, resolved: ResolvedBase) -> None:
        self.name = name
        self.resolved = resolved
        self._digest: dict[str, str] | None = None
        self._lock = threading.Lock()

    def weights(self) -> dict[str, str]:
        from ..manifest import base_weights_digest

        with self._lock:
            if self._digest is None:
                self._digest = base_weights_digest(self.resolved.path) if self.resolved.path is not None else {}
            return self._digest

    def problem(self, version: AdapterVersion) -> str | None:
        """Why ``version`` cannot run on this base (None when it can)."""
        recorded = version.manifest.base
        if recorded.reference == self.resolved.reference:
            return None
        here = self.resolved.path
        if recorded.path and here is not None and Path(recorded.path).resolve() == Path(here).resolve():
            return None
        if recorded.weights_sha256 and recorded.weights_sha256 == self.weights():
            return None
        return (
            f"{version.label} was adapted from {recorded.reference!r}, not from bases.{self.name} "
            f"({self.resolved.reference!r}): the base weights differ"
        )


@dataclass
class AdapterSource:
    """A configured adapter: its name, its base, where it comes from, and the version served now."""

    name: str
    base: str
    source: str
    current: AdapterVersion
    #: the registry reference when it comes from the registry
    ref: Ref | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def followed(self) -> bool:
        """Whether the registry is re-read for it (an alias or the latest version; not a pinned ``vN``)."""
        return self.ref is not None and self.ref.version is None


def run_digest(files: dict[str, str]) -> str:
    """One digest of a run's adapter files (name -> sha256), the identity of a run-directory version."""
    joined = "\n".join(f"{name}={digest}" for name, digest in sorted(files.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def resolve_version(name: str, source: str, registry: str | None, pm: Any = None) -> AdapterVersion:
    """The version ``source`` names now: a run directory, or a registry reference pulled into the local cache.
    Digests are checked (:func:`polyadapt.lifecycle.open_run`)."""
    from ..lifecycle import open_run
    from ..registry import looks_like_ref

    if looks_like_ref(source):
        from ..registry import open as open_registry
        from ..registry import resolve_run

        reg = open_registry(registry, create=False)
        try:
            found = reg.get(source)
        finally:
            reg.close()
        directory = resolve_run(f"{found.name}@v{found.version}", registry)
        run_dir, manifest, config = open_run(directory, pm)
        return AdapterVersion(
            adapter=name, label=found.label, directory=run_dir, digest=found.content_sha256, config=config,
            manifest=manifest, version=found.version,
        )  # fmt: skip
    run_dir, manifest, config = open_run(Path(source), pm)
    files = manifest.adapter.files if manifest.adapter is not None else {}
    digest = run_digest(files)
    return AdapterVersion(
        adapter=name, label=f"{name}@run:{digest[:12]}", directory=run_dir, digest=digest, config=config,
        manifest=manifest,
    )  # fmt: skip


def check_version(
    version: AdapterVersion, modality: str, identity: BaseIdentity, methods: frozenset[str] | None = None
) -> list[str]:
    """Why ``version`` cannot be served on ``identity``'s base of ``modality`` (empty when it can)."""
    if version.config.modality != modality:
        return [f"{version.label} is a {version.config.modality} run; bases.{identity.name} is {modality}"]
    method = version.manifest.adapter.method if version.manifest.adapter is not None else version.config.peft.method
    if methods is not None and method not in methods:
        return [
            f"{version.label} is a {method} adapter; the {modality} server batches {', '.join(sorted(methods))} only"
        ]
    problem = identity.problem(version)
    return [problem] if problem else []


def open_source(name: str, base: str, source: str, registry: str | None, modality: str, identity: BaseIdentity,
                pm: Any = None, methods: frozenset[str] | None = None) -> AdapterSource:  # fmt: skip
    """An :class:`AdapterSource` resolved and checked; a :class:`ConfigError` naming every problem otherwise."""
    from ..registry import looks_like_ref, parse_ref

    try:
        version = resolve_version(name, source, registry, pm)
    except PolyadaptError as exc:
        raise ConfigError(f"adapters.{name}.from: {exc}") from None
    problems = check_version(version, modality, identity, methods)
    if problems:
        raise ConfigError([f"adapters.{name}: {p}" for p in problems])
    ref = parse_ref(source) if looks_like_ref(source) else None
    return AdapterSource(name=name, base=base, source=source, current=version, ref=ref)


class RegistryFollower:
    """Re-reads the registry every ``interval`` seconds for every followed adapter of ``engine`` and hands each new
    version to ``engine.swap(source, version)``. Errors are logged and the served version is kept."""

    def __init__(self, engine: Any, registry: str, interval: float) -> None:
        self.engine = engine
        self.registry = registry
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="polyadapt-serve-registry", daemon=True)
        self.polls = 0
        self.errors = 0

    def start(self) -> RegistryFollower:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> int:
        """One pass over the followed adapters; returns how many moved to a new version."""
        from ..registry import open as open_registry

        moved = 0
        sources = [s for s in self.engine.sources() if s.followed]
        if not sources:
            return 0
        try:
            reg = open_registry(self.registry, create=False)
        except PolyadaptError as exc:
            self.errors += 1
            log.warning("registry %s: %s", self.registry, exc)
            return 0
        try:
            for source in sources:
                try:
                    found = reg.get(source.ref)
                    if found.version == source.current.version and found.content_sha256 == source.current.digest:
                        continue
                    version = resolve_version(source.name, f"{found.name}@v{found.version}", self.registry)
                    self.engine.swap(source, version)
                    moved += 1
                except Exception as exc:  # noqa: BLE001 - the served version stays
                    self.errors += 1
                    log.warning(
                        "adapter %s (%s): keeping %s: %s", source.name, source.source, source.current.label, exc
                    )
        finally:
            reg.close()
            self.polls += 1
        return moved
