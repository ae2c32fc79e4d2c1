"""The one seam between the FeliCa layer and a reader."""

from typing import Protocol


class Transport(Protocol):
    """Something that carries one FeliCa command frame to a card and brings its answer back."""

    def exchange(self, frame: bytes, timeout_s: float) -> bytes:
        """Send ``frame`` (LEN included) and return the response frame.

        Raises TransportTimeout when no answer comes within ``timeout_s`` (slow card, or the card
        left the field) and TransportError for other reader or link failures.
        """
        ...
