"""The terminal's key store: a software stand-in for a SAM.

Cards carry a key version; the store maps it to a scheme master key and diversifies the card's own
key by IDm. Keys never appear in reprs, logs or output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from farebox.cardimage.mac import KEY_SIZE, diversify_key
from farebox.protocol.frames import SYSTEM_CODE_LITE_S

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


def published_test_keys() -> SoftwareKeyStore:
    """The published test keys (see TEST_KEY_VERSION)."""
    return SoftwareKeyStore({TEST_KEY_VERSION: _TEST_MASTER_KEY}, TEST_KEY_VERSION)


assert len(_TEST_MASTER_KEY) == KEY_SIZE
