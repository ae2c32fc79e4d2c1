"""The back office through the CLI, on SQLite and PostgreSQL (docs/clearing.md "Back office"):
service providers and the daily settlement statement (issue 19 item 3), lost cards (item 1).

The records reach the store as the receiver stores a batch once its signature verifies
(``Store.ingest``); everything the back office does is run through ``farebox clearing``."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest

from farebox.clearing.store import Row, Store
from farebox.protocol.settlement import GENESIS_HASH
from farebox.tools.cli import main

RECEIVED = "2026-11-23T00:00:00Z"
KEY = "00" * 32


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        assert self.code == 0, f"exit {self.code}: {self.err!r}"
        return json.loads(self.out)

    def assert_bad_input(self) -> None:
        assert self.code == 2, f"exit {self.code}: {self.out!r} {self.err!r}"
        assert self.out == "" and self.err.count("\n") == 1 and "Traceback" not in self.err


class Cli:
    def __init__(self, capsys, db: str) -> None:
        self.capsys = capsys
        self.db = db

    def __call__(self, *argv: object) -> Run:
        self.capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)

    def clearing(self, command: str, *argv: object) -> Run:
        words = command.split()
        return self("clearing", *words, "--db", self.db, *argv)


def database(request, tmp_path) -> str:
    return (str(tmp_path / "clearing.sqlite3") if request.param == "sqlite"
            else request.getfixturevalue("pg_url"))


class Sender:
    """One enrolled terminal's chained batches, stored as the receiver stores them."""

    def __init__(self, db: str, terminal_id: str) -> None:
        self.db = db
        with Store(db) as store:
            self.id = store.terminal(terminal_id)[0]
        self.seq = 0
        self.number, self.hash = 0, GENESIS_HASH

    def row(self, state: str, card: int, before: int, kind: str, amount: int,
            balance_before: int, balance_after: int, at: str) -> Row:
        self.seq += 1
        return Row(0, self.seq, state, 0, card, before, before + 1, kind, amount,
                   balance_before, balance_after, at, f"{self.id:08x}{self.seq:056x}")

    def send(self, rows: list[Row]) -> None:
        self.number += 1
        digest = f"{self.number:02x}{self.id:062x}"
        for r in rows:
            r.batch_number = self.number
        with Store(self.db) as store:
            store.ingest(self.id, "i", self.number, digest, self.hash, list(rows), RECEIVED)
        self.hash = digest


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request, tmp_path, capsys) -> Cli:
    return Cli(capsys, database(request, tmp_path))


def enroll(cli: Cli, terminal_id: str, provider: str | None = None) -> Sender:
    argv = ["--terminal", terminal_id, "--pubkey", KEY]
    if provider is not None:
        argv += ["--provider", provider]
    assert cli.clearing("enroll", *argv).code == 0
    return Sender(cli.db, terminal_id)


def cents(text: str) -> int:
    units, _, rest = text.lstrip("-").partition(".")
    value = int(units) * 100 + int(rest)
    return -value if text.startswith("-") else value


# -- service providers and the daily statement (issue 19 item 3) --------------------------------

DAY = "2026-11-22"  # Hong Kong: 2026-11-21T16:00:00Z up to 2026-11-22T16:00:00Z


def a_day_of_three_providers(cli: Cli) -> list[tuple[str | None, object]]:
    """Two providers of two and one terminals and a terminal enrolled without one; payments,
    cash and AAVS add values, an issue, a return, records on both edges of the Hong Kong day,
    one left unresolved, one sent in doubt and settled by the card's next change. Every row
    sent, with its terminal's provider."""
    assert cli.clearing("provider add", "Bus Co").code == 0
    assert cli.clearing("provider add", "Shop-2").code == 0
    bus1, bus2 = enroll(cli, "BUS-1", "Bus Co"), enroll(cli, "BUS-2", "Bus Co")
    shop, free = enroll(cli, "SHOP-1", "Shop-2"), enroll(cli, "FREE-1")
    sent: list[tuple[str | None, object]] = []

    def send(sender, provider, *rows):
        sender.send(list(rows))
        sent.extend((provider, r) for r in rows)

    send(bus1, "Bus Co",
         bus1.row("committed", 11111111, 0, "payment", 580, 10_000, 9_420,
                  "2026-11-21T15:59:59.500000Z"),  # the day before, in Hong Kong
         bus1.row("committed", 11111111, 1, "payment", 580, 9_420, 8_840,
                  "2026-11-21T16:00:00Z"),  # 00:00 in Hong Kong: the day's first instant
         bus1.row("committed", 22222222, 0, "payment", 1_230, 5_000, 3_770,
                  "2026-11-21T16:00:00.250000Z"),
         bus1.row("committed", 33333333, 4, "auto_add_value", 25_000, 100, 25_100,
                  "2026-11-22T01:00:00Z"),
         bus1.row("committed", 33333333, 4, "payment", 640, 25_100, 24_460,
                  "2026-11-22T01:00:00Z"))
    send(bus2, "Bus Co",
         bus2.row("committed", 11111111, 2, "payment", 470, 8_840, 8_370,
                  "2026-11-22T15:59:59.999999Z"),  # the day's last instant
         bus2.row("committed", 11111111, 3, "payment", 470, 8_370, 7_900,
                  "2026-11-22T16:00:00Z"),  # the next day
         bus2.row("unresolved", 44444444, 9, "payment", 300, 1_000, 700,
                  "2026-11-22T03:00:00Z"))  # stays open: not summed, counted
    send(shop, "Shop-2",
         shop.row("committed", 22222222, 1, "add_value", 20_000, 3_770, 23_770,
                  "2026-11-22T02:00:00Z"),
         # an issue: deposit, initial value, Personalised admin fee (cash at the counter)
         shop.row("committed", 55555555, 0, "deposit", 5_000, 0, 0, "2026-11-22T04:00:00Z"),
         shop.row("committed", 55555555, 0, "initial_value", 13_000, 0, 13_000,
                  "2026-11-22T04:00:00Z"),
         shop.row("committed", 55555555, 0, "admin_fee", 2_000, 13_000, 13_000,
                  "2026-11-22T04:00:00Z"),
         # a return: deposit back, handling fee, cash refund, cancelled
         shop.row("committed", 66666666, 7, "deposit_refund", 5_000, 15_000, 15_000,
                  "2026-11-22T05:00:00Z"),
         shop.row("committed", 66666666, 7, "handling_fee", 1_100, 15_000, 15_000,
                  "2026-11-22T05:00:00Z"),
         shop.row("committed", 66666666, 7, "refund", 18_900, 15_000, 0,
                  "2026-11-22T05:00:00Z"),
         shop.row("committed", 66666666, 7, "cancel", 0, 0, 0, "2026-11-22T05:00:00Z"))
    # sent in doubt at FREE-1, then the card's next change (at BUS-1) starts from what it left
    send(free, None, free.row("in_doubt", 77777777, 0, "payment", 900, 2_000, 1_100,
                              "2026-11-22T06:00:00Z"))
    send(bus1, "Bus Co", bus1.row("committed", 77777777, 1, "payment", 580, 1_100, 520,
                                  "2026-11-22T07:00:00Z"))
    return sent


def in_day(at: str) -> bool:
    return "2026-11-21T16:00:00" <= at.rstrip("Z") < "2026-11-22T16:00:00"


