"""Card numbers: eight digits and a Luhn check digit, shown as ``12345678(9)``."""

import re

_NUMBER = re.compile(r"([0-9]{8})(?:\(([0-9])\))?")


def check_digit(number: int) -> int:
    """ISO 7812 (Luhn) check digit of the eight-digit number."""
    total = 0
    for position, char in enumerate(reversed(f"{number:08d}")):
        digit = int(char)
        if position % 2 == 0:  # rightmost digit of the payload is doubled
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10


def format_number(number: int) -> str:
    return f"{number:08d}({check_digit(number)})"


def parse_number(text: str) -> int:
    """``"12345678"`` or ``"12345678(2)"`` (the check digit must then be right)."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise ValueError(f"card number must be 8 digits, optionally with its check digit: {text!r}")
    number = int(match.group(1))
    if match.group(2) is not None and int(match.group(2)) != check_digit(number):
        raise ValueError(f"wrong check digit in {text!r}: expected {format_number(number)}")
    return number
