"""``farebox terminal init`` and ``farebox batch close|list|verify`` from the command line."""

from __future__ import annotations

import json
import sqlite3

AT = "2026-11-22T08:00:00+08:00"


def init(farebox, terminal_id="T-0001"):
    return farebox("terminal", "init", "--state", farebox.state, "--id", terminal_id, "--json")


def test_init_prints_the_public_key_and_refuses_a_second_time(farebox):
    made = init(farebox).json()
    assert made["terminal_id"] == "T-0001" and len(made["public_key"]) == 64
    assert len(made["incarnation"]) == 16
    init(farebox).assert_bad_input()
    assert "already holds terminal T-0001" in init(farebox).err


def test_init_refuses_a_journal_of_another_terminal_and_bad_ids(farebox):
    card = farebox.card(balance="10.00")
    farebox.tap(card, "--fare", "1.00", at=AT).json()  # the journal gets an id of its own
    refused = init(farebox, "T-0001")
    refused.assert_bad_input()
    assert "belongs to terminal" in refused.err
    assert not (farebox.state / "identity.key").exists()
    bad = farebox("terminal", "init", "--state", farebox.path("other"), "--id", "bad id")
    bad.assert_bad_input()
    assert "terminal id" in bad.err


def test_batches_without_an_identity_are_one_line(farebox):
    run = farebox("batch", "close", "--state", farebox.state)
    run.assert_bad_input()
    assert "terminal init" in run.err


def test_close_list_verify_and_an_interrupted_tap_riding_later(farebox):
    # timed from the real clock: a write in doubt waits for its card within a batch period of
    # the close (`batch_max_age_s`, 15 min); test_in_doubt.py has one older than that
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    init(farebox).json()
    card = farebox.card(balance="10.00")
    at = (now - timedelta(minutes=10)).isoformat()
    assert farebox.tap(card, "--fare", "1.00", at=at).json()["outcome"] == "approved"
    cut = farebox("tap", card, "--fare", "1.00", "--at",
                  (now - timedelta(minutes=9, seconds=40)).isoformat(), "--state",
                  farebox.state, "--leave-after", 4, "--json")
    assert cut.code == 1 and "tap the card again" in cut.err
    closed = farebox("batch", "close", "--state", farebox.state, "--json").json()
    assert [b["records"] for b in closed["closed"]] == [1] and closed["held_back"] == 1
    assert closed["in_doubt"] == 0
    assert closed["closed"][0]["totals"] == {"committed": {"payment": {"count": 1,
                                                                        "amount": "1.00"}}}
    farebox.tap(card, "--fare", "1.00", at=(now - timedelta(minutes=1)).isoformat()).json()
    again = farebox("batch", "close", "--state", farebox.state, "--json").json()
    assert [(b["first_seq"], b["last_seq"]) for b in again["closed"]] == [(2, 3)]
    assert again["held_back"] == 0
    assert again["closed"][0]["totals"]["void"] == {"payment": {"count": 1, "amount": "1.00"}}
    listing = farebox("batch", "list", "--state", farebox.state, "--json").json()
    assert [b["number"] for b in listing["batches"]] == [1, 2]
    assert not any(b["acked"] for b in listing["batches"]) and listing["ready"] == 0
    human = farebox("batch", "list", "--state", farebox.state)
    assert human.code == 0 and "batch 2" in human.out
    verified = farebox("batch", "verify", "--state", farebox.state, "--json").json()
    assert verified == {"ok": True, "batches": 2, "bad_batch": None, "problem": None}
    deep = farebox("batch", "verify", "--deep", "--state", farebox.state, "--json").json()
    assert deep == verified
    nothing = farebox("batch", "close", "--state", farebox.state)
    assert nothing.code == 0 and "nothing to close" in nothing.out


def test_verify_exits_3_on_a_tampered_batch(farebox):
    init(farebox).json()
    card = farebox.card(balance="10.00")
    farebox.tap(card, "--fare", "1.00", at=AT).json()
    farebox("batch", "close", "--state", farebox.state, "--json").json()
    with sqlite3.connect(farebox.state / "journal.sqlite3") as db:
        db.execute("UPDATE batches SET body = replace(body, '\"amount_cents\":100', "
                   "'\"amount_cents\":1')")
    run = farebox("batch", "verify", "--state", farebox.state, "--json")
    assert run.code == 3 and '"bad_batch": 1' in run.out and "hash" in run.out


def test_verify_deep_hashes_each_record_again(farebox):
    """A batch re-signed with the terminal's key over a record changed after its hash was made
    (a bug, an insider), its totals and stored totals kept consistent: the default check trusts
    the signed hashes; --deep hashes the record again and exits 3."""
    import hashlib

    from farebox.protocol.settlement import canonical
    from farebox.terminal.store.identity import load_identity

    init(farebox).json()
    card = farebox.card(balance="10.00")
    farebox.tap(card, "--fare", "1.00", at=AT).json()
    farebox("batch", "close", "--state", farebox.state, "--json").json()
    identity = load_identity(farebox.state)
    with sqlite3.connect(farebox.state / "journal.sqlite3") as db:
        body, = db.execute("SELECT body FROM batches WHERE number = 1").fetchone()
        parsed = json.loads(body)
        parsed["items"][0]["record"]["balance_after_cents"] += 1
        text = canonical(parsed)
        db.execute("UPDATE batches SET body = ?, hash = ?, signature = ? WHERE number = 1",
                   (text, hashlib.sha256(text.encode()).hexdigest(),
                    identity.sign(text.encode()).hex()))
    assert farebox("batch", "verify", "--state", farebox.state, "--json").json()["ok"]
    run = farebox("batch", "verify", "--deep", "--state", farebox.state, "--json")
    assert run.code == 3 and "does not match its hash" in run.out
