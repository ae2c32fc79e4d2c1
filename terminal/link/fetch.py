"""The action list a terminal fetched from the clearing house, kept in its state directory and
applied at every tap, with or without a configuration, together with any ``action_list`` file
of the configuration.

Two files, each ``{"list": TEXT, "signature": HEX, "public_key": HEX}``: the signed document as
published and the clearing house's key it verified with when it was fetched. Both are written
atomically at every fetch, in this order:

* ``actions.json`` (:data:`FETCHED_FILE`): the list fetched last;
* ``actions.good.json`` (:data:`GOOD_FILE`): the last list that verified.

At every load the held list is verified again, with ``clearing_public_key`` when one is
configured, else with the key kept with it: the signature and its entries and, when it is not the
good copy (which was judged at its fetch), not issued in the future and its serial neither older
than the good copy's nor too far past it. A held list that fails leaves
the good copy in force and raises an alarm (:attr:`HeldList.alarm`; the caller logs it, the
daemon's metrics and ``doctor`` show it). With no good copy either, nothing says which cards are
listed: :attr:`HeldList.refused`, and the terminal takes no money until a fetch replaces it.
An expired list stays in force: its entries stay true (``doctor`` fails it).
"""

from __future__ import annotations

import json
import re
import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from farebox.protocol.files import UntrustedFileError, parse_json, read_limited

from farebox.terminal.store.identity import write_atomically
from farebox.terminal.link.signedlist import (
    MAX_LIST_BYTES, ListBounds, SignedList, SignedListError, verify,
)

FETCHED_FILE = "actions.json"
GOOD_FILE = "actions.good.json"
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HeldList:
    """The fetched list in force (None: none), and why the list fetched last is not it."""

    in_force: SignedList | None = None
    #: one line when the list fetched last cannot be used (the good copy is then in force)
    alarm: str | None = None
    #: the list fetched last cannot be used and there is no good copy: no list can be known
    refused: bool = False
    #: the good copy is missing or differs from the list in force: :func:`keep_good` writes it
    repair: bool = False
    #: the list fetched last (in force) was kept without the key it verifies with (fetched
    #: before keys were kept, or the configured key is not the one kept): :func:`keep_good`
    #: writes it again with that key
    add_key: bool = False


def held_text(signed: SignedList) -> str:
    """What the state keeps of a verified list: the document and the key it verified with."""
    return json.dumps({**signed.document, "public_key": signed.public_key.hex()})


def held_list(directory: Path, configured_key: bytes | None, now: datetime,
              bounds: ListBounds = ListBounds()) -> HeldList:
    """The fetched list in force in ``directory`` (nothing is written: see :func:`keep_good`)."""
    held_path, good_path = directory / FETCHED_FILE, directory / GOOD_FILE
    held_data, held_problem = _contents(held_path)
    good_data, good_problem = _contents(good_path)
    if held_data is None and held_problem is None and good_data is None \
            and good_problem is None:
        return HeldList()  # never fetched
    good = good_kept = None
    if held_data is not None and held_data == good_data:  # as a fetch leaves them: one check
        try:
            held, kept = _parse(held_path, held_data, configured_key, now, None, None)
        except SignedListError as error:
            return HeldList(None, f"{error}; the good copy is the same; no verified action list "
                            "to fall back on", refused=True)
        return HeldList(held, add_key=kept != held.public_key)
    if good_data is not None:
        try:
            good, good_kept = _parse(good_path, good_data, configured_key, now, None, None)
        except SignedListError as error:
            good_problem = str(error)
    if held_data is not None:
        try:
            held, kept = _parse(held_path, held_data, configured_key, now, bounds,
                                good.serial if good is not None else None)
        except SignedListError as error:
            held_problem = str(error)
        else:
            same = good is not None and good.document == held.document \
                and good_kept == held.public_key
            return HeldList(held, repair=not same, add_key=kept != held.public_key)
    problem = held_problem or f"{held_path} is missing"
    if good is not None:
        return HeldList(good, f"{problem}; applying the last good list (serial {good.serial})")
    also = f"; the good copy: {good_problem}" if good_problem else ""
    return HeldList(None, f"{problem}{also}; no verified action list to fall back on",
                    refused=True)


