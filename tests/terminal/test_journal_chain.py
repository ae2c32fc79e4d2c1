"""The write states and the cards' memory are chained (issue 17 item 5): every state change of a
card write and every move of a card's memory appends a ``marks`` entry holding what the row
became; ``card_writes`` and ``cards`` must agree with it. ``Journal.verify`` rehashes
everything; ``verify_since_checkpoint`` (the daemon's start) checks the chains from the last
checkpoint and every row against the chain in one scan; a damaged file is ``JournalBroken``."""

from __future__ import annotations

import random
import shutil
import sqlite3
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from farebox.protocol.errors import TransportError
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.card.tap import TapInterrupted, Terminal
from farebox.terminal.core.rules import Record, RecordType, Tariff
from farebox.terminal.core.writecycle import WriteState
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import (
    MARK_FIELDS, SCHEMA_VERSION, WRITE_BODY_COLUMNS, Journal, JournalBroken, _fingerprint_sql,
    mark_hash, write_body_digest, write_fingerprint,
)
from farebox.terminal.store.settlement import Settlement

KEYS = published_test_keys()
HK = timezone(timedelta(hours=8))
AT = datetime(2026, 11, 22, 8, 0, tzinfo=HK)
FIXTURE_V3 = Path(__file__).resolve().parents[1] / "fixtures" / "journal_v3"


def new_card(balance_cents=10_000, number=12345678) -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=number,
                                      balance_cents=balance_cents), KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


def pay(terminal, card, fare=580, at=AT):
    return terminal.pay(LiteSSession(InProcessTransport(card)), Tariff.flat(fare), at)


def present_again(card):
    card.faults = Faults()
    card.in_field = True


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "journal.sqlite3"


@pytest.fixture
def journal(path):
    with Journal(path) as journal:
        yield journal


@pytest.fixture
def terminal(journal):
    return Terminal(journal, KEYS)


def entries(path) -> list[dict]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(row) for row in db.execute("SELECT * FROM marks ORDER BY seq")]
    db.close()
    return rows


def edit(path, *statements) -> None:
    """What an attacker or an unlucky operator does with the sqlite3 shell."""
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def checks(path) -> tuple:
    """(start-up check, full check), neither moving the checkpoint."""
    with Journal(path) as journal:
        return journal.verify_since_checkpoint(save=False), journal.verify(save=False)


def three_taps(path) -> tuple[SimulatedLiteS, list]:
    """Three approved payments on one card, the checkpoint at the end (a daemon start)."""
    card = new_card()
    with Journal(path) as journal:
        terminal = Terminal(journal, KEYS)
        results = [pay(terminal, card, at=AT + timedelta(minutes=i)) for i in range(3)]
        terminal.idle()
        assert journal.ensure_whole()
    return card, results


# ---- what is chained ------------------------------------------------------------------------

def test_a_tap_chains_its_intent_and_its_commit_with_the_card_move(terminal, journal, path):
    card = new_card()
    result = pay(terminal, card)
    terminal.idle()
    write = journal.write(result.tap_id)
    intent, commit = entries(path)
    assert (intent["tap_id"], intent["state"], intent["log_confirmed"]) == (
        result.tap_id, "intent", 0)
    assert intent["body"] == write_body_digest([
        write.tap_id, write.card_number, write.idm.hex(), write.kind, write.counter_before,
        write.counter_after, write.expected_slot.hex(), write.created_utc,
        sqlite3.connect(path).execute("SELECT outcome FROM card_writes").fetchone()[0],
        write.log_block, write.log_data.hex()])
    assert (intent["record_seq"], intent["record_hash"]) == (1, journal.records()[0].hash)
    assert intent["card_number"] == 12345678 and intent["counter"] == 1  # first sight of it
    assert (commit["tap_id"], commit["state"], commit["log_confirmed"], commit["body"]) == (
        result.tap_id, "committed", 1, None)
    assert (commit["card_number"], commit["counter"], commit["slot"]) == (
        12345678, write.counter_after, write.expected_slot.hex())
    assert (commit["writes"], commit["writes_sum"], commit["cards"], commit["cards_sum"]) == (
        1, 2, 1, 2)
    assert (commit["writes_fp"], commit["writes_fp2"]) == write_fingerprint(2, "committed", 1, 0)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT mark_seq FROM card_writes").fetchall() == [(2,)]
        assert db.execute("SELECT mark_seq FROM cards").fetchall() == [(2,)]
    previous = "0" * 64
    for entry in (intent, commit):
        assert entry["hash"] == mark_hash(previous, [entry[name] for name in MARK_FIELDS])
        previous = entry["hash"]


