"""The run directory and its state machine: ``running`` -> ``failed`` | ``complete``.

:class:`RunDirectory` is the only code that decides whether a directory may be written, and the only writer of its
manifest. A directory it did not make is never touched; a complete run is replaced only with ``overwrite``; an
unfinished one is continued only with ``resume`` and the same config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RunDirectoryError
from .manifest import MANIFEST_NAME, Manifest, now_iso, read_manifest, write_json_atomic

if TYPE_CHECKING:
    from .config import AdaptConfig


class RunDirectory:
    """One run directory: claimed for a new or resumed run, its manifest written atomically at every transition."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # -- reading -----------------------------------------------------------------------------------------------------
    def read(self) -> Manifest | None:
        """The validated manifest, or None when the directory holds none."""
        return read_manifest(self.path)

    def complete_manifest(self) -> Manifest:
        """The manifest of a complete run; anything else is a :class:`RunDirectoryError` saying what it is."""
        if not self.path.is_dir():
            raise RunDirectoryError(f"{self.path} is not a directory")
        manifest = self.read()
        if manifest is None:
            raise RunDirectoryError(f"{self.path} is not a polyadapt run (no {MANIFEST_NAME})")
        if manifest.status != "complete":
            raise RunDirectoryError(f"{self.path} is not a complete run (status: {manifest.status})")
        return manifest

    def verify_files(self, manifest: Manifest) -> None:
        """Check every adapter file against the sha256 the manifest recorded when the run finished; a missing or
        altered file is a :class:`RunDirectoryError` naming it (and both digests)."""
        from .data import sha256_file

        recorded = manifest.adapter.files if manifest.adapter else {}
        for name, expected in sorted(recorded.items()):
            path = self.path / name
            if not path.is_file():
                raise RunDirectoryError(f"{path}: adapter file missing (the manifest records sha256 {expected})")
            actual = sha256_file(path)
            if actual != expected:
                raise RunDirectoryError(
                    f"{path}: adapter file altered since the run finished (sha256 {actual}, the manifest records "
                    f"{expected}); refusing to use it"
                )

    # -- transitions -------------------------------------------------------------------------------------------------
    def claim(self, config: AdaptConfig, resume: bool, overwrite: bool) -> Manifest | None:
        """Make the directory ready for a run of ``config``; return the previous manifest when resuming."""
        path = self.path
        if not path.exists() or not any(path.iterdir()):
            if resume:
                raise RunDirectoryError(f"--resume: {path} holds no run to resume")
            path.mkdir(parents=True, exist_ok=True)
            return None
        try:
            manifest = self.read()
        except RunDirectoryError as exc:
            raise RunDirectoryError(f"{exc}; refusing to touch {path}") from None
        if manifest is None:
            raise RunDirectoryError(f"{path} exists, is not empty and is not a polyadapt run; choose another output")
        if overwrite:
            shutil.rmtree(path)
            path.mkdir(parents=True)
            return None
        if manifest.status == "complete":
            raise RunDirectoryError(f"{path} holds a complete run; pass --overwrite to replace it")
        if not resume:
            raise RunDirectoryError(
                f"{path} holds an unfinished run (status: {manifest.status}); pass --resume to continue it or "
                "--overwrite to restart"
            )
        changed = sorted(diff_keys(manifest.config, with_auto_values(config.to_dict(), manifest.auto)))
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the run's in {', '.join(changed)}; resume with the same config"
            )
        return manifest

    def save(self, manifest: Manifest) -> None:
        """Write the manifest atomically (readers see the old file or the new one)."""
        write_json_atomic(self.manifest_path, manifest.to_json())

    def fail(self, manifest: Manifest, error: BaseException) -> None:
        manifest.status = "failed"
        manifest.error = f"{type(error).__name__}: {error}"
        manifest.finished = now_iso()
        self.save(manifest)

    def complete(self, manifest: Manifest) -> None:
        """The last write of a successful run: only now does the manifest say ``complete``."""
        manifest.status = "complete"
        manifest.error = None
        manifest.finished = now_iso()
        self.save(manifest)


def with_auto_values(config: dict[str, Any], auto: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``config`` with the values an earlier run chose for the keys it had left ``auto`` (so that resuming with the
    same file compares equal to the resolved config the run recorded)."""
    config = json.loads(json.dumps(config))
    for key, choice in auto.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(last) in ("auto", None):
            node[last] = choice["value"]
    return config


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in keys for d in diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]
