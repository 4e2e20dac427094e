"""The registry's metadata: SQLAlchemy Core tables, the same on SQLite (the embedded default) and PostgreSQL.

Every write is one transaction. Version numbers are taken with an optimistic update of ``names.next_version`` (retried
when another writer took the number first), so concurrent pushers each get their own version on both engines and a
number is never reused, even after a delete. SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` transactions, so a
writer waits for another instead of failing with "database is locked".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from ..errors import RegistryError

T = TypeVar("T")
SCHEMA_VERSION = 1

metadata = sa.MetaData()

names = sa.Table(
    "names", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("next_version", sa.Integer, nullable=False),
)  # fmt: skip

versions = sa.Table(
    "versions", metadata,
    sa.Column("name", sa.String(200), sa.ForeignKey("names.name"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("content_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("manifest_sha256", sa.String(64), nullable=False),
    sa.Column("modality", sa.String(100), nullable=False),
    sa.Column("base_reference", sa.Text, nullable=False),
    sa.Column("base_sha256", sa.String(64), nullable=False),
    sa.Column("data_fingerprint", sa.String(64), nullable=True),
    sa.Column("headline", sa.String(100), nullable=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
)  # fmt: skip

files = sa.Table(
    "files", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("path", sa.String(200), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.ForeignKeyConstraint(["name", "version"], ["versions.name", "versions.version"]),
)  # fmt: skip

tags = sa.Table(
    "tags", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.ForeignKeyConstraint(["name", "version"], ["versions.name", "versions.version"]),
)  # fmt: skip

aliases = sa.Table(
    "aliases", metadata,
    sa.Column("name", sa.String(200), sa.ForeignKey("names.name"), primary_key=True),
    sa.Column("alias", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)  # fmt: skip

events = sa.Table(
    "alias_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, index=True),
    sa.Column("alias", sa.String(200), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=True),
    sa.Column("to_version", sa.Integer, nullable=True),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("by", sa.String(200), nullable=False),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("details", sa.Text, nullable=False, default="{}"),
)  # fmt: skip

settings = sa.Table(
    "settings", metadata,
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)  # fmt: skip


def engine_for(url: str) -> sa.Engine:
    """An engine for a SQLAlchemy URL; ``postgresql://`` means psycopg 3, SQLite gets WAL and immediate writes."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"timeout": 60})
            sa.event.listen(engine, "connect", _sqlite_connect)
            sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise RegistryError(f"registry URL {url!r}: {exc}") from None
    return engine


#: how long a SQLite connection waits for another writer's lock, in seconds
SQLITE_BUSY_SECONDS = 60


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    import sqlite3

    dbapi_connection.isolation_level = None  # transactions are begun explicitly (BEGIN IMMEDIATE)
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
    # Switching a new database to WAL needs its exclusive lock, and SQLite answers "database is locked" at once,
    # without waiting, when another connection is switching it at the same moment (waiting could deadlock): retry.
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.25)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class MetadataStore:
    """The tables above on one engine, with transactions that retry when a concurrent writer got there first."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_for(url)
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except IntegrityError:
            pass  # another process created the tables at the same moment
        except OperationalError as exc:
            if "already exists" not in str(exc):
                raise RegistryError(f"registry {redact(url)}: {exc.orig}") from None
        except sa.exc.SQLAlchemyError as exc:
            if "already exists" not in str(exc):
                raise RegistryError(f"registry {redact(url)}: {getattr(exc, 'orig', exc)}") from None
        with self.transaction() as conn:
            found = conn.execute(sa.select(settings.c.value).where(settings.c.key == "schema")).scalar()
            if found is None:
                try:
                    with conn.begin_nested():
                        conn.execute(settings.insert().values(key="schema", value=str(SCHEMA_VERSION)))
                except IntegrityError:
                    pass
            elif int(found) > SCHEMA_VERSION:
                raise RegistryError(
                    f"registry {redact(url)} has schema {found}; this polyadapt reads schema {SCHEMA_VERSION}"
                )

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise RegistryError(f"registry {redact(self.url)}: {exc.orig}") from None

    def retrying(self, work: Callable[[sa.Connection], T], attempts: int = 50) -> T:
        """Run ``work`` in a transaction, again when a unique key or an optimistic update lost a race."""
        for attempt in range(attempts):
            try:
                with self.transaction() as conn:
                    return work(conn)
            except (IntegrityError, Conflict):
                time.sleep(min(0.01 * (attempt + 1), 0.2))
        raise RegistryError(f"registry {redact(self.url)}: gave up after {attempts} conflicting concurrent writes")

    def dispose(self) -> None:
        self.engine.dispose()

    # -- settings ----------------------------------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with self.transaction() as conn:
            return conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).scalar()

    def set_setting(self, key: str, value: str) -> None:
        def work(conn: sa.Connection) -> None:
            updated = conn.execute(settings.update().where(settings.c.key == key).values(value=value))
            if updated.rowcount == 0:
                conn.execute(settings.insert().values(key=key, value=value))

        self.retrying(work)


class Conflict(Exception):
    """An optimistic update found the row changed by another writer; the transaction is retried."""


def redact(url: str) -> str:
    """The URL without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
