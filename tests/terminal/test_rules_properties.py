"""Property tests for the rules engine (docs/rules.md §2-7): money invariants and a reference
reading.

Generated cards cover every kind, category and issue date 1997-2030 (with the limit change dates
themselves), balances anywhere within ``[-negative limit, stored value limit]``, AAVS on or off
with every reload amount, last reloaded maybe today, last add value up to 1,100 days back, every
status and (for Personalised cards) every concession. Generated taps cover flat and full tariffs
(with flat fares one cent either side of each boundary of docs/rules.md §3), times over five years
with extra weight just either side of Hong Kong midnight, and random action-list entries.

Everything the checks compare against -- the limits, the Hong Kong date, the fare class, the list
status, the decision -- is computed here from docs/rules.md, not taken from ``rules.py`` or
``terminal.clock``, so that a wrong constant or a wrong time zone there breaks a property.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone

from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
)

from farebox.cardimage.model import Category, Concession, Identity, Kind, LogType, Purse, Status
from farebox.terminal.core.rules import (
    Decision, FareClass, ListEntry, ListReason, Reason, RecordType, Tariff,
    decide_add_value, decide_payment,
)

UTC = timezone.utc
CARD_NUMBER = 12345678
OTHER_CARD_NUMBER = 87654321
RELOAD_AMOUNTS = (15_000, 25_000, 50_000, 100_000)  # docs/rules.md §3 step 2

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
#: The reference-reading properties check everything at once; boundary cases are a small share of
#: the generated taps, so they get more examples.
REFERENCE = settings(PROPERTY, max_examples=600)

SIGN = {RecordType.ADD_VALUE: +1, RecordType.AUTO_ADD_VALUE: +1, RecordType.PAYMENT: -1}


# ---- docs/rules.md, read independently of rules.py -----------------------------------------

HONG_KONG_TIME = timezone(timedelta(hours=8))  # docs/rules.md §1; deliberately not terminal.clock's


def hk_day(at: datetime) -> date:
    return at.astimezone(HONG_KONG_TIME).date()


def negative_limit(identity: Identity) -> int:
    """docs/rules.md §2 "Negative value limit"."""
    if identity.kind is Kind.MOBILE:
        return 5_000
    if identity.kind is Kind.ON_LOAN and identity.issued >= date(2017, 10, 1):
        return 5_000
    return 3_500


def stored_value_limit(identity: Identity, purse: Purse) -> int:
    """docs/rules.md §2 "Stored value limit"."""
    change = date(2019, 10, 1) if identity.kind is Kind.MOBILE else date(2019, 12, 1)
    return 300_000 if purse.svl_upgraded or identity.issued >= change else 100_000


def expected_fare_class(identity: Identity, purse: Purse, today: date) -> FareClass:
    """docs/rules.md §4, with the reading that a Student status counts through its expiry date."""
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


LIST_STATUS = {ListReason.LOST: Status.BLOCKED, ListReason.AAVS_SUSPENDED: Status.SUSPENDED,
               ListReason.CANCELLED: Status.CANCELLED}
STATUS_REASON = {Status.SUSPENDED: Reason.SUSPENDED, Status.BLOCKED: Reason.BLOCKED,
                 Status.CANCELLED: Reason.CANCELLED}


def expected_status(purse: Purse, entries: list[ListEntry], at: datetime) -> Status:
    """docs/rules.md §7: lost counts three hours after the report, the others at once; the most
    severe status wins and a list never lowers the card's own."""
    status = purse.status
    for entry in entries:
        delay = timedelta(hours=3) if entry.reason is ListReason.LOST else timedelta(0)
        if entry.card_number == CARD_NUMBER and at >= entry.at + delay:
            status = max(status, LIST_STATUS[entry.reason])
    return status


@dataclass(frozen=True)
class Expected:
    approved: bool
    reasons: frozenset[Reason] = frozenset()  # any of these (docs/rules.md orders none of them)
    status_write: Status | None = None  # a list-ordered status change to write
    reload_cents: int | None = None
    balance_after_cents: int | None = None


