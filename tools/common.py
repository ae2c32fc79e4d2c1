"""Shared plumbing of the commands: options, settings, and the mapping of the runtime's errors to
exit codes (2: bad input, one line). The work itself is in ``farebox.terminal.runtime``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from farebox.protocol.reader import Reader
from farebox.protocol.sim.card import Faults
from farebox.terminal.config import ConfigError, TerminalConfig, load_config
from farebox.terminal.runtime import (
    RuntimeSetupError, default_state_dir, open_terminal, open_transport, state_dir,
)
from farebox.terminal.card.tap import Terminal


class InputError(click.ClickException):
    """Bad input found after parsing (a card file, a list file, a rule): exit 2."""

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
    try:
        return load_config(config_file).with_flags(**flags)
    except ConfigError as error:
        raise InputError(str(error)) from None


@contextmanager
def setup_errors() -> Iterator[None]:
    try:
        yield
    except RuntimeSetupError as error:
        raise InputError(str(error)) from None


def open_reader(spec: str, *, faults: Faults | None = None, writable: bool = True) -> Reader:
    with setup_errors():
        return open_transport(spec, faults=faults, writable=writable)


@contextmanager
def terminal(config: TerminalConfig) -> Iterator[Terminal]:
    with setup_errors(), open_terminal(config) as term:
        yield term


def state_notice(config: TerminalConfig) -> None:
    """Said once, on stderr, when the state directory is the default one."""
    if config.state_dir is None:
        click.echo(f"farebox: note: terminal state in {default_state_dir()} "
                   "(choose with --state DIR or FAREBOX_STATE)", err=True)


__all__ = ["InputError", "config_option", "json_option", "reader_timeout_option", "open_reader", "settings", "setup_errors",
           "state_dir", "state_notice", "state_option", "terminal"]
