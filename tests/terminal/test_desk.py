"""The card room's shell around the card a command works on: finding it (terminal/card/present.py)
and the service desk's requests over card files (terminal/card/desk.py)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.cardimage.model import Kind, Status
from farebox.protocol.errors import TransportTimeout
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.cardfile import load_card
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.desk import (
    CardDeclined, PartlyReturned, check_card_files, inactivity_fee, return_cards,
)
from farebox.terminal.card.issue import IssueRequest, issue_card_file, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.card.present import CardLeft, CardReaders, CardUnusable, NoCard
from farebox.terminal.card.tap import RequestRefused, Terminal
from farebox.terminal.core.rules import ListEntry, ListReason
from farebox.terminal.core.service import ServiceRefused
from farebox.terminal.runtime import RuntimeSetupError, card_readers, open_transport
from farebox.terminal.store.journal import Journal

KEYS = published_test_keys()
HK = timezone(timedelta(hours=8))
AT = datetime(2026, 3, 1, 10, 0, tzinfo=HK)


class Opened:
    """An ``open_reader`` over one in-process card that remembers whether it was closed."""

    def __init__(self, card: SimulatedLiteS) -> None:
        self.card = card
        self.calls: list[dict] = []
        self.closed = 0

    def __call__(self, spec: str, **flags) -> InProcessTransport:
        self.calls.append(flags)
        reader = InProcessTransport(self.card, name=spec)
        reader.close = lambda: setattr(self, "closed", self.closed + 1)
        return reader


def test_no_card_in_time_is_said_with_the_card_and_the_reader_closed():
    card = SimulatedLiteS(new_idm())
    card.in_field = False
    opened = Opened(card)
    with pytest.raises(NoCard, match=r"^udp:127.0.0.1:9: no card answered within 0.5 s$"):
        with CardReaders(opened, wait_s=0.5).session("udp:127.0.0.1:9"):
            pytest.fail("no session without a card")
    assert opened.closed == 1


@pytest.mark.parametrize("faults,error,message", [
    (None, CardUnusable, r"^c.json: the card does not work with this terminal \(gone\)$"),
    (Faults(leave_after_commands=9), CardLeft,
     r"^the card left the field \(gone\); nothing was written; present the card again$"),
])
def test_a_card_error_before_any_write_is_worded_once(faults, error, message):
    opened = Opened(SimulatedLiteS(new_idm()))
    cards = CardReaders(opened, faults=faults, wait_s=1.0, again="present")
    with pytest.raises(error, match=message):
        with cards.session("sim:c.json") as session:
            assert session.idm is not None and session.commands == 1  # the poll
            raise TransportTimeout("gone")
    assert opened.closed == 1 and opened.calls == [{"faults": faults, "writable": True}]


def test_a_look_opens_the_card_read_only_without_faults():
    opened = Opened(SimulatedLiteS(new_idm()))  # blank: does not verify
    cards = CardReaders(opened, faults=Faults(leave_after_commands=1), wait_s=1.0)
    with pytest.raises(CardUnusable, match="^blank.json: invalid card: "):
        cards.look("sim:blank.json", KEYS)
    assert opened.calls == [{"faults": None, "writable": False}] and opened.closed == 1


def test_a_tap_session_does_not_wait_for_the_card():
    opened = Opened(SimulatedLiteS(new_idm()))
    with CardReaders(opened).session("sim:c.json") as session:
        assert session.idm is None and session.commands == 0  # the tap polls itself


# ---- the desk's return of several card files ---------------------------------------------

@pytest.fixture
def terminal(tmp_path):
    with Journal(tmp_path / "journal.sqlite3", terminal_id="T-0001") as journal:
        yield Terminal(journal, KEYS)


def card_file(tmp_path, name: str, **fields) -> str:
    path = tmp_path / f"{name}.json"
    issue_card_file(path, IssueRequest(issued=date(2025, 1, 1), balance_cents=5_000, **fields),
                    KEYS)
    return f"sim:{path}"


def blocks(spec: str) -> list[bytes]:
    return [bytes(b) for b in load_card(spec.removeprefix("sim:")).blocks]


def test_one_card_that_cannot_be_returned_stops_the_request_before_any_change(terminal,
                                                                              tmp_path):
    first, sold = card_file(tmp_path, "first"), card_file(tmp_path, "sold", kind=Kind.SOLD)
    before = blocks(first), blocks(sold)
    with pytest.raises(RequestRefused, match=r"sold.json: a Sold card is not returned .*; "
                                             "nothing was done$"):
        return_cards(terminal, card_readers(wait_s=1.0), [first, sold], AT)
    assert (blocks(first), blocks(sold)) == before and terminal.journal.writes() == []


def test_a_card_the_action_list_stops_is_marked_and_the_request_stops(terminal, tmp_path):
    first, lost = card_file(tmp_path, "first"), card_file(tmp_path, "lost")
    before = blocks(first)
    terminal.action_list = (ListEntry(_number(lost), ListReason.LOST, AT - timedelta(days=2)),)
    with pytest.raises(CardDeclined, match="lost.json: card refused: the action list orders it"):
        return_cards(terminal, card_readers(wait_s=1.0), [first, lost], AT)
    assert blocks(first) == before
    assert _status(lost) is Status.BLOCKED


def test_a_card_failing_after_others_were_returned_says_which_were(terminal, tmp_path):
    first, second = card_file(tmp_path, "first"), card_file(tmp_path, "second")
    before = blocks(second)

    def open_reader(spec, **flags):
        if spec == second and flags["writable"]:
            raise RuntimeSetupError(f"{spec}: locked by another process")
        return open_transport(spec, **flags)

    with pytest.raises(PartlyReturned) as stopped:
        return_cards(terminal, CardReaders(open_reader, wait_s=1.0), [first, second], AT)
    assert str(stopped.value) == (f"card 2 of 2: {second}: locked by another process "
                                  "(the 1 card(s) before it were returned)")
    [returned] = stopped.value.results
    assert returned.card_number == _number(first) and _status(first) is Status.CANCELLED
    assert blocks(second) == before


def test_a_request_names_one_to_five_cards_each_once(tmp_path):
    check_card_files([tmp_path / "a.json", tmp_path / "b.json"])
    for paths, message in (([], "no card"), ([tmp_path / f"{n}.json" for n in range(6)], "5"),
                           ([tmp_path / "a.json", tmp_path / "." / "a.json"], "twice")):
        with pytest.raises(ServiceRefused, match=message):
            check_card_files(paths)


def test_the_inactivity_fee_of_a_card_is_not_asked_before_its_issue(tmp_path):
    spec = card_file(tmp_path, "card")
    image, fees = inactivity_fee(card_readers(wait_s=1.0), spec, KEYS, AT)
    assert image.identity.issued == date(2025, 1, 1) and fees.due_cents == 0
    with pytest.raises(ServiceRefused, match="2024-12-31 is before the card was issued"):
        inactivity_fee(card_readers(wait_s=1.0), spec, KEYS,
                       datetime(2024, 12, 31, 12, 0, tzinfo=HK))


def _image(spec: str):
    return card_readers(wait_s=1.0).look(spec, KEYS)


def _number(spec: str) -> int:
    return _image(spec).identity.card_number


def _status(spec: str) -> Status:
    return _image(spec).purse.status


def test_a_card_reported_lost_held_to_a_reader_is_not_returned_inside_the_three_hours(terminal):
    """The checks before any change read card files only; a card held to a reader is checked
    by its change itself: reported lost an hour ago (not blocked yet), it is not refunded here
    (the central office refunds it, docs/rules.md §8) and nothing is written."""
    from farebox.terminal.card.issue import issue

    idm = new_idm()
    _, _, card_blocks = issue(IssueRequest(issued=date(2025, 1, 1), balance_cents=5_000,
                                           number=12345678), KEYS, idm)
    card = SimulatedLiteS(idm, blocks=card_blocks)
    before = [bytes(b) for b in card.blocks]
    terminal.action_list = (ListEntry(12345678, ListReason.LOST, AT - timedelta(hours=1)),)
    with pytest.raises(RequestRefused, match="reported lost at .*central office"):
        return_cards(terminal, CardReaders(Opened(card), wait_s=1.0), ["usb"], AT)
    assert [bytes(b) for b in card.blocks] == before and terminal.journal.writes() == []
