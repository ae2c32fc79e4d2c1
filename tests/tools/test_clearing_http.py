"""Uploads over real HTTP: ``farebox clearing serve`` (uvicorn) as a separate process, and
hostile servers (http.server on loopback) that fail, lie or stall. Whatever a server does, a
batch is marked acknowledged only by an answer that names exactly it."""

from __future__ import annotations

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


@pytest.fixture
def receiver(tmp_path):
    process = subprocess.Popen([str(CONSOLE_SCRIPT), "clearing", "serve", "--db",
                                str(tmp_path / "clearing.sqlite3"), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line, process.communicate(timeout=10)
    url = json.loads(line)["url"]
    assert url.startswith("http://127.0.0.1:")
    yield url, str(tmp_path / "clearing.sqlite3")
    process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


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
    sent = farebox("upload", "--state", farebox.state, "--url", url, "--json").json()
    assert sent["pending"] == 0 and sent["stopped_at"] is None and sent["acknowledged"]
    # every ack lost: the terminal sends everything again; the receiver stores nothing twice
    with sqlite3.connect(farebox.state / "journal.sqlite3") as journal:
        journal.execute("UPDATE batches SET acked_utc = NULL")
    again = farebox("upload", "--state", farebox.state, "--url", url, "--json").json()
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
    refused = farebox("upload", "--state", farebox.state, "--url", url, "--json")
    assert refused.code == 3 and "not enrolled" in json.loads(refused.out)["reason"]
    farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey",
            made["public_key"]).code == 0
    with sqlite3.connect(farebox.state / "journal.sqlite3") as journal:
        journal.execute("UPDATE batches SET body = replace(body, '\"amount_cents\":100', "
                        "'\"amount_cents\":1') WHERE number = 1")
    tampered = farebox("upload", "--state", farebox.state, "--url", url, "--json")
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


@pytest.mark.parametrize("behaviour", ["500", "garbage", "other ack", "huge", "no ack"])
def test_a_hostile_server_changes_nothing(farebox, hostile, behaviour):
    Hostile.behaviour = behaviour
    terminal_with_batches(farebox)
    before = farebox("batch", "list", "--state", farebox.state, "--json").json()
    run = farebox("upload", "--state", farebox.state, "--url", hostile, "--attempts", "2",
                  "--json")
    assert run.code == 3, run
    result = json.loads(run.out)
    assert result["acknowledged"] == [] and result["stopped_at"] == 1
    assert Hostile.calls == [1, 1]  # retried, and never past the batch it could not deliver
    assert farebox("batch", "list", "--state", farebox.state, "--json").json() == before


def test_nothing_listening_is_retried_then_reported(farebox):
    terminal_with_batches(farebox)
    run = farebox("upload", "--state", farebox.state, "--url", "http://127.0.0.1:9",
                  "--attempts", "2", "--json")
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
    config = farebox.path("farebox.toml")
    config.write_text(f'[terminal]\nbatch_max_records = 1\nclearing_url = "{url}"\n'
                      "upload_interval_s = 1\n")
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
