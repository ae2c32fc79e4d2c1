"""``farebox actions fetch``: take the clearing house's signed action list."""

from __future__ import annotations

import click

from farebox.terminal.core.clock import now_utc
from farebox.terminal.runtime import fetch_action_list

from farebox.tools import output
from farebox.tools.common import config_option, json_option, settings, state_option


@click.group()
def actions() -> None:
    """The clearing house's action list (lost, AAVS-suspended, cancelled cards)."""


@actions.command("fetch")
@state_option
@config_option
@click.option("--url", help="the clearing house [default: clearing_url in --config]")
@json_option
def fetch(state_dir, config_file, url, as_json) -> None:
    """Fetch the signed action list, verify it with clearing_public_key, refuse an expired list,
    one issued in the future or one whose serial goes back or jumps too far, and keep it with
    its key: every later tap applies it, with or without --config."""
    config = settings(config_file, state_dir=state_dir)
    fetched, changed = fetch_action_list(config, url, now_utc())
    obj = {"serial": fetched.serial, "entries": len(fetched.entries),
           "expires": fetched.expires_utc, "changed": changed}
    output.emit(obj, as_json, f"action list serial {fetched.serial}: {len(fetched.entries)} "
                f"entries, valid until {fetched.expires_utc}"
                + ("" if changed else " (unchanged)"))
