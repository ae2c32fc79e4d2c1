"""Structured logs: one JSON object per line, for journald (``log_format = "json"``).

Every line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``event``:
``tap`` (one per presentation, with the fields of ``farebox tap --json`` plus ``reader``,
``idm``, ``tap_ms``), ``reader_up`` / ``reader_down``, ``start`` / ``stop`` (the daemon's typed
events, ``events.py``, logged by ``supervise.py``), or ``log`` for any other log message;
``message`` is the human line. Records that carry an ``event``
(``LOG.info("...", extra=event_fields("tap", obj))``) keep their fields at the top level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import TextIO

EVENT_KEY = "farebox_event"
FIELDS_KEY = "farebox_fields"


def event_fields(event: str, fields: dict | None = None) -> dict:
    """The ``extra=`` of a log call that is a structured event."""
    return {EVENT_KEY: event, FIELDS_KEY: dict(fields or {})}


#: syslog priorities (sd-daemon(3)) of the logging levels: journald reads a ``<N>`` prefix as the
#: line's priority (``SyslogLevelPrefix=``, on by default), so ``journalctl -p err`` works.
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    return next((priority for level, priority in _PRIORITY if levelno >= level), 7)


def writes_to_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journald stream systemd connected (``$JOURNAL_STREAM`` names
    its device and inode): only then does a line carry a ``<N>`` priority prefix."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    with contextlib.suppress(ValueError, OSError, AttributeError):
        device, inode = (int(part) for part in wanted.split(":"))
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (device, inode)
    return False


class PriorityPrefix(logging.Formatter):
    """Another formatter's lines, each prefixed with its syslog priority (``<3>...``)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{self._inner.format(record)}"


def configure_logging(log_format: str, verbose: int = 0) -> None:
    """The process's log: ``"json"``, one JSON object per line on stdout (journald), at INFO
    (DEBUG from ``verbose`` 2); ``"text"``, lines on stderr, WARNING (INFO at 1, DEBUG at 2:
    every frame to and from the card). Lines written to journald carry their priority. The
    readers' libraries (nfcpy, pyscard) say only warnings below ``verbose`` 2."""
    if log_format == "json":
        stream, formatter = sys.stdout, JsonFormatter()
        level = logging.INFO if verbose < 2 else logging.DEBUG
    else:
        stream = sys.stderr
        formatter = logging.Formatter("farebox: %(name)s: %(message)s")
        level = (logging.WARNING if verbose == 0 else
                 logging.INFO if verbose == 1 else logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PriorityPrefix(formatter) if writes_to_journal(stream) else formatter)
    logging.basicConfig(handlers=[handler], level=level)
    logging.raiseExceptions = False  # a closed stream must not fill stderr with tracebacks
    with contextlib.suppress(ImportError):
        import nfc  # noqa: F401 - importing nfc sets its logger to INFO; set it after that
    for name in ("nfc", "smartcard"):  # the libraries' own chatter only with -vv
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


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
