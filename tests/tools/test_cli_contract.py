"""The ``farebox`` command-line contract (docs/cli.md) and the rules it reaches (docs/rules.md).

Expected values are literals taken from the documents, never from the code's constants. Times put
the Hong Kong date and the UTC date on different days where a rule counts days, so that a rule
using the UTC date fails: ``2026-08-31T15:59:59Z`` is 23:59:59 HKT on 2026-08-31 and
``2026-08-31T16:00:00Z`` is 00:00 HKT on 2026-09-01.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import date, datetime, timedelta, timezone

import pytest

MONEY = re.compile(r"-?[0-9]+\.[0-9]{2}")
DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
HK = timezone(timedelta(hours=8))

AT = "2026-11-22T08:00:00+08:00"

CARD_SHOW_KEYS = {
    "number", "kind", "category", "concession", "concession_expiry", "issued", "status", "balance",
    "negative_limit", "stored_value_limit", "last_add_value", "aavs", "counter", "history",
}
RESULT_KEYS = {"outcome", "reason", "card", "amount", "balance_before", "balance_after",
               "aavs_reload", "records"}
REASONS = {"insufficient_value", "blocked", "suspended", "cancelled", "inactive", "invalid_card",
           "rollback", "over_limit", "below_minimum"}


def luhn_check_digit(payload: str) -> int:
    """ISO 7812 check digit (docs/rules.md §1), written out independently of the code."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10


def approved(run) -> dict:
    result = run.json()
    assert result["outcome"] == "approved", result
    assert result["reason"] is None
    return result


def declined(run, reason: str) -> dict:
    result = run.json()
    assert result["outcome"] == "declined", result
    assert result["reason"] == reason, result
    return result


def payment(amount: str, after: str) -> dict:
    return {"type": "payment", "amount": amount, "balance_after": after}


# ==== card new / card show ====================================================================

def test_card_new_defaults(farebox):
    card = farebox.card(number="12345678")
    shown = farebox.show(card)
    assert shown["number"] == "12345678(2)"
    assert shown["kind"] == "on-loan"
    assert shown["category"] == "adult"
    assert shown["concession"] == "none"
    assert shown["concession_expiry"] is None
    assert shown["issued"] == "2026-01-15"
    assert shown["status"] == "active"
    assert shown["balance"] == "150.00"
    assert shown["negative_limit"] == "50.00"
    assert shown["stored_value_limit"] == "3000.00"
    assert shown["last_add_value"] == "2026-01-15"  # = issue date
    assert shown["aavs"] == {"enabled": False, "amount": None, "last_reload": None}


def test_card_show_json_has_every_contract_key_with_its_type(farebox):
    card = farebox.card(number="12345678", category="personalised", concession="student",
                        concession_expiry="2027-08-31", aavs="250")
    shown = farebox.show(card)
    assert CARD_SHOW_KEYS <= shown.keys()
    for key in ("number", "kind", "category", "concession", "status"):
        assert isinstance(shown[key], str), key
    for key in ("balance", "negative_limit", "stored_value_limit"):
        assert isinstance(shown[key], str) and MONEY.fullmatch(shown[key]), (key, shown[key])
    for key in ("issued", "last_add_value", "concession_expiry"):
        assert isinstance(shown[key], str) and DAY.fullmatch(shown[key]), (key, shown[key])
    assert shown["status"] in {"active", "blocked", "suspended", "cancelled"}
    assert shown["concession"] == "student" and shown["concession_expiry"] == "2027-08-31"
    assert shown["category"] == "personalised"
    assert set(shown["aavs"]) == {"enabled", "amount", "last_reload"}
    assert shown["aavs"] == {"enabled": True, "amount": "250.00", "last_reload": None}
    assert type(shown["counter"]) is int
    assert isinstance(shown["history"], list) and shown["history"]


def test_card_show_human_output_is_text_not_json(farebox):
    card = farebox.card(number="12345678")
    run = farebox("card", "show", card)
    assert run.code == 0 and run.err == ""
    assert "12345678(2)" in run.out and "150.00" in run.out
    with pytest.raises(json.JSONDecodeError):
        json.loads(run.out)


def test_card_new_issued_defaults_to_hong_kong_today(farebox):
    before = datetime.now(HK).date()
    path = farebox.path("today.json")
    run = farebox("card", "new", path)
    after = datetime.now(HK).date()
    assert run.code == 0, run.err
    shown = farebox.show(path)
    assert shown["issued"] in {before.isoformat(), after.isoformat()}
    assert shown["last_add_value"] == shown["issued"]


