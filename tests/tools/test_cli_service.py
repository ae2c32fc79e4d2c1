"""``farebox service`` (docs/rules.md §6, §8) through the CLI: the boundaries of every fee, bad
input (exit 2, one line, nothing changed), a torn return, and one return over nfcpy's UDP link.

Expected amounts are literals worked out from the seeds. Times with ``Z`` put the Hong Kong date
on the next day where a rule counts days (``2020-09-30T16:00:00Z`` is 2020-10-01 in Hong Kong)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from farebox.terminal.store.journal import Journal
from farebox.terminal.core.writecycle import WriteState

from .test_e2e_udp import served  # noqa: F401  (the fixture: `farebox sim serve` over UDP)

RETURN_KEYS = {"card", "refund", "deposit", "remaining_value", "handling_fee", "damage_fee",
               "personalisation_fee", "negative_offset", "waived", "records", "status"}
ISSUE_KEYS = {"card", "deposit", "initial_value", "fee", "collected"}


def at(day: date, time: str = "10:00:00") -> str:
    return f"{day.isoformat()}T{time}+08:00"


def returned(farebox, *cards, when: str, damaged: bool = False) -> dict:
    argv = ["service", "return", *cards, "--at", when, "--state", farebox.state, "--json"]
    if damaged:
        argv.append("--damaged")
    return farebox(*argv).json()


def one_return(farebox, card, when: str, **options) -> dict:
    result = returned(farebox, card, when=when, **options)
    [only] = result["cards"]
    assert RETURN_KEYS <= set(only)
    assert result["refund"] == only["refund"]
    return only


def journal_records(farebox):
    with Journal(farebox.state / "journal.sqlite3") as journal:
        return journal.records()


# ---- issue ----------------------------------------------------------------------------------

def test_issue_writes_cards_and_says_what_to_collect(farebox):
    a, b = farebox.path("a.json"), farebox.path("p.json")
    run = farebox("service", "issue", a, "--category", "adult", "--at", at(date(2026, 1, 15)),
                  "--state", farebox.state, "--json")
    [adult] = run.json()["cards"]
    assert ISSUE_KEYS <= set(adult)
    assert (adult["deposit"], adult["initial_value"], adult["fee"], adult["collected"]) == (
        "50.00", "150.00", "0.00", "200.00")
    shown = farebox.show(a)
    assert (shown["balance"], shown["issued"], shown["number"]) == ("150.00", "2026-01-15",
                                                                    adult["card"])
    run = farebox("service", "issue", b, "--category", "personalised", "--concession", "student",
                  "--concession-expiry", "2027-08-31", "--at", at(date(2026, 1, 15), "10:05:00"),
                  "--state", farebox.state, "--json")
    [personal] = run.json()["cards"]
    assert (personal["initial_value"], personal["fee"], personal["collected"]) == (
        "130.00", "20.00", "200.00")
    assert farebox.show(b)["concession"] == "student"
    types = [(r.type.value, r.amount_cents, r.write_state) for r in journal_records(farebox)]
    assert types == [("deposit", 5000, WriteState.COMMITTED),
                     ("initial_value", 15000, WriteState.COMMITTED),
                     ("deposit", 5000, WriteState.COMMITTED),
                     ("initial_value", 13000, WriteState.COMMITTED),
                     ("admin_fee", 2000, WriteState.COMMITTED)]


def test_five_cards_in_one_issue_but_never_six(farebox):
    five = [farebox.path(f"c{n}.json") for n in range(5)]
    result = farebox("service", "issue", *five, "--category", "child", "--at",
                     at(date(2026, 1, 15)), "--state", farebox.state, "--json").json()
    assert len(result["cards"]) == 5 and result["collected"] == "500.00"
    six = [farebox.path(f"d{n}.json") for n in range(6)]
    farebox("service", "issue", *six, "--category", "child", "--at", at(date(2026, 1, 15)),
            "--state", farebox.state, "--json").assert_bad_input()
    assert not any(p.exists() for p in six)
    assert len(journal_records(farebox)) == 10


def test_an_issue_cut_off_after_writing_the_card_is_committed_once_the_card_is_seen(farebox):
    """The process dies (FAREBOX_FAILPOINT) after writing the card file, before the commit mark:
    the issue's records wait in doubt until this terminal sees the card, which proves them."""
    card = farebox.path("new.json")
    died = farebox.script("service", "issue", card, "--category", "adult", "--at",
                          at(date(2026, 1, 15)), "--state", farebox.state, "--json",
                          env={"FAREBOX_FAILPOINT": "after-purse-write"})
    assert died.code == 86 and card.exists()
    assert {r.write_state for r in journal_records(farebox)} == {WriteState.INTENT}
    farebox.tap(card, "--fare", "1.00", at=at(date(2026, 1, 16))).json()
    assert [(r.type.value, r.write_state) for r in journal_records(farebox)] == [
        ("deposit", WriteState.COMMITTED), ("initial_value", WriteState.COMMITTED),
        ("payment", WriteState.COMMITTED)]


