"""Issue 17, item 4: one bad clock reading poisons neither a terminal nor a card (docs/rules.md §3
"Clock", docs/cli.md `terminal clock reset`), through the ``farebox`` command."""

from __future__ import annotations

from farebox.terminal.store.journal import Journal

AT = "2026-11-22T08:00:00+08:00"
LATER = "2026-11-22T09:00:00+08:00"
FUTURE = "2080-01-01T08:00:00+08:00"


def records(farebox) -> list:
    with Journal(farebox.state / "journal.sqlite3") as journal:
        return journal.records()


def test_a_2080_tap_does_not_stop_a_correct_tap_later(farebox):
    card = farebox.card()
    assert farebox.tap(card, "--fare", "5.80", at=AT).json()["clock_trusted"]
    wrong = farebox.tap(card, "--fare", "5.80", at=FUTURE).json()
    assert wrong["outcome"] == "approved" and wrong["clock_trusted"] is False
    right = farebox.tap(card, "--fare", "5.80", at=LATER).json()
    assert right["outcome"] == "approved" and right["clock_trusted"] is True
    assert [r.clock_trusted for r in records(farebox)] == [True, False, True]
    # the wrong reading never reached the card: a new terminal trusts the card's dates
    fresh = farebox.tap(card, "--fare", "5.80", at=LATER, state=farebox.path("other")).json()
    assert fresh["clock_trusted"] is True
    assert farebox.show(card)["last_payment"] == "2026-11-22"


def test_a_reset_lets_a_terminal_whose_first_reading_was_2080_trust_a_correct_tap(farebox):
    card = farebox.card()
    assert farebox("terminal", "init", "--id", "BUS-1", "--state", farebox.state).code == 0
    # a new terminal cannot tell: 2080 is trusted (the card is inactive by then: declined)
    assert farebox.tap(card, "--fare", "5.80", at=FUTURE).json()["reason"] == "inactive"
    poisoned = farebox.tap(card, "--fare", "5.80", at=LATER).json()
    assert poisoned["clock_trusted"] is False and poisoned["outcome"] == "declined"
    reset = farebox("terminal", "clock", "reset", "--reason", "RTC battery replaced", "--at",
                    AT, "--state", farebox.state, "--json").json()
    assert reset["previous_high_water"] == "2080-01-01T00:00:00Z"
    assert reset["high_water"] == "2026-11-22T00:00:00Z" and reset["seq"] == 1
    right = farebox.tap(card, "--fare", "5.80", at=LATER).json()
    assert right["outcome"] == "approved" and right["clock_trusted"] is True
    kinds = [(r.type.value, r.amount_cents, r.card_number) for r in records(farebox)]
    assert kinds == [("clock_reset", 0, 0), ("payment", 580, int(right["card"].split("(")[0]))]
    closed = farebox("batch", "close", "--state", farebox.state, "--json")
    assert closed.code == 0, closed.err
    assert farebox("batch", "verify", "--state", farebox.state).code == 0


def test_a_reset_needs_a_reason(farebox):
    for extra in ([], ["--reason", ""], ["--reason", "   "]):
        run = farebox("terminal", "clock", "reset", *extra, "--at", AT, "--state", farebox.state)
        run.assert_bad_input()
    assert not (farebox.state / "journal.sqlite3").exists()


def test_a_cards_future_date_is_the_cards_anomaly_at_a_trusted_terminal(farebox):
    farebox.tap(farebox.card("other.json"), "--fare", "5.80", at=AT).json()  # the mark: AT
    card = farebox.card(last_add_value="2030-01-01")
    result = farebox.tap(card, "--fare", "5.80", at=LATER).json()
    assert result["outcome"] == "approved" and result["clock_trusted"] is True
    flagged = [(r.type.value, r.amount_cents, r.clock_trusted) for r in records(farebox)][1:]
    assert flagged == [("payment", 580, True), ("card_date_ahead", 0, True)]
    assert farebox.tap(farebox.card("third.json"), "--fare", "5.80",
                       at=LATER).json()["clock_trusted"]  # the mark did not move to 2030


def test_max_clock_ahead_s_is_configured_and_bad_values_are_exit_2(farebox):
    card = farebox.card()
    config = farebox.path("terminal.toml")
    config.write_text("[terminal]\nallow_test_keys = true\n"
                      "max_clock_ahead_s = 600\n", encoding="utf-8")
    tap = ["tap", card, "--fare", "5.80", "--state", farebox.state, "--config", config, "--json"]
    assert farebox(*tap, "--at", AT).json()["clock_trusted"]
    # other cards, last used on their issue day: nothing but the mark to judge the time by
    for name, at, trusted in (("b.json", "2026-11-22T08:11:00+08:00", False),
                              ("c.json", "2026-11-22T08:09:00+08:00", True)):
        tap[1] = farebox.card(name)
        assert farebox(*tap, "--at", at).json()["clock_trusted"] is trusted
    for bad in ("0", "-1", "true", '"1d"', "99999999999"):
        config.write_text("[terminal]\nallow_test_keys = true\n"
                          f"max_clock_ahead_s = {bad}\n", encoding="utf-8")
        run = farebox(*tap, "--at", AT)
        run.assert_bad_input()
        assert "terminal.max_clock_ahead_s" in run.err