@pytest.mark.parametrize(("kind", "category", "balance"), [
    ("on-loan", "adult", "150.00"),
    ("on-loan", "child", "50.00"),
    ("on-loan", "elder", "50.00"),
    ("on-loan", "personalised", "130.00"),
    ("sold", "adult", "0.00"),
    ("sold", "child", "0.00"),
    ("sold", "personalised", "0.00"),
    ("mobile", "adult", "0.00"),
    ("mobile", "elder", "0.00"),
])
def test_card_new_default_balance_by_kind_and_category(farebox, kind, category, balance):
    shown = farebox.show(farebox.card(kind=kind, category=category))
    assert (shown["kind"], shown["category"], shown["balance"]) == (kind, category, balance)


@pytest.mark.parametrize(("number", "shown_as"), [
    ("12345678", "12345678(2)"),      # docs/cli.md's own example
    ("12345678(2)", "12345678(2)"),   # with its (right) check digit
    ("00000001", "00000001(8)"),
    ("87654321", "87654321(6)"),
    ("00000000", "00000000(0)"),
    ("11111111", "11111111(8)"),
])
def test_card_number_check_digit(farebox, number, shown_as):
    assert farebox.show(farebox.card(number=number))["number"] == shown_as
    assert luhn_check_digit(shown_as[:8]) == int(shown_as[9])


def test_card_number_defaults_to_eight_digits_with_luhn_check_digit(farebox):
    number = farebox.show(farebox.card())["number"]
    assert re.fullmatch(r"[0-9]{8}\([0-9]\)", number)
    assert luhn_check_digit(number[:8]) == int(number[9])


@pytest.mark.parametrize(("kind", "issued", "negative_limit", "stored_value_limit"), [
    ("on-loan", "2017-09-30", "35.00", "1000.00"),
    ("on-loan", "2017-10-01", "50.00", "1000.00"),
    ("on-loan", "2019-11-30", "50.00", "1000.00"),
    ("on-loan", "2019-12-01", "50.00", "3000.00"),
    ("on-loan", "2026-01-15", "50.00", "3000.00"),
    ("sold", "2010-05-01", "35.00", "1000.00"),
    ("sold", "2019-11-30", "35.00", "1000.00"),
    ("sold", "2019-12-01", "35.00", "3000.00"),
    ("sold", "2026-01-15", "35.00", "3000.00"),
    ("mobile", "2015-06-01", "50.00", "1000.00"),
    ("mobile", "2019-09-30", "50.00", "1000.00"),
    ("mobile", "2019-10-01", "50.00", "3000.00"),
])
def test_limits_by_kind_and_issue_date(farebox, kind, issued, negative_limit, stored_value_limit):
    shown = farebox.show(farebox.card(kind=kind, issued=issued))
    assert shown["negative_limit"] == negative_limit
    assert shown["stored_value_limit"] == stored_value_limit


@pytest.mark.parametrize(("amount", "shown_as"), [
    ("150", "150.00"), ("250", "250.00"), ("500.00", "500.00"), ("1000", "1000.00"),
])
def test_card_new_aavs_allowed_amounts(farebox, amount, shown_as):
    shown = farebox.show(farebox.card(aavs=amount))
    assert shown["aavs"] == {"enabled": True, "amount": shown_as, "last_reload": None}


@pytest.mark.parametrize(("issued", "balance"), [
    ("2026-01-15", "-50.00"), ("2026-01-15", "3000.00"), ("2026-01-15", "0"),
    ("2019-11-30", "1000.00"), ("2017-09-30", "-35.00"),
])
def test_card_new_balance_at_the_limits_is_accepted(farebox, issued, balance):
    shown = farebox.show(farebox.card(issued=issued, balance=balance))
    assert shown["balance"] == f"{float(balance):.2f}"


def test_card_new_balance_is_shown_with_two_places(farebox):
    assert farebox.show(farebox.card(balance="7.5"))["balance"] == "7.50"
    assert farebox.show(farebox.card("b.json", balance="-0.05"))["balance"] == "-0.05"


def test_card_new_last_add_value_and_concessions(farebox):
    shown = farebox.show(farebox.card(issued="2024-01-01", last_add_value="2025-06-30"))
    assert (shown["issued"], shown["last_add_value"]) == ("2024-01-01", "2025-06-30")
    shown = farebox.show(farebox.card("d.json", category="personalised", concession="disability"))
    assert (shown["concession"], shown["concession_expiry"]) == ("disability", None)


# ==== tap =====================================================================================

def test_tap_smoke(farebox):
    card = farebox.card(number="12345678", balance="10.00")
    result = approved(farebox.tap(card, "--fare", "5.80", at="2026-11-22T08:00:00+08:00"))
    assert result["balance_after"] == "4.20"
    assert result["balance_before"] == "10.00"
    assert result["amount"] == "5.80"
    assert result["card"] == "12345678(2)"
    assert result["fare_class"] == "adult"
    assert result["aavs_reload"] is None
    assert result["records"] == [payment("5.80", "4.20")]
    shown = farebox.show(card)
    assert shown["balance"] == "4.20"
    assert shown["counter"] > 1


