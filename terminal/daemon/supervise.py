"""What the daemon tells the world while it runs: the service manager (sd_notify), the log (one
structured event per tap, reader up/down, start/stop) and the metrics endpoint. ``farebox run``
builds one :class:`Supervision` and hands its methods to :class:`~farebox.terminal.daemon.loop.Daemon`
as hooks; everything here runs on the daemon's thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from farebox.terminal.daemon.jsonlog import event_fields
from farebox.terminal.daemon.metrics import TerminalMetrics
from farebox.terminal.daemon.sdnotify import Notifier

EVENTS = logging.getLogger("farebox.run")


class Supervision:
    def __init__(self, notifier: Notifier, metrics: TerminalMetrics | None = None, *,
                 log_events: bool = False, logger: logging.Logger = EVENTS) -> None:
        """``log_events``: taps and reader changes are structured log events (JSON logs);
        otherwise the caller prints taps and the daemon's own warnings say the rest."""
        self.notifier = notifier
        self.metrics = metrics
        self.log_events = log_events
        self.log = logger

    def waiting(self, reader: str) -> None:
        self.notifier.set_status(f"waiting for the reader {reader}")

    def started(self, reader: str, terminal_id: str, metrics_url: str | None) -> None:
        if self.log_events:
            self.log.info("farebox started on reader %s", reader, extra=event_fields("start", {
                "reader": reader, "terminal_id": terminal_id, "metrics": metrics_url,
                "pid": os.getpid()}))

    def tap(self, obj: dict, human: str) -> bool:
        """Count a tap and log it as an event; True when it was logged (else print it)."""
        if self.metrics is not None:
            self.metrics.tap(obj["outcome"], obj.get("reason"), obj["tap_ms"])
        if self.log_events:
            self.log.info("%s", human, extra=event_fields("tap", obj))
        return self.log_events

    def reader(self, state: str, detail: str) -> None:
        """The daemon's ``on_reader``: READY=1 the first time the reader answers."""
        if state == "up":
            self.notifier.ready(f"ready: reader {detail} answers")
            if self.log_events:
                self.log.info("reader %s answers", detail,
                              extra=event_fields("reader_up", {"reader": detail}))
        else:
            self.notifier.set_status(f"waiting for the reader: {detail}")
            if self.log_events:
                self.log.warning("%s", detail, extra=event_fields("reader_down", {"error": detail}))
        if self.metrics is not None:
            self.metrics.reader(state == "up")

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

    def stopping(self, taps: int, reader_reopens: int) -> None:
        self.notifier.stopping(f"stopping after {taps} taps")
        if self.log_events:
            self.log.info("farebox stopped after %d taps", taps, extra=event_fields(
                "stop", {"taps": taps, "reader_reopens": reader_reopens}))
