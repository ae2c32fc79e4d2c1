"""The daemon loop with in-process readers. A reader that vanishes (a USB reader unplugged) cannot
happen here for real: :class:`FlakyReader` is a stand-in that fails the way nfcpy and pyscard
readers fail (TransportError from wait_for_card), so the reopen path is exercised."""

from __future__ import annotations

import logging
import threading
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.protocol.errors import TransportError
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.daemon import loop as daemon_module
from farebox.terminal.daemon.events import ReaderDown, ReaderUp, TapEvent
from farebox.terminal.daemon.loop import BACKOFF_FIRST_S, BACKOFF_MAX_S, Daemon
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Tariff
from farebox.terminal.card.tap import Terminal

KEYS = published_test_keys()
AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8)))


def new_card(balance_cents=10_000) -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=12345678,
                                      balance_cents=balance_cents), KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


class HandReader(InProcessTransport):
    """An in-process reader with a hand: each presentation holds the card for a few commands
    after the tap, then takes it away, then brings it back."""

    def __init__(self, card, presentations, faults=()):
        super().__init__(card, name="hand")
        self.presentations = presentations
        self.shown = 0
        self.faults = list(faults)
        card.in_field = False

    def wait_for_card(self, system_code, timeout_s):
        if not self.card.in_field:
            if self.shown >= self.presentations:
                time.sleep(min(timeout_s, 0.01))
                return None
            self.shown += 1
            self.card.faults = self.faults.pop(0) if self.faults else Faults()
            self.card.in_field = self.card.faults.leave_after_commands != 0
        return super().wait_for_card(system_code, timeout_s)

    def wait_for_removal(self, timeout_s):
        self.card.in_field = False  # the hand moves on
        return True


class FlakyReader(HandReader):
    """Fails like an unplugged reader after ``fail_after`` waits, once."""

    def __init__(self, card, presentations, fail_after):
        super().__init__(card, presentations)
        self.waits = 0
        self.fail_after = fail_after
        self.closed = False

    def wait_for_card(self, system_code, timeout_s):
        self.waits += 1
        if self.waits == self.fail_after:
            raise TransportError("No such device (the reader was unplugged)")
        return super().wait_for_card(system_code, timeout_s)

    def close(self):
        self.closed = True


class Events(list):
    """Everything the loop reported, in order; ``taps``: the tap events among it."""

    @property
    def taps(self) -> list[TapEvent]:
        return [event for event in self if isinstance(event, TapEvent)]


@pytest.fixture(autouse=True)
def instant_hands(monkeypatch):
    """HandReader brings a card back the instant it took it away, which no hand can: the
    same-presentation guard would take every re-presentation for the first. Off here; the
    guard's own tests turn it on."""
    monkeypatch.setattr(daemon_module, "REPRESENT_GUARD_S", 0.0)


@pytest.fixture
def terminal(tmp_path):
    with Journal(tmp_path / "j.sqlite3") as journal:
        yield Terminal(journal, KEYS)


def test_one_presentation_is_one_tap(terminal):
    card = new_card()
    reader = HandReader(card, presentations=3)
    events = Events()
    Daemon(terminal, lambda: reader, Tariff.flat(100), on_event=events.append, max_taps=3,
           clock=lambda: AT).run()
    assert [e.result.balance_after_cents for e in events.taps] == [9_900, 9_800, 9_700]
    assert all(e.reader == "hand" and e.idm == card.idm for e in events.taps)


def test_a_pull_away_then_a_representation_costs_only_what_was_recorded(terminal):
    card = new_card()
    reader = HandReader(card, presentations=2, faults=[Faults(tear_write_number=2, tear_bytes=16)])
    events = Events()
    Daemon(terminal, lambda: reader, Tariff.flat(100), on_event=events.append, max_taps=2,
           clock=lambda: AT).run()
    cut, completed = events.taps
    assert cut.result is None and cut.interrupted and cut.outcome == "interrupted"
    assert completed.result.completed_from == cut.interrupted
    assert completed.result.balance_after_cents == 9_900 and completed.outcome == "approved"


def test_a_reader_that_vanishes_is_reopened(terminal):
    card = new_card()
    opened = []

    def open_reader():
        opened.append(len(opened) + 1)
        if len(opened) == 1:
            return FlakyReader(card, presentations=1, fail_after=2)  # a tap, then unplugged
        if len(opened) == 2:
            raise TransportError("no reader on usb (still unplugged)")
        return FlakyReader(card, presentations=1, fail_after=99)  # plugged in again

    first = []
    events = Events()
    daemon = Daemon(terminal, open_reader, Tariff.flat(100), on_event=events.append,
                    on_ready=first.append, max_taps=2, clock=lambda: AT)
    stats = daemon.run()
    assert [e.result.balance_after_cents for e in events.taps] == [9_900, 9_800]
    assert opened == [1, 2, 3] and stats.reader_reopens == 1
    assert first[0].closed and len(first) == 2
    # the loop said it: up, a tap, down (once for the failure, once more when its cause
    # changed to the reader not opening), up again, a tap
    assert [type(e) for e in events] == [ReaderUp, TapEvent, ReaderDown, ReaderDown, ReaderUp,
                                         TapEvent]
    assert [e.error for e in events if isinstance(e, ReaderDown)] == [
        "reader failed (No such device (the reader was unplugged))",
        "reader not available (no reader on usb (still unplugged))"]
    assert all(e.reader == "hand" for e in events if isinstance(e, ReaderUp))


