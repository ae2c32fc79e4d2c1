"""Looking at a whole card (``card show``, the operator tools): its history and limits; no rules,
no writes. Reading it is ``read_card`` (terminal/card/present.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from farebox.cardimage.model import CardImage, LogEntry, LogType

from farebox.terminal.core.rules import (
    FareClass, fare_class, negative_limit_cents, stored_value_limit_cents,
)


@dataclass(frozen=True)
class HistoryLine:
    entry: LogEntry
    balance_after_cents: int | None  # None once the chain of entries back from today is broken


def history(card: CardImage) -> list[HistoryLine]:
    """The log entries, newest first, with the balance after each while the entries are
    consecutive back from the current counter (a missing entry breaks the chain)."""
    lines, balance, expected = [], card.purse.balance_cents, card.purse.counter
    for entry in card.log:
        known = entry.counter == expected
        lines.append(HistoryLine(entry, balance if known else None))
        if known:
            if entry.type is LogType.PAYMENT:
                balance += entry.amount_cents - entry.aavs_reload_cents
            elif entry.type in (LogType.ADD_VALUE, LogType.SERVICE):
                balance -= entry.amount_cents  # a service entry carries the signed change
            expected -= 1
    return lines


@dataclass(frozen=True)
class CardLimits:
    negative_limit_cents: int
    stored_value_limit_cents: int
    fare_class: FareClass


def limits(card: CardImage, today: date) -> CardLimits:
    return CardLimits(negative_limit_cents(card.identity),
                      stored_value_limit_cents(card.identity, card.purse),
                      fare_class(card.identity, card.purse, today))
