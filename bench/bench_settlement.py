"""Settlement batches: build + sign + verify a batch of N journal records, against the bare cost
of the same bytes (canonical JSON already made: one SHA-256 and one Ed25519 sign and verify).

    .venv/bin/python bench/bench_settlement.py [-n 100000]

The journal is filled directly (one intent + commit per record, synchronous=OFF) so that setup
stays quick; the measured part is ``Settlement.close_batch`` (the ready-records query, JSON, hash,
signature, the insert of the batch and its item keys) and ``Settlement.verify`` (stored record
hashes; ``batch verify``) and ``Settlement.verify(deep=True)`` (``batch verify --deep``).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from farebox.protocol.settlement import verify_signature
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.core.rules import Record, RecordType
from farebox.terminal.store.settlement import Settlement
from farebox.terminal.core.writecycle import WriteState

AT = datetime(2026, 11, 22, 0, 0, tzinfo=timezone.utc)


def fill(journal: Journal, n: int) -> None:
    for i in range(n):
        # a balance a card can hold (the receiver refuses others: clearing/validate.py)
        balance = 300_000 - (i % 500) * 580
        record = Record(RecordType.PAYMENT, 580, balance - 580)
        write = journal.record_intent(
            tap_id=f"{i:016x}", card_number=10_000_000 + i % 5000, idm=bytes(8), kind="payment",
            counter_before=i, slot_before=bytes(32), counter_after=i + 1,
            expected_slot=bytes(32), log_block=8, log_data=bytes(16),
            balance_before_cents=balance, records=[record], outcome={},
            at=AT + timedelta(seconds=i), remember_before=False)
        journal.resolve_write(write, WriteState.COMMITTED, AT + timedelta(seconds=i), sync=False)
    journal.sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="records in the batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        folder = Path(tmp)
        identity = init_identity(folder, "T-BENCH", AT)
        with Journal(folder / "journal.sqlite3", durable=False, terminal_id="T-BENCH") as journal:
            started = time.perf_counter()
            fill(journal, args.n)
            print(f"setup: {args.n:,} records in {time.perf_counter() - started:.1f} s")
            settlement = Settlement(journal, identity)
            started = time.perf_counter()
            batch = settlement.close_batch(AT, max_items=args.n)
            close_s = time.perf_counter() - started
            started = time.perf_counter()
            check = settlement.verify()
            verify_s = time.perf_counter() - started
            started = time.perf_counter()
            deep = settlement.verify(deep=True)
            deep_s = time.perf_counter() - started
            assert batch is not None and batch.items == args.n and check.ok and deep.ok
            body = batch.body.encode()
            started = time.perf_counter()
            hashlib.sha256(body).hexdigest()
            signature = identity.sign(body)
            assert verify_signature(identity.public_key, signature, body)
            bare_s = time.perf_counter() - started
    per = lambda s: f"{s * 1e6 / args.n:7.2f} µs/record"  # noqa: E731
    print(f"batch of {args.n:,} records ({len(body) / 1e6:.1f} MB body)")
    print(f"  close (query, JSON, hash, sign, insert)  {close_s:7.2f} s  {per(close_s)}")
    print(f"  verify (hash, chain, signature, stored record hashes) "
          f"{verify_s:7.2f} s  {per(verify_s)}")
    print(f"  verify --deep (every record hashed again) {deep_s:7.2f} s  {per(deep_s)}")
    print(f"  bare: sha256 + sign + verify of the body {bare_s:7.3f} s  {per(bare_s)}")
    print(f"  ratio (close + verify) / bare            {(close_s + verify_s) / bare_s:7.1f}x"
          "   goal <= 6")
    print(f"  ratio (close + verify --deep) / bare     {(close_s + deep_s) / bare_s:7.1f}x")


if __name__ == "__main__":
    main()
