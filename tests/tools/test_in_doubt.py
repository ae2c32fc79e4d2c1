"""An approved tap whose process dies before its commit mark is synced, and writes left in doubt,
through the CLI (the real console script where a process must die) to a real receiver over
HTTP (``farebox clearing serve``):

* the mark is in the journal before the result is shown: a tap killed after it
  (``before-durable-mark``, or ``kill -9`` of ``farebox run`` with the card still on the reader)
  is committed after the restart and settled;
* a write still in doubt a batch period after it was made (a power cut lost its mark: the state
  ``after-log-write`` leaves) rides as ``in_doubt``; the receiver settles it from the card's next
  change at another terminal, and takes the terminal's own word when the card comes back;
* a card image restored after an approval is a counter fork: the card is listed, and a terminal
  that fetches the list refuses it.

Taps here are timed from the real clock: ``batch close`` judges "a batch period old" by it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from farebox.terminal.failpoints import FAILPOINT_EXIT

from .conftest import CONSOLE_SCRIPT
from .test_clearing_http import start_receiver

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def ago(minutes: float) -> str:
    return (NOW - timedelta(minutes=minutes)).isoformat()


class Clearing:
    """A real receiver and the terminals enrolled at it, each with its own state directory and
    a configuration trusting the receiver's key."""

    def __init__(self, farebox, url: str, db) -> None:
        self.farebox, self.url, self.db = farebox, url, db
        key = farebox("clearing", "key", "--db", db, "--json").json()["public_key"]
        self.config = farebox.path("trust.toml")
        self.config.write_text(f'[terminal]\nallow_test_keys = true\nclearing_url = "{url}"\n'
                               f'clearing_public_key = "{key}"\n')

    def terminal(self, name: str):
        state = self.farebox.path(name)
        made = self.farebox("terminal", "init", "--state", state, "--id", name, "--json").json()
        assert self.farebox("clearing", "enroll", "--db", self.db, "--terminal", name,
                            "--pubkey", made["public_key"]).code == 0
        return state

    def settle(self, state) -> dict:
        """``batch close`` then ``upload``: what the close said."""
        closed = self.farebox("batch", "close", "--state", state, "--config", self.config,
                              "--json").json()
        sent = self.farebox("upload", "--state", state, "--config", self.config, "--url",
                            self.url, "--json").json()
        assert sent["pending"] == 0, sent
        return closed

    def report(self) -> dict:
        return self.farebox("clearing", "report", "--db", self.db, "--json").json()

    def listed(self) -> list[int]:
        from farebox.clearing.store import Store

        with Store(str(self.db)) as store:
            return [card for card, _, _ in store.actions()[1]]


@pytest.fixture
def clearing(farebox):
    db = farebox.path("clearing.sqlite3")
    with start_receiver(db) as url:
        yield Clearing(farebox, url, db)


def tap(farebox, card, state, at, *extra):
    return farebox("tap", card, "--fare", "1.00", "--at", at, "--state", state, *extra,
                   "--json").json()


def killed_tap(farebox, card, state, at, failpoint):
    run = farebox.script("tap", card, "--fare", "1.00", "--at", at, "--state", state, "--json",
                         env={"FAREBOX_FAILPOINT": failpoint})
    assert run.code == FAILPOINT_EXIT and f"failpoint {failpoint}" in run.err, run
    return run


def write_states(farebox, state) -> list[str]:
    listing = farebox("journal", "list", "--state", state, "--json").json()
    return [record["write_state"] for record in listing["records"]]


def cents(amount: str) -> int:
    return round(float(amount) * 100)


def lost(farebox, card, initial="10.00") -> int:
    return cents(initial) - cents(farebox.show(card)["balance"])


def committed_payments(report) -> int:
    return cents(report["totals"].get("committed", {}).get("payment", {}).get("amount", "0"))


# -- the mark survives the process -------------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["after-commit-mark", "before-durable-mark"])
def test_a_tap_killed_after_its_mark_is_committed_and_settled(farebox, clearing, failpoint):
    a = clearing.terminal("T-A")
    card = farebox.card(balance="10.00")
    run = killed_tap(farebox, card, a, ago(60), failpoint)
    if failpoint == "before-durable-mark":  # the result was shown, then the process died
        assert json.loads(run.out)["outcome"] == "approved"
    assert write_states(farebox, a) == ["committed"]
    closed = clearing.settle(a)
    assert closed["held_back"] == 0 and closed["in_doubt"] == 0
    assert closed["closed"][0]["totals"] == {"committed": {"payment": {"count": 1,
                                                                        "amount": "1.00"}}}
    report = clearing.report()
    assert committed_payments(report) == lost(farebox, card) == 100
    assert report["open"] == [] and report["counter_forks"] == []


