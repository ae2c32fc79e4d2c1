"""The journal's ``records`` table is written once (RECORD_COLUMNS): the table a journal gets, the
rows it stores and reads back, the hash chain and JournalRecord all follow that one list, and
the list is the journal format (a change to it is a change of format)."""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from datetime import datetime, timezone

from farebox.terminal.core.rules import Record, RecordType
from farebox.terminal.core.writecycle import WriteState
from farebox.protocol.settlement import HASHED_FIELDS, record_hash
from farebox.terminal.store.journal import (
    GENESIS_HASH, RECORD_COLUMNS, RECORD_FIELDS, Journal, JournalRecord,
    record_columns,
)

AT = datetime(2026, 3, 2, 8, 30, tzinfo=timezone.utc)

#: the journal format's records table (schema 3), as PRAGMA table_info reports it:
#: (name, type, not null, default, primary key)
FORMAT = [
    ("seq", "INTEGER", 0, None, 1),
    ("terminal_id", "TEXT", 1, None, 0),
    ("tap_id", "TEXT", 1, None, 0),
    ("card_number", "INTEGER", 1, None, 0),
    ("counter_before", "INTEGER", 1, None, 0),
    ("counter_after", "INTEGER", 1, None, 0),
    ("type", "TEXT", 1, None, 0),
    ("amount_cents", "INTEGER", 1, None, 0),
    ("balance_before_cents", "INTEGER", 1, None, 0),
    ("balance_after_cents", "INTEGER", 1, None, 0),
    ("at_utc", "TEXT", 1, None, 0),
    ("prev_hash", "TEXT", 1, None, 0),
    ("hash", "TEXT", 1, None, 0),
    ("clock_trusted", "INTEGER", 1, "1", 0),
]


def _journal_with_two_records(path) -> Journal:
    journal = Journal(path, terminal_id="T1")
    journal.record_intent(
        tap_id="tap-1", card_number=12345678, idm=bytes(8), kind="payment", counter_before=4,
        slot_before=bytes(16), counter_after=5, expected_slot=bytes(range(16)), log_block=7,
        log_data=bytes(16), balance_before_cents=10_000,
        records=(Record(RecordType.AUTO_ADD_VALUE, 25_000, 35_000),
                 Record(RecordType.PAYMENT, 580, 34_420)),
        outcome={"approved": True}, at=AT, clock_trusted=False)
    return journal


def test_the_table_a_journal_gets_is_the_format(tmp_path):
    Journal(tmp_path / "j.sqlite3").close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        info = db.execute("PRAGMA table_info(records)").fetchall()
        references = db.execute("PRAGMA foreign_key_list(records)").fetchall()
    assert [(name, kind, notnull, default, pk) for _, name, kind, notnull, default, pk in info] \
        == FORMAT
    assert [(row[2], row[3], row[4]) for row in references] == [
        ("card_writes", "tap_id", "tap_id")]
    assert [name for name, *_ in FORMAT] == list(RECORD_FIELDS)


def test_journal_record_has_the_columns_in_order_then_the_write_state():
    assert [f.name for f in fields(JournalRecord)] == [*RECORD_FIELDS, "write_state"]
    assert len(RECORD_COLUMNS) == len(set(RECORD_FIELDS))


def test_record_columns_qualifies_each_column():
    assert record_columns() == ", ".join(RECORD_FIELDS)
    assert record_columns("r.").split(", ") == [f"r.{name}" for name in RECORD_FIELDS]


def test_stored_rows_read_back_and_chain(tmp_path):
    journal = _journal_with_two_records(tmp_path / "j.sqlite3")
    try:
        first, second = journal.records()
        check = journal.verify_chain()
    finally:
        journal.close()
    assert check.ok and check.records == 2
    assert (first.seq, first.type, first.amount_cents, first.balance_before_cents,
            first.balance_after_cents) == (1, RecordType.AUTO_ADD_VALUE, 25_000, 10_000, 35_000)
    assert (second.seq, second.type, second.balance_before_cents, second.balance_after_cents) \
        == (2, RecordType.PAYMENT, 35_000, 34_420)
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.hash
    assert first.clock_trusted is False and first.write_state is WriteState.INTENT
    assert (first.terminal_id, first.tap_id, first.card_number, first.counter_before,
            first.counter_after, first.at_utc) == ("T1", "tap-1", 12345678, 4, 5,
                                                   "2026-03-02T08:30:00Z")
    for record in (first, second):
        assert record_hash(record.hashed_fields()) == record.hash


def test_each_column_lands_in_its_own_place(tmp_path):
    """The insert names its columns: the stored row read by name is the record."""
    _journal_with_two_records(tmp_path / "j.sqlite3").close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM records WHERE seq = 2").fetchone()
    assert dict(row) | {"hash": "-", "prev_hash": "-"} == {
        "seq": 2, "terminal_id": "T1", "tap_id": "tap-1", "card_number": 12345678,
        "counter_before": 4, "counter_after": 5, "type": "payment", "amount_cents": 580,
        "balance_before_cents": 35_000, "balance_after_cents": 34_420,
        "at_utc": "2026-03-02T08:30:00Z", "prev_hash": "-", "hash": "-", "clock_trusted": 0}


def test_a_changed_column_breaks_the_chain_at_its_record(tmp_path):
    _journal_with_two_records(tmp_path / "j.sqlite3").close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        db.execute("UPDATE records SET amount_cents = 1 WHERE seq = 2")
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        check = journal.verify_chain()
    finally:
        journal.close()
    assert (check.ok, check.bad_seq, check.problem) == (
        False, 2, "its contents do not match its hash")


def test_the_hash_covers_every_column_but_the_hash_and_the_clock_flag():
    """The journal's columns and the wire format's hashed fields are one list."""
    assert HASHED_FIELDS == tuple(name for name in RECORD_FIELDS
                                  if name not in ("hash", "clock_trusted"))
