"""Finding the card a command works on and building its session, written once: open the reader a
spec names (a card file ``sim:CARD.json`` or a reader), wait for a FeliCa Lite-S card, start a
:class:`LiteSSession` on it, close the reader whatever happens. A card that does not answer as
it should before anything was written becomes one of this module's errors, worded once:

* :class:`NoCard`: no card answered in time (nothing was done);
* :class:`CardUnusable`: the card does not work with this terminal (nothing was done);
* :class:`ReaderUnusable`: the reader failed before any card was found (pcscd cannot be
  reached, the reader went away): nothing was done, and it is not the card's fault;
* :class:`CardLeft`: the card left the field before anything was written (a simulated
  pull-away): present it again.

A card write cut off after its journal intent is the tap's :class:`TapInterrupted` (or the
desk's ``IssueInterrupted``) instead: those shells catch the card errors of their writes.
The readers themselves are opened by ``farebox.terminal.runtime`` (:func:`card_readers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from farebox.cardimage.errors import InvalidCard
from farebox.cardimage.image import decode_image
from farebox.cardimage.layout import FULL_READ_BLOCKS
from farebox.cardimage.model import CardImage
from farebox.protocol.errors import FelicaError, TransportError, TransportTimeout
from farebox.protocol.frames import SYSTEM_CODE_LITE_S, PollingResponse
from farebox.protocol.reader import Reader
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults

from farebox.terminal.card.keys import SoftwareKeyStore
from farebox.terminal.errors import BadInput, Interrupted

SIM = "sim:"


class NoCard(BadInput, ValueError):
    """No FeliCa Lite-S card answered on the reader in time; nothing was done."""


class CardUnusable(BadInput, ValueError):
    """The card does not answer as a FeliCa Lite-S card of this scheme should (or does not
    verify), found before anything was written; nothing was done."""


class ReaderUnusable(BadInput, ValueError):
    """The reader failed before any card was found (pcscd cannot be reached, the reader went
    away): nothing was done, and nothing is wrong with the card."""


class CardLeft(Interrupted, RuntimeError):
    """The card left the field before anything was written (a simulated pull-away): nothing was
    written; present the card again."""


def label(spec: str) -> str:
    """How messages name the card: a card file by its path, a reader by its spec."""
    return spec.removeprefix(SIM)


def is_card_file(spec: str) -> bool:
    """A card file can be read (and checked) and then changed; a card held to a reader is
    presented once."""
    return spec.startswith(SIM)


@dataclass(frozen=True)
class CardReaders:
    """How one command finds its cards.

    ``open_reader(spec, faults=..., writable=...)`` opens a reader (``runtime.open_transport``).
    ``faults`` (card files only) makes the card leave the field or tear a write; ``wait_s``
    None starts the session without waiting (the tap polls the card itself: a card file is
    always there), else the card is waited for that long; ``again`` is what the customer is
    asked to do with a card that left ("tap" or "present")."""

    open_reader: Callable[..., Reader]
    faults: Faults | None = None
    wait_s: float | None = None
    again: str = "tap"

    @contextmanager
    def session(self, spec: str, *, look: bool = False,
                inject_faults: bool = True) -> Iterator[LiteSSession]:
        """A session on the card ``spec`` names, the reader closed on the way out. ``look``:
        read only (a card file is not locked, no faults). A FeliCa error out of the body (before
        anything was written: the shells catch those of their writes) is CardLeft when a fault
        was injected, else CardUnusable."""
        faults = None if look or not inject_faults else self.faults
        reader = self.open_reader(spec, faults=faults, writable=not look)
        try:
            session = LiteSSession(reader)
            if self.wait_s is not None:
                found = (reader.wait_for_card(SYSTEM_CODE_LITE_S, self.wait_s)
                         if is_card_file(spec) else
                         wait_for_card(reader, SYSTEM_CODE_LITE_S, self.wait_s, label(spec)))
                if found is None:
                    raise NoCard(f"{label(spec)}: no card answered within {self.wait_s:g} s")
                session.activate(found)
            yield session
        except FelicaError as error:
            if faults is not None:  # the pull-away asked for
                raise CardLeft(f"the card left the field ({error}); nothing was written; "
                               f"{self.again} the card again") from None
            raise CardUnusable(f"{label(spec)}: the card does not work with this terminal "
                               f"({error})") from None
        finally:
            reader.close()

    def look(self, spec: str, keys: SoftwareKeyStore) -> CardImage:
        """Read, verify and decode the whole card ``spec`` names; nothing is written."""
        with self.session(spec, look=True) as session:
            try:
                return read_card(session, keys)
            except InvalidCard as error:
                raise CardUnusable(f"{label(spec)}: invalid card: {error}") from None


def wait_for_card(reader: Reader, system_code: int, timeout_s: float,
                  name: str | None = None) -> PollingResponse | None:
    """``reader.wait_for_card``, with the reader's own failure before any card answered (pcscd
    cannot be reached, the reader went away: a TransportError that is not a timeout) said as
    :class:`ReaderUnusable`, not blamed on a card."""
    try:
        return reader.wait_for_card(system_code, timeout_s)
    except TransportError as error:
        if isinstance(error, TransportTimeout):
            raise
        raise ReaderUnusable(f"{name or reader.name}: the reader cannot be used: {error}"
                             ) from None


def read_card(session: LiteSSession, keys: SoftwareKeyStore) -> CardImage:
    """Poll (unless the session already has the card), read every data block, verify, decode.
    Raises FelicaError (the card does not answer as a Lite-S should) or InvalidCard."""
    if session.idm is None:
        session.poll()
    idm = session.idm
    raw = dict(zip(FULL_READ_BLOCKS, session.read_blocks(FULL_READ_BLOCKS)))
    return decode_image(raw, idm, lambda version: keys.card_key(version, idm))


__all__ = ["CardLeft", "CardReaders", "CardUnusable", "NoCard", "ReaderUnusable", "is_card_file",
           "label", "read_card", "wait_for_card"]