@pytest.mark.parametrize("argv", [
    ["--category", "adult", "--concession", "student", "--concession-expiry", "2027-01-01"],
    ["--category", "adult", "--aavs", "300"],
    ["--category", "nobody"],
    ["--category", "adult", "--reader", "udp:127.0.0.1:9"],
])
def test_issue_refuses_bad_requests_writing_nothing(farebox, argv):
    card = farebox.path("x.json")
    farebox("service", "issue", card, *argv, "--at", at(date(2026, 1, 15)), "--state",
            farebox.state).assert_bad_input()
    assert not card.exists()


# ---- return: boundaries ---------------------------------------------------------------------

@pytest.mark.parametrize("balance, handling, refund", [
    ("1000.00", "0.00", "1050.00"), ("1000.01", "11.00", "1039.01"),
    ("1150.50", "11.51", "1188.99"),  # 1 % = 11.505 -> 11.51, halves up
])
def test_return_value_over_1000(farebox, balance, handling, refund):
    # issued 2020-01-01 (HK$3,000 limit), returned 2020-06-01: over 90 days, before the
    # payments criterion began (2020-10-01): only the value counts
    card = farebox.card(issued="2020-01-01", balance=balance)
    result = one_return(farebox, card, at(date(2020, 6, 1)))
    assert (result["handling_fee"], result["refund"], result["deposit"],
            result["remaining_value"]) == (handling, refund, "50.00", balance)


@pytest.mark.parametrize("days, handling, refund", [(89, "11.00", "189.00"),
                                                    (90, "11.00", "189.00"),
                                                    (91, "0.00", "200.00")])
def test_return_within_90_days(farebox, days, handling, refund):
    card = farebox.card(issued="2020-01-01")
    result = one_return(farebox, card, at(date(2020, 1, 1) + timedelta(days=days)))
    assert (result["handling_fee"], result["refund"]) == (handling, refund)


@pytest.mark.parametrize("payments, handling, refund", [(5, "11.00", "184.00"),
                                                        (6, "0.00", "194.00")])
def test_return_five_or_six_payments(farebox, payments, handling, refund):
    card = farebox.card(issued="2026-01-15")
    for n in range(payments):  # at a bus: the desk's own clock has no mark to judge by
        farebox.tap(card, "--fare", "1.00", at=at(date(2026, 2, 1) + timedelta(days=n)),
                    state=farebox.path("bus")).json()
    result = one_return(farebox, card, at(date(2026, 6, 1)))
    assert result["remaining_value"] == f"{150 - payments}.00"
    assert (result["handling_fee"], result["refund"]) == (handling, refund)


@pytest.mark.parametrize("when, handling", [("2020-09-30T15:59:59Z", "0.00"),  # 23:59:59 HKT
                                            ("2020-09-30T16:00:00Z", "11.00")])  # 10-01 HKT
def test_return_payments_criterion_from_2020_10_01(farebox, when, handling):
    card = farebox.card(issued="2020-01-01")  # no payments at all
    assert one_return(farebox, card, when)["handling_fee"] == handling


@pytest.mark.parametrize("issued, fee, refund", [("2004-10-31", "0.00", "180.00"),
                                                 ("2004-11-01", "10.00", "170.00")])
def test_return_personalisation_fee(farebox, issued, fee, refund):
    card = farebox.card(issued=issued, category="personalised")
    result = one_return(farebox, card, at(date(2026, 6, 1)))
    assert (result["personalisation_fee"], result["handling_fee"], result["refund"]) == (
        fee, "0.00", refund)


def test_return_damaged(farebox):
    card = farebox.card(issued="2020-01-01")
    result = one_return(farebox, card, at(date(2020, 6, 1)), damaged=True)
    assert (result["damage_fee"], result["refund"]) == ("30.00", "170.00")


@pytest.mark.parametrize("balance, refund, offset, waived, damaged", [
    ("-35.00", "15.00", "35.00", "0.00", False),
    ("-50.00", "0.00", "50.00", "0.00", False),
    ("-35.00", "0.00", "35.00", "15.00", True),  # 50 - 35 - 30 = -15: waived
])
def test_return_negative_value(farebox, balance, refund, offset, waived, damaged):
    card = farebox.card(issued="2020-01-01", balance=balance)
    result = one_return(farebox, card, at(date(2020, 6, 1)), damaged=damaged)
    assert (result["refund"], result["negative_offset"], result["waived"]) == (
        refund, offset, waived)


