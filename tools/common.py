"""Shared plumbing of the commands: options, settings, the terminal and its readers. The work
itself is in ``farebox.terminal.runtime``; the errors it raises reach ``farebox.tools.cli.main``,
which maps them to exit statuses (2: bad input, one line)."""

from __future__ import annotations

import os
import sys
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


def settings(config_file: Path | None, *, makes_state: bool = False, **flags) -> TerminalConfig:
    """The configuration: the TOML file, then the environment, then the flags given. A state
    directory that is not there yet is watched: should the command make it (any command but
    ``terminal init`` and ``demo``, which say ``makes_state``), :func:`say_made_states` says so."""
    config = load_config(config_file).with_flags(**flags)
    directory = state_dir(config)
    ctx = click.get_current_context(silent=True)
    as_json = ctx is not None and bool(ctx.params.get("as_json"))
    if not (makes_state or as_json or directory.exists() or directory in _unmade_states):
        _unmade_states.append(directory)
    return config


#: the state directories the running command was given that were not there (issue 21: a
#: mistyped --state makes a new terminal, its memory of the cards' counters empty). The CLI
#: contract has `tap --state DIR` work on a new DIR, so this is said, not refused; and not with
#: --json, whose output (stdout and stderr) stays what the contract's checks read.
_unmade_states: list[Path] = []


def say_made_states() -> None:
    """One line on stderr for each watched state directory the command made (once each): said
    by :func:`farebox.tools.cli.main` when the command has run (not when it failed: an error
    is one line), and by ``run`` as the daemon starts."""
    for directory in [d for d in _unmade_states if d.exists()]:
        _unmade_states.remove(directory)
        _notice(f"farebox: note: made a new state directory {directory}: a new terminal, its "
                "journal empty and no memory of the cards it saw (if you meant an existing "
                "one, check --state, FAREBOX_STATE or state in the configuration)")


def _notice(line: str) -> None:
    """A line on stderr; under systemd at priority warning (as ``main`` says errors at err)."""
    if "JOURNAL_STREAM" in os.environ:
        from farebox.terminal.daemon.jsonlog import writes_to_journal

        if writes_to_journal(sys.stderr):
            line = "<4>" + line
    click.echo(line, err=True)


def forget_states() -> None:
    _unmade_states.clear()


def state_notice(config: TerminalConfig) -> None:
    """Said once, on stderr, when the state directory is the default one."""
    if config.state_dir is None:
        if default_state_dir() in _unmade_states:  # this line says where the new state is
            _unmade_states.remove(default_state_dir())
        click.echo(f"farebox: note: terminal state in {default_state_dir()} "
                   "(choose with --state DIR or FAREBOX_STATE)", err=True)


#: the reader a spec names, and the terminal a configuration assembles (their errors are
#: TerminalErrors that ``main`` maps to exit codes)
open_reader = open_transport
terminal = open_terminal

__all__ = ["InputError", "config_option", "forget_states", "json_option", "open_reader",
           "reader_timeout_option", "say_made_states", "settings", "state_dir", "state_notice",
           "state_option", "terminal", "verbose_option"]
