"""Uploads over real HTTP: ``farebox clearing serve`` (uvicorn) as a separate process, and
hostile servers (http.server on loopback) that fail, lie or stall. Whatever a server does, a
batch is marked acknowledged only by an answer that names exactly it, signed by the clearing
house's key (the terminal's ``clearing_public_key``: :func:`trusting` configures it)."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import CONSOLE_SCRIPT

AT = "2026-11-22T08:00:00+08:00"
SOON = "2026-11-22T08:00:20+08:00"
LATER = "2026-11-22T08:10:00+08:00"


@contextlib.contextmanager
def start_receiver(db, tls=None):
    """``farebox clearing serve --db DB --port 0`` in the background (with ``tls``, a
    (certificate, key) pair of PEM files: ``--tls-cert`` / ``--tls-key``); yields its URL."""
    options = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else []
    process = subprocess.Popen([str(CONSOLE_SCRIPT), "clearing", "serve", "--db", str(db),
                                "--port", "0", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line, process.communicate(timeout=10)
        url = json.loads(line)["url"]
        assert url.startswith("https://127.0.0.1:" if tls else "http://127.0.0.1:")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.fixture
def receiver(tmp_path):
    with start_receiver(tmp_path / "clearing.sqlite3") as url:
        yield url, str(tmp_path / "clearing.sqlite3")


def terminal_with_batches(farebox, terminal_id="T-0001"):
    made = farebox("terminal", "init", "--state", farebox.state, "--id", terminal_id,
                   "--json").json()
    card = farebox.card(balance="10.00")
    farebox.tap(card, "--fare", "1.00", at=AT).json()
    cut = farebox("tap", card, "--fare", "1.00", "--at", SOON, "--state", farebox.state,
                  "--torn-write", "2")  # both purse blocks land, unanswered: in doubt
    assert cut.code == 1
    farebox.tap(card, "--fare", "1.00", at=LATER).json()
    farebox("add-value", card, "--amount", "50.00", "--at", LATER, "--state", farebox.state,
            "--json").json()
    farebox("batch", "close", "--state", farebox.state, "--max-records", "2", "--json").json()
    return made, card


def test_upload_to_the_receiver_settles_what_the_card_lost_exactly_once(farebox, receiver):
    url, db = receiver
    made, card = terminal_with_batches(farebox)
    farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey",
            made["public_key"], "--json").json()
    config = trusting(farebox, db, url)
    sent = farebox("upload", "--state", farebox.state, "--config", config, "--json").json()
    assert sent["pending"] == 0 and sent["stopped_at"] is None and sent["acknowledged"]
    # every ack lost: the terminal sends everything again; the receiver stores nothing twice
    with sqlite3.connect(farebox.state / "journal.sqlite3") as journal:
        journal.execute("UPDATE batches SET acked_utc = NULL")
    again = farebox("upload", "--state", farebox.state, "--url", url, "--config", config,
                    "--json").json()
    assert again["acknowledged"] == sent["acknowledged"]
    report = farebox("clearing", "report", "--db", db, "--json").json()
    shown = farebox.show(card)
    paid = report["totals"]["committed"]["payment"]
    loaded = report["totals"]["committed"]["add_value"]
    assert float(shown["balance"]) == pytest.approx(
        10.00 - float(paid["amount"]) + float(loaded["amount"]))
    assert paid["count"] == 2  # the in-doubt tap landed and was completed by the re-tap
    assert report["terminals"][0]["gaps"] == [] and report["open"] == []
    assert report["counter_forks"] == []


def test_an_unenrolled_terminal_and_a_tampered_batch_change_nothing(farebox, receiver):
    url, db = receiver
    made, _ = terminal_with_batches(farebox)
    config = trusting(farebox, db, url)
    refused = farebox("upload", "--state", farebox.state, "--config", config, "--json")
    assert refused.code == 3 and "not enrolled" in json.loads(refused.out)["reason"]
    farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey",
            made["public_key"]).code == 0
    with sqlite3.connect(farebox.state / "journal.sqlite3") as journal:
        journal.execute("UPDATE batches SET body = replace(body, '\"amount_cents\":100', "
                        "'\"amount_cents\":1') WHERE number = 1")
    tampered = farebox("upload", "--state", farebox.state, "--config", config, "--json")
    assert tampered.code == 3 and json.loads(tampered.out)["stopped_at"] == 1
    listing = farebox("batch", "list", "--state", farebox.state, "--json").json()
    assert not any(b["acked"] for b in listing["batches"])
    assert farebox("clearing", "report", "--db", db, "--json").json()["totals"] == {}


class Hostile(BaseHTTPRequestHandler):
    behaviour = "500"
    calls: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length", 0))
        upload = json.loads(self.rfile.read(length))
        type(self).calls.append(upload["number"])
        kind = type(self).behaviour
        status, body = {
            "500": (500, b'{"error": "down"}'),
            "408": (408, b'{"error": "the body did not arrive in time"}'),
            "429": (429, b'{"error": "slow down"}'),
            "403": (403, b'{"error": "not enrolled"}'),
            "garbage": (200, b"\x00\xffnot json"),
            "other ack": (200, json.dumps({"ack": {**{k: upload[k] for k in (
                "terminal_id", "incarnation", "hash")}, "number": upload["number"] + 7}}
                ).encode()),
            "huge": (200, b" " * (1 << 20) + b"{}"),
            "no ack": (200, b'{"ok": true}'),
        }[kind]
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def some_house(farebox, name="house.toml"):
    """A configuration that trusts a clearing house key no server in these tests holds."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from farebox.protocol.settlement import public_key_bytes

    config = farebox.path(name)
    key = public_key_bytes(Ed25519PrivateKey.generate()).hex()
    config.write_text(f'[terminal]\nclearing_public_key = "{key}"\n')
    return config