def test_the_statement_sums_each_providers_settled_records_of_the_hong_kong_day(cli):
    """Every figure is the sum of the rows the terminals sent, settled and inside the Hong
    Kong day, by provider and type, to the cent; the edges of the day are where Hong Kong puts
    them (a record at 16:00:00Z is the day's first, one at 15:59:59.5Z the day before's, even
    though SQLite holds times as text); the record sent in doubt counts once settled; the
    unresolved one is counted as open, not summed."""
    sent = a_day_of_three_providers(cli)
    obj = cli.clearing("statement", "--day", DAY, "--json").json()
    assert (obj["day"], obj["from_utc"], obj["to_utc"]) == (
        DAY, "2026-11-21T16:00:00Z", "2026-11-22T16:00:00Z")

    expected: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for provider, r in sent:
        if in_day(r.at_utc) and r.state in ("committed", "in_doubt"):  # in doubt: settled
            for who in (provider, "TOTAL"):
                expected[who][r.type][0] += 1
                expected[who][r.type][1] += r.amount_cents
    lines = {line["provider"]: line for line in obj["providers"]}
    assert set(lines) == {"Bus Co", "Shop-2", None}
    for who, line in [*lines.items(), ("TOTAL", obj["total"])]:
        got = {k: [v["count"], cents(v["amount"])] for k, v in line["types"].items()}
        assert got == {k: list(v) for k, v in expected[who].items()}, who
    assert lines["Bus Co"]["terminals"] == ["BUS-1", "BUS-2"]
    assert lines[None]["terminals"] == ["FREE-1"]

    bus, shop, free = lines["Bus Co"], lines["Shop-2"], lines[None]
    # Bus Co: payments 5.80 + 12.30 + 6.40 + 4.70 + 5.80; AAVS 250.00 (bank-funded: no cash)
    assert (bus["payments"], bus["aavs_add_values"]) == (
        {"count": 5, "amount": "35.00"}, {"count": 1, "amount": "250.00"})
    assert bus["net"] == "35.00" and bus["open_records"] == 1
    # Shop-2: took 200.00 cash add value, 50.00 + 130.00 + 20.00 at the issue; paid out 189.00
    assert (shop["cash_add_values"]["amount"], shop["deposits"]["amount"],
            shop["initial_values"]["amount"], shop["cash_fees"], shop["refunds"]["amount"],
            shop["fees"]) == ("200.00", "50.00", "130.00", "20.00", "189.00",
                              {"count": 2, "amount": "31.00"})
    assert shop["net"] == "-211.00"  # 189.00 - 200.00 - 50.00 - 130.00 - 20.00
    assert free["payments"] == {"count": 1, "amount": "9.00"} and free["net"] == "9.00"
    # netted across providers: the total's net is the sum of the providers'
    assert obj["total"]["net"] == "-167.00" == f"{(3_500 - 21_100 + 900) / 100:.2f}"
    assert obj["total"]["open_records"] == 1


def test_the_statement_equals_the_receivers_kept_totals_to_the_cent(cli):
    """The receiver's own day totals (``clearing report``, UTC days) of the two UTC days the
    Hong Kong day spans, less the records outside it, are the statement's totals."""
    sent = a_day_of_three_providers(cli)
    total = cli.clearing("statement", "--day", DAY, "--json").json()["total"]
    report = cli.clearing("report", "--from", "2026-11-21", "--to", "2026-11-22",
                          "--json").json()["totals"]["committed"]
    kept = {k: [v["count"], cents(v["amount"])] for k, v in report.items()}
    for _, r in sent:
        if r.state == "committed" and not in_day(r.at_utc) and r.at_utc[:10] in (
                "2026-11-21", "2026-11-22"):
            kept[r.type][0] -= 1
            kept[r.type][1] -= r.amount_cents
    assert {k: [v["count"], cents(v["amount"])] for k, v in total["types"].items()} == {
        k: v for k, v in kept.items() if v[0]}


def test_the_statement_as_csv_and_for_one_provider(cli):
    a_day_of_three_providers(cli)
    full = cli.clearing("statement", "--day", DAY, "--json").json()
    done = cli.clearing("statement", "--day", DAY, "--csv")
    assert done.code == 0, done.err
    rows = list(csv.DictReader(io.StringIO(done.out)))
    assert [r["provider"] for r in rows] == ["Bus Co", "Shop-2", "(none)", "TOTAL"]
    for row, line in zip(rows, [*full["providers"], full["total"]]):
        assert row["net"] == line["net"] and row["payments"] == line["payments"]["amount"]
        assert row["refunds_count"] == str(line["refunds"]["count"])
    for column in ("payments", "cash_add_values", "aavs_add_values", "deposits",
                   "initial_values", "fees", "refunds", "cash_fees", "net"):
        assert sum(cents(r[column]) for r in rows[:-1]) == cents(rows[-1][column]), column
    one = cli.clearing("statement", "--day", DAY, "--provider", "Shop-2", "--json").json()
    assert [line["provider"] for line in one["providers"]] == ["Shop-2"]
    assert one["providers"][0] == full["providers"][1] and one["total"] == full["total"]
    # another day holds nothing; the providers are still listed, with nothing
    empty = cli.clearing("statement", "--day", "2026-11-24", "--json").json()
    assert [(line["provider"], line["net"]) for line in empty["providers"]] == [
        ("Bus Co", "0.00"), ("Shop-2", "0.00")]


def test_providers_are_listed_and_bad_requests_are_one_line(cli):
    assert cli.clearing("provider add", "Bus Co").code == 0
    cli.clearing("provider add", "Bus Co").assert_bad_input()
    cli.clearing("provider add", "-x").assert_bad_input()
    enroll(cli, "BUS-1", "Bus Co")
    refused = cli.clearing("enroll", "--terminal", "BUS-9", "--pubkey", KEY, "--provider",
                           "Nobody")
    refused.assert_bad_input()
    assert "no provider Nobody" in refused.err
    assert cli.clearing("provider list", "--json").json() == {
        "providers": [{"provider": "Bus Co", "terminals": ["BUS-1"]}]}
    assert Store(cli.db).terminal("BUS-9") is None  # nothing was enrolled
    cli.clearing("statement", "--day", DAY, "--provider", "Nobody").assert_bad_input()
    cli.clearing("statement", "--day", DAY, "--csv", "--json").assert_bad_input()


# -- lost cards (issue 19 item 1) ----------------------------------------------------------------

LOST = 12345678
REPORTED = "2026-11-22T10:00:00+08:00"  # 02:00Z; blocked from 05:00Z


