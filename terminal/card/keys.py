"""The terminal's key store: a software stand-in for a SAM.

Cards carry a key version; the store maps it to a scheme master key and diversifies the card's own
key by IDm. Keys never appear in reprs, logs or output.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from farebox.cardimage.mac import KEY_SIZE, diversify_key
from farebox.protocol.frames import SYSTEM_CODE_LITE_S
from farebox.protocol.files import UntrustedFileError, read_limited
from farebox.terminal.errors import BadInput

#: TEST KEY. Published in this source file, so it protects nothing: for demos, simulated cards and
#: the test suite only. Cards made with it carry key version 0xF0, which `card show` labels TEST.
TEST_KEY_VERSION = 0xF0
_TEST_MASTER_KEY = b"TEST KEY-NOT SEC"  # 16 bytes, deliberately readable


@dataclass(frozen=True)
class SoftwareKeyStore:
    master_keys: dict[int, bytes] = field(repr=False)
    issue_version: int

    def __post_init__(self) -> None:
        for version, key in self.master_keys.items():
            if not 0 <= version <= 0xFF or len(key) != KEY_SIZE:
                raise ValueError(f"key version {version}: need a version 0-255 and a 16-byte key")
        if self.issue_version not in self.master_keys:
            raise ValueError(f"no key for the issue key version {self.issue_version}")

    def card_key(self, version: int, idm: bytes) -> bytes:
        """The card's diversified key; KeyError if this store has no such version."""
        return diversify_key(self.master_keys[version], idm, SYSTEM_CODE_LITE_S)

    def is_test_version(self, version: int) -> bool:
        return version == TEST_KEY_VERSION

    def __repr__(self) -> str:
        return (f"SoftwareKeyStore(versions={sorted(self.master_keys)}, "
                f"issue_version={self.issue_version})")


class KeyFileError(BadInput, ValueError):
    """A key file that cannot be used. Messages never contain key material."""


def load_key_file(path: Path) -> SoftwareKeyStore:
    """Master keys from a TOML file (keep it readable by the terminal's user only)::

        issue_version = 1
        [master_keys]
        1 = "32 hex digits"
    """
    try:
        document = tomllib.loads(read_limited(path, 64 * 1024).decode("utf-8"))
    except UntrustedFileError as error:
        raise KeyFileError(str(error)) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise KeyFileError(f"{path}: not a TOML key file") from None
    keys = document.get("master_keys")
    issue_version = document.get("issue_version")
    if not isinstance(keys, dict) or not isinstance(issue_version, int):
        raise KeyFileError(f"{path}: expected issue_version = N and a [master_keys] table")
    master_keys = {}
    for version, text in keys.items():
        try:
            number = int(version, 10)
            key = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            raise KeyFileError(f"{path}: master_keys.{version}: expected a version number "
                               "and 32 hex digits") from None
        if not 0 <= number <= 0xFF or len(key) != KEY_SIZE:
            raise KeyFileError(f"{path}: master_keys.{version}: expected a version 0-255 "
                               "and 32 hex digits")
        if number == TEST_KEY_VERSION:
            raise KeyFileError(f"{path}: master_keys.{version}: version {TEST_KEY_VERSION:#x} is "
                               "the published test key version")
        master_keys[number] = key
    if issue_version not in master_keys:
        raise KeyFileError(f"{path}: issue_version {issue_version} has no key in [master_keys]")
    return SoftwareKeyStore(master_keys, issue_version)


def published_test_keys() -> SoftwareKeyStore:
    """The published test keys (see TEST_KEY_VERSION)."""
    return SoftwareKeyStore({TEST_KEY_VERSION: _TEST_MASTER_KEY}, TEST_KEY_VERSION)


assert len(_TEST_MASTER_KEY) == KEY_SIZE