def test_a_returned_card_is_cancelled_and_cannot_be_returned_or_used_again(farebox):
    """Returned again here, the card's last change is this terminal's return: that return is
    reported (issue 17 item 1), nothing is refunded twice; elsewhere it is refused."""
    card = farebox.card(issued="2020-01-01")
    one_return(farebox, card, at(date(2020, 6, 1)))
    shown = farebox.show(card)
    assert (shown["status"], shown["balance"]) == ("cancelled", "0.00")
    assert shown["history"][0]["operation"] == "return"
    before = card.read_bytes()
    again = one_return(farebox, card, at(date(2020, 6, 2)))
    assert again["refund"] == "200.00" and again["completed_from"] is not None
    assert [r.type.value for r in journal_records(farebox)].count("refund") == 1
    farebox("service", "return", card, "--at", at(date(2020, 6, 2)), "--state",
            farebox.path("elsewhere")).assert_bad_input()
    assert card.read_bytes() == before
    declined = farebox.tap(card, "--fare", "1.00", at=at(date(2020, 6, 3))).json()
    assert declined["reason"] == "cancelled"


def test_return_is_all_or_nothing_and_at_most_five(farebox):
    good = farebox.card("good.json", issued="2020-01-01")
    sold = farebox.card("sold.json", issued="2020-01-01", kind="sold")
    mobile = farebox.card("mobile.json", issued="2020-01-01", kind="mobile")
    before = good.read_bytes()
    for other in (sold, mobile):
        farebox("service", "return", good, other, "--at", at(date(2020, 6, 1)), "--state",
                farebox.state).assert_bad_input()
    assert good.read_bytes() == before
    six = [farebox.card(f"c{n}.json", issued="2020-01-01") for n in range(6)]
    images = [p.read_bytes() for p in six]
    farebox("service", "return", *six, "--at", at(date(2020, 6, 1)), "--state",
            farebox.state).assert_bad_input()
    assert [p.read_bytes() for p in six] == images
    result = returned(farebox, *six[:5], when=at(date(2020, 6, 1)))
    assert len(result["cards"]) == 5 and result["refund"] == f"{5 * 200}.00"


def test_a_return_behind_a_card_s_last_use_changes_no_card(farebox):
    first = farebox.card("first.json", issued="2020-01-01")
    second = farebox.card("second.json", issued="2020-01-01")
    # used at another terminal: only the card itself says this time is behind it
    farebox.tap(second, "--fare", "1.00", at=at(date(2020, 7, 1)),
                state=farebox.path("elsewhere")).json()
    before = first.read_bytes(), second.read_bytes()
    refused = farebox("service", "return", first, second, "--at", at(date(2020, 6, 1)),
                      "--state", farebox.state)
    refused.assert_bad_input()
    assert "clock" in refused.err and "second.json" in refused.err
    assert (first.read_bytes(), second.read_bytes()) == before


def test_a_return_dated_before_the_issue_is_refused(farebox):
    card = farebox.card(issued="2026-01-15")
    farebox("service", "return", card, "--at", "2026-01-14T15:59:59Z", "--state",
            farebox.state).assert_bad_input()
    assert farebox.show(card)["status"] == "active"


def test_a_torn_return_is_completed_on_the_next_attempt_never_refunded_twice(farebox):
    card = farebox.card(issued="2020-01-01")
    torn = farebox("service", "return", card, "--torn-write", "2", "--at",
                   at(date(2020, 6, 1)), "--state", farebox.state, "--json")
    assert torn.code == 1 and "again" in torn.err
    result = one_return(farebox, card, at(date(2020, 6, 1), "10:00:20"))
    assert result["refund"] == "200.00"
    refunds = [r for r in journal_records(farebox)
               if r.type.value == "refund" and r.write_state is WriteState.COMMITTED]
    assert [r.amount_cents for r in refunds] == [20000]
    assert farebox.show(card)["status"] == "cancelled"


@pytest.mark.parametrize("failpoint", ["after-intent", "after-purse-write", "after-log-write"])
def test_a_return_cut_off_by_a_crash_is_completed_or_voided_by_the_next_attempt(
        farebox, failpoint):
    """The process dies (FAREBOX_FAILPOINT, the installed script) with the return's intent
    durable: before the card is touched, after the purse landed, after the log block landed. The
    next attempt reports the one refund (completing the landed write) or makes it afresh."""
    card = farebox.card(issued="2020-01-01")
    died = farebox.script("service", "return", card, "--at", at(date(2020, 6, 1)), "--state",
                          farebox.state, "--json", env={"FAREBOX_FAILPOINT": failpoint})
    assert died.code == 86 and died.out == ""
    landed = failpoint != "after-intent"
    assert (farebox.show(card)["status"] == "cancelled") is landed
    result = one_return(farebox, card, at(date(2020, 6, 1), "10:00:30"))
    assert result["refund"] == "200.00" and result["remaining_value"] == "150.00"
    assert (result["completed_from"] is not None) is landed
    refunds = [(r.amount_cents, r.write_state) for r in journal_records(farebox)
               if r.type.value == "refund"]
    if landed:
        assert refunds == [(20000, WriteState.COMMITTED)]
    else:
        assert refunds == [(20000, WriteState.VOID), (20000, WriteState.COMMITTED)]
    # once more: the same return reported again (issue 17 item 1), nothing refunded twice
    again = one_return(farebox, card, at(date(2020, 6, 1), "10:01:00"))
    assert again["refund"] == "200.00" and again["completed_from"] is not None
    assert len([r for r in journal_records(farebox) if r.type.value == "refund"]) == len(refunds)


