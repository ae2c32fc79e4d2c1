"""Defects found by attacking the core, each fixed: the clock moved back, hostile card contents,
a lost commit mark, two processes on one first journal."""

from __future__ import annotations

import multiprocessing
import sqlite3
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.cardimage.layout import PURSE_SLOT_BLOCKS
from farebox.cardimage.model import COUNTER_MAX, Purse
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.present import read_card
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Reason, RecordType, Tariff
from farebox.terminal.card.tap import RequestRefused, TapInterrupted, Terminal
from farebox.terminal.core.writecycle import WriteState

KEYS = published_test_keys()
HK = timezone(timedelta(hours=8))
AT = datetime(2026, 11, 22, 8, 0, tzinfo=HK)


def new_card(balance_cents=10_000, issued=date(2026, 1, 15), **fields) -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=issued, number=12345678, balance_cents=balance_cents,
                                      **fields), KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


def session(card):
    return LiteSSession(InProcessTransport(card))


def pay(terminal, card, fare=580, at=AT):
    return terminal.pay(session(card), Tariff.flat(fare), at)


def purse(card):
    return read_card(session(card), KEYS).purse


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.sqlite3") as journal:
        yield journal


@pytest.fixture
def terminal(journal):
    return Terminal(journal, KEYS)


# ---- the clock is not trusted blindly ---------------------------------------------------------

def test_moving_the_clock_back_does_not_reload_aavs_twice_in_a_day(terminal, journal):
    card = new_card(balance_cents=300, aavs_reload_cents=15_000)
    first = pay(terminal, card, fare=400, at=AT)
    assert first.aavs_reload_cents == 15_000
    # spend it down to where another reload would trigger, on the same day
    pay(terminal, card, fare=14_000, at=AT + timedelta(hours=1))
    assert purse(card).balance_cents == 300 + 15_000 - 400 - 14_000
    # the clock is set back to yesterday: "not reloaded today" would be true on that date
    back = pay(terminal, card, fare=1_000, at=AT - timedelta(days=1))
    assert back.aavs_reload_cents is None and not back.clock_trusted
    assert not back.approved or purse(card).last_auto_reload == AT.date()
    flagged = [r for r in journal.records() if not r.clock_trusted]
    assert all(r.tap_id == back.tap_id for r in flagged)
    assert journal.verify_chain()


def test_an_untrusted_payment_is_flagged_and_takes_the_high_water_dates_rules(terminal, journal):
    card = new_card()
    pay(terminal, card, at=AT)
    result = pay(terminal, card, at=AT - timedelta(days=30))
    assert result.approved and not result.clock_trusted
    [record] = [r for r in journal.records() if r.tap_id == result.tap_id]
    assert not record.clock_trusted and record.type is RecordType.PAYMENT
    assert purse(card).last_payment == AT.date()  # never moved back to the untrusted date


def test_moving_the_clock_back_does_not_revive_an_inactive_card(terminal):
    card = new_card(issued=date(2020, 1, 1))  # last add value 2020-01-01: inactive since 2022
    assert pay(terminal, card, at=AT).reason is Reason.INACTIVE
    revived = pay(terminal, card, at=datetime(2021, 1, 1, 8, 0, tzinfo=HK))
    assert revived.reason is Reason.INACTIVE and not revived.clock_trusted


def test_a_card_newer_than_the_clock_makes_the_time_untrusted(tmp_path):
    """A fresh terminal has no high-water mark; the card's own latest date still bounds time."""
    card = new_card(balance_cents=300, aavs_reload_cents=15_000)
    with Journal(tmp_path / "a.sqlite3") as journal:
        assert pay(Terminal(journal, KEYS), card, fare=400, at=AT).aavs_reload_cents == 15_000
    with Journal(tmp_path / "b.sqlite3") as journal:
        result = pay(Terminal(journal, KEYS), card, fare=14_800, at=AT - timedelta(days=2))
        assert not result.clock_trusted and result.aavs_reload_cents is None


def test_an_add_value_before_the_card_was_issued_is_refused(terminal):
    card = new_card()
    before = list(card.blocks)
    with pytest.raises(RequestRefused, match="before the card was issued"):
        terminal.add_value(session(card), 10_000, datetime(1990, 1, 2, tzinfo=HK))
    assert card.blocks == before


def test_an_untrusted_add_value_does_not_touch_the_inactivity_clock(terminal):
    card = new_card(last_add_value=date(2026, 6, 1))
    pay(terminal, card, at=AT)
    result = terminal.add_value(session(card), 5_000, datetime(2026, 3, 1, 9, 0, tzinfo=HK))
    assert result.approved and not result.clock_trusted
    assert purse(card).last_add_value == date(2026, 6, 1)


