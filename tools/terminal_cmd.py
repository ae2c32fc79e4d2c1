"""``farebox terminal init``: the terminal's identity (its id, signing key and incarnation);
``farebox terminal clock reset``: an operator's reset of its time high-water mark."""

from __future__ import annotations

import click

from farebox.terminal.core.clock import now_utc, utc_iso
from farebox.terminal.runtime import init_terminal, open_journal
from farebox.terminal.runtime import state_dir as state_directory

from farebox.tools import output
from farebox.tools.common import InputError, config_option, json_option, settings, state_option
from farebox.tools.params import TIME


@click.group()
def terminal() -> None:
    """The terminal's identity and its clock."""


@terminal.command("init")
@state_option
@config_option
@click.option("--id", "terminal_id", required=True, metavar="ID",
              help="the terminal's id (1-32 letters, digits, '.', '_', '-')")
@json_option
def init(state_dir, config_file, terminal_id, as_json) -> None:
    """Create the terminal's Ed25519 signing key and incarnation in its state directory and print
    the public key (enroll it at the clearing house). Refuses a state that already has one."""
    config = settings(config_file, state_dir=state_dir, makes_state=True)
    identity = init_terminal(config, terminal_id, now_utc())
    obj = {"terminal_id": identity.terminal_id, "incarnation": identity.incarnation,
           "public_key": identity.public_key.hex(), "state": str(state_directory(config))}
    output.emit(obj, as_json, f"terminal {identity.terminal_id} (incarnation "
                f"{identity.incarnation}) in {obj['state']}\npublic key {obj['public_key']}")


@terminal.group("clock")
def clock() -> None:
    """The terminal's trusted time (its high-water mark)."""


@clock.command("reset")
@click.option("--reason", required=True, metavar="TEXT",
              help="why the mark is reset (kept in the journal with the clock_reset record)")
@click.option("--at", type=TIME, help="the correct time now, ISO 8601 with offset [default: now]")
@state_option
@config_option
@json_option
def clock_reset(reason, at, state_dir, config_file, as_json) -> None:
    """Set the terminal's time high-water mark to the correct time (a wrong clock's reading
    moved it on): journals a clock_reset record (amount 0) that rides in the next batch, and the
    next tap at a correct time is trusted again. Restart a running daemon afterwards."""
    if not reason.strip():
        raise InputError("--reason must say why the clock is reset")
    config = settings(config_file, state_dir=state_dir)
    at = at or now_utc()
    journal = open_journal(config)
    try:
        previous = journal.time_high_water()
        record = journal.reset_clock(at, reason)
    finally:
        journal.close()
    obj = {"seq": record.seq, "at": record.at_utc, "reason": reason.strip(),
           "previous_high_water": None if previous is None else utc_iso(previous),
           "high_water": record.at_utc}
    output.emit(obj, as_json, f"clock reset: the high-water mark is now {record.at_utc} "
                f"(was {obj['previous_high_water'] or 'none'}); record #{record.seq}")