def test_a_lost_card_is_refunded_once_from_its_value_as_of_the_block(cli):
    """Deposit + the value as of the block - HK$50 (On-Loan, 002 §18(c)): the last settled
    state before the report, plus a write inside the window that was left unresolved and only
    settled by a later batch (the refund waits for it), but not a write after the block (a
    terminal that had not fetched the list: the card company's loss, 004 §31)."""
    bus, shop = enroll(cli, "BUS-1"), enroll(cli, "SHOP-1")
    bus.send([bus.row("committed", LOST, 0, "payment", 1_000, 20_000, 19_000,
                      "2026-11-22T01:00:00Z")])
    reported = cli.clearing("lost report", "--card", f"{LOST}", "--kind", "on-loan", "--at",
                            REPORTED, "--json").json()
    assert reported == {"card": "12345678", "kind": "on_loan",
                        "reported_utc": "2026-11-22T02:00:00Z",
                        "blocked_utc": "2026-11-22T05:00:00Z", "serial": 1}
    with Store(cli.db) as store:
        assert store.actions() == (1, [(LOST, "lost", "2026-11-22T02:00:00Z")])
    cli.clearing("lost report", "--card", f"{LOST}", "--kind", "on-loan").assert_bad_input()

    early = cli.clearing("lost refund", "--card", f"{LOST}", "--at", "2026-11-22T04:59:59Z")
    early.assert_bad_input()
    assert "blocked from 2026-11-22T05:00:00Z" in early.err
    # inside the window the card was used twice at the shop; the first write's fate is unknown
    shop.send([shop.row("unresolved", LOST, 1, "payment", 2_000, 19_000, 17_000,
                        "2026-11-22T03:00:00Z")])
    waiting = cli.clearing("lost refund", "--card", f"{LOST}", "--at", "2026-11-22T06:00:00Z")
    waiting.assert_bad_input()
    assert "still open" in waiting.err
    # the card's next change (at BUS-1) starts from what that write left: it is proved; and a
    # write after the block, approved by a terminal with an old list, does not count
    bus.send([bus.row("committed", LOST, 2, "payment", 500, 17_000, 16_500,
                      "2026-11-22T04:30:00Z"),
              bus.row("committed", LOST, 3, "payment", 700, 16_500, 15_800,
                      "2026-11-22T05:30:00Z")])
    refund = cli.clearing("lost refund", "--card", f"{LOST}", "--at", "2026-11-22T06:00:00Z",
                          "--json").json()
    assert {k: refund[k] for k in ("value", "deposit", "fee", "negative_offset", "refund",
                                   "owed", "counter")} == {
        "value": "165.00", "deposit": "50.00", "fee": "50.00", "negative_offset": "0.00",
        "refund": "165.00", "owed": "0.00", "counter": 3}
    again = cli.clearing("lost refund", "--card", f"{LOST}", "--at", "2026-11-22T07:00:00Z")
    again.assert_bad_input()
    assert "refunded already" in again.err
    listed = cli.clearing("lost list", "--json").json()["lost"]
    assert [(c["card"], c["refund"], c["refunded_utc"]) for c in listed] == [
        ("12345678", "165.00", "2026-11-22T06:00:00Z")]


@pytest.mark.parametrize("kind, balance, refund, owed, offset", [
    ("on-loan", 13_900, "139.00", "0.00", "0.00"),  # 50.00 + 139.00 - 50.00
    ("on-loan", -2_000, "0.00", "20.00", "20.00"),  # the fee takes the deposit; -20.00 owed
    ("mobile", -2_000, "10.00", "0.00", "20.00"),  # 50.00 - 20.00 - 20.00 (002 §18(d))
    ("sold", 1_000, "0.00", "10.00", "0.00"),  # no deposit; HK$20 fee from 10.00 of value
    ("sold", 5_000, "30.00", "0.00", "0.00"),
])
def test_the_lost_card_fee_and_a_negative_value_by_kind(cli, kind, balance, refund, owed,
                                                        offset):
    bus = enroll(cli, "BUS-1")
    bus.send([bus.row("committed", LOST, 0, "payment", 100, balance + 100, balance,
                      "2026-11-22T01:00:00Z")])
    cli.clearing("lost report", "--card", f"{LOST}", "--kind", kind, "--at", REPORTED,
                 "--json").json()
    got = cli.clearing("lost refund", "--card", f"{LOST}", "--at", "2026-11-22T05:00:00Z",
                       "--json").json()
    assert (got["refund"], got["owed"], got["negative_offset"]) == (refund, owed, offset)


def test_lost_card_requests_refused_as_given(cli):
    cli.clearing("lost refund", "--card", f"{LOST}").assert_bad_input()  # not reported
    cli.clearing("lost report", "--card", "1234", "--kind", "sold").assert_bad_input()
    cli.clearing("lost report", "--card", f"{LOST}", "--kind", "sold", "--at",
                 "2026-11-22 10:00").assert_bad_input()  # no offset
    # a card with no settled record kept: its value is not known here
    cli.clearing("lost report", "--card", f"{LOST}", "--kind", "sold", "--at", REPORTED,
                 "--json").json()
    unknown = cli.clearing("lost refund", "--card", f"{LOST}", "--at", "2026-11-23T00:00:00Z")
    unknown.assert_bad_input()
    assert "no settled record" in unknown.err
    assert cli.clearing("lost list", "--json").json()["lost"][0]["refunded_utc"] is None


def test_a_card_listed_cancelled_stays_cancelled_when_reported_lost(cli):
    assert cli("clearing", "action", "--db", cli.db, "--card", f"{LOST}", "--reason",
               "cancelled", "--at", "2026-11-21T00:00:00Z").code == 0
    reported = cli.clearing("lost report", "--card", f"{LOST}", "--kind", "on-loan", "--at",
                            REPORTED, "--json").json()
    assert reported["serial"] is None
    with Store(cli.db) as store:
        assert store.actions() == (1, [(LOST, "cancelled", "2026-11-21T00:00:00Z")])


# -- AAVS, the bank side (issue 19 item 2) --------------------------------------------------------

CARD_A, CARD_B, CARD_C = 11111111, 22222222, 33333333


def test_aavs_debit_files_per_institution_and_a_dishonour_suspends_then_cancels(cli, tmp_path):
    """A day's settled AAVS reloads and the AAVS fee charged to the account become one debit
    file per financial institution (H, D..., T with the count and total), made again the same;
    a reload of a card with no linked account is said, not debited. A returned debit: the card
    owes it and is listed aavs_suspended; a further one cancels it, its value applied and its
    deposit forfeited (004 §20-21); a file imported twice changes nothing the second time; a
    file naming a debit never sent is refused whole."""
    bus = enroll(cli, "BUS-1")
    for card, institution, account in ((CARD_A, "HSBC", "004-111"), (CARD_B, "BOC", "012-222")):
        assert cli.clearing("aavs link", "--card", card, "--institution", institution,
                            "--account", account).code == 0
    rows = [bus.row("committed", CARD_A, 0, "deposit", 5_000, 0, 0, "2026-11-20T01:00:00Z"),
            bus.row("committed", CARD_A, 4, "auto_add_value", 25_000, 100, 25_100,
                    "2026-11-21T15:59:59Z"),  # the day before, in Hong Kong
            bus.row("committed", CARD_A, 5, "auto_add_value", 25_000, 100, 25_100,
                    "2026-11-22T01:00:00Z"),
            bus.row("committed", CARD_A, 5, "payment", 600, 25_100, 24_500,
                    "2026-11-22T01:00:00Z"),
            bus.row("committed", CARD_B, 0, "auto_add_value", 50_000, -300, 49_700,
                    "2026-11-22T02:00:00Z"),
            bus.row("committed", CARD_C, 0, "auto_add_value", 15_000, 0, 15_000,
                    "2026-11-22T03:00:00Z"),
            bus.row("committed", CARD_A, 6, "aavs_reactivation_fee", 2_000, 24_500, 24_500,
                    "2026-11-22T04:00:00Z")]
    bus.send(rows)
    out = tmp_path / "debits"
    before = cli.clearing("aavs debits", "--day", "2026-11-21", "--out", out, "--json").json()
    assert [(f["institution"], f["debits"], f["amount"]) for f in before["files"]] == [
        ("HSBC", 1, "250.00")]
    made = cli.clearing("aavs debits", "--day", DAY, "--out", out, "--json").json()
    assert [(f["institution"], f["debits"], f["amount"]) for f in made["files"]] == [
        ("BOC", 1, "500.00"), ("HSBC", 2, "270.00")]
    assert made["late"] == 0
    assert made["unlinked"] == [{"reference": "BUS-1:i:6", "card": "33333333",
                                 "amount": "150.00"}]
    hsbc = (out / "aavs-debits-2026-11-22-HSBC.txt").read_text().splitlines()
    assert hsbc[0].startswith("H,HSBC,2026-11-22,")
    assert hsbc[1:] == ["D,BUS-1:i:3,004-111,11111111,reload,250.00,2026-11-22T01:00:00Z",
                        "D,BUS-1:i:7,004-111,11111111,fee,20.00,2026-11-22T04:00:00Z",
                        "T,2,270.00"]
    again = cli.clearing("aavs debits", "--day", DAY, "--out", out, "--json").json()
    assert [(f["institution"], f["debits"], f["amount"]) for f in again["files"]] == [
        ("BOC", 1, "500.00"), ("HSBC", 2, "270.00")]

    returned = tmp_path / "returned.txt"
    returned.write_text("# HSBC returns of 2026-11-22\nR,BUS-1:i:3,insufficient funds\n")
    first = cli.clearing("aavs dishonour", returned, "--at", "2026-11-23T02:00:00Z",
                         "--json").json()
    assert (first["dishonoured"], first["suspended"], first["cancelled"]) == (
        ["BUS-1:i:3"], ["11111111"], [])
    with Store(cli.db) as store:
        serial, entries = store.actions()
    assert entries == [(CARD_A, "aavs_suspended", "2026-11-23T02:00:00Z")]
    owing = cli.clearing("aavs list", "--json").json()["outstanding"]
    assert [(c["card"], c["outstanding"], c["dishonours"], c["cancelled_utc"]) for c in owing
            ] == [("11111111", "250.00", 1, None)]
    twice = cli.clearing("aavs dishonour", returned, "--json").json()
    assert (twice["dishonoured"], twice["again"], "serial" in twice) == ([], ["BUS-1:i:3"],
                                                                         False)
    bad = tmp_path / "bad.txt"
    bad.write_text("R,BUS-1:i:7,closed\nR,BUS-1:i:99,closed\n")
    refused = cli.clearing("aavs dishonour", bad)
    refused.assert_bad_input()
    assert "BUS-1:i:99" in refused.err
    assert cli.clearing("aavs list", "--json").json()["outstanding"][0]["outstanding"] == "250.00"
    # the fee's debit comes back too: a further dishonour cancels the card (004 §21)
    bad.write_text("R,BUS-1:i:7,account closed\n")
    second = cli.clearing("aavs dishonour", bad, "--at", "2026-11-24T02:00:00Z",
                          "--json").json()
    assert second["cancelled"] == ["11111111"] and second["serial"] == serial + 1
    owing = cli.clearing("aavs list", "--json").json()["outstanding"][0]
    # owed 250.00 + 20.00; the card's last settled value, 245.00, applied; 25.00 left
    assert (owing["outstanding"], owing["value_applied"], owing["deposit_forfeited"],
            owing["cancelled_utc"]) == ("25.00", "245.00", "50.00", "2026-11-24T02:00:00Z")
    with Store(cli.db) as store:
        assert store.actions()[1] == [(CARD_A, "cancelled", "2026-11-24T02:00:00Z")]


