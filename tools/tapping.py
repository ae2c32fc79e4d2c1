"""The exit codes of a card transaction's errors, written once for every command that works on a
card (tap, add-value, service, card, demo).

* 1, "present the card again": a card write cut off after its journal intent (the journal holds
  it in doubt; the next presentation resolves it), or a card that left the field before
  anything was written;
* 2, bad input: the request was refused or the card cannot be used; nothing was done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from farebox.terminal.card.desk import IssueInterrupted
from farebox.terminal.card.present import CardLeft, CardUnusable, NoCard
from farebox.terminal.card.tap import RequestRefused, TapInterrupted
from farebox.terminal.core.service import ServiceRefused

#: exit 1: the card is to be presented again
AGAIN = (TapInterrupted, IssueInterrupted, CardLeft)
#: exit 2: refused, nothing was done
REFUSED = (RequestRefused, ServiceRefused, CardUnusable, NoCard)


def tap_exit_code(error: BaseException) -> int | None:
    """The exit code of a card transaction's error; None for any other exception."""
    if isinstance(error, AGAIN):
        return 1
    if isinstance(error, REFUSED):
        return 2
    return None


@contextmanager
def card_errors() -> Iterator[None]:
    """A card transaction's errors as the command's one line and exit code."""
    try:
        yield
    except (*AGAIN, *REFUSED) as error:
        failure = click.ClickException(str(error))
        failure.exit_code = tap_exit_code(error)
        raise failure from None
