"""Dates on the card are day numbers since an epoch; day 0 means "never"."""

from datetime import date, timedelta

EPOCH = date(1990, 1, 1)
MAX_DAY = 0xFFFF


def to_day(value: date | None) -> int:
    if value is None:
        return 0
    day = (value - EPOCH).days
    if not 0 < day <= MAX_DAY:
        raise ValueError(f"date {value} is outside the card's range ({EPOCH} .. {from_day(MAX_DAY)})")
    return day


def from_day(day: int) -> date | None:
    if day == 0:
        return None
    return EPOCH + timedelta(days=day)