# ---- the action list is never weakened by the clock bound -----------------------------------

DAY_0 = "2026-11-22T08:00:00+08:00"
DAY_5 = "2026-11-27T08:00:00+08:00"
DAY_9 = "2026-12-01T08:00:00+08:00"
DAY_10 = "2026-12-02T08:00:00+08:00"
DAY_11 = "2026-12-03T08:00:00+08:00"


def lost(farebox, at: str, number: str = "12345678"):
    return farebox.hotlist([{"card": number, "reason": "lost", "at": at}])


def idle_ten_days(farebox):
    """A terminal whose last tap was at day 0, by a card last used then (and never since)."""
    card = farebox.card(number="12345678")
    assert farebox.tap(card, "--fare", "5.80", at=DAY_0).json()["clock_trusted"]
    return card


def test_a_card_lost_at_day_9_is_refused_at_a_terminal_idle_10_days(farebox):
    card = idle_ten_days(farebox)
    # day 10 is more than max_clock_ahead_s past the mark and the card cannot bear it out: the
    # rules run at the mark (day 0), but the list is applied at the terminal's own reading
    result = farebox.tap(card, "--fare", "5.80", at=DAY_10, hotlist=lost(farebox, DAY_9)).json()
    assert (result["outcome"], result["reason"], result["clock_trusted"]) == (
        "declined", "blocked", False)
    assert result["balance_before"] == result["balance_after"] == "144.20"
    shown = farebox.show(card)
    assert (shown["status"], shown["balance"], shown["last_payment"]) == (
        "blocked", "144.20", "2026-11-22")  # the wrong reading never reaches the card's dates
    assert [(r.type.value, r.clock_trusted) for r in records(farebox)] == [
        ("payment", True), ("block", False)]
    declined = farebox.tap(card, "--fare", "5.80", at=DAY_0).json()  # the block is on the card
    assert (declined["outcome"], declined["reason"]) == ("declined", "blocked")


def test_a_card_lost_at_day_9_gets_no_add_value_at_a_terminal_idle_10_days(farebox):
    card = idle_ten_days(farebox)
    result = farebox.add_value(card, "100.00", at=DAY_10, hotlist=lost(farebox, DAY_9)).json()
    assert (result["outcome"], result["reason"], result["clock_trusted"]) == (
        "declined", "blocked", False)
    assert farebox.show(card)["status"] == "blocked"


def test_a_list_entry_after_the_terminals_reading_does_not_apply(farebox):
    card = idle_ten_days(farebox)
    result = farebox.tap(card, "--fare", "5.80", at=DAY_10, hotlist=lost(farebox, DAY_11)).json()
    assert (result["outcome"], result["clock_trusted"]) == ("approved", False)
    assert farebox.show(card)["status"] == "active"


def test_a_clock_behind_the_mark_still_applies_entries_up_to_the_mark(farebox):
    card = farebox.card(number="12345678")
    farebox.tap(farebox.card("other.json"), "--fare", "5.80", at=DAY_10).json()  # the mark
    # day 5 is behind the mark: the rules (and the list) run at day 10, where a day-9 report
    # applies though the terminal's reading is before it
    result = farebox.tap(card, "--fare", "5.80", at=DAY_5, hotlist=lost(farebox, DAY_9)).json()
    assert (result["outcome"], result["reason"], result["clock_trusted"]) == (
        "declined", "blocked", False)
    assert farebox.show(card)["status"] == "blocked"


def test_a_card_lost_at_day_9_is_never_refunded_at_a_desk_idle_10_days(farebox):
    card = idle_ten_days(farebox)
    good = farebox.card("good.json", number="22345678")
    before = good.read_bytes()
    # every card is checked before any is changed, in order: the lost card first is marked;
    # the good card after it would be refused for the clock
    refused = farebox("service", "return", card, good, "--hotlist", lost(farebox, DAY_9),
                      "--at", DAY_10, "--state", farebox.state, "--json")
    refused.assert_bad_input()
    assert "blocked" in refused.err and "card.json" in refused.err
    assert good.read_bytes() == before
    assert farebox.show(card)["status"] == "blocked"  # marked, as a payment terminal would
    assert [(r.type.value, r.clock_trusted) for r in records(farebox)] == [
        ("payment", True), ("block", False)]


def test_a_card_lost_at_day_9_is_marked_by_any_service_change_at_a_desk_idle_10_days(farebox):
    card = idle_ten_days(farebox)
    refused = farebox("service", "upgrade-limit", card, "--hotlist", lost(farebox, DAY_9),
                      "--at", DAY_10, "--state", farebox.state, "--json")
    refused.assert_bad_input()
    assert "blocked" in refused.err
    assert farebox.show(card)["status"] == "blocked"


def test_a_desk_idle_10_days_refuses_an_unlisted_card_and_names_the_reset(farebox):
    card = idle_ten_days(farebox)
    before = card.read_bytes()
    refused = farebox("service", "return", card, "--hotlist", lost(farebox, DAY_9, "22345678"),
                      "--at", DAY_10, "--state", farebox.state, "--json")
    refused.assert_bad_input()
    assert "check the clock" in refused.err and "farebox terminal clock reset" in refused.err
    assert card.read_bytes() == before
    assert [r.type.value for r in records(farebox)] == ["payment"]
