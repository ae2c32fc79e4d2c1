"""The daemon's Prometheus text endpoint (prometheus-client, imported only when it is switched on).

Served on a loopback address (``metrics_listen = "127.0.0.1:9108"``): the endpoint has no
authentication, so anything further away scrapes it through an agent or tunnel on the terminal,
unless the configuration says ``metrics_allow_remote = true`` (then any address of the host, a
firewall keeping everyone but the Prometheus server out).

What is exported, and who updates it (SQLite objects stay on their own threads: the HTTP thread
only reads numbers the daemon loop and the uploader have set):

- ``farebox_taps_total{outcome, reason}``: every presentation (outcome approved / declined /
  interrupted / error; reason the decline reason, else "").
- ``farebox_tap_duration_seconds``: histogram of a tap's time, poll to report.
- ``farebox_journal_in_doubt``: writes whose landing is not yet known (the daemon loop).
- ``farebox_batches_unacknowledged``: closed batches the clearing house has not acknowledged.
- ``farebox_seconds_since_last_upload``: since the uploader last left nothing unacknowledged (a
  round that sent every batch, or found none to send); +Inf before the first.
- ``farebox_seconds_since_last_action_list_fetch``: since a list was last fetched and verified;
  +Inf before the first.
- ``farebox_action_list_alarm``: 1 while the list fetched last cannot be used (it does not
  verify, was issued in the future, went back or jumped in serial): the last good list is in
  force, or none (the daemon's action-list reloader).
- ``farebox_action_list_serial``: the serial of the fetched list in force (NaN: none).
- ``farebox_action_list_expiry_timestamp_seconds``: when it expires, Unix time (NaN: none); an
  expired list stays in force, alert on ``time() > ...``.
- ``farebox_reader_reopens_total``: readers that failed and were opened again.
- ``farebox_reader_up``: 1 while the reader answers, 0 during an outage.
- ``farebox_action_list_alarm``, ``farebox_action_list_serial``,
  ``farebox_action_list_expiry_timestamp_seconds``: the action list in force (the reloader).
- ``process_*`` (CPU seconds, resident memory, open files, start time), ``python_info`` and
  ``python_gc_*``: prometheus-client's standard process, platform and GC collectors.

Alert rules for these are in ``hw/prometheus/farebox-alerts.yml`` (checked by promtool).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from farebox.terminal.config import MetricsError
from farebox.terminal.link.signedlist import SignedList

LOG = logging.getLogger("farebox.terminal.daemon.metrics")

#: tap latency buckets, seconds: a tap takes tens of milliseconds on a reader
TAP_BUCKETS_S = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
REFRESH_EVERY_S = 1.0


class TerminalMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        from prometheus_client import (
            GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge,
            Histogram,
        )

        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        # the process (CPU seconds, resident memory, open files, start time), the Python
        # interpreter and its garbage collector, as every Prometheus client exports them
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.taps = Counter("farebox_taps", "Card presentations by outcome and decline reason",
                            ["outcome", "reason"], registry=self.registry)
        self.tap_seconds = Histogram("farebox_tap_duration_seconds",
                                     "Time of one tap, from the poll that found the card to the "
                                     "result", buckets=TAP_BUCKETS_S, registry=self.registry)
        self.in_doubt = Gauge("farebox_journal_in_doubt",
                              "Card writes whose landing is not yet known", registry=self.registry)
        self.batches_pending = Gauge("farebox_batches_unacknowledged",
                                     "Closed settlement batches not yet acknowledged",
                                     registry=self.registry)
        self.reader_reopens = Counter("farebox_reader_reopens",
                                      "Readers that failed and were opened again",
                                      registry=self.registry)
        self.reader_up = Gauge("farebox_reader_up", "1 while the reader answers",
                               registry=self.registry)
        self.last_upload: float | None = None  # set by the uploader thread
        self.last_fetch: float | None = None
        Gauge("farebox_seconds_since_last_upload",
              "Seconds since the uploader last left no batch unacknowledged",
              registry=self.registry).set_function(lambda: self._since(self.last_upload))
        Gauge("farebox_seconds_since_last_action_list_fetch",
              "Seconds since the action list was last fetched and verified",
              registry=self.registry).set_function(lambda: self._since(self.last_fetch))
        self.list_alarm = Gauge("farebox_action_list_alarm",
                                "1 while the action list fetched last cannot be used (the last "
                                "good list, or none, is in force)", registry=self.registry)
        self.list_serial = Gauge("farebox_action_list_serial",
                                 "Serial of the fetched action list in force (NaN: none)",
                                 registry=self.registry)
        self.list_expiry = Gauge("farebox_action_list_expiry_timestamp_seconds",
                                 "When the fetched action list in force expires, Unix time "
                                 "(NaN: none)", registry=self.registry)
        self.list_serial.set(math.nan)
        self.list_expiry.set(math.nan)
        self._reopens_seen = 0
        self._refreshed: float | None = None
        self.server = None

    def _since(self, at: float | None) -> float:
        return math.inf if at is None else round(self.clock() - at, 3)

    # ---- updates (daemon loop and uploader threads) -------------------------------------------

    def tap(self, outcome: str, reason: str | None, tap_ms: float) -> None:
        self.taps.labels(outcome, reason or "").inc()
        self.tap_seconds.observe(tap_ms / 1000)

    def uploaded(self) -> None:
        self.last_upload = self.clock()

    def fetched(self) -> None:
        self.last_fetch = self.clock()

    def action_list(self, alarm: bool, in_force: SignedList | None) -> None:
        """The action-list reloader's word: whether an alarm stands, and the list in force."""
        self.list_alarm.set(1 if alarm else 0)
        self.list_serial.set(math.nan if in_force is None else in_force.serial)
        self.list_expiry.set(math.nan if in_force is None else in_force.expires.timestamp())

    def reader(self, up: bool) -> None:
        self.reader_up.set(1 if up else 0)

    def reopens(self, total: int) -> None:
        if total > self._reopens_seen:
            self.reader_reopens.inc(total - self._reopens_seen)
            self._reopens_seen = total

    def refresh(self, in_doubt: Callable[[], int], unacknowledged: Callable[[], int],
                force: bool = False) -> None:
        """Read the journal's counts (on the daemon's thread), at most every REFRESH_EVERY_S."""
        now = self.clock()
        if not force and self._refreshed is not None and now - self._refreshed < REFRESH_EVERY_S:
            return
        self._refreshed = now
        try:
            self.in_doubt.set(in_doubt())
            self.batches_pending.set(unacknowledged())
        except Exception as error:  # noqa: BLE001 - a busy journal: the next refresh tries again
            LOG.debug("metrics refresh failed: %s", error)

    # ---- serving ---------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> str:
        """Start the HTTP endpoint on its own thread; the URL it serves."""
        from prometheus_client import start_http_server

        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise MetricsError(f"metrics: cannot listen on {host}:{port} "
                               f"({error.strerror or error})") from None
        bound = self.server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}/metrics"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
