"""``farebox octopus balance``: the read-only balance of a real Octopus card or of a dump."""

from __future__ import annotations

from pathlib import Path

import click

from farebox.cardimage.money import format_cents as fmt
from farebox.protocol.errors import FelicaError
from farebox.terminal.core.clock import now_utc, utc_iso

from farebox.tools import output
from farebox.tools.common import (
    InputError, json_option, open_reader, reader_timeout_option, verbose_option,
)
from farebox.tools.params import ANY_TIME


@click.group()
def octopus() -> None:
    """Read real Octopus cards (read-only)."""


@octopus.command("balance")
@click.argument("dump_file", metavar="DUMP", required=False,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reader", metavar="SPEC", help="read the card presented to this reader")
@click.option("--at", "at", type=ANY_TIME,
              help="when the card was scanned (ISO 8601 with offset) [default: the dump's scan "
                   "time, else now]")
@click.option("--offset", "forced_offset", type=click.IntRange(min=0, max=100_000),
              help="force the offset (HK$0.10 units) instead of the decoders' date rule")
@reader_timeout_option
@verbose_option
@json_option
def balance(dump_file: Path | None, reader: str | None, at, forced_offset, timeout_s: float,
            as_json: bool) -> None:
    """The balance in system 0x8008, service 0x0117, block 0 of a card on --reader or in DUMP
    (Metrodroid/FareBot JSON, Flipper .nfc, or a farebox card file), with the offset rule used,
    and the other reading when the scan date is ambiguous."""
    from farebox.terminal.ops import octopus as octo
    from farebox.terminal.ops.dumps import load_dump

    if (dump_file is None) == (reader is None):
        raise InputError("give a DUMP file or --reader SPEC (one of them)")
    if reader is not None:
        device = open_reader(reader, writable=False)
        try:
            result = octo.read_from_reader(
                device, at or now_utc(), timeout_s=timeout_s, forced_offset=forced_offset,
                source=octo.SCAN_TIME_READ_NOW if at is None else octo.SCAN_TIME_FROM_FLAG)
        except FelicaError as error:
            raise InputError(f"the card stopped answering ({error}); hold it still and "
                             "retry") from None
        finally:
            device.close()
        source = reader
    else:
        dumped = load_dump(dump_file)
        block = dumped.block(octo.SYSTEM_CODE_OCTOPUS, octo.SERVICE_OCTOPUS_BALANCE, 0)
        if block is None:
            raise InputError(f"{dump_file}: no Octopus purse (system 8008, service 0117, "
                             f"block 0) in this {dumped.source_format} dump")
        if at is not None:
            scanned_at, how = at, octo.SCAN_TIME_FROM_FLAG
        elif dumped.scanned_at is not None:
            scanned_at, how = dumped.scanned_at, octo.SCAN_TIME_FROM_DUMP
        else:
            scanned_at, how = now_utc(), octo.SCAN_TIME_ASSUMED_NOW
        shenzhen = dumped.block(octo.SYSTEM_CODE_SHENZHEN_TONG,
                                octo.SERVICE_SHENZHEN_TONG_BALANCE, 0)
        result = octo.reading(block, scanned_at, how, forced_offset=forced_offset,
                              idm=dumped.idm, shenzhen_block=shenzhen)
        source = f"{dump_file} ({dumped.source_format})"
    obj = {
        "balance": fmt(result.balance_cents),
        "raw": result.raw,
        "offset": result.offset,
        "scanned_at": utc_iso(result.scanned_at),
        "scan_time_source": result.scan_time_source,
        "offset_rule": result.offset_rule,
        "ambiguous": result.other is not None,
        "ambiguous_because": result.ambiguous_because,
        "other": None if result.other is None else {
            "offset": result.other.offset, "balance": fmt(result.other.balance_cents)},
        "shenzhen_tong_balance": (None if result.shenzhen_tong_cents is None
                                  else fmt(result.shenzhen_tong_cents)),
        "idm": None if result.idm is None else result.idm.hex(),
        "source": source,
    }
    output.emit(obj, as_json, _human(obj))


def _human(obj: dict) -> str:
    lines = [f"Octopus balance HK${obj['balance']}  (raw {obj['raw']} - offset {obj['offset']}, "
             "in HK$0.10)",
             f"  {obj['offset_rule']}",
             f"  scanned {obj['scanned_at']} ({obj['scan_time_source']})  from {obj['source']}"]
    if obj["other"]:
        lines.append(f"  AMBIGUOUS: {obj['ambiguous_because']}; with offset "
                     f"{obj['other']['offset']} it reads HK${obj['other']['balance']}")
    if obj["shenzhen_tong_balance"] is not None:
        lines.append(f"  Shenzhen Tong purse: CN¥{obj['shenzhen_tong_balance']}")
    return "\n".join(lines)
