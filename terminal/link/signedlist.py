"""Signed action lists, as the clearing house publishes them and terminals take them.

A published list is ``{"list": TEXT, "signature": HEX}``: TEXT is canonical JSON
``{"format": 1, "serial": N, "issued_utc": T, "expires_utc": T, "entries": [{"card", "reason",
"at"}]}``, the entries in the action-list file format (``actionlist.py``), and the signature is
the clearing house's Ed25519 signature of TEXT. A terminal takes a list only if the signature
verifies with the clearing house's key it was configured with, the list has not expired, and its
serial is not older than the one it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.terminal.errors import BadInput
from farebox.terminal.link.actionlist import ActionListError, parse_action_list
from farebox.terminal.core.clock import parse_utc, utc_iso
from farebox.terminal.store.identity import verify_signature
from farebox.terminal.core.rules import ListEntry

LIST_FORMAT = 1
LIST_VALIDITY = timedelta(hours=24)
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


def publish(entries: list[dict], serial: int, issued: datetime,
            private_key: Ed25519PrivateKey) -> dict:
    text = json.dumps({"format": LIST_FORMAT, "serial": serial, "issued_utc": utc_iso(issued),
                       "expires_utc": utc_iso(issued + LIST_VALIDITY), "entries": entries},
                      sort_keys=True, separators=(",", ":"))
    return {"list": text, "signature": private_key.sign(text.encode()).hex()}


def verify(document: object, public_key: bytes, now: datetime | None = None,
           held_serial: int | None = None) -> SignedList:
    """The list in ``document`` if it verifies (and, given ``now`` and ``held_serial``, has not
    expired and is not older than the list held); SignedListError otherwise."""
    if not isinstance(document, dict) or not isinstance(document.get("list"), str) \
            or not isinstance(document.get("signature"), str):
        raise SignedListError('expected {"list": TEXT, "signature": HEX}')
    text = document["list"]
    try:
        signature = bytes.fromhex(document["signature"])
    except ValueError:
        raise SignedListError("the signature is not hex") from None
    if not verify_signature(public_key, signature, text.encode()):
        raise SignedListError("the signature does not verify with the clearing house's key")
    try:
        body = json.loads(text)
        if body["format"] != LIST_FORMAT or not isinstance(body["serial"], int) \
                or isinstance(body["serial"], bool):
            raise SignedListError("not an action list of this format")
        issued, expires = parse_utc(body["issued_utc"]), parse_utc(body["expires_utc"])
        entries = parse_action_list({"entries": body["entries"]})
    except SignedListError:
        raise
    except ActionListError as error:
        raise SignedListError(f"its entries: {error}") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise SignedListError("not an action list of this format") from None
    if now is not None and expires <= now:
        raise SignedListError(f"the list expired at {body['expires_utc']}")
    if held_serial is not None and body["serial"] < held_serial:
        raise SignedListError(f"serial {body['serial']} is older than the list held "
                              f"({held_serial})")
    return SignedList(body["serial"], utc_iso(issued), utc_iso(expires), entries, document)