def test_aavs_requests_refused_as_given(cli, tmp_path):
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HS BC", "--account",
                 "1").assert_bad_input()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    cli.clearing("aavs dishonour", empty).assert_bad_input()
    empty.write_text("X,1,2\n")
    garbled = cli.clearing("aavs dishonour", empty)
    garbled.assert_bad_input()
    assert "line 1" in garbled.err
    cli.clearing("aavs dishonour", tmp_path / "missing.txt").assert_bad_input()
    empty.write_bytes(b"R,\xff,x\n")
    cli.clearing("aavs dishonour", empty).assert_bad_input()


# -- a simulated day: the statement against the cards' value movements ---------------------------


def test_a_simulated_day_balances_to_the_cent_against_the_cards_value_movements(cli, tmp_path):
    """Several providers, a card issued and one returned, cash and AAVS add values, a card
    reported lost and refunded centrally, an AAVS debit dishonoured and then collected at a
    service terminal. The cards' stored value
    moved by exactly what the statement says came in (cash and AAVS add values, initial values)
    less what went out (payments, the value of returned cards); the lost card's refund is its
    value at the block; the AAVS debits are the AAVS add values, and the dishonour is counted."""
    for name in ("Bus", "Shop"):
        assert cli.clearing("provider add", name).code == 0
    bus1, bus2, shop = enroll(cli, "BUS-1", "Bus"), enroll(cli, "BUS-2", "Bus"), enroll(
        cli, "SHOP-1", "Shop")
    aavs, cash, lost, new, back = 41111111, 42222222, 43333333, 44444444, 45555555
    assert cli.clearing("aavs link", "--card", aavs, "--institution", "HSBC", "--account",
                        "004-1").code == 0
    sent = []

    def send(sender, *rows):
        sender.send(list(rows))
        sent.extend(rows)

    send(bus1,
         bus1.row("committed", aavs, 3, "auto_add_value", 25_000, 200, 25_200,
                  "2026-11-22T00:30:00Z"),
         bus1.row("committed", aavs, 3, "payment", 580, 25_200, 24_620, "2026-11-22T00:30:00Z"),
         bus1.row("committed", lost, 8, "payment", 1_000, 9_000, 8_000, "2026-11-22T01:00:00Z"))
    send(shop,
         shop.row("committed", cash, 2, "add_value", 10_000, 500, 10_500, "2026-11-22T01:10:00Z"),
         shop.row("committed", new, 0, "deposit", 5_000, 0, 0, "2026-11-22T01:20:00Z"),
         shop.row("committed", new, 0, "initial_value", 15_000, 0, 15_000,
                  "2026-11-22T01:20:00Z"),
         shop.row("committed", back, 6, "deposit_refund", 5_000, 12_000, 12_000,
                  "2026-11-22T01:30:00Z"),
         shop.row("committed", back, 6, "handling_fee", 1_100, 12_000, 12_000,
                  "2026-11-22T01:30:00Z"),
         shop.row("committed", back, 6, "refund", 15_900, 12_000, 0, "2026-11-22T01:30:00Z"),
         shop.row("committed", back, 6, "cancel", 0, 0, 0, "2026-11-22T01:30:00Z"))
    cli.clearing("lost report", "--card", lost, "--kind", "on-loan", "--at",
                 "2026-11-22T10:00:00+08:00", "--json").json()  # blocked from 05:00Z
    send(bus2,
         bus2.row("committed", lost, 9, "payment", 470, 8_000, 7_530, "2026-11-22T03:00:00Z"),
         bus2.row("committed", cash, 3, "payment", 470, 10_500, 10_030, "2026-11-22T04:00:00Z"),
         bus2.row("committed", new, 1, "payment", 470, 15_000, 14_530, "2026-11-22T05:00:00Z"))
    refund = cli.clearing("lost refund", "--card", lost, "--at", "2026-11-22T06:00:00Z",
                          "--json").json()
    cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path / "out", "--json").json()
    (tmp_path / "back.txt").write_text("R,BUS-1:i:1,insufficient funds\n")
    assert cli.clearing("aavs dishonour", tmp_path / "back.txt", "--json").json()[
        "suspended"] == ["41111111"]
    # the holder pays what is owed at the shop's service terminal, which reactivates the card
    send(shop, *(shop.row("committed", aavs, 4, kind, amount, 24_620, 24_620,
                          "2026-11-22T07:00:00Z")
                 for kind, amount in (("aavs_outstanding_paid", 25_000),
                                      ("aavs_reactivation_fee", 2_000), ("reactivate", 0))))
    obj = cli.clearing("statement", "--day", DAY, "--json").json()

    # the cards' value movements, write by write, from what the terminals sent
    writes: dict = {}
    for r in sorted(sent, key=lambda r: (r.source, r.seq)):
        key = (r.source, r.at_utc, r.counter_before)
        first = writes.setdefault(key, [r.card_number, r.balance_before_cents, 0])
        first[2] = r.balance_after_cents
    moved = sum(after - before for _, before, after in writes.values())
    t = {k: cents(v["amount"]) for k, v in obj["total"]["types"].items()}
    came_in = t["add_value"] + t["auto_add_value"] + t["initial_value"]
    went_out = t["payment"] + (t["refund"] + t["handling_fee"] - t["deposit_refund"])
    assert moved == came_in - went_out == 25_000 + 10_000 + 15_000 - 2_990 - 12_000
    # every type's total is the batches' to the cent, and the lines add up to it
    sums: dict = defaultdict(int)
    for r in sent:
        sums[r.type] += r.amount_cents
    assert t == dict(sums)
    for column in ("payments", "cash_add_values", "aavs_add_values", "refunds", "fees",
                   "aavs_collected"):
        assert sum(cents(line[column]["amount"]) for line in obj["providers"]) == cents(
            obj["total"][column]["amount"]), column
    assert sum(cents(line["net"]) for line in obj["providers"]) == cents(obj["total"]["net"])
    # the lost card: its value at the block is where its writes before the block left it
    lost_value = 9_000 + sum(after - before for (_, at, _), (card, before, after)
                             in writes.items() if card == lost and at < "2026-11-22T05:00")
    assert cents(refund["value"]) == lost_value == 7_530
    assert obj["central"]["lost_card_refunds"] == {"count": 1, "amount": "75.30"}
    assert obj["central"]["lost_card_fees"] == "50.00"
    # AAVS: the debits are the AAVS add values; the one dishonoured is counted
    assert obj["central"]["aavs_debits"] == {"count": 1, "amount": "250.00"} and cents(
        obj["central"]["aavs_debits"]["amount"]) == t["auto_add_value"]
    assert obj["central"]["aavs_dishonoured"] == {"count": 1, "amount": "250.00"}
    # what was dishonoured was collected, at the shop: owed by it, and the card owes nothing
    [shop_line] = [line for line in obj["providers"] if line["provider"] == "Shop"]
    assert shop_line["aavs_collected"] == obj["central"]["aavs_dishonoured"]
    assert cli.clearing("aavs list", "--json").json()["outstanding"][0]["outstanding"] == "0.00"