def test_each_state_change_and_log_confirmation_is_one_entry(journal, path):
    write = journal.record_intent(
        tap_id="t1", card_number=42, idm=bytes(8), kind="payment", counter_before=3,
        slot_before=bytes(16), counter_after=4, expected_slot=bytes(range(16)), log_block=7,
        log_data=bytes(16), balance_before_cents=1000,
        records=[Record(RecordType.PAYMENT, 100, 900)], outcome={}, at=AT)
    void = journal.resolve_write(write, WriteState.VOID, AT)
    late = journal.resolve_write(void, WriteState.COMMITTED, AT, observed=True)
    journal.confirm_log(late)
    journal.sync()
    journal.confirm_log(late)  # already confirmed: nothing changes, nothing is chained
    journal.sync()
    journal.observe(42, 3, bytes(16))  # lower: the memory does not move
    journal.observe(43, 9, bytes(16))  # another card: moves
    journal.reset_clock(AT, "checked")
    states = [(e["tap_id"], e["state"], e["log_confirmed"], e["observed"], e["card_number"],
               e["counter"]) for e in entries(path)]
    assert states[:4] == [("t1", "intent", 0, 0, 42, 3), ("t1", "void", 0, 0, None, None),
                          ("t1", "committed", 0, 1, 42, 4), ("t1", "committed", 1, 1, None, None)]
    assert states[4] == (None, None, None, None, 43, 9)
    assert states[5][1:4] == ("committed", 1, 0) and states[5][0].startswith("clock-reset-")
    assert len(states) == 6
    assert journal.verify() and journal.verify_since_checkpoint()


def test_python_and_sql_fingerprints_agree_and_a_row_edited_alone_changes_them():
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE card_writes (mark_seq INTEGER, state TEXT, log_confirmed INTEGER, "
               "observed INTEGER)")
    rows = [(seq, state, confirmed, observed) for seq in (1, 2, 77, 2**31 - 1, 2**31, 2**40)
            for state in ("intent", "committed", "void", "unresolved")
            for confirmed in (0, 1) for observed in (0, 1)]
    db.executemany("INSERT INTO card_writes VALUES (?, ?, ?, ?)", rows)
    x = _fingerprint_sql("w.mark_seq", "w.state", "w.log_confirmed", "w.observed")
    sql = db.execute(f"SELECT {x}, ({x}) * ({x}) % 2147483647 FROM card_writes w").fetchall()
    assert sql == [write_fingerprint(*row) for row in rows]
    for seq in (1, 2, 77, 2**40):  # one entry named: every other state or flag another x
        xs = [write_fingerprint(*row)[0] for row in rows if row[0] == seq]
        assert len(set(xs)) == len(xs) == 16
    # two rows' states swapped keep the sum of x, not the sum of the squares
    a, b = write_fingerprint(10, "committed", 1, 0), write_fingerprint(20, "void", 1, 0)
    a2, b2 = write_fingerprint(10, "void", 1, 0), write_fingerprint(20, "committed", 1, 0)
    assert a[0] + b[0] == a2[0] + b2[0] and a[1] + b[1] != a2[1] + b2[1]


# ---- edits are found ------------------------------------------------------------------------