def test_a_reader_that_keeps_failing_is_retried_with_backoff_and_logged_once(terminal, caplog):
    """pcscd gone: the reader opens but every wait fails at once. The daemon must pause between
    tries (doubling up to BACKOFF_MAX_S), warn once for the outage and once when it ends."""
    card = new_card()
    reader = FlakyReader(card, presentations=1, fail_after=99)
    failures = 6
    pauses = []

    class DeadThenBack(FlakyReader):
        def wait_for_card(self, system_code, timeout_s):
            if len(pauses) < failures:
                raise TransportError("cannot reach pcscd: Service not available")
            return reader.wait_for_card(system_code, timeout_s)

    daemon = Daemon(terminal, lambda: DeadThenBack(card, 0, 99), Tariff.flat(100),
                    on_event=lambda e: None, max_taps=1, clock=lambda: AT)
    daemon._sleep = pauses.append
    with caplog.at_level(logging.DEBUG, logger="farebox.terminal.daemon.loop"):
        stats = daemon.run()
    assert stats.taps == 1 and stats.reader_reopens == failures
    assert pauses == [min(BACKOFF_FIRST_S * 2 ** n, BACKOFF_MAX_S) for n in range(failures)]
    assert pauses[-1] == BACKOFF_MAX_S
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "pcscd" in warnings[0] and "works again" in warnings[1]


class MissesPresence(HandReader):
    """A card held in the field whose presence checks time out twice (a slow card, a noisy
    field): the reader reports it gone although it is still there, then really takes it away."""

    def __init__(self, card, presentations, misses=2, away_s=0.3):
        super().__init__(card, presentations)
        self.misses = misses
        self.away_s = away_s  # a real hand: the card is away this long before it comes back
        self.left_at = None

    def wait_for_removal(self, timeout_s):
        if self.misses:
            self.misses -= 1
            return True  # wrongly: the card stays in the field
        self.left_at = time.monotonic()
        return super().wait_for_removal(timeout_s)

    def wait_for_card(self, system_code, timeout_s):
        if self.left_at is not None and time.monotonic() - self.left_at < self.away_s:
            time.sleep(min(timeout_s, 0.01))
            return None
        return super().wait_for_card(system_code, timeout_s)


def test_a_card_still_in_the_field_after_a_missed_presence_check_is_not_charged_again(
        terminal, monkeypatch):
    monkeypatch.setattr(daemon_module, "REPRESENT_GUARD_S", 0.2)
    card = new_card()
    reader = MissesPresence(card, presentations=2)
    events = Events()
    daemon = Daemon(terminal, lambda: reader, Tariff.flat(100), on_event=events.append,
                    max_taps=2, clock=lambda: AT)
    daemon.run()
    # two presentations, two charges; the card found again after each false removal is not one
    assert [e.result.balance_after_cents for e in events.taps] == [9_900, 9_800]
    assert reader.misses == 0 and reader.shown == 2


def test_a_card_back_later_than_the_guard_is_a_new_presentation(terminal):
    card = new_card()
    reader = MissesPresence(card, presentations=1, misses=1)
    events = Events()
    Daemon(terminal, lambda: reader, Tariff.flat(100), on_event=events.append, max_taps=2,
           clock=lambda: AT).run()
    assert [e.result.balance_after_cents for e in events.taps] == [9_900, 9_800]  # no guard: twice


def test_stop_finishes_the_tap_in_progress_and_returns_quickly(tmp_path):
    card = new_card()
    reader = HandReader(card, presentations=0)
    ready = threading.Event()
    holder = {}

    def run():
        with Journal(tmp_path / "j.sqlite3") as journal:  # SQLite objects stay on their thread
            holder["daemon"] = daemon = Daemon(Terminal(journal, KEYS), lambda: reader,
                                               Tariff.flat(100), on_event=lambda e: None,
                                               on_ready=lambda r: ready.set(), clock=lambda: AT)
            holder["stats"] = daemon.run()

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.2)
    started = time.monotonic()
    holder["daemon"].stop()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert holder["stats"].taps == 0


def test_marks_are_durable_after_each_card_leaves(terminal):
    card = new_card()
    reader = HandReader(card, presentations=2)
    seen = []
    Daemon(terminal, lambda: reader, Tariff.flat(100),
           on_event=lambda e: isinstance(e, TapEvent) and seen.append(terminal.journal.unsynced),
           max_taps=2,
           clock=lambda: AT).run()
    assert seen == [True, True]  # each tap's mark waits until its card has left
    assert not terminal.journal.unsynced  # and is durable once it has
