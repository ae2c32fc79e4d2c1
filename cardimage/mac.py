"""AES-CMAC over card areas, with per-card keys diversified from a master key by IDm.

Key diversification follows NXP AN10922 (AES-128): the card key is
``CMAC(master, 0x01 || D)`` where the diversification input ``D`` is 31 bytes, so the CMAC input
is exactly two AES blocks and needs no AN10922 padding:
``D = IDm (8) || system code (2, big-endian) || 21-byte label``.

Area MACs are ``CMAC(card_key, tag || key_version || IDm || block numbers || data)``
truncated to the leftmost 8 bytes (NIST SP 800-38B), compared in constant time.
"""

import hmac

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from farebox.cardimage.layout import MAC_SIZE

KEY_SIZE = 16
_DIVERSIFY_LABEL = b"farebox card key v1\x00\x00"
assert len(_DIVERSIFY_LABEL) == 21


def cmac(key: bytes, message: bytes) -> bytes:
    mac = CMAC(algorithms.AES(key))
    mac.update(message)
    return mac.finalize()


def diversification_message(idm: bytes, system_code: int) -> bytes:
    """The 32 bytes the master key CMACs into a card's key: ``0x01 || D`` (AN10922 AES-128, a
    31-byte D). A key store that keeps its master keys in a token (PKCS#11, CKM_AES_CMAC) has the
    token MAC exactly these bytes."""
    if len(idm) != 8:
        raise ValueError("IDm must be 8 bytes")
    data = b"\x01" + idm + system_code.to_bytes(2, "big") + _DIVERSIFY_LABEL
    assert len(data) == 32
    return data


def diversify_key(master_key: bytes, idm: bytes, system_code: int) -> bytes:
    """The card's own key (AN10922 AES-128, 31-byte diversification input)."""
    if len(master_key) != KEY_SIZE:
        raise ValueError("master key must be 16 bytes (AES-128)")
    return cmac(master_key, diversification_message(idm, system_code))


def _mac_input(area: int, key_version: int, idm: bytes, blocks: tuple[int, ...], data: bytes) -> bytes:
    return bytes((area, key_version)) + idm + bytes(blocks) + data


def area_mac(card_key: bytes, area: int, key_version: int, idm: bytes,
             blocks: tuple[int, ...], data: bytes) -> bytes:
    return cmac(card_key, _mac_input(area, key_version, idm, blocks, data))[:MAC_SIZE]


def verify_area_mac(card_key: bytes, area: int, key_version: int, idm: bytes,
                    blocks: tuple[int, ...], data: bytes, mac: bytes) -> bool:
    return hmac.compare_digest(area_mac(card_key, area, key_version, idm, blocks, data), mac)
