"""What the daemon reports, as typed values: the loop makes :class:`TapEvent`, :class:`ReaderUp`
and :class:`ReaderDown`; :func:`~farebox.terminal.daemon.run.run` adds :class:`MetricsServing`,
:class:`Started` and :class:`Stopped`. Supervision (sd_notify, metrics, the JSON log) and
whoever called ``run`` (the command line prints them) consume the same values.

``kind`` names the event in the JSON log (``"event": "tap"``); :meth:`fields` is what such a log
line carries besides time, level, logger and message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from farebox.terminal.card.receipt import tap_fields, tap_summary
from farebox.terminal.card.tap import TapResult


@dataclass(frozen=True)
class MetricsServing:
    """The metrics endpoint listens (before anything else happens)."""

    kind: ClassVar[str] = "metrics"
    url: str

    def fields(self) -> dict:
        return {"url": self.url}


@dataclass(frozen=True)
class Started:
    """The terminal is open and the loop is about to wait for the reader's first answer."""

    kind: ClassVar[str] = "start"
    reader: str  # the reader spec, as given
    terminal_id: str | None
    metrics_url: str | None
    pid: int

    def fields(self) -> dict:
        return {"reader": self.reader, "terminal_id": self.terminal_id,
                "metrics": self.metrics_url, "pid": self.pid}


@dataclass(frozen=True)
class ReaderUp:
    """An opened reader answered its first poll (and again after each outage)."""

    kind: ClassVar[str] = "reader_up"
    reader: str  # the reader's own name

    def fields(self) -> dict:
        return {"reader": self.reader}


@dataclass(frozen=True)
class ReaderDown:
    """A reader outage started, or its cause changed (said once, not per retry)."""

    kind: ClassVar[str] = "reader_down"
    error: str

    def fields(self) -> dict:
        return {"error": self.error}


@dataclass(frozen=True)
class TapEvent:
    """What happened at one presentation: a result, or why there is none."""

    kind: ClassVar[str] = "tap"
    result: TapResult | None
    reader: str
    idm: bytes
    tap_ms: float
    interrupted: str | None = None  # the tap_id left in doubt
    error: str | None = None  # the card left before anything was written, or was refused

    @property
    def outcome(self) -> str:
        """approved, declined, interrupted (a write in doubt) or error (nothing written)."""
        if self.result is not None:
            return "approved" if self.result.approved else "declined"
        return "interrupted" if self.interrupted else "error"

    @property
    def reason(self) -> str | None:
        """A decline's reason (None otherwise)."""
        if self.result is None or self.result.reason is None:
            return None
        return self.result.reason.value

    def fields(self) -> dict:
        """The tap's record (``farebox tap --json``'s fields, or the outcome, the tap left in
        doubt and the error), with ``reader``, ``idm`` and ``tap_ms``."""
        if self.result is not None:
            obj = tap_fields(self.result, with_fare_class=True)
        else:
            obj = {"outcome": self.outcome, "tap_id": self.interrupted, "error": self.error}
        obj.update({"reader": self.reader, "idm": self.idm.hex(), "tap_ms": self.tap_ms})
        return obj

    def summary(self) -> str:
        """One line for a person (without the time the tap took)."""
        if self.result is not None:
            return tap_summary(self.result, "fare")
        return f"NOT COMPLETED  {self.error}"


@dataclass(frozen=True)
class Stopped:
    """The loop has ended (a stop was asked for, or ``max_taps`` were served)."""

    kind: ClassVar[str] = "stop"
    taps: int
    reader_reopens: int

    def fields(self) -> dict:
        return {"taps": self.taps, "reader_reopens": self.reader_reopens}


DaemonEvent = MetricsServing | Started | ReaderUp | ReaderDown | TapEvent | Stopped
