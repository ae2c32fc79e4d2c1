"""Writes in doubt at the receiver, without HTTP: real terminals (journal, shell, batches) and the
real receiver over a SQLite store. A write its terminal could not resolve for a batch period
rides as ``in_doubt``; the receiver settles it from the card's next change at any terminal,
replaces that with the terminal's own word when it comes, and lists a card whose counter was
spent twice (a restored image) even when one of the two is a write in doubt."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from farebox.clearing.report import build
from farebox.clearing.service import Receiver
from farebox.clearing.store import Store
from farebox.protocol.settlement import GENESIS_HASH
from farebox.protocol.sim.card import Faults
from farebox.terminal.card.tap import TapInterrupted, Terminal
from farebox.terminal.core.writecycle import WriteState
from farebox.terminal.link.upload import upload_payload
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.store.settlement import Settlement

from .test_tap import AT, KEYS, copy_card, new_card, pay, present_again

PERIOD = timedelta(minutes=15)
RECEIVED = "2026-11-22T16:00:00Z"


class Station:
    """One terminal: its journal, shell and batches, and a power cut that loses what was not
    synced since the card was first written."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder / name
        self.name = name
        self.identity = init_identity(self.folder, name, AT)
        self.path = self.folder / "journal.sqlite3"
        self.open()

    def open(self) -> None:
        self.journal = Journal(self.path, terminal_id=self.name)
        self.terminal = Terminal(self.journal, KEYS)
        self.settlement = Settlement(self.journal, self.identity)

    def pay(self, card, at, **options):
        result = pay(self.terminal, card, at=at, **options)
        self.terminal.idle()
        return result

    def pay_then_power_cut(self, card, at):
        """The tap is approved (its mark committed, not synced), then the power goes with the
        card still on the reader: the journal is what it was when the intent was synced."""
        durable = self.folder / "durable.sqlite3"

        def keep(_card):
            if not durable.exists():
                with sqlite3.connect(durable) as copy:
                    self.journal._db.backup(copy)  # noqa: SLF001 - the state on disk

        card.on_write = keep
        try:
            result = pay(self.terminal, card, at=at)
        finally:
            card.on_write = None
        assert result.approved
        self.journal._db.close()  # noqa: SLF001
        for suffix in ("-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        self.path.write_bytes(durable.read_bytes())
        self.open()
        assert self.journal.write_state(result.tap_id) is WriteState.INTENT
        return result

    def send(self, receiver, now):
        """Close what is due (a write in doubt a period old rides in doubt) and upload it."""
        acks = []
        while (batch := self.settlement.close_batch(now, in_doubt_after=PERIOD)) is not None:
            acks.append(receiver.ingest(upload_payload(self.settlement, batch), RECEIVED))
        return acks

    def close(self) -> None:
        self.journal.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """The receiver's database: a SQLite file, or the private PostgreSQL cluster of
    test_clearing_postgres.py (skipped, or failed as root and in CI, the same way)."""
    if request.param == "sqlite":
        return str(tmp_path / "clearing.sqlite3")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def rig(tmp_path, backend):
    stations = [Station(tmp_path, name) for name in ("T-A", "T-B", "T-C")]
    store = Store(backend)
    for station in stations:
        store.enroll(station.name, station.identity.public_key.hex(), "2026-11-22T00:00:00Z")
    yield Receiver(store), store, stations
    for station in stations:
        station.close()
    store.close()


def in_states(store, station):
    return sorted(store._all(  # noqa: SLF001 - the test reads the store's table
        "SELECT r.seq, r.state, r.reconciled FROM records r JOIN sources s ON s.id = r.source "
        "JOIN terminals t ON t.id = s.terminal WHERE t.terminal_id = ?", (station.name,)))


def paid(store) -> int:
    rows = store._all("SELECT amount_cents FROM records WHERE state = 'committed' "  # noqa: SLF001
                      "AND type = 'payment'")
    return sum(amount for (amount,) in rows)


def test_a_write_whose_mark_a_power_cut_lost_is_committed_by_the_cards_next_change(rig):
    receiver, store, (a, b, _) = rig
    card = new_card()
    a.pay_then_power_cut(card, AT)
    a.send(receiver, AT + PERIOD)
    assert in_states(store, a) == [(1, "in_doubt", 0)]
    assert build(store)["open"][0]["state"] == "in_doubt"
    b.pay(card, AT + PERIOD + timedelta(minutes=1))  # the card's next change, elsewhere
    b.send(receiver, AT + PERIOD + timedelta(minutes=30))
    assert in_states(store, a) == [(1, "committed", 2), (1, "in_doubt", 0)]
    assert paid(store) == 2 * 580 and build(store)["open"] == []
    assert store.counter_forks() == [] and store.actions()[1] == []
    # the card comes back to T-A: its own word replaces the receiver's, counted once
    a.pay(card, AT + timedelta(hours=2))
    a.send(receiver, AT + timedelta(hours=3))
    assert in_states(store, a) == [(1, "committed", 0), (1, "in_doubt", 0), (2, "committed", 0)]
    assert paid(store) == 3 * 580 == 10_000 - new_balance(card)
    assert store.counter_forks() == []


def test_the_next_change_seen_first_settles_the_write_in_doubt_when_it_comes(rig):
    receiver, store, (a, b, _) = rig
    card = new_card()
    a.pay_then_power_cut(card, AT)
    b.pay(card, AT + timedelta(minutes=1))
    b.send(receiver, AT + PERIOD)  # T-B's change from counter 2 is there first
    a.send(receiver, AT + PERIOD)
    assert in_states(store, a) == [(1, "committed", 2), (1, "in_doubt", 0)]
    assert paid(store) == 2 * 580 and store.counter_forks() == []


def test_a_cut_off_write_that_never_landed_is_void_and_no_fork(rig):
    receiver, store, (a, b, _) = rig
    card = new_card()
    card.faults = Faults(leave_after_commands=3)  # gone before any write
    with pytest.raises(TapInterrupted):
        pay(a.terminal, card, at=AT)
    present_again(card)
    b.pay(card, AT + timedelta(minutes=1))  # the customer taps at the next gate
    a.send(receiver, AT + PERIOD)
    b.send(receiver, AT + PERIOD)
    assert in_states(store, a) == [(1, "in_doubt", 0), (1, "void", 2)]
    assert store._all("SELECT not_shown FROM records WHERE state = 'in_doubt'") == [(1,)]  # noqa
    assert paid(store) == 580 == 10_000 - new_balance(card)
    assert store.counter_forks() == [] and store.actions()[1] == []
    assert build(store)["open"] == []


def test_a_card_image_restored_after_an_approval_lost_to_a_power_cut_is_a_fork(rig):
    """The approval was shown, the power cut lost its mark, the card's pre-tap image was
    written back and used elsewhere: the write in doubt is void, and the card is listed."""
    receiver, store, (a, b, _) = rig
    card = new_card()
    before = copy_card(card)
    a.pay_then_power_cut(card, AT)
    b.pay(before, AT + timedelta(minutes=1))  # the restored image, from the same counter
    a.send(receiver, AT + PERIOD)
    b.send(receiver, AT + PERIOD)
    assert in_states(store, a) == [(1, "in_doubt", 0), (1, "void", 2)]
    assert store.counter_forks() == [(12345678, 1, 2)]
    assert [card for card, _, _ in store.actions()[1]] == [12345678]
    assert build(store)["counter_forks"] == [{"card": 12345678, "counter": 1, "writes": 2}]


def test_a_card_image_restored_after_a_shown_approval_is_a_fork_of_two_committed_writes(rig):
    """The process died after the approval (its mark committed, not synced): nothing is in
    doubt, the restored image used elsewhere is a plain counter fork."""
    receiver, store, (a, b, _) = rig
    card = new_card()
    before = copy_card(card)
    tapped = pay(a.terminal, card, at=AT)
    a.journal._db.close()  # noqa: SLF001 - the process dies before idle()
    a.open()
    assert a.journal.write_state(tapped.tap_id) is WriteState.COMMITTED
    b.pay(before, AT + timedelta(minutes=1))
    a.send(receiver, AT + PERIOD)
    b.send(receiver, AT + PERIOD)
    assert store.counter_forks() == [(12345678, 1, 2)]
    assert [card for card, _, _ in store.actions()[1]] == [12345678]


def test_reconciliation_runs_to_a_fixpoint_along_a_chain_of_writes_in_doubt(rig):
    """Two writes in doubt one after the other (T-A, then T-C), the card's next change at T-B:
    T-C's write is proved by T-B's, T-A's by T-C's, in one upload."""
    receiver, store, (a, b, c) = rig
    card = new_card()
    a.pay_then_power_cut(card, AT)
    c.pay_then_power_cut(card, AT + timedelta(minutes=1))
    a.send(receiver, AT + PERIOD)
    c.send(receiver, AT + PERIOD + timedelta(minutes=1))
    assert build(store)["open"] != []
    b.pay(card, AT + timedelta(minutes=2))
    b.send(receiver, AT + PERIOD + timedelta(minutes=2))
    assert in_states(store, a) == [(1, "committed", 2), (1, "in_doubt", 0)]
    assert in_states(store, c) == [(1, "committed", 2), (1, "in_doubt", 0)]
    assert paid(store) == 3 * 580 == 10_000 - new_balance(card)
    assert build(store)["open"] == [] and store.counter_forks() == []


def test_a_later_change_from_another_terminal_revises_a_derived_commit(rig):
    """Derived rows are recomputed whenever a batch touches the card: a write proved only
    because the card's other change to that counter had not arrived yet is void once it does
    (the model's one ambiguity: two writes from one counter leaving the same balance)."""
    receiver, store, (a, b, c) = rig
    card = new_card()
    card.faults = Faults(leave_after_commands=3)
    with pytest.raises(TapInterrupted):  # T-A's write never lands
        pay(a.terminal, card, at=AT)
    present_again(card)
    b.pay(card, AT + timedelta(minutes=1))  # T-B: counter 1 -> 2, the same fare
    c.pay(card, AT + timedelta(minutes=2))  # T-C: 2 -> 3, from the balance both would leave
    a.send(receiver, AT + PERIOD)
    c.send(receiver, AT + PERIOD)
    assert in_states(store, a) == [(1, "committed", 2), (1, "in_doubt", 0)]  # provisional
    b.send(receiver, AT + PERIOD)
    assert in_states(store, a) == [(1, "in_doubt", 0), (1, "void", 2)]
    assert paid(store) == 2 * 580 == 10_000 - new_balance(card)


def new_balance(card) -> int:
    from farebox.cardimage.image import decode_image

    return decode_image(dict(enumerate(card.blocks)), card.idm,
                        lambda v: KEYS.card_key(v, card.idm)).purse.balance_cents


def test_a_change_stored_once_whatever_a_derived_row_said_first(tmp_path):
    """T-A's write in doubt is proved by the card's next change (a derived commit); then T-B's
    write of the very same bytes, committed by observation, arrives: it is a terminal's commit
    and is stored as such (not as a copy of the derived row), and the derived one gives way."""
    from farebox.clearing.store import Row

    def record(terminal, seq, state, before, after, balance_before, balance_after, at,
               observed=0):
        return terminal, Row(0, seq, state, seq, 7, before, after, "payment", 100,
                             balance_before, balance_after, at, "0" * 64, observed, 0, 1)

    def store_one(store, sent):
        terminal, row = sent
        store.enroll(terminal, "00" * 32, RECEIVED)
        store.ingest(store.terminal(terminal)[0], "i", 1, "h" * 64, GENESIS_HASH, [row],
                     RECEIVED)

    with Store(str(tmp_path / "c.sqlite3")) as store:
        store_one(store, record("T-A", 1, "in_doubt", 1, 2, 1000, 900, "2026-11-22T00:00:00Z"))
        store_one(store, record("T-C", 1, "committed", 2, 3, 900, 800, "2026-11-22T00:02:00Z"))
        assert paid(store) == 200  # T-A's derived commit and T-C's
        store_one(store, record("T-B", 1, "committed", 1, 2, 1000, 900, "2026-11-22T00:01:00Z",
                                observed=1))
        states = sorted(store._all(  # noqa: SLF001 - the test reads the store's table
            "SELECT t.terminal_id, r.state, r.reconciled FROM records r "
            "JOIN sources s ON s.id = r.source JOIN terminals t ON t.id = s.terminal"))
        assert states == [("T-A", "in_doubt", 0), ("T-A", "void", 2), ("T-B", "committed", 0),
                          ("T-C", "committed", 0)]
        assert paid(store) == 200