def test_a_trusted_time_moves_the_high_water_mark_and_only_forward(terminal, journal):
    card = new_card()
    pay(terminal, card, at=AT)
    assert journal.time_high_water() == AT
    pay(terminal, card, at=AT - timedelta(hours=1))
    assert journal.time_high_water() == AT
    pay(terminal, card, at=AT + timedelta(microseconds=1))
    assert journal.time_high_water() == AT + timedelta(microseconds=1)


# ---- hostile card contents (valid MACs, values the rules never write) --------------------------

def forge(card: SimulatedLiteS, **changes) -> None:
    """Write a purse with valid MACs but impossible values (as a leaked key or a bug would)."""
    image = read_card(session(card), KEYS)
    forged = replace(image.purse, **changes)
    key = KEYS.card_key(image.identity.key_version, card.idm)
    for number, data in _encode_unchecked(forged, image, key).items():
        card.blocks[number] = data


def _encode_unchecked(forged: Purse, image, key):
    """``encode_purse`` without its checks (it refuses such a purse, rightly)."""
    from dataclasses import asdict

    from farebox.cardimage import schemas
    from farebox.cardimage.image import _seal
    from farebox.cardimage.layout import AREA_PURSE

    data = schemas.build(schemas.Purse, asdict(forged))
    return _seal(key, AREA_PURSE, image.identity.key_version, image.idm,
                 PURSE_SLOT_BLOCKS[image.purse_slot], data)


@pytest.mark.parametrize("changes", [
    {"balance_cents": 300_001},  # above the stored value limit
    {"balance_cents": -5_001},  # below minus the negative limit
    {"balance_cents": 2**31 - 1},
    {"counter": 0xFFFFFFFF},
    {"counter": COUNTER_MAX},  # verifies, but can never be written again
])
def test_impossible_purse_values_are_an_invalid_card(terminal, journal, changes):
    card = new_card()
    forge(card, **changes)
    before = list(card.blocks)
    result = pay(terminal, card)
    assert result.reason is Reason.INVALID_CARD and not result.approved
    assert card.blocks == before and journal.records() == []


# ---- the commit mark is durable before the next tap ---------------------------------------------

def test_the_commit_mark_is_written_before_the_result_and_made_durable_off_the_field(
        terminal, journal):
    """While the card is in the field the tap makes one durable commit (the intent, FULL: its
    fsync) and, before the result is returned, commits the mark without waiting for the disk
    (synchronous=NORMAL): another connection sees it at once. Once the card has left, the WAL
    is checkpointed, then one FULL commit makes the mark durable (and starts the WAL again, so
    that the next intent only appends to it: test_fsyncs.py)."""
    statements = []
    journal._db.set_trace_callback(statements.append)
    card = new_card()
    result = pay(terminal, card)
    in_field = list(statements)
    intent, mark = [i for i, s in enumerate(in_field) if s == "COMMIT"]
    assert "PRAGMA synchronous=NORMAL" not in in_field[:intent]  # the intent commit is FULL
    assert any(s.startswith("INSERT INTO card_writes") for s in in_field[:intent])
    normal = in_field.index("PRAGMA synchronous=NORMAL")
    assert intent < normal < mark  # the mark's commit does not wait for the disk
    assert any(s.startswith("UPDATE card_writes SET state") for s in in_field[normal:mark])
    with sqlite3.connect(journal.path) as other:  # committed: in the file, not in memory
        assert other.execute("SELECT state FROM card_writes WHERE tap_id = ?",
                             (result.tap_id,)).fetchone() == ("committed",)
    assert journal.unsynced  # not yet synced: the card has not left
    terminal.idle()  # the card has left
    assert not journal.unsynced
    after = statements[len(in_field):]
    commit = after.index("COMMIT")
    assert "PRAGMA synchronous=NORMAL" not in after[:commit]  # FULL: synced
    assert "PRAGMA wal_checkpoint(PASSIVE)" in after[:commit]  # checkpoint first
    assert journal.write(result.tap_id).state is WriteState.COMMITTED


def test_a_process_that_dies_after_the_result_loses_no_mark(tmp_path):
    """The process dies once the result is shown, before the mark is synced (kill -9, a crash):
    nothing of the tap was only in memory, the restarted terminal has it committed."""
    path = tmp_path / "j.sqlite3"
    card = new_card()
    journal = Journal(path)
    result = pay(Terminal(journal, KEYS), card)
    assert journal.unsynced
    journal._db.close()  # gone without sync(): what is committed stays with the file
    journal._db = None
    with Journal(path) as journal:
        assert journal.write_state(result.tap_id) is WriteState.COMMITTED
        assert journal.write(result.tap_id).log_confirmed


