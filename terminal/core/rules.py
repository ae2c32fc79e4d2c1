"""The scheme's terminal-side rules (docs/rules.md sections 2-7), as pure functions.

Inputs are values (the decoded card, the tariff, the time, the action list); the output is a
:class:`Decision` saying what to show, what to record and what purse to write. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from enum import Enum

from farebox.cardimage.model import (
    Category, Concession, Identity, Kind, LogEntry, LogType, Purse, Status,
)

from farebox.terminal.core.clock import hk_date, require_aware

# ---- parameters (docs/rules.md with the seed clauses they come from) ------------------------

NEGATIVE_LIMIT_NEW_CENTS = 5000  # On-Loan issued on/after 2017-10-01, Mobile (001 ¶2, 002 §6-7)
NEGATIVE_LIMIT_OLD_CENTS = 3500  # every other card (001 ¶2)
NEGATIVE_LIMIT_CHANGE = date(2017, 10, 1)

STORED_VALUE_LIMIT_OLD_CENTS = 100_000  # (001 ¶1, 002 §5)
STORED_VALUE_LIMIT_NEW_CENTS = 300_000
STORED_VALUE_LIMIT_CHANGE = date(2019, 12, 1)
STORED_VALUE_LIMIT_CHANGE_MOBILE = date(2019, 10, 1)

MAX_CASH_ADD_VALUE_CENTS = 300_000  # per transaction (001 ¶1)
DEFAULT_MINIMUM_ADD_VALUE_CENTS = 5_000  # reading: configurable minimum at add-value terminals
INACTIVE_AFTER_DAYS = 1000  # (002 §11)
LOST_CARD_DELAY = timedelta(hours=3)  # (002 §12)
PAYMENT_COUNT_MAX = 0xFFFF  # what the card can hold; the count saturates there

INITIAL_VALUE_CENTS = {  # On-Loan cards (002 §8)
    Category.CHILD: 5_000, Category.ADULT: 15_000, Category.ELDER: 5_000,
    Category.PERSONALISED: 13_000,
}
DEPOSIT_CENTS = {Kind.ON_LOAN: 5_000, Kind.SOLD: 0, Kind.MOBILE: 5_000}  # (002 §6, §7)


class FareClass(Enum):
    ADULT = "adult"
    CHILD = "child"
    ELDER = "elder"
    STUDENT = "student"
    DISABILITY = "disability"


class Reason(Enum):
    INSUFFICIENT_VALUE = "insufficient_value"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"
    CANCELLED = "cancelled"
    INACTIVE = "inactive"
    INVALID_CARD = "invalid_card"
    ROLLBACK = "rollback"
    OVER_LIMIT = "over_limit"
    BELOW_MINIMUM = "below_minimum"


class RecordType(Enum):
    PAYMENT = "payment"
    AUTO_ADD_VALUE = "auto_add_value"
    ADD_VALUE = "add_value"
    BLOCK = "block"
    SUSPEND = "suspend"
    CANCEL = "cancel"
    # the service terminal (docs/rules.md §6, §8; terminal/core/service.py): amounts are what
    # moved or was charged, balance_after the card's balance
    DEPOSIT = "deposit"  # collected at issue
    INITIAL_VALUE = "initial_value"  # loaded at issue
    ADMIN_FEE = "admin_fee"  # Personalised card issue
    DEPOSIT_REFUND = "deposit_refund"  # a return: the deposit given back ...
    HANDLING_FEE = "handling_fee"  # ... less the fees
    DAMAGE_FEE = "damage_fee"
    PERSONALISATION_FEE = "personalisation_fee"
    NEGATIVE_OFFSET = "negative_offset"  # a negative value set off against the deposit
    REFUND = "refund"  # the cash paid out
    WAIVED = "waived"  # a fee due that was not collected (the refund or balance stops at 0)
    INACTIVITY_FEE = "inactivity_fee"  # deducted from the card at reactivation
    AAVS_REACTIVATION_FEE = "aavs_reactivation_fee"  # charged to the bank account, not the card
    #: the AAVS amount outstanding after a dishonoured debit, paid in cash at the service
    #: terminal before it reactivates the card (001); the card's balance does not change
    AAVS_OUTSTANDING_PAID = "aavs_outstanding_paid"
    REACTIVATE = "reactivate"
    AAVS_ENABLE = "aavs_enable"
    AAVS_CANCEL = "aavs_cancel"
    STUDENT_RENEWAL = "student_renewal"
    LIMIT_UPGRADE = "limit_upgrade"
    # the terminal's clock (docs/rules.md §3 "Clock"; terminal/card/tap.py): amount 0
    #: a card whose latest date is later than this terminal's trusted clock: the card's anomaly,
    #: recorded after the tap's own records (balance_after the card's balance)
    CARD_DATE_AHEAD = "card_date_ahead"
    #: an operator reset this terminal's time high-water mark (`farebox terminal clock reset`);
    #: card_number 0, counters 0, balances 0: no card is involved
    CLOCK_RESET = "clock_reset"


class ListReason(Enum):
    LOST = "lost"
    AAVS_SUSPENDED = "aavs_suspended"
    CANCELLED = "cancelled"


_STATUS_REASON = {Status.BLOCKED: Reason.BLOCKED, Status.SUSPENDED: Reason.SUSPENDED,
                  Status.CANCELLED: Reason.CANCELLED}
_STATUS_RECORD = {Status.BLOCKED: RecordType.BLOCK, Status.SUSPENDED: RecordType.SUSPEND,
                  Status.CANCELLED: RecordType.CANCEL}
_LIST_STATUS = {ListReason.LOST: Status.BLOCKED, ListReason.AAVS_SUSPENDED: Status.SUSPENDED,
                ListReason.CANCELLED: Status.CANCELLED}


#: the highest AAVS suspension number an action list entry carries (the purse keeps one byte)
SUSPENSION_MAX = 255


@dataclass(frozen=True)
class ListEntry:
    """One line of an action list (hotlist). An ``aavs_suspended`` entry the clearing house made
    from a dishonoured debit carries the amount outstanding and the card's suspension number
    (1, 2, ...): a card reactivated from that suspension keeps the number (``aavs_released``),
    and the entry no longer applies to it (docs/rules.md §7)."""

    card_number: int
    reason: ListReason
    at: datetime
    outstanding_cents: int | None = None
    suspension: int | None = None

    def effective_from(self) -> datetime:
        return self.at + LOST_CARD_DELAY if self.reason is ListReason.LOST else self.at

    def released_by(self, purse: Purse | None) -> bool:
        """Whether the card (its purse) was reactivated from this suspension."""
        return (purse is not None and self.suspension is not None
                and self.reason is ListReason.AAVS_SUSPENDED
                and purse.aavs_released >= self.suspension)


@dataclass(frozen=True)
class Tariff:
    """Fares in cents by class; a class without its own fare pays the Adult fare."""

    fares: Mapping[FareClass, int]

    def __post_init__(self) -> None:
        if FareClass.ADULT not in self.fares:
            raise ValueError("a tariff needs an adult fare")
        for fare_class, cents in self.fares.items():
            if type(cents) is not int or cents <= 0:
                raise ValueError(f"{fare_class.value} fare must be a positive number of cents")

    @classmethod
    def flat(cls, cents: int) -> Tariff:
        return cls({FareClass.ADULT: cents})

    def fare(self, fare_class: FareClass) -> int:
        return self.fares.get(fare_class, self.fares[FareClass.ADULT])


@dataclass(frozen=True)
class Record:
    """One value movement (or a list-ordered status change, amount 0)."""

    type: RecordType
    amount_cents: int
    balance_after_cents: int


@dataclass(frozen=True)
class Decision:
    approved: bool
    reason: Reason | None
    amount_cents: int
    balance_before_cents: int
    balance_after_cents: int
    fare_class: FareClass | None = None
    aavs_reload_cents: int | None = None
    records: tuple[Record, ...] = ()
    #: What to write to the card (the next purse and its log entry), or None to write nothing.
    new_purse: Purse | None = None
    log_entry: LogEntry | None = None


# ---- card parameters ------------------------------------------------------------------------

def negative_limit_cents(identity: Identity) -> int:
    if identity.kind is Kind.MOBILE:
        return NEGATIVE_LIMIT_NEW_CENTS
    if identity.kind is Kind.ON_LOAN and identity.issued >= NEGATIVE_LIMIT_CHANGE:
        return NEGATIVE_LIMIT_NEW_CENTS
    return NEGATIVE_LIMIT_OLD_CENTS


def stored_value_limit_cents(identity: Identity, purse: Purse) -> int:
    change = (STORED_VALUE_LIMIT_CHANGE_MOBILE if identity.kind is Kind.MOBILE
              else STORED_VALUE_LIMIT_CHANGE)
    if purse.svl_upgraded or identity.issued >= change:
        return STORED_VALUE_LIMIT_NEW_CENTS
    return STORED_VALUE_LIMIT_OLD_CENTS


def fare_class(identity: Identity, purse: Purse, today: date) -> FareClass:
    if identity.category is Category.CHILD:
        return FareClass.CHILD
    if identity.category is Category.ELDER:
        return FareClass.ELDER
    if identity.category is Category.PERSONALISED:
        if (purse.concession is Concession.STUDENT and purse.concession_expiry is not None
                and today <= purse.concession_expiry):
            return FareClass.STUDENT
        if purse.concession is Concession.DISABILITY:
            return FareClass.DISABILITY
    return FareClass.ADULT


def balance_in_range(identity: Identity, purse: Purse) -> bool:
    """A balance the card can hold: from minus its negative limit to its stored value limit. A
    verified purse outside this range was not written by the rules (a bug or a leaked key)."""
    return (-negative_limit_cents(identity) <= purse.balance_cents
            <= stored_value_limit_cents(identity, purse))


def is_inactive(purse: Purse, today: date) -> bool:
    return (today - purse.last_add_value).days >= INACTIVE_AFTER_DAYS


def list_time(at: datetime, list_at: datetime | None) -> datetime:
    """The time an action list is applied at when the rules run at ``at``: the later of ``at``
    and ``list_at`` (the terminal's own reading of the time, docs/rules.md §3 "Clock"). A reading
    the terminal does not trust runs the rules at an earlier time, but a list entry dated after
    that time and before the reading still applies: a doubtful clock makes a terminal stricter
    about lists, never more lenient (a card reported lost is refused at a terminal idle for
    longer than its clock bound)."""
    require_aware(at)
    return at if list_at is None else max(at, require_aware(list_at))


def ordered_status(entries: Iterable[ListEntry], card_number: int, at: datetime,
                   purse: Purse | None = None) -> Status:
    """The most severe status the action list orders for this card at ``at``; an AAVS
    suspension the card (``purse``) was reactivated from orders nothing."""
    status = Status.ACTIVE
    for entry in entries:
        if (entry.card_number == card_number and at >= entry.effective_from()
                and not entry.released_by(purse)):
            status = max(status, _LIST_STATUS[entry.reason])
    return status


def suspension_in_force(entries: Iterable[ListEntry], card_number: int, at: datetime,
                        purse: Purse) -> ListEntry | None:
    """The AAVS suspension the action list orders for this card at ``at`` (the highest
    numbered, an unnumbered one first: it cannot be released at a terminal), or None."""
    found = [entry for entry in entries
             if entry.card_number == card_number and entry.reason is ListReason.AAVS_SUSPENDED
             and at >= entry.effective_from() and not entry.released_by(purse)]
    if not found:
        return None
    return max(found, key=lambda e: SUSPENSION_MAX + 1 if e.suspension is None else e.suspension)


# ---- decisions ------------------------------------------------------------------------------

def _next(purse: Purse, **changes) -> Purse:
    return replace(purse, counter=purse.counter + 1, **changes)


def _decline(purse: Purse, reason: Reason, amount: int, **extra) -> Decision:
    return Decision(False, reason, amount, purse.balance_cents, purse.balance_cents, **extra)


def _gate(identity: Identity, purse: Purse, at: datetime, today: date,
          action_list: Iterable[ListEntry], amount: int, list_at: datetime | None,
          **extra) -> Decision | None:
    """Status, action list (at :func:`list_time`) and inactivity: a decline (maybe with a status
    write, dated ``today``) or None."""
    status = max(purse.status, ordered_status(action_list, identity.card_number,
                                              list_time(at, list_at), purse))
    if status is not Status.ACTIVE:
        if status is purse.status:
            return _decline(purse, _STATUS_REASON[status], amount, **extra)
        new_purse = _next(purse, status=status)
        return _decline(
            purse, _STATUS_REASON[status], amount,
            records=(Record(_STATUS_RECORD[status], 0, purse.balance_cents),),
            new_purse=new_purse,
            log_entry=LogEntry(new_purse.counter, LogType.STATUS, today, 0, new_status=status),
            **extra,
        )
    if is_inactive(purse, today):
        return _decline(purse, Reason.INACTIVE, amount, **extra)
    return None


def list_ordered_change(identity: Identity, purse: Purse, at: datetime,
                        action_list: Iterable[ListEntry], *,
                        list_at: datetime | None = None) -> Decision | None:
    """For a service terminal: the decline that writes the status an action list orders, when
    it is more severe than the card's own (a card reported lost is never refunded or changed);
    None otherwise. Unlike a payment, a status the card already carries is left to the service
    rules (a suspended card is reactivated there). The list is applied at :func:`list_time`
    (``list_at``: the terminal's own reading); the status write is dated ``at``."""
    today = hk_date(require_aware(at))
    status = ordered_status(action_list, identity.card_number, list_time(at, list_at), purse)
    if status <= purse.status:
        return None
    new_purse = _next(purse, status=status)
    return _decline(
        purse, _STATUS_REASON[status], 0,
        records=(Record(_STATUS_RECORD[status], 0, purse.balance_cents),),
        new_purse=new_purse,
        log_entry=LogEntry(new_purse.counter, LogType.STATUS, today, 0, new_status=status))


def decide_payment(identity: Identity, purse: Purse, tariff: Tariff, at: datetime,
                   action_list: Iterable[ListEntry] = (), *, aavs_allowed: bool = True,
                   list_at: datetime | None = None) -> Decision:
    """docs/rules.md §3-4: AAVS, negative value, fare classes. ``aavs_allowed=False`` (the
    terminal's clock is not trusted) makes no automatic add value: "once per day" needs a true
    day. The action list is applied at the later of ``at`` and ``list_at`` (:func:`list_time`:
    the terminal's own reading when the rules run at an earlier time it trusts)."""
    today = hk_date(require_aware(at))
    cls = fare_class(identity, purse, today)
    fare = tariff.fare(cls)
    gate = _gate(identity, purse, at, today, action_list, fare, list_at, fare_class=cls)
    if gate is not None:
        return gate

    balance, limit = purse.balance_cents, negative_limit_cents(identity)
    payment_count = min(purse.payment_count + 1, PAYMENT_COUNT_MAX)

    reload = purse.aavs_reload_cents
    if (aavs_allowed and purse.aavs_enabled and purse.last_auto_reload != today
            and (balance - fare <= 0 or balance + limit < fare)
            and balance + reload - fare >= -limit
            and balance + reload - fare <= stored_value_limit_cents(identity, purse)):
        after = balance + reload - fare
        new_purse = _next(purse, balance_cents=after, last_add_value=today, last_auto_reload=today,
                          last_payment=today, payment_count=payment_count)
        return Decision(
            True, None, fare, balance, after, fare_class=cls, aavs_reload_cents=reload,
            records=(Record(RecordType.AUTO_ADD_VALUE, reload, balance + reload),
                     Record(RecordType.PAYMENT, fare, after)),
            new_purse=new_purse,
            log_entry=LogEntry(new_purse.counter, LogType.PAYMENT, today, fare,
                               aavs_reload_cents=reload),
        )

    if balance > 0 and balance - fare >= -limit:
        after = balance - fare
        new_purse = _next(purse, balance_cents=after, last_payment=today,
                          payment_count=payment_count)
        return Decision(
            True, None, fare, balance, after, fare_class=cls,
            records=(Record(RecordType.PAYMENT, fare, after),),
            new_purse=new_purse,
            log_entry=LogEntry(new_purse.counter, LogType.PAYMENT, today, fare),
        )
    return _decline(purse, Reason.INSUFFICIENT_VALUE, fare, fare_class=cls)


def decide_add_value(identity: Identity, purse: Purse, amount_cents: int, at: datetime,
                     action_list: Iterable[ListEntry] = (),
                     minimum_cents: int = DEFAULT_MINIMUM_ADD_VALUE_CENTS, *,
                     restart_inactivity: bool = True,
                     list_at: datetime | None = None) -> Decision:
    """docs/rules.md §5: cash add value. ``restart_inactivity=False`` (the terminal's clock is not
    trusted) leaves the last add value date as it is. The action list is applied at the later of
    ``at`` and ``list_at`` (:func:`list_time`)."""
    if type(amount_cents) is not int or amount_cents <= 0:
        raise ValueError("an add value amount must be a positive number of cents")
    today = hk_date(require_aware(at))
    gate = _gate(identity, purse, at, today, action_list, amount_cents, list_at)
    if gate is not None:
        return gate
    if amount_cents > MAX_CASH_ADD_VALUE_CENTS:
        return _decline(purse, Reason.OVER_LIMIT, amount_cents)
    if amount_cents < minimum_cents:
        return _decline(purse, Reason.BELOW_MINIMUM, amount_cents)
    after = purse.balance_cents + amount_cents
    if after > stored_value_limit_cents(identity, purse):
        return _decline(purse, Reason.OVER_LIMIT, amount_cents)
    last_add_value = max(today, purse.last_add_value) if restart_inactivity else purse.last_add_value
    new_purse = _next(purse, balance_cents=after, last_add_value=last_add_value)
    return Decision(
        True, None, amount_cents, purse.balance_cents, after,
        records=(Record(RecordType.ADD_VALUE, amount_cents, after),),
        new_purse=new_purse,
        log_entry=LogEntry(new_purse.counter, LogType.ADD_VALUE, today, amount_cents),
    )