def test_tap_json_keys(farebox):
    card = farebox.card(balance="10.00")
    result = farebox.tap(card, "--fare", "5.80", at=AT).json()
    assert RESULT_KEYS | {"fare_class"} <= result.keys()
    for record in result["records"]:
        assert set(record) >= {"type", "amount", "balance_after"}
        assert MONEY.fullmatch(record["amount"]) and MONEY.fullmatch(record["balance_after"])


def test_tap_human_output_is_one_line(farebox):
    card = farebox.card(balance="10.00")
    farebox.state.mkdir()  # a state directory made by the tap is said on stderr (test_cli_guards)
    run = farebox("tap", card, "--fare", "5.80", "--at", AT, "--state", farebox.state)
    assert run.code == 0 and run.err == ""
    assert run.out.count("\n") == 1 and "4.20" in run.out


def test_tap_at_in_utc_z_is_accepted(farebox):
    card = farebox.card(balance="10.00")
    approved(farebox.tap(card, "--fare", "1.00", at="2026-11-22T00:00:00Z"))


FARES = "adult=9.10,child=4.50,elder=2.00,student=4.60,disability=2.10"


@pytest.mark.parametrize(("options", "fare_class", "amount"), [
    ({}, "adult", "9.10"),
    ({"category": "child"}, "child", "4.50"),
    ({"category": "elder"}, "elder", "2.00"),
    ({"category": "personalised"}, "adult", "9.10"),
    ({"category": "personalised", "concession": "disability"}, "disability", "2.10"),
    ({"category": "personalised", "concession": "student", "concession_expiry": "2026-12-31"},
     "student", "4.60"),
    ({"kind": "sold", "category": "child", "balance": "20.00"}, "child", "4.50"),
    ({"kind": "mobile", "category": "elder", "balance": "20.00"}, "elder", "2.00"),
])
def test_fares_by_class(farebox, options, fare_class, amount):
    card = farebox.card(**options)
    result = approved(farebox.tap(card, "--fares", FARES, at=AT))
    assert (result["fare_class"], result["amount"]) == (fare_class, amount)
    assert result["records"][-1]["amount"] == amount


def test_fares_class_left_out_pays_adult(farebox):
    card = farebox.card(category="elder")
    result = approved(farebox.tap(card, "--fares", "adult=9.10,child=4.50", at=AT))
    assert result["amount"] == "9.10"
    assert result["balance_after"] == "40.90"


def test_flat_fare_applies_to_every_class(farebox):
    card = farebox.card(category="child")
    result = approved(farebox.tap(card, "--fare", "5.80", at=AT))
    assert result["amount"] == "5.80" and result["balance_after"] == "44.20"


@pytest.mark.parametrize(("at", "fare_class", "amount"), [
    ("2026-08-31T00:00:00+08:00", "student", "4.60"),
    ("2026-08-31T15:59:59Z", "student", "4.60"),   # 23:59:59 HKT on the expiry date
    ("2026-08-31T16:00:00Z", "adult", "9.10"),     # 00:00 HKT on the next day
    ("2026-09-01T08:00:00+08:00", "adult", "9.10"),
])
def test_student_fare_through_expiry_date_in_hong_kong(farebox, at, fare_class, amount):
    card = farebox.card(category="personalised", concession="student",
                        concession_expiry="2026-08-31")
    result = approved(farebox.tap(card, "--fares", FARES, at=at))
    assert (result["fare_class"], result["amount"]) == (fare_class, amount)


def test_negative_value_then_insufficient_value(farebox):
    card = farebox.card(balance="10.00")
    result = approved(farebox.tap(card, "--fare", "55.00", at=AT))
    assert result["balance_after"] == "-45.00"
    assert result["records"] == [payment("55.00", "-45.00")]
    before = card.read_bytes()
    result = declined(farebox.tap(card, "--fare", "1.00", at="2026-11-22T09:00:00+08:00"),
                      "insufficient_value")
    assert result["balance_before"] == result["balance_after"] == "-45.00"
    assert result["records"] == []
    assert card.read_bytes() == before
    assert farebox.show(card)["balance"] == "-45.00"


@pytest.mark.parametrize(("kind", "fare", "outcome", "after"), [
    ("on-loan", "60.00", "approved", "-50.00"),
    ("on-loan", "60.01", "declined", "10.00"),
    ("sold", "45.00", "approved", "-35.00"),
    ("sold", "45.01", "declined", "10.00"),
])
def test_negative_limit_boundary(farebox, kind, fare, outcome, after):
    card = farebox.card(kind=kind, balance="10.00")
    result = farebox.tap(card, "--fare", fare, at=AT).json()
    assert result["outcome"] == outcome
    assert result["balance_after"] == after
    if outcome == "declined":
        assert result["reason"] == "insufficient_value"