def keep_good(directory: Path, held: HeldList) -> None:
    """Write the good copy from the list in force when :attr:`HeldList.repair` says so (a state
    fetched before the copy existed, or a copy that was lost or damaged), and the list fetched
    last with its key when :attr:`HeldList.add_key` does; OSError as is."""
    if held.in_force is None:
        return
    if held.add_key:
        write_atomically(directory / FETCHED_FILE, held_text(held.in_force))
    if held.repair:
        write_atomically(directory / GOOD_FILE, held_text(held.in_force))


def fetch(url: str, directory: Path, public_key: bytes, now: datetime,
          bounds: ListBounds = ListBounds(), timeout_s: float = 10.0,
          tls: ssl.SSLContext | bool = True) -> tuple[SignedList, bool]:
    """Fetch ``URL/v1/actions``, verify it (signature, expiry, not issued in the future, serial
    neither older than the list in force nor too far past it) and keep it with ``public_key``;
    ``(list, changed)``, changed when its serial is not the one in force. SignedListError or
    OSError-like httpx errors otherwise, with the lists held left as they were. A held list that
    no longer verifies does not stop a fetch: the fetch is how it is replaced. ``tls``: httpx's
    certificate check for https:// (its ``verify``: the clearing house's CA bundle)."""
    import httpx

    held = held_list(directory, public_key, now, bounds).in_force
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
    fetched = verify(document, public_key, now, held.serial if held else None, bounds=bounds)
    # kept every time (a fresh copy of the same serial carries a later expiry); "changed" means
    # new entries, a new serial. The list first, then the good copy: a crash between leaves the
    # new list held and the previous good copy, both whole.
    directory.mkdir(parents=True, exist_ok=True)
    text = held_text(fetched)
    write_atomically(directory / FETCHED_FILE, text)
    write_atomically(directory / GOOD_FILE, text)
    return fetched, held is None or held.serial != fetched.serial


def _contents(path: Path) -> tuple[bytes | None, str | None]:
    """``(bytes, None)``, ``(None, None)`` when there is no such file, or ``(None, why)``."""
    try:
        path.lstat()
    except FileNotFoundError:
        return None, None
    except OSError as error:
        return None, f"{path}: {error.strerror}"
    try:
        return read_limited(path, MAX_LIST_BYTES), None
    except UntrustedFileError as error:
        return None, str(error)


def _parse(path: Path, data: bytes, configured_key: bytes | None, now: datetime,
           bounds: ListBounds | None, good_serial: int | None
           ) -> tuple[SignedList, bytes | None]:
    """The list in ``data`` (read from ``path``), and the key kept with it. ``bounds`` None: a
    list that was judged when it was fetched (the good copy, or a held list the same as it):
    only its signature and entries are checked again, so a clock that went back after a fetch
    does not take the list in force away."""
    try:
        document = parse_json(data, path)
    except UntrustedFileError as error:
        raise SignedListError(str(error)) from None
    kept = _kept_key(document)
    key = configured_key if configured_key is not None else kept
    if key is None:
        raise SignedListError(f"{path}: no clearing house key is kept with it and none is "
                              "configured (clearing_public_key)")
    try:
        return verify(document, key, now, good_serial, bounds=bounds, expiry=False), kept
    except SignedListError as error:
        raise SignedListError(f"{path}: {error}") from None


def _kept_key(document: object) -> bytes | None:
    value = document.get("public_key") if isinstance(document, dict) else None
    if isinstance(value, str) and _HEX_KEY.fullmatch(value):
        return bytes.fromhex(value)
    return None