def test_a_card_reported_lost_is_never_refunded_and_is_marked_blocked(farebox):
    lost = farebox.card("lost.json", issued="2020-01-01", number="12345678")
    good = farebox.card("good.json", issued="2020-01-01", number="22345678")
    hotlist = farebox.hotlist([{"card": "12345678", "reason": "lost",
                                "at": "2020-06-01T06:00:00+08:00"}])
    before = good.read_bytes()

    def return_(*cards, when):
        return farebox("service", "return", *cards, "--hotlist", hotlist, "--at", when,
                       "--state", farebox.state, "--json")

    refused = return_(good, lost, when=at(date(2020, 6, 1)))  # 10:00, lost at 06:00 + 3 h
    refused.assert_bad_input()  # every card is checked before any is returned
    assert "blocked" in refused.err and "lost.json" in refused.err
    assert good.read_bytes() == before
    assert farebox.show(lost)["status"] == "blocked"  # marked, as a payment terminal would
    assert [r.type.value for r in journal_records(farebox)] == ["block"]
    return_(lost, when=at(date(2020, 6, 1), "10:01:00")).assert_bad_input()
    assert [r.type.value for r in journal_records(farebox)] == ["block"]
    # before the three hours are up the card still works, but is not returned: a card reported
    # lost is refunded by the central office only (issue 19 item 1: this return refunded 200.00,
    # and `clearing lost refund` would have paid it again)
    early = farebox.card("early.json", issued="2020-01-01", number="32345678")
    soon = farebox.hotlist([{"card": "32345678", "reason": "lost",
                             "at": "2020-06-01T09:00:00+08:00"}], name="soon.json")
    kept = early.read_bytes()
    result = farebox("service", "return", early, "--hotlist", soon, "--at",
                     at(date(2020, 6, 1), "11:00:00"), "--state", farebox.state, "--json")
    result.assert_bad_input()
    assert "reported lost at 2020-06-01T09:00:00+08:00" in result.err
    assert "central office" in result.err
    assert early.read_bytes() == kept  # not marked: it is not blocked until 12:00
    assert [r.type.value for r in journal_records(farebox)] == ["block"]
    paid = farebox.tap(early, "--fare", "5.00", at=at(date(2020, 6, 1), "11:30:00"),
                       hotlist=soon)
    assert paid.json()["outcome"] == "approved"
    # a report dated after the return's time is not known then: the return goes ahead
    later = farebox.hotlist([{"card": "32345678", "reason": "lost",
                              "at": "2020-06-01T11:45:00+08:00"}], name="later.json")
    result = farebox("service", "return", early, "--hotlist", later, "--at",
                     at(date(2020, 6, 1), "11:40:00"), "--state", farebox.state, "--json")
    assert result.json()["cards"][0]["refund"] == "195.00"


def test_issue_with_aavs_counts_as_the_first_enablement(farebox):
    card = farebox.path("aavs.json")
    farebox("service", "issue", card, "--category", "adult", "--aavs", "250", "--at",
            at(date(2026, 1, 15)), "--state", farebox.state, "--json").json()
    shown = farebox.show(card)
    assert (shown["aavs"]["amount"], shown["aavs_ever_enabled"]) == ("250.00", True)
    assert "aavs_enable" in [r.type.value for r in journal_records(farebox)]
    farebox("service", "aavs", card, "--cancel", "--at", at(date(2026, 1, 20)), "--state",
            farebox.state, "--json").json()
    again = farebox("service", "aavs", card, "--amount", "150", "--at",
                    at(date(2026, 1, 20), "10:01:00"), "--state", farebox.state, "--json").json()
    assert again["fee"] == "20.00"


# ---- reactivate, inactivity fee, AAVS, student status, limit --------------------------------