def expected_gate(purse: Purse, at: datetime, entries: list[ListEntry]) -> Expected | None:
    """docs/rules.md §3 step 1 with §6 and §7."""
    status = expected_status(purse, entries, at)
    inactive = (hk_day(at) - purse.last_add_value).days >= 1000
    if status is not Status.ACTIVE:
        reasons = {STATUS_REASON[status]} | ({Reason.INACTIVE} if inactive else set())
        if status is not purse.status:  # §7: the terminal must mark it, inactive or not
            return Expected(False, frozenset({STATUS_REASON[status]}), status_write=status)
        return Expected(False, frozenset(reasons))
    if inactive:
        return Expected(False, frozenset({Reason.INACTIVE}))
    return None


def expected_payment(identity: Identity, purse: Purse, fare: int, at: datetime,
                     entries: list[ListEntry]) -> Expected:
    """docs/rules.md §3 steps 2-4, with its readings."""
    gate = expected_gate(purse, at, entries)
    if gate is not None:
        return gate
    balance, limit, reload = purse.balance_cents, negative_limit(identity), purse.aavs_reload_cents
    if (reload and purse.last_auto_reload != hk_day(at)
            and (balance - fare <= 0 or balance + limit < fare)
            and balance + reload - fare >= -limit):
        return Expected(True, reload_cents=reload, balance_after_cents=balance + reload - fare)
    if balance > 0 and balance - fare >= -limit:
        return Expected(True, balance_after_cents=balance - fare)
    return Expected(False, frozenset({Reason.INSUFFICIENT_VALUE}))


def expected_add_value(identity: Identity, purse: Purse, amount: int, minimum: int,
                       at: datetime, entries: list[ListEntry]) -> Expected:
    """docs/rules.md §5."""
    gate = expected_gate(purse, at, entries)
    if gate is not None:
        return gate
    after = purse.balance_cents + amount
    reasons = set()
    if amount > 300_000 or after > stored_value_limit(identity, purse):
        reasons.add(Reason.OVER_LIMIT)
    if amount < minimum:
        reasons.add(Reason.BELOW_MINIMUM)
    if reasons:
        return Expected(False, frozenset(reasons))
    return Expected(True, balance_after_cents=after)


def check_against(expected: Expected, decision: Decision, purse: Purse) -> None:
    assert decision.approved is expected.approved
    if not expected.approved:
        assert decision.reason in expected.reasons
        if expected.status_write is None:
            assert decision.new_purse is None
        else:
            assert decision.new_purse is not None
            assert decision.new_purse.status is expected.status_write
        return
    assert decision.reason is None
    assert decision.aavs_reload_cents == expected.reload_cents
    assert decision.balance_after_cents == expected.balance_after_cents


# ---- strategies -----------------------------------------------------------------------------

BOUNDARY_ISSUE_DATES = [date(2017, 9, 30), date(2017, 10, 1), date(2019, 9, 30),
                        date(2019, 10, 1), date(2019, 11, 30), date(2019, 12, 1)]


def near_hk_midnight() -> st.SearchStrategy[datetime]:
    """Within three seconds of a Hong Kong midnight (16:00:00Z)."""
    return st.builds(
        lambda day, offset, tz: (datetime(day.year, day.month, day.day, 16, tzinfo=UTC)
                                 + timedelta(seconds=offset)).astimezone(tz),
        st.dates(date(2024, 1, 1), date(2028, 12, 31)),
        st.integers(-3, 3),
        st.sampled_from([UTC, HONG_KONG_TIME]),
    )


def times() -> st.SearchStrategy[datetime]:
    anywhere = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2028, 12, 31),
                            timezones=st.sampled_from([UTC, HONG_KONG_TIME]))
    return st.one_of(anywhere, near_hk_midnight())


def days_before(today: date, days: st.SearchStrategy[int]) -> st.SearchStrategy[date]:
    return days.map(lambda n: today - timedelta(days=n))


def around(*centres: int) -> list[int]:
    """Each value and its neighbours one cent either side."""
    return sorted({c + d for c in centres for d in (-1, 0, 1)})


