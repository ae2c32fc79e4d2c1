"""How results look: one JSON object per result with --json, a short human summary otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from farebox.cardimage.model import CardImage
from farebox.cardimage.money import format_cents as fmt
from farebox.terminal.core.cardnumber import format_number
from farebox.terminal.ops.cardview import history, limits
from farebox.terminal.card.receipt import tap_fields, tap_summary


def emit(obj: dict, as_json: bool, human: str) -> None:
    """Print a result. A result is printed after it has happened (a payment is on the card and in
    the journal), so an output that fails (closed pipe, full disk) is said on stderr and the
    command still succeeds."""
    text = json.dumps(obj, ensure_ascii=False) if as_json else human
    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError as error:
        _drop_stdout()
        with contextlib.suppress(OSError):
            click.echo(f"farebox: warning: the result could not be printed ({error.strerror or error})",
                       err=True)


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _money(cents: int | None) -> str | None:
    return None if cents is None else fmt(cents)


def _day(value) -> str | None:
    return None if value is None else value.isoformat()


#: a tap's record and one-line summary (the daemon prints the same: defined once, in terminal)
tap_json = tap_fields
tap_human = tap_summary


def _history(card: CardImage) -> list[dict]:
    return [{
        "counter": line.entry.counter, "type": line.entry.type.label,
        "date": line.entry.day.isoformat(), "amount": fmt(line.entry.amount_cents),
        "aavs_reload": fmt(line.entry.aavs_reload_cents) if line.entry.aavs_reload_cents else None,
        "status": line.entry.new_status.label if line.entry.new_status is not None else None,
        "operation": line.entry.operation.label if line.entry.operation is not None else None,
        "balance_after": _money(line.balance_after_cents),
    } for line in history(card)]


def card_json(card: CardImage, *, test_key: bool, today) -> dict:
    identity, purse = card.identity, card.purse
    card_limits = limits(card, today)
    return {
        "number": format_number(identity.card_number),
        "kind": identity.kind.label,
        "category": identity.category.label,
        "concession": purse.concession.label,
        "concession_expiry": _day(purse.concession_expiry),
        "issued": identity.issued.isoformat(),
        "birth_date": _day(identity.birth_date),
        "status": purse.status.label,
        "balance": fmt(purse.balance_cents),
        "negative_limit": fmt(card_limits.negative_limit_cents),
        "stored_value_limit": fmt(card_limits.stored_value_limit_cents),
        "last_add_value": purse.last_add_value.isoformat(),
        "aavs": {"enabled": purse.aavs_enabled,
                 "amount": fmt(purse.aavs_reload_cents) if purse.aavs_enabled else None,
                 "last_reload": _day(purse.last_auto_reload)},
        "counter": purse.counter,
        "history": _history(card),
        "fare_class": card_limits.fare_class.value,
        "deposit": fmt(identity.deposit_cents),
        "last_payment": _day(purse.last_payment),
        "payment_count": purse.payment_count,
        "aavs_ever_enabled": purse.aavs_ever_enabled,
        "aavs_released": purse.aavs_released,
        "idm": card.idm.hex(),
        "key_version": identity.key_version,
        "test_key": test_key,
        "purse_slot": card.purse_slot,
        "unreadable_log_blocks": card.unreadable_log_blocks,
    }


def card_human(obj: dict) -> str:
    aavs = obj["aavs"]
    lines = [
        f"Card {obj['number']}  {obj['kind']} {obj['category']}  status {obj['status']}"
        + ("  [TEST KEY: not a real card]" if obj["test_key"] else ""),
        f"  balance {obj['balance']}  (negative limit {obj['negative_limit']}, "
        f"stored value limit {obj['stored_value_limit']})",
        f"  issued {obj['issued']}  deposit {obj['deposit']}  "
        f"last add value {obj['last_add_value']}"
        + (f"  holder born {obj['birth_date']}" if obj["birth_date"] else ""),
        f"  concession {obj['concession']}"
        + (f" until {obj['concession_expiry']}" if obj["concession_expiry"] else "")
        + f"  fare class today {obj['fare_class']}",
        "  AAVS " + (f"{aavs['amount']} (last reload {aavs['last_reload'] or 'never'})"
                     if aavs["enabled"] else "off"),
        f"  counter {obj['counter']}  payments {obj['payment_count']}  IDm {obj['idm']}",
        "  history (newest first):",
    ]
    for entry in obj["history"]:
        extra = ""
        if entry["aavs_reload"]:
            extra = f" (with auto add value {entry['aavs_reload']})"
        elif entry["status"]:
            extra = f" -> {entry['status']}"
        elif entry["operation"]:
            extra = f" ({entry['operation']})"
        after = f"  balance {entry['balance_after']}" if entry["balance_after"] else ""
        lines.append(f"    #{entry['counter']:<4} {entry['date']}  {entry['type']:<9} "
                     f"{entry['amount']:>9}{extra}{after}")
    if obj["unreadable_log_blocks"]:
        lines.append(f"    ({obj['unreadable_log_blocks']} log block(s) do not verify)")
    return "\n".join(lines)


# ---- the operator commands (card show's block-level report, dump, diff) -----------------------

def card_report_json(report) -> dict:
    """Keys ``card show --json`` adds to the contract's: both slots with their MAC status, the
    current slot and why, each log block's MAC status, the raw blocks."""
    return {
        "identity_mac": report.identity_state,
        "slots": [{
            "slot": s.slot, "blocks": list(s.blocks), "mac": s.state,
            "counter": None if s.purse is None else s.purse.counter,
            "balance": None if s.purse is None else fmt(s.purse.balance_cents),
            "status": None if s.purse is None else s.purse.status.label,
            "problem": s.problem, "current": s.slot == report.current_slot,
        } for s in report.slots],
        "current_slot_reason": report.current_slot_reason,
        "log_blocks": [{"block": b.block, "mac": b.state} for b in report.log_blocks],
        "blocks": [block.hex() for block in report.blocks],
    }


