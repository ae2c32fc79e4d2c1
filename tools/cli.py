"""The ``farebox`` command. Exit 0 when a command ran (approval or decline), 2 for bad input
(one line on stderr, nothing changed), 1 for internal errors."""

from __future__ import annotations

import os
import sys

import click

from . import card_cmd, demo_cmd, tap_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="farebox")
def cli() -> None:
    """farebox: a contactless stored-value card terminal (FeliCa Lite-S)."""


cli.add_command(card_cmd.card)
cli.add_command(tap_cmd.tap)
cli.add_command(tap_cmd.add_value)
cli.add_command(demo_cmd.demo)


def main(argv: list[str] | None = None) -> int:
    if not (sys.argv[1:] if argv is None else argv):
        click.echo(cli.get_help(click.Context(cli, info_name="farebox")))
        return 0
    try:
        cli.main(args=argv, prog_name="farebox", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        message = " ".join(error.format_message().split())
        click.echo(f"farebox: error: {message}", err=True)
        return error.exit_code
    except click.exceptions.Abort:
        click.echo("farebox: aborted", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the one place that turns a bug into exit 1 without a traceback
        if os.environ.get("FAREBOX_DEBUG"):
            raise
        message = " ".join(str(error).split())
        click.echo(f"farebox: internal error: {type(error).__name__}: {message} "
                   "(set FAREBOX_DEBUG=1 for a traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