def test_inactivity_fee_and_reactivation(farebox):
    card = farebox.card(issued="2018-01-01")  # last add value = issue day, HK$150.00
    fee = farebox("service", "inactivity-fee", card, "--at", at(date(2023, 6, 1)), "--json").json()
    assert fee["periods"] == [{"start": "2021-01-01", "fee": "15.00"},
                              {"start": "2022-01-01", "fee": "15.00"},
                              {"start": "2023-01-01", "fee": "15.00"}]
    assert (fee["due"], fee["exempt"], fee["inactive"]) == ("45.00", None, True)
    declined = farebox.tap(card, "--fare", "1.00", at=at(date(2023, 6, 1))).json()
    assert declined["reason"] == "inactive"
    result = farebox("service", "reactivate", card, "--at", at(date(2023, 6, 1), "11:00:00"),
                     "--state", farebox.state, "--json").json()
    assert (result["inactivity_fee"], result["waived"], result["balance_after"]) == (
        "45.00", "0.00", "105.00")
    approved = farebox.tap(card, "--fare", "1.00", at=at(date(2023, 6, 1), "12:00:00")).json()
    assert approved["outcome"] == "approved" and approved["balance_after"] == "104.00"
    farebox("service", "reactivate", card, "--at", at(date(2023, 6, 2)), "--state",
            farebox.state).assert_bad_input()  # active: nothing to reactivate


def test_an_aavs_suspended_card_is_reactivated_once_the_listed_amount_is_paid(farebox):
    """001: "MTR staff will reactivate the Octopus after the outstanding amount has been
    paid": the service terminal collects exactly what the list's suspension names, and the card
    keeps the suspension's number, so the same list no longer suspends it."""
    card = farebox.card(number="12345678", aavs="250")
    hotlist = farebox.hotlist([{"card": "12345678", "reason": "aavs_suspended",
                                "at": "2026-11-22T08:00:00+08:00", "outstanding_cents": 25_000,
                                "suspension": 1}])
    assert farebox.tap(card, "--fare", "1.00", at="2026-11-22T09:00:00+08:00",
                       hotlist=hotlist).json()["reason"] == "suspended"
    before = card.read_bytes()
    for paid in ([], ["--paid", "200.00"], ["--paid", "250.01"]):
        refused = farebox("service", "reactivate", card, "--at", "2026-11-22T10:00:00+08:00",
                          "--hotlist", hotlist, "--state", farebox.state, *paid)
        refused.assert_bad_input()
        assert "owes 250.00 for returned AAVS debits" in refused.err
    assert card.read_bytes() == before
    farebox("service", "reactivate", card, "--at", "2026-11-22T10:00:00+08:00", "--paid", "-1",
            "--hotlist", hotlist, "--state", farebox.state).assert_bad_input()
    farebox("service", "reactivate", card, "--at", "2026-11-22T10:00:00+08:00", "--state",
            farebox.state).assert_bad_input()  # no list held: it cannot tell what is owed
    done = farebox("service", "reactivate", card, "--at", "2026-11-22T10:00:00+08:00",
                   "--paid", "250.00", "--hotlist", hotlist, "--state", farebox.state,
                   "--json").json()
    assert (done["outstanding_paid"], done["reactivation_fee"], done["status"]) == (
        "250.00", "20.00", "active")
    assert [r["type"] for r in done["records"]] == [
        "aavs_outstanding_paid", "aavs_reactivation_fee", "reactivate"]
    assert farebox.show(card)["aavs_released"] == 1
    assert farebox.tap(card, "--fare", "1.00", at="2026-11-22T11:00:00+08:00",
                       hotlist=hotlist).json()["outcome"] == "approved"


def test_reactivation_waives_fees_beyond_the_balance(farebox):
    card = farebox.card(issued="2018-01-01", balance="20.00")
    result = farebox("service", "reactivate", card, "--at", at(date(2023, 6, 1)), "--state",
                     farebox.state, "--json").json()
    assert (result["inactivity_fee"], result["waived"], result["balance_after"]) == (
        "20.00", "25.00", "0.00")


@pytest.mark.parametrize("options, exempt", [
    ({"category": "child"}, "child_card"), ({"category": "personalised"}, "personalised"),
    ({"issued": "2017-09-30"}, "issued_before_2017_10_01")])
def test_cards_exempt_from_the_inactivity_fee(farebox, options, exempt):
    options = {"issued": "2018-01-01", **options}
    card = farebox.card(**options)
    fee = farebox("service", "inactivity-fee", card, "--at", at(date(2025, 1, 1)), "--json").json()
    assert (fee["exempt"], fee["due"], fee["periods"]) == (exempt, "0.00", [])