def test_a_dishonour_leaves_a_card_listed_lost_as_it_is(cli, tmp_path):
    bus = enroll(cli, "BUS-1")
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    bus.send([bus.row("committed", CARD_A, 0, "auto_add_value", 15_000, 0, 15_000,
                      "2026-11-22T01:00:00Z")])
    cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    cli.clearing("lost report", "--card", CARD_A, "--kind", "on-loan", "--at", REPORTED,
                 "--json").json()
    (tmp_path / "r.txt").write_text("R,BUS-1:i:1,refused\n")
    done = cli.clearing("aavs dishonour", tmp_path / "r.txt", "--json").json()
    assert (done["dishonoured"], done["suspended"], "serial" in done) == (["BUS-1:i:1"], [],
                                                                          False)
    with Store(cli.db) as store:
        assert store.actions()[1] == [(CARD_A, "lost", "2026-11-22T02:00:00Z")]
    assert cli.clearing("aavs list", "--json").json()["outstanding"][0]["outstanding"] == "150.00"


def test_aavs_suspensions_are_numbered_released_when_collected_and_a_switch_costs_a_fee(
        cli, tmp_path):
    """A switch of financial institution costs HK$20, deducted by the new institution (001):
    a debit line in its file; another account at the same institution costs nothing. The
    debits of one card returned in one file are one dishonour: the card is listed suspended
    with what it owes and suspension number 1. A service terminal's collection, settled,
    clears the amount and takes the card off the list; a later dishonour suspends it again
    (number 2, not a cancellation: it owed nothing); one more while it owes cancels it."""
    bus, shop = enroll(cli, "BUS-1"), enroll(cli, "SHOP-1")

    def link(institution, account, at):
        return cli.clearing("aavs link", "--card", CARD_A, "--institution", institution,
                            "--account", account, "--at", at, "--json").json()

    assert link("HSBC", "004-1", "2026-11-20T00:00:00Z")["switch_fee"] is None
    assert link("HSBC", "004-2", "2026-11-21T00:00:00Z")["switch_fee"] is None
    switched = link("BOC", "012-1", "2026-11-22T02:00:00Z")
    assert (switched["switched_from"], switched["switch_fee"], switched["switch_reference"]) == (
        "HSBC", "20.00", "switch:11111111:2026-11-22T02:00:00Z")
    bus.send([bus.row("committed", CARD_A, 4, "auto_add_value", 25_000, 100, 25_100,
                      "2026-11-22T01:00:00Z"),
              bus.row("committed", CARD_A, 4, "payment", 600, 25_100, 24_500,
                      "2026-11-22T01:00:00Z"),
              bus.row("committed", CARD_A, 5, "aavs_reactivation_fee", 2_000, 24_500, 24_500,
                      "2026-11-22T03:00:00Z")])
    made = cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    assert [(f["institution"], f["debits"], f["amount"]) for f in made["files"]] == [
        ("BOC", 3, "290.00")]
    lines = (tmp_path / "aavs-debits-2026-11-22-BOC.txt").read_text().splitlines()
    assert lines[1:] == [
        "D,BUS-1:i:1,012-1,11111111,reload,250.00,2026-11-22T01:00:00Z",
        "D,switch:11111111:2026-11-22T02:00:00Z,012-1,11111111,switch_fee,20.00,"
        "2026-11-22T02:00:00Z",
        "D,BUS-1:i:3,012-1,11111111,fee,20.00,2026-11-22T03:00:00Z",
        "T,3,290.00"]

    returned = tmp_path / "returned.txt"
    returned.write_text("R,BUS-1:i:1,insufficient funds\nR,BUS-1:i:3,insufficient funds\n")
    first = cli.clearing("aavs dishonour", returned, "--at", "2026-11-23T01:00:00Z",
                         "--json").json()
    assert (first["suspended"], first["cancelled"]) == (["11111111"], [])
    with Store(cli.db) as store:
        serial, entries = store.action_details()
    assert entries == [(CARD_A, "aavs_suspended", "2026-11-23T01:00:00Z", 27_000, 1)]

    # collected at a service terminal; settled, the card owes nothing and leaves the list
    shop.send([shop.row("committed", CARD_A, 6, kind, amount, 24_500, 24_500,
                        "2026-11-23T02:00:00Z")
               for kind, amount in (("aavs_outstanding_paid", 27_000),
                                    ("aavs_reactivation_fee", 2_000), ("reactivate", 0))])
    with Store(cli.db) as store:
        assert store.action_details() == (serial + 1, [])
    [owing] = cli.clearing("aavs list", "--json").json()["outstanding"]
    assert (owing["outstanding"], owing["paid"], owing["dishonours"], owing["suspensions"]) == (
        "0.00", "270.00", 1, 1)

    returned.write_text("R,switch:11111111:2026-11-22T02:00:00Z,account closed\n")
    again = cli.clearing("aavs dishonour", returned, "--at", "2026-11-24T01:00:00Z",
                         "--json").json()
    assert (again["suspended"], again["cancelled"]) == (["11111111"], [])
    with Store(cli.db) as store:
        assert store.action_details()[1] == [
            (CARD_A, "aavs_suspended", "2026-11-24T01:00:00Z", 2_000, 2)]

    cli.clearing("aavs debits", "--day", "2026-11-23", "--out", tmp_path, "--json").json()
    returned.write_text("R,SHOP-1:i:2,account closed\n")  # the re-activation fee's debit
    last = cli.clearing("aavs dishonour", returned, "--at", "2026-11-25T01:00:00Z",
                        "--json").json()
    assert last["cancelled"] == ["11111111"]
    [owing] = cli.clearing("aavs list", "--json").json()["outstanding"]
    # owed 20.00 + 20.00; the card's last settled value, 245.00, applied to it
    assert (owing["outstanding"], owing["value_applied"], owing["cancelled_utc"]) == (
        "0.00", "40.00", "2026-11-25T01:00:00Z")