@pytest.fixture
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Hostile.calls = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("behaviour", ["500", "408", "429", "garbage", "other ack", "huge",
                                       "no ack"])
def test_a_hostile_server_changes_nothing(farebox, hostile, behaviour):
    """A 5xx, a 408 (the receiver timed out a slow body: the link, not the batch), a 429 and
    answers that acknowledge nothing are tried again; nothing is marked delivered."""
    Hostile.behaviour = behaviour
    terminal_with_batches(farebox)
    before = farebox("batch", "list", "--state", farebox.state, "--json").json()
    run = farebox("upload", "--state", farebox.state, "--url", hostile, "--attempts", "2",
                  "--config", some_house(farebox), "--json")
    assert run.code == 3, run
    result = json.loads(run.out)
    assert result["acknowledged"] == [] and result["stopped_at"] == 1
    assert Hostile.calls == [1, 1]  # retried, and never past the batch it could not deliver
    assert farebox("batch", "list", "--state", farebox.state, "--json").json() == before


def test_a_refusal_is_not_retried(farebox, hostile):
    Hostile.behaviour = "403"
    terminal_with_batches(farebox)
    run = farebox("upload", "--state", farebox.state, "--url", hostile, "--attempts", "3",
                  "--config", some_house(farebox), "--json")
    assert run.code == 3 and json.loads(run.out)["stopped_at"] == 1
    assert Hostile.calls == [1]


def test_nothing_listening_is_retried_then_reported(farebox):
    terminal_with_batches(farebox)
    run = farebox("upload", "--state", farebox.state, "--url", "http://127.0.0.1:9",
                  "--attempts", "2", "--config", some_house(farebox), "--json")
    assert run.code == 3 and "ConnectError" in json.loads(run.out)["reason"]


def test_bad_urls_are_bad_input(farebox):
    terminal_with_batches(farebox)
    farebox("upload", "--state", farebox.state, "--url", "ftp://x").assert_bad_input()


