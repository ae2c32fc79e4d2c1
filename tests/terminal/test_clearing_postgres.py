"""The clearing store's SQL on a real PostgreSQL: a private cluster (initdb into a temporary
directory, its own socket directory and a free loopback port, run as the ``postgres`` user),
the same receiver flow as on SQLite, then stopped.

As root or in CI this must run (``apt-get install postgresql``); elsewhere it skips loudly."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

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


def _cannot_run(reason: str) -> None:
    message = f"PostgreSQL clearing tests NOT RUN: {reason}"
    if os.geteuid() == 0 or os.environ.get("CI"):
        pytest.fail(f"{message}; as root or in CI they must run (apt-get install postgresql)")
    pytest.skip(message)


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        _cannot_run("initdb/pg_ctl not found")
    if os.geteuid() != 0:
        _cannot_run("starting a private cluster here needs root (to run it as postgres)")
    folder = Path(tempfile.mkdtemp(prefix="fb-pg-"))
    data = folder / "data"
    shutil.chown(folder, "postgres")
    os.chmod(folder, 0o700)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def as_postgres(*argv):
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                              text=True, timeout=60)

    made = as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
    assert made.returncode == 0, made.stderr
    started = as_postgres(pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                          f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    assert started.returncode == 0, started.stderr + (folder / "log").read_text()
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def store(postgres_url):
    with Store(postgres_url) as store:
        for table in ("records", "batches", "terminals", "actions", "meta"):
            store._execute(f"DELETE FROM {table}")  # noqa: SLF001 - a clean slate per test
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
    serial = receiver.add_action(12345678, "lost", "2026-11-22T00:00:00Z", "x")
    document = receiver.action_list(NOW)
    assert verify(document, receiver.public_key, NOW).serial == serial == 1
    assert Receiver(store).public_key == receiver.public_key  # the key is kept
