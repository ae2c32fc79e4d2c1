"""The operator commands from the command line: ``card show|diff|dump|import``, ``octopus
balance``, ``journal list|show``, ``readers`` and ``doctor``, against simulated cards and dumps
written here in each tool's format; the reader paths over nfcpy's UDP link (``farebox sim
serve``) and ``readers`` against a real pcscd with vpcd (``farebox sim pcscd``)."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from farebox.terminal.store.journal import Journal
from farebox.terminal.store.identity import load_identity
from farebox.terminal.store.settlement import Settlement

from ..terminal.test_octopus import (
    PUBLISHED_VECTORS, write_farebot, write_flipper, write_metrodroid,
)
from .conftest import CONSOLE_SCRIPT
from .test_e2e_pcsc import Served as VpcdServed
from .test_e2e_pcsc import pcscd  # noqa: F401 - the fixture: a private pcscd with vpcd
from .test_e2e_udp import Served

AT = "2026-11-22T08:00:00+08:00"
SOON = "2026-11-22T08:05:00+08:00"
FAREBOX = str(CONSOLE_SCRIPT)


@pytest.fixture
def served():
    started = []

    def start(card, *options):
        started.append(Served(card, *options))
        return started[-1]

    yield start
    for server in started:
        server.kill()


# ---- card show ---------------------------------------------------------------------------

def test_card_show_reports_both_slots_and_why_one_is_current(farebox):
    card = farebox.card(balance="20.00", number="12345678")
    first = farebox.show(card)
    assert [s["mac"] for s in first["slots"]] == ["ok", "empty"]
    assert first["purse_slot"] == 0 and "only slot" in first["current_slot_reason"]
    farebox.tap(card, "--fare", "1.50", at=AT)
    shown = farebox.show(card)
    assert shown["balance"] == "18.50" and shown["purse_slot"] == 1  # contract keys stay
    assert [(s["slot"], s["mac"], s["counter"], s["balance"], s["current"])
            for s in shown["slots"]] == [(0, "ok", 1, "20.00", False),
                                         (1, "ok", 2, "18.50", True)]
    assert shown["current_slot_reason"] == "higher counter (2 > 1 in slot 0); both verify"
    assert [b["mac"] for b in shown["log_blocks"]].count("ok") == 2
    assert len(shown["blocks"]) == 14 and shown["identity_mac"] == "ok"
    human = farebox("card", "show", card)
    assert human.code == 0
    for text in ("Purse slots", "higher counter", "History (log ring", "purse slot 1",
                 "12345678(2)", "18.50"):
        assert text in human.out


def test_a_torn_slot_shows_as_a_failing_mac(farebox):
    card = farebox.card(balance="20.00")
    farebox.tap(card, "--fare", "1.50", at=AT)
    obj = json.loads(card.read_text())
    block = bytearray.fromhex(obj["blocks"][5])
    block[15] ^= 0xFF  # the last MAC byte of slot 1
    obj["blocks"][5] = block.hex()
    card.write_text(json.dumps(obj))
    shown = farebox.show(card)
    assert [s["mac"] for s in shown["slots"]] == ["ok", "fails"]
    assert shown["purse_slot"] == 0 and shown["balance"] == "20.00"
    assert shown["current_slot_reason"] == "the only slot that verifies (slot 1 is fails)"


def test_an_invalid_card_says_what_each_slot_holds_in_its_one_line(farebox):
    card = farebox.card(balance="20.00")
    farebox.tap(card, "--fare", "1.50", at=AT)
    obj = json.loads(card.read_text())
    for block in (2, 3, 4, 5):  # both slots' MACs broken
        data = bytearray.fromhex(obj["blocks"][block])
        data[15] ^= 0x01
        obj["blocks"][block] = data.hex()
    card.write_text(json.dumps(obj))
    run = farebox("card", "show", card)
    run.assert_bad_input()
    assert "no valid purse" in run.err and "slot 0 MAC fails; slot 1 MAC fails" in run.err


@pytest.mark.parametrize("argv", [["card", "show"], ["card", "show", "{card}", "--reader",
                                                     "udp:127.0.0.1:9"]])
def test_card_show_needs_exactly_one_source(farebox, argv):
    card = farebox.card()
    farebox(*[str(card) if a == "{card}" else a for a in argv]).assert_bad_input()


# ---- card diff ---------------------------------------------------------------------------

def test_card_diff_before_and_after_a_tap(farebox, tmp_path):
    card = farebox.card(balance="20.00")
    before = tmp_path / "before.json"
    before.write_bytes(card.read_bytes())
    same = farebox("card", "diff", before, card, "--json").json()
    assert same["same"] is True and same["fields"] == [] and same["blocks"] == []
    farebox.tap(card, "--fare", "1.50", at=AT)
    diff = farebox("card", "diff", before, card, "--json").json()
    assert diff["same"] is False and diff["idm"] is None
    fields = {f["field"]: (f["a"], f["b"]) for f in diff["fields"]}
    assert fields["balance"] == ("20.00", "18.50") and fields["counter"] == (1, 2)
    assert fields["purse_slot"] == (0, 1) and fields["payment_count"] == (0, 1)
    assert [(b["block"], b["area"]) for b in diff["blocks"]] == [
        (4, "purse slot 1"), (5, "purse slot 1"), (8, "log 2")]
    assert {"field": "slots[slot 1].counter", "a": None, "b": 2} in diff["fields"]
    human = farebox("card", "diff", before, card)
    assert human.code == 0 and "balance" in human.out and "purse slot 1" in human.out
    changed = re.findall(r"\[([0-9a-f]{2})\]", human.out)  # changed bytes, printed literally
    assert len(changed) >= 2 * len(diff["blocks"][0]["bytes"])


def test_card_diff_refuses_a_felica_standard_card(farebox, tmp_path):
    card = farebox.card()
    dump = write_metrodroid(tmp_path / "m.json", PUBLISHED_VECTORS[0][1], PUBLISHED_VECTORS[0][2])
    assert farebox("card", "import", dump, "--out", tmp_path / "octopus.json").code == 0
    farebox("card", "diff", card, tmp_path / "octopus.json").assert_bad_input()


# ---- import and octopus balance ------------------------------------------------------------

WRITERS = {
    "metrodroid": lambda path, hex_, at: write_metrodroid(path.with_suffix(".json"), hex_, at),
    "farebot": lambda path, hex_, at: write_farebot(path.with_suffix(".json"), hex_, at),
    "flipper": lambda path, hex_, at: write_flipper(path.with_suffix(".nfc"), hex_),
}


@pytest.mark.parametrize(("source", "block_hex", "scanned_at", "cents"), PUBLISHED_VECTORS,
                         ids=[v[0] for v in PUBLISHED_VECTORS])
@pytest.mark.parametrize("fmt", list(WRITERS))
def test_octopus_balance_reproduces_the_published_vectors(farebox, tmp_path, fmt, source,
                                                          block_hex, scanned_at, cents):
    """The Done-when line: each public decoder's vector, read back from a dump in each format
    (Flipper files carry no scan time: it is given with --at), and from its import."""
    dump = WRITERS[fmt](tmp_path / "dump", block_hex, scanned_at)
    at = [] if fmt != "flipper" else ["--at", scanned_at.isoformat()]
    result = farebox("octopus", "balance", dump, *at, "--json").json()
    expected = f"{cents / 100:.2f}"
    assert (result["balance"], result["raw"]) == (expected, int(block_hex[:8], 16)), source
    assert result["offset"] == (500 if scanned_at.year == 2017 else 350)
    assert result["scanned_at"] == scanned_at.isoformat().replace("+00:00", "Z")
    assert result["ambiguous"] is False and result["other"] is None
    card_file = tmp_path / "imported.json"
    imported = farebox("card", "import", dump, "--out", card_file, "--json").json()
    assert imported["card_kind"] == "felica-standard"
    again = farebox("octopus", "balance", card_file, *at, "--json").json()
    assert again["balance"] == expected


def test_a_flipper_dump_without_at_is_ambiguous(farebox, tmp_path):
    dump = write_flipper(tmp_path / "card.nfc", "00000164" + "00" * 12)
    result = farebox("octopus", "balance", dump, "--json").json()
    assert result["ambiguous"] is True and result["scan_time_source"].startswith("assumed now")
    assert result["balance"] == "-14.40" and result["other"] == {"offset": 350, "balance": "0.60"}
    human = farebox("octopus", "balance", dump)
    assert "AMBIGUOUS" in human.out and "HK$0.60" in human.out
    forced = farebox("octopus", "balance", dump, "--offset", "350", "--json").json()
    assert forced["balance"] == "0.60" and forced["ambiguous"] is False


def test_octopus_balance_bad_inputs(farebox, tmp_path):
    card = farebox.card()
    farebox("octopus", "balance", card).assert_bad_input()  # a scheme card: no Octopus purse
    farebox("octopus", "balance").assert_bad_input()
    (tmp_path / "junk.json").write_text("{not json")
    farebox("octopus", "balance", tmp_path / "junk.json").assert_bad_input()
    farebox("octopus", "balance", tmp_path / "missing.json").assert_bad_input()
    farebox("octopus", "balance", card, "--at", "yesterday").assert_bad_input()


def test_import_refuses_to_overwrite_and_bad_dumps(farebox, tmp_path):
    dump = write_metrodroid(tmp_path / "m.json", PUBLISHED_VECTORS[0][1], PUBLISHED_VECTORS[0][2])
    out = farebox.card("existing.json")
    before = out.read_bytes()
    farebox("card", "import", dump, "--out", out).assert_bad_input()
    assert out.read_bytes() == before
    assert farebox("card", "import", dump, "--out", out, "--force").code == 0
    (tmp_path / "bad.nfc").write_text("Filetype: Flipper NFC device\nDevice type: FeliCa\n"
                                      "Manufacture id: 01 02 zz\n")
    farebox("card", "import", tmp_path / "bad.nfc", "--out", tmp_path / "x.json"
            ).assert_bad_input()
    assert not (tmp_path / "x.json").exists()


# ---- over nfcpy's UDP link -----------------------------------------------------------------

def test_an_imported_octopus_dump_served_over_udp_reads_the_same(farebox, tmp_path, served):
    source, block_hex, scanned_at, cents = PUBLISHED_VECTORS[0]
    card_file = tmp_path / "octopus.json"
    farebox("card", "import", write_metrodroid(tmp_path / "m.json", block_hex, scanned_at),
            "--out", card_file)
    server = served(card_file, "--dwell-ms", 5000)  # one presentation holds both reads
    at = scanned_at.isoformat()
    read = farebox.script("octopus", "balance", "--reader", server.address, "--at", at, "--json")
    assert read.code == 0, read.err
    result = json.loads(read.out)
    assert result["balance"] == "-14.40" and result["scan_time_source"] == "--at"
    assert result["idm"] == "0110f3c2a5b6c7d8"
    dumped = farebox.script("card", "dump", "--reader", server.address, "--out",
                            tmp_path / "redump.json", "--json")
    assert dumped.code == 0, dumped.err
    summary = json.loads(dumped.out)
    assert summary["systems"][0]["system_code"] == "8008"
    assert summary["systems"][0]["services"] == {"0117": 1, "100b": 1}
    again = farebox("octopus", "balance", tmp_path / "redump.json", "--at", at, "--json").json()
    assert again["balance"] == "-14.40"


def test_card_dump_and_show_of_a_scheme_card_over_udp(farebox, tmp_path, served):
    card = farebox.card(balance="20.00")
    farebox.tap(card, "--fare", "2.50", at=AT)
    server = served(card, "--dwell-ms", 5000)  # one presentation holds both reads
    copy = tmp_path / "copy.json"
    dumped = farebox.script("card", "dump", "--reader", server.address, "--out", copy, "--json")
    assert dumped.code == 0, dumped.err
    assert json.loads(dumped.out)["systems"][0]["services"] == {"000b": 14}
    shown = farebox.script("card", "show", "--reader", server.address, "--json")
    assert shown.code == 0, shown.err
    shown = json.loads(shown.out)
    assert shown["balance"] == "17.50" and shown["source"] == server.address
    assert farebox("card", "diff", card, copy, "--json").json()["same"] is True
    # the dump is itself a card the simulator serves and the terminal accepts
    assert farebox.tap(copy, "--fare", "1.00", at=SOON).json()["balance_after"] == "16.50"


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_card_on_the_reader_is_one_line(farebox, tmp_path):
    run = farebox.script("card", "dump", "--reader", f"udp:127.0.0.1:{_free_udp_port()}",
                         "--timeout", "0.5", "--out", tmp_path / "none.json")
    assert run.code == 2 and run.err.count("\n") == 1 and "no card answered" in run.err
    assert not (tmp_path / "none.json").exists()


# ---- journal list / show -------------------------------------------------------------------

def test_journal_records_with_their_batch_and_upload_state(farebox):
    # timed from the real clock: the write in doubt waits for its card within a batch period
    # of the close (one older than that rides in doubt: tests/tools/test_in_doubt.py)
    now = datetime.now(timezone.utc)
    assert farebox("terminal", "init", "--state", farebox.state, "--id", "T100").code == 0
    card = farebox.card(balance="50.00")
    farebox.tap(card, "--fare", "1.00", at=(now - timedelta(minutes=5)).isoformat())
    farebox("tap", card, "--fare", "2.00", "--at", (now - timedelta(minutes=4)).isoformat(),
            "--state", farebox.state, "--torn-write", "1")
    listing = farebox("journal", "list", "--state", farebox.state, "--json").json()
    assert [(r["seq"], r["write_state"], r["batch"], r["upload"]) for r in listing["records"]] \
        == [(2, "intent", None, "not batched"), (1, "committed", None, "not batched")]
    closed = farebox("batch", "close", "--state", farebox.state, "--json").json()
    assert [b["number"] for b in closed["closed"]] == [1]
    listing = farebox("journal", "list", "--state", farebox.state, "--json").json()
    assert [(r["seq"], r["batch"], r["upload"]) for r in listing["records"]] == [
        (2, None, "not batched"), (1, 1, "batched")]
    # the clearing house acknowledges batch 1 (as the uploader records an ack)
    journal = Journal(farebox.state / "journal.sqlite3")
    try:
        settlement = Settlement(journal, load_identity(farebox.state))
        batch = settlement.batches()[0]
        assert settlement.acknowledge(batch.number, batch.hash, datetime.now(timezone.utc))
    finally:
        journal.close()
    listing = farebox("journal", "list", "--state", farebox.state, "--json").json()
    assert listing["records"][1]["upload"] == "acknowledged" and listing["not_uploaded"] == 1
    shown = farebox("journal", "show", "1", "--state", farebox.state, "--json").json()
    assert shown["seq"] == 1 and shown["write"]["state"] == "committed"
    assert shown["batches"][0]["batch"] == 1 and shown["batches"][0]["acknowledged"]
    by_tap = farebox("journal", "show", listing["records"][0]["tap_id"], "--state",
                     farebox.state, "--json").json()
    assert by_tap["seq"] == 2 and by_tap["write"]["state"] == "intent" and by_tap["batches"] == []
    human = farebox("journal", "list", "--state", farebox.state)
    assert "1 in doubt" in human.out and "acknowledged" in human.out
    farebox("journal", "show", "99", "--state", farebox.state).assert_bad_input()


# ---- readers and doctor --------------------------------------------------------------------

def test_readers_without_pcscd_is_a_finding(farebox, tmp_path, monkeypatch):
    monkeypatch.setenv("PCSCLITE_CSOCK_NAME", str(tmp_path / "no-pcscd.comm"))
    result = farebox("readers", "--json").json()
    assert result["pcscd"]["running"] is False and "does not answer" in result["pcscd"]["problem"]
    assert all(r["kind"] == "nfcpy" for r in result["readers"])
    human = farebox("readers")
    assert human.code == 0 and "pcscd" in human.out


def test_readers_lists_a_real_pcscd_reader_with_its_card(farebox, pcscd):
    """``farebox sim pcscd`` (a private pcscd with vpcd, as the end-to-end PC/SC tests) and a
    card served to it: ``readers`` sees pcscd, the reader and the card through
    PCSCLITE_CSOCK_NAME."""
    daemon = pcscd()
    card = farebox.card(balance="5.00")
    server = VpcdServed(card, daemon.info["port"], daemon.env, "--dwell-ms", "8000", "--taps", 1)
    try:
        listing = None
        for _ in range(40):  # pcscd looks at the vpcd slot every 0.4 s
            run = subprocess.run([FAREBOX, "readers", "--json"], capture_output=True, text=True,
                                 env=daemon.env, timeout=30)
            assert run.returncode == 0, run.stderr
            listing = json.loads(run.stdout)
            pcsc = [r for r in listing["readers"] if r["kind"] == "pcsc"]
            if pcsc and pcsc[0]["card_present"]:
                break
            subprocess.run(["sleep", "0.25"], check=True)
        assert listing["pcscd"]["running"] is True
        assert pcsc[0]["name"] == daemon.info["reader"] and pcsc[0]["usable"] is True
        assert pcsc[0]["spec"] == f"pcsc:{daemon.info['reader']}"
        assert pcsc[0]["card_present"] is True
    finally:
        server.kill()


def test_octopus_balance_and_dump_through_a_real_pcscd(farebox, tmp_path, pcscd):
    """The imported Octopus card presented to a real pcscd (vpcd) and read through pyscard."""
    daemon = pcscd()
    source, block_hex, scanned_at, cents = PUBLISHED_VECTORS[1]
    card_file = tmp_path / "octopus.json"
    farebox("card", "import", write_farebot(tmp_path / "f.json", block_hex, scanned_at),
            "--out", card_file)
    server = VpcdServed(card_file, daemon.info["port"], daemon.env, "--dwell-ms", "8000",
                        "--taps", 1)
    try:
        reader = f"pcsc:{daemon.info['reader']}"
        run = subprocess.run([FAREBOX, "octopus", "balance", "--reader", reader, "--at",
                              scanned_at.isoformat(), "--timeout", "10", "--json"],
                             capture_output=True, text=True, env=daemon.env, timeout=60)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert (result["balance"], result["offset"]) == ("-1.20", 350)
        run = subprocess.run([FAREBOX, "card", "dump", "--reader", reader, "--timeout", "10",
                              "--out", str(tmp_path / "redump.json"), "--json"],
                             capture_output=True, text=True, env=daemon.env, timeout=60)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["systems"][0]["services"] == {"0117": 1}
    finally:
        server.kill()


def test_doctor_exit_status_follows_its_worst_finding(farebox, tmp_path):
    card = farebox.card()
    run = farebox("doctor", "--state", farebox.state, "--reader", f"sim:{card}", "--json")
    obj = json.loads(run.out)
    statuses = {c["check"]: c["status"] for c in obj["checks"]}
    assert statuses["card in field"] == "ok" and statuses["state dir"] == "ok"
    assert run.code == (3 if obj["status"] == "fail" else 0)
    assert all(c["fix"] for c in obj["checks"] if c["status"] == "fail")


def test_doctor_uses_the_configured_reader_and_reports_a_broken_configuration(farebox, tmp_path):
    card = farebox.card()
    config = tmp_path / "terminal.toml"
    config.write_text('[terminal]\nallow_test_keys = true\n'
                      f'reader = "sim:{card}"\nkeys = "test"\n')
    run = farebox("doctor", "--config", config, "--state", farebox.state, "--json")
    checks = {c["check"]: c for c in json.loads(run.out)["checks"]}
    assert checks["config"]["status"] == "ok" and "reader" in checks["config"]["found"]
    assert checks["card in field"]["status"] == "ok"
    config.write_text('[terminal]\nretap_window_s = "soon"\n')
    run = farebox("doctor", "--config", config, "--state", farebox.state, "--json")
    checks = {c["check"]: c for c in json.loads(run.out)["checks"]}
    assert checks["config"]["status"] == "fail" and "retap_window_s" in checks["config"]["found"]
    assert checks["state dir"]["status"] == "ok"  # the other checks still ran
    assert run.code == 3


def doctor_clock(farebox) -> tuple[int, dict]:
    run = farebox("doctor", "--state", farebox.state, "--json")
    return run.code, next(c for c in json.loads(run.out)["checks"] if c["check"] == "clock")


def test_doctor_names_the_tap_whose_future_time_moved_the_clock_mark(farebox):
    """issue 21 item 3: a debugging ``--at`` in the future moves the terminal's time mark past
    the clock; doctor fails and says which tap did it (tap id, record, card, time) and how to
    reset it, instead of blaming the clock alone; after ``terminal clock reset`` it passes."""
    card = farebox.card(balance="20.00")
    ahead = (datetime.now(timezone.utc) + timedelta(days=2)).replace(microsecond=0)
    assert farebox.tap(card, "--fare", "1.00", at=ahead.isoformat()).json()["outcome"] == "approved"
    [record] = farebox("journal", "list", "--state", farebox.state, "--json").json()["records"]
    code, clock = doctor_clock(farebox)
    assert code == 3 and clock["status"] == "fail"
    at = ahead.strftime("%Y-%m-%dT%H:%M:%SZ")
    for said in (f"tap {record['tap_id']}", "record #1", "payment of 1.00",
                 f"card {record['card']}", f"at {at}", "--at"):
        assert said in clock["found"], said
    assert "farebox terminal clock reset" in clock["fix"] and str(farebox.state) in clock["fix"]
    reset = farebox("terminal", "clock", "reset", "--reason", "a debugging --at",
                    "--state", farebox.state, "--json")
    assert reset.code == 0, reset.err
    assert doctor_clock(farebox)[1]["status"] != "fail"


def test_doctor_says_a_declined_tap_or_a_reset_moved_the_clock_mark(farebox):
    """A tap that writes nothing (a card inactive by 2080: declined) moves the mark with no
    record to name; an operator's reset into the future is named as the reset."""
    card = farebox.card(balance="20.00")
    declined = farebox.tap(card, "--fare", "1.00", at="2080-01-01T08:00:00+08:00").json()
    assert declined["reason"] == "inactive" and declined["clock_trusted"] is True
    code, clock = doctor_clock(farebox)
    assert code == 3 and "2080-01-01T00:00:00Z" in clock["found"]
    assert "a tap that made no journal record (a declined tap)" in clock["found"]
    reset = farebox("terminal", "clock", "reset", "--reason", "typo", "--at",
                    "2079-01-01T00:00:00Z", "--state", farebox.state, "--json").json()
    code, clock = doctor_clock(farebox)
    assert code == 3 and "2079-01-01T00:00:00Z" in clock["found"]
    assert f"farebox terminal clock reset` (record #{reset['seq']}" in clock["found"]
