"""The ``farebox`` command. Exit 0 when a command ran (approval or decline), 2 for bad input
(one line on stderr, nothing changed), 1 for internal errors and for a card write cut off midway
(one line saying what to do). :func:`main` is the one place that maps errors to exit statuses
(:func:`exit_status`); commands let the errors of the layers below through.

Subcommands are imported only when they run (``--help`` and shell completion stay fast): each is
listed here with its module and one-line help. ``farebox``, ``farebox --help`` and ``farebox -h``
print the top-level help without importing click at all (:func:`top_help`, the same text click
renders: tests/tools/test_cli_lazy.py); click is imported for everything else.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

#: name -> (module, attribute, one-line help shown by ``farebox --help``)
COMMANDS = {
    "card": ("farebox.tools.card_cmd", "card", "Make, inspect, dump, import and compare cards."),
    "tap": ("farebox.tools.tap_cmd", "tap", "Pay a fare with the card in CARD."),
    "add-value": ("farebox.tools.tap_cmd", "add_value", "Add cash value to the card in CARD."),
    "service": ("farebox.tools.service_cmd", "service",
                "Service centre: issue, return, reactivate, AAVS, student status, limits."),
    "journal": ("farebox.tools.journal_cmd", "journal", "Inspect the terminal's journal."),
    "run": ("farebox.tools.run_cmd", "run",
            "Wait for cards and charge each presentation once (the terminal daemon)."),
    "sim": ("farebox.tools.sim_cmd", "sim", "Serve simulated cards to readers."),
    "terminal": ("farebox.tools.terminal_cmd", "terminal",
                 "The terminal's identity (signing key, incarnation)."),
    "batch": ("farebox.tools.batch_cmd", "batch", "The terminal's signed settlement batches."),
    "upload": ("farebox.tools.upload_cmd", "upload",
               "Send the terminal's unacknowledged batches to the clearing house."),
    "actions": ("farebox.tools.actions_cmd", "actions",
                "Fetch the clearing house's signed action list."),
    "clearing": ("farebox.tools.clearing_cmd", "clearing",
                 "The reference clearing receiver: serve, enroll terminals, report."),
    "failpoints": ("farebox.tools.failpoints_cmd", "failpoints",
                   "List the places FAREBOX_FAILPOINT can make the process die."),
    "readers": ("farebox.tools.readers_cmd", "readers",
                "List the nfcpy and PC/SC readers found, and whether each is usable."),
    "doctor": ("farebox.tools.doctor_cmd", "doctor",
               "Check the usual reasons a terminal does not work; print the fixes."),
    "octopus": ("farebox.tools.octopus_cmd", "octopus", "Read real Octopus cards (read-only)."),
    "demo": ("farebox.tools.demo_cmd", "demo",
             "Run a scripted day on a simulated card (test keys), with its own state."),
}


#: Exit statuses of errors (a command's own statuses, e.g. 3 for a failed check, are its own).
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 1
EXIT_BAD_INPUT = 2
EXIT_JOURNAL_BROKEN = 3


def exit_status(error: Exception) -> int | None:
    """The exit status of an error a command let through that the operator can act on (told in
    one line), or None for an internal error (a bug: told with its type). Bad input (exit 2) is
    the terminal's :class:`BadInput` and, from the layers it stands on, a card file or a served
    card that cannot be used and a clearing store that cannot be opened, migrated or
    maintained; a card write cut off
    midway (:class:`Interrupted`, the journal holds it in doubt) is exit 1; a damaged journal
    (:class:`JournalBroken`: a file that does not read, chains that are not whole) is exit 3."""
    from farebox.clearing.maintain import MaintainError
    from farebox.clearing.migrate import MigrationError
    from farebox.clearing.store import StoreError
    from farebox.protocol.sim.card import CardFileError
    from farebox.protocol.sim.serve import ServeError
    from farebox.terminal.errors import BadInput, Interrupted
    from farebox.terminal.store.journal import JournalBroken

    if isinstance(error, JournalBroken):
        return EXIT_JOURNAL_BROKEN
    if isinstance(error, (BadInput, CardFileError, ServeError, StoreError, MigrationError,
                          MaintainError)):
        return EXIT_BAD_INPUT
    if isinstance(error, Interrupted):
        return EXIT_INTERRUPTED
    return None


#: the group's help and its options' help, as click shows them (``farebox`` alone renders the
#: group's help outside its context settings: only ``--help`` is named there)
DESCRIPTION = "farebox: a contactless stored-value card terminal (FeliCa Lite-S)."
OPTIONS = (("--version", "Show the version and exit."),
           ("-h, --help", "Show this message and exit."))
OPTIONS_BARE = (OPTIONS[0], ("--help", OPTIONS[1][1]))


@functools.cache
def _group():
    """The click group (click imported here, not when the module is)."""
    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx: click.Context) -> list[str]:
            return list(COMMANDS)

        def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
            if name not in COMMANDS:
                return None
            module, attribute, _ = COMMANDS[name]
            return getattr(importlib.import_module(module), attribute)

        def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            with formatter.section("Commands"):
                formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
                 help=DESCRIPTION)
    @click.version_option(package_name="farebox")
    def cli() -> None:
        pass

    return cli


def __getattr__(name: str):
    if name == "cli":  # ``from farebox.tools.cli import cli``: the click group
        return _group()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def top_help(columns: int, options=OPTIONS) -> str | None:
    """``farebox --help`` (``options``: :data:`OPTIONS`; ``farebox`` alone: :data:`OPTIONS_BARE`)
    as click renders it on a terminal ``columns`` wide, without click; None when that width
    would make click wrap other than here (narrower than 80 columns)."""
    if columns < 80:
        return None
    import textwrap

    width = 78  # click: min(columns, 80) - 2

    def rows(pairs) -> list[str]:
        first = min(max(len(name) for name, _ in pairs), 30) + 2
        lines = []
        for name, text in pairs:
            wrapped = textwrap.wrap(text, max(width - first - 2, 10), replace_whitespace=False)
            lines.append(f"  {name}{' ' * (first - len(name))}{wrapped[0]}")
            lines += [" " * (first + 2) + line for line in wrapped[1:]]
        return lines

    description = textwrap.wrap(DESCRIPTION, width - 2, replace_whitespace=False)
    return "\n".join(["Usage: farebox [OPTIONS] COMMAND [ARGS]...", "",
                      *("  " + line for line in description), "", "Options:", *rows(options),
                      "", "Commands:",
                      *rows([(name, text) for name, (_, _, text) in COMMANDS.items()])])


def _terminal_columns() -> int:
    import shutil

    return shutil.get_terminal_size().columns


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in ([], ["--help"], ["-h"]) and "_FAREBOX_COMPLETE" not in os.environ:
        text = top_help(_terminal_columns(), OPTIONS if args else OPTIONS_BARE)
        if text is not None:
            sys.stdout.write(text + "\n")
            return 0
        if not args:
            cli = _group()
            import click

            click.echo(cli.get_help(click.Context(cli, info_name="farebox")))
            return 0
    import click

    cli = _group()
    from farebox.terminal.failpoints import check_environment

    _state_notes(forget=True)
    try:
        check_environment()
        code = cli.main(args=args, prog_name="farebox", standalone_mode=False)
    except click.exceptions.Exit as done:
        _state_notes()
        return done.exit_code
    except click.ClickException as error:
        message = " ".join(error.format_message().split())
        _error(f"farebox: error: {message}")
        return error.exit_code
    except click.exceptions.Abort:
        _error("farebox: aborted")
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        message = " ".join(str(error).split())
        status = exit_status(error)
        if status is not None:
            _error(f"farebox: error: {message}")
            return status
        if os.environ.get("FAREBOX_DEBUG"):  # the one place that turns a bug into exit 1
            raise
        _error(f"farebox: internal error: {type(error).__name__}: {message} "
               "(set FAREBOX_DEBUG=1 for a traceback)")
        return EXIT_INTERNAL
    _state_notes()
    return code if isinstance(code, int) else 0  # click returns a command's Exit code


def _state_notes(*, forget: bool = False) -> None:
    """Say the state directories the command made where it was given none that existed (a
    mistyped --state), or forget those of an earlier command run in this process."""
    common = sys.modules.get("farebox.tools.common")  # not loaded: no command read settings
    if common is not None:
        common.forget_states() if forget else common.say_made_states()


def _error(line: str) -> None:
    """The one line a failed command says on stderr; under systemd (stderr is the journal's
    stream) it carries priority 3 so that ``journalctl -p err`` finds it."""
    if "JOURNAL_STREAM" in os.environ:
        from farebox.terminal.daemon.jsonlog import writes_to_journal

        if writes_to_journal(sys.stderr):
            line = "<3>" + line
    import click

    click.echo(line, err=True)


if __name__ == "__main__":
    sys.exit(main())