@st.composite
def cards(draw, today: date, *, status: st.SearchStrategy[Status] | None = None,
          max_days_since_add_value: int = 1_100) -> tuple[Identity, Purse]:
    kind = draw(st.sampled_from(Kind))
    category = draw(st.sampled_from(Category))
    issued = draw(st.dates(date(1997, 1, 1), date(2030, 12, 31))
                  | st.sampled_from(BOUNDARY_ISSUE_DATES))
    identity = Identity(CARD_NUMBER, kind, category, issued,
                        0 if kind is Kind.SOLD else 5_000, key_version=1)

    concession, expiry = Concession.NONE, None
    if category is Category.PERSONALISED:
        concession = draw(st.sampled_from(Concession))
        if concession is Concession.STUDENT:
            expiry = today + timedelta(days=draw(st.integers(-400, 400) | st.sampled_from([-1, 0])))

    upgraded = draw(st.booleans())
    shell = Purse(counter=0, balance_cents=0, last_add_value=today, svl_upgraded=upgraded)
    low, high = -negative_limit(identity), stored_value_limit(identity, shell)
    balance = draw(st.integers(low, high)
                   | st.sampled_from([low, low + 1, -1, 0, 1, high - 1, high]))

    purse = Purse(
        counter=draw(st.integers(0, 1_000_000)),
        balance_cents=balance,
        last_add_value=draw(days_before(
            today, st.integers(0, max_days_since_add_value)
            | st.sampled_from([d for d in (0, 999, 1000) if d <= max_days_since_add_value]))),
        last_auto_reload=draw(st.none() | st.just(today)
                              | days_before(today, st.integers(1, 400))),
        last_payment=draw(st.none() | days_before(today, st.integers(0, 400))),
        aavs_reload_cents=draw(st.sampled_from((0,) + RELOAD_AMOUNTS)),
        status=draw(status if status is not None
                    else st.just(Status.ACTIVE) | st.sampled_from(Status)),
        payment_count=draw(st.integers(0, 0xFFFF)),
        concession=concession,
        concession_expiry=expiry,
        svl_upgraded=upgraded,
    )
    return identity, purse


def tariffs() -> st.SearchStrategy[Tariff]:
    fare = st.integers(1, 50_000)
    full = st.fixed_dictionaries({c: fare for c in FareClass}).map(Tariff)
    return st.one_of(fare.map(Tariff.flat), full)


def boundary_tariffs(purse: Purse) -> st.SearchStrategy[Tariff]:
    """Flat fares one cent either side of where docs/rules.md §3 changes its answer, for both
    negative limits (so that a card given the wrong one is caught either way)."""
    balance, reload = purse.balance_cents, purse.aavs_reload_cents
    fares = around(balance, balance + 3_500, balance + 5_000,
                   balance + reload + 3_500, balance + reload + 5_000)
    return st.sampled_from([f for f in fares if f > 0] or [1]).map(Tariff.flat)


def action_lists(at: datetime) -> st.SearchStrategy[list[ListEntry]]:
    three_hours = 3 * 3600
    offset_s = st.one_of(  # seconds from the tap: lost reports count from three hours on
        st.integers(-2 * three_hours, -three_hours), st.integers(-three_hours, 3600),
        st.sampled_from([-three_hours - 1, -three_hours, -three_hours + 1, -1, 0, 1]))
    entry = st.builds(
        ListEntry,
        card_number=st.sampled_from([CARD_NUMBER, CARD_NUMBER, OTHER_CARD_NUMBER]),
        reason=st.sampled_from(ListReason),
        at=offset_s.map(lambda s: at + timedelta(seconds=s)),
    )
    return st.just([]) | st.lists(entry, max_size=3)


@st.composite
def payments(draw):
    at = draw(times())
    identity, purse = draw(cards(hk_day(at)))
    tariff = draw(st.one_of(tariffs(), boundary_tariffs(purse), boundary_tariffs(purse)))
    return identity, purse, tariff, at, draw(action_lists(at))