EDITS = {
    # the issue's two: an approved payment settled as void, a restored card image approved
    "state to void": ("UPDATE card_writes SET state = 'void' WHERE rowid = 1",
                      "card_writes", "state is 'void' but its chain entry 2 says 'committed'"),
    "counter to 1": ("UPDATE cards SET highest_counter = 1",
                     "cards", "highest_counter is 1 but its chain entry 6 says 4"),
    "slot changed": ("UPDATE cards SET highest_slot = CASE WHEN highest_slot LIKE 'f%' "
                     "THEN 'e' ELSE 'f' END || substr(highest_slot, 2)",
                     "cards", "highest_slot is"),
    "card forgotten": ("DELETE FROM cards", "cards", "0 rows, but the marks chain holds 1"),
    "log unconfirmed": ("UPDATE card_writes SET log_confirmed = 0 WHERE rowid = 2",
                        "card_writes", "log_confirmed is 0 but its chain entry 4 says 1"),
    "write made up": ("INSERT INTO card_writes (tap_id, card_number, idm, counter_before, "
                      "counter_after, expected_slot, state, created_utc) "
                      "VALUES ('x', 1, '', 0, 1, '', 'void', '2026-01-01T00:00:00Z')",
                      "card_writes", "names no chain entry"),
    "row names another's entry": ("UPDATE card_writes SET mark_seq = 2, state = 'committed' "
                                  "WHERE rowid = 3", "card_writes", "which is another's"),
    "newest record dropped": ("DELETE FROM records WHERE seq = 3", "records",
                              "record 3 was verified before and is gone"),
}


@pytest.mark.parametrize("name", EDITS)
def test_an_edit_outside_the_journal_is_found_at_start_and_by_verify(path, name):
    three_taps(path)
    statement, table, problem = EDITS[name]
    edit(path, statement)
    for check in checks(path):
        assert not check and check.table == table and problem in check.problem, check


def test_a_state_edited_on_an_old_row_is_found_at_start_among_many(path):
    """The start-up check reads no history but one scan: an old row edited is still found."""
    card = new_card(balance_cents=200_000)
    with Journal(path) as journal:
        terminal = Terminal(journal, KEYS)
        first = pay(terminal, card)
        for i in range(1, 60):
            pay(terminal, card, fare=100, at=AT + timedelta(minutes=i))
        terminal.idle()
        journal.ensure_whole()
    edit(path, f"UPDATE card_writes SET state = 'void' WHERE tap_id = '{first.tap_id}'")
    with Journal(path) as journal:
        with pytest.raises(JournalBroken, match=f"card_writes row {first.tap_id}: state is "
                                                "'void' but its chain entry 2 says 'committed'"):
            journal.ensure_whole()


def test_what_only_the_full_verify_finds(path):
    """An old chain entry or record rewritten (the start-up check trusts what it verified
    before): journal verify rehashes them."""
    three_taps(path)
    for statement, table in (("UPDATE marks SET state = 'void' WHERE seq = 2", "marks"),
                             ("UPDATE records SET amount_cents = 1 WHERE seq = 1", "records"),
                             ("UPDATE card_writes SET outcome = '{}' WHERE rowid = 1",
                              "card_writes")):
        copy = path.with_name("copy.sqlite3")
        shutil.copy(path, copy)
        edit(copy, statement)
        start, full = checks(copy)
        assert start.ok and not full.ok and full.table == table, (statement, full)
        copy.unlink()


def test_an_entry_rewritten_or_cut_below_the_checkpoint_is_found_at_start(path):
    three_taps(path)
    edit(path, "UPDATE marks SET hash = CASE WHEN hash LIKE 'f%' THEN 'e' ELSE 'f' END "
               "|| substr(hash, 2) WHERE seq = 6")
    start, _ = checks(path)
    assert not start and (start.table, start.row) == ("marks", "6")
    assert start.problem == "it changed since it was verified"


def test_the_checkpoint_moves_only_over_a_whole_chain(path):
    card, _ = three_taps(path)
    with Journal(path) as journal:
        point = journal._checkpoint()
        assert point == ((3, journal.records()[-1].hash),
                         (6, entries(path)[-1]["hash"]))
        pay(Terminal(journal, KEYS), card, at=AT + timedelta(hours=1))
        journal.sync()
        edit(path, "UPDATE marks SET state = 'void' WHERE seq = 8")  # after the checkpoint
        assert not journal.verify_since_checkpoint()
        with pytest.raises(JournalBroken, match="marks row 8"):
            journal.advance_checkpoint()
        assert journal._checkpoint() == point