def test_a_collection_sent_in_doubt_counts_once_it_is_settled(cli, tmp_path):
    """A reactivation cut off at the service terminal is sent in doubt: nothing is collected
    at the house until the card's next write proves it landed; then the amount is cleared and
    the card taken off the list; the terminal's own later word changes nothing more."""
    bus, shop = enroll(cli, "BUS-1"), enroll(cli, "SHOP-1")
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    bus.send([bus.row("committed", CARD_A, 4, "auto_add_value", 25_000, 100, 25_100,
                      "2026-11-22T01:00:00Z")])
    cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    (tmp_path / "r.txt").write_text("R,BUS-1:i:1,refused\n")
    assert cli.clearing("aavs dishonour", tmp_path / "r.txt", "--at", "2026-11-23T01:00:00Z",
                        "--json").json()["suspended"] == ["11111111"]

    def reactivation(state):
        return [shop.row(state, CARD_A, 5, kind, amount, 25_100, 25_100, "2026-11-23T02:00:00Z")
                for kind, amount in (("aavs_outstanding_paid", 25_000),
                                     ("aavs_reactivation_fee", 2_000), ("reactivate", 0))]

    shop.send(reactivation("in_doubt"))
    owing = cli.clearing("aavs list", "--json").json()["outstanding"][0]
    assert (owing["outstanding"], owing["paid"]) == ("250.00", "0.00")
    with Store(cli.db) as store:
        serial, entries = store.action_details()
    assert len(entries) == 1
    bus.send([bus.row("committed", CARD_A, 6, "payment", 600, 25_100, 24_500,
                      "2026-11-23T03:00:00Z")])  # the next write: the reactivation landed
    owing = cli.clearing("aavs list", "--json").json()["outstanding"][0]
    assert (owing["outstanding"], owing["paid"]) == ("0.00", "250.00")
    with Store(cli.db) as store:
        assert store.action_details() == (serial + 1, [])
    shop.seq = 0  # the terminal's word on the same records: settled as sent
    shop.send(reactivation("committed"))
    owing = cli.clearing("aavs list", "--json").json()["outstanding"][0]
    assert (owing["outstanding"], owing["paid"]) == ("0.00", "250.00")


def dishonour(cli, tmp_path, sender, card, cents, at, name="r.txt") -> dict:
    """One settled AAVS reload of ``card`` debited and returned: the import's outcome."""
    sender.send([sender.row("committed", card, 100 + sender.seq, "auto_add_value", cents, 0,
                            cents, "2026-11-22T01:00:00Z")])
    cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    (tmp_path / name).write_text(f"R,{sender.id_text}:i:{sender.seq},refused\n")
    return cli.clearing("aavs dishonour", tmp_path / name, "--at", at, "--json").json()


def test_a_suspension_put_on_the_list_by_hand_stays_as_it_is(cli, tmp_path):
    """A dishonour never replaces an operator's own AAVS suspension (no number: only the
    house takes it off), though the card owes the amount."""
    bus = enroll(cli, "BUS-1")
    bus.id_text = "BUS-1"
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    cli.clearing("action", "--card", CARD_A, "--reason", "aavs_suspended", "--at",
                 "2026-11-22T00:00:00Z", "--json").json()
    done = dishonour(cli, tmp_path, bus, CARD_A, 15_000, "2026-11-23T01:00:00Z")
    assert (done["suspended"], done["cancelled"], "serial" in done) == ([], [], False)
    with Store(cli.db) as store:
        assert store.action_details()[1] == [
            (CARD_A, "aavs_suspended", "2026-11-22T00:00:00Z", None, None)]
    assert cli.clearing("aavs list", "--json").json()["outstanding"][0]["outstanding"] == \
        "150.00"


def test_the_256th_suspension_is_listed_without_a_number(cli, tmp_path):
    """The card keeps the number in one byte: past 255 the entry has none, so no terminal can
    release it (a card released from 255 would otherwise never be suspended again)."""
    bus = enroll(cli, "BUS-1")
    bus.id_text = "BUS-1"
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    with Store(cli.db) as store, store._transaction() as db:  # noqa: SLF001 - 255 suspensions
        db.execute("INSERT INTO aavs_outstanding (card_number, outstanding_cents, dishonours, "
                   "last_utc, suspensions) VALUES (?, 0, 255, ?, 255)",
                   (CARD_A, db.time("2026-11-21T00:00:00Z")))
    done = dishonour(cli, tmp_path, bus, CARD_A, 15_000, "2026-11-23T01:00:00Z")
    assert done["suspended"] == ["11111111"]
    with Store(cli.db) as store:
        assert store.action_details()[1] == [
            (CARD_A, "aavs_suspended", "2026-11-23T01:00:00Z", None, None)]


def test_a_collection_on_its_way_is_not_owed_and_one_past_a_cancellation_is_due_back(
        cli, tmp_path):
    """A dishonour while a collection is in doubt (the card was reactivated, the house cannot
    yet tell) suspends the card again for the new amount rather than cancelling it; a card
    cancelled before its collection reached the house shows the collection as due back."""
    bus, shop = enroll(cli, "BUS-1"), enroll(cli, "SHOP-1")
    bus.id_text = "BUS-1"
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    assert dishonour(cli, tmp_path, bus, CARD_A, 15_000, "2026-11-23T01:00:00Z")[
        "suspended"] == ["11111111"]
    shop.send([shop.row("in_doubt", CARD_A, 200, kind, amount, 0, 0, "2026-11-23T02:00:00Z")
               for kind, amount in (("aavs_outstanding_paid", 15_000), ("reactivate", 0))])
    again = dishonour(cli, tmp_path, bus, CARD_A, 25_000, "2026-11-24T01:00:00Z", "s.txt")
    assert (again["suspended"], again["cancelled"]) == (["11111111"], [])
    with Store(cli.db) as store:
        assert store.action_details()[1] == [
            (CARD_A, "aavs_suspended", "2026-11-24T01:00:00Z", 25_000, 2)]

    # another card, with HK$500 on it: a collection of its first debit made at a counter but
    # not yet uploaded when the second debit comes back: the house cancels the card and takes
    # what it owes from its value; the collection, arriving after, is due back to the holder
    cli.clearing("aavs link", "--card", CARD_B, "--institution", "HSBC", "--account", "2")
    bus.send([bus.row("committed", CARD_B, 10, "auto_add_value", 10_000, 0, 10_000,
                      "2026-11-22T02:00:00Z"),
              bus.row("committed", CARD_B, 11, "auto_add_value", 10_000, 10_000, 20_000,
                      "2026-11-22T02:30:00Z"),
              bus.row("committed", CARD_B, 12, "add_value", 30_000, 20_000, 50_000,
                      "2026-11-22T03:00:00Z")])
    first, second = bus.seq - 2, bus.seq - 1
    cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    (tmp_path / "b1.txt").write_text(f"R,BUS-1:i:{first},refused\n")
    assert cli.clearing("aavs dishonour", tmp_path / "b1.txt", "--at", "2026-11-23T01:00:00Z",
                        "--json").json()["suspended"] == ["22222222"]
    (tmp_path / "b2.txt").write_text(f"R,BUS-1:i:{second},refused\n")
    assert cli.clearing("aavs dishonour", tmp_path / "b2.txt", "--at", "2026-11-24T01:00:00Z",
                        "--json").json()["cancelled"] == ["22222222"]
    shop.send([shop.row("committed", CARD_B, 13, kind, amount, 50_000, 50_000,
                        "2026-11-23T02:00:00Z")
               for kind, amount in (("aavs_outstanding_paid", 10_000), ("reactivate", 0))])
    owing = {o["card"]: o for o in cli.clearing("aavs list", "--json").json()["outstanding"]}
    assert (owing["22222222"]["value_applied"], owing["22222222"]["outstanding"],
            owing["22222222"]["refund_due"]) == ("200.00", "0.00", "100.00")


