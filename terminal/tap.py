"""One tap: poll, read, verify, decide, journal, write, read back, commit.

This is the imperative shell around the pure rules; it runs unchanged over the in-process
simulated card, nfcpy and PC/SC readers, since it only sees a :class:`LiteSSession`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from farebox.cardimage.errors import InvalidCard
from farebox.cardimage.image import change_blocks, decode_image
from farebox.cardimage.layout import PURSE_SLOT_BLOCKS, TAP_READ_BLOCKS
from farebox.cardimage.model import CardImage
from farebox.protocol.errors import FelicaError
from farebox.protocol.session import LiteSSession

from .journal import Journal, PendingWrite
from .keys import SoftwareKeyStore
from .rules import (
    DEFAULT_MINIMUM_ADD_VALUE_CENTS, Decision, FareClass, ListEntry, Reason, Record, Tariff,
    decide_add_value, decide_payment,
)


class TapInterrupted(Exception):
    """The card went away (or answered wrongly) after the journal intent was made: the write is
    in doubt and will be resolved when the card is seen again. Ask for the card to be tapped again."""

    def __init__(self, tap_id: str, cause: Exception) -> None:
        super().__init__(f"card write interrupted ({cause}); tap the card again")
        self.tap_id = tap_id
        self.cause = cause


@dataclass(frozen=True)
class TapResult:
    approved: bool
    reason: Reason | None
    card_number: int | None
    amount_cents: int
    balance_before_cents: int | None
    balance_after_cents: int | None
    fare_class: FareClass | None = None
    aavs_reload_cents: int | None = None
    records: tuple[Record, ...] = ()
    counter: int | None = None  # the card's counter after the tap
    commands: int = 0  # card commands this tap used, poll included
    tap_id: str | None = None


class Terminal:
    """The terminal's shell: keys, journal and action list; one method per kind of tap."""

    def __init__(self, journal: Journal, keys: SoftwareKeyStore,
                 action_list: Iterable[ListEntry] = (),
                 minimum_add_value_cents: int = DEFAULT_MINIMUM_ADD_VALUE_CENTS) -> None:
        self.journal = journal
        self.keys = keys
        self.action_list = tuple(action_list)
        self.minimum_add_value_cents = minimum_add_value_cents

    def pay(self, session: LiteSSession, tariff: Tariff, at: datetime) -> TapResult:
        return self._tap(session, at, tariff.fare(FareClass.ADULT),
                         lambda card: decide_payment(card.identity, card.purse, tariff, at,
                                                     self.action_list))

    def add_value(self, session: LiteSSession, amount_cents: int, at: datetime) -> TapResult:
        return self._tap(session, at, amount_cents,
                         lambda card: decide_add_value(card.identity, card.purse, amount_cents, at,
                                                       self.action_list,
                                                       self.minimum_add_value_cents))

    # ---- the transaction -----------------------------------------------------------------

    def _tap(self, session: LiteSSession, at: datetime, amount_cents: int,
             decide: Callable[[CardImage], Decision]) -> TapResult:
        session.poll()
        idm = session.idm
        raw = dict(zip(TAP_READ_BLOCKS, session.read_blocks(TAP_READ_BLOCKS)))
        try:
            card = decode_image(raw, idm, lambda version: self.keys.card_key(version, idm))
        except InvalidCard:
            return TapResult(False, Reason.INVALID_CARD, None, amount_cents, None, None,
                             commands=session.commands)
        number, counter = card.identity.card_number, card.purse.counter
        slot_bytes = _slot_bytes(card, raw)

        self._settle(card, slot_bytes, at)
        memory = self.journal.card_memory(number)
        if memory is not None and (counter < memory.counter or (
                counter == memory.counter and slot_bytes[counter] != memory.slot)):
            # older than what this terminal verified, or a restored copy written again (a fork)
            return TapResult(False, Reason.ROLLBACK, number, amount_cents,
                             card.purse.balance_cents, card.purse.balance_cents, counter=counter,
                             commands=session.commands)

        decision = decide(card)
        if decision.new_purse is None:
            if memory is None or counter > memory.counter:
                self.journal.observe(number, counter, slot_bytes[counter])
            return self._result(decision, number, counter, session)

        card_key = self.keys.card_key(card.identity.key_version, idm)
        writes = change_blocks(card, decision.new_purse, decision.log_entry, card_key)
        tap_id = secrets.token_hex(8)
        pending = self.journal.record_intent(
            tap_id=tap_id, card_number=number, idm=idm, counter_before=counter,
            slot_before=slot_bytes[counter], counter_after=decision.new_purse.counter,
            expected_slot=b"".join(data for _, data in writes[:2]),
            balance_before_cents=decision.balance_before_cents, records=decision.records, at=at)
        try:
            for block, data in writes:
                session.write_block(block, data)
            written = [block for block, _ in writes]
            if session.read_blocks(written) != [data for _, data in writes]:
                raise FelicaError("the written blocks read back different")
        except FelicaError as error:
            raise TapInterrupted(tap_id, error) from error
        # The intent was the one fsync; the card itself now proves this commit if it is lost.
        self.journal.resolve_write(pending, "committed", at, sync=False)
        return self._result(decision, number, decision.new_purse.counter, session, tap_id)

    def _settle(self, card: CardImage, slot_bytes: dict[int, bytes], at: datetime) -> None:
        """Settle writes left in doubt for this card (and voids that turn up), by what it shows.
        Newest first: a retry can write the very bytes an earlier voided attempt would have, and
        only one write can have produced a counter."""
        committed_up_to = 0
        for pending in self.journal.unsettled_writes(card.identity.card_number):
            if pending.counter_after <= committed_up_to:
                continue
            state = _settlement(pending, card.purse.counter, slot_bytes)
            if state == "committed":
                committed_up_to = pending.counter_after
            if state is not None and state != pending.state:
                self.journal.resolve_write(pending, state, at)

    def _result(self, decision: Decision, number: int, counter: int, session: LiteSSession,
                tap_id: str | None = None) -> TapResult:
        return TapResult(
            decision.approved, decision.reason, number, decision.amount_cents,
            decision.balance_before_cents, decision.balance_after_cents, decision.fare_class,
            decision.aavs_reload_cents, decision.records, counter, session.commands, tap_id)


def _slot_bytes(card: CardImage, raw: dict[int, bytes]) -> dict[int, bytes]:
    """The raw bytes of each valid purse slot, by counter."""
    slots = {card.purse.counter: card.purse_slot}
    if card.previous is not None:
        slots[card.previous.counter] = 1 - card.purse_slot
    return {counter: b"".join(raw[b] for b in PURSE_SLOT_BLOCKS[slot])
            for counter, slot in slots.items()}


def _settlement(pending: PendingWrite, current_counter: int,
                slot_bytes: dict[int, bytes]) -> str | None:
    """What the card shows about a write: ``committed`` (its bytes are there), ``void`` (the card
    still shows the counter it started from), ``unresolved`` (the card moved on and the slot is
    gone), or None (nothing to conclude: an older copy cannot settle it, nor undo a void)."""
    if pending.counter_after in slot_bytes:
        if slot_bytes[pending.counter_after] == pending.expected_slot:
            return "committed"
        return "void" if pending.state == "intent" else None
    if pending.state == "void" or current_counter < pending.counter_before:
        return None
    if current_counter == pending.counter_before:
        return "void"  # the write never landed (torn, or the card left before it)
    return "unresolved"
