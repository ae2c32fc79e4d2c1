"""How one tap's result reads: its record (the fields of ``farebox tap --json``, and of the
daemon's tap events and JSON log lines) and its one-line summary. Both the command line and the
daemon print these, so they are defined once, here, beside :class:`TapResult`. Amounts are text
made from integer cents by ``cardimage.money``."""

from __future__ import annotations

from farebox.cardimage.money import format_cents as fmt
from farebox.terminal.card.tap import TapResult
from farebox.terminal.core.clock import utc_iso
from farebox.terminal.core.cardnumber import format_number


def _money(cents: int | None) -> str | None:
    return None if cents is None else fmt(cents)


def tap_fields(result: TapResult, *, with_fare_class: bool) -> dict:
    """The tap's record, JSON-ready (``with_fare_class``: a payment's, which names the class)."""
    obj = {
        "outcome": "approved" if result.approved else "declined",
        "reason": result.reason.value if result.reason else None,
        "card": None if result.card_number is None else format_number(result.card_number),
    }
    if with_fare_class:
        obj["fare_class"] = result.fare_class.value if result.fare_class else None
    obj.update({
        "amount": fmt(result.amount_cents),
        "balance_before": _money(result.balance_before_cents),
        "balance_after": _money(result.balance_after_cents),
        "aavs_reload": _money(result.aavs_reload_cents),
        "records": [{"type": r.type.value, "amount": fmt(r.amount_cents),
                     "balance_after": fmt(r.balance_after_cents)} for r in result.records],
        "counter": result.counter,
        "card_commands": result.commands,
        "completed_from": result.completed_from,
        "clock_trusted": result.clock_trusted,
    })
    return obj


def tap_summary(result: TapResult, what: str) -> str:
    """One line for a person: the outcome, the card, ``what`` was charged, the balance."""
    head = "APPROVED" if result.approved else f"DECLINED ({result.reason.value})"
    if result.completed_from and what == "add value":  # the cash is collected once
        booked = "" if result.completed_at is None else f", booked {utc_iso(result.completed_at)}"
        head += (f" (completes add value {result.completed_from}{booked}: nothing more added; "
                 f"collect {fmt(result.amount_cents)} once)")
    elif result.completed_from:
        head += f" (completes the interrupted tap {result.completed_from}; nothing more charged)"
    if not result.clock_trusted:
        head += " [clock untrusted]"
    card = ("unreadable card" if result.card_number is None
            else f"card {format_number(result.card_number)}")
    label = f"{result.fare_class.value} fare" if result.fare_class else what
    parts = [head, card, f"{label} {fmt(result.amount_cents)}"]
    if result.aavs_reload_cents:
        parts.append(f"auto add value {fmt(result.aavs_reload_cents)}")
    if result.balance_before_cents is not None:
        if result.balance_after_cents != result.balance_before_cents:
            parts.append(f"balance {fmt(result.balance_before_cents)} -> "
                         f"{fmt(result.balance_after_cents)}")
        else:
            parts.append(f"balance {fmt(result.balance_before_cents)}")
    return "  ".join(parts)