def test_settlement_refuses_a_write_whose_state_was_edited(path, tmp_path):
    three_taps(path)
    with Journal(path) as journal:
        identity = init_identity(tmp_path, journal.terminal_id, AT)
    edit(path, "UPDATE card_writes SET state = 'void' WHERE rowid = 2")
    with Journal(path) as journal:
        settlement = Settlement(journal, identity)
        with pytest.raises(JournalBroken, match="nothing was settled"):
            settlement.close_batch(AT + timedelta(hours=1))
        assert settlement.batches() == []


def test_random_days_keep_the_chain_whole(path):
    """Taps, cut taps and their re-taps, add values on several cards: whatever the order, the
    chain holds every row and the start-up and full checks agree it is whole."""
    rng = random.Random(1705)
    cards = [new_card(balance_cents=50_000, number=10_000_000 + n) for n in range(4)]
    with Journal(path) as journal:
        terminal = Terminal(journal, KEYS)
        for i in range(80):
            card = rng.choice(cards)
            at = AT + timedelta(minutes=i)
            if rng.random() < 0.25:
                card.faults = Faults(leave_after_commands=rng.randrange(3, 7))
            try:
                if rng.random() < 0.2:
                    terminal.add_value(LiteSSession(InProcessTransport(card)), 1000, at)
                else:
                    pay(terminal, card, fare=rng.randrange(100, 900), at=at)
            except (TapInterrupted, TransportError):
                pass
            present_again(card)
            if rng.random() < 0.3:
                terminal.idle()
                assert journal.verify_since_checkpoint(), i
        terminal.idle()
        full = journal.verify()
        assert full and full.marks == len(entries(path))
        states = {w.state for w in journal.writes()}
        assert WriteState.VOID in states and WriteState.COMMITTED in states


# ---- a journal of schema 3 --------------------------------------------------------------------

@pytest.fixture
def v3(tmp_path) -> Path:
    """tests/fixtures/journal_v3: a terminal's state made by the code before the chain (schema
    3): T-V3, card.json paid three times (one torn: void), card2.json paid and topped up, a
    batch closed, a clock reset, then a tap on card.json cut off (left in doubt):

        farebox terminal init --state st --id T-V3
        farebox card new card.json --issued 2026-01-15 --balance 20.00
        farebox card new card2.json --issued 2026-01-15 --balance 30.00 --number 12345678
        farebox tap card.json --fare 1.00 --at 2026-11-22T08:00:00+08:00 --state st
        farebox tap card.json --fare 1.00 --at 2026-11-22T08:05:00+08:00 --state st --torn-write 2
        farebox tap card.json --fare 1.00 --at 2026-11-22T08:10:00+08:00 --state st
        farebox tap card2.json --fare 2.30 --at 2026-11-22T09:00:00+08:00 --state st
        farebox add-value card2.json --amount 50.00 --at 2026-11-22T09:10:00+08:00 --state st
        farebox batch close --state st
        farebox terminal clock reset --at 2026-11-22T10:00:00+08:00 --reason "checked against
            NTP" --state st
        farebox tap card.json --fare 1.00 --at 2026-11-22T10:20:00+08:00 --state st
            --leave-after 4

    ``card.json`` is that card as the cut tap left it."""
    copy = tmp_path / "v3"
    shutil.copytree(FIXTURE_V3, copy)
    return copy


def test_the_fixture_is_schema_3(v3):
    with sqlite3.connect(f"file:{FIXTURE_V3 / 'journal.sqlite3'}?immutable=1", uri=True) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
            == ("3",)
        assert db.execute("SELECT state, count(*) FROM card_writes GROUP BY state "
                          "ORDER BY state").fetchall() == [("committed", 5), ("intent", 1),
                                                           ("void", 1)]


