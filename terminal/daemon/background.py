"""The daemon's work beside the taps: closing settlement batches between cards, uploading them
(and fetching the action list) on a thread of its own, and putting a newly fetched action list
into force. Only the daemon runs these; the commands do the same work once, on demand."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from farebox.terminal.card.tap import Terminal
from farebox.terminal.config import TerminalConfig
from farebox.terminal.link.fetch import FETCHED_FILE
from farebox.terminal.link.upload import BackgroundUploader, UploadSetupError
from farebox.terminal.runtime import (
    RuntimeSetupError, batch_policy, fetch_action_list, load_action_lists, open_journal, state_dir,
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
    list's file changes, the terminal's entries are loaded again (a list that no longer
    verifies is logged and the entries in force are kept)."""

    def __init__(self, config: TerminalConfig, terminal: Terminal) -> None:
        self.config = config
        self.terminal = terminal
        self._path = state_dir(config) / FETCHED_FILE
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def __call__(self) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.terminal.action_list = load_action_lists(self.config)
        except RuntimeSetupError as error:
            LOG.warning("%s; keeping the action list in force", error)
            return
        LOG.info("action list reloaded: %d entries", len(self.terminal.action_list))
