"""End to end through nfcpy's own UDP driver on both sides, from the shell: ``farebox sim serve``
presents a card file, ``farebox run`` is the terminal daemon on ``udp:127.0.0.1:PORT``."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import CONSOLE_SCRIPT

FAREBOX = str(CONSOLE_SCRIPT)


class Served:
    """``farebox sim serve CARD --via udp:127.0.0.1:0 ...`` in the background."""

    def __init__(self, card: Path, *options: object) -> None:
        self.process = subprocess.Popen(
            [FAREBOX, "sim", "serve", str(card), "--via", "udp:127.0.0.1:0", *map(str, options)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        assert line, f"sim serve said nothing: {self.process.communicate(timeout=10)}"
        self.address = json.loads(line)["serving"]

    def finish(self, timeout: float = 30) -> list[dict]:
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def run_daemon(address: str, state: Path, *options: object, timeout: float = 60):
    done = subprocess.run([FAREBOX, "run", "--reader", address, "--state", str(state), "--json",
                           *map(str, options)], capture_output=True, text=True, timeout=timeout)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return done, events


@pytest.fixture
def served():
    started = []

    def start(card, *options):
        started.append(Served(card, *options))
        return started[-1]

    yield start
    for server in started:
        server.kill()


def test_three_taps_over_nfcpy_udp(farebox, served):
    card = farebox.card(balance="10.00")
    server = served(card, "--taps", 3)
    done, events = run_daemon(server.address, farebox.state, "--fare", "1.50", "--max-taps", 3)
    assert done.returncode == 0, done.stderr
    assert [e["balance_after"] for e in events] == ["8.50", "7.00", "5.50"]
    assert all(e["outcome"] == "approved" and e["card_commands"] == 6 for e in events)
    assert all(e["reader"] == server.address and e["idm"] and e["tap_ms"] > 0 for e in events)
    presentations = server.finish()
    assert [p["number"] for p in presentations] == [1, 2, 3]
    shown = farebox.show(card)  # the card file is what the card said
    assert shown["balance"] == "5.50" and shown["counter"] == 4
    assert [h["amount"] for h in shown["history"][:3]] == ["1.50", "1.50", "1.50"]


@pytest.mark.parametrize("fault", [("--leave-after", 3), ("--leave-after", 4),
                                   ("--leave-after", 5), ("--torn-write", 1),
                                   ("--torn-write", 2), ("--torn-write", 3)])
def test_a_card_pulled_away_mid_tap_never_costs_unrecorded_value(farebox, served, fault):
    """The first presentation is cut short; the second reports the true balance. Whatever
    happened, the card lost exactly what the journal recorded."""
    card = farebox.card(balance="10.00")
    server = served(card, "--taps", 2, *fault)
    done, events = run_daemon(server.address, farebox.state, "--fare", "1.00", "--max-taps", 2)
    assert done.returncode == 0, done.stderr
    server.finish()
    shown = farebox.show(card)
    listing = farebox("journal", "list", "--state", farebox.state, "--json").json()
    assert listing["in_doubt"] == 0
    paid = sum(float(r["amount"]) for r in listing["records"] if r["write_state"] == "committed")
    assert float(shown["balance"]) == pytest.approx(10.00 - paid)
    last = events[-1]
    assert last["outcome"] == "approved" and last["balance_after"] == shown["balance"]
    # never charged twice for one journey: at most the two taps, and the cut one only if landed
    assert paid in (1.0, 2.0)


def test_sigterm_stops_the_daemon_within_two_seconds(farebox, tmp_path):
    daemon = subprocess.Popen([FAREBOX, "run", "--reader", "udp:127.0.0.1:9", "--fare", "1.00",
                               "--state", str(farebox.state), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # let it start and poll (nobody answers on the discard port)
        assert daemon.poll() is None
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(5)
        assert time.monotonic() - started < 2.0
        assert daemon.returncode == 0, daemon.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_run_without_a_reader_or_fare_is_bad_input(farebox):
    assert farebox("run", "--fare", "1.00", "--state", farebox.state).code == 2
    assert farebox("run", "--reader", "udp:127.0.0.1:9", "--state", farebox.state).code == 2
    bad = farebox("run", "--reader", "ftp:x", "--fare", "1.00", "--state", farebox.state)
    bad.assert_bad_input()
    missing = farebox("run", "--reader", f"sim:{farebox.path('none.json')}", "--fare", "1.00",
                      "--state", farebox.state)
    missing.assert_bad_input()


def test_sim_serve_refuses_non_loopback_and_busy_cards(farebox):
    card = farebox.card(balance="10.00")
    far = farebox("sim", "serve", card, "--via", "udp:10.0.0.1:5000", "--taps", 1)
    far.assert_bad_input()
    assert "loopback" in far.err
    from farebox.protocol.sim.cardfile import CardFile

    with CardFile(card):
        busy = farebox("sim", "serve", card, "--via", "udp:127.0.0.1:0", "--taps", 1)
    busy.assert_bad_input()
    assert "card busy" in busy.err


def test_the_daemon_closes_signed_batches_between_taps(farebox, served):
    done = farebox("terminal", "init", "--state", farebox.state, "--id", "BUS-0042", "--json")
    done.json()
    config = farebox.path("farebox.toml")
    config.write_text("[terminal]\nallow_test_keys = true\nbatch_max_records = 1\n")
    card = farebox.card(balance="10.00")
    server = served(card, "--taps", 3)
    run, events = run_daemon(server.address, farebox.state, "--fare", "1.00", "--max-taps", 3,
                             "--config", config)
    assert run.returncode == 0, run.stderr
    assert "batches are not closed" not in run.stderr
    server.finish()
    listing = farebox("batch", "list", "--state", farebox.state, "--json").json()
    # one record per batch, closed once each card had left: the last tap's card had not yet
    batched = [b["records"] for b in listing["batches"]]
    assert batched == [1, 1] and listing["ready"] + listing["held_back"] == 1
    assert farebox("batch", "verify", "--state", farebox.state, "--json").json()["ok"]


def test_the_daemon_without_an_identity_says_batches_are_not_closed(farebox, served):
    card = farebox.card(balance="10.00")
    server = served(card, "--taps", 1)
    run, events = run_daemon(server.address, farebox.state, "--fare", "1.00", "--max-taps", 1)
    assert run.returncode == 0 and events[0]["outcome"] == "approved"
    assert "batches are not closed" in run.stderr and "terminal init" in run.stderr
    server.finish()
