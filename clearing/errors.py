"""The clearing receiver's exception tree: every exception it raises derives from
:class:`ClearingError` (the store that cannot be opened, an upload it refuses)."""


class ClearingError(Exception):
    """Base of every error the clearing receiver raises."""


class Refused(ClearingError):
    """An upload the receiver will not take: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


__all__ = ["ClearingError", "Refused"]
