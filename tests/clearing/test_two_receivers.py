"""Two receiver processes on one database (issue 18 item 3): 32 terminals, whose taps share 8
cards, send every batch to both receivers in a random order, all at once. Each record is stored
once, every answer is a signed ack naming the batch, and the report (read from the kept
summaries) is exactly what the terminals did and equal to what the records table says.

On SQLite (one file, two processes) and on the private PostgreSQL cluster (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from farebox.clearing.store import Store
from farebox.protocol.session import LiteSSession
from farebox.protocol.settlement import SignedAck
from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.card.tap import Terminal
from farebox.terminal.core.rules import Tariff
from farebox.terminal.link.upload import upload_payload
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.store.settlement import Settlement

CONSOLE_SCRIPT = Path(sys.executable).parent / "farebox"
KEYS = published_test_keys()
AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8)))
FARE = 580
TERMINALS, CARDS, ROUNDS = 32, 8, 4


@contextlib.contextmanager
def receiver(db: str):
    process = subprocess.Popen([str(CONSOLE_SCRIPT), "clearing", "serve", "--db", db,
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = process.stdout.readline()
        assert line, process.communicate(timeout=10)
        yield json.loads(line)["url"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        assert "Traceback" not in err, err


def card(number: int) -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=number,
                                      balance_cents=100_000), KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


def fleet(folder: Path):
    """32 terminals that each paid 4 times, on cards shared round-robin, in 2 batches each."""
    stations = []
    for t in range(TERMINALS):
        name = f"T-{t:04d}"
        identity = init_identity(folder / name, name, AT)
        journal = Journal(folder / name / "journal.sqlite3", terminal_id=name)
        stations.append((name, identity, journal, Terminal(journal, KEYS),
                         Settlement(journal, identity)))
    cards = [card(10_000_001 + c) for c in range(CARDS)]
    batches = {name: [] for name, *_ in stations}
    for r in range(ROUNDS):
        for t, (name, identity, journal, terminal, settlement) in enumerate(stations):
            at = AT + timedelta(minutes=r * 60 + t)
            outcome = terminal.pay(LiteSSession(InProcessTransport(cards[(t + r) % CARDS])),
                                   Tariff.flat(FARE), at)
            assert outcome.approved, outcome
            if r % 2 == 1:
                batch = settlement.close_batch(at + timedelta(minutes=1))
                batches[name].append(upload_payload(settlement, batch))
    return stations, batches


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "clearing.sqlite3")
    return request.getfixturevalue("pg_url")


def test_two_receivers_store_each_record_once_and_the_report_is_exact(db, tmp_path):
    stations, batches = fleet(tmp_path / "fleet")
    with Store(db) as store:
        for name, identity, *_ in stations:
            assert store.enroll(name, identity.public_key.hex(), "2026-11-22T00:00:00Z")
    from farebox.clearing.service import Receiver

    with Store(db) as store:
        receiver_key = Receiver(store).public_key
    answers, failures = [], []
    rng = random.Random(18)
    orders = {name: [rng.sample([0, 1], 2) for _ in batches[name]] for name in batches}
    with receiver(db) as first, receiver(db) as second:
        urls = (first, second)

        def send(name):
            with httpx.Client(timeout=60) as client:
                for payload, order in zip(batches[name], orders[name]):
                    for which in order:
                        for _ in range(200):  # a busy receiver says 503: again, as terminals do
                            try:
                                response = client.post(f"{urls[which]}/v1/batches",
                                                       json=payload)
                            except httpx.TransportError:
                                # a receiver at its bound answers 503 before reading the body
                                # and closes: a client still sending may see the reset instead
                                time.sleep(0.1)
                                continue
                            if response.status_code != 503:
                                break
                            time.sleep(float(response.headers.get("retry-after", "1")) / 10)
                        if response.status_code != 200:
                            failures.append((name, which, response.status_code, response.text))
                            continue
                        answers.append((payload, SignedAck.from_json(response.json())))

        threads = [threading.Thread(target=send, args=(name,)) for name in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert len(answers) == 2 * sum(len(b) for b in batches.values())
    for payload, signed in answers:
        ack = signed.verify(receiver_key)
        assert (ack.terminal_id, ack.number, ack.hash) == (
            payload["terminal_id"], payload["number"], payload["hash"])
    # each batch acknowledged as new exactly once, and again once
    fresh = [a.verify(receiver_key) for _, a in answers]
    assert sum(not a.again for a in fresh) == sum(len(b) for b in batches.values())

    from farebox.clearing.report import build

    with Store(db) as store:
        report = build(store)
        stored = store._all("SELECT count(*), count(DISTINCT CAST(source AS TEXT) || ':' || "  # noqa: SLF001
                            "CAST(seq AS TEXT)) FROM records")[0]
        truth = store._all("SELECT state, type, count(*), CAST(sum(amount_cents) AS BIGINT) "  # noqa: SLF001
                           "FROM records GROUP BY state, type ORDER BY state, type")
    taps = TERMINALS * ROUNDS
    assert stored == (taps, taps)
    assert report["totals"] == {"committed": {"payment": {"count": taps,
                                                          "amount": f"{taps * FARE / 100:.2f}"}}}
    assert truth == [("committed", "payment", taps, taps * FARE)]
    assert report["terminals"] == [
        {"terminal_id": name, "incarnation": identity.incarnation, "records": ROUNDS,
         "last_seq": ROUNDS, "gaps": []} for name, identity, *_ in stations]
    assert report["duplicates_ignored"] == 0
    assert report["open"] == [] and report["counter_forks"] == []
    for *_, journal, _, _ in stations:
        journal.close()
