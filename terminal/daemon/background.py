"""The daemon's work beside the taps: closing settlement batches between cards, uploading them
(and fetching the action list) on a thread of its own, and putting a newly fetched action list
into force. Only the daemon runs these; the commands do the same work once, on demand."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from farebox.terminal.card.tap import Terminal
from farebox.terminal.config import TerminalConfig
from farebox.terminal.link.fetch import FETCHED_FILE, GOOD_FILE
from farebox.terminal.link.signedlist import SignedList
from farebox.terminal.link.upload import BackgroundUploader, UploadSetupError
from farebox.terminal.runtime import (
    RuntimeSetupError, action_lists, batch_policy, fetch_action_list, fetched_action_list,
    open_journal, state_dir,
)
from farebox.terminal.runtime import clearing_house_for
from farebox.terminal.store.identity import IdentityError, load_identity
from farebox.terminal.store.settlement import BatchCloser, Settlement, SettlementError

LOG = logging.getLogger("farebox.terminal.daemon.background")


def batch_closer(config: TerminalConfig, terminal: Terminal, clock: Callable[[], datetime],
                 on_closed: Callable[[], None] = lambda: None) -> BatchCloser | None:
    """The daemon's batch closer over ``terminal``'s journal, or None (said once on the log)
    when the state has no terminal identity to sign batches with."""
    try:
        identity = load_identity(state_dir(config))
        settlement = Settlement(terminal.journal, identity)
    except (IdentityError, SettlementError) as error:
        LOG.warning("batches are not closed: %s", error)
        return None
    return BatchCloser(settlement, batch_policy(config), clock, on_closed=on_closed)


def start_uploader(config: TerminalConfig, clock: Callable[[], datetime], *,
                   on_synced: Callable[[], None] = lambda: None,
                   on_fetched: Callable[[], None] = lambda: None) -> BackgroundUploader | None:
    """The daemon's background uploads to ``config.clearing_url`` (None when there is none; or
    when it cannot be uploaded to as configured, e.g. no ``clearing_public_key`` to verify acks
    with (``farebox doctor`` fails on it), or there is no identity to upload as: said once on
    the log). ``on_synced`` after a round that leaves nothing unacknowledged, ``on_fetched``
    after each action list fetched and verified (both on the uploader's thread)."""
    if config.clearing_url is None:
        return None
    try:
        house = clearing_house_for(config)
        identity = load_identity(state_dir(config))
    except (UploadSetupError, IdentityError) as error:
        LOG.warning("batches are not uploaded: %s", error)
        return None

    def open_own() -> Settlement:  # on the uploader's thread: SQLite objects stay on theirs
        return Settlement(open_journal(config), identity)

    def fetch_list() -> None:
        _, changed = fetch_action_list(config, None, clock())
        on_fetched()
        if changed:
            LOG.info("fetched a new action list")

    return BackgroundUploader(open_own, house, clock, config.upload_interval_s,
                              also=fetch_list if config.clearing_public_key else None,
                              on_synced=on_synced).start()


class ActionListReloader:
    """The daemon's idle hook that puts a newly fetched action list into force: when the held
    list's files change, the terminal's entries are loaded again (a list that no longer verifies
    leaves the last good one in force, with an alarm on the log; with none, the entries in force
    are kept). ``on_status(alarm, in_force)`` hears at start and after every change whether an
    alarm stands and which list is in force (the metrics)."""

    def __init__(self, config: TerminalConfig, terminal: Terminal,
                 on_status: Callable[[bool, SignedList | None], None] | None = None) -> None:
        self.config = config
        self.terminal = terminal
        self.on_status = on_status
        directory = state_dir(config)
        self._paths = (directory / FETCHED_FILE, directory / GOOD_FILE)
        self._stamp = self._current_stamp()
        held = fetched_action_list(config) if on_status is not None else None
        self._in_force = held.in_force if held is not None else None
        self._report(held is not None and held.alarm is not None)

    def _current_stamp(self) -> tuple:
        stamps = []
        for path in self._paths:
            try:
                stat = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(stamps)

    def _report(self, alarm: bool) -> None:
        if self.on_status is not None:
            self.on_status(alarm, self._in_force)

    def __call__(self) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            entries, held = action_lists(self.config)
        except RuntimeSetupError as error:
            LOG.warning("%s; keeping the action list in force", error)
            self._report(True)
            return
        self.terminal.action_list = entries
        self.terminal.list_held = (self.config.action_list is not None
                                   or held.in_force is not None)
        self.terminal.list_issued = held.in_force.issued if held.in_force else None
        self._in_force = held.in_force
        self._report(held.alarm is not None)
        LOG.info("action list reloaded: %d entries", len(self.terminal.action_list))
