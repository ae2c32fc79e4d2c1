"""``farebox.clearing.maintain`` and ``farebox clearing maintain``: day partitions made ahead and
rolled over as the day moves, a record of a day without a partition kept (in records_default)
and moved into its day's partition when that is made, partitions past retention dropped with
their day totals kept; on SQLite the records past retention deleted. Plain SQL reads the
results (the store's own reading is the lead's)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from farebox.clearing import migrate
from farebox.clearing.maintain import maintain, partition_name
from farebox.clearing.migrate import MigrationError

CONSOLE_SCRIPT = Path(sys.executable).parent / "farebox"
NOW = datetime(2026, 11, 22, 10, 30, tzinfo=timezone.utc)


class Db:
    def __init__(self, db: str) -> None:
        self.db = db
        self.postgres = migrate.is_postgres(db)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.postgres:
            import psycopg

            with psycopg.connect(self.db, autocommit=True) as conn:
                cursor = conn.execute(sql.replace("?", "%s"), params or None)
                return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, params).fetchall()

    def partitions(self) -> list[str]:
        return [r[0] for r in self.query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'records'::regclass ORDER BY 1")]

    def tables(self) -> set[str]:
        return {r[0] for r in self.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

    def record(self, seq: int, at: str, amount: int = 100, state: str = "committed") -> None:
        """One record of source 1 (and its day's totals, as ingest keeps them)."""
        self.query("INSERT INTO records (source, seq, state, batch_number, card_number, "
                   "counter_before, counter_after, type, amount_cents, balance_before_cents, "
                   "balance_after_cents, at_utc, hash, observed, reconciled, not_shown) VALUES "
                   "(1, ?, ?, 1, 12345678, ?, ?, 'payment', ?, 1000, 900, ?, ?, 0, 0, 0)",
                   (seq, state, seq, seq + 1, amount, at, f"{seq:064x}"))
        self.query("INSERT INTO day_totals (day, source, state, type, count, amount_cents) "
                   "VALUES (?, 1, ?, 'payment', 1, ?) ON CONFLICT (day, source, state, type) DO "
                   "UPDATE SET count = day_totals.count + 1, amount_cents = "
                   "day_totals.amount_cents + excluded.amount_cents",
                   (at[:10], state, amount))

    def where(self, seq: int) -> str:
        """The partition holding source 1's record ``seq``, found by its key."""
        rows = self.query("SELECT tableoid::regclass::text FROM records WHERE source = 1 AND "
                          "seq = ? AND state = 'committed'", (seq,))
        assert len(rows) == 1, rows
        return rows[0][0]

    def totals(self) -> list[tuple]:
        return [(str(d), s, c, a) for d, s, c, a in self.query(
            "SELECT day, state, count, amount_cents FROM day_totals ORDER BY 1, 2")]


def at_head(db: str) -> Db:
    migrate.ensure_current(db)
    made = Db(db)
    made.query("INSERT INTO terminals (id, terminal_id, public_key, enrolled_utc) VALUES "
               "(1, 'T-1', ?, '2026-11-01T00:00:00Z')", ("ab" * 32,))
    made.query("INSERT INTO sources (id, terminal, incarnation, last_hash) VALUES (1, 1, 'i1', ?)",
               ("0" * 64,))
    return made


@pytest.fixture
def pg(pg_url):
    return at_head(pg_url)


@pytest.fixture
def lite(tmp_path):
    return at_head(str(tmp_path / "clearing.sqlite3"))


def days(first: str, count: int) -> list[str]:
    start = datetime.strptime(first, "%Y-%m-%d").date()
    return [partition_name(start + timedelta(days=n)) for n in range(count)]


# -- PostgreSQL: partitions ---------------------------------------------------------------------


def test_partitions_are_made_from_retention_to_ahead_and_again_is_nothing(pg):
    done = maintain(pg.db, NOW, ahead_days=2, retention_days=3)
    assert done["created"] == days("2026-11-19", 6)  # 19 .. 22 + 2
    assert (done["engine"], done["today"], done["kept_from"]) == ("postgresql", "2026-11-22",
                                                                  "2026-11-19")
    assert pg.partitions() == [*days("2026-11-19", 6), "records_default"]
    again = maintain(pg.db, NOW, ahead_days=2, retention_days=3)
    assert (again["created"], again["dropped"], again["moved"], again["deleted"]) == (
        [], [], 0, 0)
    assert pg.partitions() == [*days("2026-11-19", 6), "records_default"]


def test_a_record_of_a_day_without_a_partition_is_kept_and_moved_into_it(pg):
    """A record whose time is past every partition goes to records_default (never refused);
    when the day comes within reach maintain makes its partition and moves it there: found by
    its key, its totals unchanged."""
    maintain(pg.db, NOW, ahead_days=1, retention_days=1)
    pg.record(1, "2026-11-22T09:00:00Z")
    pg.record(2, "2026-11-26T23:59:59.999999Z")  # four days ahead
    pg.record(3, "2026-11-27T00:00:00Z")
    assert [pg.where(n) for n in (1, 2, 3)] == ["records_20261122", "records_default",
                                                "records_default"]
    before = pg.totals()
    done = maintain(pg.db, NOW + timedelta(days=3), ahead_days=1, retention_days=1)
    assert done["created"] == days("2026-11-24", 3)  # 24 .. 26
    assert done["dropped"] == days("2026-11-21", 3)  # 21 .. 23: past retention
    assert done["moved"] == 1
    assert [pg.where(n) for n in (2, 3)] == ["records_20261126", "records_default"]
    assert pg.totals() == before
    # the day after: the next partition takes the other one; the old days go
    done = maintain(pg.db, NOW + timedelta(days=4), ahead_days=1, retention_days=1)
    assert done["created"] == ["records_20261127"] and done["moved"] == 1
    assert done["dropped"] == ["records_20261124"] and pg.where(3) == "records_20261127"
    assert pg.query("SELECT count(*) FROM records_default") == [(0,)]


def test_retention_drops_old_partitions_and_keeps_their_day_totals(pg):
    maintain(pg.db, NOW, ahead_days=0, retention_days=5)
    for seq, day in enumerate(["17", "18", "19", "20", "21", "22"], start=1):
        pg.record(seq, f"2026-11-{day}T12:00:00Z", amount=100 * seq)
    pg.record(10, "2026-10-01T00:00:00Z", amount=7)  # older than every partition: default
    assert pg.where(10) == "records_default"
    totals = pg.totals()
    done = maintain(pg.db, NOW + timedelta(days=3), ahead_days=0, retention_days=4)
    assert done["dropped"] == days("2026-11-17", 4)  # 17 .. 20; 21 on are kept
    assert done["created"] == days("2026-11-23", 3)
    assert done["deleted"] == 1  # the default partition's record of 1 October
    assert not set(done["dropped"]) & pg.tables()  # detached and dropped, not left behind
    assert [r[0] for r in pg.query("SELECT seq FROM records ORDER BY seq")] == [5, 6]
    assert pg.totals() == totals  # every day's figures kept
    assert pg.partitions() == [*days("2026-11-21", 5), "records_default"]


def test_two_maintenances_at_once_take_turns(pg):
    """Two receivers starting together: both succeed, every partition made once."""
    results, errors = [], []

    def run():
        try:
            results.append(maintain(pg.db, NOW, ahead_days=3, retention_days=10))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert sorted(len(r["created"]) for r in results) == [0, 14]
    assert pg.partitions() == [*days("2026-11-12", 14), "records_default"]


def test_maintain_waits_for_a_receivers_open_transaction_then_goes_on(pg):
    """A receiver's transaction that wrote into records_default holds it; maintain waits for
    it (bounded, retried) instead of failing or losing that row."""
    import psycopg

    maintain(pg.db, NOW, ahead_days=0, retention_days=0)
    with psycopg.connect(pg.db) as receiver:
        receiver.execute(
            "INSERT INTO records (source, seq, state, batch_number, card_number, "
            "counter_before, counter_after, type, amount_cents, balance_before_cents, "
            "balance_after_cents, at_utc, hash) VALUES (1, 1, 'committed', 1, 1, 1, 2, "
            "'payment', 1, 2, 1, '2026-11-23T05:00:00Z', 'h')")
        done: list = []
        worker = threading.Thread(target=lambda: done.append(
            maintain(pg.db, NOW, ahead_days=1, retention_days=0)))
        worker.start()
        worker.join(timeout=1)  # it waits on the receiver's lock (no timed assertion on how long)
        receiver.commit()
    worker.join(timeout=120)
    assert done and done[0]["created"] == ["records_20261123"] and done[0]["moved"] == 1
    assert pg.where(1) == "records_20261123"


# -- SQLite: retention --------------------------------------------------------------------------


def test_sqlite_deletes_records_past_retention_and_keeps_day_totals(lite):
    for seq, at in enumerate(["2026-11-18T23:59:59.999999Z", "2026-11-19T00:00:00Z",
                              "2026-11-22T10:00:00Z", "2027-01-01T00:00:00Z"], start=1):
        lite.record(seq, at, amount=10 * seq)
    totals = lite.totals()
    done = maintain(lite.db, NOW, retention_days=3)
    assert done == {"engine": "sqlite", "today": "2026-11-22", "kept_from": "2026-11-19",
                    "created": [], "moved": 0, "dropped": [], "deleted": 1}
    assert [r[0] for r in lite.query("SELECT seq FROM records ORDER BY seq")] == [2, 3, 4]
    assert lite.totals() == totals
    assert maintain(lite.db, NOW, retention_days=3)["deleted"] == 0


def test_sqlite_deletes_in_chunks(lite, monkeypatch):
    from farebox.clearing import maintain as module

    monkeypatch.setattr(module, "_SQLITE_CHUNK", 3)
    for seq in range(1, 11):
        lite.record(seq, f"2026-01-{seq:02d}T00:00:00Z")
    lite.record(11, "2026-11-22T00:00:00Z")
    assert maintain(lite.db, NOW, retention_days=90)["deleted"] == 10
    assert lite.query("SELECT seq FROM records") == [(11,)]


# -- both ---------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "clearing.sqlite3")
    return request.getfixturevalue("pg_url")


def test_an_empty_database_is_brought_to_head_first(any_db):
    maintain(any_db, NOW)
    assert migrate.current_version(any_db) == migrate.HEAD


def test_a_database_behind_head_is_refused(any_db):
    import sqlparse

    v1 = (Path(migrate.__file__).parent / "migrations" / "sqlite" / "0001-schema-v1.sql")
    for statement in filter(str.strip, sqlparse.split(v1.read_text())):
        Db(any_db).query(statement)  # version 1's tables, as its code made them
    with pytest.raises(MigrationError, match="at version 1; run farebox clearing migrate"):
        maintain(any_db, NOW)


def test_now_must_carry_an_offset(any_db):
    with pytest.raises(ValueError):
        maintain(any_db, datetime(2026, 11, 22))


def farebox(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True, text=True,
                          timeout=120)


def test_clearing_maintain_command(any_db):
    done = farebox("clearing", "maintain", "--db", any_db, "--retention-days", "2",
                   "--ahead-days", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    today = datetime.now(timezone.utc).date()
    assert result["today"] == today.isoformat()
    if migrate.is_postgres(any_db):
        assert result["created"] == days((today - timedelta(days=2)).isoformat(), 4)
    else:
        assert result["created"] == [] and result["deleted"] == 0
    human = farebox("clearing", "maintain", "--db", any_db, "--retention-days", "2",
                    "--ahead-days", "1")
    assert human.returncode == 0 and "partitions made 0" in human.stdout
    bad = farebox("clearing", "maintain", "--db", any_db, "--retention-days", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_clearing_maintain_on_a_version_1_database_is_one_line_exit_2(tmp_path):
    import shutil

    db = tmp_path / "v1.sqlite3"
    shutil.copy(Path(__file__).parents[1] / "fixtures" / "clearing_v1" / "clearing.sqlite3", db)
    done = farebox("clearing", "maintain", "--db", str(db))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1
    assert f"the clearing database is at version 1; run farebox clearing migrate --db {db}" \
        in done.stderr
