"""``farebox tap`` (a payment) and ``farebox add-value`` (cash reload) on a simulated card file."""

from __future__ import annotations

from pathlib import Path

import click

from farebox.protocol.errors import FelicaError
from farebox.cardimage.money import format_cents as fmt
from farebox.terminal.clock import now_utc
from farebox.terminal.rules import DEFAULT_MINIMUM_ADD_VALUE_CENTS, Tariff
from farebox.terminal.tap import TapInterrupted

from . import output
from .common import InputError, json_option, open_card, session_for, state_option, terminal
from .params import AMOUNT, FARES, POSITIVE_AMOUNT, TIME

card_argument = click.argument("card_file", metavar="CARD",
                               type=click.Path(dir_okay=False, path_type=Path))
at_option = click.option("--at", type=TIME, help="time of the tap, ISO 8601 with offset [default: now]")
hotlist_option = click.option("--hotlist", type=click.Path(dir_okay=False, path_type=Path),
                              help="action list JSON (lost, aavs_suspended, cancelled cards)")


@click.command()
@card_argument
@click.option("--fare", type=POSITIVE_AMOUNT, help="flat fare for every class")
@click.option("--fares", type=FARES, help="adult=A,child=C,elder=E,student=S,disability=D")
@at_option
@state_option
@hotlist_option
@json_option
def tap(card_file, fare, fares, at, state_dir, hotlist, as_json) -> None:
    """Pay a fare with the card in CARD."""
    if (fare is None) == (fares is None):
        raise click.UsageError("give exactly one of --fare and --fares")
    tariff = fares if fares is not None else Tariff.flat(fare)
    card = open_card(card_file)
    with terminal(state_dir, hotlist) as term:
        result = _run(card_file, lambda: term.pay(session_for(card), tariff, at or now_utc()))
    output.emit(output.tap_json(result, with_fare_class=True), as_json,
                output.tap_human(result, "fare"))


@click.command("add-value")
@card_argument
@click.option("--amount", type=POSITIVE_AMOUNT, required=True, help="cash to add")
@click.option("--minimum", type=AMOUNT, default=fmt(DEFAULT_MINIMUM_ADD_VALUE_CENTS),
              show_default=True, help="this terminal's smallest add value")
@at_option
@state_option
@hotlist_option
@json_option
def add_value(card_file, amount, minimum, at, state_dir, hotlist, as_json) -> None:
    """Add cash value to the card in CARD."""
    card = open_card(card_file)
    with terminal(state_dir, hotlist, minimum_add_value_cents=minimum) as term:
        result = _run(card_file, lambda: term.add_value(session_for(card), amount, at or now_utc()))
    output.emit(output.tap_json(result, with_fare_class=False), as_json,
                output.tap_human(result, "add value"))


def _run(card_file: Path, transaction):
    try:
        return transaction()
    except TapInterrupted as error:  # the journal holds the write in doubt: exit 1
        raise click.ClickException(str(error)) from None
    except FelicaError as error:  # before anything was written: this card file is unusable
        raise InputError(f"{card_file}: the card does not work with this terminal ({error})") from None