@pytest.mark.parametrize("balance", ["0.00", "-0.01", "-20.00"])
def test_zero_or_negative_balance_cannot_pay(farebox, balance):
    card = farebox.card(balance=balance)
    declined(farebox.tap(card, "--fare", "0.01", at=AT), "insufficient_value")


def test_aavs_reload_in_the_tap_where_value_would_reach_zero(farebox):
    card = farebox.card(balance="5.80", aavs="250")
    # 17:00Z on 1 March is 01:00 HKT on 2 March: the reload is dated by the Hong Kong day.
    result = approved(farebox.tap(card, "--fare", "5.80", at="2026-03-01T17:00:00Z"))
    assert result["aavs_reload"] == "250.00"
    assert result["balance_before"] == "5.80"
    assert result["balance_after"] == "250.00"
    assert result["records"] == [
        {"type": "auto_add_value", "amount": "250.00", "balance_after": "255.80"},
        payment("5.80", "250.00"),
    ]
    shown = farebox.show(card)
    assert shown["balance"] == "250.00"
    assert shown["aavs"]["last_reload"] == "2026-03-02"
    assert shown["last_add_value"] == "2026-03-02"  # an AAVS reload restarts the inactivity clock


def test_aavs_not_used_while_value_stays_above_zero(farebox):
    card = farebox.card(balance="5.81", aavs="150")
    result = approved(farebox.tap(card, "--fare", "5.80", at=AT))
    assert result["aavs_reload"] is None
    assert result["records"] == [payment("5.80", "0.01")]


def test_aavs_reload_once_per_hong_kong_day(farebox):
    card = farebox.card(balance="5.80", aavs="250")
    first = approved(farebox.tap(card, "--fare", "5.80", at="2026-03-02T08:00:00+08:00"))
    assert first["aavs_reload"] == "250.00" and first["balance_after"] == "250.00"
    # Value reaches zero again the same HK day: no second reload, a plain payment.
    second = approved(farebox.tap(card, "--fare", "250.00", at="2026-03-02T12:00:00+08:00"))
    assert second["aavs_reload"] is None
    assert second["records"] == [payment("250.00", "0.00")]
    # 23:59:59 HKT, still the same day: nothing to pay with, no reload.
    before = card.read_bytes()
    third = declined(farebox.tap(card, "--fare", "1.00", at="2026-03-02T15:59:59Z"),
                     "insufficient_value")
    assert third["aavs_reload"] is None
    assert card.read_bytes() == before
    # 00:00 HKT on 3 March: a new Hong Kong day, the reload happens again.
    fourth = approved(farebox.tap(card, "--fare", "1.00", at="2026-03-02T16:00:00Z"))
    assert fourth["aavs_reload"] == "250.00"
    assert fourth["records"] == [
        {"type": "auto_add_value", "amount": "250.00", "balance_after": "250.00"},
        payment("1.00", "249.00"),
    ]
    assert farebox.show(card)["aavs"]["last_reload"] == "2026-03-03"


@pytest.mark.parametrize(("fare", "outcome", "after"), [
    ("200.00", "approved", "-50.00"),   # B + R - F = -N: reload, then negative value
    ("200.01", "declined", "0.00"),     # even the reload cannot pay: no reload, declined
])
def test_aavs_reload_that_cannot_cover_the_fare(farebox, fare, outcome, after):
    card = farebox.card(balance="0.00", aavs="150")
    before = card.read_bytes()
    result = farebox.tap(card, "--fare", fare, at=AT).json()
    assert (result["outcome"], result["balance_after"]) == (outcome, after)
    if outcome == "declined":
        assert result["reason"] == "insufficient_value"
        assert result["aavs_reload"] is None and result["records"] == []
        assert card.read_bytes() == before
    else:
        assert result["aavs_reload"] == "150.00"


@pytest.mark.parametrize(("days", "at", "outcome"), [
    (999, "2026-06-01T08:00:00+08:00", "approved"),
    (1000, "2026-06-01T08:00:00+08:00", "declined"),
    (1000, "2026-05-31T16:00:00Z", "declined"),     # 00:00 HKT on 1 June
    (1000, "2026-05-31T15:59:59Z", "approved"),     # 23:59:59 HKT on 31 May: 999 days
])
def test_inactive_after_1000_days_without_add_value(farebox, days, at, outcome):
    last = (date(2026, 6, 1) - timedelta(days=days)).isoformat()
    card = farebox.card(issued="2023-01-01", last_add_value=last)
    before = card.read_bytes()
    result = farebox.tap(card, "--fare", "5.80", at=at).json()
    assert result["outcome"] == outcome
    if outcome == "declined":
        assert result["reason"] == "inactive"
        assert card.read_bytes() == before


