"""The clearing receiver's rules without HTTP: what it accepts, stores once, and refuses."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from farebox.clearing.report import build, gaps
from farebox.clearing.service import Receiver, Refused
from farebox.clearing.store import Store
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.store.settlement import Settlement
from farebox.terminal.card.tap import Terminal
from farebox.terminal.link.upload import upload_payload

from .test_tap import KEYS, new_card, pay

NOW = datetime(2026, 11, 22, 16, 0, tzinfo=timezone.utc)


@pytest.fixture
def rig(tmp_path):
    identity = init_identity(tmp_path / "t", "T-0001", NOW)
    with Journal(tmp_path / "t" / "journal.sqlite3", terminal_id="T-0001") as journal, \
            Store(str(tmp_path / "clearing.sqlite3")) as store:
        terminal, card = Terminal(journal, KEYS), new_card(balance_cents=50_000)
        for _ in range(5):
            pay(terminal, card)
        settlement = Settlement(journal, identity)
        batches = [settlement.close_batch(NOW, 2) for _ in range(3)]
        store.enroll("T-0001", identity.public_key.hex(), "2026-11-22T00:00:00Z")
        yield Receiver(store), settlement, batches, store


def send(receiver, settlement, batch, **changes):
    return receiver.ingest({**upload_payload(settlement, batch), **changes}, "2026-11-22T16:00:00Z")


def test_batches_in_order_are_stored_once_and_acknowledged_by_name(rig):
    receiver, settlement, batches, store = rig
    acks = [send(receiver, settlement, b) for b in batches]
    assert [a.number for a in acks] == [1, 2, 3] and all(not a.again for a in acks)
    assert acks[0].hash == batches[0].hash and acks[0].records == 2
    again = send(receiver, settlement, batches[1])
    assert again.again and again.hash == batches[1].hash
    report = build(store)
    assert report["totals"] == {"committed": {"payment": {"count": 5, "amount": "29.00"}}}
    assert report["terminals"][0]["last_seq"] == 5 and report["terminals"][0]["gaps"] == []


def test_out_of_order_unknown_tampered_and_replayed_batches_are_refused(rig):
    receiver, settlement, batches, store = rig
    with pytest.raises(Refused) as refused:
        send(receiver, settlement, batches[1])
    assert refused.value.status == 409 and "out of order" in refused.value.reason
    with pytest.raises(Refused) as refused:
        send(receiver, settlement, batches[0], terminal_id="T-9999")
    assert refused.value.status == 403
    tampered = batches[0].body.replace('"amount_cents":580', '"amount_cents":5', 1)
    with pytest.raises(Refused) as refused:
        send(receiver, settlement, batches[0], body=tampered)
    assert refused.value.status == 422 and "hash" in refused.value.reason
    send(receiver, settlement, batches[0])
    with pytest.raises(Refused) as refused:  # batch 2's body sent as batch 1 again
        send(receiver, settlement, batches[1], number=1)
    assert refused.value.status == 422
    # the terminal's key signing another batch 1 (a state restored from a backup, say)
    import hashlib

    other = json.loads(batches[0].body)
    other["closed_utc"] = "2026-11-23T00:00:00Z"
    text = json.dumps(other, sort_keys=True, separators=(",", ":"))
    with pytest.raises(Refused) as refused:
        send(receiver, settlement, batches[0], body=text,
             hash=hashlib.sha256(text.encode()).hexdigest(),
             signature=settlement.identity.sign(text.encode()).hex())
    assert refused.value.status == 409 and "another hash" in refused.value.reason
    assert build(store)["totals"]["committed"]["payment"]["count"] == 2


@pytest.mark.parametrize("upload", [None, [], "x", {"terminal_id": "T-0001"},
                                    {"terminal_id": 1, "incarnation": "a", "number": 1,
                                     "body": "{}", "hash": "", "signature": ""},
                                    {"terminal_id": "T-0001", "incarnation": "a",
                                     "number": True, "body": "{}", "hash": "",
                                     "signature": ""}])
def test_malformed_uploads_are_400(rig, upload):
    receiver = rig[0]
    with pytest.raises(Refused) as refused:
        receiver.ingest(upload, "2026-11-22T16:00:00Z")
    assert refused.value.status == 400


def test_a_signed_batch_with_a_garbage_body_is_refused_not_crashed(rig, tmp_path):
    receiver, settlement, batches, store = rig
    import hashlib

    body = json.dumps({"format": 1, "batch": 1, "items": [{"record": 5}], "totals": {}})
    signature = settlement.identity.sign(body.encode()).hex()
    with pytest.raises(Refused) as refused:
        send(receiver, settlement, batches[0], body=body,
             hash=hashlib.sha256(body.encode()).hexdigest(), signature=signature)
    assert refused.value.status == 422


def test_gaps_are_the_missing_runs():
    assert gaps([1, 2, 3]) == [] and gaps([2, 3, 7]) == [[1, 1], [4, 6]]


def test_clock_resets_ride_in_a_batch_and_are_accepted_with_amount_zero_and_no_fork(rig):
    receiver, settlement, batches, store = rig
    for batch in batches:
        send(receiver, settlement, batch)
    journal = settlement.journal
    hashes_before = journal.record_hashes()
    first = journal.reset_clock(datetime(2026, 11, 22, 17, 0, tzinfo=timezone.utc), "RTC lost")
    second = journal.reset_clock(datetime(2026, 11, 22, 18, 0, tzinfo=timezone.utc), "again")
    assert (first.seq, second.seq) == (6, 7) and journal.verify_chain()
    assert journal.record_hashes() == {**hashes_before, 6: first.hash, 7: second.hash}
    batch = settlement.close_batch(NOW)
    assert batch.items == 2 and settlement.verify()
    ack = send(receiver, settlement, batch)
    assert ack.records == 2 and not ack.again
    report = build(store)
    assert report["totals"]["committed"]["clock_reset"] == {"count": 2, "amount": "0.00"}
    assert store.counter_forks() == [] and store.actions()[1] == []  # card 0 is no card's fork