def test_the_daemon_uploads_its_batches_in_the_background(farebox, receiver):
    from .test_e2e_udp import Served

    url, db = receiver
    made = farebox("terminal", "init", "--state", farebox.state, "--id", "BUS-7",
                   "--json").json()
    farebox("clearing", "enroll", "--db", db, "--terminal", "BUS-7", "--pubkey",
            made["public_key"]).code == 0
    config = trusting(farebox, db, url, "farebox.toml")
    config.write_text(config.read_text() + "batch_max_records = 1\nupload_interval_s = 1\n")
    card = farebox.card(balance="10.00")
    server = Served(card, "--taps", 2)
    run = subprocess.Popen([str(CONSOLE_SCRIPT), "run", "--reader", server.address, "--fare",
                            "1.00", "--state", str(farebox.state), "--config", str(config),
                            "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server.finish(timeout=30)
        deadline, records = time.monotonic() + 20, 0
        while time.monotonic() < deadline and records < 2:
            time.sleep(0.3)
            totals = farebox("clearing", "report", "--db", db, "--json").json()["totals"]
            records = totals.get("committed", {}).get("payment", {}).get("count", 0)
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=10)
        assert time.monotonic() - started < 2.0 and run.returncode == 0, err
    finally:
        server.kill()
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert records == 2, err
    assert len(out.splitlines()) == 2
    listing = farebox("batch", "list", "--state", farebox.state, "--json").json()
    assert [b["acked"] for b in listing["batches"]] == [True, True]


# -- action lists ---------------------------------------------------------------------------


def trusting(farebox, db, url, name="trust.toml"):
    key = farebox("clearing", "key", "--db", db, "--json").json()["public_key"]
    config = farebox.path(name)
    config.write_text('[terminal]\nallow_test_keys = true\n'
                      f'clearing_url = "{url}"\nclearing_public_key = "{key}"\n')
    return config


def fetch(farebox, config, url=None):
    argv = ["actions", "fetch", "--state", farebox.state, "--config", config, "--json"]
    return farebox(*argv, *(["--url", url] if url else []))


def test_a_card_reported_lost_is_refused_after_the_next_fetch_from_three_hours(farebox,
                                                                                receiver):
    url, db = receiver
    config = trusting(farebox, db, url)
    card = farebox.card(number="12345678")
    listed = farebox("clearing", "action", "--db", db, "--card", "12345678", "--reason", "lost",
                     "--at", "2026-11-22T05:00:00+08:00", "--json").json()
    assert listed["serial"] == 1

    def tap(at):
        return farebox("tap", card, "--fare", "1.00", "--at", at, "--state", farebox.state,
                       "--config", config, "--json").json()

    assert tap("2026-11-22T07:00:00+08:00")["outcome"] == "approved"  # not fetched yet
    fetched = fetch(farebox, config).json()
    assert fetched == {**fetched, "serial": 1, "entries": 1, "changed": True}
    assert tap("2026-11-22T07:59:00+08:00")["outcome"] == "approved"  # before report + 3 h
    refused = tap("2026-11-22T08:00:00+08:00")
    assert refused["outcome"] == "declined" and refused["reason"] == "blocked"
    assert fetch(farebox, config).json()["changed"] is False


def test_old_expired_tampered_and_unverifiable_lists_are_refused(farebox, receiver, hostile,
                                                                 monkeypatch):
    url, db = receiver
    config = trusting(farebox, db, url)
    import httpx

    old = httpx.get(url + "/v1/actions").json()  # serial 0, empty
    farebox("clearing", "action", "--db", db, "--card", "12345678", "--reason", "cancelled",
            "--at", "2026-11-22T05:00:00+08:00").code == 0
    assert fetch(farebox, config).json()["serial"] == 1
    held = (farebox.state / "actions.json").read_bytes()

    def serve(document):
        class Lists(Hostile):
            def do_GET(self):  # noqa: N802
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        return Lists

    import http.server as _  # noqa: F401 - Hostile's server class is reused below
    server = ThreadingHTTPServer(("127.0.0.1", 0), serve(old))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        refused = fetch(farebox, config, fake)
        refused.assert_bad_input()
        assert "older than the list held" in refused.err
        # an expired list, signed with the house's real key
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from farebox.protocol.settlement import SignedActionList
        with sqlite3.connect(db) as house:
            raw = house.execute("SELECT value FROM meta WHERE name = 'list_signing_key'"
                                ).fetchone()[0]
        from datetime import datetime, timedelta, timezone
        stale = SignedActionList.publish(
            [], 9, datetime.now(timezone.utc) - timedelta(days=2),
            Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw))).to_json()
        server.RequestHandlerClass = serve(stale)
        assert "expired" in fetch(farebox, config, fake).err
        tampered = {**stale, "list": stale["list"].replace('"serial":9', '"serial":99')}
        server.RequestHandlerClass = serve(tampered)
        assert "does not verify" in fetch(farebox, config, fake).err
        server.RequestHandlerClass = serve({"list": 5})
        fetch(farebox, config, fake).assert_bad_input()
    finally:
        server.shutdown()
        server.server_close()
    assert (farebox.state / "actions.json").read_bytes() == held  # nothing changed


def test_a_card_counter_spent_twice_is_listed_cancelled(farebox, receiver):
    """The same card image tapped at two terminals (a copy restored between them): the clearing
    house sees one counter spent twice and lists the card; a terminal that fetches refuses it."""
    import shutil

    url, db = receiver
    card = farebox.card(number="12345678", balance="10.00")
    copy = farebox.path("copy.json")
    shutil.copy(card, copy)
    for state, name in ((farebox.state, "T-A"), (farebox.path("b"), "T-B")):
        made = farebox("terminal", "init", "--state", state, "--id", name, "--json").json()
        farebox("clearing", "enroll", "--db", db, "--terminal", name, "--pubkey",
                made["public_key"]).code == 0
    farebox("tap", card, "--fare", "1.00", "--at", AT, "--state", farebox.state, "--json").json()
    farebox("tap", copy, "--fare", "1.00", "--at", AT, "--state", farebox.path("b"),
            "--json").json()
    for state in (farebox.state, farebox.path("b")):
        farebox("batch", "close", "--state", state, "--json").json()
        farebox("upload", "--state", state, "--config", trusting(farebox, db, url),
                "--json").json()
    report = farebox("clearing", "report", "--db", db, "--json").json()
    assert report["counter_forks"] == [{"card": 12345678, "counter": 1, "writes": 2}]
    config = trusting(farebox, db, url)
    # the tap below is at the real time, long after AT with a card last used at AT: nothing
    # bears the jump out within the default bound (docs/rules.md §3 "Clock")
    with config.open("a") as extra:
        extra.write("max_clock_ahead_s = 31622400\n")
    assert fetch(farebox, config).json()["entries"] == 1
    from datetime import datetime, timedelta, timezone

    listed_from = datetime.now(timezone.utc) + timedelta(minutes=1)  # the fork was seen now
    refused = farebox("tap", card, "--fare", "1.00", "--at", listed_from.isoformat(),
                      "--state", farebox.state, "--config", config, "--json").json()
    assert refused["outcome"] == "declined" and refused["reason"] == "cancelled"


