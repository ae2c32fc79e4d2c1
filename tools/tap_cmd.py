"""``farebox tap`` (a payment) and ``farebox add-value`` (cash reload) on a simulated card file."""

from __future__ import annotations

from pathlib import Path

import click

from farebox.cardimage.money import format_cents as fmt
from farebox.protocol.sim.card import Faults
from farebox.terminal.core.clock import now_utc
from farebox.terminal.core.rules import DEFAULT_MINIMUM_ADD_VALUE_CENTS, Tariff
from farebox.terminal.runtime import card_readers

from farebox.tools import output
from farebox.tools.common import (
    config_option, json_option, settings, state_notice, state_option, terminal,
)
from farebox.tools.params import AMOUNT, FARES, POSITIVE_AMOUNT, TIME

card_argument = click.argument("card_file", metavar="CARD",
                               type=click.Path(dir_okay=False, path_type=Path))
at_option = click.option("--at", type=TIME,
                         help="time of the tap, ISO 8601 with offset [default: now]")
hotlist_option = click.option("--hotlist", type=click.Path(dir_okay=False, path_type=Path),
                              help="action list JSON (lost, aavs_suspended, cancelled cards)")
leave_after_option = click.option(
    "--leave-after", type=click.IntRange(min=0), metavar="N",
    help="simulate a pull-away: the card leaves the field after N card commands")
torn_write_option = click.option(
    "--torn-write", type=click.IntRange(min=1), metavar="N",
    help="simulate a tear: the Nth block write lands half-written and the card leaves")


def _faults(leave_after: int | None, torn_write: int | None) -> Faults | None:
    if leave_after is None and torn_write is None:
        return None
    return Faults(leave_after_commands=leave_after, tear_write_number=torn_write)


@click.command()
@card_argument
@click.option("--fare", type=POSITIVE_AMOUNT, help="flat fare for every class")
@click.option("--fares", type=FARES, help="adult=A,child=C,elder=E,student=S,disability=D")
@at_option
@state_option
@config_option
@hotlist_option
@leave_after_option
@torn_write_option
@json_option
def tap(card_file, fare, fares, at, state_dir, config_file, hotlist, leave_after, torn_write,
        as_json) -> None:
    """Pay a fare with the card in CARD."""
    if fare is not None and fares is not None:
        raise click.UsageError("give exactly one of --fare and --fares")
    config = settings(config_file, state_dir=state_dir, action_list=hotlist,
                      tariff=fares if fares is not None else fare and Tariff.flat(fare))
    if config.tariff is None:
        raise click.UsageError("give exactly one of --fare and --fares (or [fares] in --config)")
    cards = card_readers(faults=_faults(leave_after, torn_write))
    with cards.session(f"sim:{card_file}") as session, \
            terminal(config) as term:
        result = term.pay(session, config.tariff, at or now_utc())
        output.emit(output.tap_json(result, with_fare_class=True), as_json,
                    output.tap_human(result, "fare"))
    state_notice(config)


@click.command("add-value")
@card_argument
@click.option("--amount", type=POSITIVE_AMOUNT, required=True, help="cash to add")
@click.option("--minimum", type=AMOUNT, default=None,
              help="this terminal's smallest add value "
                   f"[default: {fmt(DEFAULT_MINIMUM_ADD_VALUE_CENTS)}]")
@click.option("--again", is_flag=True,
              help="add AMOUNT even though the card's last change is this terminal's add value "
                   "of AMOUNT whose result was never shown (without it, that one is reported as "
                   "the command run again; a cut-off add value is reported first all the same)")
@at_option
@state_option
@config_option
@hotlist_option
@leave_after_option
@torn_write_option
@json_option
def add_value(card_file, amount, minimum, again, at, state_dir, config_file, hotlist,
              leave_after, torn_write, as_json) -> None:
    """Add cash value to the card in CARD. Run again after a crash, an add value the card
    already got from this terminal is reported (completed_from: collect its cash once), not
    added twice."""
    config = settings(config_file, state_dir=state_dir, action_list=hotlist,
                      minimum_add_value_cents=minimum)
    cards = card_readers(faults=_faults(leave_after, torn_write))
    with cards.session(f"sim:{card_file}") as session, \
            terminal(config) as term:
        result = term.add_value(session, amount, at or now_utc(), again=again)
        output.emit(output.tap_json(result, with_fare_class=False), as_json,
                    output.tap_human(result, "add value"))
    state_notice(config)

