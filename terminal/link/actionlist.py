"""Action lists (hotlists) from a JSON file:
``{"entries": [{"card": "12345678", "reason": "lost"|"aavs_suspended"|"cancelled", "at": TIME}]}``.
An ``aavs_suspended`` entry may also carry ``"outstanding_cents"`` (what the card owes after a
dishonoured AAVS debit, 1 or more, collected before a service terminal reactivates it) and
``"suspension"`` (the card's suspension number, 1-255; docs/rules.md §7), both or neither.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from farebox.cardimage import days
from farebox.protocol.files import UntrustedFileError, load_json

from farebox.terminal.core.cardnumber import parse_number
from farebox.terminal.core.clock import hk_date
from farebox.terminal.core.rules import SUSPENSION_MAX, ListEntry, ListReason
from farebox.terminal.errors import BadInput


LIST_DELAY_ROOM = timedelta(days=1)
#: the largest amount outstanding an entry may name (HK$1,000,000: far above any card's debits)
MAX_OUTSTANDING_CENTS = 100_000_000


class ActionListError(BadInput, ValueError):
    """The list file is missing or malformed; the message names the place."""


def parse_time(text: str) -> datetime:
    """ISO 8601 with a UTC offset, on a Hong Kong day a card can record (1990-01-02 up to the
    day before its last); a time without an offset, or out of that range, is refused."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError(f"not an ISO 8601 time: {text!r}")
    try:
        at = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    if at.tzinfo is None:
        raise ValueError(f"time needs a UTC offset (e.g. +08:00): {text!r}")
    try:
        days.to_day(hk_date(at))
        days.to_day(hk_date(at) + LIST_DELAY_ROOM)  # room for "3 hours after the report"
    except (OverflowError, ValueError):
        raise ValueError(f"time is outside the range a card can record: {text!r}") from None
    return at


def parse_action_list(document: object) -> tuple[ListEntry, ...]:
    if not isinstance(document, dict) or not isinstance(document.get("entries"), list):
        raise ActionListError('expected an object with an "entries" list')
    entries = []
    for index, item in enumerate(document["entries"]):
        where = f"entries[{index}]"
        if not isinstance(item, dict):
            raise ActionListError(f"{where}: expected an object")
        try:
            number = parse_number(_text(item, "card"))
            reason = _reason(_text(item, "reason"))
            at = parse_time(_text(item, "at"))
            outstanding = _optional_int(item, "outstanding_cents", 1, MAX_OUTSTANDING_CENTS)
            suspension = _optional_int(item, "suspension", 1, SUSPENSION_MAX)
            if reason is not ListReason.AAVS_SUSPENDED and (outstanding, suspension) != (None,
                                                                                      None):
                raise ValueError('"outstanding_cents" and "suspension" belong to an '
                                 'aavs_suspended entry only')
            if (outstanding is None) != (suspension is None):
                raise ValueError('"outstanding_cents" and "suspension" go together')
        except ValueError as error:
            raise ActionListError(f"{where}: {error}") from None
        entries.append(ListEntry(number, reason, at, outstanding, suspension))
    return tuple(entries)


def _reason(text: str) -> ListReason:
    try:
        return ListReason(text)
    except ValueError:
        allowed = ", ".join(r.value for r in ListReason)
        raise ValueError(f'"reason" must be one of {allowed}, not {text!r}') from None


def _optional_int(item: dict, key: str, low: int, high: int) -> int | None:
    if key not in item:
        return None
    value = item[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f'"{key}" must be a whole number from {low} to {high}')
    return value


def _text(item: dict, key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string')
    return value


def load_action_list(path: Path) -> tuple[ListEntry, ...]:
    try:
        document = load_json(path)
    except UntrustedFileError as error:
        raise ActionListError(str(error)) from None
    try:
        return parse_action_list(document)
    except ActionListError as error:
        raise ActionListError(f"{path}: {error}") from None
