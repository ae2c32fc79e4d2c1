"""The exit codes of a card transaction's errors (tools/tapping.py): one table for every command
that works on a card."""

from __future__ import annotations

import click
import pytest

from farebox.protocol.errors import TransportTimeout
from farebox.terminal.card.desk import CardDeclined, IssueInterrupted, PartlyReturned
from farebox.terminal.card.present import CardLeft, CardUnusable, NoCard
from farebox.terminal.card.tap import RequestRefused, TapInterrupted
from farebox.terminal.core.service import ServiceRefused
from farebox.tools.tapping import card_errors, tap_exit_code

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
    assert tap_exit_code(error) == code
    if code is None:
        with pytest.raises(type(error)), card_errors():
            raise error
        return
    with pytest.raises(click.ClickException) as mapped, card_errors():
        raise error
    assert mapped.value.exit_code == code and mapped.value.format_message() == str(error)