def test_a_schema_3_journal_is_seeded_from_its_tables(v3):
    path = v3 / "journal.sqlite3"
    with sqlite3.connect(path) as db:
        before_writes = db.execute(
            f"SELECT {', '.join(WRITE_BODY_COLUMNS)}, state, resolved_utc, log_confirmed, "
            "observed FROM card_writes ORDER BY rowid").fetchall()
        before_cards = db.execute("SELECT card_number, highest_counter, highest_slot FROM cards "
                                  "ORDER BY card_number").fetchall()
        records = db.execute("SELECT seq, hash FROM records ORDER BY seq").fetchall()
    with Journal(path) as journal:
        assert journal.connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),)
        start = journal.verify_since_checkpoint()  # the first start: the records rehashed
        full = journal.verify()
    assert start and full and (full.records, full.marks) == (7, 7 + 2 + 1)
    seeded = entries(path)
    assert [(e["tap_id"], e["state"], e["resolved_utc"], e["log_confirmed"], e["observed"])
            for e in seeded[:7]] == [row[0:1] + row[11:] for row in before_writes]
    assert [e["body"] for e in seeded[:7]] == [write_body_digest(row[:11])
                                               for row in before_writes]
    assert [(e["card_number"], e["counter"], e["slot"]) for e in seeded[7:9]] == before_cards
    assert (seeded[9]["record_seq"], seeded[9]["record_hash"]) == records[-1]
    with Journal(path) as journal:  # opened again: nothing seeded twice
        assert len(entries(path)) == 10 and journal.verify_since_checkpoint()


def test_a_seeded_journal_goes_on_and_catches_edits(v3):
    """The tap left in doubt before the upgrade is completed by the re-tap after it; a batch
    closes; an edit to a seeded row is found."""
    path = v3 / "journal.sqlite3"
    from farebox.protocol.sim.cardfile import load_card

    card = load_card(v3 / "card.json")
    with Journal(path) as journal:
        terminal = Terminal(journal, KEYS)
        result = pay(terminal, card, fare=100, at=datetime(2026, 11, 22, 10, 30, tzinfo=HK))
        terminal.idle()
        assert result.approved
        assert not [w for w in journal.writes() if w.state is WriteState.INTENT]
        assert journal.verify() and journal.ensure_whole()
    edit(path, "UPDATE card_writes SET state = 'void' WHERE rowid = 1")
    start, full = checks(path)
    assert not start and not full and start.table == full.table == "card_writes"


# ---- a damaged file ---------------------------------------------------------------------------

@pytest.mark.parametrize("statement, method", [
    ("UPDATE card_writes SET expected_slot = 'zz'", "writes"),
    ("UPDATE card_writes SET outcome = '{not json'", "writes"),
    ("UPDATE card_writes SET created_utc = 'yesterday'", "writes"),
    ("UPDATE card_writes SET counter_after = 'many'", "writes"),
    ("UPDATE card_writes SET state = CAST(x'ff41' AS TEXT)", "writes"),
    ("UPDATE records SET amount_cents = x'00'", "records"),
    ("UPDATE records SET type = 'p!yment'", "records"),
    ("UPDATE cards SET highest_slot = 'not hex'", "card_memory"),
])
def test_a_row_that_does_not_parse_is_journal_broken(path, statement, method):
    three_taps(path)
    edit(path, "PRAGMA ignore_check_constraints = ON", statement)
    with Journal(path) as journal:
        call = {"writes": journal.writes, "records": journal.records,
                "card_memory": lambda: journal.card_memory(12345678)}[method]
        with pytest.raises(JournalBroken, match="damaged"):
            call()
        assert not journal.verify(save=False)


def test_a_file_sqlite_finds_malformed_is_journal_broken(path):
    three_taps(path)
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * 2 + 8:page * 3] = bytes(len(data[page * 2 + 8:page * 3]))  # a page wiped
    data[0:16] = b"not a database!\x00"
    path.write_bytes(data)
    with pytest.raises(JournalBroken, match="the journal is damaged"):
        Journal(path)
