"""Structured logs: one JSON object per line, for journald (``log_format = "json"``).

Every line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``event``:
``tap`` (one per presentation, with the fields of ``farebox tap --json`` plus ``reader``,
``idm``, ``tap_ms``), ``reader_up`` / ``reader_down``, ``start`` / ``stop`` (the daemon's typed
events, ``events.py``, logged by ``supervise.py``), or ``log`` for any other log message;
``message`` is the human line. Records that carry an ``event``
(``LOG.info("...", extra=event_fields("tap", obj))``) keep their fields at the top level.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

EVENT_KEY = "farebox_event"
FIELDS_KEY = "farebox_fields"


def event_fields(event: str, fields: dict | None = None) -> dict:
    """The ``extra=`` of a log call that is a structured event."""
    return {EVENT_KEY: event, FIELDS_KEY: dict(fields or {})}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc)
                          .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, EVENT_KEY, "log"),
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS_KEY, None)
        if fields:
            obj.update({key: value for key, value in fields.items() if key not in obj})
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)
