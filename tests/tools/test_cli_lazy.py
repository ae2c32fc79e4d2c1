"""``farebox``, ``farebox --help`` and ``-h`` print the top-level help without importing click
(or any command): the same text click renders, at any terminal width (narrower than 80 columns
click renders it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from farebox.tools.cli import OPTIONS, OPTIONS_BARE, top_help

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "farebox")

CLICK_HELP = """
import click, sys
from farebox.tools.cli import cli
if sys.argv[1:]:
    try:
        cli.main(args=sys.argv[1:], prog_name="farebox", standalone_mode=False)
    except click.exceptions.Exit:
        pass
else:  # what `farebox` alone printed: the group's help outside its context settings
    click.echo(cli.get_help(click.Context(cli, info_name="farebox")))
"""


def run(argv, columns, *, script=True):
    env = {**os.environ, "COLUMNS": str(columns)}
    command = [CONSOLE_SCRIPT, *argv] if script else [sys.executable, "-c", CLICK_HELP, *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("columns", [60, 79, 80, 81, 120, 300])
@pytest.mark.parametrize("argv", [["--help"], ["-h"], []], ids=["--help", "-h", "none"])
def test_the_help_is_what_click_renders(argv, columns):
    assert run(argv, columns) == run(argv, columns, script=False)


def test_the_help_imports_neither_click_nor_a_command():
    probe = ("import sys; from farebox.tools.cli import main; main(['--help']); "
             "loaded = [m for m in sys.modules if m == 'click' or m.startswith('click.') "
             "or m.startswith('farebox.tools.') and m != 'farebox.tools.cli' "
             "or m.startswith('farebox.terminal')]; "
             "sys.stderr.write(repr(loaded)); sys.exit(bool(loaded))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100"}, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_narrow_terminal_is_left_to_click():
    assert top_help(79) is None and top_help(79, OPTIONS_BARE) is None
    assert top_help(80, OPTIONS).startswith("Usage: farebox [OPTIONS] COMMAND [ARGS]...\n")
