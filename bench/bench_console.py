"""The clearing console's page server time at 1 M records (issue 20: every page within 300 ms).

    .venv/bin/python bench/bench_console.py [--records N] [--db postgresql://...] [--runs N]

Fills a fresh clearing database (SQLite in a temporary folder by default) with N records
(default 1,000,000) straight through SQL, as the receiver would have kept them: 200 terminals,
each one source with batches of 100 records, taps spread over 30 UTC days on 50,000 cards, their
card_writes rows, the day totals, a few gaps and forks, and 200 action-list entries. Then asks
every console page through the Starlette app in-process (no network: the time is the server's,
query and rendering) as a signed-in admin, --runs times each, and prints min / median / max per
page. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TERMINALS, PER_BATCH, CARDS, DAYS = 200, 100, 50_000, 30


def fill_sqlite(db: str, n: int) -> None:
    import sqlite3

    conn = sqlite3.connect(db)
    conn.executescript(f"""
        INSERT INTO terminals (id, terminal_id, public_key, enrolled_utc)
            WITH RECURSIVE t(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM t WHERE i < {TERMINALS})
            SELECT i, printf('T-%04d', i), printf('%064x', i), '2026-10-01T00:00:00Z' FROM t;
        INSERT INTO sources (id, terminal, incarnation, last_batch, last_hash, records, last_seq)
            SELECT id, id, printf('%016x', id), {n // TERMINALS // PER_BATCH},
                   printf('%064x', id), {n // TERMINALS}, {n // TERMINALS} FROM terminals;
        INSERT INTO records
            WITH RECURSIVE r(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM r WHERE i < {n - 1})
            SELECT i % {TERMINALS} + 1, i / {TERMINALS} + 1,
                   CASE WHEN i % 9973 = 0 THEN 'in_doubt' ELSE 'committed' END,
                   (i / {TERMINALS}) / {PER_BATCH} + 1, 10000000 + i % {CARDS},
                   i / {CARDS}, i / {CARDS} + 1, 'payment', 580, 100000 - 580 * (i / {CARDS}),
                   100000 - 580 * (i / {CARDS} + 1),
                   strftime('%Y-%m-%dT%H:%M:%SZ', '2026-11-01', '+' || (i * {DAYS * 86400 // n})
                            || ' seconds'),
                   printf('%064x', i), 0, 0, 0 FROM r;
        INSERT INTO card_writes (card_number, counter_before, source, seq, at_utc)
            SELECT card_number, counter_before, source, seq, at_utc FROM records;
        INSERT INTO batches (source, number, hash, prev_hash, items, duplicates, received_utc)
            SELECT source, batch_number, printf('%064x', source * 100000 + batch_number),
                   CASE WHEN batch_number = 1 THEN printf('%064x', 0)
                        ELSE printf('%064x', source * 100000 + batch_number - 1) END,
                   count(*), 0, max(at_utc) FROM records GROUP BY source, batch_number;
        INSERT INTO day_totals (day, source, state, type, count, amount_cents)
            SELECT substr(at_utc, 1, 10), source, state, type, count(*), sum(amount_cents)
            FROM records GROUP BY 1, 2, 3, 4;
        INSERT INTO gaps (source, first_seq, last_seq) SELECT id, 7, 9 FROM sources WHERE id % 17 = 0;
        INSERT INTO forks (card_number, counter, writes, found_utc)
            SELECT 10000000 + i, 1, 2, '2026-11-05T00:00:00Z' FROM (SELECT id AS i FROM terminals);
        INSERT INTO actions (card_number, reason, at_utc, added_utc)
            SELECT 10000000 + id * 7, 'lost', '2026-11-05T00:00:00Z', '2026-11-05T00:00:00Z'
            FROM terminals;
    """)
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()


def fill_postgres(db: str, n: int) -> None:
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        for statement in (
            f"INSERT INTO terminals (id, terminal_id, public_key, enrolled_utc) "
            f"SELECT i, 'T-' || lpad(i::text, 4, '0'), lpad(to_hex(i), 64, '0'), "
            f"'2026-10-01T00:00:00Z' FROM generate_series(1, {TERMINALS}) i",
            f"INSERT INTO sources (id, terminal, incarnation, last_batch, last_hash, records, "
            f"last_seq) SELECT id, id, lpad(to_hex(id), 16, '0'), {n // TERMINALS // PER_BATCH}, "
            f"lpad(to_hex(id), 64, '0'), {n // TERMINALS}, {n // TERMINALS} FROM terminals",
            f"INSERT INTO records SELECT i % {TERMINALS} + 1, i / {TERMINALS} + 1, "
            f"CASE WHEN i % 9973 = 0 THEN 'in_doubt' ELSE 'committed' END, "
            f"(i / {TERMINALS}) / {PER_BATCH} + 1, 10000000 + i % {CARDS}, i / {CARDS}, "
            f"i / {CARDS} + 1, 'payment', 580, 100000 - 580 * (i / {CARDS}), "
            f"100000 - 580 * (i / {CARDS} + 1), "
            f"timestamptz '2026-11-01 00:00+00' + make_interval(secs => i * {DAYS * 86400 // n}), "
            f"lpad(to_hex(i), 64, '0'), 0, 0, 0 FROM generate_series(0, {n - 1}) i",
            "INSERT INTO card_writes (card_number, counter_before, source, seq, at_utc) "
            "SELECT card_number, counter_before, source, seq, at_utc FROM records",
            "INSERT INTO batches (source, number, hash, prev_hash, items, duplicates, "
            "received_utc) SELECT source, batch_number, lpad(to_hex(source * 100000 + "
            "batch_number), 64, '0'), CASE WHEN batch_number = 1 THEN repeat('0', 64) ELSE "
            "lpad(to_hex(source * 100000 + batch_number - 1), 64, '0') END, count(*), 0, "
            "max(at_utc) FROM records GROUP BY source, batch_number",
            "INSERT INTO day_totals (day, source, state, type, count, amount_cents) "
            "SELECT (at_utc AT TIME ZONE 'UTC')::date, source, state, type, count(*), "
            "sum(amount_cents) FROM records GROUP BY 1, 2, 3, 4",
            "INSERT INTO gaps (source, first_seq, last_seq) SELECT id, 7, 9 FROM sources "
            "WHERE id % 17 = 0",
            "INSERT INTO forks (card_number, counter, writes, found_utc) SELECT 10000000 + id, "
            "1, 2, '2026-11-05T00:00:00Z' FROM terminals",
            "INSERT INTO actions (card_number, reason, at_utc, added_utc) SELECT 10000000 + "
            "id * 7, 'lost', '2026-11-05T00:00:00Z', '2026-11-05T00:00:00Z' FROM terminals",
            "ANALYZE",
        ):
            conn.execute(statement)


async def measure(app, args) -> float:
    """Each page --runs times through the app in-process, as a signed-in admin; the slowest
    median (ms)."""
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        login = (await client.get("/console/login")).text
        token = login.split('name="csrf" value="')[1].split('"')[0]
        done = await client.post("/console/login", data={"csrf": token, "name": "bench",
                                                         "password": "bench password 1"})
        assert done.status_code == 303, done.text
        pages = {
            "fleet": "/console/fleet",
            "fleet sorted by lag, red only": "/console/fleet?sort=lag&desc=1&status=red",
            "day": "/console/day?d=2026-11-15",
            "card": "/console/card?number=10012345",
            "batches": "/console/batches",
            "batches of a terminal": "/console/batches?terminal=T-0100",
            "batch": f"/console/batches/100/{max(1, args.records // TERMINALS // PER_BATCH // 2)}",
            "action list": "/console/actions",
            "audit": "/console/audit",
        }
        print(f"{'page':<32} {'min ms':>8} {'median':>8} {'max':>8}")
        worst = 0.0
        for name, path in pages.items():
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                answer = await client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                assert answer.status_code == 200, (path, answer.status_code)
            worst = max(worst, statistics.median(times))
            print(f"{name:<32} {min(times):8.1f} {statistics.median(times):8.1f} "
                  f"{max(times):8.1f}", flush=True)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--db", default=None, help="an EMPTY postgresql://... database (default: "
                        "SQLite in a temporary folder)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    from datetime import datetime, timezone

    import asyncio

    from farebox.clearing.app import create_app
    from farebox.clearing.console.auth import add_operator
    from farebox.clearing.console.data import ConsoleData
    from farebox.clearing.maintain import maintain
    from farebox.clearing.migrate import upgrade
    from farebox.clearing.service import Receiver
    from farebox.clearing.store import Store

    folder = tempfile.mkdtemp(prefix="bench-console-")
    db = args.db or os.path.join(folder, "clearing.sqlite3")
    upgrade(db)
    if db.startswith("postgresql"):
        maintain(db, datetime(2026, 11, 15, tzinfo=timezone.utc), ahead_days=20,
                 retention_days=20)  # day partitions for the 30 days filled
    started = time.perf_counter()
    (fill_postgres if db.startswith("postgresql") else fill_sqlite)(db, args.records)
    print(f"filled {args.records:,} records in {time.perf_counter() - started:.0f} s "
          f"({'PostgreSQL' if db.startswith('postgresql') else 'SQLite'})", flush=True)
    with Store(db) as store:
        add_operator(ConsoleData(store), "bench", "admin", "bench password 1", "2026-12-01T00:00:00Z")
        app = create_app(Receiver(store))
        worst = asyncio.run(measure(app, args))
        print(f"slowest median: {worst:.1f} ms (the issue asks for 300 ms)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
