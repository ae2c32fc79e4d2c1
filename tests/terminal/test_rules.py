"""Table tests for the rules engine (``terminal/core/rules.py``) against docs/rules.md §2-7.

Expectations are literal cents and literal dates on purpose: a test that read its expected values
from the constants in ``rules.py`` could not catch a wrong constant.

Time: the scheme counts Hong Kong days (UTC+08:00). ``2026-02-28T15:59:59Z`` is 23:59:59 HKT on
2026-02-28; ``2026-02-28T16:00:00Z`` is 00:00 HKT on 2026-03-01. Boundary cases put the UTC date
and the Hong Kong date on different days so that a rule using the UTC date fails.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.cardimage.model import (
    Category, Concession, Identity, Kind, LogEntry, LogType, Purse, Status,
)
from farebox.terminal.core.clock import HONG_KONG, hk_date
from farebox.terminal.core.rules import (
    Decision, FareClass, ListEntry, ListReason, Reason, Record, RecordType, Tariff,
    decide_add_value, decide_payment, fare_class, list_ordered_change, negative_limit_cents,
    stored_value_limit_cents,
)

param = pytest.param

CARD_NUMBER = 12345678
OTHER_CARD_NUMBER = 87654321

NOW = datetime(2026, 3, 1, 4, 0, tzinfo=timezone.utc)  # 12:00 HKT
TODAY = date(2026, 3, 1)
YESTERDAY = date(2026, 2, 28)


def utc(text: str) -> datetime:
    """An aware time from ISO text ending in ``Z`` (or carrying another offset)."""
    at = datetime.fromisoformat(text)
    assert at.utcoffset() is not None, text
    return at


def hkt(text: str) -> datetime:
    """A Hong Kong wall-clock time, e.g. ``hkt("2026-03-01T00:00:00")``."""
    return datetime.fromisoformat(text).replace(tzinfo=HONG_KONG)


def card(kind: Kind = Kind.ON_LOAN, category: Category = Category.ADULT,
         issued: date = date(2020, 1, 1), card_number: int = CARD_NUMBER) -> Identity:
    """Default: an On-Loan Adult card issued 2020-01-01 (negative limit 50.00, limit 3,000.00)."""
    deposit = 0 if kind is Kind.SOLD else 5_000
    return Identity(card_number, kind, category, issued, deposit, key_version=1)


def purse(**changes) -> Purse:
    base = Purse(counter=41, balance_cents=10_000, last_add_value=date(2026, 1, 15),
                 last_payment=date(2026, 2, 27), payment_count=12)
    return replace(base, **changes)


def aavs_purse(**changes) -> Purse:
    """AAVS on (HK$150), last auto reloaded a week ago."""
    return purse(**{"aavs_reload_cents": 15_000, "last_auto_reload": date(2026, 2, 22), **changes})


# The two parameter sets most tables use.
NEW_CARD = card()  # negative limit 5000, stored value limit 300000
OLD_CARD = card(issued=date(2017, 9, 30))  # negative limit 3500, stored value limit 100000

FULL_TARIFF = Tariff({
    FareClass.ADULT: 1_100, FareClass.CHILD: 550, FareClass.ELDER: 200,
    FareClass.STUDENT: 560, FareClass.DISABILITY: 210,
})


# ---- assertion helpers ----------------------------------------------------------------------

def assert_declined_without_write(decision: Decision, before: Purse, reason: Reason) -> None:
    assert decision.approved is False
    assert decision.reason is reason
    assert decision.balance_before_cents == before.balance_cents
    assert decision.balance_after_cents == before.balance_cents
    assert decision.new_purse is None
    assert decision.log_entry is None
    assert decision.records == ()
    assert decision.aavs_reload_cents is None


def assert_payment_approved(decision: Decision, before: Purse, fare: int, after: int,
                            today: date = TODAY) -> None:
    """A plain payment (no reload): one record, one write, nothing else on the card changes."""
    assert decision.approved is True
    assert decision.reason is None
    assert decision.amount_cents == fare
    assert decision.balance_before_cents == before.balance_cents
    assert decision.balance_after_cents == after
    assert decision.aavs_reload_cents is None
    assert decision.records == (Record(RecordType.PAYMENT, fare, after),)
    assert decision.new_purse == replace(
        before, counter=before.counter + 1, balance_cents=after, last_payment=today,
        payment_count=before.payment_count + 1)
    assert decision.log_entry == LogEntry(before.counter + 1, LogType.PAYMENT, today, fare)


def assert_reload_approved(decision: Decision, before: Purse, fare: int, reload: int,
                           today: date = TODAY) -> None:
    """An AAVS reload and the payment in one tap: two records in order, one write."""
    after = before.balance_cents + reload - fare
    assert decision.approved is True
    assert decision.reason is None
    assert decision.amount_cents == fare
    assert decision.aavs_reload_cents == reload
    assert decision.balance_before_cents == before.balance_cents
    assert decision.balance_after_cents == after
    assert decision.records == (
        Record(RecordType.AUTO_ADD_VALUE, reload, before.balance_cents + reload),
        Record(RecordType.PAYMENT, fare, after),
    )
    assert decision.new_purse == replace(
        before, counter=before.counter + 1, balance_cents=after, last_add_value=today,
        last_auto_reload=today, last_payment=today, payment_count=before.payment_count + 1)
    assert decision.log_entry == LogEntry(before.counter + 1, LogType.PAYMENT, today, fare,
                                          aavs_reload_cents=reload)


def assert_add_value_approved(decision: Decision, before: Purse, amount: int,
                              today: date = TODAY) -> None:
    after = before.balance_cents + amount
    assert decision.approved is True
    assert decision.reason is None
    assert decision.amount_cents == amount
    assert decision.balance_before_cents == before.balance_cents
    assert decision.balance_after_cents == after
    assert decision.records == (Record(RecordType.ADD_VALUE, amount, after),)
    assert decision.new_purse == replace(
        before, counter=before.counter + 1, balance_cents=after, last_add_value=today)
    assert decision.log_entry == LogEntry(before.counter + 1, LogType.ADD_VALUE, today, amount)


def assert_declined_with_status_write(decision: Decision, before: Purse, status: Status,
                                      today: date = TODAY) -> None:
    """A list-ordered status change: the only write a decline may make (docs/rules.md §3, §7)."""
    reason = {Status.BLOCKED: Reason.BLOCKED, Status.SUSPENDED: Reason.SUSPENDED,
              Status.CANCELLED: Reason.CANCELLED}[status]
    record = {Status.BLOCKED: RecordType.BLOCK, Status.SUSPENDED: RecordType.SUSPEND,
              Status.CANCELLED: RecordType.CANCEL}[status]
    assert decision.approved is False
    assert decision.reason is reason
    assert decision.balance_before_cents == before.balance_cents
    assert decision.balance_after_cents == before.balance_cents
    assert decision.aavs_reload_cents is None
    assert decision.new_purse == replace(before, counter=before.counter + 1, status=status)
    assert decision.records == (Record(record, 0, before.balance_cents),)
    assert decision.log_entry == LogEntry(before.counter + 1, LogType.STATUS, today, 0,
                                          new_status=status)


# ---- 1. card parameters (docs/rules.md §2) --------------------------------------------------

@pytest.mark.parametrize("identity, expected_cents", [
    param(card(Kind.ON_LOAN, issued=date(2017, 9, 30)), 3_500,
          id="an on-loan card issued 2017-09-30 has the old 35.00 negative limit"),
    param(card(Kind.ON_LOAN, issued=date(2017, 10, 1)), 5_000,
          id="an on-loan card issued 2017-10-01 has the new 50.00 negative limit"),
    param(card(Kind.ON_LOAN, issued=date(1997, 9, 1)), 3_500,
          id="a 1997 on-loan card has 35.00"),
    param(card(Kind.ON_LOAN, issued=date(2030, 12, 31)), 5_000,
          id="a 2030 on-loan card has 50.00"),
    param(card(Kind.SOLD, issued=date(2017, 9, 30)), 3_500,
          id="a sold card issued 2017-09-30 has 35.00"),
    param(card(Kind.SOLD, issued=date(2017, 10, 1)), 3_500,
          id="a sold card issued 2017-10-01 still has 35.00"),
    param(card(Kind.SOLD, issued=date(2026, 1, 1)), 3_500,
          id="a sold card issued 2026 still has 35.00"),
    param(card(Kind.MOBILE, issued=date(2017, 9, 30)), 5_000,
          id="a mobile card issued 2017-09-30 has 50.00"),
    param(card(Kind.MOBILE, issued=date(2017, 10, 1)), 5_000,
          id="a mobile card issued 2017-10-01 has 50.00"),
    param(card(Kind.MOBILE, issued=date(2026, 1, 1)), 5_000,
          id="a mobile card issued 2026 has 50.00"),
    param(card(Kind.ON_LOAN, Category.PERSONALISED, issued=date(2017, 9, 30)), 3_500,
          id="the category does not matter: a personalised on-loan card of 2017-09-30 has 35.00"),
    param(card(Kind.ON_LOAN, Category.CHILD, issued=date(2017, 10, 1)), 5_000,
          id="the category does not matter: a child on-loan card of 2017-10-01 has 50.00"),
])
def test_negative_limit_by_kind_and_issue_date(identity: Identity, expected_cents: int) -> None:
    assert negative_limit_cents(identity) == expected_cents


@pytest.mark.parametrize("identity, upgraded, expected_cents", [
    param(card(Kind.ON_LOAN, issued=date(2019, 11, 30)), False, 100_000,
          id="an on-loan card issued 2019-11-30 holds 1,000.00"),
    param(card(Kind.ON_LOAN, issued=date(2019, 12, 1)), False, 300_000,
          id="an on-loan card issued 2019-12-01 holds 3,000.00"),
    param(card(Kind.ON_LOAN, issued=date(2019, 10, 1)), False, 100_000,
          id="the mobile change date does not apply to an on-loan card issued 2019-10-01"),
    param(card(Kind.SOLD, issued=date(2019, 11, 30)), False, 100_000,
          id="a sold card issued 2019-11-30 holds 1,000.00"),
    param(card(Kind.SOLD, issued=date(2019, 12, 1)), False, 300_000,
          id="a sold card issued 2019-12-01 holds 3,000.00"),
    param(card(Kind.MOBILE, issued=date(2019, 9, 30)), False, 100_000,
          id="a mobile card issued 2019-09-30 holds 1,000.00"),
    param(card(Kind.MOBILE, issued=date(2019, 10, 1)), False, 300_000,
          id="a mobile card issued 2019-10-01 holds 3,000.00"),
    param(card(Kind.MOBILE, issued=date(2019, 11, 30)), False, 300_000,
          id="a mobile card issued 2019-11-30 already holds 3,000.00"),
    param(card(Kind.ON_LOAN, issued=date(1997, 9, 1)), False, 100_000,
          id="a 1997 on-loan card holds 1,000.00"),
    param(card(Kind.ON_LOAN, issued=date(2019, 11, 30)), True, 300_000,
          id="an upgraded on-loan card issued 2019-11-30 holds 3,000.00"),
    param(card(Kind.SOLD, issued=date(2010, 5, 5)), True, 300_000,
          id="an upgraded sold card issued 2010 holds 3,000.00"),
    param(card(Kind.MOBILE, issued=date(2019, 9, 30)), True, 300_000,
          id="an upgraded mobile card issued 2019-09-30 holds 3,000.00"),
    param(card(Kind.ON_LOAN, issued=date(2019, 12, 1)), True, 300_000,
          id="upgrading a new card changes nothing"),
])
def test_stored_value_limit_by_kind_issue_date_and_upgrade(
        identity: Identity, upgraded: bool, expected_cents: int) -> None:
    assert stored_value_limit_cents(identity, purse(svl_upgraded=upgraded)) == expected_cents


# ---- 2. fare classes (docs/rules.md §4) -----------------------------------------------------

STUDENT_EXPIRY = date(2026, 2, 28)

FARE_CLASS_CASES = [
    param(Category.ADULT, Concession.NONE, None, NOW, FareClass.ADULT,
          id="an adult card pays adult"),
    param(Category.CHILD, Concession.NONE, None, NOW, FareClass.CHILD,
          id="a child card pays child"),
    param(Category.ELDER, Concession.NONE, None, NOW, FareClass.ELDER,
          id="an elder card pays elder"),
    param(Category.PERSONALISED, Concession.NONE, None, NOW, FareClass.ADULT,
          id="a personalised card without a concession pays adult"),
    param(Category.PERSONALISED, Concession.DISABILITY, None, NOW, FareClass.DISABILITY,
          id="a personalised card with disability status pays the disability fare"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          utc("2026-02-27T15:59:59Z"), FareClass.STUDENT,
          id="a student pays student the day before expiry"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          utc("2026-02-27T16:00:00Z"), FareClass.STUDENT,
          id="a student pays student from HK midnight starting the expiry date (UTC date before)"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          utc("2026-02-28T04:00:00Z"), FareClass.STUDENT,
          id="a student pays student at noon on the expiry date"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          utc("2026-02-28T15:59:59Z"), FareClass.STUDENT,
          id="a student pays student one second before HK midnight ending the expiry date"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          utc("2026-02-28T16:00:00Z"), FareClass.ADULT,
          id="a student pays adult from HK midnight after expiry though the UTC date is the expiry"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          hkt("2026-02-28T23:59:59"), FareClass.STUDENT,
          id="a student pays student at 23:59:59 HKT on the expiry date given in HK time"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          hkt("2026-03-01T00:00:00"), FareClass.ADULT,
          id="a student pays adult at 00:00 HKT the day after expiry given in HK time"),
    param(Category.PERSONALISED, Concession.STUDENT, STUDENT_EXPIRY,
          utc("2026-03-10T04:00:00Z"), FareClass.ADULT,
          id="a student status expired days ago pays adult"),
    param(Category.ADULT, Concession.STUDENT, date(2030, 1, 1), NOW, FareClass.ADULT,
          id="a non-personalised card carrying a stray student status still pays adult"),
]


@pytest.mark.parametrize("category, concession, expiry, at, expected", FARE_CLASS_CASES)
def test_fare_class(category: Category, concession: Concession, expiry: date | None,
                    at: datetime, expected: FareClass) -> None:
    today = at.astimezone(HONG_KONG).date()
    holder = purse(concession=concession, concession_expiry=expiry)
    assert fare_class(card(category=category), holder, today) is expected


@pytest.mark.parametrize("category, concession, expiry, at, expected", FARE_CLASS_CASES)
def test_full_tariff_charges_each_class_its_own_fare(
        category: Category, concession: Concession, expiry: date | None, at: datetime,
        expected: FareClass) -> None:
    holder = purse(concession=concession, concession_expiry=expiry,
                   last_add_value=date(2026, 1, 15))
    decision = decide_payment(card(category=category), holder, FULL_TARIFF, at)
    fare = FULL_TARIFF.fares[expected]
    assert decision.fare_class is expected
    assert_payment_approved(decision, holder, fare, holder.balance_cents - fare,
                            today=at.astimezone(HONG_KONG).date())


@pytest.mark.parametrize("category, concession, expiry, at, expected", FARE_CLASS_CASES)
def test_adult_only_tariff_charges_every_class_the_adult_fare(
        category: Category, concession: Concession, expiry: date | None, at: datetime,
        expected: FareClass) -> None:
    holder = purse(concession=concession, concession_expiry=expiry)
    decision = decide_payment(card(category=category), holder, Tariff.flat(1_100), at)
    assert decision.fare_class is expected
    assert_payment_approved(decision, holder, 1_100, holder.balance_cents - 1_100,
                            today=at.astimezone(HONG_KONG).date())


@pytest.mark.parametrize("category, expected_fare", [
    param(Category.CHILD, 550, id="a child pays the child fare the tariff has"),
    param(Category.ELDER, 1_100, id="an elder pays adult when the tariff has no elder fare"),
    param(Category.ADULT, 1_100, id="an adult pays adult on a partial tariff"),
])
def test_partial_tariff_falls_back_to_adult(category: Category, expected_fare: int) -> None:
    tariff = Tariff({FareClass.ADULT: 1_100, FareClass.CHILD: 550})
    decision = decide_payment(card(category=category), purse(), tariff, NOW)
    assert decision.amount_cents == expected_fare


@pytest.mark.parametrize("fares", [
    param({FareClass.CHILD: 550}, id="a tariff without an adult fare is refused"),
    param({FareClass.ADULT: 0}, id="a zero fare is refused"),
    param({FareClass.ADULT: -1}, id="a negative fare is refused"),
    param({FareClass.ADULT: 11.0}, id="a float fare is refused"),
    param({FareClass.ADULT: 1_100, FareClass.ELDER: 0}, id="a zero concession fare is refused"),
])
def test_tariff_refuses_bad_fares(fares) -> None:
    with pytest.raises(ValueError):
        Tariff(fares)


# ---- 3. payment and the negative-value rule (docs/rules.md §3 steps 3-4) ---------------------

@pytest.mark.parametrize("identity, balance, fare, after", [
    param(NEW_CARD, 1_000, 1_000, 0, id="an exact balance pays and leaves zero"),
    param(NEW_CARD, 1_001, 1_000, 1, id="one cent more than the fare leaves one cent"),
    param(NEW_CARD, 999, 1_000, -1, id="one cent short goes one cent negative"),
    param(card(issued=date(2017, 10, 1)), 100, 5_100, -5_000,
          id="an on-loan card of 2017-10-01 may go to exactly -50.00"),
    param(OLD_CARD, 100, 3_600, -3_500,
          id="an on-loan card of 2017-09-30 may go to exactly -35.00"),
    param(card(Kind.SOLD, issued=date(2024, 1, 1)), 100, 3_600, -3_500,
          id="a sold card may go to exactly -35.00"),
    param(card(Kind.MOBILE, issued=date(2015, 1, 1)), 100, 5_100, -5_000,
          id="a mobile card may go to exactly -50.00"),
    param(NEW_CARD, 1, 5_001, -5_000, id="a single cent of value is enough to go negative"),
    param(NEW_CARD, 300_000, 50_000, 250_000, id="a full 3,000.00 card pays a large fare"),
])
def test_payment_approved(identity: Identity, balance: int, fare: int, after: int) -> None:
    before = purse(balance_cents=balance)
    decision = decide_payment(identity, before, Tariff.flat(fare), NOW)
    assert_payment_approved(decision, before, fare, after)


@pytest.mark.parametrize("identity, balance, fare", [
    param(card(issued=date(2017, 10, 1)), 100, 5_101,
          id="an on-loan card of 2017-10-01 cannot go to -50.01"),
    param(OLD_CARD, 100, 3_601, id="an on-loan card of 2017-09-30 cannot go to -35.01"),
    param(card(Kind.SOLD, issued=date(2024, 1, 1)), 100, 3_601,
          id="a sold card cannot go to -35.01"),
    param(card(Kind.MOBILE, issued=date(2015, 1, 1)), 100, 5_101,
          id="a mobile card cannot go to -50.01"),
    param(NEW_CARD, 1, 5_002, id="a single cent of value cannot go to -50.01"),
    param(NEW_CARD, 0, 1, id="a zero balance cannot pay even one cent"),
    param(NEW_CARD, -1, 1, id="a balance of -0.01 cannot pay"),
    param(NEW_CARD, -5_000, 1, id="a card at its negative limit cannot pay"),
    param(OLD_CARD, -3_500, 100, id="an old card at -35.00 cannot pay"),
])
def test_payment_declined_for_insufficient_value_changes_nothing(
        identity: Identity, balance: int, fare: int) -> None:
    before = purse(balance_cents=balance)
    decision = decide_payment(identity, before, Tariff.flat(fare), NOW)
    assert_declined_without_write(decision, before, Reason.INSUFFICIENT_VALUE)
    assert decision.amount_cents == fare
    assert decision.fare_class is FareClass.ADULT


def test_payment_count_saturates_at_what_the_card_holds() -> None:
    before = purse(payment_count=0xFFFF)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(100), NOW)
    assert decision.approved
    assert decision.new_purse is not None and decision.new_purse.payment_count == 0xFFFF


def test_payment_records_the_hong_kong_date_of_the_tap() -> None:
    before = purse()
    decision = decide_payment(NEW_CARD, before, Tariff.flat(100), utc("2026-02-28T16:00:00Z"))
    assert_payment_approved(decision, before, 100, 9_900, today=date(2026, 3, 1))


@pytest.mark.parametrize("decide", [
    param(lambda at: decide_payment(NEW_CARD, purse(), Tariff.flat(100), at),
          id="a payment at a naive time is refused"),
    param(lambda at: decide_add_value(NEW_CARD, purse(), 5_000, at),
          id="an add value at a naive time is refused"),
])
def test_naive_times_are_refused(decide) -> None:
    with pytest.raises(ValueError):
        decide(datetime(2026, 3, 1, 12, 0))


# ---- 4. automatic add value (docs/rules.md §3 step 2) ---------------------------------------

@pytest.mark.parametrize("balance, fare, reload", [
    param(1_000, 1_000, 15_000, id="the value would reach exactly zero so the card reloads"),
    param(500, 1_000, 15_000,
          id="the value would go negative within the limit so the card reloads first"),
    param(100, 10_000, 15_000,
          id="balance plus negative limit cannot pay so the card reloads"),
    param(0, 1_000, 15_000, id="a zero balance reloads and pays"),
    param(-3_000, 1_000, 15_000, id="a negative balance reloads and pays"),
    param(-5_000, 1_000, 15_000, id="a balance at the negative limit reloads and pays"),
    param(1_000, 1_000, 25_000, id="the reload amount can be 250.00"),
    param(1_000, 1_000, 50_000, id="the reload amount can be 500.00"),
    param(1_000, 1_000, 100_000, id="the reload amount can be 1,000.00"),
    param(100, 20_100, 15_000,
          id="a reload that ends exactly at the negative limit is made"),
    param(0, 20_000, 15_000,
          id="a zero balance card reloads to end exactly at the negative limit"),
])
def test_aavs_reloads_in_the_tap_that_would_reach_zero(balance: int, fare: int,
                                                       reload: int) -> None:
    before = aavs_purse(balance_cents=balance, aavs_reload_cents=reload)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(fare), NOW)
    assert_reload_approved(decision, before, fare, reload)


def test_aavs_reload_of_1000_may_end_at_a_1000_card_limit() -> None:
    """reading: the stored value limit applies to the balance the card ends with (B + R - F)."""
    before = aavs_purse(balance_cents=1_000, aavs_reload_cents=100_000)
    decision = decide_payment(OLD_CARD, before, Tariff.flat(1_000), NOW)
    assert_reload_approved(decision, before, 1_000, 100_000)
    assert decision.balance_after_cents == 100_000


@pytest.mark.parametrize("balance, fare", [
    param(1_001, 1_000, id="one cent would remain so there is no reload"),
    param(10_000, 1_000, id="plenty of value means no reload"),
])
def test_aavs_does_not_reload_while_value_stays_above_zero(balance: int, fare: int) -> None:
    before = aavs_purse(balance_cents=balance)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(fare), NOW)
    assert_payment_approved(decision, before, fare, balance - fare)


@pytest.mark.parametrize("balance, fare", [
    param(100, 20_101, id="a reload that would still end at -50.01 is not made and the tap declines"),
    param(0, 20_001, id="a zero balance card whose reload cannot cover the fare declines"),
    param(-5_000, 15_001, id="a card at its limit whose reload cannot cover the fare declines"),
])
def test_aavs_reload_that_cannot_cover_the_fare_is_not_made(balance: int, fare: int) -> None:
    """reading: if B + R - F would still be below -N, no reload; the payment falls to step 3."""
    before = aavs_purse(balance_cents=balance)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(fare), NOW)
    assert_declined_without_write(decision, before, Reason.INSUFFICIENT_VALUE)


@pytest.mark.parametrize("last_auto_reload, at, reloads", [
    param(None, NOW, True, id="a card never reloaded reloads"),
    param(date(2026, 2, 28), NOW, True, id="a card reloaded yesterday reloads today"),
    param(date(2026, 3, 1), NOW, False, id="a card reloaded today does not reload again"),
    param(date(2026, 2, 28), utc("2026-02-28T15:59:59Z"), False,
          id="one second before HK midnight it is still the reload day"),
    param(date(2026, 2, 28), utc("2026-02-28T16:00:00Z"), True,
          id="at HK midnight the card may reload again though the UTC date is unchanged"),
    param(date(2026, 3, 1), utc("2026-02-28T16:00:00Z"), False,
          id="at HK midnight starting the reload day the UTC date is the day before yet no reload"),
    param(date(2026, 3, 1), utc("2026-03-01T15:59:59Z"), False,
          id="the last second of the HK reload day does not reload"),
    param(date(2026, 3, 1), utc("2026-03-01T16:00:00Z"), True,
          id="the first second of the next HK day reloads"),
    param(date(2026, 3, 1), hkt("2026-03-02T00:00:00"), True,
          id="HK midnight given in HK time reloads"),
    param(date(2026, 3, 1), hkt("2026-03-01T23:59:59"), False,
          id="23:59:59 HKT on the reload day given in HK time does not reload"),
])
def test_aavs_reloads_at_most_once_per_hong_kong_day(
        last_auto_reload: date | None, at: datetime, reloads: bool) -> None:
    before = aavs_purse(balance_cents=1_000, last_auto_reload=last_auto_reload)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), at)
    today = at.astimezone(HONG_KONG).date()
    if reloads:
        assert_reload_approved(decision, before, 1_000, 15_000, today=today)
    else:
        assert_payment_approved(decision, before, 1_000, 0, today=today)


@pytest.mark.parametrize("balance, fare, after", [
    param(1_000, 1_000, 0, id="reloaded today an exact balance pays down to zero"),
    param(100, 5_100, -5_000, id="reloaded today the card may still go to -50.00"),
    param(100, 5_101, None, id="reloaded today the card cannot go to -50.01"),
    param(0, 1, None, id="reloaded today a zero balance cannot pay"),
    param(-100, 1, None, id="reloaded today a negative balance cannot pay"),
])
def test_aavs_already_used_today_falls_through_to_the_negative_value_rule(
        balance: int, fare: int, after: int | None) -> None:
    before = aavs_purse(balance_cents=balance, last_auto_reload=TODAY)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(fare), NOW)
    if after is None:
        assert_declined_without_write(decision, before, Reason.INSUFFICIENT_VALUE)
    else:
        assert_payment_approved(decision, before, fare, after)


def test_card_without_aavs_never_reloads() -> None:
    before = purse(balance_cents=1_000, aavs_reload_cents=0)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), NOW)
    assert_payment_approved(decision, before, 1_000, 0)


def test_aavs_reload_dates_are_hong_kong_dates() -> None:
    """A tap at 01:00 HKT on 2026-03-01 is 17:00Z on 2026-02-28: the card gets 2026-03-01."""
    before = aavs_purse(balance_cents=500, last_add_value=date(2026, 1, 1))
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), utc("2026-02-28T17:00:00Z"))
    assert_reload_approved(decision, before, 1_000, 15_000, today=date(2026, 3, 1))
    assert decision.new_purse is not None
    assert decision.new_purse.last_add_value == date(2026, 3, 1)
    assert decision.new_purse.last_auto_reload == date(2026, 3, 1)


def test_aavs_taps_through_two_hong_kong_days() -> None:
    """Reload, then same day no second reload (negative value instead), decline, next day reload."""
    tariff = Tariff.flat(1_000)
    first = aavs_purse(balance_cents=1_000)
    decision = decide_payment(NEW_CARD, first, tariff, utc("2026-03-01T01:00:00Z"))
    assert_reload_approved(decision, first, 1_000, 15_000)

    second = decision.new_purse
    decision = decide_payment(NEW_CARD, second, Tariff.flat(20_000), utc("2026-03-01T09:00:00Z"))
    assert_payment_approved(decision, second, 20_000, -5_000)

    third = decision.new_purse
    decision = decide_payment(NEW_CARD, third, tariff, utc("2026-03-01T15:59:59Z"))
    assert_declined_without_write(decision, third, Reason.INSUFFICIENT_VALUE)

    decision = decide_payment(NEW_CARD, third, tariff, utc("2026-03-01T16:00:00Z"))
    assert_reload_approved(decision, third, 1_000, 15_000, today=date(2026, 3, 2))
    assert decision.balance_after_cents == 9_000


# ---- 5. add value (docs/rules.md §5) --------------------------------------------------------

@pytest.mark.parametrize("identity, balance, amount, minimum", [
    param(NEW_CARD, 0, 5_000, None, id="exactly the default minimum of 50.00 is accepted"),
    param(NEW_CARD, 0, 1_000, 1_000, id="exactly a configured minimum of 10.00 is accepted"),
    param(NEW_CARD, 0, 10_000, 10_000, id="exactly a configured minimum of 100.00 is accepted"),
    param(NEW_CARD, 0, 300_000, None,
          id="3,000.00 in one transaction is accepted when the limit allows"),
    param(NEW_CARD, -5_000, 300_000, None,
          id="3,000.00 onto -50.00 is accepted and pays off the negative value"),
    param(OLD_CARD, 50_000, 50_000, None, id="a 1,000 card may be filled to exactly 1,000.00"),
    param(NEW_CARD, 250_000, 50_000, None, id="a 3,000 card may be filled to exactly 3,000.00"),
    param(OLD_CARD, -3_500, 5_000, None, id="a negative balance is paid off first: -35 + 50 = 15"),
    param(OLD_CARD, -3_500, 103_500, None,
          id="a negative balance leaves room: -35.00 + 1,035.00 reaches the 1,000 limit"),
    param(NEW_CARD, -5_000, 5_000, None, id="50.00 onto -50.00 leaves zero"),
])
def test_add_value_approved(identity: Identity, balance: int, amount: int,
                            minimum: int | None) -> None:
    before = purse(balance_cents=balance)
    kwargs = {} if minimum is None else {"minimum_cents": minimum}
    decision = decide_add_value(identity, before, amount, NOW, **kwargs)
    assert_add_value_approved(decision, before, amount)


@pytest.mark.parametrize("identity, balance, amount, minimum, reason", [
    param(NEW_CARD, 0, 4_999, None, Reason.BELOW_MINIMUM,
          id="one cent under the default minimum is refused"),
    param(NEW_CARD, 0, 999, 1_000, Reason.BELOW_MINIMUM,
          id="one cent under a configured minimum of 10.00 is refused"),
    param(NEW_CARD, 0, 9_999, 10_000, Reason.BELOW_MINIMUM,
          id="one cent under a configured minimum of 100.00 is refused"),
    param(NEW_CARD, -5_000, 300_001, None, Reason.OVER_LIMIT,
          id="3,000.01 in one transaction is refused though the card could hold it"),
    param(NEW_CARD, 0, 300_001, None, Reason.OVER_LIMIT,
          id="3,000.01 onto an empty 3,000 card is refused"),
    param(OLD_CARD, 50_000, 50_001, None, Reason.OVER_LIMIT,
          id="a 1,000 card may not go to 1,000.01"),
    param(NEW_CARD, 250_000, 50_001, None, Reason.OVER_LIMIT,
          id="a 3,000 card may not go to 3,000.01"),
    param(NEW_CARD, 1, 300_000, None, Reason.OVER_LIMIT,
          id="3,000.00 onto one cent would pass the 3,000 limit"),
    param(OLD_CARD, -3_500, 103_501, None, Reason.OVER_LIMIT,
          id="a negative balance leaves room only up to the limit"),
    param(card(Kind.MOBILE, issued=date(2019, 9, 30)), 50_000, 50_001, None, Reason.OVER_LIMIT,
          id="a mobile card of 2019-09-30 may not go to 1,000.01"),
])
def test_add_value_declined_changes_nothing(identity: Identity, balance: int, amount: int,
                                            minimum: int | None, reason: Reason) -> None:
    before = purse(balance_cents=balance)
    kwargs = {} if minimum is None else {"minimum_cents": minimum}
    decision = decide_add_value(identity, before, amount, NOW, **kwargs)
    assert_declined_without_write(decision, before, reason)
    assert decision.amount_cents == amount


@pytest.mark.parametrize("identity, upgraded", [
    param(card(Kind.MOBILE, issued=date(2019, 10, 1)), False,
          id="a mobile card of 2019-10-01 may pass 1,000.00"),
    param(card(Kind.SOLD, issued=date(2019, 12, 1)), False,
          id="a sold card of 2019-12-01 may pass 1,000.00"),
    param(card(Kind.ON_LOAN, issued=date(2019, 11, 30)), True,
          id="an upgraded on-loan card of 2019-11-30 may pass 1,000.00"),
])
def test_add_value_above_1000_on_3000_cards(identity: Identity, upgraded: bool) -> None:
    before = purse(balance_cents=50_000, svl_upgraded=upgraded)
    assert_add_value_approved(decide_add_value(identity, before, 50_001, NOW), before, 50_001)


@pytest.mark.parametrize("amount", [
    param(0, id="zero"), param(-1, id="minus one cent"), param(-5_000, id="minus 50.00"),
    param(5_000.0, id="a float"), param(True, id="a bool"),
])
def test_add_value_amount_must_be_positive_integer_cents(amount) -> None:
    with pytest.raises(ValueError):
        decide_add_value(NEW_CARD, purse(), amount, NOW)


def test_add_value_restarts_the_inactivity_clock_on_the_hong_kong_date() -> None:
    before = purse(last_add_value=date(2024, 1, 1), aavs_reload_cents=15_000,
                   last_auto_reload=date(2026, 2, 1))
    decision = decide_add_value(NEW_CARD, before, 5_000, utc("2026-02-28T16:00:00Z"))
    assert_add_value_approved(decision, before, 5_000, today=date(2026, 3, 1))
    assert decision.new_purse.last_add_value == date(2026, 3, 1)
    assert decision.new_purse.last_auto_reload == date(2026, 2, 1)  # cash is not an auto reload


# ---- 6. inactive cards (docs/rules.md §6) ---------------------------------------------------

DAYS_999_AGO = TODAY - timedelta(days=999)  # 2023-06-06
DAYS_1000_AGO = TODAY - timedelta(days=1000)


def test_the_inactivity_dates_are_what_the_tables_assume() -> None:
    assert DAYS_999_AGO == date(2023, 6, 6)
    assert DAYS_1000_AGO == date(2023, 6, 5)


@pytest.mark.parametrize("last_add_value, at", [
    param(DAYS_999_AGO, NOW, id="999 days after the last add value the card still pays"),
    param(DAYS_999_AGO, utc("2026-03-01T15:59:59Z"),
          id="at 23:59:59 HKT on day 999 the card still pays"),
    param(DAYS_1000_AGO, utc("2026-02-28T15:59:59Z"),
          id="a card whose day 1000 begins at the next HK midnight still pays"),
])
def test_card_within_1000_days_pays(last_add_value: date, at: datetime) -> None:
    before = purse(last_add_value=last_add_value)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(100), at)
    assert_payment_approved(decision, before, 100, 9_900, today=at.astimezone(HONG_KONG).date())


@pytest.mark.parametrize("last_add_value, at", [
    param(DAYS_1000_AGO, NOW, id="1000 days after the last add value the card is inactive"),
    param(DAYS_999_AGO, utc("2026-03-01T16:00:00Z"),
          id="at HK midnight starting day 1000 the card is inactive though the UTC date is day 999"),
    param(date(2015, 1, 1), NOW, id="a card untouched for years is inactive"),
])
def test_inactive_card_cannot_pay(last_add_value: date, at: datetime) -> None:
    before = aavs_purse(balance_cents=1_000, last_add_value=last_add_value)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), at)
    assert_declined_without_write(decision, before, Reason.INACTIVE)


@pytest.mark.parametrize("last_add_value, approved", [
    param(DAYS_999_AGO, True, id="999 days after the last add value the card takes value"),
    param(DAYS_1000_AGO, False, id="1000 days after the last add value the card refuses value"),
])
def test_inactivity_applies_to_add_value(last_add_value: date, approved: bool) -> None:
    before = purse(last_add_value=last_add_value)
    decision = decide_add_value(NEW_CARD, before, 5_000, NOW)
    if approved:
        assert_add_value_approved(decision, before, 5_000)
    else:
        assert_declined_without_write(decision, before, Reason.INACTIVE)


def test_aavs_reload_restarts_the_inactivity_clock() -> None:
    before = aavs_purse(balance_cents=1_000, last_add_value=DAYS_999_AGO)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), NOW)
    assert_reload_approved(decision, before, 1_000, 15_000)
    tomorrow = NOW + timedelta(days=1)
    after = decide_payment(NEW_CARD, decision.new_purse, Tariff.flat(1_000), tomorrow)
    assert after.approved


def test_a_payment_without_reload_does_not_restart_the_inactivity_clock() -> None:
    before = purse(last_add_value=DAYS_999_AGO)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), NOW)
    assert decision.approved
    assert decision.new_purse.last_add_value == DAYS_999_AGO
    tomorrow = NOW + timedelta(days=1)
    after = decide_payment(NEW_CARD, decision.new_purse, Tariff.flat(1_000), tomorrow)
    assert_declined_without_write(after, decision.new_purse, Reason.INACTIVE)


def test_cash_add_value_restarts_the_inactivity_clock() -> None:
    before = purse(last_add_value=DAYS_999_AGO)
    decision = decide_add_value(NEW_CARD, before, 5_000, NOW)
    tomorrow = NOW + timedelta(days=1)
    after = decide_payment(NEW_CARD, decision.new_purse, Tariff.flat(1_000), tomorrow)
    assert after.approved


# ---- 7. lists (docs/rules.md §7) ------------------------------------------------------------

REPORTED = utc("2026-03-01T01:00:00Z")  # 09:00 HKT
ONE_SECOND = timedelta(seconds=1)


def lost(at: datetime = REPORTED, card_number: int = CARD_NUMBER) -> ListEntry:
    return ListEntry(card_number, ListReason.LOST, at)


def suspended(at: datetime = REPORTED, card_number: int = CARD_NUMBER) -> ListEntry:
    return ListEntry(card_number, ListReason.AAVS_SUSPENDED, at)


def cancelled(at: datetime = REPORTED, card_number: int = CARD_NUMBER) -> ListEntry:
    return ListEntry(card_number, ListReason.CANCELLED, at)


PAY = "payment"
ADD = "add value"


def decide(operation: str, before: Purse, at: datetime, action_list) -> Decision:
    if operation == PAY:
        return decide_payment(NEW_CARD, before, Tariff.flat(1_000), at, action_list)
    return decide_add_value(NEW_CARD, before, 5_000, at, action_list)


def assert_approved(operation: str, decision: Decision, before: Purse, at: datetime) -> None:
    today = at.astimezone(HONG_KONG).date()
    if operation == PAY:
        assert_payment_approved(decision, before, 1_000, before.balance_cents - 1_000, today)
    else:
        assert_add_value_approved(decision, before, 5_000, today)


BOTH = pytest.mark.parametrize("operation", [param(PAY, id="payment"), param(ADD, id="add value")])


@BOTH
@pytest.mark.parametrize("entries, at", [
    param([lost()], REPORTED + timedelta(hours=3) - ONE_SECOND,
          id="a lost card still works one second before three hours have passed"),
    param([lost()], REPORTED, id="a lost card still works at the moment of the report"),
    param([suspended()], REPORTED - ONE_SECOND,
          id="a suspension listed one second in the future does nothing yet"),
    param([cancelled()], REPORTED - ONE_SECOND,
          id="a cancellation listed one second in the future does nothing yet"),
    param([lost(card_number=OTHER_CARD_NUMBER), suspended(card_number=OTHER_CARD_NUMBER),
           cancelled(card_number=OTHER_CARD_NUMBER)], REPORTED + timedelta(days=1),
          id="entries for another card number do nothing"),
    param([lost(at=NOW + timedelta(days=1))], NOW, id="a lost report made tomorrow does nothing"),
    param([], NOW, id="an empty list does nothing"),
])
def test_list_entries_not_yet_effective_change_nothing(operation: str, entries, at: datetime) -> None:
    before = purse()
    assert_approved(operation, decide(operation, before, at, entries), before, at)


@BOTH
@pytest.mark.parametrize("entries, at, status", [
    param([lost()], REPORTED + timedelta(hours=3), Status.BLOCKED,
          id="a lost card is blocked exactly three hours after the report"),
    param([lost()], REPORTED + timedelta(hours=30), Status.BLOCKED,
          id="a lost card is blocked a day later"),
    param([lost(at=hkt("2026-03-01T09:00:00"))], utc("2026-03-01T04:00:00Z"), Status.BLOCKED,
          id="a report listed in HK time takes effect three hours later in UTC"),
    param([suspended()], REPORTED, Status.SUSPENDED,
          id="an AAVS suspension takes effect at once"),
    param([cancelled()], REPORTED, Status.CANCELLED, id="a cancellation takes effect at once"),
    param([lost(), cancelled()], REPORTED + timedelta(hours=3), Status.CANCELLED,
          id="cancelled outranks blocked"),
    param([cancelled(), lost()], REPORTED + timedelta(hours=3), Status.CANCELLED,
          id="cancelled outranks blocked whatever the list order"),
    param([suspended(), lost()], REPORTED + timedelta(hours=3), Status.BLOCKED,
          id="blocked outranks suspended"),
    param([lost(), suspended()], REPORTED + timedelta(hours=3), Status.BLOCKED,
          id="blocked outranks suspended whatever the list order"),
    param([lost(), suspended()], REPORTED + timedelta(hours=1), Status.SUSPENDED,
          id="a suspension applies while the lost report is not yet effective"),
    param([suspended(card_number=OTHER_CARD_NUMBER), lost()], REPORTED + timedelta(hours=3),
          Status.BLOCKED, id="only this card's entries count"),
])
def test_list_orders_a_status_write_and_a_decline(operation: str, entries, at: datetime,
                                                  status: Status) -> None:
    before = aavs_purse(balance_cents=1_000)  # an AAVS reload would be due: it must not happen
    decision = decide(operation, before, at, entries)
    assert_declined_with_status_write(decision, before, status,
                                      today=at.astimezone(HONG_KONG).date())


@BOTH
@pytest.mark.parametrize("card_status, entries, reason", [
    param(Status.BLOCKED, [], Reason.BLOCKED, id="a card blocked on the card is declined"),
    param(Status.SUSPENDED, [], Reason.SUSPENDED, id="a card suspended on the card is declined"),
    param(Status.CANCELLED, [], Reason.CANCELLED, id="a card cancelled on the card is declined"),
    param(Status.BLOCKED, [lost()], Reason.BLOCKED,
          id="a blocked card on the lost list is not written again"),
    param(Status.BLOCKED, [suspended()], Reason.BLOCKED,
          id="a suspension on the list never lowers a blocked card"),
    param(Status.CANCELLED, [lost(), suspended()], Reason.CANCELLED,
          id="a lost report never lowers a cancelled card"),
    param(Status.SUSPENDED, [suspended()], Reason.SUSPENDED,
          id="a suspended card on the suspension list is not written again"),
])
def test_card_status_declines_without_a_write(operation: str, card_status: Status, entries,
                                              reason: Reason) -> None:
    before = aavs_purse(balance_cents=1_000, status=card_status)
    decision = decide(operation, before, NOW, entries)
    assert_declined_without_write(decision, before, reason)


@BOTH
@pytest.mark.parametrize("card_status, entries, status", [
    param(Status.SUSPENDED, [lost()], Status.BLOCKED,
          id="a suspended card reported lost becomes blocked"),
    param(Status.SUSPENDED, [cancelled()], Status.CANCELLED,
          id="a suspended card on the cancelled list becomes cancelled"),
    param(Status.BLOCKED, [cancelled()], Status.CANCELLED,
          id="a blocked card on the cancelled list becomes cancelled"),
])
def test_list_raises_the_card_status(operation: str, card_status: Status, entries,
                                     status: Status) -> None:
    before = purse(status=card_status)
    decision = decide(operation, before, NOW, entries)
    assert_declined_with_status_write(decision, before, status)


def test_a_lost_inactive_card_is_still_marked_blocked() -> None:
    """docs/rules.md §7: from three hours after the report every terminal must mark it blocked."""
    before = purse(last_add_value=DAYS_1000_AGO)
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), NOW, [lost()])
    assert_declined_with_status_write(decision, before, Status.BLOCKED)


@pytest.mark.parametrize("operation", [PAY, ADD])
def test_the_list_is_applied_at_the_later_of_the_rules_time_and_the_terminals_reading(
        operation: str) -> None:
    """docs/rules.md §3 "Clock": an untrusted reading runs the rules at an earlier time, yet a
    list entry dated before the reading applies (a doubtful clock never spares a listed card);
    the status write is dated by the rules' time. A reading behind the rules' time changes
    nothing."""
    before, earlier = purse(), NOW - timedelta(days=10)
    kwargs = {"list_at": NOW}
    decision = (decide_payment(NEW_CARD, before, Tariff.flat(1_000), earlier, [lost()], **kwargs)
                if operation == PAY else
                decide_add_value(NEW_CARD, before, 5_000, earlier, [lost()], **kwargs))
    assert_declined_with_status_write(decision, before, Status.BLOCKED,
                                      today=hk_date(earlier))
    assert decide(operation, before, earlier, [lost()]).approved  # the rules' time alone
    behind = (decide_payment(NEW_CARD, before, Tariff.flat(1_000), NOW, [lost()],
                             list_at=earlier) if operation == PAY else
              decide_add_value(NEW_CARD, before, 5_000, NOW, [lost()], list_at=earlier))
    assert_declined_with_status_write(behind, before, Status.BLOCKED)


def test_a_service_terminal_marks_a_listed_card_at_the_terminals_reading() -> None:
    before, earlier = purse(), NOW - timedelta(days=10)
    assert list_ordered_change(NEW_CARD, before, earlier, [lost()]) is None
    decision = list_ordered_change(NEW_CARD, before, earlier, [lost()], list_at=NOW)
    assert_declined_with_status_write(decision, before, Status.BLOCKED, today=hk_date(earlier))
    assert list_ordered_change(NEW_CARD, before, NOW, [lost()], list_at=earlier) is not None


def test_action_list_may_be_any_iterable() -> None:
    before = purse()
    decision = decide_payment(NEW_CARD, before, Tariff.flat(1_000), NOW, iter([lost()]))
    assert_declined_with_status_write(decision, before, Status.BLOCKED)


def test_lost_card_becomes_blocked_exactly_three_hours_after_report() -> None:
    entry = lost()
    assert entry.effective_from() == utc("2026-03-01T04:00:00Z")
    assert suspended().effective_from() == REPORTED
    assert cancelled().effective_from() == REPORTED


# ---- 8. every approval writes once ----------------------------------------------------------

WRITES = [
    param(lambda p: decide_payment(NEW_CARD, p, Tariff.flat(1_000), NOW),
          purse(counter=0), id="a plain payment from counter 0"),
    param(lambda p: decide_payment(NEW_CARD, p, Tariff.flat(5_100), NOW),
          purse(counter=7, balance_cents=100), id="a payment into negative value"),
    param(lambda p: decide_payment(NEW_CARD, p, Tariff.flat(1_000), NOW),
          aavs_purse(counter=1_000, balance_cents=1_000), id="a payment with an AAVS reload"),
    param(lambda p: decide_add_value(NEW_CARD, p, 5_000, NOW),
          purse(counter=65_534), id="a cash add value"),
    param(lambda p: decide_add_value(NEW_CARD, p, 5_000, NOW, [lost()]),
          purse(counter=3), id="a list-ordered block"),
]


@pytest.mark.parametrize("decide_on, before", WRITES)
def test_every_write_advances_the_counter_by_exactly_one(decide_on, before: Purse) -> None:
    decision = decide_on(before)
    assert decision.new_purse is not None
    assert decision.new_purse.counter == before.counter + 1
    assert decision.log_entry is not None
    assert decision.log_entry.counter == decision.new_purse.counter
    assert decision.log_entry.day == TODAY