def card_report_human(obj: dict) -> str:
    from farebox.terminal.ops.examine import BLOCK_AREAS

    from farebox.tools.render import hexdump, render, table

    head = card_human({**obj, "history": [], "unreadable_log_blocks": 0}).rsplit("\n", 1)[0]
    head += f"\n  read from {obj['source']}"
    slots = table("Purse slots", ("slot", "blocks", "MAC", "counter", "balance", "status",
                                  "current"),
                  [(s["slot"], " ".join(f"{b:02X}" for b in s["blocks"]), s["mac"], s["counter"],
                    s["balance"], s["status"] or s["problem"], "yes" if s["current"] else "")
                   for s in obj["slots"]], right=("counter", "balance"))
    reason = f"Current slot {obj['purse_slot']}: {obj['current_slot_reason']}"
    history = table("History (log ring, newest first)",
                    ("counter", "date", "type", "amount", "auto add value", "status",
                     "balance after"),
                    [(h["counter"], h["date"], h["type"], h["amount"], h["aavs_reload"],
                      h["status"], h["balance_after"] or "?") for h in obj["history"]],
                    right=("amount", "balance after"))
    log_state = {b["block"]: b["mac"] for b in obj["log_blocks"]}
    dump = hexdump("Blocks", [(f"{n:02X}", bytes.fromhex(h),
                               BLOCK_AREAS.get(n, "") + _log_note(log_state.get(n)))
                              for n, h in enumerate(obj["blocks"])])
    items = [head, slots, reason, history]
    if obj["unreadable_log_blocks"]:
        items.append(f"({obj['unreadable_log_blocks']} log block(s) do not verify)")
    items.append(dump)
    return render(*items)


def _log_note(state: str | None) -> str:
    return "" if state is None else " (empty)" if state == "empty" else f" (MAC {state})"


def dump_human(obj: dict) -> str:
    from farebox.tools.render import hexdump, render, table

    lines = [f"FeliCa card IDm {obj['idm']}  PMm {obj['pmm']}  ({obj['format']}"
             + (f", scanned {obj['scanned_at']}" if obj["scanned_at"] else "") + ")"]
    rows = []
    for system in obj["systems"]:
        for service, count in system["services"].items() or [("-", 0)]:
            rows.append((system["system_code"], system["idm"], service, count))
    items = [lines[0], table("Systems and services", ("system", "IDm", "service", "blocks"), rows,
                             right=("blocks",))]
    card = obj.get("card")
    if card and "blocks" in card:
        items.append(hexdump("Blocks", [(f"{n:02X}", bytes.fromhex(h), "")
                                        for n, h in enumerate(card["blocks"])]))
    elif card:
        blocks = []
        for code, system in card["systems"].items():
            for service, data in system["services"].items():
                blocks += [(f"{code}/{service}/{n:02X}", bytes.fromhex(h), "")
                           for n, h in enumerate(data)]
        items.append(hexdump("Blocks (system/service/block)", blocks))
    for note in obj["notes"]:
        items.append(f"note: {note}")
    if obj.get("out"):
        items.append(f"card file written: {obj['out']}"
                     + (f" ({obj['card_kind']})" if obj.get("card_kind") else ""))
    return render(*items)


def diff_human(obj: dict) -> str:
    from farebox.tools.render import hex_line, render, table

    if obj["same"]:
        return f"{obj['a']} and {obj['b']} hold the same card image"
    items = [f"{obj['a']} (a) -> {obj['b']} (b)"]
    if obj["idm"]:
        items.append(f"IDm differs: {obj['idm']['a']} -> {obj['idm']['b']}")
    if obj["fields"]:
        items.append(table("Fields", ("field", "a", "b"),
                           [(f["field"], json.dumps(f["a"]), json.dumps(f["b"]))
                            for f in obj["fields"]]))
    if obj["blocks"]:
        rows = []
        for d in obj["blocks"]:
            a, b = bytes.fromhex(d["a"]), bytes.fromhex(d["b"])
            rows.append((f"{d['block']:02X}", d["area"], "a " + hex_line(a, d["bytes"])))
            rows.append(("", "", "b " + hex_line(b, d["bytes"])))
        items.append(table("Blocks ([..] = changed bytes)", ("block", "area", "data"), rows))
    return render(*items)