def test_the_daemon_fetches_the_action_list_and_puts_it_in_force(farebox, receiver):
    from .test_e2e_udp import Served

    url, db = receiver
    made = farebox("terminal", "init", "--state", farebox.state, "--id", "BUS-8",
                   "--json").json()
    farebox("clearing", "enroll", "--db", db, "--terminal", "BUS-8", "--pubkey",
            made["public_key"]).code == 0
    farebox("clearing", "action", "--db", db, "--card", "12345678", "--reason", "lost",
            "--at", "2026-11-01T08:00:00+08:00").code == 0
    config = trusting(farebox, db, url)
    config.write_text(config.read_text() + "upload_interval_s = 1\n")
    card = farebox.card(number="12345678", balance="10.00")
    served = None
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a port no card is on
        probe.bind(("127.0.0.1", 0))
        idle_port = probe.getsockname()[1]
    run = subprocess.Popen([str(CONSOLE_SCRIPT), "run", "--reader", f"udp:127.0.0.1:{idle_port}",
                            "--fare",
                            "1.00", "--state", str(farebox.state), "--config", str(config),
                            "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (farebox.state / "actions.json").exists():
            time.sleep(0.2)
        assert (farebox.state / "actions.json").exists()
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=10)
        # the list is held now: the next daemon (and every tap) applies it from the start
        served = Served(card, "--taps", 1)
        again = subprocess.run([str(CONSOLE_SCRIPT), "run", "--reader", served.address, "--fare",
                                "1.00", "--state", str(farebox.state), "--config", str(config),
                                "--json", "--max-taps", "1"], capture_output=True, text=True,
                               timeout=30)
        event = json.loads(again.stdout.splitlines()[0])
        assert event["outcome"] == "declined" and event["reason"] == "blocked"
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        if served is not None:
            served.kill()


def test_a_week_offline_then_one_upload_settles_every_tap_once(farebox, receiver):
    """3,000 taps over six and a half Hong Kong days on 30 cards, nothing uploaded; then one
    upload: every batch acknowledged, every record stored once, the totals what the cards lost."""
    from datetime import date, datetime, timedelta, timezone

    from farebox.protocol.session import LiteSSession
    from farebox.protocol.sim.card import SimulatedLiteS
    from farebox.protocol.sim.inprocess import InProcessTransport
    from farebox.terminal.card.issue import IssueRequest, issue, new_idm
    from farebox.terminal.store.journal import Journal
    from farebox.terminal.card.keys import published_test_keys
    from farebox.terminal.core.rules import Tariff
    from farebox.terminal.card.tap import Terminal

    url, db = receiver
    made = farebox("terminal", "init", "--state", farebox.state, "--id", "BUS-9",
                   "--json").json()
    farebox("clearing", "enroll", "--db", db, "--terminal", "BUS-9", "--pubkey",
            made["public_key"]).code == 0
    keys, start = published_test_keys(), datetime(2026, 11, 22, 6, 0, tzinfo=timezone.utc)
    cards = []
    for number in range(30):
        _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=20_000_000 + number,
                                          balance_cents=50_000), keys, idm := new_idm())
        cards.append(SimulatedLiteS(idm, blocks=blocks))
    with Journal(farebox.state / "journal.sqlite3", durable=False) as journal:
        terminal = Terminal(journal, keys)
        for tap in range(3000):
            card = cards[tap % 30]
            result = terminal.pay(LiteSSession(InProcessTransport(card)), Tariff.flat(100),
                                  start + timedelta(minutes=3 * tap))
            assert result.approved
        terminal.idle()
    closed = farebox("batch", "close", "--state", farebox.state, "--json").json()
    assert [b["records"] for b in closed["closed"]] == [1000, 1000, 1000]
    sent = farebox("upload", "--state", farebox.state, "--url", url, "--config",
                   trusting(farebox, db, url), "--json").json()
    assert sent["acknowledged"] == [1, 2, 3] and sent["pending"] == 0
    report = farebox("clearing", "report", "--db", db, "--json").json()
    assert report["totals"] == {"committed": {"payment": {"count": 3000, "amount": "3000.00"}}}
    assert report["terminals"][0]["last_seq"] == 3000 and report["terminals"][0]["gaps"] == []
    assert report["duplicates_ignored"] == 0
