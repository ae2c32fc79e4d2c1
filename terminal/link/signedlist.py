"""Signed action lists as terminals take them.

A published list is ``{"list": TEXT, "signature": HEX}`` (:class:`SignedActionList` of the
settlement wire format, ``farebox.protocol.settlement``, which defines the text and its
signature): TEXT is canonical JSON ``{"format": 1, "serial": N, "issued_utc": T, "expires_utc":
T, "entries": [{"card", "reason", "at"}]}``, the entries in the action-list file format
(``actionlist.py``). A terminal takes a list only if the signature verifies with the clearing
house's key it was configured with, its entries are valid, the list has not expired, it was not
issued in the future (beyond :data:`DEFAULT_MAX_SKEW_S` of the terminal's clock: a house or
terminal whose clock is wrong), and its serial is neither older than the one it holds nor more
than :data:`DEFAULT_MAX_SERIAL_JUMP` past it (a list numbered far ahead would shut out every
later list, the way one bad clock reading would stop a terminal's clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from farebox.protocol.settlement import SignedActionList, WireError, parse_utc

from farebox.terminal.errors import BadInput
from farebox.terminal.core.clock import utc_iso
from farebox.terminal.core.rules import ListEntry
from farebox.terminal.link.actionlist import ActionListError, parse_action_list

MAX_LIST_BYTES = 8 * 1024 * 1024
#: how far past the terminal's clock a list may say it was issued (clocks differ a little)
DEFAULT_MAX_SKEW_S = 300.0
#: how far a list's serial may move past the serial held in one fetch (the reference house
#: moves it by one per card it lists)
DEFAULT_MAX_SERIAL_JUMP = 100_000


class SignedListError(BadInput, ValueError):
    """A list that does not verify, has expired, was issued in the future, or whose serial is
    older than the one held or too far past it."""


@dataclass(frozen=True)
class ListBounds:
    """What a terminal takes beyond a good signature: a list issued at most ``max_skew_s``
    past its clock, with a serial at most ``max_serial_jump`` past the serial it holds."""

    max_skew_s: float = DEFAULT_MAX_SKEW_S
    max_serial_jump: int = DEFAULT_MAX_SERIAL_JUMP


@dataclass(frozen=True)
class SignedList:
    serial: int
    issued_utc: str
    expires_utc: str
    entries: tuple[ListEntry, ...]
    document: dict  # {"list": TEXT, "signature": HEX}, as published
    public_key: bytes = b""  # the clearing house's key it verified with

    @property
    def issued(self) -> datetime:
        return parse_utc(self.issued_utc)

    @property
    def expires(self) -> datetime:
        return parse_utc(self.expires_utc)


def verify(document: object, public_key: bytes, now: datetime | None = None,
           held_serial: int | None = None, *, bounds: ListBounds | None = None,
           expiry: bool = True) -> SignedList:
    """The list in ``document`` if it verifies; SignedListError otherwise. Given ``now``: not
    expired (unless ``expiry`` is False: a held list's entries stay true after it) and, with
    ``bounds``, not issued more than ``bounds.max_skew_s`` after ``now``. Given
    ``held_serial``: not older than it and, with ``bounds``, not more than
    ``bounds.max_serial_jump`` past it."""
    try:
        signed = SignedActionList.from_json(document)
        body = signed.verify(public_key)
    except WireError as error:
        raise SignedListError(str(error)) from None
    try:
        entries = parse_action_list({"entries": [entry.to_json() for entry in body.entries]})
    except ActionListError as error:
        raise SignedListError(f"its entries: {error}") from None
    if now is not None and bounds is not None \
            and body.issued > now + timedelta(seconds=bounds.max_skew_s):
        raise SignedListError(
            f"serial {body.serial} was issued at {utc_iso(body.issued)}, in the future by "
            f"{span(body.issued - now)} for this terminal's clock ({utc_iso(now)}; "
            f"at most {bounds.max_skew_s:g} s, action_list_max_skew_s): check both clocks")
    if now is not None and expiry and body.expires <= now:
        raise SignedListError(f"the list expired at {body.expires_utc}")
    if held_serial is not None and body.serial < held_serial:
        raise SignedListError(f"serial {body.serial} is older than the list held "
                              f"({held_serial})")
    if held_serial is not None and bounds is not None \
            and body.serial - held_serial > bounds.max_serial_jump:
        raise SignedListError(
            f"serial {body.serial} jumps {body.serial - held_serial} past the list held "
            f"(serial {held_serial}); at most {bounds.max_serial_jump} "
            "(action_list_max_serial_jump)")
    return SignedList(body.serial, utc_iso(body.issued), utc_iso(body.expires), entries,
                      {"list": signed.text, "signature": signed.signature}, public_key)


def span(delta: timedelta) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``5 h``, ``3 days``."""
    seconds = abs(delta.total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600:.0f} h"
    return f"{seconds // 86400:.0f} days"