def test_aavs_enable_cancel_and_re_enable(farebox):
    card = farebox.card(issued="2026-01-15")

    def aavs(*argv, minute):
        return farebox("service", "aavs", card, *argv, "--at",
                       at(date(2026, 2, 1), f"10:{minute:02d}:00"), "--state", farebox.state,
                       "--json")

    assert aavs("--amount", "250", minute=0).json()["fee"] == "0.00"
    assert farebox.show(card)["aavs"]["amount"] == "250.00"
    assert aavs("--cancel", minute=1).json()["aavs"] is None
    assert farebox.show(card)["aavs"]["enabled"] is False
    again = aavs("--amount", "500", minute=2).json()
    assert (again["fee"], again["fee_charged_to"], again["balance_after"]) == (
        "20.00", "bank_account", "150.00")
    before = card.read_bytes()
    for argv in (("--amount", "300"), ("--amount", "500", "--cancel"), ()):
        aavs(*argv, minute=3).assert_bad_input()
    assert card.read_bytes() == before


def test_renew_student_and_upgrade_limit(farebox):
    student = farebox.card("s.json", issued="2026-01-15", category="personalised",
                           concession="student", concession_expiry="2026-08-31")
    result = farebox("service", "renew-student", student, "--expiry", "2027-08-31", "--at",
                     at(date(2026, 8, 1)), "--state", farebox.state, "--json").json()
    assert result["concession_expiry"] == "2027-08-31"
    assert farebox.show(student)["concession_expiry"] == "2027-08-31"
    farebox("service", "renew-student", student, "--expiry", "2026-07-01", "--at",
            at(date(2026, 8, 1), "10:01:00"), "--state", farebox.state).assert_bad_input()
    old = farebox.card("old.json", issued="2019-11-30")
    assert farebox.show(old)["stored_value_limit"] == "1000.00"
    farebox("service", "upgrade-limit", old, "--at", at(date(2026, 8, 1), "10:02:00"),
            "--state", farebox.state, "--json").json()
    assert farebox.show(old)["stored_value_limit"] == "3000.00"
    farebox("service", "upgrade-limit", old, "--at", at(date(2026, 8, 1), "10:03:00"),
            "--state", farebox.state).assert_bad_input()


@pytest.mark.parametrize("command", [["reactivate"], ["aavs", "--amount", "150"],
                                     ["upgrade-limit"], ["inactivity-fee"], ["return"]])
def test_a_card_or_a_reader_but_not_both_and_not_neither(farebox, command):
    card = farebox.card(issued="2026-01-15")
    state = [] if command == ["inactivity-fee"] else ["--state", farebox.state]
    farebox("service", *command, "--at", at(date(2026, 2, 1)), *state).assert_bad_input()
    farebox("service", *command, card, "--reader", "udp:127.0.0.1:9", "--at",
            at(date(2026, 2, 1)), *state).assert_bad_input()


# ---- over a real stack: nfcpy's UDP link ----------------------------------------------------

def test_service_operations_over_nfcpy_udp(farebox, served):
    """``farebox sim serve`` presents the card over nfcpy's UDP driver, once per command (a
    hand holding it to the reader for 3 s); the service commands (the installed console script)
    take it with ``--reader udp:127.0.0.1:PORT``."""
    card = farebox.card(issued="2018-01-01")

    def present(*argv):
        server = served(card, "--taps", 1, "--dwell-ms", 3000)
        run = farebox.script("service", *argv, "--reader", server.address, "--json", timeout=60)
        assert len(server.finish()) == 1
        return run.json()

    fee = present("inactivity-fee", "--at", at(date(2023, 6, 1)))
    assert fee["due"] == "45.00"
    reactivated = present("reactivate", "--at", at(date(2023, 6, 1), "10:01:00"),
                          "--state", farebox.state)
    assert (reactivated["inactivity_fee"], reactivated["balance_after"]) == ("45.00", "105.00")
    result = present("return", "--at", at(date(2023, 6, 1), "10:02:00"), "--state",
                     farebox.state)
    [only] = result["cards"]
    # 50 + 105 - 11 (no payments since issue)
    assert (only["remaining_value"], only["handling_fee"], only["refund"]) == (
        "105.00", "11.00", "144.00")
    shown = farebox.show(card)  # the card file is what the card said over the link
    assert (shown["status"], shown["balance"]) == ("cancelled", "0.00")


def test_issue_onto_a_blank_card_over_nfcpy_udp(farebox, served):
    """A blank card out of the box (``card blank``) held to a reader is issued there: written
    over nfcpy's UDP link, then taps; a second issue of the same card is refused."""
    blank = farebox.path("blank.json")
    farebox("card", "blank", blank, "--json").json()

    def present(*argv):
        server = served(blank, "--taps", 1, "--dwell-ms", 3000)
        run = farebox.script("service", "issue", *argv, "--reader", server.address,
                             "--state", farebox.state, "--json", timeout=60)
        assert len(server.finish()) == 1
        return run

    issued = present("--category", "elder", "--at", at(date(2026, 1, 15))).json()
    [only] = issued["cards"]
    assert (only["file"], only["collected"], only["completed_from"]) == (None, "100.00", None)
    shown = farebox.show(blank)
    assert (shown["number"], shown["category"], shown["balance"]) == (
        only["card"], "elder", "50.00")
    paid = farebox.tap(blank, "--fare", "2.00", at=at(date(2026, 1, 16))).json()
    assert paid["outcome"] == "approved"
    present("--category", "adult", "--at", at(date(2026, 1, 17))).assert_bad_input()
    assert [(r.type.value, r.amount_cents) for r in journal_records(farebox)][:2] == [
        ("deposit", 5_000), ("initial_value", 5_000)]


