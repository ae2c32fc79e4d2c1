"""The terminal's identity: its id, an Ed25519 key that signs its settlement batches, and an
incarnation id that changes whenever the state is created anew (so a clearing house can tell a
terminal that lost its state from one replaying old batches).

Two files in the state directory: ``identity.key`` (the private key, PKCS#8 PEM, mode 0600,
never logged or printed) and ``identity.json`` (id, incarnation, public key, creation time).
The key is written first and the JSON last, atomically: a crash in between leaves a key that
never signed anything, which the next ``init`` replaces.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.protocol.files import UntrustedFileError, load_json, read_limited

from farebox.terminal.core.clock import utc_iso
from farebox.terminal.errors import BadInput

IDENTITY_FILE = "identity.json"
KEY_FILE = "identity.key"
TERMINAL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_MAX_IDENTITY_BYTES = 4096


class IdentityError(BadInput):
    """No identity, a second ``init``, or identity files that are damaged or do not agree."""


@dataclass(frozen=True)
class TerminalIdentity:
    terminal_id: str
    incarnation: str
    public_key: bytes  # raw 32 bytes
    created_utc: str
    _private_key: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)

    def sign(self, data: bytes) -> bytes:
        if self._private_key is None:
            raise IdentityError("this identity has no private key")
        return self._private_key.sign(data)

    def public(self) -> TerminalIdentity:
        """The same identity without its private key (for verifying)."""
        return TerminalIdentity(self.terminal_id, self.incarnation, self.public_key,
                                self.created_utc)


def check_terminal_id(terminal_id: str) -> str:
    if not TERMINAL_ID_PATTERN.fullmatch(terminal_id):
        raise IdentityError(f"terminal id {terminal_id!r}: 1-32 letters, digits, '.', '_' or "
                            "'-', starting with a letter or digit")
    return terminal_id


def init_identity(directory: Path, terminal_id: str, now: datetime) -> TerminalIdentity:
    """Create the identity in ``directory``; IdentityError if it already has one."""
    check_terminal_id(terminal_id)
    directory.mkdir(parents=True, exist_ok=True)
    identity_path, key_path = directory / IDENTITY_FILE, directory / KEY_FILE
    if identity_path.exists():
        existing = load_identity(directory)
        raise IdentityError(f"{directory} already holds terminal {existing.terminal_id} "
                            f"(incarnation {existing.incarnation})")
    key_path.unlink(missing_ok=True)  # a key without identity.json never signed anything
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(pem)
        key_file.flush()
        os.fsync(key_file.fileno())
    public_key = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw)
    identity = TerminalIdentity(terminal_id, secrets.token_hex(8), public_key, utc_iso(now),
                                private_key)
    write_atomically(identity_path, json.dumps({
        "terminal_id": identity.terminal_id, "incarnation": identity.incarnation,
        "public_key": public_key.hex(), "created_utc": identity.created_utc}, indent=1) + "\n")
    return identity


def load_identity(directory: Path, *, with_private_key: bool = True) -> TerminalIdentity:
    """The identity in ``directory``; IdentityError when there is none or it is damaged."""
    identity_path, key_path = directory / IDENTITY_FILE, directory / KEY_FILE
    if not identity_path.exists():
        raise IdentityError(f"{directory} has no terminal identity: run "
                            "`farebox terminal init --state DIR --id ID` first")
    try:  # regular files only, bounded, deep nesting refused (a FIFO does not block)
        data = load_json(identity_path, _MAX_IDENTITY_BYTES)
    except UntrustedFileError as error:
        raise IdentityError(f"damaged terminal identity: {error}") from None
    try:
        terminal_id = check_terminal_id(str(data["terminal_id"]))
        incarnation = str(data["incarnation"])
        public_key = bytes.fromhex(str(data["public_key"]))
        created = str(data["created_utc"])
        if len(public_key) != 32 or not re.fullmatch(r"[0-9a-f]{16}", incarnation):
            raise ValueError("bad public key or incarnation")
    except (ValueError, KeyError, TypeError, IdentityError) as error:
        raise IdentityError(f"{identity_path} is damaged ({error})") from None
    private_key = None
    if with_private_key:
        if not key_path.exists():
            raise IdentityError(f"{key_path} is missing")
        try:
            pem = read_limited(key_path, _MAX_IDENTITY_BYTES)
            loaded = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, OSError):  # UntrustedFileError is a ValueError
            raise IdentityError(f"{key_path} is not a readable private key") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise IdentityError(f"{key_path} is not an Ed25519 key")
        own = loaded.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        if own != public_key:
            raise IdentityError(f"{key_path} does not match the public key in {identity_path}")
        private_key = loaded
    return TerminalIdentity(terminal_id, incarnation, public_key, created, private_key)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old file or the new one, both
    whole (temporary file, fsync, rename, fsync of the directory)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
