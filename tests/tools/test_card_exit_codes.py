"""The exit codes of a card transaction's errors, from the CLI's one mapping (tools/cli.py
``exit_status``): 1 for "present the card again", 2 for a refusal that changed nothing."""

from __future__ import annotations

import pytest

from farebox.protocol.errors import TransportTimeout
from farebox.terminal.card.desk import CardDeclined, IssueInterrupted, PartlyReturned
from farebox.terminal.card.present import CardLeft, CardUnusable, NoCard
from farebox.terminal.card.tap import RequestRefused, TapInterrupted
from farebox.terminal.core.service import ServiceRefused
from farebox.tools.cli import exit_status

CAUSE = TransportTimeout("no answer")


@pytest.mark.parametrize("error,code", [
    (TapInterrupted("t1", CAUSE), 1),
    (IssueInterrupted("t2", CAUSE), 1),
    (CardLeft("the card left the field"), 1),
    (RequestRefused("refused"), 2),
    (CardDeclined("c.json: card refused: rollback"), 2),
    (ServiceRefused("the card is cancelled"), 2),
    (CardUnusable("c.json: invalid card"), 2),
    (NoCard("udp:h:1: no card answered within 1 s"), 2),
    (PartlyReturned([], 2, 2, RequestRefused("x")), None),  # the command says which came back
    (CAUSE, None),  # a card error the shells did not word: a bug, exit 1 as any other
    (RuntimeError("boom"), None),
])
def test_the_exit_code_of_each_card_error(error, code):
    assert exit_status(error) == code
