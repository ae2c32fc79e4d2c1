"""Shared plumbing of the commands: state directory, card files, terminal set-up."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import click
import platformdirs

from farebox.protocol.session import LiteSSession
from farebox.protocol.simcard import CardFileError, SimulatedLiteS, load_card, save_card
from farebox.protocol.transports.inprocess import InProcessTransport
from farebox.terminal.actionlist import ActionListError, load_action_list
from farebox.terminal.journal import Journal, JournalError
from farebox.terminal.keys import published_test_keys
from farebox.terminal.tap import Terminal

JOURNAL_FILE = "journal.sqlite3"


class InputError(click.ClickException):
    """Bad input found after parsing (a card file, a list file, a rule): exit 2."""

    exit_code = 2


def default_state_dir() -> Path:
    return platformdirs.user_data_path("farebox")


state_option = click.option(
    "--state", "state_dir", type=click.Path(file_okay=False, path_type=Path),
    default=None, help="terminal state directory (journal, counters seen) "
    "[default: the user's data directory]")
json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON object")


def open_card(path: Path) -> SimulatedLiteS:
    """The simulated card in ``path``; every landed block write is saved back atomically."""
    try:
        card = load_card(path)
    except CardFileError as error:
        raise InputError(str(error)) from None
    card.on_write = lambda c: save_card(c, path)
    return card


def session_for(card: SimulatedLiteS) -> LiteSSession:
    return LiteSSession(InProcessTransport(card))


def open_journal(state_dir: Path | None) -> Journal:
    try:
        return Journal((state_dir or default_state_dir()) / JOURNAL_FILE)
    except JournalError as error:
        raise InputError(str(error)) from None


@contextmanager
def terminal(state_dir: Path | None, hotlist: Path | None, **settings):
    """A Terminal over the state directory's journal, with the test key store and the list."""
    try:
        action_list = load_action_list(hotlist) if hotlist is not None else ()
    except ActionListError as error:
        raise InputError(str(error)) from None
    with open_journal(state_dir) as journal:
        yield Terminal(journal, published_test_keys(), action_list, **settings)
