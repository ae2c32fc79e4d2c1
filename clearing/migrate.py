"""The clearing database's schema versions, applied with yoyo-migrations.

The migrations are SQL files shipped in the package: ``migrations/sqlite/`` and
``migrations/postgresql/``, one file per version, the same ids on both engines (``0001-...``
is version 1, ``0002-...`` version 2). A database's version is the highest one applied. A
version-1 database written before migrations existed (no bookkeeping tables; with or without the
``not_shown`` column that code added at open) is recognised by its tables and marked as at
version 1 before anything is applied; so is a version whose changes committed but whose
bookkeeping did not.

``db`` is what ``--db`` takes: a SQLite file path, or ``postgresql://...`` (psycopg 3).
:func:`ensure_current` is what opening a store calls: an empty database is brought to head
silently, one behind head is refused with the command that upgrades it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from farebox.clearing.errors import ClearingError

#: the ids of the migrations this code knows, in order; an id's number is its version
MIGRATIONS = ("0001-schema-v1", "0002-schema-v2", "0003-backoffice", "0004-console",
              "0005-aavs-suspensions", "0006-console-sessions")
HEAD = int(MIGRATIONS[-1].split("-", 1)[0])
#: yoyo's bookkeeping table (yoyo.migrations.default_migration_table)
_BOOKKEEPING = "_yoyo_migration"
#: the PostgreSQL advisory lock that serialises upgrades (two receivers starting at once)
_PG_LOCK = 0x66617265626F7801  # "farebox" 1
_SQLITE_LOCK_TIMEOUT_S = 600


class MigrationError(ClearingError):
    """The database is not at the version this code needs, or cannot be migrated."""


def is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def shown(db: str) -> str:
    """``db`` as it may be printed: a PostgreSQL URL without its password."""
    if not is_postgres(db):
        return db
    parts = urlsplit(db)
    if parts.password is None:
        return db
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _version_of(migration_id: str) -> int:
    return int(migration_id.split("-", 1)[0])


# -- reading the version without changing anything ---------------------------------------------


@contextlib.contextmanager
def _connect(db: str) -> Iterator[Any]:
    """A plain autocommit connection to ``db`` (MigrationError when it cannot be opened)."""
    try:
        if is_postgres(db):
            import psycopg

            conn: Any = psycopg.connect(db, autocommit=True)
        else:
            conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    except ImportError:
        raise MigrationError("a PostgreSQL --db needs psycopg: pip install 'psycopg[binary]'"
                             ) from None
    except Exception as error:  # sqlite3.Error, psycopg.Error: a bad path or URL
        raise MigrationError(f"cannot open {shown(db)}: {error}") from None
    try:
        yield conn
    finally:
        conn.close()


def _tables(conn: Any, postgres: bool) -> set[str]:
    if postgres:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                            ).fetchall()
    else:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


def _columns(conn: Any, postgres: bool, table: str) -> set[str]:
    if postgres:
        rows = conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                            "table_name = %s AND table_schema = current_schema()",
                            (table,)).fetchall()
        return {row[0] for row in rows}
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}


def _shape_version(conn: Any, postgres: bool) -> int:
    """The version the tables themselves show: 0 none of ours, 1 records keyed by terminal,
    2 sources."""
    tables = _tables(conn, postgres)
    if "sources" in tables and "day_totals" in tables:
        return 2
    if "records" in tables and "terminal_id" in _columns(conn, postgres, "records"):
        return 1
    return 0


def _applied(conn: Any, postgres: bool) -> list[str]:
    """The migration ids yoyo has marked applied (none without its table)."""
    if _BOOKKEEPING not in _tables(conn, postgres):
        return []
    return [row[0] for row in conn.execute(f"SELECT migration_id FROM {_BOOKKEEPING}"
                                           ).fetchall()]


def _version(conn: Any, postgres: bool) -> int:
    """The highest version marked applied, or the one the tables show when that is higher
    (version 1 made before migrations; a version whose mark was lost)."""
    marked = [_version_of(m) for m in _applied(conn, postgres) if re.match(r"\d+-", m)]
    return max([*marked, _shape_version(conn, postgres)])


def current_version(db: str) -> int:
    """The version ``db`` is at: 0 for an empty (or missing) database, :data:`HEAD` when
    current, more than HEAD when a newer farebox wrote it."""
    if not is_postgres(db) and not os.path.exists(db):
        return 0
    with _connect(db) as conn:
        return _version(conn, is_postgres(db))


# -- applying -----------------------------------------------------------------------------------


def _yoyo_uri(db: str) -> str:
    if is_postgres(db):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return "sqlite:///" + quote(os.path.abspath(db))


@contextlib.contextmanager
def _postgres_lock(db: str) -> Iterator[None]:
    """One upgrade at a time on PostgreSQL: an advisory lock, let go if the process dies (taken
    before yoyo creates its own tables). Nothing on SQLite (yoyo's lock row: :func:`_sqlite_lock`)."""
    if not is_postgres(db):
        yield
        return
    with _connect(db) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_PG_LOCK,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_PG_LOCK,))