def test_what_a_terminal_refuses_is_never_published_on_a_suspension():
    """The list's amount and number are published only when a terminal takes them (both, in
    its ranges); otherwise the entry goes out as one put on by hand, never as an entry that
    would make every terminal refuse the whole list."""
    from farebox.clearing.service import OUTSTANDING_RANGE, SUSPENSION_RANGE, _suspension
    from farebox.terminal.core.rules import SUSPENSION_MAX
    from farebox.terminal.link.actionlist import MAX_OUTSTANDING_CENTS

    assert OUTSTANDING_RANGE == (1, MAX_OUTSTANDING_CENTS)
    assert SUSPENSION_RANGE == (1, SUSPENSION_MAX)
    assert _suspension("aavs_suspended", 1, 1) == (1, 1)
    for owed, number in ((0, 1), (-3000, 1), (MAX_OUTSTANDING_CENTS + 1, 1), (100, 0),
                         (100, 256), (None, 1), (100, None)):
        assert _suspension("aavs_suspended", owed, number) == (None, None)
    assert _suspension("lost", 100, 1) == (None, None)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_the_list_serial_moves_once_per_change_when_changes_race(engine, request, tmp_path):
    """Receivers, imports and the console move the serial at once: each change gets its own
    (the upsert takes turns on the row), none fails on the key."""
    import threading

    db = str(tmp_path / "c.sqlite3") if engine == "sqlite" else request.getfixturevalue(
        "pg_url")
    with Store(db):
        pass
    serials, errors = [], []

    def work(first):
        try:
            with Store(db) as store:
                for card in range(first, first + 25):
                    serials.append(store.set_action(card, "lost", RECEIVED, RECEIVED))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(serials) == list(range(1, 101))


def test_the_same_returns_imported_twice_at_once_count_once(request, tmp_path, capsys):
    """Two operators import one returned-debits file at the same moment (PostgreSQL, read
    committed): each debit is dishonoured once, the card suspended once, never cancelled."""
    import threading

    from farebox.clearing import office

    cli = Cli(capsys, request.getfixturevalue("pg_url"))
    bus = enroll(cli, "BUS-1")
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    bus.send([bus.row("committed", CARD_A, 4, "auto_add_value", 25_000, 100, 25_100,
                      "2026-11-22T01:00:00Z")])
    cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    outcomes, errors = [], []
    start = threading.Barrier(2)

    def work():
        try:
            with Store(cli.db) as store:
                start.wait()
                outcomes.append(office.import_dishonours(
                    store, "R,BUS-1:i:1,refused\n", datetime(2026, 11, 23, tzinfo=timezone.utc)))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted((o["dishonoured"], o["again"]) for o in outcomes) == [
        ([], ["BUS-1:i:1"]), (["BUS-1:i:1"], [])]
    [owing] = cli.clearing("aavs list", "--json").json()["outstanding"]
    assert (owing["outstanding"], owing["dishonours"], owing["cancelled_utc"]) == (
        "250.00", 1, None)


def test_a_dishonour_that_collections_already_cover_suspends_nothing(cli, tmp_path):
    """Defensive: what a card paid beyond what it owed (a collection the house did not expect)
    covers a later dishonour: the card is not suspended, and no entry with an amount of 0 or
    less is ever listed (a terminal would refuse the whole list)."""
    bus, shop = enroll(cli, "BUS-1"), enroll(cli, "SHOP-1")
    bus.id_text = "BUS-1"
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    shop.send([shop.row("committed", CARD_A, 50, "aavs_outstanding_paid", 20_000, 0, 0,
                        "2026-11-21T02:00:00Z")])
    done = dishonour(cli, tmp_path, bus, CARD_A, 15_000, "2026-11-23T01:00:00Z")
    assert (done["covered"], done["suspended"], "serial" in done) == (["11111111"], [], False)
    with Store(cli.db) as store:
        assert store.action_details()[1] == []
    [owing] = cli.clearing("aavs list", "--json").json()["outstanding"]
    assert (owing["outstanding"], owing["refund_due"]) == ("0.00", "50.00")


def test_a_debit_settled_late_goes_in_the_next_file_and_none_after_a_lost_cards_block(
        cli, tmp_path):
    """A reload uploaded after its day's file was made is in the next file made (once, and
    said as late); a reload dated from a lost card's block on is never debited (004 §31:
    the holder is not liable from then), and said as after_block."""
    bus = enroll(cli, "BUS-1")
    for card in (CARD_A, CARD_B):
        cli.clearing("aavs link", "--card", card, "--institution", "HSBC", "--account", "1")
    bus.send([bus.row("committed", CARD_A, 4, "auto_add_value", 25_000, 0, 25_000,
                      "2026-11-22T01:00:00Z")])
    first = cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    assert [f["debits"] for f in first["files"]] == [1]
    cli.clearing("lost report", "--card", CARD_B, "--kind", "on-loan", "--at",
                 "2026-11-22T10:00:00+08:00", "--json").json()  # blocked from 05:00Z
    bus.send([bus.row("committed", CARD_A, 5, "auto_add_value", 15_000, 0, 15_000,
                      "2026-11-22T03:00:00Z"),  # the 22nd's, uploaded after its file
              bus.row("committed", CARD_B, 9, "auto_add_value", 25_000, 0, 25_000,
                      "2026-11-22T06:00:00Z")])  # after CARD_B's block
    second = cli.clearing("aavs debits", "--day", "2026-11-23", "--out", tmp_path,
                          "--json").json()
    assert (second["late"], [f["debits"] for f in second["files"]]) == (1, [1])
    assert second["after_block"] == [{"reference": "BUS-1:i:3", "card": "22222222",
                                      "amount": "250.00"}]
    text = (tmp_path / "aavs-debits-2026-11-23-HSBC.txt").read_text().splitlines()
    assert text[1] == "D,BUS-1:i:2,1,11111111,reload,150.00,2026-11-22T03:00:00Z"
    again = cli.clearing("aavs debits", "--day", DAY, "--out", tmp_path, "--json").json()
    assert [f["debits"] for f in again["files"]] == [1]  # the 22nd's file: as it was sent
    third = cli.clearing("aavs debits", "--day", "2026-11-24", "--out", tmp_path,
                         "--json").json()
    assert (third["files"], third["late"]) == ([], 0)
    # one more straggler: a day's file made again (here the 23rd's) never takes it; the
    # newest day's does
    bus.send([bus.row("committed", CARD_A, 6, "auto_add_value", 5_000, 0, 5_000,
                      "2026-11-21T03:00:00Z")])
    remade = cli.clearing("aavs debits", "--day", "2026-11-23", "--out", tmp_path,
                          "--json").json()
    assert (remade["late"], [f["debits"] for f in remade["files"]]) == (0, [1])
    newest = cli.clearing("aavs debits", "--day", "2026-11-24", "--out", tmp_path,
                          "--json").json()
    assert (newest["late"], [f["amount"] for f in newest["files"]]) == (1, ["50.00"])