def test_inactive_card_cannot_add_value_either(farebox):
    card = farebox.card(issued="2023-01-01")
    declined(farebox.add_value(card, "100.00", at="2025-09-27T08:00:00+08:00"), "inactive")


def test_add_value_restarts_the_inactivity_clock(farebox):
    card = farebox.card(issued="2023-01-01")
    approved(farebox.add_value(card, "100.00", at="2025-09-26T08:00:00+08:00"))  # day 999
    approved(farebox.tap(card, "--fare", "5.80", at="2026-06-01T08:00:00+08:00"))


# ---- action lists --------------------------------------------------------------------------

def test_lost_card_refused_from_three_hours_after_report_and_blocked_on_card(farebox):
    card = farebox.card(number="12345678")
    hotlist = farebox.hotlist([{"card": "12345678", "reason": "lost",
                                "at": "2026-11-22T05:00:00+08:00"}])
    result = approved(farebox.tap(card, "--fare", "5.80", at="2026-11-22T07:59:59+08:00",
                                  hotlist=hotlist))
    assert result["balance_after"] == "144.20"
    # 00:00:00Z is 08:00:00 HKT: exactly three hours after the report.
    result = declined(farebox.tap(card, "--fare", "5.80", at="2026-11-22T00:00:00Z",
                                  hotlist=hotlist), "blocked")
    assert result["balance_before"] == result["balance_after"] == "144.20"
    shown = farebox.show(card)
    assert shown["status"] == "blocked"
    assert shown["balance"] == "144.20"
    # The block is on the card: without the list, and days later, it is still refused...
    before = card.read_bytes()
    declined(farebox.tap(card, "--fare", "5.80", at="2026-12-01T08:00:00+08:00"), "blocked")
    declined(farebox.add_value(card, "100.00", at="2026-12-01T08:00:00+08:00"), "blocked")
    # ...and a decline of a card already blocked writes nothing.
    assert card.read_bytes() == before


def test_lost_card_in_list_with_check_digit_and_other_cards(farebox):
    card = farebox.card(number="12345678")
    other = farebox.card("other.json", number="87654321")
    hotlist = farebox.hotlist([
        {"card": "12345678(2)", "reason": "lost", "at": "2026-11-21T00:00:00Z"},
    ])
    declined(farebox.tap(card, "--fare", "1.00", at=AT, hotlist=hotlist), "blocked")
    approved(farebox.tap(other, "--fare", "1.00", at=AT, hotlist=hotlist))


@pytest.mark.parametrize(("reason", "status"), [
    ("aavs_suspended", "suspended"),
    ("cancelled", "cancelled"),
])
def test_list_orders_status_written_to_card(farebox, reason, status):
    card = farebox.card(number="12345678", aavs="250")
    hotlist = farebox.hotlist([{"card": "12345678", "reason": reason,
                                "at": "2026-11-22T08:00:00+08:00"}])
    approved(farebox.tap(card, "--fare", "1.00", at="2026-11-22T07:59:59+08:00", hotlist=hotlist))
    declined(farebox.tap(card, "--fare", "1.00", at="2026-11-22T00:00:00Z", hotlist=hotlist), status)
    shown = farebox.show(card)
    assert shown["status"] == status
    assert shown["balance"] == "149.00"
    before = card.read_bytes()
    declined(farebox.tap(card, "--fare", "1.00", at="2026-11-23T08:00:00+08:00"), status)
    declined(farebox.add_value(card, "100.00", at="2026-11-23T08:00:00+08:00"), status)
    declined(farebox.tap(card, "--fare", "1.00", at="2026-11-23T09:00:00+08:00",
                         hotlist=hotlist), status)
    assert card.read_bytes() == before


def test_block_is_permanent_and_outranks_suspension(farebox):
    """docs/rules.md §7: a suspended card reported lost becomes blocked; a blocked card stays
    blocked whatever a later list says."""
    card = farebox.card(number="12345678")
    suspend = farebox.hotlist([{"card": "12345678", "reason": "aavs_suspended",
                                "at": "2026-11-01T00:00:00Z"}], "suspend.json")
    declined(farebox.tap(card, "--fare", "1.00", at=AT, hotlist=suspend), "suspended")
    lost = farebox.hotlist([{"card": "12345678", "reason": "lost",
                             "at": "2026-11-01T00:00:00Z"}], "lost.json")
    declined(farebox.tap(card, "--fare", "1.00", at="2026-11-22T09:00:00+08:00", hotlist=lost),
             "blocked")
    assert farebox.show(card)["status"] == "blocked"
    declined(farebox.tap(card, "--fare", "1.00", at="2026-11-22T10:00:00+08:00", hotlist=suspend),
             "blocked")
    assert farebox.show(card)["status"] == "blocked"


