"""The FeliCa layer's exception tree."""


class FelicaError(Exception):
    """Base of every error the FeliCa layer raises."""


class ProtocolError(FelicaError):
    """A malformed or unexpected frame (length, code, IDm, truncation, trailing bytes)."""


class CardStatusError(FelicaError):
    """The card answered with an error status (status flag 1 not 00)."""

    def __init__(self, status_flag1: int, status_flag2: int) -> None:
        super().__init__(status_flag1, status_flag2)
        self.status_flag1 = status_flag1
        self.status_flag2 = status_flag2

    def __str__(self) -> str:
        return (
            f"card status error: status flag 1 = 0x{self.status_flag1:02X}, "
            f"status flag 2 = 0x{self.status_flag2:02X}"
        )


class TransportError(FelicaError):
    """The reader or the link to it failed."""


class TransportTimeout(TransportError):
    """No answer in time: the card is slow or has left the field."""
