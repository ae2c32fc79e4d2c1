"""A money change cut off by a crash, run again later (issue 17 item 1): `service return`,
`service issue` and a cash `add-value` killed after the card write (``FAREBOX_FAILPOINT``, the
installed script: ``os._exit`` as a power cut would), then run again five minutes later, past the
60 s re-tap window, as a crash and a reboot take. The re-run reports the change the card already
got (`completed_from`, the refund to pay out, the money collected, the value credited), exit 0,
and never makes it twice; run once more it reports the same change again. A card changed since
by another terminal is no longer this terminal's to report: today's answer stands.

The times: the change at 10:00, the re-run at 10:05, once more at 11:00 (Hong Kong)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from farebox.terminal.failpoints import FAILPOINT_EXIT

AT = "2026-02-01T10:00:00+08:00"
RERUN = "2026-02-01T10:05:00+08:00"  # five minutes on: past the 60 s re-tap window
AGAIN = "2026-02-01T11:00:00+08:00"
#: where the card has its new bytes and the journal still holds the write as an intent (the
#: commit mark was never written). After ``after-commit-mark`` the mark is not durable today;
#: should it be written before the result is shown, the write is committed instead and the
#: re-run reports it all the same, as the card's last change.
LANDED = ["after-purse-write", "after-log-write", "after-commit-mark"]


def in_doubt(state: str, failpoint: str) -> bool:
    if failpoint != "after-commit-mark":
        assert state == "intent"
    return state == "intent"


def killed(farebox, *argv, failpoint: str = "after-purse-write") -> None:
    run = farebox.script(*argv, "--state", farebox.state, "--json",
                         env={"FAREBOX_FAILPOINT": failpoint})
    assert run.code == FAILPOINT_EXIT, run
    assert run.out == ""  # nothing was reported to the operator


def journal(farebox) -> list[dict]:
    return farebox("journal", "list", "--state", farebox.state, "--json").json()["records"]


def records_of(farebox, *types: str) -> list[tuple[str, str, str, str]]:
    return [(r["type"], r["amount"], r["write_state"], r["tap_id"]) for r in journal(farebox)
            if r["type"] in types]


@pytest.fixture
def farebox(farebox):
    """A terminal with an identity (a batch close needs one)."""
    farebox("terminal", "init", "--state", farebox.state, "--id", "T-0001", "--json").json()
    return farebox


def settled(farebox) -> list[dict]:
    """The items of the batches a `batch close` makes now (record type, state, observed)."""
    farebox("batch", "close", "--state", farebox.state, "--json").json()
    with sqlite3.connect(farebox.state / "journal.sqlite3") as db:
        bodies = [row[0] for row in db.execute("SELECT body FROM batches ORDER BY number")]
    return [{"type": item["record"]["type"], "amount": item["record"]["amount_cents"],
             "state": item["state"], "observed": item.get("observed", False)}
            for body in bodies for item in json.loads(body)["items"]]


# ---- service return -------------------------------------------------------------------------

def return_(farebox, card, at: str, *options: str):
    return farebox("service", "return", card, "--at", at, "--state", farebox.state, *options)


@pytest.mark.parametrize("failpoint", LANDED)
def test_a_return_killed_after_the_card_write_reports_its_refund_when_run_again_later(
        farebox, failpoint):
    """The reproduction: the card is cancelled at 0.00 and the journal holds `refund 189.00`;
    today the re-run says `nothing to refund` (exit 2) and nobody is paid."""
    card = farebox.card(issued="2026-01-15")  # 150.00; within 90 days: handling fee 11.00
    killed(farebox, "service", "return", card, "--at", AT, failpoint=failpoint)
    assert (farebox.show(card)["status"], farebox.show(card)["balance"]) == ("cancelled", "0.00")
    [(_, _, state, tap_id)] = records_of(farebox, "refund")
    seen = in_doubt(state, failpoint)  # the commit mark was never written

    rerun = return_(farebox, card, RERUN, "--json").json()
    [only] = rerun["cards"]
    assert only["completed_from"] == tap_id
    assert (only["refund"], rerun["refund"]) == ("189.00", "189.00")
    assert (only["deposit"], only["remaining_value"], only["handling_fee"]) == (
        "50.00", "150.00", "11.00")
    assert only["status"] == "cancelled"
    # committed: the card shows the write's bytes (observed), once
    assert records_of(farebox, "refund") == [("refund", "189.00", "committed", tap_id)]
    assert [i for i in settled(farebox) if i["type"] == "refund"] == [
        {"type": "refund", "amount": 18900, "state": "committed", "observed": seen}]


def test_a_return_run_again_and_again_reports_the_same_refund_and_books_it_once(farebox):
    card = farebox.card(issued="2026-01-15")
    killed(farebox, "service", "return", card, "--at", AT)
    first = return_(farebox, card, RERUN, "--json").json()
    image = card.read_bytes()
    second = return_(farebox, card, AGAIN, "--json").json()
    assert second == first  # the same completed change, not a new refund
    assert card.read_bytes() == image  # nothing written the second time
    [(_, amount, state, tap_id)] = records_of(farebox, "refund")
    assert (amount, state, first["cards"][0]["completed_from"]) == ("189.00", "committed", tap_id)
    assert [r["type"] for r in journal(farebox)] == [
        "deposit_refund", "handling_fee", "refund", "cancel"]


def test_the_human_report_of_a_completed_return_names_it_and_the_refund_once(farebox):
    card = farebox.card(issued="2026-01-15")
    killed(farebox, "service", "return", card, "--at", AT)
    [(_, _, _, tap_id)] = records_of(farebox, "refund")
    for when in (RERUN, AGAIN):
        run = return_(farebox, card, when)
        assert run.code == 0, run
        lines = run.out.splitlines()
        assert lines[0].startswith("RETURNED card ") and "refund 189.00" in lines[0]
        assert f"completes return {tap_id}" in lines[0] and "nothing more was done" in lines[0]
        assert lines[1] == (f"pay out 189.00 (the refund of return {tap_id}, "
                            "booked 2026-02-01T02:00:00Z: pay it once)")


def test_a_return_finished_normally_is_reported_again_not_refunded_again(farebox):
    """Its last change is this terminal's return: a second return reports it (the same refund,
    `completed_from` naming it), whatever the time, and changes nothing."""
    card = farebox.card(issued="2026-01-15")
    done = return_(farebox, card, AT, "--json").json()
    assert done["cards"][0]["completed_from"] is None
    [(_, _, _, tap_id)] = records_of(farebox, "refund")
    image = card.read_bytes()
    again = return_(farebox, card, "2026-03-01T10:00:00+08:00", "--json").json()
    assert again["cards"][0]["completed_from"] == tap_id
    assert again["cards"][0]["completed_at"] == "2026-02-01T02:00:00Z"

    def same(card: dict) -> dict:
        return {k: v for k, v in card.items() if k not in ("completed_from", "completed_at")}

    assert same(again["cards"][0]) == same(done["cards"][0])
    assert card.read_bytes() == image
    assert len(records_of(farebox, "refund")) == 1


def test_another_terminal_never_reports_a_return_it_did_not_make(farebox):
    """The cancelled card at a second terminal: nothing to refund there (exit 2, as today); back
    at the first, whose return it is, the refund is reported."""
    card = farebox.card(issued="2026-01-15")
    killed(farebox, "service", "return", card, "--at", AT)
    elsewhere = farebox("service", "return", card, "--at", RERUN, "--state",
                        farebox.path("elsewhere"))
    elsewhere.assert_bad_input()
    assert "cancelled" in elsewhere.err
    rerun = return_(farebox, card, AGAIN, "--json").json()
    assert rerun["refund"] == "189.00" and rerun["cards"][0]["completed_from"]


def test_a_return_of_several_cards_completes_the_cut_off_one_and_returns_the_others(farebox):
    first = farebox.card("first.json", issued="2026-01-15")
    second = farebox.card("second.json", issued="2026-01-15")
    killed(farebox, "service", "return", first, second, "--at", AT)  # dies at the first card
    assert farebox.show(second)["status"] == "active"
    rerun = farebox("service", "return", first, second, "--at", RERUN, "--state",
                    farebox.state, "--json").json()
    assert [c["completed_from"] is not None for c in rerun["cards"]] == [True, False]
    assert rerun["refund"] == "378.00"
    assert len(records_of(farebox, "refund")) == 2


# ---- service issue --------------------------------------------------------------------------

def issue(farebox, *cards, at: str, as_json: bool = True):
    argv = ["service", "issue", *cards, "--category", "adult", "--at", at, "--state",
            farebox.state]
    return farebox(*argv, *(["--json"] if as_json else []))


def test_an_issue_killed_after_writing_the_card_reports_what_to_collect_when_run_again(farebox):
    """Today the re-run says `already exists` (exit 2): the deposit and initial value stay in
    doubt and the operator never learns they are due."""
    card = farebox.path("new.json")
    killed(farebox, "service", "issue", card, "--category", "adult", "--at", AT)
    assert card.exists()
    intents = records_of(farebox, "deposit", "initial_value")
    assert [(t, a, s) for t, a, s, _ in intents] == [
        ("deposit", "50.00", "intent"), ("initial_value", "150.00", "intent")]
    tap_id = intents[0][3]
    rerun = issue(farebox, card, at=RERUN).json()
    [only] = rerun["cards"]
    assert only["completed_from"] == tap_id and only["file"] == str(card)
    assert (only["deposit"], only["initial_value"], only["collected"]) == (
        "50.00", "150.00", "200.00")
    assert rerun["collected"] == "200.00"
    assert only["issued"] == "2026-02-01"  # the card's own issue date, from the first run
    image = card.read_bytes()
    assert issue(farebox, card, at=AGAIN).json() == rerun  # the same, again
    assert card.read_bytes() == image
    assert [(t, a, s) for t, a, s, _ in records_of(farebox, "deposit", "initial_value")] == [
        ("deposit", "50.00", "committed"), ("initial_value", "150.00", "committed")]
    assert {i["observed"] for i in settled(farebox)} == {True}
    human = issue(farebox, card, at=AGAIN, as_json=False)
    assert human.code == 0 and f"completes issue {tap_id}" in human.out
    assert human.out.splitlines()[-1] == (f"collect 200.00 (issue {tap_id}, booked "
                                          "2026-02-01T02:00:00Z: collect it once)")


def test_an_issue_of_several_cards_completes_the_cut_off_one_and_issues_the_rest(farebox):
    first, second = farebox.path("a.json"), farebox.path("b.json")
    killed(farebox, "service", "issue", first, second, "--category", "adult", "--at", AT)
    assert first.exists() and not second.exists()
    rerun = issue(farebox, first, second, at=RERUN).json()
    assert [c["completed_from"] is not None for c in rerun["cards"]] == [True, False]
    assert rerun["collected"] == "400.00"
    assert len(records_of(farebox, "deposit")) == 2


def test_an_issued_card_used_elsewhere_since_is_not_reported_as_this_terminal_s(farebox):
    card = farebox.path("new.json")
    killed(farebox, "service", "issue", card, "--category", "adult", "--at", AT)
    farebox.tap(card, "--fare", "1.00", at=RERUN, state=farebox.path("elsewhere")).json()
    refused = issue(farebox, card, at=AGAIN)
    refused.assert_bad_input()
    assert "already exists" in refused.err


# ---- add value ------------------------------------------------------------------------------

def add_value(farebox, card, amount: str, at: str, *options: str):
    return farebox("add-value", card, "--amount", amount, "--at", at, "--state", farebox.state,
                   *options)


@pytest.mark.parametrize("failpoint", LANDED)
def test_an_add_value_killed_after_the_card_write_reports_the_value_when_run_again_later(
        farebox, failpoint):
    """Today the re-run credits the card a second time (350.00 for 100.00 of cash taken once)."""
    card = farebox.card(issued="2026-01-15")  # 150.00
    killed(farebox, "add-value", card, "--amount", "100.00", "--at", AT, failpoint=failpoint)
    assert farebox.show(card)["balance"] == "250.00"
    [(_, _, state, tap_id)] = records_of(farebox, "add_value")
    seen = in_doubt(state, failpoint)
    rerun = add_value(farebox, card, "100.00", RERUN, "--json").json()
    assert rerun["outcome"] == "approved" and rerun["completed_from"] == tap_id
    assert (rerun["amount"], rerun["balance_before"], rerun["balance_after"]) == (
        "100.00", "150.00", "250.00")
    assert farebox.show(card)["balance"] == "250.00"
    assert records_of(farebox, "add_value") == [("add_value", "100.00", "committed", tap_id)]
    assert [i for i in settled(farebox) if i["type"] == "add_value"] == [
        {"type": "add_value", "amount": 10000, "state": "committed", "observed": seen}]
    # the report was shown: the same amount once more is a new add value, as two in a row are
    again = add_value(farebox, card, "100.00", AGAIN, "--json").json()
    assert again["completed_from"] is None and again["balance_after"] == "350.00"


def test_the_human_report_of_a_completed_add_value_says_what_to_collect_once(farebox):
    card = farebox.card(issued="2026-01-15")
    killed(farebox, "add-value", card, "--amount", "100.00", "--at", AT)
    [(_, _, _, tap_id)] = records_of(farebox, "add_value")
    run = add_value(farebox, card, "100.00", RERUN)
    assert run.code == 0, run
    assert run.out.startswith(f"APPROVED (completes add value {tap_id}, booked "
                              "2026-02-01T02:00:00Z: nothing more added; collect 100.00 once)")
    assert "balance 150.00 -> 250.00" in run.out


def test_an_add_value_cut_off_is_reported_even_to_a_request_for_another_amount(farebox):
    """The operator must learn what the card already got before anything more is added."""
    card = farebox.card(issued="2026-01-15")
    killed(farebox, "add-value", card, "--amount", "100.00", "--at", AT)
    rerun = add_value(farebox, card, "50.00", RERUN, "--json").json()
    assert rerun["completed_from"] and rerun["amount"] == "100.00"
    assert farebox.show(card)["balance"] == "250.00"
    # reported: a new request of another amount is served
    more = add_value(farebox, card, "50.00", AGAIN, "--json").json()
    assert more["completed_from"] is None and more["balance_after"] == "300.00"


def test_an_add_value_never_shown_is_reported_when_run_again(farebox):
    """Killed after its commit mark, before its result was printed: the same request again is
    that add value, reported (collect its cash once), not a second credit; two add values that
    were both shown add both (tests/tools/test_cli_contract.py), and `--again` adds anew
    (tests/terminal/test_rerun.py)."""
    card = farebox.card(issued="2026-01-15")
    killed(farebox, "add-value", card, "--amount", "100.00", "--at", AT,
           failpoint="after-commit-mark")
    [(_, _, state, tap_id)] = records_of(farebox, "add_value")
    assert state in ("intent", "committed")  # the mark is written before the result is shown
    rerun = add_value(farebox, card, "100.00", RERUN, "--json").json()
    assert rerun["completed_from"] == tap_id and rerun["balance_after"] == "250.00"
    assert len(records_of(farebox, "add_value")) == 1
    assert farebox.show(card)["balance"] == "250.00"


def test_an_add_value_cut_off_then_card_used_elsewhere_is_served_as_today(farebox):
    """The card's last change is another terminal's: not this terminal's to report. The cut-off
    add value is committed (the card shows it) and the new request served."""
    card = farebox.card(issued="2026-01-15")
    killed(farebox, "add-value", card, "--amount", "100.00", "--at", AT)
    farebox.tap(card, "--fare", "1.00", at=RERUN, state=farebox.path("elsewhere")).json()
    again = add_value(farebox, card, "100.00", AGAIN, "--json").json()
    assert again["completed_from"] is None
    assert (again["balance_before"], again["balance_after"]) == ("249.00", "349.00")
    assert [s for _, _, s, _ in records_of(farebox, "add_value")] == ["committed", "committed"]


# ---- the other service changes: completed whatever the time ---------------------------------

def test_a_reactivation_killed_after_the_card_write_is_completed_when_run_again_later(farebox):
    """The inactivity fees were deducted from the card: today a re-run five minutes later says
    `the card is active: nothing to reactivate` (exit 2) and nobody learns what was taken."""
    card = farebox.card(issued="2018-01-01")  # inactive since 2021: 45.00 of fees by mid-2023
    when, later = "2023-06-01T10:00:00+08:00", "2023-06-01T10:05:00+08:00"
    killed(farebox, "service", "reactivate", card, "--at", when)
    [(_, _, state, tap_id)] = records_of(farebox, "inactivity_fee")
    assert state == "intent"
    rerun = farebox("service", "reactivate", card, "--at", later, "--state", farebox.state)
    assert rerun.code == 0, rerun
    assert rerun.out.startswith("REACTIVATED  card ") and "inactivity_fee 45.00" in rerun.out
    assert f"(completes reactivate {tap_id}: nothing more was done)" in rerun.out
    assert records_of(farebox, "inactivity_fee") == [
        ("inactivity_fee", "45.00", "committed", tap_id)]
    assert farebox.show(card)["balance"] == "105.00"


def test_the_human_total_of_several_returns_names_the_refund_booked_before(farebox):
    first = farebox.card("first.json", issued="2026-01-15")
    second = farebox.card("second.json", issued="2026-01-15")
    killed(farebox, "service", "return", first, second, "--at", AT)
    [(_, _, _, tap_id)] = records_of(farebox, "refund")
    run = farebox("service", "return", first, second, "--at", RERUN, "--state", farebox.state)
    assert run.code == 0, run
    assert run.out.splitlines()[-1] == (f"pay out 378.00 (includes return {tap_id} 189.00, "
                                        "booked 2026-02-01T02:00:00Z: each once)")