def test_list_ordered_write_changes_status_not_value(farebox):
    card = farebox.card(number="12345678", balance="20.00")
    counter = farebox.show(card)["counter"]
    hotlist = farebox.hotlist([{"card": "12345678", "reason": "cancelled",
                                "at": "2026-01-20T00:00:00Z"}])
    result = declined(farebox.add_value(card, "100.00", at=AT, hotlist=hotlist), "cancelled")
    assert result["balance_before"] == result["balance_after"] == "20.00"
    shown = farebox.show(card)
    assert (shown["status"], shown["balance"]) == ("cancelled", "20.00")
    assert shown["counter"] == counter + 1


# ---- rollback and terminals ----------------------------------------------------------------

def test_rollback_copy_declined_by_the_same_terminal(farebox):
    card = farebox.card(number="12345678", balance="20.00")
    copy = farebox.path("copy.json")
    shutil.copyfile(card, copy)
    approved(farebox.tap(card, "--fare", "5.80", at=AT))
    before = copy.read_bytes()
    result = declined(farebox.tap(copy, "--fare", "5.80", at="2026-11-22T08:01:00+08:00"),
                      "rollback")
    assert result["card"] == "12345678(2)"
    assert result["records"] == []
    assert copy.read_bytes() == before
    # The original still works at that terminal.
    approved(farebox.tap(card, "--fare", "5.80", at="2026-11-22T08:02:00+08:00"))


def test_rollback_add_value_on_an_old_copy(farebox):
    card = farebox.card(balance="20.00")
    copy = farebox.path("copy.json")
    shutil.copyfile(card, copy)
    approved(farebox.add_value(card, "100.00", at=AT))
    declined(farebox.add_value(copy, "100.00", at="2026-11-22T08:01:00+08:00"), "rollback")


def test_another_terminal_accepts_the_copy(farebox):
    """Terminals share nothing but their --state: a different state has not seen the card."""
    card = farebox.card(balance="20.00")
    copy = farebox.path("copy.json")
    shutil.copyfile(card, copy)
    approved(farebox.tap(card, "--fare", "5.80", at=AT))
    result = approved(farebox.tap(copy, "--fare", "5.80", at="2026-11-22T08:01:00+08:00",
                                  state=farebox.path("other-terminal")))
    assert result["balance_after"] == "14.20"


# ==== add-value ================================================================================

def test_add_value_approved(farebox):
    card = farebox.card(number="12345678", balance="20.00")
    # 17:30Z on 1 March is 01:30 HKT on 2 March.
    result = approved(farebox.add_value(card, "100.00", at="2026-03-01T17:30:00Z"))
    assert "fare_class" not in result or result["fare_class"] is None
    assert RESULT_KEYS <= result.keys()
    assert result["card"] == "12345678(2)"
    assert (result["amount"], result["balance_before"], result["balance_after"]) == (
        "100.00", "20.00", "120.00")
    assert result["aavs_reload"] is None
    assert result["records"] == [{"type": "add_value", "amount": "100.00", "balance_after": "120.00"}]
    shown = farebox.show(card)
    assert shown["balance"] == "120.00"
    assert shown["last_add_value"] == "2026-03-02"
    amounts = [(entry.get("type"), entry.get("amount")) for entry in shown["history"]]
    assert any(amount == "100.00" and "add" in str(kind) for kind, amount in amounts), amounts


@pytest.mark.parametrize(("balance", "amount", "outcome", "reason", "after"), [
    ("20.00", "50.00", "approved", None, "70.00"),            # the default minimum
    ("20.00", "49.99", "declined", "below_minimum", "20.00"),
    ("0.00", "3000.00", "approved", None, "3000.00"),         # per transaction maximum
    ("0.00", "3000.01", "declined", "over_limit", "0.00"),
    ("-50.00", "3000.01", "declined", "over_limit", "-50.00"),  # per transaction, not by balance
    ("150.00", "2850.00", "approved", None, "3000.00"),       # up to the stored value limit
    ("150.00", "2850.01", "declined", "over_limit", "150.00"),
    ("-45.00", "50.00", "approved", None, "5.00"),            # a negative balance is paid off
    ("-50.00", "3000.00", "approved", None, "2950.00"),
])
def test_add_value_limits(farebox, balance, amount, outcome, reason, after):
    card = farebox.card(balance=balance)
    result = farebox.add_value(card, amount, at=AT).json()
    assert (result["outcome"], result["reason"], result["balance_after"]) == (outcome, reason, after)


