"""The adapter registry: named, numbered versions of complete runs, aliases with a history, gated promotion.

A version is immutable once pushed: its files (the adapter's safetensors and JSON, the manifest, report.json) are
stored by sha256 and its metadata row is written in one transaction after every file is stored, so a push killed half
way leaves no visible version. Aliases (``@production``) are the only mutable part; every move is an event in the
history (when, from, to, by whom, why, gated or forced).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..errors import PolyadaptError, PromotionRefused, RegistryError, RunDirectoryError
from ..manifest import MANIFEST_NAME, Manifest, now_iso, parse_manifest
from . import gate
from .files import FileStore
from .refs import FILE_NAME, LATEST, Ref, check_alias, check_name, looks_like_ref, parse_ref
from .store import Conflict, MetadataStore, aliases, dumps, events, files, names, redact, versions
from .store import tags as tag_table

REPORT_JSON = "report.json"
#: a document index's manifest (polyadapt.retrieval) and the kind its versions have
INDEX_MANIFEST = "index.json"
INDEX_KIND = "index"
DEFAULT_LOCATION = "registry"
ENV_URL = "POLYADAPT_REGISTRY"
ENV_FILES = "POLYADAPT_REGISTRY_FILES"
ENV_USER = "POLYADAPT_USER"
SETTINGS = {"min_gain": gate.DEFAULT_MIN_GAIN, "max_forgetting": gate.DEFAULT_MAX_FORGETTING}


# -- what the registry holds -----------------------------------------------------------------------------------------
@dataclass
class Version:
    """One stored version: its metadata, files (name -> sha256, size), tags and the aliases that point at it."""

    name: str
    version: int
    created: str
    created_by: str
    description: str
    content_sha256: str
    manifest_sha256: str
    modality: str
    base_reference: str
    base_sha256: str
    data_fingerprint: str | None
    headline: str | None
    source: str
    summary: dict[str, Any]
    files: dict[str, tuple[str, int]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"

    def as_dict(self) -> dict[str, Any]:
        summary = self.summary
        return {
            "name": self.name,
            "version": self.version,
            "label": self.label,
            "created": self.created,
            "created_by": self.created_by,
            "description": self.description,
            "modality": self.modality,
            "base": {"reference": self.base_reference, "sha256": self.base_sha256, **summary.get("base", {})},
            "data": {"fingerprint": self.data_fingerprint, **summary.get("data", {})},
            "config": summary.get("config", {}),
            "code": summary.get("code", {}),
            "metrics": {"headline": self.headline, **summary.get("metrics", {})},
            "training": summary.get("training"),
            "parents": summary.get("parents", []),
            "source": self.source,
            "content_sha256": self.content_sha256,
            "files": {path: {"sha256": sha, "size": size} for path, (sha, size) in sorted(self.files.items())},
            "aliases": sorted(self.aliases),
            "tags": dict(sorted(self.tags.items())),
        }


@dataclass(frozen=True)
class PushResult:
    version: Version
    #: False when this name already held the same adapter files (``version`` is that version)
    created: bool


@dataclass(frozen=True)
class AliasEvent:
    name: str
    alias: str
    from_version: int | None
    to_version: int | None
    at: str
    by: str
    action: str
    reason: str
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "alias": self.alias, "from": self.from_version, "to": self.to_version, "at": self.at,
            "by": self.by, "action": self.action, "reason": self.reason, "details": self.details,
        }  # fmt: skip


@dataclass(frozen=True)
class Promotion:
    event: AliasEvent
    conditions: list[gate.Condition]


@dataclass(frozen=True)
class FileProblem:
    """A stored file ``verify`` found altered (``actual`` is its digest now) or missing (``actual`` is None)."""

    label: str
    path: str
    expected: str
    actual: str | None

    def __str__(self) -> str:
        if self.actual is None:
            return f"{self.label}: {self.path} is missing (sha256 {self.expected})"
        return f"{self.label}: {self.path} is altered (sha256 {self.actual}, stored as {self.expected})"


@dataclass(frozen=True)
class GcResult:
    removed: int
    bytes: int
    kept: int


# -- the registry ----------------------------------------------------------------------------------------------------
class Registry:
    """Metadata (:class:`MetadataStore`) plus files (:class:`FileStore`); see :func:`polyadapt.registry.open`."""

    def __init__(self, meta: MetadataStore, store: FileStore, location: str) -> None:
        self.meta = meta
        self.store = store
        self.location = location

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    def close(self) -> None:
        self.meta.dispose()

    # -- settings ----------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, float]:
        found = dict(SETTINGS)
        for key in SETTINGS:
            value = self.meta.get_setting(key)
            if value is not None:
                found[key] = float(value)
        return found

    def configure(self, **values: float) -> dict[str, float]:
        for key, value in values.items():
            if key not in SETTINGS:
                raise RegistryError(f"unknown registry setting {key!r} (known: {', '.join(SETTINGS)})")
            if value is None:
                continue
            if not isinstance(value, int | float) or value < 0:
                raise RegistryError(f"registry setting {key}: expected a number >= 0, got {value!r}")
            self.meta.set_setting(key, repr(float(value)))
        return self.settings()

    # -- push --------------------------------------------------------------------------------------------------------
    def push(
        self, run_dir: str | Path, name: str, *, tags: dict[str, str] | None = None, description: str = ""
    ) -> PushResult:
        """Store a complete run as the next version of ``name``. The same adapter files already stored under this
        name give that version back (``created`` False) instead of a copy. A document index (a directory holding
        ``index.json``, see :mod:`polyadapt.retrieval`) is stored the same way, as a version of kind ``index``."""
        from ..rundir import RunDirectory

        check_name(name)
        tags = dict(tags or {})
        for key in tags:
            check_name(key, "tag key")
        if _is_index(run_dir):
            return self._push_index(Path(run_dir), name, tags, description)
        rundir = RunDirectory(run_dir)
        manifest = rundir.complete_manifest()
        if manifest.adapter is None or not manifest.adapter.files:
            raise RunDirectoryError(f"{rundir.path}: the manifest lists no adapter files; nothing to push")
        rundir.verify_files(manifest)
        entries = {**manifest.adapter.files}
        local = {file: rundir.path / file for file in entries}
        for extra in (MANIFEST_NAME, REPORT_JSON):
            path = rundir.path / extra
            if path.is_file():
                entries[extra] = _sha256(path)
                local[extra] = path
        for file in entries:
            if not FILE_NAME.match(file):
                raise RunDirectoryError(f"{rundir.path}: {file!r} is not a file the registry stores (safetensors/JSON)")
        summary = _summary(manifest, _read_json(local.get(REPORT_JSON)))
        content = _content_digest(manifest.adapter.files, summary["base"]["weights_sha256"])
        row = {
            "manifest_sha256": entries[MANIFEST_NAME], "modality": manifest.modality,
            "base_reference": manifest.base.reference, "base_sha256": summary["base_sha256"],
            "data_fingerprint": (manifest.data.fingerprint or {}).get("sha256"), "headline": manifest.metrics.headline,
            "source": str(rundir.path.resolve()),
        }  # fmt: skip
        return self._store_version(name, "adapter", entries, local, content, row, summary, tags, description)

    def _push_index(self, path: Path, name: str, tags: dict[str, str], description: str) -> PushResult:
        from ..retrieval.index import registry_record

        record = registry_record(path)
        return self._store_version(
            name, INDEX_KIND, record["files"], record["local"], record["content"], record["row"], record["summary"],
            tags, description,
        )  # fmt: skip

    def _store_version(
        self, name: str, kind: str, entries: dict[str, str], local: dict[str, Path], content: str,
        row: dict[str, Any], summary: dict[str, Any], tags: dict[str, str], description: str,
    ) -> PushResult:  # fmt: skip
        same = self._find_content(name, content)
        if same is not None:
            return PushResult(self.get(Ref(name, f"v{same}")), created=False)
        for file, digest in entries.items():
            self.store.put(local[file], digest)
        sizes = {file: local[file].stat().st_size for file in entries}
        row = {
            "created": now_iso(), "created_by": current_user(), "description": description,
            "content_sha256": content, **row, "summary": dumps(summary),
        }  # fmt: skip

        def work(conn: sa.Connection) -> int:
            number = self._take_version(conn, name, kind)
            conn.execute(versions.insert().values(name=name, version=number, **row))
            for file, digest in sorted(entries.items()):
                conn.execute(
                    files.insert().values(name=name, version=number, path=file, sha256=digest, size=sizes[file])
                )
            for key, value in sorted(tags.items()):
                conn.execute(tag_table.insert().values(name=name, version=number, key=key, value=str(value)))
            return number

        number = self.meta.retrying(work)
        return PushResult(self.get(Ref(name, f"v{number}")), created=True)

    def _take_version(self, conn: sa.Connection, name: str, kind: str) -> int:
        row = conn.execute(sa.select(names.c.kind, names.c.next_version).where(names.c.name == name)).first()
        if row is None:
            conn.execute(names.insert().values(name=name, kind=kind, created=now_iso(), next_version=2))
            return 1
        if row.kind != kind:
            raise RegistryError(f"{name} holds {row.kind} versions, not {kind} versions")
        taken = conn.execute(
            names.update()
            .where(names.c.name == name, names.c.next_version == row.next_version)
            .values(next_version=row.next_version + 1)
        )
        if taken.rowcount != 1:
            raise Conflict(name)
        return row.next_version

    def _find_content(self, name: str, content: str) -> int | None:
        with self.meta.transaction() as conn:
            return conn.execute(
                sa.select(sa.func.min(versions.c.version)).where(
                    versions.c.name == name, versions.c.content_sha256 == content
                )
            ).scalar()

    # -- reading -----------------------------------------------------------------------------------------------------
    def get(self, ref: Ref | str) -> Version:
        """The version ``ref`` names; an unknown name, version or alias is a :class:`RegistryError` saying what
        exists."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.meta.transaction() as conn:
            number = self._resolve(conn, ref)
            row = conn.execute(
                sa.select(versions).where(versions.c.name == ref.name, versions.c.version == number)
            ).first()
            if row is None:
                raise RegistryError(f"{ref.name}@v{number} does not exist{self._known_versions(conn, ref.name)}")
            return self._version(conn, row)

    def _resolve(self, conn: sa.Connection, ref: Ref) -> int:
        if conn.execute(sa.select(names.c.name).where(names.c.name == ref.name)).first() is None:
            raise RegistryError(f"no adapter named {ref.name!r} in {self.location}")
        if ref.version is not None:
            return ref.version
        if ref.ref == LATEST:
            number = conn.execute(
                sa.select(sa.func.max(versions.c.version)).where(versions.c.name == ref.name)
            ).scalar()
            if number is None:
                raise RegistryError(f"{ref.name} has no versions left")
            return number
        number = conn.execute(
            sa.select(aliases.c.version).where(aliases.c.name == ref.name, aliases.c.alias == ref.ref)
        ).scalar()
        if number is None:
            known = conn.execute(sa.select(aliases.c.alias).where(aliases.c.name == ref.name)).scalars().all()
            listed = f" (aliases: {', '.join(sorted(known))})" if known else " (it has no aliases)"
            raise RegistryError(f"{ref.name} has no alias {ref.ref!r}{listed}")
        return number

    def _known_versions(self, conn: sa.Connection, name: str) -> str:
        numbers = conn.execute(sa.select(versions.c.version).where(versions.c.name == name)).scalars().all()
        if not numbers:
            return f" ({name} has no versions)"
        return f" ({name} has v{min(numbers)}..v{max(numbers)}, {len(numbers)} version(s))"

    def _version(self, conn: sa.Connection, row: Any) -> Version:
        key = (files.c.name == row.name) & (files.c.version == row.version)
        found = {r.path: (r.sha256, r.size) for r in conn.execute(sa.select(files).where(key))}
        tag_rows = conn.execute(
            sa.select(tag_table).where((tag_table.c.name == row.name) & (tag_table.c.version == row.version))
        )
        alias_rows = conn.execute(
            sa.select(aliases.c.alias).where((aliases.c.name == row.name) & (aliases.c.version == row.version))
        )
        return Version(
            name=row.name, version=row.version, created=row.created, created_by=row.created_by,
            description=row.description, content_sha256=row.content_sha256, manifest_sha256=row.manifest_sha256,
            modality=row.modality, base_reference=row.base_reference, base_sha256=row.base_sha256,
            data_fingerprint=row.data_fingerprint, headline=row.headline, source=row.source,
            summary=json.loads(row.summary), files=found, tags={r.key: r.value for r in tag_rows},
            aliases=list(alias_rows.scalars()),
        )  # fmt: skip

    def names(self) -> list[dict[str, Any]]:
        """Every name with its version count, latest version and aliases."""
        with self.meta.transaction() as conn:
            counts = {
                r.name: (r.count, r.latest)
                for r in conn.execute(
                    sa.select(
                        versions.c.name, sa.func.count().label("count"), sa.func.max(versions.c.version).label("latest")
                    ).group_by(versions.c.name)
                )
            }
            alias_map: dict[str, dict[str, int]] = {}
            for r in conn.execute(sa.select(aliases)):
                alias_map.setdefault(r.name, {})[r.alias] = r.version
            rows = conn.execute(sa.select(names).order_by(names.c.name)).all()
        return [
            {
                "name": r.name, "kind": r.kind, "versions": counts.get(r.name, (0, None))[0],
                "latest": counts.get(r.name, (0, None))[1], "aliases": dict(sorted(alias_map.get(r.name, {}).items())),
            }
            for r in rows
        ]  # fmt: skip

    def versions(self, name: str) -> list[Version]:
        check_name(name)
        with self.meta.transaction() as conn:
            if conn.execute(sa.select(names.c.name).where(names.c.name == name)).first() is None:
                raise RegistryError(f"no adapter named {name!r} in {self.location}")
            rows = conn.execute(sa.select(versions).where(versions.c.name == name).order_by(versions.c.version)).all()
            return [self._version(conn, row) for row in rows]

    def manifest(self, version: Version) -> Manifest:
        """The stored manifest of ``version``, checked against its digest."""
        data = self.store.read(version.manifest_sha256)
        return parse_manifest(json.loads(data), f"{version.label}/{MANIFEST_NAME}")

    def diff(self, a: Ref | str, b: Ref | str) -> dict[str, Any]:
        """What differs between two versions: config keys, data fingerprint and counts, base, metrics."""
        first, second = self.get(a), self.get(b)
        one, two = first.as_dict(), second.as_dict()
        return {
            "a": first.label,
            "b": second.label,
            "config": _differences(one["config"], two["config"]),
            "data": _differences(one["data"], two["data"]),
            "base": _differences(one["base"], two["base"]),
            "metrics": _differences(one["metrics"], two["metrics"]),
            "modality": _differences({"modality": first.modality}, {"modality": second.modality}),
        }

    # -- aliases -----------------------------------------------------------------------------------------------------
    def alias(self, ref: Ref | str, alias: str, *, reason: str = "") -> AliasEvent:
        """Point ``alias`` at a version without any check (recorded in the history as ``set``)."""
        version = self.get(ref)
        return self._move(version.name, check_alias(alias), version.version, "set", reason, {}, expect=None)

    def promote(
        self, ref: Ref | str, alias: str, *, min_gain: float | None = None, max_forgetting: float | None = None,
        force: bool = False, reason: str = "",
    ) -> Promotion:  # fmt: skip
        """Move ``alias`` to a version if the gate (:mod:`polyadapt.registry.gate`) passes; otherwise raise
        :class:`PromotionRefused` with every condition. ``force`` (with a ``reason``) moves it anyway."""
        check_alias(alias)
        candidate = self.get(ref)
        settings = self.settings()
        min_gain = settings["min_gain"] if min_gain is None else float(min_gain)
        max_forgetting = settings["max_forgetting"] if max_forgetting is None else float(max_forgetting)
        holder = self.alias_target(candidate.name, alias)
        incumbent = self.get(Ref(candidate.name, f"v{holder}")) if holder is not None else None
        found = gate.conditions(candidate, incumbent, min_gain=min_gain, max_forgetting=max_forgetting)
        failed = [c for c in found if not c.passed]
        if failed and not force:
            raise PromotionRefused(candidate.label, alias, found)
        if force and not reason.strip():
            raise RegistryError("--force needs --reason TEXT: the history records why the gate was overridden")
        details = {
            "conditions": [c.as_dict() for c in found], "min_gain": min_gain, "max_forgetting": max_forgetting,
        }  # fmt: skip
        action = "forced" if force and failed else "gated"
        event = self._move(candidate.name, alias, candidate.version, action, reason, details, expect=holder)
        return Promotion(event=event, conditions=found)

    def rollback(self, name: str, alias: str, *, reason: str = "") -> AliasEvent:
        """Move ``alias`` back to the version it held before its last move (repeatable: each rollback goes one
        further back)."""
        check_name(name)
        check_alias(alias)
        stack = self._alias_stack(name, alias)
        if not stack:
            raise RegistryError(f"{name} has no alias {alias!r}")
        if len(stack) < 2:
            raise RegistryError(
                f"{name}@{alias} has no earlier version to roll back to (it has only held v{stack[-1]})"
            )
        target = stack[-2]
        try:
            self.get(Ref(name, f"v{target}"))
        except RegistryError:
            raise RegistryError(f"{name}@{alias} held v{target} before, but v{target} was deleted") from None
        return self._move(name, alias, target, "rollback", reason, {}, expect=stack[-1])

    def _alias_stack(self, name: str, alias: str) -> list[int]:
        stack: list[int] = []
        for event in self.history(name, alias=alias):
            if event.action == "rollback":
                stack.pop()
            elif event.to_version is not None:
                stack.append(event.to_version)
        return stack

    def alias_target(self, name: str, alias: str) -> int | None:
        with self.meta.transaction() as conn:
            return conn.execute(
                sa.select(aliases.c.version).where(aliases.c.name == name, aliases.c.alias == alias)
            ).scalar()

    def _move(
        self, name: str, alias: str, version: int, action: str, reason: str, details: dict[str, Any],
        *, expect: int | None | bool,
    ) -> AliasEvent:  # fmt: skip
        """Point ``alias`` at ``version`` and record the move, in one transaction. ``expect`` (unless None for "no
        check") is the version the alias must still hold: a concurrent move in between is refused."""
        at, by = now_iso(), current_user()

        def work(conn: sa.Connection) -> AliasEvent:
            current = conn.execute(
                sa.select(aliases.c.version).where(aliases.c.name == name, aliases.c.alias == alias)
            ).scalar()
            if action != "set" and current != expect:
                raise RegistryError(
                    f"{name}@{alias} moved to v{current} while this command ran (it held v{expect}); run it again"
                )
            if current == version:  # already there: nothing moves, nothing is recorded
                return AliasEvent(name, alias, current, version, at, by, "unchanged", reason, details)
            if current is None:
                conn.execute(aliases.insert().values(name=name, alias=alias, version=version))
            else:
                conn.execute(
                    aliases.update().where(aliases.c.name == name, aliases.c.alias == alias).values(version=version)
                )
            conn.execute(
                events.insert().values(
                    name=name, alias=alias, from_version=current, to_version=version, at=at, by=by, action=action,
                    reason=reason, details=dumps(details),
                )
            )  # fmt: skip
            return AliasEvent(name, alias, current, version, at, by, action, reason, details)

        return self.meta.retrying(work)

    def history(self, name: str, *, alias: str | None = None) -> list[AliasEvent]:
        """Every alias move of ``name`` (optionally one alias), oldest first."""
        check_name(name)
        query = sa.select(events).where(events.c.name == name)
        if alias is not None:
            query = query.where(events.c.alias == alias)
        with self.meta.transaction() as conn:
            if conn.execute(sa.select(names.c.name).where(names.c.name == name)).first() is None:
                raise RegistryError(f"no adapter named {name!r} in {self.location}")
            rows = conn.execute(query.order_by(events.c.id)).all()
        return [
            AliasEvent(
                r.name, r.alias, r.from_version, r.to_version, r.at, r.by, r.action, r.reason, json.loads(r.details)
            )
            for r in rows
        ]

    # -- pull, verify, delete, gc ------------------------------------------------------------------------------------
    def pull(self, ref: Ref | str, output: str | Path) -> Path:
        """Write ``ref`` as a standard adapter directory at ``output`` (which must not exist or be empty): its files,
        each checked against its digest before the directory appears, and a model card (README.md)."""
        version = self.get(ref)
        output = Path(output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise RegistryError(f"--output {output} exists and is not empty; choose another directory")
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        try:
            for path, (digest, _size) in sorted(version.files.items()):
                if not FILE_NAME.match(path):
                    raise RegistryError(f"{version.label}: stored file name {path!r} is not allowed; refusing to pull")
                self._copy_checked(version, path, digest, partial / path)
            _write_card(partial, output, version, None if version.modality == INDEX_KIND else self.manifest(version))
            if output.exists():
                output.rmdir()
            os.replace(partial, output)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return output

    def _copy_checked(self, version: Version, path: str, digest: str, target: Path) -> None:
        hasher = hashlib.sha256()
        with target.open("wb") as handle:
            for block in self.store.chunks(digest):
                hasher.update(block)
                handle.write(block)
        if hasher.hexdigest() != digest:
            raise RegistryError(
                f"{version.label}: stored {path} is altered (sha256 {hasher.hexdigest()}, stored as {digest}); "
                "nothing was written"
            )

    def verify(self, name: str | None = None) -> tuple[int, list[FileProblem]]:
        """Re-hash every stored file (of ``name``, or of all); return how many were checked and each one altered or
        missing."""
        query = sa.select(files.c.name, files.c.version, files.c.path, files.c.sha256)
        if name is not None:
            check_name(name)
            query = query.where(files.c.name == name)
        with self.meta.transaction() as conn:
            rows = conn.execute(query.order_by(files.c.name, files.c.version, files.c.path)).all()
        problems: list[FileProblem] = []
        seen: dict[str, str | None] = {}
        for row in rows:
            if row.sha256 not in seen:
                seen[row.sha256] = self.store.rehash(row.sha256)
            actual = seen[row.sha256]
            if actual != row.sha256:
                problems.append(FileProblem(f"{row.name}@v{row.version}", row.path, row.sha256, actual))
        return len(rows), problems

    def delete(self, ref: Ref | str) -> Version:
        """Remove a version's metadata (its files stay until ``gc``); refused while an alias points at it."""
        version = self.get(ref)
        if version.aliases:
            raise RegistryError(
                f"{version.label} is what @{', @'.join(sorted(version.aliases))} points at; move the alias first"
            )

        def work(conn: sa.Connection) -> None:
            held = conn.execute(
                sa.select(aliases.c.alias).where(aliases.c.name == version.name, aliases.c.version == version.version)
            ).first()
            if held is not None:
                raise RegistryError(f"{version.label} is what @{held.alias} points at; move the alias first")
            key = {"name": version.name, "version": version.version}
            for table in (files, tag_table):
                conn.execute(table.delete().where(table.c.name == key["name"], table.c.version == key["version"]))
            conn.execute(versions.delete().where(versions.c.name == key["name"], versions.c.version == key["version"]))

        self.meta.retrying(work)
        return version

    def gc(self, *, grace_seconds: float = 3600.0) -> GcResult:
        """Remove stored files that no version references and that are older than ``grace_seconds`` (a push stores
        its files before its version appears; the grace keeps a push in progress safe)."""
        import time

        with self.meta.transaction() as conn:
            referenced = set(conn.execute(sa.select(files.c.sha256).distinct()).scalars())
        cutoff = time.time() - grace_seconds
        removed = size = kept = 0
        for digest, mtime in list(self.store.digests()):
            if digest in referenced:
                kept += 1
                continue
            if mtime is not None and mtime > cutoff:
                kept += 1
                continue
            size += self.store.fs.size(self.store.key(digest))
            self.store.remove(digest)
            removed += 1
        self.store.remove_stale_partials(cutoff)
        return GcResult(removed=removed, bytes=size, kept=kept)


# -- opening ---------------------------------------------------------------------------------------------------------
def open(url: str | Path | None = None, *, files: str | None = None, create: bool = True) -> Registry:  # noqa: A001
    """Open the registry at ``url``: a directory (SQLite ``registry.db`` and a ``files/`` store inside it; the default
    is ``registry/``, or ``$POLYADAPT_REGISTRY``), or a SQLAlchemy URL (``postgresql://user@host/db``,
    ``sqlite:///path.db``) with its files at ``files`` (an fsspec URL such as ``s3://bucket/adapters``; also
    ``$POLYADAPT_REGISTRY_FILES``), which is recorded in the registry on first use. ``create`` False refuses to make
    a new one."""
    location = str(url or os.environ.get(ENV_URL) or DEFAULT_LOCATION)
    files = files or os.environ.get(ENV_FILES) or None
    if "://" in location and not location.startswith("file://"):
        meta = MetadataStore(location)
        stored = meta.get_setting("files")
        if stored is None:
            if files is None:
                if not location.startswith("sqlite:///"):
                    raise RegistryError(
                        f"registry {redact(location)}: say where its files go (--registry-files URL or "
                        f"${ENV_FILES}, e.g. s3://bucket/adapters)"
                    )
                files = str(Path(location.removeprefix("sqlite:///")).with_suffix(".files").resolve())
            meta.set_setting("files", files)
            stored = files
        elif files is not None and files != stored:
            raise RegistryError(f"registry {redact(location)} keeps its files at {stored}, not {files}")
        return Registry(meta, FileStore(stored), redact(location))
    directory = Path(location.removeprefix("file://"))
    database = directory / "registry.db"
    if not database.exists():
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise RegistryError(f"{directory} is not a polyadapt registry (no registry.db) and is not empty")
        if not create:
            raise RegistryError(f"no registry at {directory} (push a run to create it, or pass --registry)")
        directory.mkdir(parents=True, exist_ok=True)
    meta = MetadataStore(f"sqlite:///{database.resolve()}")
    stored = meta.get_setting("files")
    if stored is None:
        stored = files or str((directory / "files").resolve())
        meta.set_setting("files", stored)
    return Registry(meta, FileStore(stored), str(directory))


def resolve_run(run_dir: str | Path, registry: str | None = None) -> Path:
    """``run_dir`` itself, or for a registry reference (``NAME@REF``) a verified local copy of that version, pulled
    once into the cache (``$POLYADAPT_CACHE``, default ``~/.cache/polyadapt``) and reused while its files match."""
    if not looks_like_ref(run_dir):
        return Path(run_dir)
    reg = open(registry, create=False)
    try:
        version = reg.get(str(run_dir))
        root = Path(os.environ.get("POLYADAPT_CACHE") or Path.home() / ".cache" / "polyadapt") / "registry"
        target = root / version.name / f"v{version.version}-{version.content_sha256[:16]}"
        if not (target / MANIFEST_NAME).exists():
            if target.exists():
                shutil.rmtree(target)
            reg.pull(Ref(version.name, f"v{version.version}"), target)
        return target
    finally:
        reg.close()


# -- helpers ---------------------------------------------------------------------------------------------------------
def current_user() -> str:
    try:
        return os.environ.get(ENV_USER) or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _sha256(path: Path) -> str:
    from ..data import sha256_file

    return sha256_file(path)


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def base_digest(weights_sha256: dict[str, str], reference: str) -> str:
    """One digest for a base model: over its weight files' digests (by name), or over its reference when the run
    recorded none."""
    payload = json.dumps(weights_sha256, sort_keys=True) if weights_sha256 else f"reference:{reference}"
    return hashlib.sha256(payload.encode()).hexdigest()


def _content_digest(adapter_files: dict[str, str], base_weights: dict[str, str]) -> str:
    payload = json.dumps({"adapter": adapter_files, "base": base_weights}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _summary(manifest: Manifest, report: dict[str, Any] | None) -> dict[str, Any]:
    """What ``show``, ``diff`` and the gate read, kept beside the version so that none of them opens a file."""
    directions: dict[str, bool] = {}
    for row in (report or {}).get("metrics", []) + (report or {}).get("general_metrics", []):
        if isinstance(row, dict) and "metric" in row and "higher_is_better" in row:
            directions[row["metric"]] = bool(row["higher_is_better"])
    metrics = manifest.metrics
    for section in (metrics.before, metrics.after, metrics.general_before, metrics.general_after):
        for metric in section or {}:
            directions.setdefault(metric, _direction(manifest.modality, metric))
    base = manifest.base
    return {
        "base": {"reference": base.reference, "hub_id": base.hub_id, "weights_sha256": dict(base.weights_sha256)},
        "base_sha256": base_digest(base.weights_sha256, base.reference),
        "data": {
            "path": manifest.data.path,
            "counts": dict(manifest.data.counts),
            "heldout": dict(manifest.data.heldout),
            "files": dict((manifest.data.fingerprint or {}).get("files", {})),
        },  # fmt: skip
        "config": manifest.config,
        "code": {
            "polyadapt": manifest.polyadapt_version,
            "plugins": {k: v.version for k, v in manifest.plugins.items()},
            "libraries": dict(manifest.libraries),
        },
        "metrics": {
            "before": metrics.before,
            "after": metrics.after,
            "general_before": metrics.general_before,
            "general_after": metrics.general_after,
        },  # fmt: skip
        "directions": directions,
        "improved": manifest.improved,
        "training": manifest.training.model_dump(mode="json") if manifest.training else None,
        "adapter": {"method": manifest.adapter.method, "parameters": dict(manifest.adapter.parameters)},
        "parents": list(manifest.parents),
    }


def _direction(modality: str, metric: str) -> bool:
    try:
        from ..plugins import get_plugin_manager

        return get_plugin_manager().get_modality(modality).higher_is_better(metric)
    except PolyadaptError:
        return not any(word in metric for word in ("loss", "perplexity", "wer", "cer", "distance", "error"))


def _differences(a: Any, b: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        found: dict[str, dict[str, Any]] = {}
        for key in sorted(set(a) | set(b), key=str):
            found.update(_differences(a.get(key), b.get(key), f"{prefix}{key}."))
        return found
    return {} if a == b else {prefix.rstrip("."): {"a": a, "b": b}}


def _is_index(path: str | Path) -> bool:
    path = Path(path)
    return (path / INDEX_MANIFEST).is_file() and not (path / MANIFEST_NAME).is_file()


def _write_card(directory: Path, final: Path, version: Version, manifest: Manifest | None) -> None:
    from ..report import write_model_card

    if manifest is None:  # a document index: its card comes from polyadapt.retrieval
        from ..retrieval.index import index_card

        (directory / "README.md").write_text(index_card(version.label, version.summary), encoding="utf-8")
        return

    try:
        from ..plugins import get_plugin_manager

        modality = get_plugin_manager().get_modality(version.modality)
        usage = modality.usage(final, manifest.base.reference)
    except PolyadaptError:  # the modality's plugin is not installed here: the card says less
        modality, usage = None, ""
    if modality is not None:
        write_model_card(directory, modality, manifest.to_json(), usage, title=version.label)
    lines = [
        "",
        "## Registry",
        "",
        f"- version: `{version.label}` (pushed {version.created} by {version.created_by})",
        f"- aliases: {', '.join('@' + a for a in sorted(version.aliases)) or 'none'}",
        *[f"- tag `{k}`: {v}" for k, v in sorted(version.tags.items())],
        f"- content sha256: `{version.content_sha256}`",
    ]
    card = directory / "README.md"
    head = (
        card.read_text(encoding="utf-8") if card.exists() else f"# {version.label}\n\nA {version.modality} adapter.\n"
    )
    card.write_text(head + "\n".join(lines) + "\n", encoding="utf-8")
