"""One tap: read, verify, resolve, decide, journal, write, commit.

This is the imperative shell around the pure rules; it runs unchanged over the in-process
simulated card, nfcpy and PC/SC readers, since it only sees a :class:`LiteSSession`.

A payment or add value takes 6 card commands: poll, 2 reads (identity and both purse slots),
3 writes (the other purse slot, then a log block). The write responses' status flags confirm the
write; the next tap's verification of the card replaces a read-back.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from farebox.cardimage.errors import InvalidCard
from farebox.cardimage.image import change_blocks, decode_image
from farebox.cardimage.layout import PURSE_SLOT_BLOCKS, TAP_READ_BLOCKS
from farebox.cardimage.model import COUNTER_MAX, CardImage, Status
from farebox.protocol.errors import FelicaError
from farebox.protocol.session import LiteSSession

from farebox.terminal import failpoints
from farebox.terminal.core.clock import hk_date, require_aware, start_of_hk_day
from farebox.terminal.errors import BadInput, Interrupted
from farebox.terminal.store.journal import CardWrite, Journal
from farebox.terminal.card.keys import SoftwareKeyStore
from farebox.terminal.core.rules import (
    DEFAULT_MINIMUM_ADD_VALUE_CENTS, Decision, FareClass, ListEntry, ListReason, Reason, Record,
    RecordType, Tariff, balance_in_range, decide_add_value, decide_payment, list_ordered_change,
    list_time, ordered_status, suspension_in_force,
)
from farebox.terminal.core.service import (
    REACTIVATION_LIST_AGE, ServiceRefused, check_issued_by,
)
from farebox.terminal.core.writecycle import (
    WriteState, log_repair, resolve_open_writes, retap_completes,
)

DEFAULT_RETAP_WINDOW_S = 60.0
#: How far past this terminal's trusted time (its high-water mark) a tap time may be and still be
#: believed (docs/rules.md §3 "Clock"). Seven days: a terminal closed over a long holiday trusts
#: its first tap without an operator, while a wrong year, month or week is caught; a terminal idle
#: for longer is trusted again by the first card used that same day elsewhere (its latest date
#: corroborates the time). The action list is never weakened by the bound (:meth:`list_status`).
DEFAULT_MAX_CLOCK_AHEAD_S = 7 * 24 * 3600.0
_DAY = timedelta(days=1)
PAYMENT, ADD_VALUE = "payment", "add_value"


class TapInterrupted(Interrupted):
    """The card went away (or answered wrongly) after the journal intent was made: the write is
    in doubt and will be resolved when the card is seen again. Ask for the card to be tapped
    again."""

    def __init__(self, tap_id: str, cause: Exception) -> None:
        super().__init__(f"card write interrupted ({cause}); tap the card again")
        self.tap_id = tap_id
        self.cause = cause


class RequestRefused(BadInput, ValueError):
    """The request cannot be served on this card at all (nothing was written); e.g. an add value
    timed before the card was issued."""


def untrusted_clock(at: datetime) -> str:
    """Why a service request at a time this terminal does not trust is refused."""
    return (f"{at.isoformat()} is behind this card's last use or this terminal's latest "
            "transaction, or too far past the latest: check the clock (`farebox terminal clock "
            "reset` if the terminal's trusted time is wrong)")


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
    #: the earlier write of this terminal's this result reports (nothing more done): a tap
    #: in doubt this one completed, or the card's last change made again (an add value, a return)
    completed_from: str | None = None
    clock_trusted: bool = True
    idm: bytes | None = None
    completed_at: datetime | None = None  # when the write ``completed_from`` names was made

    def outcome(self) -> dict:
        """What a re-tap needs to report this result again (stored with the write's intent)."""
        return {
            "approved": self.approved, "reason": self.reason and self.reason.value,
            "amount_cents": self.amount_cents, "balance_before_cents": self.balance_before_cents,
            "balance_after_cents": self.balance_after_cents,
            "fare_class": self.fare_class and self.fare_class.value,
            "aavs_reload_cents": self.aavs_reload_cents,
            "records": [[r.type.value, r.amount_cents, r.balance_after_cents]
                        for r in self.records],
            "counter": self.counter, "clock_trusted": self.clock_trusted,
        }

    @classmethod
    def from_outcome(cls, outcome: dict, **extra) -> TapResult:
        return cls(
            outcome["approved"], outcome["reason"] and Reason(outcome["reason"]),
            extra.pop("card_number"), outcome["amount_cents"], outcome["balance_before_cents"],
            outcome["balance_after_cents"],
            outcome["fare_class"] and FareClass(outcome["fare_class"]),
            outcome["aavs_reload_cents"],
            tuple(Record(RecordType(t), a, b) for t, a, b in outcome["records"]),
            outcome["counter"], clock_trusted=outcome["clock_trusted"], **extra)


@dataclass(frozen=True)
class _Request:
    kind: str
    amount_cents: int  # shown when the card cannot be read (the adult fare for a payment)
    #: the decision at a time the terminal trusts (rules_at, trusted)
    decide: Callable[[CardImage, datetime, bool], Decision]
    #: whether this request, made on a card whose last change is this terminal's write of the
    #: same kind, is that write made again (then reported, nothing more done); None: never (a
    #: payment: a tap after the re-tap window is a new journey)
    repeats: Callable[[CardWrite], bool] | None = None


class Terminal:
    """The terminal's shell: keys, journal and action list; one method per kind of tap."""

    def __init__(self, journal: Journal, keys: SoftwareKeyStore,
                 action_list: Iterable[ListEntry] = (),
                 minimum_add_value_cents: int = DEFAULT_MINIMUM_ADD_VALUE_CENTS,
                 retap_window_s: float = DEFAULT_RETAP_WINDOW_S,
                 max_clock_ahead_s: float = DEFAULT_MAX_CLOCK_AHEAD_S, *,
                 list_held: bool = True) -> None:
        self.journal = journal
        self.keys = keys
        self.action_list = tuple(action_list)
        #: whether the terminal holds an action list at all (a file or a fetched list), even an
        #: empty one: without one it cannot tell what a suspended card owes (reactivation)
        self.list_held = list_held
        #: when the fetched list in force was issued (None: none fetched; a list file only)
        self.list_issued: datetime | None = None
        self.minimum_add_value_cents = minimum_add_value_cents
        self.retap_window = timedelta(seconds=retap_window_s)
        self.max_clock_ahead = timedelta(seconds=max_clock_ahead_s)
        self._shown: list[str] = []  # add values whose result the caller has yet to show

    def pay(self, session: LiteSSession, tariff: Tariff, at: datetime) -> TapResult:
        return self._tap(session, at, _Request(
            PAYMENT, tariff.fare(FareClass.ADULT),
            lambda card, rules_at, trusted: decide_payment(
                card.identity, card.purse, tariff, rules_at, self.action_list,
                aavs_allowed=trusted, list_at=at)))

    def add_value(self, session: LiteSSession, amount_cents: int, at: datetime, *,
                  again: bool = False) -> TapResult:
        """A cash add value. A card whose last change is this terminal's add value of the same
        amount whose result was never shown (the process died before :meth:`idle`, which the
        caller calls once it has shown the result), or one cut off, of any amount, whose write
        the card shows, gets that one reported (``completed_from``: the cash is collected once),
        whatever the time: the command run again after a crash. Once shown, the same amount again
        is a new add value (two in a row add both). ``again``: a new add value of that amount
        all the same."""
        result = self._tap(session, at, _Request(
            ADD_VALUE, amount_cents,
            lambda card, rules_at, trusted: decide_add_value(
                card.identity, card.purse, amount_cents, rules_at, self.action_list,
                self.minimum_add_value_cents, restart_inactivity=trusted, list_at=at),
            None if again else lambda write: (write.outcome["amount_cents"] == amount_cents
                                              and not self.journal.was_shown(write.tap_id))))
        if result.approved and result.tap_id is not None:
            self._shown.append(result.tap_id)  # marked shown by idle(), after the caller showed it
        return result

    def service(self, session: LiteSSession, at: datetime, kind: str,
                decide: Callable[[CardImage, date], Decision], *,
                repeats: bool = False) -> TapResult:
        """A service terminal's change to the card (terminal/core/service.py: return, reactivate,
        AAVS, student status, limit upgrade), made as safely as a payment: journal intent, the
        two-block purse write, in-doubt resolution and completion, rollback checks. ``decide``
        gets the verified card and the Hong Kong date; a ServiceRefused from it becomes
        RequestRefused (nothing written). A card the action list orders blocked, suspended or
        cancelled beyond what it carries is declined and marked, as a payment terminal does,
        whatever the clock (the list at the later of the rules' time and ``at``: a doubtful
        clock never spares a listed card). A service change itself needs a trusted clock (it
        may restart the inactivity clock or cancel the card): a time behind the card or this
        terminal, or too far past this terminal's, is refused.

        A change cut off after its write landed is completed by the next request of its kind
        (reported, nothing more done) whatever the time. ``repeats``: the request cannot be
        served twice on one card (a return): while the card's last change is this terminal's
        change of this kind, the request is that change made again and reports it."""
        def run(card: CardImage, rules_at: datetime, trusted: bool) -> Decision:
            listed = list_ordered_change(card.identity, card.purse, rules_at, self.action_list,
                                         list_at=at)
            if listed is not None:
                return listed
            if not trusted:
                raise RequestRefused(untrusted_clock(at))
            try:
                return decide(card, hk_date(rules_at))
            except ServiceRefused as error:
                raise RequestRefused(str(error)) from None

        return self._tap(session, at, _Request(kind, 0, run,
                                               (lambda write: True) if repeats else None))

    def idle(self, *, closing: bool = False) -> None:
        """Call once the card has left the field: makes the last tap's commit marks (already in
        the journal, not yet synced) durable and checkpoints the journal, off the in-field
        path. ``closing``: no tap follows (the journal is closed next; :meth:`Journal.idle`)."""
        if self._shown:  # the caller has shown these add values' results
            self.journal.mark_shown(self._shown)
            self._shown.clear()
        if self.journal.unsynced:
            failpoints.hit("before-durable-mark")
        self.journal.idle(closing=closing)

    # ---- the transaction -----------------------------------------------------------------

    def _tap(self, session: LiteSSession, at: datetime, request: _Request) -> TapResult:
        require_aware(at)
        self.journal.sync()  # the previous tap's marks are durable before this tap starts
        if session.idm is None:
            session.poll()
        idm = session.idm
        raw = dict(zip(TAP_READ_BLOCKS, session.read_blocks(TAP_READ_BLOCKS)))
        card_key_for = _CardKeys(self.keys, idm)
        try:
            card = decode_image(raw, idm, card_key_for)
        except InvalidCard:
            return TapResult(False, Reason.INVALID_CARD, None, request.amount_cents, None, None,
                             commands=session.commands, idm=idm)
        number, counter = card.identity.card_number, card.purse.counter
        if counter >= COUNTER_MAX or not balance_in_range(card.identity, card.purse):
            return TapResult(False, Reason.INVALID_CARD, number, request.amount_cents, None, None,
                             counter=counter, commands=session.commands, idm=idm)
        if request.kind != PAYMENT:
            what = "an add value" if request.kind == ADD_VALUE else request.kind.replace("_", " ")
            try:
                check_issued_by(card.identity, hk_date(at), what=what, when=at)
            except ServiceRefused as error:
                raise RequestRefused(str(error)) from None
        slot_bytes = _slot_bytes(card, raw)
        trusted, rules_at, card_ahead = self._trusted_time(card, at)

        memory = self.journal.card_memory(number)
        known = 0 if memory is None else memory.counter
        open_writes = self.journal.open_writes(number, known, counter)
        repair = log_repair(open_writes)
        resolved = self._resolve(card, slot_bytes, at, open_writes)
        if resolved:
            completed = self._complete(session, card, resolved, request, at)
            if completed is not None:
                return completed
            memory = self.journal.card_memory(number)
            repair = self.journal.unconfirmed_log(number, counter)
        if memory is not None and (counter < memory.counter or (
                counter == memory.counter and slot_bytes[counter] != memory.slot)):
            # older than what this terminal verified, or a restored copy written again (a fork)
            return TapResult(False, Reason.ROLLBACK, number, request.amount_cents,
                             card.purse.balance_cents, card.purse.balance_cents, counter=counter,
                             commands=session.commands, clock_trusted=trusted, idm=idm)
        if request.repeats is not None and memory is not None and (
                memory.counter, memory.slot) == (counter, slot_bytes[counter]):
            done = self._repeated(card, slot_bytes, request, rules_at, at)
            if done is not None:
                return self._report(session, card, done)

        decision = request.decide(card, rules_at, trusted)
        if card_ahead and decision.new_purse is not None:
            balance = (decision.records[-1].balance_after_cents if decision.records
                       else card.purse.balance_cents)
            decision = replace(decision, records=decision.records + (
                Record(RecordType.CARD_DATE_AHEAD, 0, balance),))
        if decision.new_purse is None:
            self.journal.observe(number, counter, slot_bytes[counter],
                                 trusted_at=at if trusted else None,
                                 remember=memory is None or counter > memory.counter)
            return self._result(decision, card, counter, session, trusted=trusted)
        return self._write(session, card, slot_bytes, decision, request, at, trusted,
                           card_key_for(card.identity.key_version), repair,
                           remember_before=memory is None or memory.counter != counter)

    def _write(self, session: LiteSSession, card: CardImage, slot_bytes: dict[int, bytes],
               decision: Decision, request: _Request, at: datetime, trusted: bool,
               card_key: bytes, repair: CardWrite | None, *, remember_before: bool) -> TapResult:
        idm, number, counter = card.idm, card.identity.card_number, card.purse.counter
        (purse_a, purse_b, log) = change_blocks(card, decision.new_purse, decision.log_entry,
                                                card_key)
        if repair is not None and repair.log_block == log[0]:
            repair = None  # the new entry takes that block anyway
        tap_id = secrets.token_hex(8)
        result = self._result(decision, card, decision.new_purse.counter, session, tap_id,
                              trusted=trusted)
        write = self.journal.record_intent(
            tap_id=tap_id, card_number=number, idm=idm, kind=request.kind,
            counter_before=counter, slot_before=slot_bytes[counter],
            counter_after=decision.new_purse.counter, expected_slot=purse_a[1] + purse_b[1],
            log_block=log[0], log_data=log[1], balance_before_cents=decision.balance_before_cents,
            records=decision.records, outcome=result.outcome(), at=at, clock_trusted=trusted,
            remember_before=remember_before)
        failpoints.hit("after-intent")
        try:
            session.write_block(*purse_a)
            session.write_block(*purse_b)
        except FelicaError as error:
            # no result is shown: a void of this write is no counter fork (settlement says so)
            self.journal.note_cut_off(write)
            raise TapInterrupted(tap_id, error) from error
        failpoints.hit("after-purse-write")
        # The purse slot has landed: the value moved. The log block is a record of it, written
        # next; if it does not land, the next write to this card writes it again.
        log_landed = self._try_write(session, log)
        failpoints.hit("after-log-write")
        # The commit mark is in the journal before the result is shown (committed, not yet
        # synced): a process that dies from here on loses nothing; idle() makes it durable.
        self.journal.commit_later(write, at, log_confirmed=log_landed)
        failpoints.hit("after-commit-mark")
        if repair is not None and log_landed and self._try_write(
                session, (repair.log_block, repair.log_data)):
            self.journal.confirm_log(repair)
        return replace(result, commands=session.commands)

    @staticmethod
    def _try_write(session: LiteSSession, block: tuple[int, bytes]) -> bool:
        try:
            session.write_block(*block)
        except FelicaError:
            return False
        return True

    def list_status(self, card: CardImage, at: datetime) -> Status:
        """The status the action list orders for this card on a tap at ``at``: at the later of
        the time the rules run at and ``at`` (as :meth:`pay` applies it): a service request
        checks every card with it before changing any."""
        rules_at = self._trusted_time(card, at)[1]
        return ordered_status(self.action_list, card.identity.card_number,
                              list_time(rules_at, at), card.purse)

    def list_fresh(self, at: datetime) -> bool:
        """Whether the list held is recent enough at ``at`` to show that a suspended card it
        does not name is no longer listed (:data:`REACTIVATION_LIST_AGE`); a terminal with a
        list file and no fetched list has only the operator's word, taken as it is."""
        if self.list_issued is None:
            return self.list_held
        return self.list_issued >= at - REACTIVATION_LIST_AGE

    def suspension(self, card: CardImage, at: datetime) -> ListEntry | None:
        """The AAVS suspension the action list orders for this card, applied as
        :meth:`list_status` applies the list (:func:`suspension_in_force`), or None."""
        rules_at = self._trusted_time(card, at)[1]
        return suspension_in_force(self.action_list, card.identity.card_number,
                                   list_time(rules_at, at), card.purse)

    def reported_lost(self, card: CardImage, at: datetime) -> datetime | None:
        """When the card was reported lost, if the action list says it was by the time
        :meth:`list_status` applies the list at; the list blocks it only three hours later
        (002 §12), but a service terminal refuses its return from the report on (docs/rules.md
        §8: a lost card is refunded by the central office only)."""
        when = list_time(self._trusted_time(card, at)[1], at)
        reports = [entry.at for entry in self.action_list
                   if entry.card_number == card.identity.card_number
                   and entry.reason is ListReason.LOST and entry.at <= when]
        return min(reports) if reports else None

    def clock_trusted(self, card: CardImage, at: datetime) -> bool:
        """Whether this terminal would believe ``at`` for this card (see :meth:`_trusted_time`):
        a service request checks every card with it before changing any."""
        return self._trusted_time(card, at)[0]

    def _trusted_time(self, card: CardImage, at: datetime) -> tuple[bool, datetime, bool]:
        """Whether ``at`` can be believed, the time the rules are applied at, and whether the
        card's latest date is ahead of a clock this terminal trusts (the card's anomaly).

        * A time before this terminal's high-water mark is untrusted.
        * A time more than ``max_clock_ahead`` past the mark is untrusted too, unless the card
          corroborates it (its latest date is that day, or at most ``max_clock_ahead`` before
          its end): one wrong reading never moves the mark far.
        * A time within the bound of the mark is the terminal's own trusted time: a card whose
          latest date is later is the card's anomaly (flagged by a ``card_date_ahead`` record),
          not a reason to distrust the clock. A new terminal (no mark yet) has nothing to judge
          the card by: a time before the card's latest date is untrusted, as before.

        An untrusted time runs the rules at the latest of the mark and the card's latest date,
        with no automatic add value and no change to the inactivity clock; its records are
        flagged and it never moves the mark. The action list is still applied at ``at`` when
        that is later (``list_at``): a doubtful clock never spares a listed card."""
        purse = card.purse
        card_day = max(d for d in (purse.last_add_value, purse.last_auto_reload,
                                   purse.last_payment) if d is not None)
        card_start = start_of_hk_day(card_day)
        mark = self.journal.time_high_water()
        floor = card_start if mark is None else max(mark, card_start)
        if mark is not None and at > mark + self.max_clock_ahead:
            if card_start <= at <= card_start + _DAY + self.max_clock_ahead:
                return True, at, False  # a card used that day agrees: the terminal was idle
            return False, floor, False
        if mark is not None and at < mark:
            return False, floor, False
        if at < card_start:
            if mark is not None:
                return True, at, True
            return False, floor, False
        return True, at, False

    def _resolve(self, card: CardImage, slot_bytes: dict[int, bytes], at: datetime,
                 open_writes: list[CardWrite]) -> list[tuple[CardWrite, CardWrite]]:
        """Resolve writes left in doubt for this card (and voids that turn up) as the life cycle
        decides from what the card shows: pairs of (the write as it was, as it is now)."""
        return [(write, self.journal.resolve_write(
                    write, state, at, sync=False, observed=state is WriteState.COMMITTED))
                for write, state in resolve_open_writes(open_writes, card.purse.counter,
                                                        slot_bytes)]

    def _complete(self, session: LiteSSession, card: CardImage,
                  resolved: list[tuple[CardWrite, CardWrite]], request: _Request,
                  at: datetime) -> TapResult | None:
        """A re-tap of a card whose last tap here was cut off after its write landed, for the
        same kind of request: report that tap, charge nothing more. A payment within the re-tap
        window only (later, the customer pays a new journey); any other request whatever the
        time (an add value or a service change run again after a crash and a reboot: the
        operator learns what the card already got)."""
        window = self.retap_window if request.kind == PAYMENT else timedelta.max
        now = retap_completes(((before.state, now) for before, now in resolved), request.kind,
                              card.purse.counter, at, window)
        if now is None:
            return None
        return self._report(session, card, now)

    def _repeated(self, card: CardImage, slot_bytes: dict[int, bytes], request: _Request,
                  rules_at: datetime, at: datetime) -> CardWrite | None:
        """The card's last change, if it is this terminal's write that ``request`` makes again
        (see :attr:`_Request.repeats`); None if the action list orders the card a status it
        does not carry (the request then marks it, as any request does)."""
        counter = card.purse.counter
        done = self.journal.last_change(card.identity.card_number, counter, slot_bytes[counter])
        if (done is None or done.kind != request.kind or done.outcome is None
                or not request.repeats(done)):
            return None
        if list_ordered_change(card.identity, card.purse, rules_at, self.action_list,
                               list_at=at) is not None:
            return None
        return done

    def _report(self, session: LiteSSession, card: CardImage, write: CardWrite) -> TapResult:
        """What ``write`` (this terminal's, on the card now) did, reported again: nothing more
        charged or written but its log block, if that was never confirmed."""
        repair = self.journal.unconfirmed_log(card.identity.card_number, card.purse.counter)
        if repair is not None and self._try_write(session, (repair.log_block, repair.log_data)):
            self.journal.confirm_log(repair)
        return TapResult.from_outcome(
            write.outcome, card_number=card.identity.card_number, commands=session.commands,
            tap_id=write.tap_id, completed_from=write.tap_id, idm=card.idm,
            completed_at=write.created)

    def _result(self, decision: Decision, card: CardImage, counter: int, session: LiteSSession,
                tap_id: str | None = None, *, trusted: bool) -> TapResult:
        return TapResult(
            decision.approved, decision.reason, card.identity.card_number, decision.amount_cents,
            decision.balance_before_cents, decision.balance_after_cents, decision.fare_class,
            decision.aavs_reload_cents, decision.records, counter, session.commands, tap_id,
            clock_trusted=trusted, idm=card.idm)


class _CardKeys:
    """The card's diversified key for a key version, derived once per tap."""

    def __init__(self, keys: SoftwareKeyStore, idm: bytes) -> None:
        self._keys, self._idm, self._cache = keys, idm, {}

    def __call__(self, version: int) -> bytes:
        key = self._cache.get(version)
        if key is None:
            key = self._cache[version] = self._keys.card_key(version, self._idm)
        return key


def _slot_bytes(card: CardImage, raw: dict[int, bytes]) -> dict[int, bytes]:
    """The raw bytes of each valid purse slot, by counter."""
    slots = {card.purse.counter: card.purse_slot}
    if card.previous is not None:
        slots[card.previous.counter] = 1 - card.purse_slot
    return {counter: b"".join(raw[b] for b in PURSE_SLOT_BLOCKS[slot])
            for counter, slot in slots.items()}
