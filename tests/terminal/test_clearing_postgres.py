"""The clearing store's SQL on a real PostgreSQL: a private cluster (tests/conftest.py),
the same receiver flow as on SQLite.

As root or in CI this must run (``apt-get install postgresql``); elsewhere it skips loudly."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from farebox.clearing.report import build
from farebox.clearing.service import Receiver, Refused
from farebox.clearing.store import Store
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.store.settlement import Settlement
from farebox.terminal.link.signedlist import verify
from farebox.terminal.card.tap import Terminal
from farebox.terminal.link.upload import upload_payload

from .test_tap import KEYS, new_card, pay

NOW = datetime(2026, 11, 22, 16, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(pg_url):
    with Store(pg_url) as store:
        yield store


def test_the_receiver_flow_runs_unchanged_on_postgresql(store, tmp_path):
    identity = init_identity(tmp_path / "t", "T-0001", NOW)
    with Journal(tmp_path / "t" / "journal.sqlite3", terminal_id="T-0001") as journal:
        terminal, card = Terminal(journal, KEYS), new_card(balance_cents=50_000)
        for _ in range(5):
            pay(terminal, card)
        settlement = Settlement(journal, identity)
        batches = [settlement.close_batch(NOW, 2) for _ in range(3)]
        assert store.enroll("T-0001", identity.public_key.hex(), "2026-11-22T00:00:00Z")
        assert not store.enroll("T-0001", identity.public_key.hex(), "2026-11-22T00:00:00Z")
        receiver = Receiver(store)
        with pytest.raises(Refused) as refused:
            receiver.ingest(upload_payload(settlement, batches[1]), "2026-11-22T16:00:00Z")
        assert refused.value.status == 409
        acks = [receiver.ingest(upload_payload(settlement, b), "2026-11-22T16:00:00Z")
                for b in batches]
        assert [a.records for a in acks] == [2, 2, 1]
        again = receiver.ingest(upload_payload(settlement, batches[0]), "2026-11-22T16:00:00Z")
        assert again.again
    report = build(store)
    json.dumps(report)  # plain JSON types, whatever the driver returns
    assert report["totals"] == {"committed": {"payment": {"count": 5, "amount": "29.00"}}}
    assert report["terminals"] == [{"terminal_id": "T-0001", "incarnation": identity.incarnation,
                                    "records": 5, "last_seq": 5, "gaps": []}]
    assert report["duplicates_ignored"] == 0 and report["counter_forks"] == []
    serial = receiver.add_action(12345678, "lost", "2026-11-22T00:00:00Z", "2026-11-22T16:00:00Z")
    document = receiver.action_list(NOW)
    assert verify(document, receiver.public_key, NOW).serial == serial == 1
    assert Receiver(store).public_key == receiver.public_key  # the key is kept
