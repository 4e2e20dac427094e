"""The adapter registry: ``polyadapt.registry.open(url)`` and the ``polyadapt registry`` commands.

Versions of complete runs under a name (``harbor-support@v3``), aliases that move with a history (``@production``),
promotion gated on held-out and general-data evidence (:mod:`polyadapt.registry.gate`), pull as a standard adapter
directory, verification of every stored file. Metadata lives in SQLite or PostgreSQL, files in a content-addressed
store on any fsspec filesystem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .refs import Ref, looks_like_ref, parse_ref

if TYPE_CHECKING:
    from .gate import Condition
    from .registry import AliasEvent, FileProblem, GcResult, Promotion, PushResult, Registry, Version, open, resolve_run

_LAZY = {
    "Condition": "gate", "AliasEvent": "registry", "FileProblem": "registry", "GcResult": "registry",
    "Promotion": "registry", "PushResult": "registry", "Registry": "registry", "Version": "registry",
    "open": "registry", "resolve_run": "registry",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    # the database and filesystem libraries load when the registry is used, not when the CLI starts
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = [
    "AliasEvent", "Condition", "FileProblem", "GcResult", "Promotion", "PushResult", "Ref", "Registry", "Version",
    "looks_like_ref", "open", "parse_ref", "resolve_run",
]  # fmt: skip
