"""What the daemon tells the world while it runs: the service manager (sd_notify), the log (one
structured event per tap, reader up/down, start/stop) and the metrics endpoint.
:func:`~farebox.terminal.daemon.run.run` builds one :class:`Supervision`, hands it every event
(:meth:`Supervision.observe`) and its ``heartbeat`` and ``idle`` to the loop as hooks; everything
here runs on the daemon's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from farebox.terminal.daemon.events import (
    DaemonEvent, MetricsServing, ReaderDown, ReaderUp, Started, Stopped, TapEvent,
)
from farebox.terminal.daemon.jsonlog import event_fields
from farebox.terminal.daemon.metrics import TerminalMetrics
from farebox.terminal.daemon.sdnotify import Notifier

EVENTS = logging.getLogger("farebox.run")


class Supervision:
    def __init__(self, notifier: Notifier, metrics: TerminalMetrics | None = None, *,
                 log_events: bool = False, logger: logging.Logger = EVENTS) -> None:
        """``log_events``: taps, reader changes, start and stop are structured log events (JSON
        logs); otherwise the caller prints taps and the daemon's own warnings say the rest."""
        self.notifier = notifier
        self.metrics = metrics
        self.log_events = log_events
        self.log = logger

    def waiting(self, reader: str) -> None:
        self.notifier.set_status(f"waiting for the reader {reader}")

    def observe(self, event: DaemonEvent) -> None:
        """One event: tell the service manager, count it, log it."""
        match event:
            case TapEvent():
                if self.metrics is not None:
                    self.metrics.tap(event.outcome, event.reason, event.tap_ms)
                self._log(logging.INFO, event, "%s", event.summary())
            case ReaderUp(reader=name):  # READY=1 the first time a reader answers
                self.notifier.ready(f"ready: reader {name} answers")
                self._log(logging.INFO, event, "reader %s answers", name)
                if self.metrics is not None:
                    self.metrics.reader(True)
            case ReaderDown(error=error):
                self.notifier.set_status(f"waiting for the reader: {error}")
                self._log(logging.WARNING, event, "%s", error)
                if self.metrics is not None:
                    self.metrics.reader(False)
            case Started(reader=reader):
                self._log(logging.INFO, event, "farebox started on reader %s", reader)
            case Stopped(taps=taps):
                self.notifier.stopping(f"stopping after {taps} taps")
                self._log(logging.INFO, event, "farebox stopped after %d taps", taps)
            case MetricsServing():
                pass  # the start event names the endpoint

    def _log(self, level: int, event: DaemonEvent, message: str, *args: object) -> None:
        if self.log_events:
            self.log.log(level, message, *args, extra=event_fields(event.kind, event.fields()))

    def heartbeat(self, reader_reopens: int) -> None:
        """The daemon's ``on_pass``: the watchdog, and the reopen counter."""
        self.notifier.watchdog()
        if self.metrics is not None:
            self.metrics.reopens(reader_reopens)

    def idle(self, in_doubt: Callable[[], int], unacknowledged: Callable[[], int],
             force: bool = False) -> None:
        """Between cards: the journal's counts for the metrics (this thread owns the journal)."""
        if self.metrics is not None:
            self.metrics.refresh(in_doubt, unacknowledged, force=force)
