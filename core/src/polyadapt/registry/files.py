"""The registry's content-addressed file store: every stored file lives under its sha256, on any fsspec filesystem.

A file is written under a temporary name and moved into place, so a reader never sees half a file and a push killed
half way leaves at most an unreferenced file that ``gc`` removes. Keys are made from digests only: no stored path ever
comes from a user's string.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import RegistryError

DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class FileStore:
    """Files by sha256 under ``root`` of an fsspec filesystem (``file://``, ``memory://``, ``s3://``, ``gs://``...)."""

    def __init__(self, url: str) -> None:
        from fsspec.core import url_to_fs

        self.url = url
        try:
            self.fs, root = url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise RegistryError(f"registry files {url!r}: {exc}") from None
        self.root = root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"FileStore({self.url!r})"

    def key(self, digest: str) -> str:
        if not DIGEST.match(digest):
            raise RegistryError(f"not a sha256 digest: {digest!r}")
        return f"{self.root}/sha256/{digest[:2]}/{digest[2:]}"

    def has(self, digest: str, size: int | None = None) -> bool:
        key = self.key(digest)
        if not self.fs.exists(key):
            return False
        return size is None or self.fs.size(key) == size

    def put(self, source: Path, digest: str) -> bool:
        """Store ``source`` under ``digest`` (checked while copying); False when the store already held it."""
        size = Path(source).stat().st_size
        if self.has(digest, size):
            return False
        key = self.key(digest)
        self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        partial = f"{self.root}/tmp/{uuid.uuid4().hex}"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        hasher = hashlib.sha256()
        try:
            with open(source, "rb") as src, self.fs.open(partial, "wb") as dst:
                while block := src.read(CHUNK):
                    hasher.update(block)
                    dst.write(block)
            if hasher.hexdigest() != digest:
                raise RegistryError(
                    f"{source} changed while it was stored (sha256 {hasher.hexdigest()}, expected {digest})"
                )
            self.fs.mv(partial, key)
        finally:
            if self.fs.exists(partial):
                self.fs.rm(partial)
        return True

    def chunks(self, digest: str) -> Iterator[bytes]:
        """The stored bytes of ``digest``, in blocks. A missing file is a :class:`RegistryError`."""
        key = self.key(digest)
        try:
            handle = self.fs.open(key, "rb")
        except FileNotFoundError:
            raise RegistryError(f"stored file {digest} is missing from {self.url}") from None
        with handle:
            while block := handle.read(CHUNK):
                yield block

    def read(self, digest: str) -> bytes:
        """The whole stored file, checked against its digest."""
        data = b"".join(self.chunks(digest))
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise RegistryError(f"stored file {digest} is altered (its sha256 is now {actual})")
        return data

    def rehash(self, digest: str) -> str | None:
        """The sha256 of what is stored under ``digest`` now, or None when nothing is."""
        if not self.fs.exists(self.key(digest)):
            return None
        hasher = hashlib.sha256()
        for block in self.chunks(digest):
            hasher.update(block)
        return hasher.hexdigest()

    def digests(self) -> Iterator[tuple[str, float | None]]:
        """Every stored digest with its modification time (None where the filesystem does not say)."""
        base = f"{self.root}/sha256"
        if not self.fs.exists(base):
            return
        for path, info in self.fs.find(base, detail=True).items():
            parts = path.rstrip("/").split("/")
            digest = parts[-2] + parts[-1]
            if DIGEST.match(digest):
                yield digest, _mtime(info)

    def remove(self, digest: str) -> None:
        self.fs.rm(self.key(digest))

    def remove_stale_partials(self, older_than: float) -> int:
        """Delete temporary files that a killed push left behind."""
        base = f"{self.root}/tmp"
        if not self.fs.exists(base):
            return 0
        removed = 0
        for path, info in self.fs.find(base, detail=True).items():
            mtime = _mtime(info)
            if mtime is None or mtime < older_than:
                self.fs.rm(path)
                removed += 1
        return removed


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "created", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, int | float):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
    return None
