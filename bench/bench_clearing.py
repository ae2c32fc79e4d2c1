"""The clearing receiver's ingest rate over HTTP (records/s; goal >= 2,000/s on SQLite), against a
bare baseline in the same run: the same records inserted straight into a SQLite table, one
transaction per batch, with no HTTP, no verification and no duplicate check.

    .venv/bin/python bench/bench_clearing.py [-n 20000] [--batch 1000]

The receiver is ``farebox clearing serve`` (uvicorn) in its own process; the terminal side is
``farebox.terminal.link.upload.upload`` over httpx, so the numbers include closing nothing but the
upload itself (batches are closed before the clock starts).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_settlement import AT, fill

from farebox.clearing.service import Receiver
from farebox.clearing.store import Store
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.store.settlement import Settlement
from farebox.terminal.link.upload import clearing_house, upload

FAREBOX = str(Path(sys.executable).parent / "farebox")


def bare_insert(folder: Path, settlement: Settlement) -> float:
    db = sqlite3.connect(folder / "bare.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE r (seq INTEGER, state TEXT, body TEXT)")
    started = time.perf_counter()
    for batch in settlement.batches():
        items = json.loads(batch.body)["items"]
        db.execute("BEGIN")
        db.executemany("INSERT INTO r VALUES (?, ?, ?)",
                       [(i["record"]["seq"], i["state"], json.dumps(i["record"])) for i in items])
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="records")
    parser.add_argument("--batch", type=int, default=1000, help="records per batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        folder = Path(tmp)
        identity = init_identity(folder, "T-BENCH", AT)
        with Store(str(folder / "clearing.sqlite3")) as store:
            store.enroll("T-BENCH", identity.public_key.hex(), "2026-11-22T00:00:00Z")
            house_key = Receiver(store).public_key  # what its acks are signed with
        server = subprocess.Popen([FAREBOX, "clearing", "serve", "--db",
                                   str(folder / "clearing.sqlite3"), "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = json.loads(server.stdout.readline())["url"]
            with Journal(folder / "journal.sqlite3", durable=False,
                         terminal_id="T-BENCH") as journal:
                fill(journal, args.n)
                settlement = Settlement(journal, identity)
                while settlement.close_batch(AT, args.batch) is not None:
                    pass
                batches = len(settlement.batches())
                started = time.perf_counter()
                result = upload(settlement, clearing_house(url, house_key), lambda: AT)
                http_s = time.perf_counter() - started
                assert result.complete and len(result.acknowledged) == batches
                bare_s = bare_insert(folder, settlement)
        finally:
            server.terminate()
            server.wait(10)
    print(f"{args.n:,} records in {batches} batches of {args.batch}")
    print(f"  receiver over HTTP (verify, chain, store once)  {args.n / http_s:9,.0f} records/s"
          f"   goal >= 2,000/s")
    print(f"  bare SQLite insert, one transaction per batch   {args.n / bare_s:9,.0f} records/s")
    print(f"  ratio (bare / HTTP)                              {http_s / bare_s:9.1f}x")


if __name__ == "__main__":
    main()