def test_a_lost_card_settled_another_way_is_not_refunded_again(cli, tmp_path):
    """A card whose value went to dishonoured AAVS debits (cancelled, 004 §21), a card returned
    at a service terminal, and a card listed cancelled get no lost-card refund; and a card
    refunded as lost has nothing applied at a later cancellation for dishonour."""
    bus = enroll(cli, "BUS-1")
    bus.id_text = "BUS-1"
    cli.clearing("aavs link", "--card", CARD_A, "--institution", "HSBC", "--account", "1")
    dishonour(cli, tmp_path, bus, CARD_A, 10_000, "2026-11-23T01:00:00Z", "a1.txt")
    assert dishonour(cli, tmp_path, bus, CARD_A, 10_000, "2026-11-23T02:00:00Z", "a2.txt")[
        "cancelled"] == ["11111111"]
    returned = 33333333
    bus.send([bus.row("committed", returned, 6, kind, amount, 12_000, after,
                      "2026-11-22T01:30:00Z")
              for kind, amount, after in (("deposit_refund", 5_000, 12_000),
                                          ("refund", 17_000, 0), ("cancel", 0, 0))])
    forked = 44444444
    bus.send([bus.row("committed", forked, 1, "payment", 100, 5_000, 4_900,
                      "2026-11-22T01:00:00Z")])
    cli.clearing("action", "--card", forked, "--reason", "cancelled", "--at",
                 "2026-11-22T02:00:00Z", "--json").json()
    for card, why in ((CARD_A, "dishonoured AAVS debits"), (returned, "returned at a service"),
                      (forked, "listed cancelled")):
        cli.clearing("lost report", "--card", card, "--kind", "on-loan", "--at",
                     "2026-11-23T10:00:00+08:00", "--json").json()
        refused = cli.clearing("lost refund", "--card", card, "--at", "2026-11-23T06:00:00Z")
        refused.assert_bad_input()
        assert why in refused.err
    assert all(c["refunded_utc"] is None for c in cli.clearing("lost list", "--json").json()[
        "lost"])
    # returned at a terminal with an old list AFTER its block (a finder): the card company's
    # loss, not the holder's (004 §31): the holder is refunded
    found = 55555555
    bus.send([bus.row("committed", found, 3, "payment", 100, 8_000, 7_900,
                      "2026-11-23T01:00:00Z")])
    cli.clearing("lost report", "--card", found, "--kind", "on-loan", "--at",
                 "2026-11-23T10:00:00+08:00", "--json").json()  # blocked from 05:00Z
    bus.send([bus.row("committed", found, 4, kind, amount, 7_900, after,
                      "2026-11-23T05:30:00Z")
              for kind, amount, after in (("deposit_refund", 5_000, 7_900),
                                          ("refund", 12_900, 0), ("cancel", 0, 0))])
    holder = cli.clearing("lost refund", "--card", found, "--at", "2026-11-23T06:00:00Z",
                          "--json").json()
    assert (holder["value"], holder["refund"]) == ("79.00", "79.00")

    # refunded as lost first, then its debits come back: the value is gone already
    cli.clearing("aavs link", "--card", CARD_B, "--institution", "HSBC", "--account", "2")
    dishonour(cli, tmp_path, bus, CARD_B, 10_000, "2026-11-23T01:00:00Z", "b1.txt")
    cli.clearing("lost report", "--card", CARD_B, "--kind", "on-loan", "--at",
                 "2026-11-23T10:00:00+08:00", "--json").json()
    paid = cli.clearing("lost refund", "--card", CARD_B, "--at", "2026-11-23T06:00:00Z",
                        "--json").json()
    assert paid["refund"] == "100.00"  # 50.00 + 100.00 - 50.00
    assert dishonour(cli, tmp_path, bus, CARD_B, 10_000, "2026-11-24T01:00:00Z", "b2.txt")[
        "cancelled"] == ["22222222"]
    owing = {o["card"]: o for o in cli.clearing("aavs list", "--json").json()["outstanding"]}
    assert (owing["22222222"]["value_applied"], owing["22222222"]["deposit_forfeited"],
            owing["22222222"]["outstanding"]) == ("0.00", "0.00", "200.00")


def test_the_kind_named_at_a_loss_report_must_match_the_cards_issue(cli):
    """The deposit and fee follow the kind the operator names; when the card's issue records
    are kept they must agree (a Sold card named Mobile would be refunded a deposit it never
    paid)."""
    shop = enroll(cli, "SHOP-1")
    sold, on_loan = 51111111, 52222222
    shop.send([shop.row("committed", sold, 0, "initial_value", 10_000, 0, 10_000,
                        "2026-11-20T01:00:00Z"),
               shop.row("committed", on_loan, 0, "deposit", 5_000, 0, 0, "2026-11-20T01:00:00Z"),
               shop.row("committed", on_loan, 0, "initial_value", 13_000, 0, 13_000,
                        "2026-11-20T01:00:00Z")])
    for card, kind in ((sold, "mobile"), (sold, "on-loan"), (on_loan, "sold")):
        wrong = cli.clearing("lost report", "--card", card, "--kind", kind)
        wrong.assert_bad_input()
        assert "was issued with a deposit of" in wrong.err
    assert cli.clearing("lost report", "--card", sold, "--kind", "sold").code == 0
    assert cli.clearing("lost report", "--card", on_loan, "--kind", "on-loan").code == 0
    # a number issued again: the latest issue decides (an old On-Loan card's number now on a
    # Sold card is not refunded a deposit)
    again = 53333333
    shop.send([shop.row("committed", again, 0, "deposit", 5_000, 0, 0, "2019-01-01T01:00:00Z"),
               shop.row("committed", again, 0, "initial_value", 13_000, 0, 13_000,
                        "2019-01-01T01:00:00Z"),
               shop.row("committed", again, 0, "initial_value", 10_000, 0, 10_000,
                        "2026-11-20T02:00:00Z")])
    cli.clearing("lost report", "--card", again, "--kind", "on-loan").assert_bad_input()
    assert cli.clearing("lost report", "--card", again, "--kind", "sold").code == 0


def test_bad_days_and_future_times_are_one_line(cli, tmp_path):
    for argv in (["statement", "--day", "0001-01-01"],
                 ["aavs debits", "--day", "9999-12-31", "--out", tmp_path],
                 ["lost report", "--card", CARD_A, "--kind", "sold", "--at",
                  "2199-01-01T00:00:00Z"],
                 ["lost refund", "--card", CARD_A, "--at", "2199-01-01T00:00:00Z"]):
        cli.clearing(argv[0], *argv[1:]).assert_bad_input()


def test_two_operators_refunding_one_lost_card_at_once_pay_it_once(request, capsys):
    """PostgreSQL, read committed: the refund takes the card's lock and marks it refunded only
    if it was not: one of them pays, the others are told it was refunded already."""
    import threading

    from farebox.clearing import office

    cli = Cli(capsys, request.getfixturevalue("pg_url"))
    bus = enroll(cli, "BUS-1")
    bus.send([bus.row("committed", CARD_A, 0, "payment", 1_000, 20_000, 19_000,
                      "2026-11-22T01:00:00Z")])
    cli.clearing("lost report", "--card", CARD_A, "--kind", "on-loan", "--at", REPORTED,
                 "--json").json()
    paid, refused = [], []
    start = threading.Barrier(4)

    def work():
        with Store(cli.db) as store:
            start.wait()
            try:
                paid.append(office.refund_lost(
                    store, CARD_A, datetime(2026, 11, 22, 6, tzinfo=timezone.utc)))
            except office.OfficeError as error:
                refused.append(str(error))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paid) == 1 and paid[0]["refund"] == "190.00"
    assert len(refused) == 3 and all("refunded already" in e for e in refused)
