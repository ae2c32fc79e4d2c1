"""The terminal daemon: wait for a card, run the tap, report it, wait for the card to leave.

One presentation is one tap: after a tap the card must leave the field before it is taken
again, so a card held over the reader is not charged twice; a card presented again after an
interrupted tap completes that tap (``Terminal``'s re-tap rule), never pays twice. A card found
again within REPRESENT_GUARD_S of its tap ending is taken for the same presentation (a missed
presence check, a reader glitch), not charged again. Work that
needs no card (durable commit marks, the WAL checkpoint) runs once the card has left.

Signals only set a flag (``stop``): the tap in progress finishes, then the loop ends; every wait
in the loop is short, so a stop takes effect within about a second. A reader that fails (or
cannot be opened) is closed and opened again with backoff, from 0.1 s doubling up to 1 s, so a
reader that comes back is in use again within about a second; the daemon does not crash for it.
An outage is logged once when it starts (and again if its cause changes) and once when it ends.

What it reports goes to ``on_event`` as typed values (``events.py``): a :class:`TapEvent` per
presentation, :class:`ReaderUp` when an opened reader first answers a poll (and when it answers
again after an outage), :class:`ReaderDown` when an outage starts or its cause changes. Hooks for
a supervisor (:func:`~farebox.terminal.daemon.run.run` wires them to sd_notify and metrics):
``on_pass`` runs on every pass of the loop, during every backoff pause and while waiting for a
card to leave, at least every POLL_WINDOW_S (plus the time a tap takes), so a watchdog fed from it
stays fed with no card and with no reader; ``on_idle`` between cards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from farebox.protocol.errors import FelicaError, TransportError
from farebox.protocol.frames import SYSTEM_CODE_LITE_S
from farebox.protocol.reader import Reader
from farebox.protocol.session import LiteSSession

from farebox.terminal.core.clock import now_utc
from farebox.terminal.core.rules import Tariff
from farebox.terminal.card.tap import RequestRefused, TapInterrupted, Terminal
from farebox.terminal.daemon.events import DaemonEvent, ReaderDown, ReaderUp, TapEvent

LOG = logging.getLogger("farebox.terminal.daemon.loop")

POLL_WINDOW_S = 0.25  # one wait for a card; the stop flag is checked between waits
REMOVAL_WINDOW_S = 0.1
#: A card found again this soon after its completed tap was seen to end (the removal seen, or
#: the reader failing while waiting for it) is the same presentation, not a new one: a presence
#: check that missed a slow card, or a reader glitch, must not charge it twice. No hand takes a
#: card out of the field and back this fast (a sense finds a card still there within a few ms).
REPRESENT_GUARD_S = 0.2
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 1.0


@dataclass
class DaemonStats:
    """What one run served: presentations, readers reopened, presentations by outcome (the
    decline reason, "approved", or "incomplete")."""

    taps: int = 0
    reader_reopens: int = 0
    outcomes: dict = field(default_factory=dict)


class Daemon:
    def __init__(self, terminal: Terminal, open_reader: Callable[[], Reader], tariff: Tariff, *,
                 on_event: Callable[[DaemonEvent], None], max_taps: int | None = None,
                 clock: Callable[[], datetime] = now_utc,
                 on_ready: Callable[[Reader], None] = lambda reader: None,
                 on_idle: Callable[[], None] = lambda: None,
                 on_pass: Callable[[], None] = lambda: None) -> None:
        self.terminal = terminal
        self.open_reader = open_reader
        self.tariff = tariff
        self.on_event = on_event
        self.on_ready = on_ready
        self.on_idle = on_idle
        self.on_pass = on_pass
        self.max_taps = max_taps
        self.clock = clock
        self.stop_requested = False
        self.stats = DaemonStats()
        self._reader: Reader | None = None
        self._backoff_s = BACKOFF_FIRST_S
        self._outage: str | None = None  # the error of the reader outage in progress
        self._answering = False  # the reader in use has answered a poll since it was opened
        self._last_card: tuple[bytes, float] | None = None  # (IDm, when its tap was seen to end)

    def stop(self, *_args) -> None:
        """Ask the loop to end after the tap in progress (safe from a signal handler)."""
        self.stop_requested = True

    def run(self) -> DaemonStats:
        try:
            while not self._done():
                self.on_pass()
                reader = self._ensure_reader()
                if reader is None:
                    break
                try:
                    found = reader.wait_for_card(SYSTEM_CODE_LITE_S, POLL_WINDOW_S)
                except TransportError as error:
                    self._lost_reader(error)
                    continue
                self._reader_works()
                if found is None:
                    self.on_idle()
                    continue
                if self._same_presentation(found.idm):
                    LOG.info("card %s found again right after its tap: the same presentation, "
                             "not charged again", found.idm.hex())
                    self._await_removal(reader)
                    self._last_card = (found.idm, time.monotonic())
                    continue
                completed = self._tap(reader, found)
                if self._done():
                    break
                self._await_removal(reader)
                # a tap without a result (interrupted, refused, nothing written) is not guarded:
                # the card may come straight back to complete it
                self._last_card = (found.idm, time.monotonic()) if completed else None
                self.terminal.idle()  # the card has left: marks durable, checkpoint
                self.on_idle()
        finally:
            self.terminal.idle()
            if self._reader is not None:
                self._reader.close()
        return self.stats

    def _done(self) -> bool:
        return self.stop_requested or (self.max_taps is not None
                                       and self.stats.taps >= self.max_taps)

    def _same_presentation(self, idm: bytes) -> bool:
        return (self._last_card is not None and self._last_card[0] == idm
                and time.monotonic() - self._last_card[1] < REPRESENT_GUARD_S)

    def _tap(self, reader: Reader, found) -> bool:
        """Run one tap and report it; True when it produced a result (approved or declined)."""
        started = time.perf_counter()
        session = LiteSSession(reader)
        session.activate(found)
        result = interrupted = error = None
        try:
            result = self.terminal.pay(session, self.tariff, self.clock())
        except TapInterrupted as cut:
            interrupted, error = cut.tap_id, str(cut)
        except RequestRefused as refused:
            error = str(refused)
        except FelicaError as failed:  # before anything was written
            error = f"the card left the field ({failed}); nothing was written"
        self.stats.taps += 1
        key = (result.reason.value if result.reason else "approved") if result else "incomplete"
        self.stats.outcomes[key] = self.stats.outcomes.get(key, 0) + 1
        self.on_event(TapEvent(result, reader.name, found.idm,
                               round((time.perf_counter() - started) * 1000, 2),
                               interrupted, error))
        return result is not None

    def _await_removal(self, reader: Reader) -> None:
        while not self.stop_requested:
            self.on_pass()
            try:
                if reader.wait_for_removal(REMOVAL_WINDOW_S):
                    return
            except TransportError as error:
                self._lost_reader(error)
                return

    def _ensure_reader(self) -> Reader | None:
        while self._reader is None and not self.stop_requested:
            try:
                self._reader = self.open_reader()
            except (TransportError, OSError, ValueError) as error:
                self._report_outage(f"reader not available ({error})")
                self._back_off()
                continue
            self._answering = False
            self.on_ready(self._reader)
        return self._reader

    def _lost_reader(self, error: Exception) -> None:
        """Close a reader that failed; the next ``_ensure_reader`` opens it again after a pause."""
        self._report_outage(f"reader failed ({error})")
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:  # a reader that is gone may fail to close too
                LOG.debug("closing the failed reader", exc_info=True)
        self._reader = None
        self._answering = False
        self.stats.reader_reopens += 1
        self._back_off()

    def _report_outage(self, what: str) -> None:
        if what != self._outage:
            LOG.warning("%s; trying again with backoff up to %.0f s", what, BACKOFF_MAX_S)
            self._outage = what
            self.on_event(ReaderDown(what))
        else:
            LOG.debug("%s; trying again in %.1f s", what, self._backoff_s)

    def _back_off(self) -> None:
        self._sleep(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)

    def _reader_works(self) -> None:
        name = self._reader.name if self._reader else "?"
        if self._outage is not None:
            LOG.warning("reader %s works again", name)
            self._outage = None
        if not self._answering:
            self._answering = True
            self.on_event(ReaderUp(name))
        self._backoff_s = BACKOFF_FIRST_S

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            self.on_pass()
            time.sleep(max(0.0, min(0.05, deadline - time.monotonic())))
