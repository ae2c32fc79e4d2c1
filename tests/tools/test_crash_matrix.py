"""Crash matrix: the real console script killed (``os._exit``: no cleanup, as ``kill -9`` would)
at every failpoint of a tap and of a batch close, then run again: the card is presented again,
batches closed. Whatever the crash, the card's balance is its initial value less what the batches
settle as committed, every record is settled once, and the batches verify. Then the same for a
card that never comes back to the terminal that was killed (its write rides in doubt and the
receiver settles it), and ``farebox run`` killed with SIGKILL at random moments and just after
the card is written, many times over."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from farebox.terminal.failpoints import FAILPOINT_EXIT, FAILPOINTS

AT = "2026-11-22T08:00:00+08:00"
RETAP = "2026-11-22T08:00:20+08:00"  # inside the re-tap window
LATER = "2026-11-22T08:10:00+08:00"
TAP_FAILPOINTS = [name for name in FAILPOINTS if not name.startswith(("batch-", "upload-"))]
BATCH_FAILPOINTS = [name for name in FAILPOINTS if name.startswith("batch-")]
UPLOAD_FAILPOINTS = [name for name in FAILPOINTS if name.startswith("upload-")]


def settled_cents(farebox) -> tuple[int, list[tuple[int, str]]]:
    """What the batches say the card lost (payments less loads), and every (seq, state)."""
    moved, keys = 0, []
    with_items = farebox("batch", "list", "--state", farebox.state, "--json").json()
    assert with_items["held_back"] == 0 and with_items["ready"] == 0
    import sqlite3

    with sqlite3.connect(farebox.state / "journal.sqlite3") as db:
        bodies = [row[0] for row in db.execute("SELECT body FROM batches ORDER BY number")]
    for body in bodies:
        for item in json.loads(body)["items"]:
            record = item["record"]
            keys.append((record["seq"], item["state"]))
            if item["state"] == "committed":
                sign = 1 if record["type"] == "payment" else -1
                moved += sign * record["amount_cents"]
    return moved, keys


def cents(amount: str) -> int:
    return round(float(amount) * 100)


def test_every_failpoint_is_listed_in_order(farebox):
    listed = farebox("failpoints", "--json").json()
    assert [f["name"] for f in listed["failpoints"]] == list(FAILPOINTS)
    assert listed["exit_status"] == FAILPOINT_EXIT


def test_an_unknown_failpoint_is_bad_input(farebox):
    run = farebox.script("failpoints", env={"FAREBOX_FAILPOINT": "after-lunch"})
    run.assert_bad_input()


@pytest.mark.parametrize("failpoint", TAP_FAILPOINTS)
def test_a_tap_killed_at_each_failpoint_loses_nothing_and_counts_nothing_twice(farebox,
                                                                               failpoint):
    init = farebox("terminal", "init", "--state", farebox.state, "--id", "T-0001", "--json")
    init.json()
    card = farebox.card(balance="10.00")
    killed = farebox.script("tap", card, "--fare", "1.00", "--at", AT, "--state", farebox.state,
                            "--json", env={"FAREBOX_FAILPOINT": failpoint})
    assert killed.code == FAILPOINT_EXIT, killed
    assert f"failpoint {failpoint}" in killed.err
    # the card comes back (within the re-tap window), then once more later
    again = farebox.tap(card, "--fare", "1.00", at=RETAP).json()
    later = farebox.tap(card, "--fare", "1.00", at=LATER).json()
    assert again["outcome"] == later["outcome"] == "approved"
    shown = farebox.show(card)
    assert shown["balance"] == later["balance_after"]
    closed = farebox("batch", "close", "--state", farebox.state, "--json").json()
    assert closed["held_back"] == 0
    moved, keys = settled_cents(farebox)
    assert cents("10.00") - moved == cents(shown["balance"])
    assert len(keys) == len(set(keys))  # a (seq, state) pair is settled once
    committed = [seq for seq, state in keys if state == "committed"]
    assert len(committed) == len(set(committed))
    # two or three payments, depending on whether the killed tap's value had moved
    landed = failpoint != "after-intent"
    assert moved == cents("1.00") * (2 + (landed and again["completed_from"] is None))
    assert farebox("batch", "verify", "--state", farebox.state, "--json").json()["ok"]
    assert farebox("journal", "verify", "--state", farebox.state, "--json").json()["ok"]


@pytest.mark.parametrize("failpoint", BATCH_FAILPOINTS)
def test_a_batch_close_killed_at_each_failpoint_settles_each_record_once(farebox, failpoint):
    farebox("terminal", "init", "--state", farebox.state, "--id", "T-0001", "--json").json()
    card = farebox.card(balance="10.00")
    for at in (AT, LATER):
        farebox.tap(card, "--fare", "1.00", at=at).json()
    killed = farebox.script("batch", "close", "--state", farebox.state, "--max-records", "1",
                            env={"FAREBOX_FAILPOINT": failpoint})
    assert killed.code == FAILPOINT_EXIT, killed
    listed = farebox("batch", "list", "--state", farebox.state, "--json").json()
    assert len(listed["batches"]) == (1 if failpoint == "batch-after-commit" else 0)
    farebox("batch", "close", "--state", farebox.state, "--json").json()
    moved, keys = settled_cents(farebox)
    assert sorted(keys) == [(1, "committed"), (2, "committed")]
    assert moved == cents("10.00") - cents(farebox.show(card)["balance"]) == cents("2.00")
    assert farebox("batch", "verify", "--state", farebox.state, "--json").json()["ok"]


@pytest.mark.parametrize("failpoint", TAP_FAILPOINTS + BATCH_FAILPOINTS + UPLOAD_FAILPOINTS)
def test_any_crash_then_upload_settles_each_value_movement_at_the_receiver_once(farebox,
                                                                                failpoint):
    """The whole path: a tap, a batch close or an upload killed at the failpoint, then everything
    run again and uploaded to a real receiver (uvicorn): its committed totals are exactly what
    the card lost, every record once."""
    from .test_clearing_http import CONSOLE_SCRIPT, start_receiver, trusting

    made = farebox("terminal", "init", "--state", farebox.state, "--id", "T-0001",
                   "--json").json()
    with start_receiver(farebox.path("clearing.sqlite3")) as url:
        db = str(farebox.path("clearing.sqlite3"))
        assert farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey",
                       made["public_key"]).code == 0
        house = trusting(farebox, db, url)  # the receiver's key: its acks are signed
        card = farebox.card(balance="10.00")
        env = {"FAREBOX_FAILPOINT": failpoint}
        tap = ["tap", card, "--fare", "1.00", "--state", farebox.state, "--json"]
        first = farebox.script(*tap, "--at", AT, env=env if failpoint in TAP_FAILPOINTS else {})
        assert first.code == (FAILPOINT_EXIT if failpoint in TAP_FAILPOINTS else 0), first
        farebox.tap(card, "--fare", "1.00", at=RETAP).json()
        close = farebox.script("batch", "close", "--state", farebox.state, "--max-records", "1",
                               env=env if failpoint in BATCH_FAILPOINTS else {})
        assert close.code == (FAILPOINT_EXIT if failpoint in BATCH_FAILPOINTS else 0), close
        sent = farebox.script("upload", "--state", farebox.state, "--config", house,
                              env=env if failpoint in UPLOAD_FAILPOINTS else {})
        assert sent.code == (FAILPOINT_EXIT if failpoint in UPLOAD_FAILPOINTS else 0), sent
        # everything again, cleanly: the card once more, close, upload
        farebox.tap(card, "--fare", "1.00", at=LATER).json()
        farebox("batch", "close", "--state", farebox.state, "--json").json()
        done = farebox("upload", "--state", farebox.state, "--config", house, "--json").json()
        assert done["pending"] == 0
        report = farebox("clearing", "report", "--db", db, "--json").json()
    lost = cents("10.00") - cents(farebox.show(card)["balance"])
    paid = report["totals"]["committed"]["payment"]
    assert cents(paid["amount"]) == lost
    assert report["terminals"][0]["gaps"] == [] and report["open"] == []
    assert report["counter_forks"] == []
    assert CONSOLE_SCRIPT.is_file()


@pytest.mark.parametrize("tear", [("--leave-after", n) for n in range(0, 7)]
                         + [("--torn-write", n) for n in (1, 2, 3)])
def test_every_tear_then_upload_settles_what_the_card_lost_once(farebox, tear):
    """The tear matrix, through to a real receiver: a card pulled away after every number of
    commands, and every block write landing torn; then presented again, closed and uploaded."""
    from .test_clearing_http import start_receiver, trusting

    made = farebox("terminal", "init", "--state", farebox.state, "--id", "T-0001",
                   "--json").json()
    db = farebox.path("clearing.sqlite3")
    with start_receiver(db) as url:
        farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey",
                made["public_key"]).code == 0
        house = trusting(farebox, db, url)
        card = farebox.card(balance="10.00")
        cut = farebox("tap", card, "--fare", "1.00", "--at", AT, "--state", farebox.state,
                      *tear, "--json")
        assert cut.code in (0, 1), cut
        for at in (RETAP, LATER):
            farebox.tap(card, "--fare", "1.00", at=at).json()
        farebox("batch", "close", "--state", farebox.state, "--json").json()
        assert farebox("upload", "--state", farebox.state, "--config", house,
                       "--json").json()["pending"] == 0
        report = farebox("clearing", "report", "--db", db, "--json").json()
    lost = cents("10.00") - cents(farebox.show(card)["balance"])
    assert cents(report["totals"]["committed"]["payment"]["amount"]) == lost
    assert lost in (cents("2.00"), cents("3.00"))
    assert report["open"] == [] and report["counter_forks"] == []


@pytest.mark.parametrize("failpoint", TAP_FAILPOINTS)
def test_a_tap_killed_at_each_failpoint_whose_card_goes_elsewhere_settles_at_the_receiver(
        farebox, failpoint):
    """The killed terminal never sees the card again: a batch period later its write rides in
    doubt (unless its mark survived the process), the card's next change at another terminal
    settles it. A write that did not land and whose result the terminal cannot tell was not
    shown (it died, it was not cut off) is void, and counts as a change from its counter: the
    card is a counter fork and is listed, as a card image restored after an approval would be."""
    from .test_clearing_http import start_receiver, trusting

    now = datetime.now(timezone.utc).replace(microsecond=0)
    db = farebox.path("clearing.sqlite3")
    states = {name: farebox.path(name) for name in ("T-A", "T-B")}
    with start_receiver(db) as url:
        for name, state in states.items():
            made = farebox("terminal", "init", "--state", state, "--id", name, "--json").json()
            assert farebox("clearing", "enroll", "--db", db, "--terminal", name, "--pubkey",
                           made["public_key"]).code == 0
        card = farebox.card(number="12345678", balance="10.00")
        killed = farebox.script("tap", card, "--fare", "1.00", "--at",
                                (now - timedelta(hours=2)).isoformat(), "--state",
                                states["T-A"], "--json", env={"FAREBOX_FAILPOINT": failpoint})
        assert killed.code == FAILPOINT_EXIT, killed
        for minutes in (60, 50):
            farebox.tap(card, "--fare", "1.00", at=(now - timedelta(minutes=minutes)).isoformat(),
                        state=states["T-B"]).json()
        for state in states.values():
            farebox("batch", "close", "--state", state, "--json").json()
            assert farebox("upload", "--state", state, "--config", trusting(farebox, db, url),
                           "--json").json()["pending"] == 0
        report = farebox("clearing", "report", "--db", db, "--json").json()
    lost = cents("10.00") - cents(farebox.show(card)["balance"])
    assert cents(report["totals"]["committed"]["payment"]["amount"]) == lost
    assert lost == cents("1.00") * (2 + (failpoint != "after-intent"))
    assert report["open"] == [] and all(t["gaps"] == [] for t in report["terminals"])
    if failpoint == "after-intent":
        assert report["counter_forks"] == [{"card": 12345678, "counter": 1, "writes": 2}]
    else:
        assert report["counter_forks"] == []


KILLS = int(os.environ.get("FAREBOX_KILL_SOAK", "20"))


def test_farebox_run_killed_with_sigkill_again_and_again_settles_what_the_card_lost(farebox):
    """``farebox run`` on a card file (the card stays on the reader) started and killed with
    SIGKILL ``FAREBOX_KILL_SOAK`` times (default 20; the closing note of issue 17 ran 1,000):
    at a random moment, or a random few milliseconds after the card file first changes (the
    card being written). Each start presents the card again. After every kill: a tap whose
    approval was printed is committed. At the end, one clean tap, a batch close and an upload to
    a real receiver: its committed totals are exactly what the card lost, each record once."""
    from .test_clearing_http import CONSOLE_SCRIPT, start_receiver, trusting

    made = farebox("terminal", "init", "--state", farebox.state, "--id", "T-0001",
                   "--json").json()
    card = farebox.card(balance="300.00")
    journal = farebox.state / "journal.sqlite3"
    env = {k: v for k, v in os.environ.items() if k != "FAREBOX_DEBUG"}
    argv = [str(CONSOLE_SCRIPT), "run", "--reader", f"sim:{card}", "--fare", "0.10", "--state",
            str(farebox.state), "--json"]
    rng = random.Random(int(os.environ.get("FAREBOX_KILL_SEED", "17")))
    counts = {"kills": 0, "before_any_write": 0, "mid_tap_left_in_doubt": 0,
              "written_not_yet_shown": 0, "approved_then_killed": 0}
    writes = 0
    for _ in range(KILLS):
        before = card.stat().st_mtime_ns
        daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env=env)
        if rng.random() < 0.4:
            time.sleep(rng.uniform(0.0, 0.7))
        else:  # just after the card is first written: mid-tap, or just after it
            deadline = time.monotonic() + 10
            while card.stat().st_mtime_ns == before and time.monotonic() < deadline:
                time.sleep(0.0002)
            time.sleep(rng.choice([0, 0, 0.0003, 0.001, 0.002, 0.004, 0.008, 0.02]))
        daemon.send_signal(signal.SIGKILL)
        out, _ = daemon.communicate(timeout=30)
        counts["kills"] += 1
        newest, made_writes, last = None, 0, []
        if journal.exists():
            with sqlite3.connect(journal) as db:
                last = db.execute("SELECT rowid, tap_id, state, counter_before, counter_after, "
                                  "created_utc, resolved_utc FROM card_writes "
                                  "ORDER BY rowid DESC LIMIT 3").fetchall()
                newest = last[0][2:3] if last else None
                made_writes = db.execute("SELECT count(*) FROM card_writes").fetchone()[0]
        if out.strip():  # the approval was shown before the kill: its mark is in the journal
            assert json.loads(out.splitlines()[0])["outcome"] == "approved"
            counts["approved_then_killed"] += 1
            assert newest == ("committed",), (counts, out, last)
        elif made_writes == writes:
            counts["before_any_write"] += 1
        elif newest == ("intent",):
            counts["mid_tap_left_in_doubt"] += 1
        else:
            counts["written_not_yet_shown"] += 1
        writes = made_writes
    done = subprocess.run([*argv, "--max-taps", "1"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    db = farebox.path("clearing.sqlite3")
    with start_receiver(db) as url:
        assert farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey",
                       made["public_key"]).code == 0
        closed = farebox("batch", "close", "--state", farebox.state, "--json").json()
        assert closed["held_back"] == 0 and closed["in_doubt"] == 0
        assert farebox("upload", "--state", farebox.state, "--config",
                       trusting(farebox, db, url), "--json").json()["pending"] == 0
        report = farebox("clearing", "report", "--db", db, "--json").json()
    lost = cents("300.00") - cents(farebox.show(card)["balance"])
    paid = report["totals"]["committed"]["payment"]
    counts.update(taps=paid["count"], lost_cents=lost, settled_cents=cents(paid["amount"]))
    print(f"kill soak: {counts}")
    assert cents(paid["amount"]) == lost, counts
    assert report["open"] == [] and report["counter_forks"] == []
    assert report["terminals"][0]["gaps"] == [] and report["duplicates_ignored"] == 0
    assert counts["kills"] == KILLS
