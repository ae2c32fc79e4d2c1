"""The daemon's start-up check of the journal (``Journal.verify_since_checkpoint``) at a million
records, against a plain ``SELECT count(*) FROM records`` on the same file in the same run.

    .venv/bin/python bench/bench_journal_verify.py [-n 1000000] [--cards 50000] [--full]

The journal is written directly (no card, synchronous=OFF) in the shape taps leave it: per tap one
payment record, one committed card write, its two chain entries (the intent with the write's
digest and the newest record, the commit moving the card's memory), the card's memory naming
its latest entry. Then, timed:

* first start: no checkpoint yet, so both chains are rehashed from the start (once per journal);
* restart: ``Journal(path)`` + ``ensure_whole`` with the checkpoint at the chains' ends after
  ``--tail`` more taps made through the journal's own API (the case the ≤ 1 s goal is about);
* an old row edited (``card_writes.state`` of the first tap to ``void``): the same check finds it;
* with ``--full``: ``Journal.verify`` (``farebox journal verify``), everything rehashed.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from farebox.protocol.settlement import GENESIS_HASH, record_hash
from farebox.terminal.core.clock import utc_iso
from farebox.terminal.core.rules import Record, RecordType
from farebox.terminal.core.writecycle import WriteState
from farebox.terminal.store.journal import (
    MARK_FIELDS, RECORD_FIELDS, WRITE_BODY_COLUMNS, Journal, mark_hash, write_body_digest,
    write_fingerprint,
)

AT = datetime(2026, 11, 22, 0, 0, tzinfo=timezone.utc)
TERMINAL = "T-BENCH"
FARE = 580
CHUNK = 20_000


def build(path: Path, n: int, n_cards: int) -> None:
    """``n`` committed payments on ``n_cards`` cards, written straight into a fresh journal."""
    Journal(path, durable=False, terminal_id=TERMINAL).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    record_previous, mark_previous = GENESIS_HASH, GENESIS_HASH
    seq = writes = writes_sum = writes_fp = writes_fp2 = cards = cards_sum = 0
    latest: dict[int, tuple[int, int, str]] = {}  # card -> (counter, slot hex, its entry)
    balance = 10**12
    insert_write = (f"INSERT INTO card_writes ({', '.join(WRITE_BODY_COLUMNS)}, state, "
                    "resolved_utc, log_confirmed, observed, mark_seq) "
                    f"VALUES ({', '.join('?' * (len(WRITE_BODY_COLUMNS) + 5))})")
    insert_record = (f"INSERT INTO records ({', '.join(RECORD_FIELDS)}) "
                     f"VALUES ({', '.join('?' * len(RECORD_FIELDS))})")
    insert_mark = (f"INSERT INTO marks ({', '.join(MARK_FIELDS)}, hash) "
                   f"VALUES ({', '.join('?' * (len(MARK_FIELDS) + 1))})")
    rows_w, rows_r, rows_m = [], [], []
    for i in range(n):
        tap_id = f"{i:016x}"
        card = 10_000_000 + i % n_cards
        counter_before = latest[card][0] if card in latest else 0
        counter_after = counter_before + 1
        slot = (counter_after.to_bytes(4, "big") * 4).hex()
        at = utc_iso(AT + timedelta(seconds=i))
        body = (tap_id, card, "00" * 8, "payment", counter_before, counter_after, slot, at,
                '{"outcome":"approved"}', 8, "00" * 16)
        record = {"seq": i + 1, "terminal_id": TERMINAL, "tap_id": tap_id, "card_number": card,
                  "counter_before": counter_before, "counter_after": counter_after,
                  "type": "payment", "amount_cents": FARE, "balance_before_cents": balance,
                  "balance_after_cents": balance - FARE, "at_utc": at,
                  "prev_hash": record_previous, "clock_trusted": True}
        record["hash"] = record_previous = record_hash(record)
        rows_r.append(tuple(record[name] for name in RECORD_FIELDS))
        balance -= FARE
        # the intent: a new write, its digest, the newest record
        seq, writes = seq + 1, writes + 1
        writes_sum += seq
        x, x2 = write_fingerprint(seq, "intent", 0, 0)
        writes_fp, writes_fp2 = writes_fp + x, writes_fp2 + x2
        intent = (seq, tap_id, "intent", None, 0, 0, write_body_digest(body), None, None, None,
                  i + 1, record_previous, writes, writes_sum, writes_fp, writes_fp2, cards,
                  cards_sum)
        mark_previous = mark_hash(mark_previous, intent)
        rows_m.append((*intent, mark_previous))
        # the commit: the write committed, the card's memory moved
        seq += 1
        writes_sum += seq - (seq - 1)
        x, x2 = write_fingerprint(seq, "committed", 1, 0)
        writes_fp, writes_fp2 = writes_fp + x, writes_fp2 + x2
        x, x2 = write_fingerprint(seq - 1, "intent", 0, 0)
        writes_fp, writes_fp2 = writes_fp - x, writes_fp2 - x2
        if card in latest:
            cards_sum -= latest[card][2]
        else:
            cards += 1
        cards_sum += seq
        latest[card] = (counter_after, slot, seq)
        commit = (seq, tap_id, "committed", at, 1, 0, None, card, counter_after, slot, None,
                  None, writes, writes_sum, writes_fp, writes_fp2, cards, cards_sum)
        mark_previous = mark_hash(mark_previous, commit)
        rows_m.append((*commit, mark_previous))
        rows_w.append((*body, "committed", at, 1, 0, seq))
        if len(rows_w) >= CHUNK:
            _flush(db, insert_write, insert_record, insert_mark, rows_w, rows_r, rows_m)
    _flush(db, insert_write, insert_record, insert_mark, rows_w, rows_r, rows_m)
    db.executemany("INSERT INTO cards (card_number, highest_counter, highest_slot, mark_seq) "
                   "VALUES (?, ?, ?, ?)",
                   [(card, *memory) for card, memory in sorted(latest.items())])
    db.execute("COMMIT")
    db.close()


def _flush(db, insert_write, insert_record, insert_mark, rows_w, rows_r, rows_m) -> None:
    db.executemany(insert_write, rows_w)
    db.executemany(insert_record, rows_r)
    db.executemany(insert_mark, rows_m)
    for rows in (rows_w, rows_r, rows_m):
        rows.clear()


def more_taps(path: Path, n: int, start: int) -> None:
    """``n`` taps through the journal's own API (chained as the terminal chains them)."""
    with Journal(path, durable=False) as journal:
        for i in range(start, start + n):
            card = 90_000_000 + i
            write = journal.record_intent(
                tap_id=f"tail{i:012x}", card_number=card, idm=bytes(8), kind="payment",
                counter_before=0, slot_before=bytes(16), counter_after=1,
                expected_slot=bytes(range(16)), log_block=8, log_data=bytes(16),
                balance_before_cents=10_000, records=[Record(RecordType.PAYMENT, FARE, 9420)],
                outcome={}, at=AT + timedelta(days=30, seconds=i))
            journal.resolve_write(write, WriteState.COMMITTED, AT + timedelta(days=30, seconds=i),
                                  log_confirmed=True, sync=False)


