"""Money is an integer number of cents; text is a decimal string with two places.

This module is the only place that turns text into cents and back.
"""

import re

_AMOUNT = re.compile(r"(-?)([0-9]{1,9})(?:\.([0-9]{1,2}))?")


def parse_amount(text: str, *, allow_negative: bool = False) -> int:
    """Parse ``"5.80"`` into ``580``. Refuses floats, exponents, >2 places, signs unless allowed."""
    if not isinstance(text, str):
        raise TypeError(f"amount must be text, not {type(text).__name__}")
    match = _AMOUNT.fullmatch(text)
    if match is None:
        raise ValueError(f"not an amount with at most two decimal places: {text!r}")
    sign, units, fraction = match.groups()
    if sign and not allow_negative:
        raise ValueError(f"amount must not be negative: {text!r}")
    cents = int(units) * 100 + int((fraction or "0").ljust(2, "0"))
    return -cents if sign else cents


def format_cents(cents: int) -> str:
    """Format ``-3500`` as ``"-35.00"``."""
    if type(cents) is not int:  # bool and float are refused alike
        raise TypeError(f"cents must be int, not {type(cents).__name__}")
    sign = "-" if cents < 0 else ""
    units, rest = divmod(abs(cents), 100)
    return f"{sign}{units}.{rest:02d}"


def format_whole(cents: int) -> str:
    """Format a whole amount without its cents, ``25000`` as ``"250"`` (the AAVS reload amounts
    are named so); ValueError for an amount with cents. ``parse_amount`` reads it back."""
    if type(cents) is not int:
        raise TypeError(f"cents must be int, not {type(cents).__name__}")
    units, rest = divmod(cents, 100)
    if rest:
        raise ValueError(f"not a whole amount: {format_cents(cents)}")
    return str(units)
