"""``farebox card new|show|dump|import|diff``: make a simulated card, look at a card (file or
reader) slot by slot, read a presented card into a card file, turn a shared dump into one, and
compare two. The work is in ``farebox.terminal`` (issue, operator, dumps)."""

from __future__ import annotations

from pathlib import Path

import click

from farebox.cardimage.model import Category, Concession, Kind
from farebox.protocol.errors import FelicaError
from farebox.terminal.core.clock import hk_date, now_utc
from farebox.terminal.card.issue import IssueError, IssueRequest, blank_card_file, issue_card_file
from farebox.terminal.card.keys import published_test_keys

from farebox.tools import output
from farebox.tools.common import (
    InputError, config_option, json_option, open_reader, reader_timeout_option, settings,
    verbose_option,
)
from farebox.tools.params import CARD_NUMBER, DATE, POSITIVE_AMOUNT, SIGNED_AMOUNT

_KINDS = {k.label: k for k in Kind}
_CATEGORIES = {c.label: c for c in Category}
_CONCESSIONS = {c.label: c for c in Concession}


@click.group()
def card() -> None:
    """Make, inspect, dump, import and compare cards."""


@card.command("new")
@click.argument("card_file", metavar="CARD", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--number", type=CARD_NUMBER, help="8-digit card number [default: random]")
@click.option("--kind", type=click.Choice(list(_KINDS)), default="on-loan", show_default=True)
@click.option("--category", type=click.Choice(list(_CATEGORIES)), default="adult",
              show_default=True)
@click.option("--concession", type=click.Choice(list(_CONCESSIONS)), default="none",
              show_default=True)
@click.option("--concession-expiry", type=DATE, help="last day a student concession is valid")
@click.option("--birth-date", type=DATE, help="the holder's date of birth (Personalised cards)")
@click.option("--issued", type=DATE, help="issue date [default: today, Hong Kong]")
@click.option("--balance", type=SIGNED_AMOUNT,
              help="initial value [default: the category's for On-Loan cards, else 0.00]")
@click.option("--aavs", type=POSITIVE_AMOUNT, help="AAVS reload amount: 150, 250, 500 or 1000")
@click.option("--last-add-value", type=DATE, help="[default: the issue date]")
@click.option("--force", is_flag=True, help="overwrite an existing card file")
@json_option
def new(card_file: Path, number, kind, category, concession, concession_expiry, birth_date,
        issued, balance, aavs, last_add_value, force, as_json) -> None:
    """Issue a simulated card (test keys) into the file CARD."""
    request = IssueRequest(
        issued=issued or hk_date(now_utc()), number=number, kind=_KINDS[kind],
        category=_CATEGORIES[category], concession=_CONCESSIONS[concession],
        concession_expiry=concession_expiry, balance_cents=balance,
        aavs_reload_cents=aavs or 0, last_add_value=last_add_value, birth_date=birth_date)
    try:
        issue_card_file(card_file, request, published_test_keys(), force=force)
    except IssueError as error:
        raise InputError(str(error)) from None
    _show(f"sim:{card_file}", published_test_keys(), as_json, detailed=False)


@card.command("blank")
@click.argument("card_file", metavar="CARD", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="overwrite an existing card file")
@json_option
def blank(card_file: Path, force: bool, as_json: bool) -> None:
    """A blank FeliCa Lite-S card (new IDm, all blocks zero) into the file CARD: a card out of
    the box, for `farebox service issue --reader` (serve it with `farebox sim serve`)."""
    try:
        idm = blank_card_file(card_file, force=force)
    except IssueError as error:
        raise InputError(str(error)) from None
    output.emit({"file": str(card_file), "idm": idm.hex(), "blank": True}, as_json,
                f"BLANK card {idm.hex()} -> {card_file}")


@card.command("show")
@click.argument("card_file", metavar="CARD", required=False,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reader", metavar="SPEC", help="read the card presented to this reader instead "
              "(udp:HOST:PORT, usb[:VID:PID], tty:..., pcsc[:NAME])")
@reader_timeout_option
@verbose_option
@config_option
@json_option
def show(card_file: Path | None, reader: str | None, timeout_s: float, config_file,
         as_json: bool) -> None:
    """Read, verify and print the card in CARD or on a reader: fields, both purse slots with
    their counters and MAC status, which slot is current and why, the log ring as history."""
    if (card_file is None) == (reader is None):
        raise InputError("give a card file CARD or --reader SPEC (one of them)")
    # a card file is a simulated card (test keys) unless a configuration names the keys
    keys = _keys(config_file) if reader is not None or config_file else published_test_keys()
    _show(f"sim:{card_file}" if card_file is not None else reader, keys, as_json, timeout_s)


def _keys(config_file):
    from farebox.terminal.runtime import load_keys

    return load_keys(settings(config_file))


def _read_blocks(spec: str, timeout_s: float) -> tuple[bytes, list[bytes], str]:
    from farebox.terminal.card.present import NoCard, is_card_file
    from farebox.terminal.ops.examine import read_card_blocks
    from farebox.terminal.runtime import card_readers

    try:
        with card_readers(wait_s=timeout_s).session(spec, look=True) as session:
            return session.idm, read_card_blocks(session), session.transport.name
    except NoCard:
        if not is_card_file(spec):
            raise
        raise InputError("the card does not work with this terminal (not a FeliCa Lite-S "
                         "card; for an Octopus dump try farebox octopus balance)") from None


def _show(spec: str, keys, as_json: bool, timeout_s: float = 0.0, *,
          detailed: bool = True) -> None:
    from farebox.terminal.ops.examine import examine

    idm, blocks, source = _read_blocks(spec, timeout_s)
    report = examine(idm, blocks, keys)
    if report.image is None:
        slots = "; ".join(f"slot {s.slot} MAC {s.state}"
                          + (f" counter {s.purse.counter}" if s.purse else "")
                          for s in report.slots)
        raise InputError(f"invalid card: {report.problem}"
                         + (f" (identity MAC {report.identity_state}; {slots})" if slots else ""))
    image = report.image
    obj = output.card_json(image, test_key=keys.is_test_version(image.identity.key_version),
                           today=hk_date(now_utc()))
    obj.update(output.card_report_json(report))
    obj["source"] = source
    human = "" if as_json else (output.card_report_human(obj) if detailed
                                else output.card_human(obj))
    output.emit(obj, as_json, human)


@card.command("dump")
@click.option("--reader", required=True, metavar="SPEC",
              help="the reader the card is on (udp:HOST:PORT, usb[:VID:PID], pcsc[:NAME], ...)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="write the card file here (servable by `farebox sim serve`)")
@click.option("--force", is_flag=True, help="replace an existing --out file")
@reader_timeout_option
@verbose_option
@json_option
def dump(reader: str, out: Path | None, force: bool, timeout_s: float, as_json: bool) -> None:
    """Read a presented card into a simulated-card file: a scheme (Lite-S) card's 14 blocks;
    another FeliCa card's system codes, services and every key-less block."""
    from farebox.terminal.ops.dumps import DumpError, dump_from_reader, dump_json, save_card_json
    from farebox.terminal.ops.dumps import to_card_json

    device = open_reader(reader, writable=False)
    try:
        dumped = dump_from_reader(device, now_utc(), timeout_s=timeout_s)
    except DumpError as error:
        raise InputError(str(error)) from None
    except FelicaError as error:
        raise InputError(f"the card stopped answering ({error}); hold it still and retry"
                         ) from None
    finally:
        device.close()
    try:
        card_obj = to_card_json(dumped)
        if out is not None:
            save_card_json(card_obj, out, force=force)
    except DumpError as error:
        raise InputError(str(error)) from None
    obj = {**dump_json(dumped), "out": None if out is None else str(out), "card": card_obj}
    output.emit(obj, as_json, "" if as_json else output.dump_human(obj))


@card.command("import")
@click.argument("dump_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the card file to write")
@click.option("--force", is_flag=True, help="replace an existing --out file")
@json_option
def import_dump(dump_file: Path, out: Path, force: bool, as_json: bool) -> None:
    """Turn a shared dump (Flipper Zero .nfc FeliCa, Metrodroid or FareBot JSON) into a card
    file that `farebox sim serve` can present. A FeliCa Lite-S dump becomes a writable Lite-S
    card; anything else (an Octopus card) a read-only FeliCa Standard card holding the dump's
    key-less blocks: `farebox octopus balance` reads it, a tap cannot (it has no scheme data)."""
    from farebox.terminal.ops.dumps import DumpError, dump_json, load_dump, save_card_json
    from farebox.terminal.ops.dumps import to_card_json

    try:
        dumped = load_dump(dump_file)
        card_obj = to_card_json(dumped)
        save_card_json(card_obj, out, force=force)
    except DumpError as error:
        raise InputError(str(error)) from None
    kind = "lite-s" if "blocks" in card_obj else "felica-standard"
    obj = {**dump_json(dumped), "out": str(out), "card_kind": kind}
    output.emit(obj, as_json, "" if as_json else output.dump_human(obj))


@card.command("diff")
@click.argument("card_a", metavar="A", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("card_b", metavar="B", type=click.Path(dir_okay=False, path_type=Path))
@config_option
@json_option
def diff(card_a: Path, card_b: Path, config_file, as_json: bool) -> None:
    """Field-level (decoded) and block-level (hex) differences between two card files, e.g. a
    dump before and after a disputed tap (exit 0 either way; ``same`` says whether they
    differ). Test keys unless --config names a key file."""
    from farebox.protocol.sim.card import CardFileError, SimulatedLiteS
    from farebox.protocol.sim.cardfile import load_card
    from farebox.terminal.ops.examine import block_diffs, examine, field_diffs

    keys = _keys(config_file) if config_file else published_test_keys()
    cards, decoded = [], []
    for path in (card_a, card_b):
        try:
            card_model = load_card(path)
        except CardFileError as error:
            raise InputError(str(error)) from None
        if not isinstance(card_model, SimulatedLiteS):
            raise InputError(f"{path}: a FeliCa Standard dump, not a scheme card (compare "
                             "their `octopus balance` instead)")
        cards.append(card_model)
        report = examine(card_model.idm, card_model.blocks, keys)
        if report.image is None:
            decoded.append({"invalid": report.problem})
        else:
            obj = output.card_json(report.image, test_key=keys.is_test_version(
                report.image.identity.key_version), today=hk_date(now_utc()))
            obj.update(output.card_report_json(report))
            obj.pop("blocks")
            decoded.append(obj)
    a, b = cards
    fields = field_diffs(decoded[0], decoded[1])
    blocks = block_diffs(a.blocks, b.blocks)
    obj = {
        "a": str(card_a), "b": str(card_b),
        "same": not fields and not blocks and a.idm == b.idm,
        "idm": None if a.idm == b.idm else {"a": a.idm.hex(), "b": b.idm.hex()},
        "fields": [{"field": f.field, "a": f.a, "b": f.b} for f in fields],
        "blocks": [{"block": d.block, "area": d.area, "a": d.a.hex(), "b": d.b.hex(),
                    "bytes": d.changed_bytes} for d in blocks],
    }
    output.emit(obj, as_json, "" if as_json else output.diff_human(obj))
