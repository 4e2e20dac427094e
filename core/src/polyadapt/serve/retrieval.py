"""Indexes served beside adapters: ``retrieve: INDEX_OR_NAME@ALIAS`` on an adapter or a route of the serve config.

A :class:`ServedIndex` opens the index once; a registry reference is re-read at most every ``registry_poll_seconds``
when a request needs it, and when its alias has moved to another version the new version is pulled, opened and used
from then on (the old one keeps answering until the new one is ready), as adapters follow their aliases.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PolyadaptError

log = logging.getLogger("polyadapt.serve")


@dataclass(frozen=True)
class Retrieved:
    """What one request's question retrieved: the hits, best first, and the index version (``policies@v2``, or the
    directory) that answered."""

    hits: list[Any]
    label: str


class ServedIndex:
    """One configured ``retrieve:`` value, opened (see the module docstring)."""

    def __init__(self, reference: str, registry: str | None, poll_seconds: float, top_k: int = 4) -> None:
        from ..registry.refs import looks_like_ref

        self.reference = reference
        self.registry = registry
        self.poll_seconds = poll_seconds
        self.top_k = top_k
        self.followed = looks_like_ref(reference)
        self._lock = threading.Lock()
        #: searches come from request threads; an index builds its retrievers on the first one
        self._search_lock = threading.Lock()
        self._checked = 0.0
        self.index, self.label, self.content = self._open()

    def _version(self) -> tuple[str, str]:
        """The label and content digest the reference names now."""
        from ..registry import open as open_registry

        reg = open_registry(self.registry, create=False)
        try:
            version = reg.get(self.reference)
            return version.label, version.content_sha256
        finally:
            reg.close()

    def _open(self) -> tuple[Any, str, str]:
        from ..retrieval import open_index

        if not self.followed:
            index = open_index(self.reference)
            return index, str(Path(self.reference)), ""
        label, content = self._version()
        return open_index(self.reference, registry=self.registry), label, content

    def current(self) -> tuple[Any, str]:
        """The index to search now and its label, following a registry alias (checked at most once per poll)."""
        if self.followed and time.monotonic() - self._checked >= self.poll_seconds:
            with self._lock:
                if time.monotonic() - self._checked >= self.poll_seconds:
                    self._checked = time.monotonic()
                    try:
                        label, content = self._version()
                        if content != self.content:
                            index, label, content = self._open()
                            log.info("index %s: now serving %s (was %s)", self.reference, label, self.label)
                            self.index, self.label, self.content = index, label, content
                    except PolyadaptError as exc:  # keep answering from the version in use
                        log.warning("index %s: cannot follow its alias: %s", self.reference, exc)
        return self.index, self.label

    def search(self, query: str, top_k: int | None = None) -> Retrieved:
        index, label = self.current()
        with self._search_lock:
            hits = list(index.search(query, top_k=top_k or self.top_k))
        return Retrieved(hits=hits, label=label)


def open_indexes(config: Any) -> dict[str, ServedIndex]:
    """A :class:`ServedIndex` per adapter or route with ``retrieve:`` (one per distinct reference); every index that
    cannot be opened is a problem of one :class:`ConfigError`."""
    opened: dict[str, ServedIndex] = {}
    by_name: dict[str, ServedIndex] = {}
    problems: list[str] = []
    entries = [("adapters", n, e) for n, e in config.adapters.items()] + [
        ("routes", n, e) for n, e in config.routes.items()
    ]
    for section, name, entry in entries:
        reference = getattr(entry, "retrieve", None)
        if reference is None:
            continue
        if reference not in opened:
            try:
                opened[reference] = ServedIndex(reference, config.registry, config.registry_poll_seconds)
            except PolyadaptError as exc:
                problems.append(f"{section}.{name}.retrieve: {exc}")
                continue
        by_name[name] = opened[reference]
    if problems:
        raise ConfigError(problems)
    return by_name