@st.composite
def add_values(draw):
    at = draw(times())
    identity, purse = draw(cards(hk_day(at)))
    minimum = draw(st.sampled_from([1, 1_000, 5_000, 10_000]))
    # Amounts one cent either side of the minimum, the per-transaction maximum and both stored
    # value limits (so that a card given the wrong limit is caught either way).
    balance = purse.balance_cents
    edges = [a for a in around(minimum, 300_000, 100_000 - balance, 300_000 - balance) if a > 0]
    amount = draw(st.one_of(st.integers(1, 310_000), st.sampled_from(edges),
                            st.sampled_from(edges)))
    return identity, purse, amount, minimum, at, draw(action_lists(at))


def decide_payment_case(case) -> tuple[Decision, Identity, Purse]:
    identity, purse, tariff, at, entries = case
    return decide_payment(identity, purse, tariff, at, entries), identity, purse


def decide_add_value_case(case) -> tuple[Decision, Identity, Purse]:
    identity, purse, amount, minimum, at, entries = case
    return (decide_add_value(identity, purse, amount, at, entries, minimum_cents=minimum),
            identity, purse)


# ---- checks shared by payment and add value -------------------------------------------------

def outcome(decision: Decision) -> str:
    if decision.approved:
        return "approved with reload" if decision.aavs_reload_cents else "approved"
    return f"declined {decision.reason.value}" + (" with a write" if decision.new_purse else "")


def check_decline_changes_no_value(decision: Decision, purse: Purse) -> None:
    event(outcome(decision))
    if decision.approved:
        return
    assert decision.balance_before_cents == purse.balance_cents
    assert decision.balance_after_cents == purse.balance_cents
    assert decision.aavs_reload_cents is None
    assert all(record.amount_cents == 0 for record in decision.records)
    if decision.new_purse is None:
        assert decision.records == ()
        assert decision.log_entry is None
    else:
        # The only write a decline makes: a list raises the status, nothing else changes.
        assert decision.new_purse.balance_cents == purse.balance_cents
        assert decision.new_purse.status > purse.status
        assert decision.new_purse == replace(purse, counter=purse.counter + 1,
                                             status=decision.new_purse.status)
        assert len(decision.records) == 1
        assert decision.log_entry is not None
        assert decision.log_entry.type is LogType.STATUS
        assert decision.log_entry.new_status is decision.new_purse.status


def check_approval_adds_up(decision: Decision, identity: Identity, purse: Purse) -> None:
    if not decision.approved:
        return
    assert decision.new_purse is not None
    assert decision.balance_before_cents == purse.balance_cents
    running = purse.balance_cents
    for record in decision.records:
        running += SIGN[record.type] * record.amount_cents
        assert record.amount_cents > 0
        assert record.balance_after_cents == running
    assert running == decision.balance_after_cents == decision.new_purse.balance_cents
    assert decision.new_purse.counter == purse.counter + 1
    assert decision.log_entry is not None
    assert decision.log_entry.counter == decision.new_purse.counter


def check_approval_within_limits(decision: Decision, identity: Identity, purse: Purse) -> None:
    if not decision.approved:
        return
    after = decision.balance_after_cents
    assert -negative_limit(identity) <= after <= stored_value_limit(identity, purse)
    # Only an active card that has had value added within 1,000 days can be approved.
    assert purse.status is Status.ACTIVE
    assert decision.new_purse.status is Status.ACTIVE


# ---- properties -----------------------------------------------------------------------------

@PROPERTY
@given(payments())
def test_a_declined_payment_never_changes_value(case) -> None:
    decision, _, purse = decide_payment_case(case)
    check_decline_changes_no_value(decision, purse)


@PROPERTY
@given(add_values())
def test_a_declined_add_value_never_changes_value(case) -> None:
    decision, _, purse = decide_add_value_case(case)
    check_decline_changes_no_value(decision, purse)


