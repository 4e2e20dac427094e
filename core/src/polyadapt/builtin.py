"""polyadapt's own hook implementations: base-model references it resolves itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigError
from .hookspecs import hookimpl

PKG_SCHEME = "pkg://"


def locate_package_file(reference: str) -> Path:
    """Resolve ``pkg://<package>/<path>`` to a path inside an installed package, without importing the package.

    The package's code never runs: its location comes from the import system's spec alone.
    """
    rest = reference[len(PKG_SCHEME) :]
    package, _, inner = rest.partition("/")
    if not package:
        raise ConfigError(f"base: {reference!r} names no package (expected pkg://<package>/<path>)")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"base: {reference!r}: package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    target = (root / inner).resolve() if inner else root
    if not target.is_relative_to(root):
        raise ConfigError(f"base: {reference!r} escapes the package directory")
    if not target.exists():
        raise ConfigError(f"base: {reference!r}: {inner!r} does not exist inside package {package!r} ({root})")
    return target


@hookimpl(trylast=True)
def resolve_base(reference: str):
    from .config import ResolvedBase

    if reference.startswith(PKG_SCHEME):
        return ResolvedBase(reference=reference, path=locate_package_file(reference))
    candidate = Path(reference).expanduser()
    if candidate.exists():
        return ResolvedBase(reference=reference, path=candidate.resolve())
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise ConfigError(f"base: {reference!r} is neither an existing path nor a hub id like 'org/name'")
    return ResolvedBase(reference=reference, hub_id=reference)