# ---- issue 19 item 4: the student scheme, AAVS and the holder's age, the inactivity fee -------

def test_student_status_is_activated_on_a_personalised_card_then_renewed(farebox):
    """003 "Activation/Renewal": a Personalised card without a status gets Student status."""
    card = farebox.card("p.json", issued="2026-01-15", category="personalised")
    assert farebox.show(card)["concession"] == "none"
    run = farebox("service", "renew-student", card, "--expiry", "2026-10-31", "--at",
                  at(date(2026, 8, 1)), "--state", farebox.state)
    assert run.code == 0 and run.out.startswith("STUDENT STATUS ACTIVATED"), run.err
    shown = farebox.show(card)
    assert (shown["concession"], shown["concession_expiry"], shown["balance"]) == (
        "student", "2026-10-31", "130.00")
    fare = farebox.tap(card, "--fares", "adult=5.00,student=2.50",
                       at=at(date(2026, 8, 2))).json()
    assert (fare["fare_class"], fare["amount"]) == ("student", "2.50")
    renewed = farebox("service", "renew-student", card, "--expiry", "2027-10-31", "--at",
                      at(date(2026, 8, 3)), "--state", farebox.state, "--json").json()
    assert (renewed["action"], renewed["concession_expiry"]) == ("renew", "2027-10-31")
    assert [r.type.value for r in journal_records(farebox)] == [
        "student_renewal", "payment", "student_renewal"]


@pytest.mark.parametrize("options", [
    {"category": "adult"},  # not Personalised
    {"category": "personalised", "concession": "disability"},
    {"category": "personalised", "birth_date": "2014-08-02"},  # 11 on 2026-08-01
])
def test_student_status_is_refused_where_003_does_not_give_it(farebox, options):
    card = farebox.card("x.json", issued="2026-01-15", **options)
    before = card.read_bytes()
    farebox("service", "renew-student", card, "--expiry", "2026-10-31", "--at",
            at(date(2026, 8, 1)), "--state", farebox.state).assert_bad_input()
    assert card.read_bytes() == before and journal_records(farebox) == []


def test_aavs_is_refused_on_a_child_card_and_for_a_holder_under_12(farebox):
    """002 §13(a): AAVS is available to persons aged 12 or over."""
    child = farebox.card("child.json", issued="2026-01-15", category="child")
    young = farebox.card("young.json", issued="2026-01-15", category="personalised",
                         birth_date="2014-02-02")  # 11 on 2026-02-01, 12 on 2026-02-02
    for card in (child, young):
        before = card.read_bytes()
        run = farebox("service", "aavs", card, "--amount", "250", "--at", at(date(2026, 2, 1)),
                      "--state", farebox.state)
        run.assert_bad_input()
        assert "aged 12 or over (002 §13(a))" in run.err
        assert card.read_bytes() == before
    ok = farebox("service", "aavs", young, "--amount", "250", "--at", at(date(2026, 2, 2)),
                 "--state", farebox.state, "--json").json()
    assert ok["aavs"] == "250.00"
    new = farebox.path("new-child.json")
    farebox("service", "issue", new, "--category", "child", "--aavs", "150", "--at",
            at(date(2026, 2, 3)), "--state", farebox.state).assert_bad_input()
    assert not new.exists()


def test_a_return_owing_the_inactivity_fee_refunds_the_same_reactivated_first_or_not(farebox):
    """002 §19: HK$100.00 on an Adult card issued 2018-01-01, never used since, returned
    2021-06-01: one inactive period (HK$15) and five or fewer payments (HK$11): 50 + 85 - 11."""
    direct = farebox.card("direct.json", issued="2018-01-01", balance="100.00")
    first = farebox.card("first.json", issued="2018-01-01", balance="100.00")
    result = one_return(farebox, direct, at(date(2021, 6, 1)))
    assert (result["remaining_value"], result["inactivity_fee"], result["handling_fee"],
            result["refund"]) == ("100.00", "15.00", "11.00", "124.00")
    assert "inactivity_fee" in [r["type"] for r in result["records"]]
    farebox("service", "reactivate", first, "--at", at(date(2021, 6, 1), "10:01:00"),
            "--state", farebox.state, "--json").json()
    after = one_return(farebox, first, at(date(2021, 6, 1), "10:02:00"))
    assert (after["inactivity_fee"], after["refund"]) == ("0.00", "124.00")


