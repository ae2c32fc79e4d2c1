"""Keeping the clearing database's records to a window of days (``clearing maintain``; the
receiver runs it once at start).

On PostgreSQL ``records`` is partitioned by the UTC day of each record's own time
(``records_YYYYMMDD``); a record whose day has no partition lands in ``records_default``, so
none is ever refused. :func:`maintain` makes the day partitions from ``retention_days`` before
today to ``ahead_days`` after it, moving any rows of such a day out of ``records_default`` into
its new partition first (in the same short transaction as the attach), and detaches and drops
the day partitions older than that (and deletes the default partition's rows that old). On
SQLite it deletes the records older than that. ``day_totals``, ``sources``, ``gaps``,
``batches``, ``forks``, ``actions`` are kept: the reports' figures do not change.

Idempotent, and safe while a receiver ingests: one maintenance at a time (a PostgreSQL advisory
lock), every change in its own short transaction, lock waits bounded (``lock_timeout``, retried).
"""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

from farebox.clearing.errors import ClearingError
from farebox.clearing.migrate import MigrationError, ensure_current, is_postgres, shown

#: the advisory lock one maintenance holds (two receivers starting at once take turns)
_PG_LOCK = 0x66617265626F7802  # "farebox" 2
_LOCK_TIMEOUT = "5s"  # how long one step waits for a lock a receiver holds, then tries again
_TRIES = 6
_SQLITE_CHUNK = 5000  # records deleted per transaction on SQLite
_PARTITION = re.compile(r"records_(\d{8})")


class MaintainError(ClearingError):
    """The maintenance could not be done (the database, or a lock held too long)."""


def partition_name(day: date) -> str:
    return f"records_{day:%Y%m%d}"


def _bound(day: date) -> str:
    return f"{day:%Y-%m-%d} 00:00:00+00"


def maintain(db: str, now: datetime, *, ahead_days: int = 7, retention_days: int = 90) -> dict:
    """Make the day partitions ``today - retention_days`` .. ``today + ahead_days`` (UTC days of
    ``now``), drop the records older than the first of them. Returns what it did:
    ``{"engine", "today", "kept_from", "created": [partitions], "moved": rows moved out of
    records_default, "dropped": [partitions], "deleted": rows deleted}``."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must carry a UTC offset")
    if ahead_days < 0 or retention_days < 0:
        raise ValueError("ahead_days and retention_days are days: 0 or more")
    ensure_current(db)
    today = now.astimezone(timezone.utc).date()
    kept_from = today - timedelta(days=retention_days)
    done: dict = {"engine": "postgresql" if is_postgres(db) else "sqlite",
                  "today": today.isoformat(), "kept_from": kept_from.isoformat(),
                  "created": [], "moved": 0, "dropped": [], "deleted": 0}
    try:
        if is_postgres(db):
            _maintain_postgres(db, today, kept_from, ahead_days, done)
        else:
            _maintain_sqlite(db, kept_from, done)
    except (MigrationError, MaintainError):
        raise
    except (sqlite3.Error, OSError) as error:
        raise MaintainError(f"maintaining {shown(db)} failed: {error}") from None
    except Exception as error:
        if type(error).__module__.startswith("psycopg"):
            raise MaintainError(f"maintaining {shown(db)} failed: "
                                f"{str(error).strip().splitlines()[0]}") from None
        raise
    return done


# -- PostgreSQL ---------------------------------------------------------------------------------


def _step(conn: Any, statements: list[tuple[str, tuple]]) -> list[int]:
    """``statements`` in one short transaction whose lock waits are bounded; retried when a
    lock was not had in time (a receiver's transaction holding it). Row counts."""
    import psycopg

    for attempt in range(_TRIES):
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                return [conn.execute(sql, params or None).rowcount for sql, params in statements]
        except psycopg.errors.LockNotAvailable:
            if attempt == _TRIES - 1:
                raise MaintainError(f"a lock on the records was held too long: "
                                    f"{statements[-1][0].split('(')[0].strip()}") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _partitions(conn: Any) -> dict[date, str]:
    """The attached day partitions of ``records``, by day."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'records'::regclass").fetchall()
    days = {}
    for (name,) in rows:
        match = _PARTITION.fullmatch(name)
        if match:
            days[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return days


def _maintain_postgres(db: str, today: date, kept_from: date, ahead_days: int,
                       done: dict) -> None:
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_PG_LOCK,))
        try:
            existing = _partitions(conn)
            for day in sorted(d for d in existing if d < kept_from):
                name = existing[day]
                _step(conn, [(f'ALTER TABLE records DETACH PARTITION "{name}"', ()),
                             (f'DROP TABLE "{name}"', ())])
                done["dropped"].append(name)
            done["deleted"] += _step(conn, [(
                "DELETE FROM records_default WHERE at_utc < %s", (_bound(kept_from),))])[0]
            # the card history of the records dropped, and the day the store keeps from (a
            # record sent again from before it is one stored once and dropped: a duplicate)
            _step(conn, [("DELETE FROM card_writes WHERE at_utc < %s", (_bound(kept_from),)),
                         ("INSERT INTO meta (name, value) VALUES ('retained_from', %s) "
                          "ON CONFLICT (name) DO UPDATE SET "
                          "value = greatest(meta.value, excluded.value)",
                          (kept_from.isoformat(),))])
            day = kept_from
            while day <= today + timedelta(days=ahead_days):
                if day not in existing:
                    name, start, end = partition_name(day), _bound(day), _bound(
                        day + timedelta(days=1))
                    # made apart, filled with the default partition's rows of its day, then
                    # attached, in one transaction: inserts into records_default wait for it,
                    # so no row of that day is left behind to fail the attach
                    counts = _step(conn, [
                        (f'CREATE TABLE "{name}" (LIKE records INCLUDING DEFAULTS)', ()),
                        ("LOCK TABLE records_default IN SHARE ROW EXCLUSIVE MODE", ()),
                        (f'WITH moved AS (DELETE FROM records_default WHERE at_utc >= %s AND '
                         f'at_utc < %s RETURNING *) INSERT INTO "{name}" SELECT * FROM moved',
                         (start, end)),
                        (f'ALTER TABLE records ATTACH PARTITION "{name}" FOR VALUES FROM '
                         f"('{start}') TO ('{end}')", ()),
                    ])
                    done["created"].append(name)
                    done["moved"] += max(counts[2], 0)
                day += timedelta(days=1)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_PG_LOCK,))


# -- SQLite -------------------------------------------------------------------------------------


def _maintain_sqlite(db: str, kept_from: date, done: dict) -> None:
    cutoff = f"{kept_from:%Y-%m-%d}T00:00:00Z"
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        old = [row[0] for row in conn.execute("SELECT rowid FROM records WHERE at_utc < ?",
                                              (cutoff,))]
        for first in range(0, len(old), _SQLITE_CHUNK):
            chunk = old[first:first + _SQLITE_CHUNK]
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = conn.execute(
                    f"DELETE FROM records WHERE at_utc < ? AND rowid IN "
                    f"({', '.join('?' * len(chunk))})", (cutoff, *chunk)).rowcount
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            done["deleted"] += deleted
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM card_writes WHERE at_utc < ?", (cutoff,))
            conn.execute("INSERT INTO meta (name, value) VALUES ('retained_from', ?) "
                         "ON CONFLICT (name) DO UPDATE SET value = max(meta.value, excluded.value)",
                         (kept_from.isoformat(),))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()
