"""``farebox terminal init``: the terminal's identity (its id, signing key and incarnation)."""

from __future__ import annotations

import click

from farebox.terminal.core.clock import now_utc
from farebox.terminal.runtime import init_terminal
from farebox.terminal.runtime import state_dir as state_directory

from farebox.tools import output
from farebox.tools.common import config_option, json_option, settings, state_option


@click.group()
def terminal() -> None:
    """The terminal's identity."""


@terminal.command("init")
@state_option
@config_option
@click.option("--id", "terminal_id", required=True, metavar="ID",
              help="the terminal's id (1-32 letters, digits, '.', '_', '-')")
@json_option
def init(state_dir, config_file, terminal_id, as_json) -> None:
    """Create the terminal's Ed25519 signing key and incarnation in its state directory and print
    the public key (enroll it at the clearing house). Refuses a state that already has one."""
    config = settings(config_file, state_dir=state_dir)
    identity = init_terminal(config, terminal_id, now_utc())
    obj = {"terminal_id": identity.terminal_id, "incarnation": identity.incarnation,
           "public_key": identity.public_key.hex(), "state": str(state_directory(config))}
    output.emit(obj, as_json, f"terminal {identity.terminal_id} (incarnation "
                f"{identity.incarnation}) in {obj['state']}\npublic key {obj['public_key']}")
