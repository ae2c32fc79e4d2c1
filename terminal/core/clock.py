"""Hong Kong days for the rules, UTC for records (the UTC text, :func:`utc_iso` and
:func:`parse_utc`, is the settlement wire format's: records and batches carry it)."""

from datetime import date, datetime, time, timedelta, timezone

from farebox.protocol.settlement import parse_utc, utc_iso

__all__ = ["HONG_KONG", "hk_date", "now_utc", "parse_utc", "require_aware", "start_of_hk_day",
           "utc_fixed", "utc_iso"]

HONG_KONG = timezone(timedelta(hours=8), "HKT")


def require_aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("time must carry a UTC offset")
    return at


def hk_date(at: datetime) -> date:
    """The Hong Kong calendar date of an aware time."""
    return require_aware(at).astimezone(HONG_KONG).date()


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def utc_fixed(at: datetime) -> str:
    """``2026-11-22T00:00:00.000000Z``: fixed width, so that text order is time order."""
    return require_aware(at).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def start_of_hk_day(day: date) -> datetime:
    return datetime.combine(day, time(0, 0), HONG_KONG)