def start_up(path: Path) -> tuple[float, float, float]:
    """(open + ensure_whole, SELECT count(*) FROM records, open alone), seconds, one run."""
    started = time.perf_counter()
    journal = Journal(path)
    opened = time.perf_counter() - started
    try:
        journal.ensure_whole()
        checked = time.perf_counter() - started
        started = time.perf_counter()
        journal.connection.execute("SELECT count(*) FROM records").fetchone()
        baseline = time.perf_counter() - started
    finally:
        journal.close()
    return checked, baseline, opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="records (taps) in the journal")
    parser.add_argument("--cards", type=int, default=50_000, help="distinct cards")
    parser.add_argument("--tail", type=int, default=1000,
                        help="taps made through the API after the first check")
    parser.add_argument("--runs", type=int, default=5, help="restarts timed")
    parser.add_argument("--full", action="store_true", help="also time Journal.verify")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fb-bench-verify-") as tmp:
        path = Path(tmp) / "journal.sqlite3"
        started = time.perf_counter()
        build(path, args.n, args.cards)
        print(f"setup: {args.n:,} records, {args.cards:,} cards in "
              f"{time.perf_counter() - started:.1f} s ({os.path.getsize(path) / 1e6:.0f} MB)")

        started = time.perf_counter()
        with Journal(path) as journal:
            first = journal.verify_since_checkpoint()
        first_s = time.perf_counter() - started
        assert first.ok, first
        print(f"first start (no checkpoint: both chains rehashed)  {first_s:7.2f} s  "
              f"({first.records:,} records, {first.marks:,} chain entries)")

        more_taps(path, args.tail, args.n)
        runs = [start_up(path) for _ in range(args.runs)]
        checked = statistics.median(run[0] for run in runs)
        baseline = statistics.median(run[1] for run in runs)
        opened = statistics.median(run[2] for run in runs)
        print(f"restart ({args.tail} taps after the checkpoint, then checkpoint at the end; "
              f"median of {args.runs})")
        print(f"  Journal(path) + ensure_whole                     {checked:7.3f} s  "
              f"(open alone {opened:.3f} s)")
        print(f"  baseline: SELECT count(*) FROM records           {baseline:7.3f} s")
        print(f"  ratio                                            {checked / baseline:7.1f}x")
        print(f"  goal <= 1 s at 1 M records: {'met' if checked <= 1.0 else 'NOT met'}")

        with sqlite3.connect(path) as db:
            db.execute("UPDATE card_writes SET state = 'void' WHERE tap_id = ?", (f"{0:016x}",))
        db.close()
        started = time.perf_counter()
        with Journal(path) as journal:
            edited = journal.verify_since_checkpoint(save=False)
        edited_s = time.perf_counter() - started
        assert not edited.ok and edited.table == "card_writes" and edited.row == f"{0:016x}", \
            edited
        print(f"old row edited (first tap's state -> void): found in {edited_s:7.3f} s: "
              f"{edited.where}: {edited.problem}")
        with sqlite3.connect(path) as db:
            db.execute("UPDATE card_writes SET state = 'committed' WHERE tap_id = ?",
                       (f"{0:016x}",))
        db.close()

        if args.full:
            started = time.perf_counter()
            with Journal(path) as journal:
                full = journal.verify()
            assert full.ok, full
            print(f"Journal.verify (farebox journal verify)            "
                  f"{time.perf_counter() - started:7.2f} s")
        print(json.dumps({"records": args.n, "cards": args.cards, "start_s": round(checked, 4),
                          "count_s": round(baseline, 4), "ratio": round(checked / baseline, 1),
                          "first_start_s": round(first_s, 2)}))


if __name__ == "__main__":
    main()