@PROPERTY
@given(payments())
def test_approved_payment_movements_add_up(case) -> None:
    decision, identity, purse = decide_payment_case(case)
    check_approval_adds_up(decision, identity, purse)
    if decision.approved:
        assert decision.records[-1].type is RecordType.PAYMENT
        assert [r.type for r in decision.records[:-1]] in ([], [RecordType.AUTO_ADD_VALUE])


@PROPERTY
@given(add_values())
def test_approved_add_value_movements_add_up(case) -> None:
    decision, identity, purse = decide_add_value_case(case)
    check_approval_adds_up(decision, identity, purse)
    if decision.approved:
        assert [r.type for r in decision.records] == [RecordType.ADD_VALUE]


@PROPERTY
@given(payments())
def test_an_approved_payment_stays_within_the_card_limits(case) -> None:
    decision, identity, purse = decide_payment_case(case)
    check_approval_within_limits(decision, identity, purse)


@PROPERTY
@given(add_values())
def test_an_approved_add_value_stays_within_the_card_limits(case) -> None:
    decision, identity, purse = decide_add_value_case(case)
    check_approval_within_limits(decision, identity, purse)
    if decision.approved:
        amount = case[2]
        assert case[3] <= amount <= 300_000


@REFERENCE
@given(payments())
def test_payment_decides_as_rules_md_reads(case) -> None:
    """The whole decision against a reference reading of docs/rules.md §3, §4, §6 and §7."""
    identity, purse, tariff, at, entries = case
    decision = decide_payment(identity, purse, tariff, at, entries)
    cls = expected_fare_class(identity, purse, hk_day(at))
    fare = tariff.fares.get(cls, tariff.fares[FareClass.ADULT])
    assert decision.amount_cents == fare
    if decision.fare_class is not None:
        assert decision.fare_class is cls
    expected = expected_payment(identity, purse, fare, at, entries)
    check_against(expected, decision, purse)
    if decision.approved:
        today = hk_day(at)
        reloaded = expected.reload_cents is not None
        assert decision.new_purse == replace(
            purse, counter=purse.counter + 1, balance_cents=expected.balance_after_cents,
            last_payment=today, payment_count=min(purse.payment_count + 1, 0xFFFF),
            last_add_value=today if reloaded else purse.last_add_value,
            last_auto_reload=today if reloaded else purse.last_auto_reload)


@REFERENCE
@given(add_values())
def test_add_value_decides_as_rules_md_reads(case) -> None:
    """The whole decision against a reference reading of docs/rules.md §5, §6 and §7."""
    identity, purse, amount, minimum, at, entries = case
    decision = decide_add_value(identity, purse, amount, at, entries, minimum_cents=minimum)
    expected = expected_add_value(identity, purse, amount, minimum, at, entries)
    check_against(expected, decision, purse)
    if decision.approved:
        assert decision.new_purse == replace(
            purse, counter=purse.counter + 1, balance_cents=expected.balance_after_cents,
            last_add_value=hk_day(at))


@PROPERTY
@given(payments())
def test_a_payment_depends_on_the_instant_not_on_the_offset_it_is_written_in(case) -> None:
    identity, purse, tariff, at, entries = case
    in_utc = decide_payment(identity, purse, tariff, at.astimezone(UTC), entries)
    in_hong_kong = decide_payment(identity, purse, tariff, at.astimezone(HONG_KONG_TIME), entries)
    assert in_utc == in_hong_kong


# ---- a card's life: many taps carried forward -----------------------------------------------

