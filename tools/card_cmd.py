"""``farebox card new`` and ``farebox card show``."""

from __future__ import annotations

from pathlib import Path

import click

from farebox.cardimage.errors import InvalidCard
from farebox.cardimage.model import Category, Concession, Kind
from farebox.protocol.errors import FelicaError
from farebox.protocol.session import LiteSSession
from farebox.terminal.clock import hk_date, now_utc
from farebox.terminal.inspect import read_card
from farebox.terminal.issue import IssueError, IssueRequest, issue_card_file
from farebox.terminal.keys import published_test_keys

from . import output
from .common import InputError, json_option, open_reader
from .params import CARD_NUMBER, DATE, POSITIVE_AMOUNT, SIGNED_AMOUNT

_KINDS = {k.label: k for k in Kind}
_CATEGORIES = {c.label: c for c in Category}
_CONCESSIONS = {c.label: c for c in Concession}


@click.group()
def card() -> None:
    """Make and inspect simulated card files."""


@card.command("new")
@click.argument("card_file", metavar="CARD", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--number", type=CARD_NUMBER, help="8-digit card number [default: random]")
@click.option("--kind", type=click.Choice(list(_KINDS)), default="on-loan", show_default=True)
@click.option("--category", type=click.Choice(list(_CATEGORIES)), default="adult", show_default=True)
@click.option("--concession", type=click.Choice(list(_CONCESSIONS)), default="none", show_default=True)
@click.option("--concession-expiry", type=DATE, help="last day a student concession is valid")
@click.option("--issued", type=DATE, help="issue date [default: today, Hong Kong]")
@click.option("--balance", type=SIGNED_AMOUNT,
              help="initial value [default: the category's for On-Loan cards, else 0.00]")
@click.option("--aavs", type=POSITIVE_AMOUNT, help="AAVS reload amount: 150, 250, 500 or 1000")
@click.option("--last-add-value", type=DATE, help="[default: the issue date]")
@click.option("--force", is_flag=True, help="overwrite an existing card file")
@json_option
def new(card_file: Path, number, kind, category, concession, concession_expiry, issued, balance,
        aavs, last_add_value, force, as_json) -> None:
    """Issue a simulated card (test keys) into the file CARD."""
    request = IssueRequest(
        issued=issued or hk_date(now_utc()), number=number, kind=_KINDS[kind],
        category=_CATEGORIES[category], concession=_CONCESSIONS[concession],
        concession_expiry=concession_expiry, balance_cents=balance,
        aavs_reload_cents=aavs or 0, last_add_value=last_add_value)
    try:
        issue_card_file(card_file, request, published_test_keys(), force=force)
    except IssueError as error:
        raise InputError(str(error)) from None
    _show(card_file, as_json)


@card.command("show")
@click.argument("card_file", metavar="CARD", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def show(card_file: Path, as_json: bool) -> None:
    """Read, verify and print the card in CARD (balance, limits, status, history)."""
    _show(card_file, as_json)


def _show(card_file: Path, as_json: bool) -> None:
    keys = published_test_keys()
    reader = open_reader(f"sim:{card_file}", writable=False)
    try:
        image = read_card(LiteSSession(reader), keys)
    except FelicaError as error:
        raise InputError(f"the card does not work with this terminal ({error})") from None
    except InvalidCard as error:
        raise InputError(f"invalid card: {error}") from None
    finally:
        reader.close()
    obj = output.card_json(image, test_key=keys.is_test_version(image.identity.key_version),
                           today=hk_date(now_utc()))
    output.emit(obj, as_json, output.card_human(obj))
