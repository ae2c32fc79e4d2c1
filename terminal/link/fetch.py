"""The action list a terminal fetched from the clearing house, kept in its state directory
(``actions.json``, the signed document exactly as published) and applied at every tap together
with any ``action_list`` file of its configuration."""

from __future__ import annotations

import json
import ssl
from datetime import datetime
from pathlib import Path

from farebox.protocol.files import UntrustedFileError, load_json, parse_json

from farebox.terminal.store.identity import write_atomically
from farebox.terminal.link.signedlist import MAX_LIST_BYTES, SignedList, SignedListError, verify

FETCHED_FILE = "actions.json"


def held_list(directory: Path, public_key: bytes) -> SignedList | None:
    """The list fetched last (None before the first fetch); SignedListError if the file no
    longer verifies. An expired list is still applied: its entries stay true."""
    path = directory / FETCHED_FILE
    if not path.exists():
        return None
    try:
        document = load_json(path, MAX_LIST_BYTES)
    except UntrustedFileError as error:
        raise SignedListError(str(error)) from None
    try:
        return verify(document, public_key)
    except SignedListError as error:
        raise SignedListError(f"{path}: {error}") from None


def fetch(url: str, directory: Path, public_key: bytes, now: datetime,
          timeout_s: float = 10.0, tls: ssl.SSLContext | bool = True
          ) -> tuple[SignedList, bool]:
    """Fetch ``URL/v1/actions``, verify it (signature, expiry, not older than the list held) and
    keep it; ``(list, changed)``, changed when its serial is not the one held. SignedListError
    or OSError-like httpx errors otherwise, with the list held left as it was. ``tls``:
    httpx's certificate check for https:// (its ``verify``: the clearing house's CA bundle)."""
    import httpx

    held = held_list(directory, public_key)
    with httpx.Client(timeout=timeout_s, follow_redirects=False, verify=tls) as client, \
            client.stream("GET", url.rstrip("/") + "/v1/actions") as response:
        if response.status_code != 200:
            raise SignedListError(f"the clearing house answered HTTP {response.status_code}")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_LIST_BYTES:
                raise SignedListError(f"the list is larger than {MAX_LIST_BYTES} bytes")
    try:
        document = parse_json(bytes(body), Path(url))
    except UntrustedFileError:
        raise SignedListError("the clearing house's answer is not usable JSON") from None
    fetched = verify(document, public_key, now, held.serial if held else None)
    # kept every time (a fresh copy of the same serial carries a later expiry); "changed" means
    # new entries, a new serial
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / FETCHED_FILE, json.dumps(fetched.document))
    return fetched, held is None or held.serial != fetched.serial