class CardLife(RuleBasedStateMachine):
    """Payments and add values over advancing time on one card, each carrying the written purse
    forward. The model totals every value movement the records report."""

    @initialize(start=times(), data=st.data())
    def issue(self, start: datetime, data) -> None:
        self.now = start.astimezone(UTC)
        self.identity, self.purse = data.draw(cards(
            hk_day(self.now), status=st.just(Status.ACTIVE), max_days_since_add_value=900))
        self.initial_balance = self.purse.balance_cents
        self.added = self.auto_added = self.paid = 0
        self.initial_counter = self.purse.counter
        self.writes = 0
        self.auto_reload_days = (set() if self.purse.last_auto_reload is None
                                 else {self.purse.last_auto_reload})
        self.action_list: list[ListEntry] = []
        self.steps = 0

    def carry(self, decision: Decision) -> None:
        self.steps += 1
        before = self.purse
        check_decline_changes_no_value(decision, before)
        check_approval_adds_up(decision, self.identity, before)
        check_approval_within_limits(decision, self.identity, before)
        if decision.new_purse is None:
            assert not decision.approved
            return
        assert decision.new_purse.counter == before.counter + 1
        assert decision.log_entry.counter == decision.new_purse.counter
        self.writes += 1
        for record in decision.records:
            if record.type is RecordType.AUTO_ADD_VALUE:
                day = hk_day(self.now)
                assert day not in self.auto_reload_days, f"a second auto reload on {day}"
                self.auto_reload_days.add(day)
                self.auto_added += record.amount_cents
            elif record.type is RecordType.ADD_VALUE:
                self.added += record.amount_cents
            elif record.type is RecordType.PAYMENT:
                self.paid += record.amount_cents
            else:
                assert record.amount_cents == 0
        self.purse = decision.new_purse

    @rule(seconds=st.integers(1, 3 * 86_400))
    def wait(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(offset_s=st.integers(-2, 2))
    def wait_until_hong_kong_midnight(self, offset_s: int) -> None:
        """Jump to a couple of seconds either side of the next 00:00 HKT (16:00Z)."""
        midnight = datetime.combine(hk_day(self.now) + timedelta(days=1), datetime.min.time(),
                                    HONG_KONG_TIME)
        target = midnight + timedelta(seconds=offset_s)
        if target > self.now:
            self.now = target.astimezone(UTC)

    @rule(days=st.integers(30, 1_000))
    def wait_long(self, days: int) -> None:
        self.now += timedelta(days=days)

    @rule(tariff=tariffs(), in_hong_kong_time=st.booleans())
    def pay(self, tariff: Tariff, in_hong_kong_time: bool) -> None:
        at = self.now.astimezone(HONG_KONG_TIME) if in_hong_kong_time else self.now
        decision = decide_payment(self.identity, self.purse, tariff, at, self.action_list)
        fare = tariff.fares.get(expected_fare_class(self.identity, self.purse, hk_day(at)),
                                tariff.fares[FareClass.ADULT])
        check_against(expected_payment(self.identity, self.purse, fare, at, self.action_list),
                      decision, self.purse)
        self.carry(decision)

    @rule(amount=st.integers(1, 310_000) | st.sampled_from([5_000, 10_000, 50_000]))
    def add_value(self, amount: int) -> None:
        decision = decide_add_value(self.identity, self.purse, amount, self.now,
                                    self.action_list)
        check_against(expected_add_value(self.identity, self.purse, amount, 5_000, self.now,
                                         self.action_list), decision, self.purse)
        self.carry(decision)

    @precondition(lambda self: self.steps >= 12)
    @rule(reason=st.sampled_from(ListReason), card_number=st.sampled_from(
        [CARD_NUMBER, OTHER_CARD_NUMBER]), delay_s=st.integers(-3_600, 3_600))
    def list_card(self, reason: ListReason, card_number: int, delay_s: int) -> None:
        self.action_list.append(ListEntry(card_number, reason, self.now + timedelta(seconds=delay_s)))

    @invariant()
    def balance_is_the_sum_of_the_movements(self) -> None:
        model = self.initial_balance + self.added + self.auto_added - self.paid
        assert model == self.purse.balance_cents

    @invariant()
    def balance_stays_within_the_card_limits(self) -> None:
        assert (-negative_limit(self.identity) <= self.purse.balance_cents
                <= stored_value_limit(self.identity, self.purse))

    @invariant()
    def counter_advances_one_per_write(self) -> None:
        assert self.purse.counter == self.initial_counter + self.writes

    @invariant()
    def at_most_one_auto_reload_per_hong_kong_day(self) -> None:
        last = self.purse.last_auto_reload
        assert last is None or last in self.auto_reload_days


CardLife.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
TestCardLife = CardLife.TestCase
