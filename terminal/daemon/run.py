"""The terminal daemon as one call: :func:`run` takes a configuration and a reader, serves taps
until it is asked to stop (or has served ``max_taps``), and returns what it served. ``farebox
run`` only parses its options, calls it and prints the events; a test or another program calls
it the same way.

What it sets up, in order, and takes down in the reverse order: the log (when asked to), the
metrics endpoint, sd_notify, the first attempt to open the reader (a card file that cannot be
used is bad input; any other reader that does not open yet is waited for), the terminal (journal,
keys, action lists), the journal's start-up check (``Journal.ensure_whole``: a journal whose
chains are not whole or whose tables disagree with them stops the daemon before it serves a
card), the uploader thread, the batch closer and the action-list reloader, then
SIGTERM/SIGINT handlers that only ask the loop to stop: the tap in progress finishes first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime

from farebox.protocol.reader import Reader

from farebox.terminal.config import TerminalConfig, parse_listen
from farebox.terminal.core.clock import now_utc
from farebox.terminal.daemon.background import ActionListReloader, batch_closer, start_uploader
from farebox.terminal.daemon.events import DaemonEvent, MetricsServing, Started, Stopped
from farebox.terminal.daemon.jsonlog import configure_logging
from farebox.terminal.daemon.loop import Daemon, DaemonStats
from farebox.terminal.daemon.sdnotify import Notifier
from farebox.terminal.daemon.supervise import Supervision
from farebox.terminal.runtime import (
    ReaderSpec, RuntimeSetupError, open_terminal, open_transport, refuse_test_keys,
)

LOOP_LOG = logging.getLogger("farebox.terminal.daemon.loop")
#: how often, between cards, the daemon verifies the journal's new chain entries and moves the
#: checkpoint its next start verifies from (so that start stays short however long it ran)
CHECKPOINT_EVERY_S = 60.0


def run(config: TerminalConfig, reader_spec: ReaderSpec | str,
        on_event: Callable[[DaemonEvent], None] = lambda event: None, *,
        max_taps: int | None = None, stop: threading.Event | None = None,
        verbose: int | None = None, handle_signals: bool = True,
        notifier: Notifier | None = None,
        clock: Callable[[], datetime] = now_utc) -> DaemonStats:
    """Serve taps on the reader ``reader_spec`` names with ``config``'s terminal until a stop is
    asked for (``stop`` set, or SIGTERM/SIGINT when ``handle_signals`` and this is the main
    thread) or ``max_taps`` presentations were served; the stats of the run.

    Every event goes to ``on_event`` (on this thread) after supervision has seen it (sd_notify,
    metrics, and the JSON log when ``config.log_format`` is "json"). ``verbose``: set up the
    process's log (:func:`configure_logging`) at that verbosity; None leaves logging alone.

    Raises :class:`RuntimeSetupError` (a reader spec that does not parse, the published test keys
    where the configuration does not allow them, a card file that cannot be used, a state, key
    or list file or key token the terminal cannot open, no tariff),
    :class:`~farebox.terminal.config.MetricsError` (the endpoint cannot listen) or
    :class:`~farebox.terminal.store.journal.JournalBroken` (a damaged journal) before any tap.
    """
    spec = reader_spec if isinstance(reader_spec, ReaderSpec) else ReaderSpec.parse(reader_spec)
    refuse_test_keys(config)  # before anything starts: no metrics, no reader, no journal
    if config.tariff is None:
        raise RuntimeSetupError("no fares are configured ([fares] in the configuration)")
    json_log = config.log_format == "json"
    if verbose is not None:
        configure_logging(config.log_format, verbose)
    with contextlib.ExitStack() as teardown:
        if notifier is None:
            notifier = Notifier()
            teardown.callback(notifier.close)
        metrics = metrics_url = None
        if config.metrics_listen is not None:
            from farebox.terminal.daemon.metrics import TerminalMetrics

            metrics = TerminalMetrics()
            metrics_url = metrics.serve(*parse_listen(
                config.metrics_listen, allow_remote=config.metrics_allow_remote))
            teardown.callback(metrics.close)
        watch = Supervision(notifier, metrics, log_events=json_log)

        def publish(event: DaemonEvent) -> None:
            watch.observe(event)
            on_event(event)

        if metrics_url is not None:
            publish(MetricsServing(metrics_url))
        watch.waiting(str(spec))
        open_reader = _ReaderOpener(spec, config.pcsc_mode)
        teardown.callback(open_reader.close)
        term = teardown.enter_context(open_terminal(config))
        term.journal.ensure_whole()  # a broken journal: JournalBroken (exit 3), no card served
        uploader = start_uploader(config, clock,
                                  on_synced=metrics.uploaded if metrics else lambda: None,
                                  on_fetched=metrics.fetched if metrics else lambda: None)
        if uploader is not None:
            teardown.callback(uploader.stop)  # stopped before the terminal closes
        closer = batch_closer(config, term, clock,
                              on_closed=uploader.wake if uploader else lambda: None)
        reload_list = ActionListReloader(config, term,
                                         on_status=metrics.action_list if metrics else None)
        unacknowledged = closer.settlement.unacknowledged_count if closer else lambda: 0
        checkpointed = time.monotonic()

        def on_idle() -> None:
            nonlocal checkpointed
            if closer is not None:
                closer()
            reload_list()
            if time.monotonic() - checkpointed >= CHECKPOINT_EVERY_S:
                term.journal.advance_checkpoint()  # a chain broken meanwhile: JournalBroken
                checkpointed = time.monotonic()
            watch.idle(term.journal.in_doubt_count, unacknowledged)

        def on_pass() -> None:
            if stop is not None and stop.is_set():
                daemon.stop()
            watch.heartbeat(daemon.stats.reader_reopens)

        daemon = Daemon(term, open_reader, config.tariff, on_event=publish, max_taps=max_taps,
                        clock=clock, on_idle=on_idle, on_pass=on_pass)
        if stop is not None and stop.is_set():
            daemon.stop()
        watch.idle(term.journal.in_doubt_count, unacknowledged, force=True)
        publish(Started(str(spec), term.journal.terminal_id, metrics_url, os.getpid()))
        with _stop_on_signals(daemon.stop, handle_signals):
            try:
                daemon.run()
                term.journal.advance_checkpoint()
            finally:
                publish(Stopped(daemon.stats.taps, daemon.stats.reader_reopens))
    return daemon.stats


class _ReaderOpener:
    """The loop's ``open_reader``: the first reader is opened before the terminal (a card file
    that cannot be used is bad input then, before anything else); a reader that is not there yet
    is said once and left to the loop, which tries again with backoff."""

    def __init__(self, spec: ReaderSpec, pcsc_mode: str) -> None:
        self.spec = spec
        self.pcsc_mode = pcsc_mode
        self._first: Reader | None = None
        try:
            self._first = open_transport(spec, pcsc_mode=pcsc_mode)
        except RuntimeSetupError as error:
            if spec.kind == "sim":
                raise
            LOOP_LOG.warning("%s; waiting for the reader", error)

    def __call__(self) -> Reader:
        if self._first is not None:
            reader, self._first = self._first, None
            return reader
        return open_transport(self.spec, pcsc_mode=self.pcsc_mode)

    def close(self) -> None:
        """Close the first reader if the loop never took it (setup failed after it opened)."""
        if self._first is not None:
            reader, self._first = self._first, None
            reader.close()


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[..., None], wanted: bool) -> Iterator[None]:
    """SIGTERM and SIGINT call ``stop`` (which only sets a flag) while the loop runs; the
    handlers before are put back after. Signals go to the main thread only: elsewhere, none."""
    if not wanted or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["DaemonStats", "configure_logging", "run"]
