"""Hong Kong days for the rules, UTC for records."""

from datetime import date, datetime, time, timedelta, timezone

HONG_KONG = timezone(timedelta(hours=8), "HKT")


def require_aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("time must carry a UTC offset")
    return at


def hk_date(at: datetime) -> date:
    """The Hong Kong calendar date of an aware time."""
    return require_aware(at).astimezone(HONG_KONG).date()


def utc_iso(at: datetime) -> str:
    """``2026-11-22T00:00:00Z``: how records carry time."""
    return require_aware(at).astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def utc_fixed(at: datetime) -> str:
    """``2026-11-22T00:00:00.000000Z``: fixed width, so that text order is time order."""
    return require_aware(at).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> datetime:
    """The inverse of :func:`utc_iso` and :func:`utc_fixed`."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def start_of_hk_day(day: date) -> datetime:
    return datetime.combine(day, time(0, 0), HONG_KONG)
