"""A request made again on a card whose last change is this terminal's (issue 17 item 1), through
the terminal's shell over the in-process simulated card: an add value or a service change cut
off after its write landed is completed whatever the time; a return, an issue, or an add value
of the same amount made again while the card's last change is that write reports it; anything
else about the card (changed elsewhere, a restored copy, a listed card) is answered as before."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.cardimage.layout import PURSE_SLOT_BLOCKS
from farebox.cardimage.model import Category
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.desk import IssueInterrupted, issue_on_card
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.card.present import read_card
from farebox.terminal.card.tap import RequestRefused, TapInterrupted, Terminal
from farebox.terminal.core.rules import ListEntry, ListReason, Reason, RecordType, Tariff
from farebox.terminal.core.service import ServiceRefused, decide_return
from farebox.terminal.core.writecycle import WriteState
from farebox.terminal.store.journal import Journal

KEYS = published_test_keys()
HK = timezone(timedelta(hours=8))
AT = datetime(2026, 3, 1, 10, 0, tzinfo=HK)
LATER = AT + timedelta(minutes=5)  # past the 60 s re-tap window
NUMBER = 12345678


def new_card(balance_cents: int = 10_000) -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=NUMBER,
                                      balance_cents=balance_cents), KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


def session(card: SimulatedLiteS) -> LiteSSession:
    card.faults = Faults()
    card.in_field = True
    return LiteSSession(InProcessTransport(card))


def add(terminal: Terminal, card: SimulatedLiteS, cents: int, at: datetime, **options):
    return terminal.add_value(session(card), cents, at, **options)


def do_return(terminal: Terminal, card: SimulatedLiteS, at: datetime, *, repeats: bool = True):
    return terminal.service(session(card), at, "return",
                            lambda c, day: decide_return(c.identity, c.purse, day)[0],
                            repeats=repeats)


def cut_off(action, card: SimulatedLiteS) -> str:
    """Run ``action`` with the purse landing whole and its answer lost: the write in doubt."""
    card.faults = Faults(tear_write_number=2, tear_bytes=16)
    card.in_field = True
    with pytest.raises(TapInterrupted) as interrupted:
        action(LiteSSession(InProcessTransport(card)))
    return interrupted.value.tap_id


def committed(journal: Journal, kind: RecordType) -> list[int]:
    return [r.amount_cents for r in journal.records(NUMBER)
            if r.type is kind and r.write_state is WriteState.COMMITTED]


def slot_bytes(card: SimulatedLiteS) -> bytes:
    image = read_card(session(card), KEYS)
    return b"".join(bytes(card.blocks[b]) for b in PURSE_SLOT_BLOCKS[image.purse_slot])


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.sqlite3", terminal_id="T-0001") as journal:
        yield journal


@pytest.fixture
def terminal(journal):
    return Terminal(journal, KEYS)


# ---- the journal's read ----------------------------------------------------------------------

def test_last_change_is_this_terminal_s_committed_write_with_exactly_the_card_s_bytes(
        journal, terminal):
    card = new_card()
    done = add(terminal, card, 5_000, AT)
    terminal.idle()
    slot = slot_bytes(card)
    found = journal.last_change(NUMBER, 2, slot)
    assert found is not None and found.tap_id == done.tap_id and found.kind == "add_value"
    assert journal.last_change(NUMBER, 2, bytes(len(slot))) is None  # other bytes: not ours
    assert journal.last_change(NUMBER, 1, slot) is None
    assert journal.last_change(NUMBER + 1, 2, slot) is None


def test_last_change_ignores_a_write_still_in_doubt(journal, terminal):
    card = new_card()
    cut_off(lambda s: terminal.add_value(s, 5_000, AT), card)
    assert journal.last_change(NUMBER, 2, slot_bytes(card)) is None


# ---- cut off, completed whatever the time -----------------------------------------------------

def test_an_add_value_cut_off_is_completed_five_minutes_later(journal, terminal):
    card = new_card()
    tap_id = cut_off(lambda s: terminal.add_value(s, 5_000, AT), card)
    result = add(terminal, card, 5_000, LATER)
    assert result.completed_from == tap_id and result.completed_at == AT
    assert (result.balance_before_cents, result.balance_after_cents) == (10_000, 15_000)
    assert committed(journal, RecordType.ADD_VALUE) == [5_000]


def test_a_payment_cut_off_is_still_a_new_journey_after_the_window(journal, terminal):
    card = new_card()
    cut_off(lambda s: terminal.pay(s, Tariff.flat(580), AT), card)
    result = terminal.pay(session(card), Tariff.flat(580), LATER)
    assert result.completed_from is None and result.balance_after_cents == 10_000 - 2 * 580


def test_a_return_cut_off_is_completed_an_hour_later_even_without_repeats(journal, terminal):
    card = new_card()
    tap_id = cut_off(lambda s: terminal.service(
        s, AT, "return", lambda c, day: decide_return(c.identity, c.purse, day)[0]), card)
    result = do_return(terminal, card, AT + timedelta(hours=1), repeats=False)
    assert result.completed_from == tap_id
    assert committed(journal, RecordType.REFUND) == [5_000 + 10_000 - 1_100]


# ---- made again while it is the card's last change ------------------------------------------

def test_a_return_made_again_is_reported_whatever_the_time_and_writes_nothing(journal, terminal):
    card = new_card()
    first = do_return(terminal, card, AT)
    terminal.idle()
    before = [bytes(b) for b in card.blocks]
    again = do_return(terminal, card, AT + timedelta(days=30))  # past any clock bound
    assert again.completed_from == first.tap_id and again.completed_at == AT
    assert again.records == first.records and again.balance_before_cents == 10_000
    assert again.commands == 3  # poll and two reads: nothing written
    assert [bytes(b) for b in card.blocks] == before
    assert committed(journal, RecordType.REFUND) == [13_900]
    with pytest.raises(RequestRefused, match="cancelled"):  # a change without `repeats`
        do_return(terminal, card, AT + timedelta(days=1), repeats=False)


def test_a_return_made_elsewhere_is_not_reported(tmp_path, journal, terminal):
    card = new_card()
    with Journal(tmp_path / "other.sqlite3", terminal_id="T-0002") as other:
        do_return(Terminal(other, KEYS), card, AT)
    with pytest.raises(RequestRefused, match="cancelled"):
        do_return(terminal, card, LATER)


@pytest.mark.parametrize("options, reported", [({}, True), ({"again": True}, False)])
def test_an_add_value_never_shown_is_reported_unless_asked_again(journal, terminal, options,
                                                                 reported):
    """The process died after the write's commit mark, before its result was shown (no idle):
    the same request again is that add value, reported; ``again`` adds anew."""
    card = new_card()
    first = add(terminal, card, 5_000, AT)
    journal.sync()  # the commit mark is kept; the result was never shown (idle() not called)
    after_restart = Terminal(journal, KEYS)
    second = add(after_restart, card, 5_000, LATER, **options)
    assert (second.completed_from == first.tap_id) is reported
    assert second.balance_after_cents == (15_000 if reported else 20_000)
    assert committed(journal, RecordType.ADD_VALUE) == [5_000] * (1 if reported else 2)


def test_an_add_value_shown_then_the_same_again_is_a_new_one(journal, terminal):
    """Once its result was shown (idle() after it), the same amount again adds again: two add
    values in a row add both."""
    card = new_card()
    add(terminal, card, 5_000, AT)
    terminal.idle()
    second = add(terminal, card, 5_000, LATER)
    assert second.completed_from is None and second.balance_after_cents == 20_000
    assert committed(journal, RecordType.ADD_VALUE) == [5_000, 5_000]


def test_an_add_value_of_another_amount_is_served(journal, terminal):
    card = new_card()
    add(terminal, card, 5_000, AT)
    terminal.idle()
    second = add(terminal, card, 6_000, LATER)
    assert second.completed_from is None and second.balance_after_cents == 21_000


def test_an_add_value_after_a_payment_here_is_served(journal, terminal):
    card = new_card()
    add(terminal, card, 5_000, AT)
    terminal.pay(session(card), Tariff.flat(580), AT + timedelta(minutes=1))
    terminal.idle()
    again = add(terminal, card, 5_000, LATER)
    assert again.completed_from is None and again.balance_after_cents == 15_000 - 580 + 5_000


def test_a_listed_card_is_marked_not_reported(journal, terminal):
    card = new_card()
    add(terminal, card, 5_000, AT)
    terminal.idle()
    listed = Terminal(journal, KEYS, [ListEntry(NUMBER, ListReason.LOST, AT)])
    result = add(listed, card, 5_000, AT + timedelta(days=1))  # the loss in effect
    assert result.completed_from is None and result.reason is Reason.BLOCKED
    assert read_card(session(card), KEYS).purse.status.label == "blocked"


def test_a_restored_copy_written_again_elsewhere_is_a_rollback_not_a_report(tmp_path, journal,
                                                                           terminal):
    card = new_card()
    copy = SimulatedLiteS(card.idm, card.pmm, list(card.blocks))
    add(terminal, card, 5_000, AT)
    terminal.idle()
    with Journal(tmp_path / "other.sqlite3", terminal_id="T-0002") as other:
        add(Terminal(other, KEYS), copy, 5_000, AT + timedelta(days=1))  # same counter, new bytes
    result = add(terminal, copy, 5_000, LATER + timedelta(days=1))
    assert result.completed_from is None and result.reason is Reason.ROLLBACK


# ---- issue onto a card held to a reader -------------------------------------------------------

REQUEST = IssueRequest(issued=AT.date(), category=Category.ADULT)


def present(card: SimulatedLiteS) -> LiteSSession:
    presented = session(card)
    presented.poll()
    return presented


def test_a_card_issued_here_presented_again_is_reported_not_refused(journal):
    card = SimulatedLiteS(new_idm())
    first = issue_on_card(journal, KEYS, present(card), REQUEST, AT)
    before = [bytes(b) for b in card.blocks]
    again = issue_on_card(journal, KEYS, present(card), REQUEST, LATER)
    assert again.completed_from == first.tap_id and again.completed_at == AT
    assert again.identity == first.identity and again.charges == first.charges
    assert [bytes(b) for b in card.blocks] == before
    assert [r.type.value for r in journal.records()] == ["deposit", "initial_value"]
    # used since: no longer as issued here
    Terminal(journal, KEYS).pay(session(card), Tariff.flat(580), LATER)
    with pytest.raises(ServiceRefused, match="already issued"):
        issue_on_card(journal, KEYS, present(card), REQUEST, LATER + timedelta(minutes=1))


def test_an_issue_cut_off_is_completed_as_seen_on_the_card(journal):
    card = SimulatedLiteS(new_idm())
    card.faults = Faults(tear_write_number=5, tear_bytes=16)  # the purse's last block: landed
    card.in_field = True
    session_ = LiteSSession(InProcessTransport(card))
    session_.poll()
    with pytest.raises(IssueInterrupted):
        issue_on_card(journal, KEYS, session_, REQUEST, AT)
    again = issue_on_card(journal, KEYS, present(card), REQUEST, LATER)
    [write] = journal.writes()
    assert again.completed_from == write.tap_id and write.state is WriteState.COMMITTED
    assert [r.type.value for r in journal.records()] == ["deposit", "initial_value"]