@contextlib.contextmanager
def _sqlite_lock(db: str, backend: Any) -> Iterator[None]:
    if is_postgres(db):
        yield
        return
    from yoyo.exceptions import LockTimeout

    try:
        with backend.lock(timeout=_SQLITE_LOCK_TIMEOUT_S):
            yield
    except LockTimeout as error:
        raise MigrationError(f"{shown(db)}: another process is migrating it ({error})") from None


def _migrations(db: str) -> Any:
    from yoyo import read_migrations

    engine = "postgresql" if is_postgres(db) else "sqlite"
    found = read_migrations(f"package:farebox.clearing:migrations/{engine}")
    ids = tuple(m.id for m in found)
    if ids != MIGRATIONS:  # a broken install: say so rather than apply a part
        raise MigrationError(f"the {engine} migrations shipped are {ids}, expected {MIGRATIONS}")
    return found


def upgrade(db: str) -> list[str]:
    """Apply the migrations ``db`` lacks, in order; the ids applied (none when it is current).
    A version-1 database made before migrations is marked as at version 1 first (its
    ``not_shown`` column added when it lacks it)."""
    try:
        from yoyo import get_backend
    except ImportError as error:
        raise MigrationError(f"migrating the clearing database needs {error.name}: "
                             "pip install 'farebox[clearing]'") from None
    if not is_postgres(db):
        with _connect(db):  # the path opens (a missing folder is said as such)
            pass
    migrations = _migrations(db)
    with _postgres_lock(db):
        try:
            backend = get_backend(_yoyo_uri(db))
        except Exception as error:
            raise MigrationError(f"cannot open {shown(db)}: {error}") from None
        with backend, _sqlite_lock(db, backend):
            return _upgrade(db, backend, migrations)


def _upgrade(db: str, backend: Any, migrations: Any) -> list[str]:
    """:func:`upgrade` under its lock."""
    postgres = is_postgres(db)
    conn = backend.connection
    version = _version(conn, postgres)
    if version > HEAD:
        raise MigrationError(f"the clearing database is at version {version}, newer than "
                             f"this farebox (version {HEAD})")
    shape = _shape_version(conn, postgres)
    unmarked = [m for m in migrations if _version_of(m.id) <= shape
                and not backend.is_applied(m)]
    if unmarked:
        if shape == 1 and "not_shown" not in _columns(conn, postgres, "records"):
            with backend.transaction():
                backend.execute("ALTER TABLE records ADD COLUMN not_shown BIGINT NOT NULL "
                                "DEFAULT 0")
        backend.mark_migrations(unmarked)
    pending = backend.to_apply(migrations)
    try:
        backend.apply_migrations(pending)
    except backend.DatabaseError as error:
        raise MigrationError(f"migrating {shown(db)} failed, nothing of that version was "
                             f"kept: {str(error).strip().splitlines()[0]}") from None
    return [m.id for m in pending]


def ensure_current(db: str) -> None:
    """Nothing when ``db`` is at head; an empty database is brought to head (silently);
    MigrationError for one at another version, naming the command that upgrades it."""
    version = current_version(db)
    if version == HEAD:
        return
    if version == 0:
        upgrade(db)
        return
    if version > HEAD:
        raise MigrationError(f"the clearing database is at version {version}, newer than this "
                             f"farebox (version {HEAD})")
    raise MigrationError(f"the clearing database is at version {version}; run farebox clearing "
                         f"migrate --db {shown(db)}")
