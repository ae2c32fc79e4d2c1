"""The one place that assembles a terminal: from a :class:`TerminalConfig` to a running
:class:`Terminal`, and from a reader spec to a :class:`Reader`. The CLI, the demo, the daemon and
every later command use only these.

Reader specs: ``sim:CARD.json`` (a simulated card file in this process), ``udp:HOST:PORT``
(nfcpy's UDP simulation link), ``usb[:VID:PID]`` and ``tty:...`` (nfcpy readers), ``pcsc[:NAME]``
(a PC/SC reader through pcscd).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import platformdirs

from farebox.protocol.errors import TransportError
from farebox.protocol.reader import Reader
from farebox.protocol.sim.card import CardFileError, Faults

from farebox.terminal.errors import BadInput
from farebox.terminal.link.actionlist import ActionListError, load_action_list
from farebox.terminal.config import ConfigError, TerminalConfig
from farebox.terminal.store.identity import (
    IDENTITY_FILE, IdentityError, TerminalIdentity, check_terminal_id, init_identity, load_identity,
)
from farebox.terminal.store.journal import Journal, JournalBroken, JournalError
from farebox.terminal.store.private import private_directory
from farebox.terminal.card.keys import KeyFileError, KeyStore, open_key_store, parse_key_source
from farebox.terminal.link.fetch import HeldList, fetch, held_list, keep_good
from farebox.terminal.link.upload import ClearingHouse, clearing_house, tls_verify
from farebox.terminal.core.rules import ListEntry
from farebox.terminal.core.clock import now_utc
from farebox.terminal.link.signedlist import SignedList, SignedListError
from farebox.terminal.store.settlement import BatchPolicy, Settlement, SettlementError
from farebox.terminal.card.present import CardReaders
from farebox.terminal.card.tap import Terminal

LOG = logging.getLogger("farebox.terminal.runtime")
JOURNAL_FILE = "journal.sqlite3"
READER_KINDS = ("sim", "udp", "usb", "tty", "pcsc")


class RuntimeSetupError(BadInput, ValueError):
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
        from farebox.protocol.sim.inprocess import CardFileReader, InProcessTransport

        try:
            if not writable:
                from farebox.protocol.sim.cardfile import load_card

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


def card_readers(*, faults: Faults | None = None, wait_s: float | None = None,
                 again: str = "tap", pcsc_mode: str = "auto") -> CardReaders:
    """How a command finds the cards it works on (terminal/card/present.py) through the readers
    :func:`open_transport` opens: ``wait_s`` None for a tap (it polls the card itself), else
    how long to wait for the card; ``again`` is what a customer whose card left is asked to do
    ("tap" or "present")."""
    return CardReaders(partial(open_transport, pcsc_mode=pcsc_mode), faults, wait_s, again)


def load_keys(config: TerminalConfig) -> KeyStore:
    """The configured key store (test keys, a key file, a PKCS#11 token), for looking at cards:
    :func:`money_keys` is the one for moving money. Close it when done."""
    try:
        return open_key_store(parse_key_source(config.keys))
    except (KeyFileError, ValueError) as error:
        raise RuntimeSetupError(f"keys: {error}") from None


TEST_KEYS_REFUSED = ('keys: the published test keys are refused (anyone can make a card they '
                     'approve): set keys = "file:PATH" or "pkcs11:..." in the configuration, or '
                     'allow_test_keys = true for a demo')


def refuse_test_keys(config: TerminalConfig) -> None:
    """RuntimeSetupError when the configuration would move money with the published test keys
    without saying ``allow_test_keys = true`` (a configuration file that names them, or names no
    keys; the built-in defaults without a file allow them: the demo, simulated cards)."""
    if config.keys == "test" and not config.allow_test_keys:
        raise RuntimeSetupError(TEST_KEYS_REFUSED)


def money_keys(config: TerminalConfig) -> KeyStore:
    """The key store for a terminal that moves money: the test keys only where allowed."""
    refuse_test_keys(config)
    return load_keys(config)


def open_journal(config: TerminalConfig) -> Journal:
    try:
        return Journal(state_dir(config) / JOURNAL_FILE, terminal_id=config.terminal_id)
    except JournalBroken:
        raise  # a damaged journal is not bad input: exit 3
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
    except JournalBroken:
        raise
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


def batch_policy(config: TerminalConfig) -> BatchPolicy:
    return BatchPolicy(config.batch_max_records, config.batch_max_age_s,
                       timedelta(days=config.batch_retention_days))


def fetched_action_list(config: TerminalConfig, now: datetime | None = None) -> HeldList:
    """The list fetched from the clearing house in force in the state, looked at only (see
    ``terminal/link/fetch.py``): verified with ``clearing_public_key`` when configured, else
    with the key kept with it at fetch time; ``now`` (default: this clock) judges "issued in
    the future"."""
    return held_list(state_dir(config), config.clearing_public_key,
                     now if now is not None else now_utc(), config.list_bounds)


def action_lists(config: TerminalConfig, now: datetime | None = None
                 ) -> tuple[tuple[ListEntry, ...], HeldList]:
    """The configured action-list file's entries and those of the list fetched from the
    clearing house, both applied at every tap with or without a configuration, and the fetched
    list's state. A fetched list that no longer verifies leaves the last good one in force,
    said on the log (warning); with no good one, nothing says which cards are listed and the
    terminal takes no money (RuntimeSetupError)."""
    try:
        entries = load_action_list(config.action_list) if config.action_list else ()
    except ActionListError as error:
        raise RuntimeSetupError(str(error)) from None
    held = fetched_action_list(config, now)
    if held.refused:
        raise RuntimeSetupError(f"fetched action list: {held.alarm}: the terminal takes no "
                                "money until `farebox actions fetch` replaces it")
    if held.alarm is not None:
        LOG.warning("action list alarm: %s", held.alarm)
    try:
        keep_good(state_dir(config), held)
    except OSError as error:
        LOG.warning("action list: cannot keep the good copy: %s", error.strerror)
    if held.in_force is not None:
        entries += held.in_force.entries
    return entries, held


def load_action_lists(config: TerminalConfig, now: datetime | None = None
                      ) -> tuple[ListEntry, ...]:
    """The entries of :func:`action_lists`."""
    return action_lists(config, now)[0]


def fetch_action_list(config: TerminalConfig, url: str | None, now: datetime
                      ) -> tuple[SignedList, bool]:
    """Fetch, verify and keep the clearing house's action list; ``(list, changed)``."""
    url = url or config.clearing_url
    if url is None:
        raise RuntimeSetupError("give --url (or clearing_url in --config)")
    if config.clearing_public_key is None:
        raise RuntimeSetupError("clearing_public_key is not configured: an action list cannot "
                                "be verified without it (farebox clearing key prints it)")
    try:
        private_directory(state_dir(config))  # 0700 if this fetch is the first to make it
        return fetch(url, state_dir(config), config.clearing_public_key, now,
                     config.list_bounds, tls=tls_verify(config.clearing_ca_bundle))
    except SignedListError as error:
        raise RuntimeSetupError(f"action list refused: {error}") from None
    except Exception as error:  # httpx.HTTPError and OSError: the house cannot be reached
        if type(error).__module__.startswith("httpx") or isinstance(error, OSError):
            raise RuntimeSetupError(f"cannot fetch the action list from {url}: "
                                    f"{type(error).__name__}") from None
        raise


def clearing_house_for(config: TerminalConfig, url: str | None = None) -> ClearingHouse:
    """Where this terminal uploads its batches: ``url`` (else ``clearing_url``) with
    ``clearing_public_key``, ``clearing_ca_bundle`` and ``clearing_insecure_http``, checked
    before anything is sent (UploadSetupError, exit 2, naming the setting). ``farebox upload``
    and the daemon's uploader both come here."""
    url = url or config.clearing_url
    if url is None:
        raise RuntimeSetupError("give --url (or clearing_url in --config)")
    return clearing_house(url, config.clearing_public_key, ca_bundle=config.clearing_ca_bundle,
                          insecure_http=config.clearing_insecure_http)


@contextmanager
def open_terminal(config: TerminalConfig) -> Iterator[Terminal]:
    """A Terminal over the configured state directory's journal, keys and action list. On the
    way out it does the work kept off the in-field path (durable commit marks, checkpoint)."""
    action_list, held = action_lists(config)
    keys = money_keys(config)
    try:
        journal = open_journal(config)
    except BaseException:
        keys.close()
        raise
    try:
        terminal = Terminal(journal, keys, action_list, config.minimum_add_value_cents,
                            config.retap_window_s, config.max_clock_ahead_s,
                            list_held=config.action_list is not None
                            or held.in_force is not None)
        if held.in_force is not None:
            terminal.list_issued = held.in_force.issued
        journal.start_wal()  # the WAL's header is synced now, not in the first tap's intent
        yield terminal
        terminal.idle(closing=True)
    finally:
        journal.close()
        keys.close()


__all__ = ["ConfigError", "ReaderSpec", "RuntimeSetupError", "TerminalConfig", "action_lists",
           "batch_policy", "card_readers", "default_state_dir", "fetch_action_list",
           "fetched_action_list", "init_terminal", "load_action_lists", "load_keys", "money_keys",
           "open_journal", "open_settlement", "open_terminal", "open_transport",
           "refuse_test_keys", "state_dir", "clearing_house_for"]