def test_a_tap_cut_off_mid_write_is_noted_as_not_shown(terminal, journal):
    card = new_card()
    card.faults = Faults(leave_after_commands=4)
    with pytest.raises(TapInterrupted) as cut:
        pay(terminal, card)
    with sqlite3.connect(journal.path) as other:
        assert other.execute("SELECT tap_id FROM writes_cut_off").fetchall() == [
            (cut.value.tap_id,)]
    assert journal.write_state(cut.value.tap_id) is WriteState.INTENT


def test_a_power_cut_before_the_mark_is_synced_costs_nothing(tmp_path):
    """A power cut takes what was not synced: the journal as it was when the intent was made
    (its fsync). A restarted terminal finds the intent and the card proves the write; an image
    restored from before the tap is then a rollback."""
    path = tmp_path / "j.sqlite3"
    card = new_card()
    before = SimulatedLiteS(card.idm, card.pmm, list(card.blocks))
    journal = Journal(path)
    durable = tmp_path / "durable.sqlite3"

    def power_cut_keeps(_card):  # the card's first landed write: the intent is durable
        if not durable.exists():
            with sqlite3.connect(durable) as copy:
                journal._db.backup(copy)

    card.on_write = power_cut_keeps
    result = pay(Terminal(journal, KEYS), card)
    card.on_write = None
    journal._db.close()
    journal._db = None
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.write_bytes(durable.read_bytes())
    with Journal(path) as journal:
        terminal = Terminal(journal, KEYS)
        assert journal.write_state(result.tap_id) is WriteState.INTENT
        again = pay(terminal, card, at=AT + timedelta(minutes=6))
        assert journal.write_state(result.tap_id) is WriteState.COMMITTED
        assert again.balance_before_cents == 10_000 - 580
        restored = pay(terminal, before, at=AT + timedelta(minutes=7))
        assert restored.reason is Reason.ROLLBACK


def test_a_new_tap_makes_the_previous_mark_durable_first(terminal, journal):
    card = new_card()
    pay(terminal, card)
    assert journal.unsynced
    statements = []
    journal._db.set_trace_callback(statements.append)
    pay(terminal, card, at=AT + timedelta(minutes=1))
    first_commit = statements.index("COMMIT")
    # the first commit of the new tap is a FULL one (it syncs the last tap's mark), made before
    # this card's intent
    assert "PRAGMA synchronous=NORMAL" not in statements[:first_commit]
    assert not any(s.startswith("INSERT INTO card_writes") for s in statements[:first_commit])


def test_checkpoints_are_kept_off_the_in_field_path(terminal, journal):
    statements = []
    journal._db.set_trace_callback(statements.append)
    card = new_card(balance_cents=300_000)
    for minute in range(200):
        pay(terminal, card, fare=1, at=AT + timedelta(minutes=minute))
    assert not any("checkpoint" in s for s in statements)
    assert journal._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] >= 1000


# ---- many processes, one journal -------------------------------------------------------------

def _open_journal(path, barrier, results):
    barrier.wait()
    try:
        with Journal(path) as journal:
            results.put(journal.terminal_id)
    except Exception as error:  # reported to the parent
        results.put(f"error: {error}")


def test_a_first_journal_opened_by_several_processes_at_once(tmp_path):
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / f"j{attempt}.sqlite3"
        barrier, results = context.Barrier(4), context.Queue()
        workers = [context.Process(target=_open_journal, args=(path, barrier, results))
                   for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        ids = [results.get(timeout=5) for _ in workers]
        assert len(set(ids)) == 1 and not ids[0].startswith("error"), ids


def test_a_journal_from_the_first_schema_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('terminal_id', 'TOLD'), ('schema_version', '1');
        CREATE TABLE card_writes (tap_id TEXT PRIMARY KEY, card_number INTEGER NOT NULL,
            idm TEXT NOT NULL, counter_before INTEGER NOT NULL, counter_after INTEGER NOT NULL,
            expected_slot TEXT NOT NULL, state TEXT NOT NULL, created_utc TEXT NOT NULL,
            resolved_utc TEXT);
        CREATE TABLE records (seq INTEGER PRIMARY KEY, terminal_id TEXT NOT NULL,
            tap_id TEXT NOT NULL, card_number INTEGER NOT NULL, counter_before INTEGER NOT NULL,
            counter_after INTEGER NOT NULL, type TEXT NOT NULL, amount_cents INTEGER NOT NULL,
            balance_before_cents INTEGER NOT NULL, balance_after_cents INTEGER NOT NULL,
            at_utc TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
        CREATE TABLE cards (card_number INTEGER PRIMARY KEY, highest_counter INTEGER NOT NULL,
            highest_slot TEXT NOT NULL);
    """)
    db.close()
    with Journal(path) as journal:
        assert journal.terminal_id == "TOLD"
        card = new_card()
        assert pay(Terminal(journal, KEYS), card).approved
        assert journal.verify_chain()
