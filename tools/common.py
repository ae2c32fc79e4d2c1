"""Shared plumbing of the commands: options, settings, the terminal and its readers. The work
itself is in ``farebox.terminal.runtime``; the errors it raises reach ``farebox.tools.cli.main``,
which maps them to exit statuses (2: bad input, one line)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from farebox.protocol.reader import Reader
from farebox.protocol.sim.card import Faults
from farebox.terminal.config import TerminalConfig, load_config
from farebox.terminal.runtime import (
    RuntimeSetupError, default_state_dir, open_terminal, open_transport, state_dir,
)
from farebox.terminal.card.tap import Terminal


class InputError(click.ClickException):
    """Bad input a command finds itself after parsing (two options that exclude each other, a
    record that is not there): exit 2, one line."""

    exit_code = 2


state_option = click.option(
    "--state", "state_dir", type=click.Path(file_okay=False, path_type=Path),
    default=None, help="terminal state directory (journal, counters seen) "
    "[env FAREBOX_STATE; default: the user's data directory]")
config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="terminal configuration (TOML) [env FAREBOX_CONFIG]")
json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON object")
reader_timeout_option = click.option(
    "--timeout", "timeout_s", type=click.FloatRange(min=0, max=600), default=5.0,
    show_default=True, help="seconds to wait for a card on --reader")


def settings(config_file: Path | None, **flags) -> TerminalConfig:
    """The configuration: the TOML file, then the environment, then the flags given."""
    return load_config(config_file).with_flags(**flags)


@contextmanager
def setup_errors() -> Iterator[None]:
    """A RuntimeSetupError as an InputError (a click error). ``main`` maps every BadInput to exit
    2 with the same line by itself: this is only for a command that catches click errors, e.g.
    ``service return``, which reports the cards already returned before a later card's error."""
    try:
        yield
    except RuntimeSetupError as error:
        raise InputError(str(error)) from None


def open_reader(spec: str, *, faults: Faults | None = None, writable: bool = True) -> Reader:
    with setup_errors():  # service return: a later card's file that cannot be opened
        return open_transport(spec, faults=faults, writable=writable)


@contextmanager
def terminal(config: TerminalConfig) -> Iterator[Terminal]:
    with setup_errors(), open_terminal(config) as term:  # likewise, inside the block
        yield term


def state_notice(config: TerminalConfig) -> None:
    """Said once, on stderr, when the state directory is the default one."""
    if config.state_dir is None:
        click.echo(f"farebox: note: terminal state in {default_state_dir()} "
                   "(choose with --state DIR or FAREBOX_STATE)", err=True)


__all__ = ["InputError", "config_option", "json_option", "open_reader", "reader_timeout_option",
           "settings", "setup_errors", "state_dir", "state_notice", "state_option", "terminal"]
