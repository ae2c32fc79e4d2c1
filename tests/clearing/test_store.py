"""The clearing store's set-based ingest on SQLite and PostgreSQL: reconcile runs to a fixpoint
along a chain of writes across terminals in one batch, gaps and record counts are kept as batches
arrive, a number sent again with another hash is refused, day totals answer ``--day``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from farebox.clearing.report import build
from farebox.clearing.store import Conflict, Row, Store
from farebox.protocol.settlement import GENESIS_HASH

CONSOLE_SCRIPT = Path(sys.executable).parent / "farebox"
RECEIVED = "2026-11-23T00:00:00Z"
CARD = 12345678


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    db = (str(tmp_path / "clearing.sqlite3") if request.param == "sqlite"
          else request.getfixturevalue("pg_url"))
    with Store(db) as store:
        yield store


def row(seq, state, before, balance_before, at, card=CARD, amount=100, kind="payment",
        observed=0, digest=None):
    return Row(0, seq, state, 0, card, before, before + 1, kind, amount, balance_before,
               balance_before - amount, at, digest or f"{seq:064x}", observed, 0, 0)


class Sender:
    """One terminal's batches, chained."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        store.enroll(name, "00" * 32, RECEIVED)
        self.id = store.terminal(name)[0]
        self.number, self.hash = 0, GENESIS_HASH

    def send(self, *rows: Row):
        self.number += 1
        digest = f"{self.number:02x}{self.id:062x}"
        for r in rows:
            r.batch_number = self.number
        stored = self.store.ingest(self.id, "i", self.number, digest, self.hash, list(rows),
                                   RECEIVED)
        self.hash = digest
        return stored


def states(store: Store) -> list[tuple]:
    return sorted(store._all(  # noqa: SLF001 - the test reads the store's table
        "SELECT t.terminal_id, r.seq, r.state, r.reconciled FROM records r "
        "JOIN sources s ON s.id = r.source JOIN terminals t ON t.id = s.terminal"))


def test_a_chain_of_unresolved_writes_across_terminals_settles_in_one_batch(store):
    """Five terminals each left the card's next write unresolved (counters 1..5); the sixth
    commits from counter 6. Each write's next change proves it, back along the chain, in the
    one ingest of the sixth terminal's batch."""
    balance = 10_000
    for n in range(5):
        Sender(store, f"T-{n}").send(row(1, "unresolved", n + 1, balance - 100 * n,
                                         f"2026-11-22T0{n}:00:00Z"))
    assert states(store) == [(f"T-{n}", 1, "unresolved", 0) for n in range(5)]
    Sender(store, "T-5").send(row(1, "committed", 6, balance - 500, "2026-11-22T06:00:00Z"))
    assert states(store) == [(f"T-{n}", 1, "committed", 1) for n in range(5)] + [
        ("T-5", 1, "committed", 0)]
    assert build(store)["open"] == []
    assert store.totals() == [("committed", "payment", 6, 600)]


def test_a_chain_of_writes_in_doubt_settles_backwards_and_a_fork_is_kept(store):
    for n in range(3):
        Sender(store, f"T-{n}").send(row(1, "in_doubt", n + 1, 10_000 - 100 * n,
                                         f"2026-11-22T0{n}:00:00Z"))
    Sender(store, "T-3").send(row(1, "committed", 4, 9_700, "2026-11-22T04:00:00Z"))
    assert [(t, s, r) for t, _, s, r in states(store)] == [
        ("T-0", "committed", 2), ("T-0", "in_doubt", 0), ("T-1", "committed", 2),
        ("T-1", "in_doubt", 0), ("T-2", "committed", 2), ("T-2", "in_doubt", 0),
        ("T-3", "committed", 0)]
    # another change from counter 4: a counter spent twice, kept, and the card listed
    stored = Sender(store, "T-4").send(row(1, "committed", 4, 9_700, "2026-11-22T05:00:00Z"))
    assert stored.forks == (CARD,)
    assert store.counter_forks() == [(CARD, 4, 2)]
    assert store.actions()[1] == [(CARD, "cancelled", RECEIVED)]


def test_gaps_and_counts_are_kept_as_batches_arrive(store):
    t = Sender(store, "T-0")
    t.send(row(1, "committed", 1, 10_000, "2026-11-22T01:00:00Z"),
           row(2, "committed", 2, 9_900, "2026-11-22T01:01:00Z"),
           row(6, "committed", 6, 9_500, "2026-11-22T01:05:00Z"),
           row(9, "committed", 9, 9_200, "2026-11-22T01:08:00Z"))
    assert store.sources()[0][2:] == (4, 9, [[3, 5], [7, 8]])
    t.send(row(4, "committed", 4, 9_700, "2026-11-22T01:03:00Z"))
    assert store.sources()[0][2:] == (5, 9, [[3, 3], [5, 5], [7, 8]])
    stored = t.send(row(4, "committed", 4, 9_700, "2026-11-22T01:03:00Z"),  # sent again
                    row(3, "committed", 3, 9_800, "2026-11-22T01:02:00Z"),
                    row(5, "committed", 5, 9_600, "2026-11-22T01:04:00Z"),
                    row(7, "void", 7, 9_400, "2026-11-22T01:06:00Z"),
                    row(8, "committed", 8, 9_400, "2026-11-22T01:07:00Z"))
    assert stored.duplicates == 1
    assert store.sources()[0][2:] == (9, 9, [])
    assert build(store)["duplicates_ignored"] == 1