@pytest.mark.parametrize(("minimum", "amount", "outcome"), [
    ("20.00", "20.00", "approved"), ("20.00", "19.99", "declined"), ("0", "0.01", "approved")])
def test_add_value_minimum_is_configurable(farebox, minimum, amount, outcome):
    card = farebox.card(balance="0.00")
    result = farebox("add-value", card, "--amount", amount, "--minimum", minimum, "--at", AT,
                     "--state", farebox.state, "--json").json()
    assert result["outcome"] == outcome
    assert result["reason"] == (None if outcome == "approved" else "below_minimum")


def test_add_value_over_old_stored_value_limit(farebox):
    card = farebox.card(issued="2019-11-30", last_add_value="2026-06-01", balance="950.00")
    approved(farebox.add_value(card, "50.00", at=AT))
    declined(farebox.add_value(card, "50.00", at="2026-11-22T08:01:00+08:00"), "over_limit")
    assert farebox.show(card)["balance"] == "1000.00"


def test_two_add_values_of_the_same_amount_both_credit(farebox):
    """The second of two completed add values is a new one (only an add value whose result was
    never shown is reported when the command runs again)."""
    card = farebox.card(balance="10.00")
    approved(farebox.add_value(card, "50.00", at=AT))
    second = farebox.add_value(card, "50.00", at="2026-11-22T08:01:00+08:00")
    approved(second)
    assert second.json()["balance_after"] == "110.00"
    assert farebox.show(card)["balance"] == "110.00"


# ==== invalid card ==============================================================================

@pytest.mark.parametrize(("block", "byte", "bit"), [(0, 0, 0), (0, 5, 3), (0, 15, 7), (1, 3, 1),
                                                    (1, 15, 0)])
def test_flipped_bit_in_identity_is_invalid_card(farebox, block, byte, bit):
    card = farebox.card(balance="20.00")
    data = json.loads(card.read_text())
    raw = bytearray(bytes.fromhex(data["blocks"][block]))
    raw[byte] ^= 1 << bit
    data["blocks"][block] = raw.hex()
    card.write_text(json.dumps(data))
    before = card.read_bytes()
    run = farebox.tap(card, "--fare", "5.80", at=AT)
    assert run.code == 0
    result = declined(run, "invalid_card")
    assert result["records"] == []
    assert card.read_bytes() == before
    declined(farebox.add_value(card, "100.00", at=AT), "invalid_card")
    assert card.read_bytes() == before


def test_blank_card_is_invalid_card(farebox):
    data = json.loads(farebox.card().read_text())
    data["blocks"] = ["00" * 16] * 14
    blank = farebox.path("blank.json")
    blank.write_text(json.dumps(data))
    declined(farebox.tap(blank, "--fare", "1.00", at=AT), "invalid_card")


# ==== declines never change the card ============================================================

def _scenario(farebox, name):
    """A card and a command that declines it for a reason the lists did not order."""
    at2 = "2026-11-22T09:00:00+08:00"
    if name == "insufficient_value":
        card = farebox.card(balance="0.00")
        return card, lambda: farebox.tap(card, "--fare", "1.00", at=AT)
    if name == "over_negative_limit":
        card = farebox.card(balance="10.00")
        return card, lambda: farebox.tap(card, "--fares", "adult=60.01", at=AT)
    if name == "aavs_cannot_cover":
        card = farebox.card(balance="0.00", aavs="150")
        return card, lambda: farebox.tap(card, "--fare", "200.01", at=AT)
    if name == "inactive":
        card = farebox.card(issued="2020-01-01")
        return card, lambda: farebox.tap(card, "--fare", "1.00", at=AT)
    if name == "below_minimum":
        card = farebox.card()
        return card, lambda: farebox.add_value(card, "49.99", at=AT)
    if name == "over_limit":
        card = farebox.card()
        return card, lambda: farebox.add_value(card, "3000.01", at=AT)
    if name == "over_stored_value_limit":
        card = farebox.card(balance="2999.00")
        return card, lambda: farebox.add_value(card, "50.00", at=AT)
    if name == "rollback":
        card = farebox.card()
        copy = farebox.path("copy.json")
        shutil.copyfile(card, copy)
        approved(farebox.tap(card, "--fare", "1.00", at=AT))
        return copy, lambda: farebox.tap(copy, "--fare", "1.00", at=at2)
    if name == "already_blocked":
        card = farebox.card(number="12345678")
        hotlist = farebox.hotlist([{"card": "12345678", "reason": "lost",
                                    "at": "2026-01-20T00:00:00Z"}])
        declined(farebox.tap(card, "--fare", "1.00", at=AT, hotlist=hotlist), "blocked")
        return card, lambda: farebox.tap(card, "--fare", "1.00", at=at2, hotlist=hotlist)
    raise AssertionError(name)


