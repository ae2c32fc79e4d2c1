"""Issuing the blank FeliCa Lite-S card held to a reader (``service issue --reader``): every
cut-off point leaves a card that no terminal accepts until the issue is made again, and the money
is collected once, whatever the attempt that lands. In-process card; the udp path is in
tests/tools/test_cli_service.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from farebox.cardimage.model import Category, Status
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.present import read_card
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Reason, RecordType, Tariff
from farebox.terminal.core.service import ServiceRefused
from farebox.terminal.card.desk import IssueInterrupted, issue_on_card
from farebox.terminal.card.tap import Terminal
from farebox.terminal.core.writecycle import WriteState

KEYS = published_test_keys()
HK = timezone(timedelta(hours=8))
AT = datetime(2026, 3, 1, 10, 0, tzinfo=HK)
REQUEST = IssueRequest(issued=AT.date(), category=Category.ADULT)


def present(card: SimulatedLiteS) -> LiteSSession:
    card.in_field = True
    session = LiteSSession(InProcessTransport(card))
    session.poll()
    return session


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.sqlite3", terminal_id="T-0001") as journal:
        yield journal


def collected(journal: Journal) -> dict[str, int]:
    """What the committed records say was collected, by type."""
    totals: dict[str, int] = {}
    for record in journal.records():
        if record.write_state is WriteState.COMMITTED:
            totals[record.type.value] = totals.get(record.type.value, 0) + record.amount_cents
    return totals


def test_a_blank_card_is_issued_and_pays_at_once(journal):
    card = SimulatedLiteS(new_idm())
    issued = issue_on_card(journal, KEYS, present(card), REQUEST, AT)
    assert issued.path is None and issued.completed_from is None
    image = read_card(present(card), KEYS)
    assert image.identity.card_number == issued.identity.card_number
    assert image.purse.balance_cents == 15_000 and image.purse.status is Status.ACTIVE
    assert collected(journal) == {"deposit": 5_000, "initial_value": 15_000}
    result = Terminal(journal, KEYS).pay(present(card), Tariff.flat(580), AT + timedelta(hours=1))
    assert result.approved and result.balance_after_cents == 14_420


def test_only_a_blank_card_is_issued(journal):
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=AT.date(), number=12345678), KEYS, idm)
    issued_card = SimulatedLiteS(idm, blocks=blocks)
    with pytest.raises(ServiceRefused, match="already issued .card 12345678"):
        issue_on_card(journal, KEYS, present(issued_card), REQUEST, AT)
    foreign = SimulatedLiteS(new_idm())
    foreign.blocks[9] = bytes(range(16))  # someone else's data
    before = [bytes(b) for b in foreign.blocks]
    with pytest.raises(ServiceRefused, match="not blank"):
        issue_on_card(journal, KEYS, present(foreign), REQUEST, AT)
    assert [bytes(b) for b in foreign.blocks] == before and issued_card.blocks == blocks
    assert journal.records() == [] and journal.writes() == []


def test_a_clock_behind_the_terminal_is_refused_before_the_card_is_touched(journal):
    issue_on_card(journal, KEYS, present(SimulatedLiteS(new_idm())), REQUEST, AT)
    card = SimulatedLiteS(new_idm())
    with pytest.raises(ServiceRefused, match="check the clock"):
        issue_on_card(journal, KEYS, present(card), REQUEST, AT - timedelta(days=1))
    assert all(b == bytes(16) for b in card.blocks)


# 1 poll + 4 reads, then 5 writes: identity (2), log, purse slot 0 (2)
@pytest.mark.parametrize("fault", [
    *(Faults(tear_write_number=n, tear_bytes=5) for n in range(1, 6)),
    *(Faults(tear_write_number=n, tear_bytes=16) for n in range(1, 6)),  # landed, no answer
    *(Faults(leave_after_commands=n) for n in range(5, 10)),
])
def test_an_issue_cut_off_anywhere_is_refused_by_terminals_then_issued_once(journal, fault):
    card = SimulatedLiteS(new_idm())
    card.faults = fault
    with pytest.raises(IssueInterrupted):
        issue_on_card(journal, KEYS, present(card), REQUEST, AT)
    card.faults = Faults()
    [write] = journal.writes()
    assert write.state is WriteState.INTENT and write.kind == "issue"
    landed = b"".join(bytes(card.blocks[b]) for b in (2, 3)) == write.expected_slot

    # a payment terminal meets the half-issued card: declined, nothing written, nothing settled
    if not landed:
        before = [bytes(b) for b in card.blocks]
        other = Terminal(journal, KEYS).pay(present(card), Tariff.flat(580), AT)
        assert not other.approved and other.reason is Reason.INVALID_CARD
        assert [bytes(b) for b in card.blocks] == before

    again = issue_on_card(journal, KEYS, present(card), REQUEST, AT + timedelta(seconds=30))
    assert (again.completed_from == write.tap_id) is landed
    image = read_card(present(card), KEYS)
    assert image.identity.card_number == again.identity.card_number
    assert image.purse.balance_cents == 15_000
    assert collected(journal) == {"deposit": 5_000, "initial_value": 15_000}
    states = sorted(w.state.value for w in journal.writes())
    assert states == (["committed"] if landed else ["committed", "void"])
    assert journal.open_writes_for_idm(card.idm, "issue") == []
    assert RecordType.DEPOSIT in {r.type for r in journal.records(image.identity.card_number)}