def test_a_personalised_card_carries_the_holder_s_birth_date_and_the_fee_follows_it(farebox):
    card = farebox.path("born.json")
    issued = farebox("service", "issue", card, "--category", "personalised", "--birth-date",
                     "1990-06-01", "--at", at(date(2018, 1, 1)), "--state", farebox.state,
                     "--json").json()
    assert issued["cards"][0]["birth_date"] == "1990-06-01"
    assert issued["collected"] == "200.00"  # 002's charges: unchanged by the birth date
    assert farebox.show(card)["birth_date"] == "1990-06-01"
    assert "holder born 1990-06-01" in farebox("card", "show", card).out
    fee = farebox("service", "inactivity-fee", card, "--at", at(date(2023, 6, 1)),
                  "--json").json()
    assert (fee["exempt"], fee["due"]) == (None, "45.00")  # aged 30 to 33: owes, as an Adult
    elder = farebox.card("elder.json", issued="2018-01-01", category="personalised",
                         birth_date="1950-01-01")
    minor = farebox.card("minor.json", issued="2018-01-01", category="personalised",
                         birth_date="2010-01-01")
    unknown = farebox.card("unknown.json", issued="2018-01-01", category="personalised")
    for holder, exempt in ((elder, "holder_60_or_over"), (minor, "holder_under_18"),
                           (unknown, "personalised")):
        fee = farebox("service", "inactivity-fee", holder, "--at", at(date(2023, 6, 1)),
                      "--json").json()
        assert (fee["exempt"], fee["due"]) == (exempt, "0.00")
    assert farebox.show(unknown)["birth_date"] is None


@pytest.mark.parametrize("argv", [
    ["--category", "adult", "--birth-date", "1990-01-01"],  # Personalised cards only
    ["--category", "personalised", "--birth-date", "2026-01-16"],  # after the issue date
    ["--category", "personalised", "--birth-date", "1899-12-31"],
    ["--category", "personalised", "--birth-date", "2020-01-01", "--aavs", "150"],  # aged 6
    ["--category", "personalised", "--birth-date", "2020-01-01", "--concession", "student",
     "--concession-expiry", "2026-10-31"],
])
def test_issue_refuses_a_birth_date_the_rules_cannot_accept(farebox, argv):
    card = farebox.path("x.json")
    farebox("service", "issue", card, *argv, "--at", at(date(2026, 1, 15)), "--state",
            farebox.state).assert_bad_input()
    assert not card.exists() and journal_records(farebox) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_new_service_records_settle_to_the_clearing_house(farebox, tmp_path, request,
                                                               backend):
    """A return that deducts the inactivity fee and a Student status activation ride in batches
    over real HTTP into the clearing store (SQLite, PostgreSQL): the report's sums are the
    card movements, to the cent."""
    from .test_clearing_http import start_receiver, trusting

    db = (str(tmp_path / "clearing.sqlite3") if backend == "sqlite"
          else request.getfixturevalue("pg_url"))
    made = farebox("terminal", "init", "--state", farebox.state, "--id", "T-0019",
                   "--json").json()
    idle = farebox.card("idle.json", issued="2018-01-01", balance="100.00")
    student = farebox.card("student.json", issued="2021-01-01", category="personalised",
                           birth_date="2005-03-01")
    returned_ = one_return(farebox, idle, at(date(2021, 6, 1)))
    assert returned_["refund"] == "124.00"
    farebox("service", "renew-student", student, "--expiry", "2021-10-31", "--at",
            at(date(2021, 6, 1), "10:05:00"), "--state", farebox.state, "--json").json()
    farebox("batch", "close", "--state", farebox.state, "--json").json()
    with start_receiver(db) as url:
        farebox("clearing", "enroll", "--db", db, "--terminal", "T-0019", "--pubkey",
                made["public_key"], "--json").json()
        config = trusting(farebox, db, url)
        sent = farebox("upload", "--state", farebox.state, "--config", config, "--json").json()
        assert sent["pending"] == 0 and sent["acknowledged"]
    totals = farebox("clearing", "report", "--db", db, "--json").json()["totals"]["committed"]
    assert totals["inactivity_fee"] == {"count": 1, "amount": "15.00"}
    assert totals["handling_fee"] == {"count": 1, "amount": "11.00"}
    assert totals["deposit_refund"] == {"count": 1, "amount": "50.00"}
    assert totals["refund"] == {"count": 1, "amount": "124.00"}
    assert totals["student_renewal"] == {"count": 1, "amount": "0.00"}

    def cents(kind):
        return int(totals[kind]["amount"].replace(".", ""))

    # the card's 100.00 = the fee kept + the value paid out + the handling fee kept from it
    assert cents("inactivity_fee") + cents("refund") - cents("deposit_refund") \
        + cents("handling_fee") == 10_000