def test_kill_9_of_the_daemon_with_the_card_on_the_reader_loses_no_mark(farebox, clearing):
    """``farebox run`` on a card file: the card stays in the field after its tap, the daemon
    waits for it to leave; SIGKILL then. The restarted terminal holds the tap committed."""
    a = clearing.terminal("T-A")
    card = farebox.card(balance="10.00")
    daemon = subprocess.Popen([str(CONSOLE_SCRIPT), "run", "--reader", f"sim:{card}", "--fare",
                               "1.00", "--state", str(a), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if k != "FAREBOX_DEBUG"})
    try:
        event = json.loads(daemon.stdout.readline() or "{}")
        assert event.get("outcome") == "approved", daemon.stderr.read() if not event else event
        daemon.send_signal(signal.SIGKILL)  # the card is still on the reader
        daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == -signal.SIGKILL
    assert write_states(farebox, a) == ["committed"]
    assert clearing.settle(a)["held_back"] == 0
    report = clearing.report()
    assert committed_payments(report) == lost(farebox, card) == 100 and report["open"] == []


# -- writes in doubt for a batch period --------------------------------------------------------


def test_a_write_in_doubt_a_batch_period_old_is_settled_by_the_cards_next_change(farebox,
                                                                                 clearing):
    a, b = clearing.terminal("T-A"), clearing.terminal("T-B")
    card = farebox.card(balance="10.00")
    # the state a power cut that lost the mark leaves: the intent, the card written
    killed_tap(farebox, card, a, ago(120), "after-log-write")
    assert write_states(farebox, a) == ["intent"]
    closed = clearing.settle(a)
    assert closed["closed"][0]["totals"] == {"in_doubt": {"payment": {"count": 1,
                                                                       "amount": "1.00"}}}
    assert (closed["held_back"], closed["in_doubt"]) == (0, 1)
    shown = farebox("journal", "show", "1", "--state", a, "--json").json()
    assert shown["write_state"] == "intent" and shown["upload"] == "acknowledged"
    assert [b["settled_as"] for b in shown["batches"]] == ["in_doubt"]
    report = clearing.report()
    assert [(o["terminal_id"], o["seq"], o["state"]) for o in report["open"]] == [
        ("T-A", 1, "in_doubt")]
    assert committed_payments(report) == 0
    # the card's next change, at another terminal
    assert tap(farebox, card, b, ago(60))["balance_before"] == "9.00"
    clearing.settle(b)
    report = clearing.report()
    assert committed_payments(report) == lost(farebox, card) == 200
    assert report["open"] == [] and report["counter_forks"] == []
    # the card back at T-A: its own word (committed) replaces the receiver's, counted once
    tap(farebox, card, a, ago(30))
    assert write_states(farebox, a) == ["committed", "committed"]
    closed = clearing.settle(a)
    assert closed["in_doubt"] == 0
    shown = farebox("journal", "show", "1", "--state", a, "--json").json()
    assert [b["settled_as"] for b in shown["batches"]] == ["in_doubt", "committed"]
    report = clearing.report()
    assert committed_payments(report) == lost(farebox, card) == 300
    assert report["totals"]["committed"]["payment"]["count"] == 3
    assert report["open"] == [] and report["counter_forks"] == [] and clearing.listed() == []


def test_a_tap_cut_off_whose_card_paid_elsewhere_is_void_and_the_card_not_listed(farebox,
                                                                                 clearing):
    """The customer pulled the card away mid-tap and paid at the next gate: the write in doubt
    rides not_shown, the receiver voids it, and that is no fork."""
    a, b = clearing.terminal("T-A"), clearing.terminal("T-B")
    card = farebox.card(balance="10.00")
    cut = farebox("tap", card, "--fare", "1.00", "--at", ago(120), "--state", a,
                  "--leave-after", 3, "--json")
    assert cut.code == 1 and "tap the card again" in cut.err
    tap(farebox, card, b, ago(119))
    clearing.settle(a)
    clearing.settle(b)
    report = clearing.report()
    assert report["totals"]["void"] == {"payment": {"count": 1, "amount": "1.00"}}
    assert committed_payments(report) == lost(farebox, card) == 100
    assert report["open"] == [] and report["counter_forks"] == [] and clearing.listed() == []


# -- a restored card image ---------------------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["before-durable-mark", "after-log-write"])
def test_a_card_image_restored_after_an_approval_is_a_fork_and_the_card_refused(
        farebox, clearing, failpoint):
    """A copy of the card image taken before the tap, written back after it and used at another
    terminal. ``before-durable-mark``: the approval was shown and its mark survived the
    process; ``after-log-write``: the state a power cut that lost the mark leaves (the record
    rides in doubt, its result may have been shown). Either way the receiver sees two changes
    from one counter and lists the card."""
    a, b = clearing.terminal("T-A"), clearing.terminal("T-B")
    card = farebox.card(number="12345678", balance="10.00")
    copy = farebox.path("copy.json")
    shutil.copy(card, copy)
    killed_tap(farebox, card, a, ago(120), failpoint)
    shutil.copy(copy, card)  # the pre-tap image written back
    assert tap(farebox, card, b, ago(60))["balance_before"] == "10.00"
    clearing.settle(a)
    clearing.settle(b)
    report = clearing.report()
    assert report["counter_forks"] == [{"card": 12345678, "counter": 1, "writes": 2}]
    assert clearing.listed() == [12345678]
    fetched = farebox("actions", "fetch", "--state", b, "--config", clearing.config, "--json")
    assert fetched.json()["entries"] == 1
    later = (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()
    refused = tap(farebox, card, b, later, "--config", clearing.config)
    assert (refused["outcome"], refused["reason"]) == ("declined", "cancelled")
