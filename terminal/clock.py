"""Hong Kong days for the rules, UTC for records."""

from datetime import date, datetime, timedelta, timezone

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
