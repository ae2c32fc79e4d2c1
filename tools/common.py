"""Shared plumbing of the commands: options, settings, the terminal and its readers. The work
itself is in ``farebox.terminal.runtime``; the errors it raises reach ``farebox.tools.cli.main``,
which maps them to exit statuses (2: bad input, one line)."""

from __future__ import annotations

from pathlib import Path

import click

from farebox.terminal.config import TerminalConfig, load_config
from farebox.terminal.runtime import default_state_dir, open_terminal, open_transport, state_dir


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


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        from farebox.terminal.daemon.jsonlog import configure_logging
        configure_logging("text", value)


#: -v: what the command does, on stderr; -vv: every frame to and from the card (and the reader
#: libraries' own debug output)
verbose_option = click.option("-v", "--verbose", count=True, expose_value=False,
                              callback=_set_verbosity,
                              help="-v: log on stderr; -vv: every frame too")
reader_timeout_option = click.option(
    "--timeout", "timeout_s", type=click.FloatRange(min=0, max=600), default=5.0,
    show_default=True, help="seconds to wait for a card on --reader")


def settings(config_file: Path | None, **flags) -> TerminalConfig:
    """The configuration: the TOML file, then the environment, then the flags given."""
    return load_config(config_file).with_flags(**flags)


def state_notice(config: TerminalConfig) -> None:
    """Said once, on stderr, when the state directory is the default one."""
    if config.state_dir is None:
        click.echo(f"farebox: note: terminal state in {default_state_dir()} "
                   "(choose with --state DIR or FAREBOX_STATE)", err=True)


#: the reader a spec names, and the terminal a configuration assembles (their errors are
#: TerminalErrors that ``main`` maps to exit codes)
open_reader = open_transport
terminal = open_terminal

__all__ = ["InputError", "config_option", "json_option", "open_reader", "reader_timeout_option",
           "settings", "state_dir", "state_notice", "state_option", "terminal", "verbose_option"]
