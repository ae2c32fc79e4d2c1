"""A terminal state closed by an earlier version of this code still verifies and settles: the
settlement wire format did not change under it.

``tests/fixtures/settlement_v1`` is a terminal's state directory (a test key, used nowhere
else) made once with the code of commit 2ae4660 and these commands, then copied as it was:

    farebox terminal init --state st --id T-GOLD
    farebox card new card.json --issued 2026-01-15 --balance 10.00
    farebox card new card2.json --issued 2026-01-15 --balance 20.00 --number 12345678
    farebox tap card.json --fare 1.00 --at 2026-11-22T08:00:00+08:00 --state st
    farebox tap card.json --fare 1.00 --at 2026-11-22T08:00:20+08:00 --state st --torn-write 2
    farebox tap card.json --fare 1.00 --at 2026-11-22T08:10:00+08:00 --state st
    farebox tap card.json --fare 1.20 --at 2026-11-22T08:25:00+08:00 --state st --leave-after 5
    farebox tap card.json --fare 1.20 --at 2026-11-22T08:26:00+08:00 --state st --leave-after 6
    farebox tap card2.json --fare 2.30 --at 2026-11-22T09:00:00+08:00 --state st --torn-write 3
    farebox tap card2.json --fare 2.30 --at 2026-11-22T09:30:00+08:00 --state st
    farebox tap card.json --fare 1.00 --at 2026-11-22T07:00:00+08:00 --state st  # clock behind
    farebox add-value card.json --amount 50.00 --at 2026-11-22T10:10:00+08:00 --state st
    farebox batch close --state st --max-records 3

Three signed batches of three records each, none acknowledged: a void write, a record made on an
untrusted clock, two cards, an add value. The fixture itself is never opened for writing: each
test works on a copy.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from .test_clearing_http import start_receiver, trusting

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "settlement_v1"
TERMINAL_ID = "T-GOLD"
PUBLIC_KEY = "439038a7025a920b89ce7255bc7a0b349701600e1bd4bc590f235a6086c03353"
HASHES = [
    "db82bce5d184af9dd58c61d9228f25465cfebd22087bcabac0adc8b478ac2b79",
    "a22412b7fdbc8bdc22a80550ff00d6652aba685dc32ddccb8b7413d2a967b20d",
    "c1d230a72d1c23e9c64e9902b1d37423fc675922fde9995bf1d56e4caabcd068",
]


@pytest.fixture
def state(tmp_path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(FIXTURE, copy)
    os.chmod(copy / "identity.key", 0o600)  # git keeps no file modes but the executable bit
    return copy


def test_the_fixture_is_what_the_docstring_says(state):
    with sqlite3.connect(f"file:{FIXTURE / 'journal.sqlite3'}?immutable=1", uri=True) as db:
        rows = db.execute("SELECT number, items, hash, acked_utc FROM batches ORDER BY number"
                          ).fetchall()
    assert rows == [(n + 1, 3, digest, None) for n, digest in enumerate(HASHES)]


def test_batches_closed_before_verify_and_the_journal_chain_holds(farebox, state):
    verified = farebox("batch", "verify", "--state", state, "--json").json()
    assert verified == {"ok": True, "batches": 3, "bad_batch": None, "problem": None}
    assert farebox("journal", "verify", "--state", state, "--json").json()["ok"] is True
    listing = farebox("batch", "list", "--state", state, "--json").json()
    assert [b["hash"] for b in listing["batches"]] == HASHES
    assert listing["terminal_id"] == TERMINAL_ID and listing["ready"] == 0


def test_batches_closed_before_upload_to_a_receiver_and_are_acknowledged_once(farebox, state,
                                                                             tmp_path):
    db = tmp_path / "clearing.sqlite3"
    with start_receiver(db) as url:
        farebox("clearing", "enroll", "--db", db, "--terminal", TERMINAL_ID, "--pubkey",
                PUBLIC_KEY, "--json").json()
        house = trusting(farebox, db, url)  # the receiver's key: its acks are signed
        sent = farebox("upload", "--state", state, "--config", house, "--json").json()
        assert sent == {"acknowledged": [1, 2, 3], "pending": 0, "stopped_at": None,
                        "reason": None}
        # the acks lost: everything is sent again and acknowledged again, stored once
        with sqlite3.connect(state / "journal.sqlite3") as journal:
            journal.execute("UPDATE batches SET acked_utc = NULL")
        again = farebox("upload", "--state", state, "--config", house, "--json").json()
        assert again["acknowledged"] == [1, 2, 3] and again["pending"] == 0
    report = farebox("clearing", "report", "--db", db, "--json").json()
    assert report["totals"] == {
        "committed": {"add_value": {"count": 1, "amount": "50.00"},
                      "payment": {"count": 7, "amount": "10.00"}},
        "void": {"payment": {"count": 1, "amount": "1.00"}},
    }
    assert report["terminals"] == [{"terminal_id": TERMINAL_ID, "incarnation": "29dd3d7fae98bf84",
                                    "records": 9, "last_seq": 9, "gaps": []}]
    assert report["duplicates_ignored"] == 0 and report["open"] == []
    listing = farebox("batch", "list", "--state", state, "--json").json()
    assert all(b["acked"] for b in listing["batches"])
