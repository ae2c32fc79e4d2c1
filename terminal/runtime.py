"""The one place that assembles a terminal: from a :class:`TerminalConfig` to a running
:class:`Terminal`, and from a reader spec to a :class:`Reader`. The CLI, the demo, the daemon and
every later command use only these.

Reader specs: ``sim:CARD.json`` (a simulated card file in this process), ``udp:HOST:PORT``
(nfcpy's UDP simulation link), ``usb[:VID:PID]`` and ``tty:...`` (nfcpy readers), ``pcsc[:NAME]``
(a PC/SC reader through pcscd).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import platformdirs

from farebox.protocol.errors import TransportError
from farebox.protocol.reader import Reader
from farebox.protocol.simcard import CardFileError, Faults

from .actionlist import ActionListError, load_action_list
from .config import ConfigError, TerminalConfig
from .identity import (
    IDENTITY_FILE, IdentityError, TerminalIdentity, check_terminal_id, init_identity, load_identity,
)
from .journal import Journal, JournalError
from .keys import KeyFileError, SoftwareKeyStore, load_key_file, published_test_keys
from .settlement import BatchCloser, BatchPolicy, Settlement, SettlementError
from .tap import Terminal
from .upload import BackgroundUploader

LOG = logging.getLogger("farebox.terminal.runtime")

JOURNAL_FILE = "journal.sqlite3"
READER_KINDS = ("sim", "udp", "usb", "tty", "pcsc")


class RuntimeSetupError(ValueError):
    """Something the terminal needs cannot be set up from what it was given (a bad config value,
    an unusable card, list, key or journal file); the message is one line naming it."""


def default_state_dir() -> Path:
    return platformdirs.user_data_path("farebox")


def state_dir(config: TerminalConfig) -> Path:
    return config.state_dir if config.state_dir is not None else default_state_dir()


@dataclass(frozen=True)
class ReaderSpec:
    kind: str  # one of READER_KINDS
    target: str  # what follows "kind:" ("" when nothing does)

    @classmethod
    def parse(cls, spec: str) -> ReaderSpec:
        kind, _, target = spec.partition(":")
        if kind not in READER_KINDS:
            raise RuntimeSetupError(f"reader {spec!r}: expected one of sim:CARD.json, "
                                    "udp:HOST:PORT, usb[:VID:PID], tty:PORT, pcsc[:NAME]")
        if kind in ("sim", "udp", "tty") and not target:
            raise RuntimeSetupError(f"reader {spec!r}: {kind}: needs a target after the colon")
        if kind == "udp":
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise RuntimeSetupError(f"reader {spec!r}: expected udp:HOST:PORT")
        return cls(kind, target)

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind


def open_transport(spec: str | ReaderSpec, *, faults: Faults | None = None,
                   writable: bool = True, pcsc_mode: str = "auto") -> Reader:
    """Open the reader a spec names. ``faults`` (simulated cards only) makes the card leave the
    field or tear a write; ``writable=False`` opens a card file for looking only (no lock);
    ``pcsc_mode`` forces how a PC/SC reader carries FeliCa frames ("acr122u" direct transmit or
    "part3" transparent exchange; "auto" picks by reader name and ATR)."""
    spec = spec if isinstance(spec, ReaderSpec) else ReaderSpec.parse(spec)
    if spec.kind == "sim":
        from farebox.protocol.transports.inprocess import CardFileReader, InProcessTransport

        try:
            if not writable:
                from farebox.protocol.transports.cardfile import load_card

                reader = InProcessTransport(load_card(spec.target), name=str(spec))
                if faults is not None:
                    reader.card.faults = faults
                return reader
            return CardFileReader(Path(spec.target), faults=faults)
        except CardFileError as error:
            raise RuntimeSetupError(str(error)) from None
    if faults is not None:
        raise RuntimeSetupError(f"reader {spec}: faults can only be injected into a simulated "
                                "card (sim:CARD.json)")
    try:
        if spec.kind in ("udp", "usb", "tty"):
            try:
                from farebox.protocol.transports.nfcpy_reader import NfcpyReader
            except ImportError:
                raise RuntimeSetupError(f"reader {spec}: nfcpy is not installed "
                                        "(pip install 'farebox[nfc]')") from None
            return NfcpyReader(str(spec))
        try:
            from farebox.protocol.transports.pcsc import PcscReader
        except ImportError:
            raise RuntimeSetupError(f"reader {spec}: pyscard is not installed "
                                    "(pip install 'farebox[pcsc]')") from None
        return PcscReader(str(spec), None if pcsc_mode == "auto" else pcsc_mode)
    except TransportError as error:
        raise RuntimeSetupError(f"reader {spec}: {error}") from None


def load_keys(config: TerminalConfig) -> SoftwareKeyStore:
    if config.keys == "test":
        return published_test_keys()
    try:
        return load_key_file(Path(config.keys.removeprefix("file:")))
    except KeyFileError as error:
        raise RuntimeSetupError(f"keys: {error}") from None


def open_journal(config: TerminalConfig) -> Journal:
    try:
        return Journal(state_dir(config) / JOURNAL_FILE, terminal_id=config.terminal_id)
    except JournalError as error:
        raise RuntimeSetupError(str(error)) from None


def init_terminal(config: TerminalConfig, terminal_id: str, now: datetime) -> TerminalIdentity:
    """Create the terminal's identity (key, incarnation) in its state directory; the journal there
    (created if there is none) must belong to ``terminal_id``."""
    try:
        check_terminal_id(terminal_id)
        directory = state_dir(config)
        if config.terminal_id is not None and config.terminal_id != terminal_id:
            raise RuntimeSetupError(f"--id {terminal_id} but the configuration says terminal_id "
                                    f"{config.terminal_id}")
        if (directory / IDENTITY_FILE).exists():
            load_identity(directory)  # says what is there, or that it is damaged
        Journal(directory / JOURNAL_FILE, terminal_id=terminal_id).close()
        return init_identity(directory, terminal_id, now)
    except (IdentityError, JournalError) as error:
        raise RuntimeSetupError(str(error)) from None
    except OSError as error:
        raise RuntimeSetupError(f"state directory {state_dir(config)}: {error.strerror}") from None


@contextmanager
def open_settlement(config: TerminalConfig) -> Iterator[Settlement]:
    """The terminal's settlement batches, over its journal, signed with its identity."""
    directory = state_dir(config)
    try:
        identity = load_identity(directory)
    except IdentityError as error:
        raise RuntimeSetupError(str(error)) from None
    journal = open_journal(config)
    try:
        try:
            yield Settlement(journal, identity)
        except SettlementError as error:
            raise RuntimeSetupError(str(error)) from None
    finally:
        journal.close()


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
    return BatchCloser(settlement, BatchPolicy(config.batch_max_records, config.batch_max_age_s),
                       clock, on_closed=on_closed)


