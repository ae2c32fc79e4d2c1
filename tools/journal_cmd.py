"""``farebox journal list|show|verify``: what the terminal's journal holds (each record with its
settlement batch and upload state), one record whole, and whether the journal is whole (its
chains, and its tables against them)."""

from __future__ import annotations


import click

from farebox.cardimage.money import format_cents as fmt
from farebox.terminal.core.cardnumber import format_number
from farebox.terminal.store.journal import JournalRecord
from farebox.terminal.runtime import open_journal
from farebox.terminal.core.writecycle import IN_DOUBT

from farebox.tools import output
from farebox.tools.common import InputError, config_option, json_option, settings, state_option

#: exit status of ``journal verify`` when the journal is broken (0: whole; 2: bad input); any
#: command that meets a damaged journal exits 3 too (tools/cli.py)
EXIT_VERIFY_FAILED = 3


@click.group()
def journal() -> None:
    """Inspect the terminal's journal."""


@journal.command("list")
@state_option
@config_option
@json_option
def list_records(state_dir, config_file, as_json) -> None:
    """Every journal record, those whose card write is in doubt first, with its batch and
    upload state (not batched / batched / acknowledged)."""
    from farebox.terminal.ops.examine import batch_memberships, upload_state

    config = settings(config_file, state_dir=state_dir)
    book = open_journal(config)
    try:
        records = book.records()
        terminal_id = book.terminal_id
        batches = batch_memberships(book)
    finally:
        book.close()
    records.sort(key=lambda r: (r.write_state not in IN_DOUBT, r.seq))
    in_doubt = sum(r.write_state in IN_DOUBT for r in records)
    listed = []
    for record in records:
        memberships = batches.get(record.seq, [])
        listed.append({**_record_json(record),
                       "batch": memberships[-1].batch if memberships else None,
                       "upload": upload_state(memberships)})
    obj = {"terminal_id": terminal_id, "records": listed, "in_doubt": in_doubt,
           "not_uploaded": sum(r["upload"] != "acknowledged" for r in listed)}
    output.emit(obj, as_json, "" if as_json else _human(obj))


@journal.command("show")
@click.argument("key", metavar="SEQ|TAP_ID")
@state_option
@config_option
@json_option
def show(key, state_dir, config_file, as_json) -> None:
    """One record whole: its fields, its hashes, the card write it belongs to (state, expected
    slot bytes, log block) and the batches that carry it."""
    from farebox.terminal.ops.examine import batch_memberships, find_record, upload_state

    config = settings(config_file, state_dir=state_dir)
    book = open_journal(config)
    try:
        record = find_record(book.records(), key)
        if record is None:
            raise InputError(f"no record {key!r} in the journal (give a sequence number or a "
                             "tap id from `farebox journal list`)")
        write = book.write(record.tap_id)
        memberships = batch_memberships(book).get(record.seq, [])
    finally:
        book.close()
    obj = {**_record_json(record), "hash": record.hash, "prev_hash": record.prev_hash,
           "terminal_id": record.terminal_id,
           "write": None if write is None else {
               "kind": write.kind, "state": write.state.value, "idm": write.idm.hex(),
               "created": write.created_utc, "resolved": write.resolved_utc,
               "expected_slot": write.expected_slot.hex(), "log_block": write.log_block,
               "log_data": None if write.log_data is None else write.log_data.hex(),
               "log_confirmed": write.log_confirmed, "outcome": write.outcome},
           "batches": [{"batch": m.batch, "settled_as": m.state, "closed": m.closed_utc,
                        "acknowledged": m.acked_utc} for m in memberships],
           "upload": upload_state(memberships)}
    output.emit(obj, as_json, "" if as_json else _show_human(obj))


@journal.command("verify")
@state_option
@config_option
@json_option
def verify(state_dir, config_file, as_json) -> None:
    """Check the whole journal: the file, the records' hash chain and gapless sequence, the
    chain of write states and card memory, and that the tables agree with it (exit 3 if
    broken)."""
    config = settings(config_file, state_dir=state_dir)
    book = open_journal(config)
    try:
        check = book.verify()
    finally:
        book.close()
    obj = {"ok": check.ok, "records": check.records, "marks": check.marks,
           "bad_seq": check.bad_seq, "table": check.table, "row": check.row,
           "problem": check.problem}
    human = (f"journal chain whole: {check.records} records, {check.marks} chain entries"
             if check.ok else f"journal chain BROKEN at {check.where}: {check.problem}")
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
    from farebox.tools.render import render, table

    rows = [(r["seq"], r["at"], r["card"], r["type"], r["amount"],
             f"{r['balance_before']} -> {r['balance_after']}", r["write_state"]
             + ("" if r["clock_trusted"] else " [clock untrusted]"),
             "" if r["batch"] is None else r["batch"], r["upload"]) for r in obj["records"]]
    head = (f"Terminal {obj['terminal_id']}: {len(obj['records'])} records, "
            f"{obj['in_doubt']} in doubt, {obj['not_uploaded']} not acknowledged by clearing")
    if not rows:
        return head
    return render(head, table(None, ("seq", "at (UTC)", "card", "type", "amount", "balance",
                                     "card write", "batch", "upload"), rows,
                              right=("seq", "amount")))


def _show_human(obj: dict) -> str:
    from farebox.tools.render import render, table

    fields = [(k, obj[k]) for k in ("seq", "tap_id", "terminal_id", "at", "card", "type",
                                    "amount", "balance_before", "balance_after",
                                    "counter_before", "counter_after", "write_state",
                                    "clock_trusted", "hash", "prev_hash", "upload")]
    items = [table(f"Record {obj['seq']}", ("field", "value"), fields)]
    if obj["write"]:
        items.append(table("Card write", ("field", "value"),
                           [(k, v) for k, v in obj["write"].items() if k != "outcome"]))
    if obj["batches"]:
        items.append(table("Batches", ("batch", "settled as", "closed", "acknowledged"),
                           [(b["batch"], b["settled_as"], b["closed"], b["acknowledged"] or "no")
                            for b in obj["batches"]]))
    return render(*items)
