"""The adapter LRU cache of one loaded base: which adapter versions are attached, which are in use, which go next.

A plain class, tested without HTTP or models: ``attach(version)`` and ``detach(slot)`` are the backend's. A version in
use by an admitted job is pinned (``acquire`` / ``release``) and never evicted; when the cache is full, the least
recently used unpinned version is detached to make room. ``retire`` marks a version that will not be asked for again
(a registry alias moved on, an admin unload): it is detached as soon as no job uses it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


class CacheFull(Exception):
    """Every attached adapter is in use and the cache has no room for another."""


@dataclass
class _Entry:
    version: Any
    uses: int = 0
    retired: bool = False


class AdapterCache:
    """Up to ``capacity`` adapter versions attached at once, keyed by ``version.slot``.

    :param attach: ``attach(version)`` attaches a version under ``version.slot`` (may raise; nothing is cached then).
    :param detach: ``detach(slot)`` detaches it.
    :param on_change: called with the number of attached versions after every attach or detach (a metrics gauge).
    """

    def __init__(
        self,
        capacity: int,
        attach: Callable[[Any], None],
        detach: Callable[[str], None],
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._attach = attach
        self._detach = detach
        self._on_change = on_change
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0
        self.evictions = 0

    # -- what is attached ----------------------------------------------------------------------------------------
    def __contains__(self, slot: str) -> bool:
        return slot in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def slots(self) -> list[str]:
        """Attached slots, least recently used first."""
        with self._lock:
            return list(self._entries)

    def in_use(self, slot: str) -> int:
        with self._lock:
            entry = self._entries.get(slot)
            return entry.uses if entry else 0

    def fits(self, versions: Iterable[Any]) -> bool:
        """Whether all of ``versions`` (None entries ignored) could be attached at once, next to the pinned ones."""
        with self._lock:
            wanted = {v.slot for v in versions if v is not None}
            pinned = {s for s, e in self._entries.items() if e.uses}
            return len(wanted | pinned) <= self.capacity

    # -- using ---------------------------------------------------------------------------------------------------
    def acquire(self, version: Any) -> str | None:
        """Attach ``version`` if it is not (evicting the least recently used unpinned one if full), pin it and
        return its slot; ``None`` (the base) returns ``None``. Raises :class:`CacheFull` when nothing can go."""
        if version is None:
            return None
        with self._lock:
            slot = version.slot
            entry = self._entries.get(slot)
            if entry is None:
                while len(self._entries) >= self.capacity:
                    self._evict_one()
                self._attach(version)
                self.loads += 1
                entry = self._entries[slot] = _Entry(version)
                self._changed()
            entry.uses += 1
            entry.retired = False
            self._entries.move_to_end(slot)
            return slot

    def release(self, slot: str | None) -> None:
        """Unpin one use of ``slot``; a retired slot no job uses any more is detached."""
        if slot is None:
            return
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None:
                return
            entry.uses = max(0, entry.uses - 1)
            if entry.retired and not entry.uses:
                self._remove(slot)

    def retire(self, slot: str) -> bool:
        """Detach ``slot`` now if unused, else as soon as its last job ends; True if it was attached."""
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None:
                return False
            entry.retired = True
            if not entry.uses:
                self._remove(slot)
            return True

    def clear(self) -> None:
        """Detach every unpinned slot (shutdown)."""
        with self._lock:
            for slot in [s for s, e in self._entries.items() if not e.uses]:
                self._remove(slot)

    # -- internals -----------------------------------------------------------------------------------------------
    def _evict_one(self) -> None:
        for slot, entry in self._entries.items():  # least recently used first
            if not entry.uses:
                self._remove(slot)
                self.evictions += 1
                return
        raise CacheFull(f"all {self.capacity} attached adapters are in use")

    def _remove(self, slot: str) -> None:
        del self._entries[slot]
        self._detach(slot)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self._entries))
