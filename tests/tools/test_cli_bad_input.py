"""Bad input to the ``farebox`` command (docs/cli.md): exit 2, a one-line message on stderr, no
traceback, and nothing changed — no card file created or altered, and no terminal journal created
when the error is found before the journal is opened (every case here except the journal ones)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

AT = "2026-11-22T08:00:00+08:00"

BAD_AMOUNTS = ["-5.80", "-1", "0", "0.00", "0.0", "-0.00", "5.8.0", "1e3", "1E3", "5.801", " 5",
               "5 ", "", "abc", "+5", "5,80", "5.", ".5", "0x10", "nan", "inf", "1_000",
               "1234567890", "5.80\n", "٥", "５.８０"]


# ==== card new refusals =========================================================================

@pytest.mark.parametrize("extra", [
    # AAVS amounts outside 150/250/500/1000
    ["--aavs", "100"], ["--aavs", "150.01"], ["--aavs", "149.99"], ["--aavs", "2000"],
    ["--aavs", "0"], ["--aavs", "-150"], ["--aavs", "abc"], ["--aavs", "1.5e2"],
    # a concession on a non-personalised card
    ["--concession", "student", "--concession-expiry", "2027-08-31"],
    ["--concession", "disability"],
    ["--category", "child", "--concession", "disability"],
    ["--category", "elder", "--concession", "student", "--concession-expiry", "2027-08-31"],
    ["--kind", "sold", "--concession", "disability"],
    # balance outside -negative limit .. stored value limit (2026 On-Loan: -50.00 .. 3000.00)
    ["--balance", "-50.01"], ["--balance", "3000.01"], ["--balance", "-1000.00"],
    ["--balance", "99999.00"],
    ["--kind", "sold", "--balance", "-35.01"],                        # Sold: -35.00
    ["--kind", "mobile", "--balance", "-50.01"],
    ["--issued", "2017-09-30", "--balance", "-35.01"],                # old On-Loan: -35.00
    ["--issued", "2019-11-30", "--balance", "1000.01"],               # old card: 1000.00
    ["--kind", "mobile", "--issued", "2019-09-30", "--balance", "1000.01"],
    ["--balance", "5.801"], ["--balance", "1e3"], ["--balance", ""], ["--balance", "--5"],
    # bad dates
    ["--issued", "2026-02-30"], ["--issued", "2026-13-01"], ["--issued", "2026-1-5"],
    ["--issued", "15/01/2026"], ["--issued", ""], ["--issued", "yesterday"],
    ["--issued", "2026-01-15T00:00:00+08:00"], ["--issued", "20260115"],
    ["--issued", "1989-12-31"],
    ["--last-add-value", "2026-02-30"], ["--concession-expiry", "2026-02-30"],
    ["--issued", "2026-01-15", "--last-add-value", "2026-01-14"],
    # bad numbers
    ["--number", "1234567"], ["--number", "123456789"], ["--number", "1234567a"],
    ["--number", "abcdefgh"], ["--number", "12345678(3)"], ["--number", "12345678(x)"],
    ["--number", ""], ["--number", "-1234567"], ["--number", " 12345678"],
    ["--number", "１２３４５６７８"],
    # unknown choices
    ["--kind", "bogus"], ["--category", "student"], ["--concession", "senior"],
    ["--unknown-option", "1"],
])
def test_card_new_refusal(farebox, extra):
    path = farebox.path("card.json")
    run = farebox("card", "new", path, *extra)
    run.assert_bad_input()
    assert not path.exists()
    assert list(farebox.tmp.iterdir()) == []  # no temporary file left behind either


def test_card_new_refuses_existing_file_and_leaves_it_unchanged(farebox):
    card = farebox.card(number="12345678", balance="10.00")
    before = card.read_bytes()
    run = farebox("card", "new", card, "--number", "87654321", "--issued", "2026-01-15")
    run.assert_bad_input()
    assert card.read_bytes() == before
    assert farebox.show(card)["number"] == "12345678(2)"


def test_card_new_refuses_missing_directory(farebox):
    path = farebox.path("no-such-dir/card.json")
    farebox("card", "new", path).assert_bad_input()
    assert not path.parent.exists()


def test_card_new_missing_argument(farebox):
    farebox("card", "new").assert_bad_input()


@pytest.mark.parametrize("content", [None, "", "not json", "[]"])
def test_card_show_bad_file(farebox, content):
    path = farebox.path("card.json")
    if content is not None:
        path.write_text(content)
    farebox("card", "show", path, "--json").assert_bad_input()


# ==== tap / add-value: values ==================================================================

@pytest.fixture
def card(farebox):
    return farebox.card(number="12345678", balance="10.00")


def _assert_nothing_changed(farebox, card, before: bytes) -> None:
    assert card.read_bytes() == before
    assert not farebox.state.exists(), "no journal may be created for input refused before it"


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_bad_amount(farebox, card, command, amount):
    option = "--fare" if command == "tap" else "--amount"
    before = card.read_bytes()
    run = farebox(command, card, f"{option}={amount}", "--at", AT, "--state", farebox.state,
                  "--json")
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


@pytest.mark.parametrize("amount", ["-5.80", "", " 5", "abc"])
@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_bad_amount_as_separate_argument(farebox, card, command, amount):
    option = "--fare" if command == "tap" else "--amount"
    before = card.read_bytes()
    run = farebox(command, card, option, amount, "--at", AT, "--state", farebox.state)
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


@pytest.mark.parametrize("fares", [
    ["--fare", "5.80", "--fares", "adult=5.80"],  # both
    [],                                           # neither
    ["--fares", "adult=5.80,bus=1.00"],           # unknown class
    ["--fares", "Adult=5.80"],
    ["--fares", "child=2.90"],                    # no adult fare
    ["--fares", "child=2.90,elder=2.00,student=2.90,disability=2.00"],
    ["--fares", "adult=5.80,adult=6.00"],         # a class twice
    ["--fares", "adult"],                         # no "="
    ["--fares", "adult:5.80"],
    ["--fares", "adult=5.80;child=2.90"],
    ["--fares", ""],
    ["--fares", "adult=0"],                       # a zero fare
    ["--fares", "adult=5.80,child=0.00"],
    ["--fares", "adult=-5.80"],
    ["--fares", "adult=5.801"],
    ["--fares", "adult=1e3"],
    ["--fares", "adult=5.80,child="],
    ["--fares", "adult=5.80,"],
])
def test_bad_fare_options(farebox, card, fares):
    before = card.read_bytes()
    run = farebox("tap", card, *fares, "--at", AT, "--state", farebox.state, "--json")
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


def test_add_value_without_amount(farebox, card):
    before = card.read_bytes()
    farebox("add-value", card, "--at", AT, "--state", farebox.state).assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


@pytest.mark.parametrize("at", [
    "2026-11-22T08:00:00",          # no offset
    "2026-11-22 08:00:00",
    "2026-11-22",                   # a date is not a time
    "garbage", "", "now", "1700000000",
    "2026-13-01T08:00:00+08:00", "2026-11-31T08:00:00+08:00",
    "2026-11-22T25:00:00+08:00", "2026-11-22T08:00:00+25:00",
])
@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_bad_time(farebox, card, command, at):
    value = ["--fare", "5.80"] if command == "tap" else ["--amount", "50.00"]
    before = card.read_bytes()
    run = farebox(command, card, *value, f"--at={at}", "--state", farebox.state)
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_tap_at_outside_card_date_range(farebox, card, command):
    value = ["--fare", "5.80"] if command == "tap" else ["--amount", "50.00"]
    before = card.read_bytes()
    run = farebox(command, card, *value, "--at", "1985-01-01T08:00:00+08:00",
                  "--state", farebox.state)
    run.assert_bad_input()
    assert card.read_bytes() == before


# ==== tap / add-value: card files ==============================================================

def _card_json(card) -> dict:
    return json.loads(card.read_text())


def _edit(card, change) -> None:
    data = _card_json(card)
    change(data)
    card.write_text(json.dumps(data))


CARD_FILE_DAMAGE = {
    "not_json": lambda c: c.write_text("this is not json"),
    "empty": lambda c: c.write_text(""),
    "truncated": lambda c: c.write_text(c.read_text()[:40]),
    "not_utf8": lambda c: c.write_bytes(b"\xff\xfe\x00garbage"),
    "json_list": lambda c: c.write_text("[]"),
    "json_string": lambda c: c.write_text('"card"'),
    "13_blocks": lambda c: _edit(c, lambda d: d["blocks"].pop()),
    "15_blocks": lambda c: _edit(c, lambda d: d["blocks"].append("00" * 16)),
    "no_blocks": lambda c: _edit(c, lambda d: d.pop("blocks")),
    "blocks_not_list": lambda c: _edit(c, lambda d: d.update(blocks="00" * 224)),
    "bad_hex_block": lambda c: _edit(c, lambda d: d["blocks"].__setitem__(3, "zz" * 16)),
    "short_block": lambda c: _edit(c, lambda d: d["blocks"].__setitem__(3, "00" * 15)),
    "long_block": lambda c: _edit(c, lambda d: d["blocks"].__setitem__(3, "00" * 17)),
    "odd_hex_block": lambda c: _edit(c, lambda d: d["blocks"].__setitem__(3, "0" * 31)),
    "block_not_string": lambda c: _edit(c, lambda d: d["blocks"].__setitem__(3, 0)),
    "no_idm": lambda c: _edit(c, lambda d: d.pop("idm")),
    "bad_idm": lambda c: _edit(c, lambda d: d.update(idm="xyz")),
    "short_idm": lambda c: _edit(c, lambda d: d.update(idm="012e")),
    "no_pmm": lambda c: _edit(c, lambda d: d.pop("pmm")),
    "no_system_code": lambda c: _edit(c, lambda d: d.pop("system_code")),
    "short_system_code": lambda c: _edit(c, lambda d: d.update(system_code="12")),
}


@pytest.mark.parametrize("damage", CARD_FILE_DAMAGE)
@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_bad_card_file(farebox, card, command, damage):
    CARD_FILE_DAMAGE[damage](card)
    before = card.read_bytes()
    value = ["--fare", "5.80"] if command == "tap" else ["--amount", "50.00"]
    run = farebox(command, card, *value, "--at", AT, "--state", farebox.state, "--json")
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_missing_card_file(farebox, command):
    value = ["--fare", "5.80"] if command == "tap" else ["--amount", "50.00"]
    missing = farebox.path("missing.json")
    run = farebox(command, missing, *value, "--at", AT, "--state", farebox.state)
    run.assert_bad_input()
    assert not missing.exists()
    assert not farebox.state.exists()


@pytest.mark.parametrize("command", ["tap", "add-value", "show"])
def test_card_file_of_another_system_code(farebox, card, command):
    _edit(card, lambda d: d.update(system_code="0003"))
    before = card.read_bytes()
    if command == "show":
        run = farebox("card", "show", card, "--json")
    else:
        value = ["--fare", "5.80"] if command == "tap" else ["--amount", "50.00"]
        run = farebox(command, card, *value, "--at", AT, "--state", farebox.state, "--json")
    assert card.read_bytes() == before
    if run.code == 0 and command != "show":
        assert json.loads(run.out)["reason"] == "invalid_card"
    else:
        run.assert_bad_input()


def test_card_file_is_a_directory(farebox):
    directory = farebox.path("card-dir")
    directory.mkdir()
    run = farebox("tap", directory, "--fare", "5.80", "--at", AT, "--state", farebox.state)
    run.assert_bad_input()
    assert not farebox.state.exists()


# ==== tap / add-value: action lists ============================================================

HOTLIST_DAMAGE = {
    "not_json": "{not json",
    "empty": "",
    "list": "[]",
    "no_entries": "{}",
    "entries_not_list": '{"entries": {"card": "12345678"}}',
    "entry_not_object": '{"entries": ["12345678"]}',
    "bad_reason": '{"entries": [{"card": "12345678", "reason": "stolen", "at": "2026-11-22T00:00:00Z"}]}',
    "no_reason": '{"entries": [{"card": "12345678", "at": "2026-11-22T00:00:00Z"}]}',
    "card_7_digits": '{"entries": [{"card": "1234567", "reason": "lost", "at": "2026-11-22T00:00:00Z"}]}',
    "card_letters": '{"entries": [{"card": "abcdefgh", "reason": "lost", "at": "2026-11-22T00:00:00Z"}]}',
    "card_bad_check_digit": '{"entries": [{"card": "12345678(3)", "reason": "lost", "at": "2026-11-22T00:00:00Z"}]}',
    "card_number_type": '{"entries": [{"card": 12345678, "reason": "lost", "at": "2026-11-22T00:00:00Z"}]}',
    "no_card": '{"entries": [{"reason": "lost", "at": "2026-11-22T00:00:00Z"}]}',
    "time_without_offset": '{"entries": [{"card": "12345678", "reason": "lost", "at": "2026-11-22T08:00:00"}]}',
    "time_garbage": '{"entries": [{"card": "12345678", "reason": "lost", "at": "yesterday"}]}',
    "time_date_only": '{"entries": [{"card": "12345678", "reason": "lost", "at": "2026-11-22"}]}',
    "no_time": '{"entries": [{"card": "12345678", "reason": "lost"}]}',
    "outstanding_on_a_lost_entry": '{"entries": [{"card": "12345678", "reason": "lost", "at": "2026-11-22T00:00:00Z", "outstanding_cents": 100}]}',
    "outstanding_negative": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "outstanding_cents": -1, "suspension": 1}]}',
    "outstanding_text": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "outstanding_cents": "1.00", "suspension": 1}]}',
    "outstanding_huge": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "outstanding_cents": 100000001, "suspension": 1}]}',
    "outstanding_zero": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "outstanding_cents": 0, "suspension": 1}]}',
    "suspension_without_amount": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "suspension": 1}]}',
    "amount_without_suspension": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "outstanding_cents": 100}]}',
    "suspension_zero": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "suspension": 0}]}',
    "suspension_256": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "suspension": 256}]}',
    "suspension_bool": '{"entries": [{"card": "12345678", "reason": "aavs_suspended", "at": "2026-11-22T00:00:00Z", "suspension": true}]}',
    "second_entry_bad": ('{"entries": [{"card": "87654321", "reason": "lost", "at": "2026-11-22T00:00:00Z"},'
                         ' {"card": "12345678", "reason": "lost", "at": "bad"}]}'),
}


@pytest.mark.parametrize("damage", HOTLIST_DAMAGE)
@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_bad_hotlist(farebox, card, command, damage):
    hotlist = farebox.path("hotlist.json")
    hotlist.write_text(HOTLIST_DAMAGE[damage])
    before = card.read_bytes()
    value = ["--fare", "5.80"] if command == "tap" else ["--amount", "50.00"]
    run = farebox(command, card, *value, "--at", AT, "--state", farebox.state,
                  "--hotlist", hotlist, "--json")
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


@pytest.mark.parametrize("command", ["tap", "add-value"])
def test_missing_hotlist(farebox, card, command):
    before = card.read_bytes()
    value = ["--fare", "5.80"] if command == "tap" else ["--amount", "50.00"]
    run = farebox(command, card, *value, "--at", AT, "--state", farebox.state,
                  "--hotlist", farebox.path("missing-hotlist.json"))
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


def test_empty_hotlist_is_fine(farebox, card):
    hotlist = farebox.hotlist([])
    result = farebox.tap(card, "--fare", "5.80", at=AT, hotlist=hotlist).json()
    assert result["outcome"] == "approved"


# ==== tap / add-value: state ===================================================================

def test_state_that_is_a_file(farebox, card):
    state = farebox.path("state-file")
    state.write_text("x")
    before = card.read_bytes()
    farebox("tap", card, "--fare", "5.80", "--at", AT, "--state", state).assert_bad_input()
    assert card.read_bytes() == before
    assert state.read_text() == "x"


def test_state_with_a_journal_that_is_not_a_database(farebox, card):
    """A journal SQLite cannot read is a damaged journal (issue 17 item 5): exit 3, one line,
    nothing changed."""
    farebox.state.mkdir()
    journal = farebox.state / "journal.sqlite3"
    journal.write_bytes(b"this is not an sqlite database, not at all" * 4)
    before, journal_before = card.read_bytes(), journal.read_bytes()
    run = farebox("tap", card, "--fare", "5.80", "--at", AT, "--state", farebox.state)
    assert run.code == 3 and run.out == "" and run.err.count("\n") == 1, run
    assert "the journal is damaged (file is not a database)" in run.err
    assert card.read_bytes() == before
    assert journal.read_bytes() == journal_before


# ==== other usage errors =======================================================================

@pytest.mark.parametrize("argv", [
    ["tap"],                                     # no CARD
    ["tap", "a.json", "b.json", "--fare", "1"],  # two cards
    ["tap", "{card}", "--fare", "1", "--bogus"],
    ["no-such-command"],
    ["card", "show"],
    ["card", "frobnicate"],
])
def test_usage_errors(farebox, card, argv):
    argv = [str(card) if a == "{card}" else a for a in argv]
    before = card.read_bytes()
    farebox(*argv).assert_bad_input()
    assert card.read_bytes() == before


# ==== properties ===============================================================================

AMOUNT_GRAMMAR = re.compile(r"[0-9]{1,9}(\.[0-9]{1,2})?")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=12))
def test_any_text_that_is_not_a_positive_amount_is_refused(farebox, card, text):
    if AMOUNT_GRAMMAR.fullmatch(text) and any(ch in "123456789" for ch in text):
        return  # a well-formed positive amount: not this test's business
    if "\x00" in text:
        return  # cannot be a command-line argument
    before = card.read_bytes()
    run = farebox("tap", card, f"--fare={text}", "--at", AT, "--state", farebox.state)
    run.assert_bad_input()
    _assert_nothing_changed(farebox, card, before)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cents=st.integers(min_value=-5000, max_value=300_000), style=st.sampled_from(["2", "1", "0"]))
def test_balance_round_trips_as_two_place_decimal(farebox, cents, style):
    units, rest = divmod(abs(cents), 100)
    sign = "-" if cents < 0 else ""
    canonical = f"{sign}{units}.{rest:02d}"
    if style == "1" and rest % 10 == 0:
        text = f"{sign}{units}.{rest // 10}"
    elif style == "0" and rest == 0:
        text = f"{sign}{units}"
    else:
        text = canonical
    path = farebox.path(f"card-{cents}-{style}.json")
    if path.exists():
        path.unlink()
    run = farebox("card", "new", path, "--issued", "2026-01-15", f"--balance={text}")
    assert run.code == 0, run.err
    assert farebox.show(path)["balance"] == canonical


# ==== messages stay on one line ================================================================

@pytest.mark.parametrize("what", ["card", "hotlist", "card-new"])
def test_message_naming_a_path_with_a_newline_is_one_line(farebox, card, what):
    odd = farebox.path("line one\nline two.json")
    if what == "card":
        run = farebox("tap", odd, "--fare", "5.80", "--at", AT, "--state", farebox.state)
    elif what == "hotlist":
        run = farebox("tap", card, "--fare", "5.80", "--at", AT, "--state", farebox.state,
                      "--hotlist", odd)
    else:
        odd.write_text("occupied")
        run = farebox("card", "new", odd, "--issued", "2026-01-15")
    run.assert_bad_input()
    assert not farebox.state.exists()


# ==== a NUL in a configured path (issue 17, item 8) =============================================

@pytest.mark.parametrize("key, value", [
    ("action_list", "a\\u0000b"), ("keys", "file:\\u0000"), ("state", "st\\u0000ate"),
    ("reader", "sim:card\\u0000.json"),
])
@pytest.mark.parametrize("command", [["tap", "--fare", "5.80"], ["add-value", "--amount", "50"]])
def test_a_nul_in_a_configured_path_is_bad_input_naming_the_key(farebox, card, command, key,
                                                                 value):
    config = farebox.path("terminal.toml")
    config.write_text(f'[terminal]\n{key} = "{value}"\n', encoding="utf-8")
    before = card.read_bytes()
    run = farebox(command[0], card, *command[1:], "--at", AT, "--state", farebox.state,
                  "--config", config)
    run.assert_bad_input()
    assert f"terminal.{key}:" in run.err and "NUL" in run.err
    assert card.read_bytes() == before
    assert not farebox.state.exists()


@pytest.mark.parametrize("key", ["action_list", "keys", "state", "reader"])
def test_a_nul_in_a_configured_path_is_bad_input_for_the_daemon(farebox, key):
    value = "file:\\u0000" if key == "keys" else "x\\u0000"
    config = farebox.path("terminal.toml")
    config.write_text(f'[terminal]\n{key} = "{value}"\n', encoding="utf-8")
    run = farebox("run", "--config", config, "--state", farebox.state)
    run.assert_bad_input()
    assert f"terminal.{key}:" in run.err
    assert not farebox.state.exists()
