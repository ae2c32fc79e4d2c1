"""``farebox journal list|verify``: what the terminal's journal holds, and whether its hash chain
is whole."""

from __future__ import annotations


import click

from farebox.cardimage.money import format_cents as fmt
from farebox.terminal.cardnumber import format_number
from farebox.terminal.journal import JournalRecord
from farebox.terminal.runtime import open_journal
from farebox.terminal.writestate import IN_DOUBT

from . import output
from .common import config_option, json_option, settings, setup_errors, state_option

#: exit status of ``journal verify`` when the chain is broken (0: whole; 2: bad input)
EXIT_VERIFY_FAILED = 3


@click.group()
def journal() -> None:
    """Inspect the terminal's journal."""


@journal.command("list")
@state_option
@config_option
@json_option
def list_records(state_dir, config_file, as_json) -> None:
    """Every journal record, those whose card write is in doubt first."""
    config = settings(config_file, state_dir=state_dir)
    with setup_errors():
        book = open_journal(config)
    try:
        records = book.records()
        terminal_id = book.terminal_id
    finally:
        book.close()
    records.sort(key=lambda r: (r.write_state not in IN_DOUBT, r.seq))
    in_doubt = sum(r.write_state in IN_DOUBT for r in records)
    obj = {"terminal_id": terminal_id, "records": [_record_json(r) for r in records],
           "in_doubt": in_doubt}
    output.emit(obj, as_json, _human(obj))


@journal.command("verify")
@state_option
@config_option
@json_option
def verify(state_dir, config_file, as_json) -> None:
    """Check the hash chain and the gapless sequence (exit 3 if broken)."""
    config = settings(config_file, state_dir=state_dir)
    with setup_errors():
        book = open_journal(config)
    try:
        check = book.verify_chain()
    finally:
        book.close()
    obj = {"ok": check.ok, "records": check.records, "bad_seq": check.bad_seq,
           "problem": check.problem}
    human = (f"journal chain whole: {check.records} records" if check.ok else
             f"journal chain BROKEN at record {check.bad_seq}: {check.problem}")
    output.emit(obj, as_json, human)
    if not check.ok:
        raise click.exceptions.Exit(EXIT_VERIFY_FAILED)


def _record_json(record: JournalRecord) -> dict:
    return {
        "seq": record.seq, "tap_id": record.tap_id, "card": format_number(record.card_number),
        "type": record.type.value, "amount": fmt(record.amount_cents),
        "balance_before": fmt(record.balance_before_cents),
        "balance_after": fmt(record.balance_after_cents), "at": record.at_utc,
        "counter_before": record.counter_before, "counter_after": record.counter_after,
        "write_state": record.write_state.value, "clock_trusted": record.clock_trusted,
    }


def _human(obj: dict) -> str:
    lines = [f"Terminal {obj['terminal_id']}: {len(obj['records'])} records, "
             f"{obj['in_doubt']} in doubt"]
    for r in obj["records"]:
        flag = "" if r["clock_trusted"] else "  [clock untrusted]"
        lines.append(f"  #{r['seq']:<6} {r['at']}  {r['card']}  {r['type']:<21} {r['amount']:>9}  "
                     f"{r['balance_before']:>9} -> {r['balance_after']:<9} {r['write_state']}{flag}")
    return "\n".join(lines)



