"""Schema migrations (``farebox.clearing.migrate``, ``farebox clearing migrate``) on SQLite and on
a private PostgreSQL: a database written by the version-1 receiver upgrades to version 2 with
every figure the clearing report gives the same; an empty database is brought to head; a
database behind head is refused in one line; migrating twice changes nothing.

The version-1 database is ``tests/fixtures/clearing_v1/clearing.sqlite3`` (made by the receiver
of that version through its real ingest: see ``make_v1.py`` there). On PostgreSQL the same rows
are written into version 1's tables (made by the shipped ``0001`` SQL, as that code made them,
with no migration bookkeeping). Every figure is read with plain SQL, not through the store.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from farebox.clearing import migrate
from farebox.clearing.migrate import HEAD, MIGRATIONS, MigrationError

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "clearing_v1" / "clearing.sqlite3"
MIGRATIONS_DIR = ROOT / "clearing" / "migrations"
CONSOLE_SCRIPT = Path(sys.executable).parent / "farebox"
V1_TABLES = ("terminals", "batches", "records", "actions", "meta")


# -- the two engines ----------------------------------------------------------------------------


def _utc(value):
    """A time as version 1 wrote it (ISO 8601, ``Z``), from either engine."""
    if isinstance(value, datetime):
        from farebox.protocol.settlement import utc_iso

        return utc_iso(value)
    return value


def _day(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


def _v1_statements(without_not_shown: bool = False) -> list[str]:
    import sqlparse

    text = (MIGRATIONS_DIR / "sqlite" / "0001-schema-v1.sql").read_text()
    if without_not_shown:  # the schema before that column was added at open
        text = text.replace("    not_shown BIGINT NOT NULL DEFAULT 0,\n", "")
        assert "not_shown" not in text.split("--")[-1]
    return [s for s in sqlparse.split(text) if s.strip()]


def _fixture_rows() -> dict[str, tuple[list[str], list[tuple]]]:
    with sqlite3.connect(f"file:{FIXTURE}?immutable=1", uri=True) as v1:
        rows = {}
        for table in V1_TABLES:
            cursor = v1.execute(f"SELECT * FROM {table}")
            rows[table] = ([d[0] for d in cursor.description], cursor.fetchall())
    return rows


class Engine:
    """One database and plain SQL on it."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.postgres = migrate.is_postgres(db)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.postgres:
            import psycopg

            with psycopg.connect(self.db, autocommit=True) as conn:
                return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), params or None)
                        .fetchall()]
        with sqlite3.connect(self.db, uri=self.db.startswith("file:")) as conn:
            return conn.execute(sql, params).fetchall()

    def script(self, statements: list[str], rows: list[tuple[str, list[str], list[tuple]]] = ()
               ) -> None:
        """``statements``, then ``rows`` inserted, in one transaction."""
        if self.postgres:
            import psycopg

            with psycopg.connect(self.db) as conn:
                for statement in statements:
                    conn.execute(statement)
                for table, columns, values in rows:
                    with conn.cursor() as cursor:
                        cursor.executemany(
                            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                            f"({', '.join(['%s'] * len(columns))})", values)
            return
        conn = sqlite3.connect(self.db, isolation_level=None)
        try:
            conn.execute("BEGIN")
            for statement in statements:
                conn.execute(statement)
            for table, columns, values in rows:
                conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                 f"({', '.join('?' * len(columns))})", values)
            conn.execute("COMMIT")
        finally:
            conn.close()

    def tables(self) -> set[str]:
        if self.postgres:
            return {r[0] for r in self.query(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        return {r[0] for r in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def columns(self, table: str) -> list[tuple[str, str]]:
        if self.postgres:
            return self.query("SELECT column_name, data_type FROM information_schema.columns "
                              "WHERE table_name = ? AND table_schema = current_schema() "
                              "ORDER BY ordinal_position", (table,))
        return [(r[1], r[2]) for r in self.query(f"PRAGMA table_info({table})")]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        return Engine(str(tmp_path / "clearing.sqlite3"))
    return Engine(request.getfixturevalue("pg_url"))


def write_v1(engine: Engine, *, without_not_shown: bool = False) -> None:
    """The version-1 database: the fixture file itself (a copy) on SQLite; on PostgreSQL its
    rows in version 1's tables. No migration bookkeeping, as version 1's code left it."""
    if not engine.postgres and not without_not_shown:
        shutil.copy(FIXTURE, engine.db)
        return
    rows = _fixture_rows()
    if without_not_shown:
        columns, values = rows["records"]
        at = columns.index("not_shown")
        assert {row[at] for row in values} == {0, 1}  # the fixture has both
        rows["records"] = ([c for c in columns if c != "not_shown"],
                           [row[:at] + row[at + 1:] for row in values])
    engine.script(_v1_statements(without_not_shown),
                  [(table, *rows[table]) for table in V1_TABLES])


# -- the figures, read with plain SQL -----------------------------------------------------------


def _gaps(sequences: list[int]) -> list[tuple[int, int]]:
    missing, expected = [], 1
    for seq in sorted(sequences):
        if seq > expected:
            missing.append((expected, seq - 1))
        expected = seq + 1
    return missing


def figures_v1(engine: Engine) -> dict:
    """What version 1's report and action list showed (its own queries)."""
    q = engine.query
    terminals = {}
    for terminal_id, incarnation, count, last in q(
            "SELECT terminal_id, incarnation, count(DISTINCT seq), max(seq) FROM records "
            "GROUP BY terminal_id, incarnation"):
        seqs = [r[0] for r in q("SELECT DISTINCT seq FROM records WHERE terminal_id = ? AND "
                                "incarnation = ?", (terminal_id, incarnation))]
        terminals[(terminal_id, incarnation)] = (count, last, _gaps(seqs))
    for terminal_id, incarnation, number, digest, duplicates in q(
            "SELECT terminal_id, incarnation, max(number), "
            "(SELECT hash FROM batches c WHERE c.terminal_id = b.terminal_id AND "
            "c.incarnation = b.incarnation ORDER BY number DESC LIMIT 1), sum(duplicates) "
            "FROM batches b GROUP BY terminal_id, incarnation"):
        terminals[(terminal_id, incarnation)] += (number, digest, int(duplicates))
    return {
        "terminals": terminals,
        "totals": {(s, t): (c, int(a)) for s, t, c, a in q(
            "SELECT state, type, count(*), sum(amount_cents) FROM records GROUP BY state, type")},
        "day_totals": {(_day(d), s, t): (c, int(a)) for d, s, t, c, a in q(
            "SELECT substr(at_utc, 1, 10), state, type, count(*), sum(amount_cents) "
            "FROM records GROUP BY 1, state, type")} if not engine.postgres else None,
        "duplicates": int(q("SELECT sum(duplicates) FROM batches")[0][0]),
        "forks": q("SELECT card_number, counter_before, "
                   "count(DISTINCT terminal_id || ':' || incarnation || ':' || at_utc) "
                   "FROM records WHERE (state = 'committed' OR (state = 'in_doubt' AND "
                   "not_shown = 0)) AND type != 'clock_reset' GROUP BY card_number, "
                   "counter_before HAVING count(DISTINCT terminal_id || ':' || incarnation || "
                   "':' || at_utc) > 1 ORDER BY 1, 2"),
        "open": q("SELECT u.terminal_id, u.incarnation, u.seq, u.state FROM records u WHERE "
                  "(u.state = 'unresolved' AND NOT EXISTS (SELECT 1 FROM records c WHERE "
                  "c.terminal_id = u.terminal_id AND c.incarnation = u.incarnation AND "
                  "c.seq = u.seq AND c.state = 'committed')) OR (u.state = 'in_doubt' AND "
                  "NOT EXISTS (SELECT 1 FROM records c WHERE c.terminal_id = u.terminal_id AND "
                  "c.incarnation = u.incarnation AND c.seq = u.seq AND "
                  "c.state != 'in_doubt')) ORDER BY 1, 2, 3"),
        "records": sorted((r[:12] + (_utc(r[12]),) + r[13:]) for r in q(
            "SELECT terminal_id, incarnation, seq, state, batch_number, card_number, "
            "counter_before, counter_after, type, amount_cents, balance_before_cents, "
            "balance_after_cents, at_utc, hash, observed, reconciled, not_shown FROM records")),
        "batches": sorted(r[:7] + (_utc(r[7]),) for r in q(
            "SELECT terminal_id, incarnation, number, hash, prev_hash, items, duplicates, "
            "received_utc FROM batches")),
        "enrolled": sorted(r[:2] + (_utc(r[2]),) for r in q(
            "SELECT terminal_id, public_key, enrolled_utc FROM terminals")),
        "actions": [(c, r, _utc(a), _utc(b)) for c, r, a, b in q(
            "SELECT card_number, reason, at_utc, added_utc FROM actions ORDER BY card_number")],
        "meta": dict(q("SELECT name, value FROM meta")),
    }


_SOURCE = "(SELECT t.terminal_id FROM sources s JOIN terminals t ON t.id = s.terminal " \
          "WHERE s.id = {0}.source), (SELECT s.incarnation FROM sources s WHERE s.id = {0}.source)"


def figures_v2(engine: Engine) -> dict:
    """The same figures from version 2's tables (kept summaries where it keeps them)."""
    q = engine.query
    terminals = {}
    for source, terminal_id, incarnation, records, last_seq, last_batch, last_hash, dup in q(
            "SELECT s.id, t.terminal_id, s.incarnation, s.records, s.last_seq, s.last_batch, "
            "s.last_hash, s.duplicates FROM sources s JOIN terminals t ON t.id = s.terminal"):
        gaps = q("SELECT first_seq, last_seq FROM gaps WHERE source = ? ORDER BY first_seq",
                 (source,))
        terminals[(terminal_id, incarnation)] = (records, last_seq, gaps, last_batch, last_hash,
                                                 dup)
    totals: dict = {}
    days: dict = {}
    for day, state, kind, count, amount in q(
            "SELECT day, state, type, count, amount_cents FROM day_totals"):
        total = totals.setdefault((state, kind), [0, 0])
        total[0] += count
        total[1] += amount
        total = days.setdefault((_day(day), state, kind), [0, 0])
        total[0] += count
        total[1] += amount
    return {
        "terminals": terminals,
        "totals": {k: tuple(v) for k, v in totals.items()},
        "day_totals": {k: tuple(v) for k, v in days.items()},
        "duplicates": int(q("SELECT sum(duplicates) FROM sources")[0][0]),
        "forks": q("SELECT card_number, counter, writes FROM forks ORDER BY 1, 2"),
        "open": q(f"SELECT {_SOURCE.format('u')}, u.seq, u.state FROM records u WHERE "
                  "(u.state = 'unresolved' AND NOT EXISTS (SELECT 1 FROM records c WHERE "
                  "c.source = u.source AND c.seq = u.seq AND c.state = 'committed')) OR "
                  "(u.state = 'in_doubt' AND NOT EXISTS (SELECT 1 FROM records c WHERE "
                  "c.source = u.source AND c.seq = u.seq AND c.state != 'in_doubt')) "
                  "ORDER BY 1, 2, 3"),
        "records": sorted((r[:12] + (_utc(r[12]),) + r[13:]) for r in q(
            f"SELECT {_SOURCE.format('r')}, seq, state, batch_number, card_number, "
            "counter_before, counter_after, type, amount_cents, balance_before_cents, "
            "balance_after_cents, at_utc, hash, observed, reconciled, not_shown FROM records r")),
        "batches": sorted(r[:7] + (_utc(r[7]),) for r in q(
            f"SELECT {_SOURCE.format('b')}, number, hash, prev_hash, items, duplicates, "
            "received_utc FROM batches b")),
        "enrolled": sorted(r[:2] + (_utc(r[2]),) for r in q(
            "SELECT terminal_id, public_key, enrolled_utc FROM terminals")),
        "actions": [(c, r, _utc(a), _utc(b)) for c, r, a, b in q(
            "SELECT card_number, reason, at_utc, added_utc FROM actions ORDER BY card_number")],
        "meta": dict(q("SELECT name, value FROM meta")),
    }


def assert_same_figures(before: dict, after: dict) -> None:
    for name in before:
        if before[name] is not None:
            assert after[name] == before[name], name


# -- the upgrade --------------------------------------------------------------------------------


def test_the_fixture_holds_what_its_maker_says():
    """The version-1 database has what the upgrade must carry: several terminals, an
    incarnation more, gaps, duplicates, in-doubt and derived rows, a same-change record, a
    counter fork listed, an action added by hand, the receiver's key; records over 4 UTC days."""
    v1 = figures_v1(Engine(f"file:{FIXTURE}?immutable=1"))
    assert {t for t, _ in v1["terminals"]} == {"T-GOLD", "T-A", "T-B", "T-C"}
    assert len(v1["terminals"]) == 5
    assert v1["terminals"][("T-C", "c1")][:3] == (5, 9, [(3, 4), (7, 8)])
    assert v1["duplicates"] == 1
    states = {(r[3], r[15]) for r in v1["records"]}
    assert {("in_doubt", 0), ("same_change", 0), ("committed", 1), ("committed", 2),
            ("void", 0)} <= states
    assert v1["forks"] == [(44444444, 7, 2)]
    assert [(c, r) for c, r, _, _ in v1["actions"]] == [(44444444, "cancelled"),
                                                        (88888888, "lost")]
    assert set(v1["meta"]) == {"list_signing_key", "action_list_serial"}
    assert {d for d, _, _ in v1["day_totals"]} == {"2026-11-20", "2026-11-21", "2026-11-22",
                                                   "2026-11-23"}


def test_a_version_1_database_upgrades_with_every_figure_kept(engine):
    write_v1(engine)
    before = figures_v1(engine)
    assert migrate.current_version(engine.db) == 1
    with pytest.raises(MigrationError) as refused:
        migrate.ensure_current(engine.db)
    assert str(refused.value) == (f"the clearing database is at version 1; run farebox clearing "
                                  f"migrate --db {engine.db}")
    assert figures_v1(engine) == before  # refusing changed nothing

    assert migrate.upgrade(engine.db) == list(MIGRATIONS[1:])
    assert migrate.current_version(engine.db) == HEAD == 6
    migrate.ensure_current(engine.db)
    after = figures_v2(engine)
    assert_same_figures(before, after)
    # the kept totals also add up from the records themselves, and the v1 tables are gone
    assert {k: v for k, v in after["totals"].items()} == {
        (s, t): (c, int(a)) for s, t, c, a in engine.query(
            "SELECT state, type, count(*), sum(amount_cents) FROM records GROUP BY 1, 2")}
    assert not {"terminals_v1", "batches_v1", "records_v1"} & engine.tables()
    # the card history the store's checks probe: one row per record that changed a card
    assert sorted(engine.query("SELECT source, seq FROM card_writes")) == sorted(engine.query(
        "SELECT DISTINCT source, seq FROM records WHERE type != 'clock_reset' "
        "AND reconciled != 2"))
    # and the store reads it: its report says what the figures say
    from farebox.clearing.report import build
    from farebox.clearing.store import Store

    with Store(engine.db) as store:
        report = build(store)
    assert {(s, k): (v["count"], v["amount"]) for s, kinds in report["totals"].items()
            for k, v in kinds.items()} == {
        (s, k): (c, f"{a / 100:.2f}") for (s, k), (c, a) in after["totals"].items() if c}

    assert migrate.upgrade(engine.db) == []  # twice: nothing to do, nothing changed
    assert figures_v2(engine) == after


def test_a_version_1_database_without_not_shown_is_at_version_1(engine):
    """Written before version 1's code added ``not_shown`` at open: recognised as version 1,
    upgraded with the column as that code would have added it (0)."""
    write_v1(engine, without_not_shown=True)
    assert "not_shown" not in {c for c, _ in engine.columns("records")}
    assert migrate.current_version(engine.db) == 1
    assert migrate.upgrade(engine.db) == list(MIGRATIONS[1:])
    after = figures_v2(engine)
    assert {r[16] for r in after["records"]} == {0}
    assert len(after["records"]) == len(_fixture_rows()["records"][1])
    assert after["forks"] == [(44444444, 7, 2)]


def test_the_partitions_hold_the_version_1_days(pg_url):
    engine = Engine(pg_url)
    write_v1(engine)
    migrate.upgrade(pg_url)
    partitions = engine.query(
        "SELECT c.relname, count(r.*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "LEFT JOIN records r ON r.tableoid = c.oid WHERE i.inhparent = 'records'::regclass "
        "GROUP BY c.relname ORDER BY 1")
    assert partitions == [("records_20261120", 4), ("records_20261121", 9),
                          ("records_20261122", 13), ("records_20261123", 2),
                          ("records_default", 0)]
    # a record just before midnight UTC and one just after are in their own days
    assert engine.query("SELECT tableoid::regclass::text FROM records WHERE at_utc = "
                        "'2026-11-23T00:00:00.25Z'") == [("records_20261123",)]


def test_a_failed_migration_leaves_version_1_as_it_was(engine):
    """A batch from a terminal that is not enrolled (which version 1 never stored) stops the
    upgrade: nothing of version 2 is kept, version 1's rows are all there."""
    write_v1(engine)
    engine.script(["DELETE FROM terminals WHERE terminal_id = 'T-B'"])
    before = figures_v1(engine)
    with pytest.raises(MigrationError, match="failed, nothing of that version was kept"):
        migrate.upgrade(engine.db)
    assert migrate.current_version(engine.db) == 1
    assert figures_v1(engine) == before
    assert "sources" not in engine.tables()


# -- fresh, current, behind, ahead ---------------------------------------------------------------


SPEC_COLUMNS = {
    "terminals": ["id", "terminal_id", "public_key", "enrolled_utc"],
    "sources": ["id", "terminal", "incarnation", "last_batch", "last_hash", "records",
                "last_seq", "duplicates"],
    "gaps": ["source", "first_seq", "last_seq"],
    "batches": ["source", "number", "hash", "prev_hash", "items", "duplicates", "received_utc"],
    "records": ["source", "seq", "state", "batch_number", "card_number", "counter_before",
                "counter_after", "type", "amount_cents", "balance_before_cents",
                "balance_after_cents", "at_utc", "hash", "observed", "reconciled", "not_shown"],
    "day_totals": ["day", "source", "state", "type", "count", "amount_cents"],
    "forks": ["card_number", "counter", "writes", "found_utc"],
    # outstanding_cents and suspension: version 5 (an AAVS suspension's amount and number)
    "actions": ["card_number", "reason", "at_utc", "added_utc", "outstanding_cents",
                "suspension"],
    "card_writes": ["card_number", "counter_before", "source", "seq", "at_utc"],
    "meta": ["name", "value"],
    # version 3, the back office (docs/clearing.md "Back office")
    "providers": ["id", "name", "added_utc"],
    "terminal_providers": ["terminal", "provider"],
    "lost_cards": ["card_number", "kind", "reported_utc", "blocked_utc", "refunded_utc",
                   "value_cents", "deposit_cents", "fee_cents", "negative_offset_cents",
                   "refund_cents", "owed_cents", "last_counter"],
    "aavs_links": ["card_number", "institution", "account", "linked_utc"],
    "aavs_debits": ["reference", "day", "institution", "account", "card_number", "kind",
                    "amount_cents", "at_utc", "dishonoured_utc"],
    "aavs_outstanding": ["card_number", "outstanding_cents", "dishonours", "last_utc",
                         "cancelled_utc", "value_applied_cents", "deposit_forfeited_cents",
                         "suspensions", "paid_cents"],  # version 5
}


def test_an_empty_database_is_brought_to_head_silently(engine):
    assert migrate.current_version(engine.db) == 0
    migrate.ensure_current(engine.db)
    assert migrate.current_version(engine.db) == HEAD
    for table, columns in SPEC_COLUMNS.items():
        assert [c for c, _ in engine.columns(table)] == columns, table
    if engine.postgres:
        types = dict(engine.columns("records"))
        assert types["at_utc"] == "timestamp with time zone"
        assert types["observed"] == "smallint" and types["card_number"] == "bigint"
        assert dict(engine.columns("day_totals"))["day"] == "date"
        assert engine.query("SELECT partstrat FROM pg_partitioned_table WHERE partrelid = "
                            "'records'::regclass") == [("r",)]
        assert "records_default" in engine.tables()
        indexes = {r[0] for r in engine.query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'records'")}
    else:
        assert dict(engine.columns("records"))["at_utc"] == "TEXT"
        indexes = {r[0] for r in engine.query(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records'")}
    assert "records_open" in indexes and "records_card" not in indexes  # card_writes instead
    migrate.ensure_current(engine.db)  # at head: nothing
    assert migrate.upgrade(engine.db) == []


def test_a_fresh_and_a_migrated_database_have_one_schema(engine, tmp_path):
    write_v1(engine)
    migrate.upgrade(engine.db)
    if engine.postgres:
        import psycopg

        base = engine.db.rsplit("/", 1)[0]
        with psycopg.connect(base + "/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE fresh_twin")
        fresh = Engine(base + "/fresh_twin")
    else:
        fresh = Engine(str(tmp_path / "fresh.sqlite3"))
    try:
        migrate.ensure_current(fresh.db)
        assert {t for t in fresh.tables() if not t.startswith("records_")} == {
            t for t in engine.tables() if not t.startswith("records_")}
        for table in SPEC_COLUMNS:
            assert fresh.columns(table) == engine.columns(table), table
    finally:
        if engine.postgres:
            with psycopg.connect(base + "/postgres", autocommit=True) as conn:
                conn.execute("DROP DATABASE fresh_twin WITH (FORCE)")


def test_bookkeeping_lost_after_a_migration_committed_is_recovered(engine):
    """The migration's changes committed but its mark did not (a crash between the two):
    the tables show version 2, so it is marked, not applied again."""
    migrate.ensure_current(engine.db)
    engine.script(["DELETE FROM _yoyo_migration WHERE migration_id = '0002-schema-v2'"])
    assert migrate.current_version(engine.db) == HEAD
    assert migrate.upgrade(engine.db) == []
    assert [r[0] for r in engine.query("SELECT migration_id FROM _yoyo_migration ORDER BY 1")
            ] == list(MIGRATIONS)


def test_a_database_from_a_newer_farebox_is_refused(engine):
    migrate.ensure_current(engine.db)
    engine.script(["INSERT INTO _yoyo_migration (migration_hash, migration_id, applied_at_utc) "
                   "VALUES ('x', '0099-schema-v99', '2027-01-01 00:00:00')"])
    assert migrate.current_version(engine.db) == 99
    for call in (migrate.ensure_current, migrate.upgrade):
        with pytest.raises(MigrationError, match="at version 99, newer than this farebox"):
            call(engine.db)


def test_a_database_that_cannot_be_opened_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir" / "clearing.sqlite3")
    assert migrate.current_version(missing) == 0
    with pytest.raises(MigrationError, match="cannot open"):
        migrate.upgrade(missing)


def test_a_password_is_not_shown():
    assert migrate.shown("postgresql://u:s3cret@h:5/db") == "postgresql://u:***@h:5/db"
    assert migrate.shown("postgresql://u@h/db") == "postgresql://u@h/db"


# -- the command --------------------------------------------------------------------------------


def farebox(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True, text=True,
                          timeout=120)


def test_clearing_migrate_prints_what_it_applied_and_nothing_to_do_is_exit_0(engine):
    import json

    write_v1(engine)
    done = farebox("clearing", "migrate", "--db", engine.db, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"applied": list(MIGRATIONS[1:]), "version": HEAD}
    again = farebox("clearing", "migrate", "--db", engine.db)
    assert (again.returncode, again.stdout, again.stderr) == (
        0, f"nothing to do: at version {HEAD}\n", "")


def test_two_migrations_at_once_apply_each_version_once(engine):
    """Two processes upgrading one empty database at the same time (two receivers starting):
    one applies, the other finds nothing to do; both succeed."""
    import json

    runs = [subprocess.Popen([str(CONSOLE_SCRIPT), "clearing", "migrate", "--db", engine.db,
                              "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    applied = sorted(json.loads(out)["applied"] for out, _ in results)
    assert applied == [[], list(MIGRATIONS)]
    assert migrate.current_version(engine.db) == HEAD


def test_a_bad_database_is_one_line_exit_2(tmp_path):
    done = farebox("clearing", "migrate", "--db", str(tmp_path / "no" / "x.sqlite3"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "cannot open" in done.stderr


def test_version_5_numbers_the_suspensions_dishonours_made_before_it(engine):
    """A card a version-4 house suspended for a dishonoured debit becomes suspension 1 with
    what it owes (a service terminal can collect it); a hand-made suspension of a card owing
    nothing, and a cancelled card's entry, stay as they were."""
    from yoyo import get_backend

    migrations = migrate._migrations(engine.db)  # noqa: SLF001 - stop at version 4
    with get_backend(migrate._yoyo_uri(engine.db)) as backend:  # noqa: SLF001
        backend.apply_migrations(backend.to_apply(migrations)[:4])
    assert migrate.current_version(engine.db) == 4
    at = "2026-11-23T01:00:00Z" if not engine.postgres else "2026-11-23 01:00:00+00"
    engine.script([], [
        ("actions", ["card_number", "reason", "at_utc", "added_utc"],
         [(11111111, "aavs_suspended", at, at), (22222222, "aavs_suspended", at, at),
          (33333333, "cancelled", at, at)]),
        ("aavs_outstanding", ["card_number", "outstanding_cents", "dishonours", "last_utc",
                              "cancelled_utc"],
         [(11111111, 25_000, 1, at, None), (33333333, 2_000, 2, at, at)])])
    migrate.upgrade(engine.db)
    assert migrate.current_version(engine.db) == HEAD
    assert engine.query("SELECT card_number, reason, outstanding_cents, suspension FROM actions "
                        "ORDER BY card_number") == [
        (11111111, "aavs_suspended", 25_000, 1), (22222222, "aavs_suspended", None, None),
        (33333333, "cancelled", None, None)]
    assert engine.query("SELECT card_number, suspensions, paid_cents FROM aavs_outstanding "
                        "ORDER BY card_number") == [(11111111, 1, 0), (33333333, 0, 0)]