def start_uploader(config: TerminalConfig, clock: Callable[[], datetime]
                   ) -> BackgroundUploader | None:
    """The daemon's background uploads to ``config.clearing_url`` (None when there is none, or
    no identity to upload as: said once on the log)."""
    if config.clearing_url is None:
        return None
    try:
        identity = load_identity(state_dir(config))
    except IdentityError as error:
        LOG.warning("batches are not uploaded: %s", error)
        return None

    def open_own() -> Settlement:  # on the uploader's thread: SQLite objects stay on theirs
        return Settlement(open_journal(config), identity)

    return BackgroundUploader(open_own, config.clearing_url, clock,
                              config.upload_interval_s).start()


@contextmanager
def open_terminal(config: TerminalConfig) -> Iterator[Terminal]:
    """A Terminal over the configured state directory's journal, keys and action list. On the
    way out it does the work kept off the in-field path (durable commit marks, checkpoint)."""
    try:
        action_list = load_action_list(config.action_list) if config.action_list else ()
    except ActionListError as error:
        raise RuntimeSetupError(str(error)) from None
    keys = load_keys(config)
    journal = open_journal(config)
    try:
        terminal = Terminal(journal, keys, action_list, config.minimum_add_value_cents,
                            config.retap_window_s)
        yield terminal
        terminal.idle()
    finally:
        journal.close()


__all__ = ["ConfigError", "ReaderSpec", "RuntimeSetupError", "TerminalConfig", "default_state_dir",
           "batch_closer", "init_terminal", "start_uploader", "open_journal", "open_settlement", "open_terminal", "open_transport",
           "state_dir"]
