"""What the terminal needs from a reader: find a card, exchange frames with it, see it leave.

Every reader (the in-process simulated card, nfcpy's USB/tty/UDP frontends, PC/SC through pyscard)
implements :class:`Reader`. The tap transaction only uses ``exchange`` (the one seam, see
``transport.py``); the daemon loop also uses ``wait_for_card`` and ``wait_for_removal``.

``wait_for_card`` is the tap's Polling command: it returns the card's Polling response (IDm and
PMm) for the Lite-S system code, so the session does not poll a second time.
"""

from __future__ import annotations

from typing import Protocol

from farebox.protocol.frames import PollingResponse


class Reader(Protocol):
    #: A short description for logs and JSON, e.g. ``udp:127.0.0.1:54321`` or a PC/SC reader name.
    name: str

    def wait_for_card(self, system_code: int, timeout_s: float) -> PollingResponse | None:
        """Poll until a card answering ``system_code`` is in the field, or ``timeout_s`` passes
        (None). Raises TransportError when the reader itself fails (unplugged, pcscd gone)."""
        ...

    def exchange(self, frame: bytes, timeout_s: float) -> bytes:
        """Send a FeliCa command frame (LEN included) to the card found by ``wait_for_card`` and
        return its response frame. TransportTimeout: no answer in time (the card may have left);
        TransportError: any other reader or link failure."""
        ...

    def wait_for_removal(self, timeout_s: float) -> bool:
        """True once the card found last has left the field; False if it is still there after
        ``timeout_s``."""
        ...

    def close(self) -> None:
        """Release the reader (idempotent)."""
        ...
