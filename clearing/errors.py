"""The clearing receiver's exception tree: every exception it raises derives from
:class:`ClearingError` (the store that cannot be opened, an upload it refuses)."""


class ClearingError(Exception):
    """Base of every error the clearing receiver raises."""


__all__ = ["ClearingError"]
