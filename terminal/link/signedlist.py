"""Signed action lists as terminals take them.

A published list is ``{"list": TEXT, "signature": HEX}`` (:class:`SignedActionList` of the
settlement wire format, ``farebox.protocol.settlement``, which defines the text and its
signature): TEXT is canonical JSON ``{"format": 1, "serial": N, "issued_utc": T, "expires_utc":
T, "entries": [{"card", "reason", "at"}]}``, the entries in the action-list file format
(``actionlist.py``). A terminal takes a list only if the signature verifies with the clearing
house's key it was configured with, its entries are valid, the list has not expired, and its
serial is not older than the one it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from farebox.protocol.settlement import SignedActionList, WireError

from farebox.terminal.errors import BadInput
from farebox.terminal.core.clock import utc_iso
from farebox.terminal.core.rules import ListEntry
from farebox.terminal.link.actionlist import ActionListError, parse_action_list

MAX_LIST_BYTES = 8 * 1024 * 1024


class SignedListError(BadInput, ValueError):
    """A list that does not verify, has expired or is older than the one held."""


@dataclass(frozen=True)
class SignedList:
    serial: int
    issued_utc: str
    expires_utc: str
    entries: tuple[ListEntry, ...]
    document: dict  # {"list": TEXT, "signature": HEX}, as published


def verify(document: object, public_key: bytes, now: datetime | None = None,
           held_serial: int | None = None) -> SignedList:
    """The list in ``document`` if it verifies (and, given ``now`` and ``held_serial``, has not
    expired and is not older than the list held); SignedListError otherwise."""
    try:
        signed = SignedActionList.from_json(document)
        body = signed.verify(public_key)
    except WireError as error:
        raise SignedListError(str(error)) from None
    try:
        entries = parse_action_list({"entries": [entry.to_json() for entry in body.entries]})
    except ActionListError as error:
        raise SignedListError(f"its entries: {error}") from None
    if now is not None and body.expires <= now:
        raise SignedListError(f"the list expired at {body.expires_utc}")
    if held_serial is not None and body.serial < held_serial:
        raise SignedListError(f"serial {body.serial} is older than the list held "
                              f"({held_serial})")
    return SignedList(body.serial, utc_iso(body.issued), utc_iso(body.expires), entries,
                      document)