def test_a_number_sent_again_with_another_hash_is_refused_and_nothing_changes(store):
    t = Sender(store, "T-0")
    t.send(row(1, "in_doubt", 1, 10_000, "2026-11-22T01:00:00Z"))
    for forged in (row(1, "committed", 1, 10_000, "2026-11-22T01:00:00Z", digest="f" * 64),
                   row(1, "committed", 1, 10_000, "2026-11-22T09:00:00Z")):  # another time
        with pytest.raises(Conflict) as refused:
            t.send(forged)
        assert refused.value.kind == "record"
        t.number -= 1
    assert states(store) == [("T-0", 1, "in_doubt", 0)]
    assert store.sources()[0][2:] == (1, 1, [])


def test_day_totals_answer_a_day_or_a_range(store, tmp_path):
    t = Sender(store, "T-0")
    t.send(row(1, "committed", 1, 10_000, "2026-11-21T23:59:59Z", amount=100),
           row(2, "committed", 2, 9_900, "2026-11-22T00:00:00Z", amount=250),
           row(3, "committed", 3, 9_650, "2026-11-23T12:00:00.5Z", amount=400))
    assert store.totals("2026-11-22", "2026-11-22") == [("committed", "payment", 1, 250)]
    assert store.totals("2026-11-22") == [("committed", "payment", 2, 650)]
    assert store.totals(None, "2026-11-22") == [("committed", "payment", 2, 350)]
    assert store.totals() == [("committed", "payment", 3, 750)]

    def report(*options):
        done = subprocess.run([str(CONSOLE_SCRIPT), "clearing", "report", "--db", store.db,
                               *options, "--json"], capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout, done.stderr

    code, out, _ = report("--day", "2026-11-23")
    assert code == 0
    assert json.loads(out)["totals"] == {"committed": {"payment": {"count": 1,
                                                                   "amount": "4.00"}}}
    assert json.loads(out)["days"] == {"from": "2026-11-23", "to": "2026-11-23"}
    code, out, _ = report("--from", "2026-11-21", "--to", "2026-11-22")
    assert json.loads(out)["totals"]["committed"]["payment"] == {"count": 2, "amount": "3.50"}
    for bad in (["--day", "22/11/2026"], ["--day", "2026-11-22", "--to", "2026-11-23"],
                ["--from", "2026-11-23", "--to", "2026-11-22"]):
        code, out, err = report(*bad)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (bad, err)


def test_a_record_sent_again_from_before_the_kept_days_is_a_duplicate_not_a_conflict(store):
    """Retention dropped the record's day; its terminal sends it again (say, resolved): it was
    stored once and settled with its day, so it is counted a duplicate, not refused."""
    from datetime import datetime, timezone

    from farebox.clearing.maintain import maintain

    t = Sender(store, "T-0")
    t.send(row(1, "committed", 1, 10_000, "2026-06-01T08:00:00Z"),
           row(2, "in_doubt", 2, 9_900, "2026-06-01T09:00:00Z"),
           row(3, "committed", 3, 9_800, "2026-11-22T08:00:00Z"))
    done = maintain(store.db, datetime(2026, 11, 23, tzinfo=timezone.utc), retention_days=90)
    assert done["deleted"] + len(done["dropped"]) > 0
    assert [seq for _, seq, _, _ in states(store)] == [3]
    stored = t.send(row(2, "committed", 2, 9_900, "2026-06-01T09:00:00Z"),
                    row(4, "committed", 4, 9_700, "2026-11-22T09:00:00Z"))
    assert stored.duplicates == 1
    assert [seq for _, seq, _, _ in states(store)] == [3, 4]
    assert store.sources()[0][2:] == (4, 4, [])
    assert store.totals("2026-11-22") == [("committed", "payment", 2, 200)]


def test_an_action_list_change_and_what_runs_with_it_commit_together_or_not_at_all(store):
    """The console's audit row is written inside the change's transaction: if it cannot be
    written, the list does not change (no unaudited change)."""
    def audited(db, serial):
        db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (f"audit {serial}", "x"))

    def broken(db, serial):
        raise RuntimeError("the audit could not be written")

    assert store.set_action(CARD, "lost", RECEIVED, RECEIVED, audited) == 1
    assert store.meta("audit 1") == "x"
    for change in (lambda: store.set_action(87654321, "lost", RECEIVED, RECEIVED, broken),
                   lambda: store.remove_action(CARD, broken)):
        with pytest.raises(RuntimeError):
            change()
        assert store.actions() == (1, [(CARD, "lost", RECEIVED)])
    assert store.remove_action(CARD, audited) == 2 and store.meta("audit 2") == "x"
    assert store.actions() == (2, [])
