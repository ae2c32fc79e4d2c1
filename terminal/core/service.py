"""The service terminal's rules (docs/rules.md §6 and §8), as pure functions.

Inputs are values (the card's :class:`Identity` and :class:`Purse`, a Hong Kong date, the
operator's options); the output is a :class:`Decision` (rules.py) saying what to record and what
purse and log entry to write, plus a breakdown of the fees for the operator. A request the rules
cannot serve at all raises :class:`ServiceRefused` (nothing is written). No I/O, no clock.

Readings where the seeds leave a point open (docs/rules.md says which are the project's):

* Return: "within 90 days" is ``returned - issued <= 90`` days; 1 % is rounded to the nearest
  cent, halves up; the refund never goes below zero (the excess is waived and recorded); a card
  reported lost (blocked) is refunded by the central office, a suspended one is reactivated
  first, Sold cards are not returned and Mobile cards are refunded through the app (002 §17).
* Reactivation of an inactive card restarts its 1,000-day clock (the last add value date becomes
  the reactivation date: the card has no other date for it); it deducts the inactivity fees due,
  never below zero, and records what it waives.
* Inactivity fee (002 §19, §20): due on On-Loan Adult cards issued on or after 2017-10-01 and on
  Mobile cards other than Elder ones. A Personalised card with Student or Disability status is
  exempt; one without a birth date too (the terminal cannot show its holder is aged 18 to 59); one
  with a birth date owes the periods that start while its holder is aged 18 to 59 (On-Loan: issued
  from 2017-10-01, as the Adult card). Periods start three years after the later of the last add
  value and the last payment (29 February + 3 years is 1 March: three whole years have passed),
  but never before 2020-10-01, then every 12 months (same rule for the day of the month).
* A return deducts the inactivity fees due exactly as a reactivation would (from the value, never
  below zero, the rest waived), so a card is refunded the same whether or not it was reactivated
  first.
* Ages (002 §13(a), §19-20; 003 "Eligibility") are completed years on the Hong Kong day, from the
  birth date a Personalised card carries; someone born on 29 February is a year older on 1 March
  of a common year. A Child card stands for a holder below 12 (the age 002 §13(a) and 003 draw);
  a card without a birth date shows no age otherwise.
* AAVS: enabling it the first time is free; enabling it again on a card that had it (cancelled,
  or dropped at a return) costs HK$20, charged to the bank account (002 §18(e), 001): it is
  recorded for settlement, the card's balance does not change. Changing the amount while AAVS
  is on is free.
* Reactivating an AAVS-suspended card (after the outstanding amount is paid at the counter):
  the HK$20 re-activation fee likewise goes to the bank account. The amount outstanding is the
  one the action list's suspension names, collected exactly (cash, recorded for settlement);
  the card keeps the suspension's number so a list that still holds it spares the card.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from farebox.cardimage.model import (
    AAVS_RELOAD_CENTS, Category, Concession, Identity, Kind, LogEntry, LogType, Purse, ServiceOp,
    Status,
)
from farebox.cardimage.money import format_cents, format_whole

from farebox.terminal.core.rules import (
    DEPOSIT_CENTS, INITIAL_VALUE_CENTS, STORED_VALUE_LIMIT_NEW_CENTS, Decision, ListEntry, Record,
    RecordType, is_inactive, stored_value_limit_cents,
)
from farebox.terminal.errors import BadInput

# ---- parameters (docs/rules.md with the seed clauses they come from) ------------------------

MAX_CARDS_PER_REQUEST = 5  # one loan or return request (002 §10)
PERSONALISED_ADMIN_FEE_CENTS = 2_000  # issue of a Personalised card (002 §18(a))
HANDLING_FEE_MIN_CENTS = 1_100  # HK$11 or 1 % of the value, the higher (002 §18(g))
HANDLING_FEE_VALUE_OVER_CENTS = 100_000  # (g)(1): value over HK$1,000
HANDLING_FEE_WITHIN_DAYS = 90  # (g)(2)
HANDLING_FEE_MAX_PAYMENTS = 5  # (g)(3): five or fewer payments ...
HANDLING_FEE_PAYMENTS_FROM = date(2020, 10, 1)  # ... with effect from 2020-10-01
DAMAGE_FEE_CENTS = 3_000  # (002 §18(f))
PERSONALISATION_FEE_CENTS = 1_000  # (002 §18(b))
PERSONALISATION_FEE_ISSUED_FROM = date(2004, 11, 1)
AAVS_REACTIVATION_FEE_CENTS = 2_000  # to the bank account (002 §18(e), 001)
#: how recent a fetched action list must be for a service terminal to reactivate a suspended
#: card the list does not name (the house took it off): an older one may predate its listing
REACTIVATION_LIST_AGE = timedelta(minutes=15)
INACTIVITY_FEE_CENTS = 1_500  # per inactive period (002 §19-20)
INACTIVITY_FEE_CARDS_ISSUED_FROM = date(2017, 10, 1)
INACTIVITY_FEE_PERIODS_FROM = date(2020, 10, 1)
INACTIVITY_FEE_AFTER_YEARS = 3
LIMIT_UPGRADE_FROM = date(2021, 4, 29)  # (001 ¶1)
AAVS_MIN_AGE = 12  # AAVS "available to persons aged 12 or over" (002 §13(a))
STUDENT_MIN_AGE = 12  # Student status: "any person between the ages of 12 and 25" (003)
INACTIVITY_FEE_MIN_AGE = 18  # Personalised holders aged below 18 ... (002 §19-20)
INACTIVITY_FEE_EXEMPT_AGE = 60  # ... or 60 and above are exempt


class ServiceRefused(BadInput, ValueError):
    """The request cannot be served on this card (or at all); nothing is written. One line."""


# ---- issue ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class IssueCharges:
    deposit_cents: int
    initial_value_cents: int
    fee_cents: int

    @property
    def collected_cents(self) -> int:
        return self.deposit_cents + self.initial_value_cents + self.fee_cents

    def records(self) -> tuple[Record, ...]:
        """Deposit, initial value and the administrative fee, as the journal keeps them (the
        balance is the card's: 0 before the initial value is loaded)."""
        value = self.initial_value_cents
        records = [Record(RecordType.DEPOSIT, self.deposit_cents, 0),
                   Record(RecordType.INITIAL_VALUE, value, value)]
        if self.fee_cents:
            records.append(Record(RecordType.ADMIN_FEE, self.fee_cents, value))
        return tuple(records)


def issue_charges(kind: Kind, category: Category) -> IssueCharges:
    """What the customer pays for a new card (docs/rules.md §2, §8): the deposit, the category's
    initial value (On-Loan cards; Sold and Mobile start at 0.00) and HK$20 for a Personalised
    card."""
    value = INITIAL_VALUE_CENTS[category] if kind is Kind.ON_LOAN else 0
    fee = PERSONALISED_ADMIN_FEE_CENTS if category is Category.PERSONALISED else 0
    return IssueCharges(DEPOSIT_CENTS[kind], value, fee)


def check_request_size(count: int) -> None:
    if count < 1:
        raise ServiceRefused("no card given")
    if count > MAX_CARDS_PER_REQUEST:
        raise ServiceRefused(f"{count} cards in one request: at most {MAX_CARDS_PER_REQUEST} "
                             "(002 §10); nothing was done")


# ---- shared checks --------------------------------------------------------------------------

def check_issued_by(identity: Identity, day: date, *, what: str | None = None,
                    when: datetime | None = None) -> None:
    """The one issue-date check: a request dated (Hong Kong ``day``) before the card was issued
    is refused (ServiceRefused). ``what`` and ``when`` (the request's time) word the refusal
    for a request other than a service change (an add value)."""
    if day < identity.issued:
        subject = day.isoformat() if when is None else when.isoformat()
        if what is not None:
            subject = f"{what} at {subject}"
        raise ServiceRefused(f"{subject} is before the card was issued "
                             f"({identity.issued.isoformat()})")


def _usable(purse: Purse, what: str, *, suspended_ok: bool = False) -> None:
    if purse.status is Status.CANCELLED:
        raise ServiceRefused(f"the card is cancelled: it cannot {what}")
    if purse.status is Status.BLOCKED:
        raise ServiceRefused(f"the card is blocked (reported lost): it cannot {what}")
    if purse.status is Status.SUSPENDED and not suspended_ok:
        raise ServiceRefused(f"the card is suspended: reactivate it before it can {what}")


def _next(purse: Purse, **changes) -> Purse:
    return replace(purse, counter=purse.counter + 1, **changes)


def _service_decision(purse: Purse, new_purse: Purse, operation: ServiceOp, today: date,
                      records: tuple[Record, ...]) -> Decision:
    change = new_purse.balance_cents - purse.balance_cents
    return Decision(
        True, None, -change, purse.balance_cents, new_purse.balance_cents, records=records,
        new_purse=new_purse,
        log_entry=LogEntry(new_purse.counter, LogType.SERVICE, today, change, operation=operation))


def round_percent(cents: int, percent: int = 1) -> int:
    """``percent`` % of a non-negative amount, to the nearest cent, halves up (integers only)."""
    if cents < 0:
        raise ValueError("a percentage of a negative amount")
    return (cents * percent + 50) // 100


# ---- return ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refund:
    deposit_cents: int
    remaining_value_cents: int
    handling_fee_cents: int
    damage_fee_cents: int
    personalisation_fee_cents: int
    negative_offset_cents: int  # a negative value set off against the deposit (>= 0)
    waived_cents: int  # what the fees exceeded the deposit and value by (the refund stops at 0)
    refund_cents: int
    handling_fee_reasons: tuple[str, ...] = ()
    #: the inactivity fees due (002 §19), deducted from the value as a reactivation would ...
    inactivity_fee_cents: int = 0
    #: ... and what of them the value could not pay (waived: never taken from the deposit)
    inactivity_fee_waived_cents: int = 0


def handling_fee_reasons(identity: Identity, purse: Purse, returned: date) -> tuple[str, ...]:
    """Which of 002 §18(g)'s criteria the return meets (none for a Personalised card)."""
    if identity.category is Category.PERSONALISED:
        return ()
    reasons = []
    if purse.balance_cents > HANDLING_FEE_VALUE_OVER_CENTS:
        reasons.append("value_over_1000")
    if (returned - identity.issued).days <= HANDLING_FEE_WITHIN_DAYS:
        reasons.append("within_90_days")
    if returned >= HANDLING_FEE_PAYMENTS_FROM and purse.payment_count <= HANDLING_FEE_MAX_PAYMENTS:
        reasons.append("five_or_fewer_payments")
    return tuple(reasons)


def refund_breakdown(identity: Identity, purse: Purse, returned: date, *,
                     damaged: bool = False) -> Refund:
    """docs/rules.md §8: deposit + remaining value, less the fees that apply. An inactive card
    first pays the inactivity fees due out of its value, exactly as :func:`decide_reactivate`
    takes them (the rest waived), and the return's fees then follow the value that is left: the
    refund is the same whether or not the card was reactivated first. Raises ServiceRefused
    for a card that cannot be returned here."""
    if identity.kind is Kind.SOLD:
        raise ServiceRefused("a Sold card is not returned (it carries no deposit)")
    if identity.kind is Kind.MOBILE:
        raise ServiceRefused("a Mobile card is refunded through the app or website (002 §17), "
                             "not at a terminal")
    check_issued_by(identity, returned)
    if purse.status is Status.CANCELLED:
        raise ServiceRefused("the card is cancelled (already returned?): nothing to refund")
    if purse.status is Status.BLOCKED:
        raise ServiceRefused("the card is blocked (reported lost): lost-card refunds are made "
                             "by the central office")
    if purse.status is Status.SUSPENDED:
        raise ServiceRefused("the card is suspended (AAVS): settle and reactivate it first")
    due = (inactivity_fees(identity, purse, returned).due_cents
           if is_inactive(purse, returned) else 0)
    inactivity = min(due, max(purse.balance_cents, 0))
    value = purse.balance_cents - inactivity
    reasons = handling_fee_reasons(identity, replace(purse, balance_cents=value), returned)
    handling = max(HANDLING_FEE_MIN_CENTS, round_percent(max(value, 0))) if reasons else 0
    damage = DAMAGE_FEE_CENTS if damaged else 0
    personalisation = (PERSONALISATION_FEE_CENTS
                       if identity.category is Category.PERSONALISED
                       and identity.issued >= PERSONALISATION_FEE_ISSUED_FROM else 0)
    refund = identity.deposit_cents + value - handling - damage - personalisation
    waived = max(0, -refund)
    return Refund(identity.deposit_cents, purse.balance_cents, handling, damage, personalisation,
                  max(0, -value), waived, max(0, refund), reasons, inactivity, due - inactivity)


def decide_return(identity: Identity, purse: Purse, today: date, *,
                  damaged: bool = False) -> tuple[Decision, Refund]:
    """The card is cancelled (never usable again) with balance 0; the records say where the
    deposit and the value went."""
    refund = refund_breakdown(identity, purse, today, damaged=damaged)
    value = purse.balance_cents - refund.inactivity_fee_cents
    records = []
    if refund.inactivity_fee_cents:
        records.append(Record(RecordType.INACTIVITY_FEE, refund.inactivity_fee_cents, value))
    if refund.inactivity_fee_waived_cents:
        records.append(Record(RecordType.WAIVED, refund.inactivity_fee_waived_cents, value))
    records.append(Record(RecordType.DEPOSIT_REFUND, refund.deposit_cents, value))
    for record_type, cents in ((RecordType.HANDLING_FEE, refund.handling_fee_cents),
                               (RecordType.DAMAGE_FEE, refund.damage_fee_cents),
                               (RecordType.PERSONALISATION_FEE, refund.personalisation_fee_cents)):
        if cents:
            records.append(Record(record_type, cents, value))
    if refund.negative_offset_cents:
        records.append(Record(RecordType.NEGATIVE_OFFSET, refund.negative_offset_cents, 0))
    records.append(Record(RecordType.REFUND, refund.refund_cents, 0))
    if refund.waived_cents:
        records.append(Record(RecordType.WAIVED, refund.waived_cents, 0))
    records.append(Record(RecordType.CANCEL, 0, 0))
    new_purse = _next(purse, balance_cents=0, status=Status.CANCELLED, aavs_reload_cents=0)
    return (_service_decision(purse, new_purse, ServiceOp.RETURN, today, tuple(records)),
            refund)


# ---- inactivity fee -------------------------------------------------------------------------

@dataclass(frozen=True)
class InactivePeriod:
    start: date
    fee_cents: int


@dataclass(frozen=True)
class InactivityFees:
    """The Inactive Octopus Administrative Fee due at a date: each period's start and fee, or
    why the card owes none (``exempt``)."""

    periods: tuple[InactivePeriod, ...]
    exempt: str | None  # None: the card is liable (it may still owe nothing yet)
    first_period: date | None  # when the first period starts (or started), if liable

    @property
    def due_cents(self) -> int:
        return sum(p.fee_cents for p in self.periods)


def add_years(day: date, years: int) -> date:
    """The same day ``years`` later; 29 February becomes 1 March (the years have then passed)."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return date(day.year + years, 3, 1)


def add_months(day: date, months: int) -> date:
    """The same day of the month ``months`` later; a day the month lacks rolls to the 1st of the
    next month (as :func:`add_years`)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    try:
        return date(year, month + 1, day.day)
    except ValueError:
        year, month = divmod(index + 1, 12)
        return date(year, month + 1, 1)


def age_on(birth: date, day: date) -> int:
    """Completed years from ``birth`` to ``day`` (a 29 February birthday counts on 1 March in a
    common year, as :func:`add_years`); negative before the birth."""
    years = day.year - birth.year
    return years - 1 if add_years(birth, years) > day else years


def holder_age(identity: Identity, day: date) -> int | None:
    """The holder's age on ``day`` from the birth date the card carries, or None (no birth
    date: the card shows no age)."""
    return None if identity.birth_date is None else age_on(identity.birth_date, day)


def _age_exemption(identity: Identity, day: date) -> str | None:
    """The inactivity fee's age exemption for a Personalised holder on ``day`` (002 §19-20)."""
    age = holder_age(identity, day)
    if age is None:
        return None
    if age < INACTIVITY_FEE_MIN_AGE:
        return "holder_under_18"
    if age >= INACTIVITY_FEE_EXEMPT_AGE:
        return "holder_60_or_over"
    return None


def inactivity_fee_exemption(identity: Identity, purse: Purse) -> str | None:
    """Why a card never owes the fee (002 §19, §20; see the module's readings), or None. (A
    Personalised holder's age exempts period by period: :func:`inactivity_fees`.)"""
    if identity.kind is Kind.SOLD:
        return "sold_card"
    if identity.category is Category.PERSONALISED:
        if purse.concession is Concession.STUDENT:
            return "student_status"
        if purse.concession is Concession.DISABILITY:
            return "disability_status"
        if identity.birth_date is None:
            return "personalised"  # no age on the card: not shown to be 18 to 59
        if identity.kind is Kind.ON_LOAN and identity.issued < INACTIVITY_FEE_CARDS_ISSUED_FROM:
            return "issued_before_2017_10_01"
        return None
    if identity.kind is Kind.MOBILE:
        return "elder_card" if identity.category is Category.ELDER else None
    if identity.category is not Category.ADULT:
        return f"{identity.category.label}_card"
    if identity.issued < INACTIVITY_FEE_CARDS_ISSUED_FROM:
        return "issued_before_2017_10_01"
    return None


def inactivity_fees(identity: Identity, purse: Purse, today: date) -> InactivityFees:
    """docs/rules.md §6: the periods begun by ``today``, HK$15 each. A Personalised holder owes
    only the periods that start while aged 18 to 59; one who owes none of them and is outside
    those ages today is exempt for that reason (``holder_under_18``, ``holder_60_or_over``)."""
    exempt = inactivity_fee_exemption(identity, purse)
    if exempt is not None:
        return InactivityFees((), exempt, None)
    last_use = max(d for d in (purse.last_add_value, purse.last_payment) if d is not None)
    first = max(add_years(last_use, INACTIVITY_FEE_AFTER_YEARS), INACTIVITY_FEE_PERIODS_FROM)
    periods = []
    start, n = first, 0
    while start <= today:
        if _age_exemption(identity, start) is None:
            periods.append(InactivePeriod(start, INACTIVITY_FEE_CENTS))
        n += 1
        start = add_months(first, 12 * n)
    if not periods and _age_exemption(identity, today) is not None:
        return InactivityFees((), _age_exemption(identity, today), None)
    return InactivityFees(tuple(periods), None, first)


# ---- reactivation ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reactivation:
    was_inactive: bool
    was_suspended: bool
    fees: InactivityFees
    inactivity_fee_cents: int  # deducted from the card
    waived_cents: int  # due but not deducted (the balance would have gone below zero)
    reactivation_fee_cents: int  # to the bank account (AAVS suspension), not the card
    outstanding_paid_cents: int = 0  # the AAVS amount outstanding, collected at the counter


def decide_reactivate(identity: Identity, purse: Purse, today: date, *,
                      suspension: ListEntry | None = None, paid_cents: int = 0,
                      list_held: bool = True,
                      list_fresh: bool = True) -> tuple[Decision, Reactivation]:
    """An inactive card: free, less the inactivity fees due (never below zero; the rest waived).
    An AAVS-suspended card: once the amount outstanding is paid at the counter (001), HK$20 to
    the bank. ``suspension`` is the AAVS suspension the action list orders for the card
    (:func:`suspension_in_force`; None: none), ``paid_cents`` what the operator collected,
    ``list_held`` whether this terminal holds an action list at all, ``list_fresh`` whether
    it is recent enough to show that a suspended card it does not name is no longer listed
    (:data:`REACTIVATION_LIST_AGE`): the amount the card owes is the one the suspension names,
    collected exactly (``aavs_outstanding_paid``), and the card keeps the suspension's number,
    so a terminal whose list still holds it does not suspend the card again. Without a list,
    or with an old one that does not name the card, the amount cannot be checked: refused."""
    check_issued_by(identity, today)
    _usable(purse, "be reactivated", suspended_ok=True)
    if paid_cents < 0:
        raise BadInput("the amount paid cannot be negative")
    inactive = is_inactive(purse, today)
    suspended = purse.status is Status.SUSPENDED
    if not inactive and not suspended:
        raise ServiceRefused("the card is active: nothing to reactivate")
    owed, released = _outstanding(suspended, suspension, paid_cents, list_held, list_fresh)
    balance = purse.balance_cents
    fees = inactivity_fees(identity, purse, today) if inactive else InactivityFees((), None, None)
    deducted = min(fees.due_cents, max(balance, 0))
    waived = fees.due_cents - deducted
    bank_fee = AAVS_REACTIVATION_FEE_CENTS if suspended else 0
    after = balance - deducted
    records = []
    if deducted:
        records.append(Record(RecordType.INACTIVITY_FEE, deducted, after))
    if waived:
        records.append(Record(RecordType.WAIVED, waived, after))
    if owed:
        records.append(Record(RecordType.AAVS_OUTSTANDING_PAID, owed, after))
    if bank_fee:
        records.append(Record(RecordType.AAVS_REACTIVATION_FEE, bank_fee, after))
    records.append(Record(RecordType.REACTIVATE, 0, after))
    changes = {"balance_cents": after, "status": Status.ACTIVE}
    if inactive:
        changes["last_add_value"] = today
    if released is not None:
        changes["aavs_released"] = max(purse.aavs_released, released)
    new_purse = _next(purse, **changes)
    return (_service_decision(purse, new_purse, ServiceOp.REACTIVATE, today, tuple(records)),
            Reactivation(inactive, suspended, fees, deducted, waived, bank_fee, owed))


def _outstanding(suspended: bool, suspension: ListEntry | None, paid_cents: int,
                 list_held: bool, list_fresh: bool) -> tuple[int, int | None]:
    """What a reactivation collects for dishonoured AAVS debits and the suspension number the
    card keeps (docs/rules.md §8 "Reactivation"); ServiceRefused when the amount paid is not
    what the action list says the card owes, or the terminal cannot tell."""
    if not suspended:
        if paid_cents:
            raise ServiceRefused("the card is not suspended: it owes no AAVS amount (--paid)")
        return 0, None
    if not list_held:
        raise ServiceRefused("this terminal holds no action list, so it cannot tell what the "
                             "card owes for returned AAVS debits (001): fetch the list (farebox "
                             "actions fetch) or give --hotlist")
    if suspension is None:  # not (or no longer) listed: nothing outstanding at the house ...
        if not list_fresh:  # ... or listed on a newer list than this terminal's
            raise ServiceRefused(
                "the action list this terminal holds does not name this suspended card and is "
                f"more than {REACTIVATION_LIST_AGE.seconds // 60} minutes old: fetch it again "
                "(farebox actions fetch), the card may be listed on a newer one")
        if paid_cents:
            raise ServiceRefused("the action list shows no AAVS amount outstanding on this "
                                 "card: collect nothing (leave out --paid)")
        return 0, None
    if suspension.suspension is None:
        raise ServiceRefused("the action list suspends this card by hand (no suspension "
                             "number): the clearing house takes it off the list first")
    owed = suspension.outstanding_cents or 0
    if paid_cents != owed:
        raise ServiceRefused(
            f"the card owes {format_cents(owed)} for returned AAVS debits (001): collect "
            f"exactly that and give --paid {format_cents(owed)}, not {format_cents(paid_cents)}")
    return owed, suspension.suspension


# ---- AAVS, student status, stored value limit -------------------------------------------------

def aavs_age_refusal(identity: Identity, day: date) -> str | None:
    """Why AAVS cannot be set up on this card on ``day`` (002 §13(a): persons aged 12 or over),
    or None. A Child card stands for a holder below 12; a birth date on the card decides for a
    Personalised one; any other card shows no age below 12. Cancelling is always allowed."""
    if identity.category is Category.CHILD:
        return "AAVS is for persons aged 12 or over (002 §13(a)): not on a Child card"
    age = holder_age(identity, day)
    if age is not None and age < AAVS_MIN_AGE:
        return (f"AAVS is for persons aged 12 or over (002 §13(a)): the holder is {age} "
                f"on {day.isoformat()}")
    return None


@dataclass(frozen=True)
class AavsChange:
    action: str  # "enable", "change" or "cancel"
    amount_cents: int  # the reload amount now (0 after a cancel)
    fee_cents: int  # to the bank account


def decide_aavs(identity: Identity, purse: Purse, today: date,
                amount_cents: int | None) -> tuple[Decision, AavsChange]:
    """Enable or change AAVS (``amount_cents`` from the allowed set) or cancel it (None)."""
    check_issued_by(identity, today)
    _usable(purse, "change its AAVS")
    if is_inactive(purse, today):
        raise ServiceRefused("the card is inactive: reactivate it first")
    balance = purse.balance_cents
    if amount_cents is None:
        if not purse.aavs_enabled:
            raise ServiceRefused("AAVS is not enabled on this card: nothing to cancel")
        new_purse = _next(purse, aavs_reload_cents=0)
        change = AavsChange("cancel", 0, 0)
        records = (Record(RecordType.AAVS_CANCEL, 0, balance),)
    else:
        if amount_cents not in AAVS_RELOAD_CENTS:
            allowed = ", ".join(format_whole(c) for c in AAVS_RELOAD_CENTS)
            raise ServiceRefused(f"AAVS reload amount must be one of {allowed}")
        refusal = aavs_age_refusal(identity, today)
        if refusal is not None:
            raise ServiceRefused(refusal)
        if purse.aavs_reload_cents == amount_cents:
            raise ServiceRefused("AAVS is already enabled with that amount")
        if purse.aavs_enabled:
            change = AavsChange("change", amount_cents, 0)
        else:
            fee = AAVS_REACTIVATION_FEE_CENTS if purse.aavs_ever_enabled else 0
            change = AavsChange("enable", amount_cents, fee)
        new_purse = _next(purse, aavs_reload_cents=amount_cents, aavs_ever_enabled=True)
        records = (Record(RecordType.AAVS_ENABLE, 0, balance),)
        if change.fee_cents:
            records += (Record(RecordType.AAVS_REACTIVATION_FEE, change.fee_cents, balance),)
    return _service_decision(purse, new_purse, ServiceOp.AAVS, today, records), change


def student_age_refusal(identity: Identity, day: date) -> str | None:
    """Why Student status cannot be given to this holder on ``day`` (003 "Eligibility": aged 12
    to 25), or None. Only the lower bound is the terminal's: the upper one counts at the time
    of the application (003), which the card does not record and which may be long before."""
    age = holder_age(identity, day)
    if age is not None and age < STUDENT_MIN_AGE:
        return (f"Student status is for students aged 12 or over (003): the holder is {age} "
                f"on {day.isoformat()}")
    return None


def decide_renew_student(identity: Identity, purse: Purse, today: date,
                         expiry: date) -> Decision:
    """Activate or renew a Personalised card's Student status (003 "Activation/Renewal"),
    valid to ``expiry`` (inclusive, docs/rules.md §4). A Personalised card without a concession
    gets the status (activation); one with it gets the new expiry (renewal); a card with
    Disability status or of another category is refused, and so is a holder the card shows to
    be below 12."""
    check_issued_by(identity, today)
    _usable(purse, "renew its student status", suspended_ok=True)
    if identity.category is not Category.PERSONALISED:
        raise ServiceRefused("only a Personalised card can have Student status "
                             f"(this is a {identity.category.label} card)")
    if purse.concession is Concession.DISABILITY:
        raise ServiceRefused("the card carries Persons with Disabilities status: it cannot also "
                             "have Student status")
    refusal = student_age_refusal(identity, today)
    if refusal is not None:
        raise ServiceRefused(refusal)
    if expiry < today:
        raise ServiceRefused(f"expiry {expiry.isoformat()} is before today ({today.isoformat()})")
    if (purse.concession is Concession.STUDENT and purse.concession_expiry is not None
            and expiry == purse.concession_expiry):
        raise ServiceRefused(f"the student status already runs to {expiry.isoformat()}")
    new_purse = _next(purse, concession=Concession.STUDENT, concession_expiry=expiry)
    return _service_decision(purse, new_purse, ServiceOp.RENEW_STUDENT, today,
                             (Record(RecordType.STUDENT_RENEWAL, 0, purse.balance_cents),))


def decide_upgrade_limit(identity: Identity, purse: Purse, today: date) -> Decision:
    """A card issued before 2019-12-01 (Mobile: 2019-10-01) moves to the HK$3,000 limit."""
    check_issued_by(identity, today)
    _usable(purse, "have its limit upgraded", suspended_ok=True)
    if stored_value_limit_cents(identity, purse) >= STORED_VALUE_LIMIT_NEW_CENTS:
        raise ServiceRefused("the card already has the HK$3,000.00 stored value limit")
    if today < LIMIT_UPGRADE_FROM:
        raise ServiceRefused(f"stored value limits are upgraded from "
                             f"{LIMIT_UPGRADE_FROM.isoformat()} (001 ¶1)")
    new_purse = _next(purse, svl_upgraded=True)
    return _service_decision(purse, new_purse, ServiceOp.UPGRADE_LIMIT, today,
                             (Record(RecordType.LIMIT_UPGRADE, 0, purse.balance_cents),))