@pytest.mark.parametrize(("name", "reason"), [
    ("insufficient_value", "insufficient_value"),
    ("over_negative_limit", "insufficient_value"),
    ("aavs_cannot_cover", "insufficient_value"),
    ("inactive", "inactive"),
    ("below_minimum", "below_minimum"),
    ("over_limit", "over_limit"),
    ("over_stored_value_limit", "over_limit"),
    ("rollback", "rollback"),
    ("already_blocked", "blocked"),
])
def test_decline_never_changes_the_card_file(farebox, name, reason):
    card, command = _scenario(farebox, name)
    before = card.read_bytes()
    run = command()
    assert run.code == 0 and run.err == ""
    result = declined(run, reason)
    assert result["balance_before"] == result["balance_after"]
    assert result["aavs_reload"] is None
    assert result["records"] == []
    assert card.read_bytes() == before


# ==== the installed console script ==============================================================

def test_script_happy_path(farebox):
    card = farebox.path("card.json")
    run = farebox.script("card", "new", card, "--number", "12345678", "--issued", "2026-01-15",
                         "--balance", "10.00")
    assert run.code == 0, run.err
    run = farebox.script("tap", card, "--fare", "5.80", "--at", "2026-11-22T08:00:00+08:00",
                         "--state", farebox.state, "--json")
    assert (run.code, run.err) == (0, "")
    result = run.json()
    assert (result["outcome"], result["reason"], result["balance_after"]) == ("approved", None, "4.20")
    assert result["records"] == [payment("5.80", "4.20")]
    run = farebox.script("card", "show", card, "--json")
    assert run.code == 0 and json.loads(run.out)["balance"] == "4.20"


def test_script_bad_input(farebox):
    card = farebox.card(balance="10.00")
    before = card.read_bytes()
    run = farebox.script("tap", card, "--fare", "5.8.0", "--at", AT, "--state", farebox.state,
                         "--json")
    run.assert_bad_input()
    assert card.read_bytes() == before
    assert not farebox.state.exists()
    run = farebox.script("card", "new", farebox.path("x.json"), "--aavs", "100")
    run.assert_bad_input()
    assert not farebox.path("x.json").exists()


def test_script_declined_is_exit_zero(farebox):
    card = farebox.card(balance="0.00")
    run = farebox.script("tap", card, "--fare", "1.00", "--at", AT, "--state", farebox.state,
                         "--json")
    assert (run.code, run.err) == (0, "")
    assert json.loads(run.out)["reason"] == "insufficient_value"


_FAULT = '''
import os
if os.environ.get("FAREBOX_TEST_FAULT"):
    from farebox.terminal.card import tap as tap_module
    def _fault(*args, **kwargs):
        raise RuntimeError("injected fault for the exit-1 test")

    tap_module.Terminal.pay = _fault
'''


def test_script_internal_error_is_exit_one_without_traceback(farebox, tmp_path):
    """A bug (here an exception injected into the rules through sitecustomize) is exit 1 with a
    single line on stderr and no traceback; the card is not changed."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAULT)
    card = farebox.card(balance="10.00")
    before = card.read_bytes()
    run = farebox.script("tap", card, "--fare", "5.80", "--at", AT, "--state", farebox.state,
                         "--json", env={"PYTHONPATH": str(inject), "FAREBOX_TEST_FAULT": "1"})
    assert run.code == 1, (run.out, run.err)
    assert run.out == ""
    assert run.err.count("\n") == 1 and run.err.endswith("\n"), run.err
    assert "Traceback" not in run.err
    assert "injected fault" in run.err  # proves the fault was reached, not some other error
    assert card.read_bytes() == before


# ==== internal errors in-process ================================================================

def test_internal_error_is_exit_one_and_one_line(farebox, monkeypatch):
    from farebox.terminal.card import tap as tap_module
    def fault(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tap_module.Terminal, "pay", fault)
    card = farebox.card(balance="10.00")
    before = card.read_bytes()
    run = farebox.tap(card, "--fare", "5.80", at=AT)
    assert (run.code, run.out) == (1, "")
    assert run.err.count("\n") == 1 and "Traceback" not in run.err
    assert card.read_bytes() == before


def test_internal_error_message_is_one_line_even_if_the_exception_spans_lines(farebox, monkeypatch):
    from farebox.terminal.card import tap as tap_module
    def fault(*args, **kwargs):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(tap_module.Terminal, "pay", fault)
    card = farebox.card(balance="10.00")
    run = farebox.tap(card, "--fare", "5.80", at=AT)
    assert run.code == 1
    assert run.err.count("\n") == 1, run.err
