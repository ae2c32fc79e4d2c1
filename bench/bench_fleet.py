"""The clearing receiver under a simulated fleet: N terminals, each with its own Ed25519 identity
enrolled at the receiver, upload chained signed batches over keep-alive HTTP to real ``farebox
clearing serve`` processes, optionally on top of M records prefilled over 50,000 terminals and
100,000 cards; against bare baselines measured in the same run.

    .venv/bin/python bench/bench_fleet.py [--engine sqlite|postgres] [--terminals 8]
        [--batches 10] [--batch-records 300] [--prefill M] [--receivers 1|2] [--workers W]
        [--json]

Figures: ingest records/s (first upload sent to last ack received), p50/p95 acknowledgement
latency per batch, the ratio of that time to a bare COPY (PostgreSQL) / executemany (SQLite) of
the very same rows into a plain table of the same engine (one transaction per batch, no HTTP,
no verification, no index), the prefill rate, and the time of ``farebox clearing report``
(``--day D`` too when the receiver has it) against the same command on an empty database.

* Everything is generated before the clock starts: the records (payments and automatic
  add-values with valid hashes and record chains, each card's counter moving by one and its
  balance adding up from write to write; the cards are shared by all terminals, so a card's
  history spans terminals and the receiver's per-card checks see real work), the batches (real
  ``BatchBody``/``SignedBatch``, signed with each terminal's key) and the request bodies.
* Each terminal is one thread with its own ``httpx.Client`` (one keep-alive connection) sending
  its batches in order, the next when the last is acknowledged. Acks are verified (signed by the
  receiver's key, naming the batch sent, counting its records) after the clock stops.
* ``--engine postgres`` starts a private cluster the way the tests do (tests/conftest.py
  ``pg_cluster``: initdb as ``postgres`` into a temporary directory, a free loopback port, stopped
  at the end; needs root), or uses ``--pg-url`` (a database is created in it and dropped).
* ``--receivers 2`` (PostgreSQL): a second fleet of the same shape (new terminals, the same cards
  going on) is sent to two receiver processes sharing the database, after the first fleet went to
  one; the scaling ratio is the second rate over the first.
* ``--prefill M``: M committed records over 50,000 terminals and 100,000 cards spread over the
  ``--prefill-days`` UTC days before today, written straight into the tables (COPY on PostgreSQL,
  executemany on SQLite) with their sources, batches and day totals; the fleet's cards go on from
  where the prefill left them. Stored hashes are not recomputed (nothing re-verifies stored rows).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from farebox.protocol.settlement import (
    GENESIS_HASH, BatchBody, BatchItem, SettlementRecord, SignedBatch, Upload, WireError,
    record_hash, utc_iso, verify_ack,
)
from farebox.terminal.store.identity import TerminalIdentity, init_identity

FAREBOX = str(Path(sys.executable).parent / "farebox")

PREFILL_TERMINALS = 50_000
CARDS = 100_000
FIRST_CARD = 10_000_000  # card numbers are 8 digits: 10000000 .. 10099999
FARES = (480, 580, 910, 1_230, 1_850, 2_340)  # cents
RELOAD_CENTS = 25_000  # an automatic add-value (AAVS) when the balance runs low
LOW_BALANCE_CENTS = 3_000
RECORD_COLUMNS = ("seq", "state", "batch_number", "card_number", "counter_before",
                  "counter_after", "type", "amount_cents", "balance_before_cents",
                  "balance_after_cents", "at_utc", "hash")


# -- the cards: one history per card, shared by every terminal ---------------------------------


class Cards:
    """Each card's counter and balance: a write moves the counter by one and the balance by
    exactly its records' amounts."""

    def __init__(self, count: int, seed: int) -> None:
        rng = random.Random(seed)
        self.count = count
        self.counter = [0] * count
        self.balance = [rng.randrange(5_000, 30_000) for _ in range(count)]

    def write(self, card: int) -> tuple[int, list[tuple[str, int, int, int]]]:
        """One tap of ``card``: its counter before and its records ``(type, amount, balance
        before, balance after)`` (an automatic add-value then the payment when it runs low)."""
        counter, balance = self.counter[card], self.balance[card]
        fare = FARES[(card + counter) % len(FARES)]
        records = []
        if balance < LOW_BALANCE_CENTS:
            records.append(("auto_add_value", RELOAD_CENTS, balance, balance + RELOAD_CENTS))
            balance += RELOAD_CENTS
        records.append(("payment", fare, balance, balance - fare))
        self.counter[card], self.balance[card] = counter + 1, balance - fare
        return counter, records


# -- the fleet: identities, records, signed batches, request bodies -----------------------------


@dataclass
class FleetTerminal:
    identity: TerminalIdentity
    index: int  # its position in the fleet (the bare baseline's source id)
    requests: list[bytes] = field(default_factory=list)  # upload JSON, batch 1 first
    uploads: list[Upload] = field(default_factory=list)
    rows: list[list[tuple]] = field(default_factory=list)  # per batch: record rows (bare copy)
    records: int = 0
    # filled by the timed phase
    latencies: list[float] = field(default_factory=list)
    answers: list[object] = field(default_factory=list)
    failure: str | None = None
    busy: int = 0  # 503 answers (the receiver at its bound), sent again


def make_fleet(folder: Path, prefix: str, terminals: int, batches: int, size: int,
               cards: Cards, start: datetime, rng: random.Random) -> list[FleetTerminal]:
    """``terminals`` identities (``init_identity``, as ``farebox terminal init`` makes them)
    and ``batches`` signed batches of about ``size`` records each per terminal, taps spread
    round-robin over the terminals 1 ms apart from ``start``, each on a random card."""
    fleet = [FleetTerminal(init_identity(folder / f"{prefix}-{i:04d}", f"{prefix}-{i:04d}",
                                         start), i) for i in range(terminals)]
    state = [{"seq": 0, "prev": GENESIS_HASH, "items": [], "rows": []} for _ in fleet]
    tap = 0
    while True:
        open_terminals = [i for i, t in enumerate(fleet) if len(t.requests) < batches]
        if not open_terminals:
            break
        for i in open_terminals:
            terminal, s = fleet[i], state[i]
            tid = terminal.identity.terminal_id
            card = rng.randrange(cards.count)
            counter, parts = cards.write(card)
            at = utc_iso(start + timedelta(milliseconds=tap))
            tap += 1
            for kind, amount, before, after in parts:
                s["seq"] += 1
                fields = {"seq": s["seq"], "terminal_id": tid, "tap_id": f"{i:04x}{s['seq']:012x}",
                          "card_number": FIRST_CARD + card, "counter_before": counter,
                          "counter_after": counter + 1, "type": kind, "amount_cents": amount,
                          "balance_before_cents": before, "balance_after_cents": after,
                          "at_utc": at, "prev_hash": s["prev"], "clock_trusted": True}
                digest = record_hash(fields)
                s["prev"] = digest
                s["items"].append(BatchItem("committed", SettlementRecord(**fields,
                                                                          hash=digest)))
                s["rows"].append((s["seq"], "committed", len(terminal.requests) + 1,
                                  FIRST_CARD + card, counter, counter + 1, kind, amount, before,
                                  after, at, digest))
            if len(s["items"]) >= size:
                number = len(terminal.requests) + 1
                previous = terminal.uploads[-1].hash if terminal.uploads else GENESIS_HASH
                body = BatchBody.close(tid, terminal.identity.incarnation, number,
                                       datetime.fromisoformat(at.replace("Z", "+00:00")),
                                       previous, s["items"])
                signed = SignedBatch.sign(body, terminal.identity.sign)
                sent = Upload.of(tid, terminal.identity.incarnation, number, signed)
                terminal.uploads.append(sent)
                terminal.requests.append(json.dumps(sent.to_json()).encode())
                terminal.rows.append(s["rows"])
                terminal.records += len(s["items"])
                s["items"], s["rows"] = [], []
    return fleet


# -- a private PostgreSQL cluster, as tests/conftest.py starts one ------------------------------


def _pg_bin(name: str) -> str | None:
    import glob

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@contextlib.contextmanager
def private_cluster(settings: list[str]) -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a cluster made for this run:
    initdb as ``postgres`` into a temporary directory, its own socket directory, a free loopback
    port; stopped and removed at the end. ``settings``: extra ``name=value`` server settings."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        sys.exit("bench_fleet: initdb/pg_ctl not found (apt-get install postgresql)")
    if os.geteuid() != 0:
        sys.exit("bench_fleet: a private cluster needs root (to run it as postgres); "
                 "or give --pg-url")
    folder = Path(tempfile.mkdtemp(prefix="fb-bench-pg-"))
    shutil.chown(folder, "postgres")
    os.chmod(folder, 0o700)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def as_postgres(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                              text=True, timeout=300)

    made = as_postgres(initdb, "-D", str(folder / "data"), "-A", "trust", "-U", "postgres",
                       "-E", "UTF8")
    if made.returncode:
        sys.exit(f"bench_fleet: initdb failed: {made.stderr}")
    options = " ".join(f"-c {setting}" for setting in ["max_connections=300", *settings])
    started = as_postgres(pg_ctl, "-D", str(folder / "data"), "-l", str(folder / "log"), "-w",
                          "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 {options}",
                          "start")
    if started.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        sys.exit(f"bench_fleet: the cluster did not start: {started.stderr}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(pg_ctl, "-D", str(folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _pg_database(server_url: str, name: str) -> str:
    """A fresh database ``name`` in the cluster at ``server_url``; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def _pg_drop(server_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- the schema -----------------------------------------------------------------------------------


def _is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


@contextlib.contextmanager
def _connect(db: str, *, bulk: bool = False) -> Iterator:
    """A connection in a transaction (committed at the end): psycopg or sqlite3; ``bulk``: not
    waiting for the disk at commit (the prefill)."""
    if _is_postgres(db):
        import psycopg

        with psycopg.connect(db) as conn:  # commits on a clean exit
            if bulk:
                conn.execute("SET synchronous_commit = off")
            yield conn
    else:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            if bulk:
                conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")
        finally:
            conn.close()


def _create_schema_for_bench(db: str) -> None:
    """The receiver's tables at the current version, empty: its own migrations."""
    from farebox.clearing.migrate import upgrade

    upgrade(db)


def _ensure_day_partitions(db: str, days: Iterable[date], now: datetime) -> None:
    """PostgreSQL: the ``records_YYYYMMDD`` partitions from today - 90 days to today + 7 (the
    receiver's own ``clearing maintain``), which hold every day in ``days`` (the prefill's and
    the fleet's); nothing on SQLite."""
    if not _is_postgres(db):
        return
    from farebox.clearing.maintain import maintain

    maintain(db, now)
    assert all(now.date() - timedelta(days=90) <= day <= now.date() + timedelta(days=7)
               for day in days), "a day outside the receiver's partitions"


# -- prefill -----------------------------------------------------------------------------------


def _bulk(conn, postgres: bool, table: str, columns: tuple[str, ...],
          rows: Iterable[tuple]) -> int:
    """``rows`` into ``table``: COPY on PostgreSQL, executemany in chunks on SQLite."""
    count = 0
    if postgres:
        with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
        return count
    statement = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                 f"({', '.join('?' * len(columns))})")
    chunk: list[tuple] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == 20_000:
            conn.executemany(statement, chunk)
            count += len(chunk)
            chunk = []
    conn.executemany(statement, chunk)
    return count + len(chunk)


@dataclass
class _PrefillState:
    """What the record rows left behind: per prefill terminal its record count and each
    batch's last time; per (day, terminal, type) the count and amount."""

    records: list[int]
    batch_at: dict[tuple[int, int], str] = field(default_factory=dict)
    days: dict[tuple[str, int, str], list[int]] = field(default_factory=dict)


def _prefill_rows(m: int, cards: Cards, start: datetime, span_s: float, batch: int,
                  state: _PrefillState) -> Iterator[tuple]:
    """At least M record rows (a tap with an automatic add-value makes two) ``(terminal index,
    *RECORD_COLUMNS)``, oldest first: tap i at terminal
    i mod 50,000 on card (i * 2654435761) mod the card count (every card in turn, in a scrambled
    order), ``span_s`` seconds over all."""
    terminals = len(state.records)
    step = span_s / max(m, 1)
    midnight = datetime.combine(start.date(), datetime.min.time(), timezone.utc)
    offset = int((start - midnight).total_seconds())
    day_names = [(midnight + timedelta(days=d)).date().isoformat()
                 for d in range(int(span_s + offset) // 86_400 + 2)]
    second, at, day = -1, "", ""
    i = made = 0
    while made < m:
        t = i % terminals
        card = (i * 2654435761) % cards.count
        counter, parts = cards.write(card)
        whole = offset + int(i * step)
        if whole != second:  # utc_iso() of the time, made cheaply
            second = whole
            day = day_names[whole // 86_400]
            rest = whole % 86_400
            at = f"{day}T{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}Z"
        for kind, amount, before, after in parts:
            seq = state.records[t] + 1
            state.records[t] = seq
            number = (seq - 1) // batch + 1
            state.batch_at[(t, number)] = at
            total = state.days.setdefault((day, t, kind), [0, 0])
            total[0] += 1
            total[1] += amount
            made += 1
            yield (t, seq, "committed", number, FIRST_CARD + card, counter, counter + 1, kind,
                   amount, before, after, at, f"{i:056x}{seq:08x}")
        i += 1


def _batch_hash(t: int, number: int) -> str:
    return hashlib.sha256(f"prefill {t} {number}".encode()).hexdigest()


def _prefill_batches(state: _PrefillState, batch: int) -> Iterator[tuple]:
    """``(terminal index, number, hash, prev_hash, items, received)`` of every prefill batch."""
    for t, count in enumerate(state.records):
        previous = GENESIS_HASH
        for number in range(1, (count + batch - 1) // batch + 1):
            digest = _batch_hash(t, number)
            yield (t, number, digest, previous, min(batch, count - (number - 1) * batch),
                   state.batch_at[(t, number)])
            previous = digest


def _prefill_name(t: int) -> tuple[str, str, str]:
    """A prefill terminal's id, incarnation and (never used) public key."""
    return f"P-{t + 1:05d}", f"{t:016x}", hashlib.sha256(f"key {t}".encode()).hexdigest()


def prefill(db: str, m: int, cards: Cards, start: datetime, days: int,
            batch: int) -> tuple[float, int]:
    """M records (or one more) over 50,000 terminals straight into the tables, with their
    terminals, sources, batches and (version 2) day totals; seconds taken, records made."""
    postgres = _is_postgres(db)
    started = time.perf_counter()
    state = _PrefillState([0] * PREFILL_TERMINALS)
    enrolled = utc_iso(start)
    with _connect(db, bulk=True) as conn:
        rows = _prefill_rows(m, cards, start, days * 86_400.0, batch, state)
        _bulk(conn, postgres, "terminals", ("id", "terminal_id", "public_key",
                                            "enrolled_utc"),
              ((t + 1, _prefill_name(t)[0], _prefill_name(t)[2], enrolled)
               for t in range(PREFILL_TERMINALS)))
        _bulk(conn, postgres, "records", ("source", *RECORD_COLUMNS),
              ((t + 1, *row) for t, *row in rows))
        _bulk(conn, postgres, "sources", ("id", "terminal", "incarnation", "last_batch",
                                          "last_hash", "records", "last_seq"),
              ((t + 1, t + 1, _prefill_name(t)[1], (count + batch - 1) // batch,
                _batch_hash(t, (count + batch - 1) // batch), count, count)
               for t, count in enumerate(state.records) if count))
        _bulk(conn, postgres, "batches", ("source", "number", "hash", "prev_hash", "items",
                                          "duplicates", "received_utc"),
              ((t + 1, number, digest, previous, items, 0, received)
               for t, number, digest, previous, items, received
               in _prefill_batches(state, batch)))
        _bulk(conn, postgres, "day_totals", ("day", "source", "state", "type", "count",
                                             "amount_cents"),
              ((day, t + 1, "committed", kind, count, amount)
               for (day, t, kind), (count, amount) in state.days.items()))
        if postgres:
            for table in ("terminals", "sources"):
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                             f"(SELECT max(id) FROM {table}))")
        # the card history the receiver's checks probe (outside the day partitions)
        conn.execute("INSERT INTO card_writes (card_number, counter_before, source, seq, "
                     "at_utc) SELECT card_number, counter_before, source, seq, at_utc "
                     "FROM records")
    with _connect(db) as conn:  # fresh statistics for the planner
        conn.execute("ANALYZE")
    return time.perf_counter() - started, sum(state.records)


# -- the bare baseline ---------------------------------------------------------------------------


def bare_copy(db: str, fleet: list[FleetTerminal]) -> float:
    """The fleet's record rows into a plain table (no key, no index) of the same engine, one
    transaction per batch, batch by batch; seconds taken."""
    postgres = _is_postgres(db)
    times = "TIMESTAMPTZ" if postgres else "TEXT"
    columns = ("source", *RECORD_COLUMNS)
    with _connect(db) as conn:
        conn.execute(f"CREATE TABLE bare (source BIGINT, seq BIGINT, state TEXT, "
                     f"batch_number BIGINT, card_number BIGINT, counter_before BIGINT, "
                     f"counter_after BIGINT, type TEXT, amount_cents BIGINT, "
                     f"balance_before_cents BIGINT, balance_after_cents BIGINT, "
                     f"at_utc {times}, hash TEXT)")
    batches = [(t.index + 1, rows) for t in fleet for rows in t.rows]
    if postgres:
        import psycopg

        with psycopg.connect(db) as conn:
            started = time.perf_counter()
            for source, rows in batches:
                with conn.cursor().copy(f"COPY bare ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row((source, *row))
                conn.commit()
            return time.perf_counter() - started
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # as the receiver's store
        statement = f"INSERT INTO bare VALUES ({', '.join('?' * len(columns))})"
        started = time.perf_counter()
        for source, rows in batches:
            conn.execute("BEGIN")
            conn.executemany(statement, [(source, *row) for row in rows])
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


# -- receivers and the timed phase ---------------------------------------------------------------


def _help(*command: str) -> str:
    return subprocess.run([FAREBOX, *command, "--help"], capture_output=True, text=True,
                          timeout=60).stdout


@contextlib.contextmanager
def receivers(db: str, count: int, workers: int | None, logs: Path,
              serve_options: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """``count`` ``farebox clearing serve`` processes on ``db`` (port 0 each, with
    ``serve_options``); their URLs."""
    processes, urls = [], []
    try:
        for n in range(count):
            log = open(logs / f"receiver-{n}.log", "w")  # noqa: SIM115 - closed below
            options = [*(["--workers", str(workers)] if workers else []), *serve_options]
            process = subprocess.Popen([FAREBOX, "clearing", "serve", "--db", db, "--port", "0",
                                        *options], stdout=subprocess.PIPE, stderr=log, text=True)
            processes.append((process, log))
            line = process.stdout.readline()
            if not line:
                process.wait(30)
                log.flush()
                sys.exit("bench_fleet: the receiver did not start:\n"
                         + (logs / f"receiver-{n}.log").read_text()[-2000:])
            urls.append(json.loads(line)["url"])
        yield urls
    finally:
        for process, log in processes:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _send(terminal: FleetTerminal, url: str, timeout: float, go: threading.Barrier) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=timeout) as client:
        go.wait()
        rng = random.Random(terminal.index)
        for request in terminal.requests:
            started = time.perf_counter()
            for attempt in range(60):
                try:
                    answer = client.post("/v1/batches", content=request,
                                         headers={"content-type": "application/json"})
                except httpx.TransportError as error:
                    # a receiver at its bound answers 503 before it reads the body and closes
                    # the connection: a client still sending may see the reset instead
                    if attempt == 59:
                        terminal.failure = f"{type(error).__name__}: {error}"
                        return
                    answer = None
                if answer is not None and answer.status_code != 503:
                    break
                # the receiver is at its bound of uploads at once: again after a backoff with
                # full jitter, as terminals do (capped at its Retry-After); the wait counts
                terminal.busy += 1
                cap = float(answer.headers.get("retry-after", "1")) if answer is not None else 1.0
                time.sleep(rng.uniform(0, min(cap, 0.05 * 2 ** attempt)))
            terminal.latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                terminal.failure = f"HTTP {answer.status_code}: {answer.text[:300]}"
                return
            terminal.answers.append(answer.json())


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest rank."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def run_fleet(fleet: list[FleetTerminal], urls: list[str], house_key: bytes,
              timeout: float) -> dict:
    """Every terminal's batches, in order, each terminal on its own thread and connection
    (terminal i to receiver i mod len(urls)); the figures, acks verified after the clock."""
    for terminal in fleet:  # a fleet may be sent twice (--versus-empty)
        terminal.latencies, terminal.answers, terminal.failure = [], [], None
        terminal.busy = 0
    go = threading.Barrier(len(fleet) + 1)
    threads = [threading.Thread(target=_send, args=(t, urls[i % len(urls)], timeout, go),
                                daemon=True) for i, t in enumerate(fleet)]
    for thread in threads:
        thread.start()
    load = os.getloadavg()[0]  # the machine's other work, for reading the figures
    go.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    acknowledged = batches = 0
    failures = []
    for terminal in fleet:
        for sent, answer in zip(terminal.uploads, terminal.answers):
            try:
                ack = verify_ack(answer, house_key)
            except WireError as error:
                failures.append(f"{sent.terminal_id} batch {sent.number}: {error}")
                break
            if ack.batch != sent.name or ack.records != len(terminal.rows[sent.number - 1]):
                failures.append(f"{sent.terminal_id} batch {sent.number}: the ack names "
                                "another batch or count")
                break
            acknowledged += ack.records
            batches += 1
        if terminal.failure:
            failures.append(f"{terminal.identity.terminal_id}: {terminal.failure}")
    latencies = [s for t in fleet for s in t.latencies]
    records = sum(t.records for t in fleet)
    return {"receivers": len(urls), "terminals": len(fleet), "records": records,
            "batches": sum(len(t.requests) for t in fleet), "acknowledged": acknowledged,
            "acknowledged_batches": batches, "failures": failures[:20],
            "seconds": round(seconds, 3), "records_per_s": round(acknowledged / seconds, 1),
            "ack_p50_s": _round(_percentile(latencies, 0.50)),
            "ack_p95_s": _round(_percentile(latencies, 0.95)),
            "ack_max_s": _round(max(latencies, default=None)),
            "busy_answers": sum(t.busy for t in fleet),
            "load_average_before": round(load, 2), "cpus": os.cpu_count()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def enroll(db: str, fleet: list[FleetTerminal], at: datetime) -> bytes:
    """Enroll every fleet terminal's key with the receiver's store; the receiver's public key
    (what its acks are signed with)."""
    from farebox.clearing.service import Receiver
    from farebox.clearing.store import Store

    with Store(db) as store:
        for terminal in fleet:
            assert store.enroll(terminal.identity.terminal_id,
                                terminal.identity.public_key.hex(), utc_iso(at))
        return Receiver(store).public_key


def time_report(db: str, day: str | None) -> tuple[float, dict | None]:
    """``farebox clearing report --db DB --json`` (with ``--day``): seconds, the report."""
    command = [FAREBOX, "clearing", "report", "--db", db, "--json"]
    if day is not None:
        command += ["--day", day]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode:
        print(f"bench_fleet: {' '.join(command[1:])} failed: {done.stderr.strip()[-500:]}",
              file=sys.stderr)
        return seconds, None
    return seconds, json.loads(done.stdout)


def _reported_records(report: dict | None) -> int | None:
    try:
        return sum(kind["count"] for kinds in report["totals"].values()
                   for kind in kinds.values())
    except (TypeError, KeyError, AttributeError):
        return None


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-url", help="an existing PostgreSQL server to use instead of a "
                        "private cluster (a database is created in it and dropped)")
    parser.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a server setting for the private cluster (repeatable)")
    parser.add_argument("--terminals", type=int, default=8, help="simulated terminals")
    parser.add_argument("--batches", type=int, default=10, help="batches per terminal")
    parser.add_argument("--batch-records", type=int, default=300, help="records per batch")
    parser.add_argument("--cards", type=int, default=CARDS, help="cards the fleet taps")
    parser.add_argument("--prefill", type=int, default=0, metavar="M",
                        help="records stored before the fleet starts")
    parser.add_argument("--prefill-days", type=int, default=7,
                        help="UTC days before today the prefill spreads over")
    parser.add_argument("--prefill-batch", type=int, default=100,
                        help="records per prefilled batch")
    parser.add_argument("--prefill-only", action="store_true",
                        help="prefill (and time it), start no receiver")
    parser.add_argument("--receivers", type=int, choices=(1, 2), default=1,
                        help="2: a second fleet to two receivers on one PostgreSQL, after one")
    parser.add_argument("--versus-empty", action="store_true",
                        help="send the first fleet's batches to an empty database first too")
    parser.add_argument("--workers", type=int, help="clearing serve --workers (if it has it)")
    parser.add_argument("--max-uploads", type=int,
                        help="clearing serve --max-uploads (its default bounds uploads at once "
                        "per worker; a fleet past it is answered 503 and sends again)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", action="store_true", help="the figures as one JSON object")
    args = parser.parse_args()
    if args.receivers == 2 and args.engine != "postgres":
        parser.error("--receivers 2 needs --engine postgres")
    if not 1 <= args.prefill_days <= 89:
        parser.error("--prefill-days: 1 to 89 (inside the retention window)")
    serve_help = _help("clearing", "serve")
    if args.workers and "--workers" not in serve_help:
        parser.error("this receiver has no `clearing serve --workers`")
    has_day = "--day" in _help("clearing", "report")

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fb-fleet-")))
        if args.engine == "postgres":
            server = args.pg_url or stack.enter_context(private_cluster(args.pg_setting))
            names = {role: f"fb_bench_{role}_{os.getpid()}" for role in DATABASES}
            if args.pg_url:
                stack.callback(lambda: [_pg_drop(server, name) for name in names.values()])
            dbs = {role: _pg_database(server, name) for role, name in names.items()}
        else:
            dbs = {role: str(folder / f"{role}.sqlite3") for role in DATABASES}
        figures = run(args, dbs, folder, has_day, "--workers" in serve_help)
    if args.json:
        print(json.dumps(figures))
    else:
        show(figures)


#: the databases of a run: the one the fleet uploads to; the bare baseline's; an empty one for
#: the report's baseline; an empty one for the fleet's baseline (--versus-empty)
DATABASES = ("fleet", "bare", "empty", "fresh")


def run(args, dbs: dict[str, str], folder: Path, has_day: bool,
        has_workers: bool) -> dict:
    db, empty_db = dbs["fleet"], dbs["empty"]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    today = now.date()
    prefill_start = datetime.combine(today - timedelta(days=args.prefill_days),
                                     datetime.min.time(), timezone.utc)
    rng = random.Random(args.seed)
    serve_options = ("--max-uploads", str(args.max_uploads)) if args.max_uploads else ()
    cards = Cards(args.cards if not args.prefill else max(args.cards, CARDS), args.seed)
    figures: dict = {"engine": args.engine, "terminals": args.terminals,
                     "batches_per_terminal": args.batches, "batch_records": args.batch_records,
                     "cards": cards.count, "workers": args.workers, "max_uploads": args.max_uploads,
                     "serve_has_workers": has_workers, "report_has_day": has_day}
    for target in (db, empty_db, dbs["fresh"]) if args.versus_empty else (db, empty_db):
        _create_schema_for_bench(target)
    # each fleet's taps 1 ms apart (at most one a record), the fleets one after the other,
    # the last ending two minutes before now
    fleet_span = timedelta(milliseconds=args.terminals * args.batches * args.batch_records)
    fleet_start = now - args.receivers * fleet_span - timedelta(minutes=2)
    days = [prefill_start.date() + timedelta(days=d) for d in range(args.prefill_days)]
    days += [fleet_start.date(), today, today + timedelta(days=1)]
    _ensure_day_partitions(db, days, now)
    _ensure_day_partitions(empty_db, days, now)
    if args.versus_empty:
        _ensure_day_partitions(dbs["fresh"], days, now)

    figures["prefill"], made = None, 0
    if args.prefill:
        seconds, made = prefill(db, args.prefill, cards, prefill_start,
                                args.prefill_days, args.prefill_batch)
        figures["prefill"] = {"records": made, "seconds": round(seconds, 2),
                              "records_per_s": round(made / seconds, 1),
                              "terminals": PREFILL_TERMINALS, "cards": cards.count,
                              "days": args.prefill_days}
    if args.prefill_only:
        return figures

    started = time.perf_counter()
    fleets = [make_fleet(folder / "terminals", f"F{n + 1}", args.terminals, args.batches,
                         args.batch_records, cards,
                         fleet_start + n * fleet_span, rng)
              for n in range(args.receivers)]
    figures["generate_seconds"] = round(time.perf_counter() - started, 2)
    house_key = enroll(db, [t for fleet in fleets for t in fleet], now)

    figures["empty_phase"] = None
    if args.versus_empty:  # the first fleet's very batches, to an empty database first
        fresh_key = enroll(dbs["fresh"], fleets[0], now)
        with receivers(dbs["fresh"], 1, args.workers, folder, serve_options) as urls:
            figures["empty_phase"] = run_fleet(fleets[0], urls, fresh_key, args.timeout)
    figures["phases"] = []
    for n, fleet in enumerate(fleets):
        with receivers(db, n + 1, args.workers, folder, serve_options) as urls:
            figures["phases"].append(run_fleet(fleet, urls, house_key, args.timeout))

    bare_s = bare_copy(dbs["bare"], fleets[0])
    records = sum(t.records for t in fleets[0])
    figures["bare"] = {"method": "COPY" if args.engine == "postgres" else "executemany",
                       "records": records, "seconds": round(bare_s, 3),
                       "records_per_s": round(records / bare_s, 1)}
    for phase in [*figures["phases"], figures["empty_phase"]]:
        if phase is not None:
            phase["ratio_to_bare"] = round(phase["seconds"] / bare_s, 2)
    if figures["empty_phase"] is not None:
        figures["versus_empty"] = round(figures["phases"][0]["records_per_s"]
                                        / figures["empty_phase"]["records_per_s"], 2)
    if args.receivers == 2:
        one, two = figures["phases"]
        figures["scaling"] = round(two["records_per_s"] / one["records_per_s"], 2)

    empty_s, _ = time_report(empty_db, None)
    report_s, report = time_report(db, None)
    figures["report"] = {"seconds": round(report_s, 3), "empty_seconds": round(empty_s, 3),
                         "records_counted": _reported_records(report),
                         "records_expected": made + sum(
                             p["acknowledged"] for p in figures["phases"])}
    figures["report_day"] = None
    if has_day:  # the fleet's day, and the prefill's last (a full day of it)
        days = [fleet_start.date()] + ([today - timedelta(days=1)] if args.prefill else [])
        empty_s, _ = time_report(empty_db, days[0].isoformat())
        figures["report_day"] = {"empty_seconds": round(empty_s, 3), "days": [
            {"day": day.isoformat(), "seconds": round(time_report(db, day.isoformat())[0], 3)}
            for day in days]}
    return figures


def show(figures: dict) -> None:
    print(f"{figures['engine']}: {figures['terminals']} terminals x "
          f"{figures['batches_per_terminal']} batches x ~{figures['batch_records']} records, "
          f"{figures['cards']:,} cards")
    if figures["prefill"]:
        p = figures["prefill"]
        print(f"  prefill {p['records']:,} records over {p['terminals']:,} terminals  "
              f"{p['seconds']:8.1f} s  {p['records_per_s']:9,.0f} records/s")
    if "phases" not in figures:
        return
    print(f"  generated and signed before the clock in {figures['generate_seconds']:.1f} s")
    bare = figures["bare"]
    shown = [(f"{p['receivers']} receiver(s)", p) for p in figures["phases"]]
    if figures["empty_phase"]:
        shown.insert(0, ("the same batches to an empty database, 1 receiver",
                         figures["empty_phase"]))
    for label, phase in shown:
        print(f"  {label}: {phase['acknowledged']:,} of "
              f"{phase['records']:,} records acknowledged in {phase['acknowledged_batches']} of "
              f"{phase['batches']} batches")
        print(f"    ingest over HTTP                 {phase['records_per_s']:9,.0f} records/s   "
              f"goal >= 2,000/s")
        print(f"    acknowledgement p50 / p95 / max  {phase['ack_p50_s']} / {phase['ack_p95_s']} "
              f"/ {phase['ack_max_s']} s   goal p95 <= 2 s")
        print(f"    load average before: {phase['load_average_before']} on {phase['cpus']} "
              f"CPUs; 'busy' (503) answers sent again: {phase['busy_answers']}")
        print(f"    ratio to bare {bare['method']} (time)      {phase['ratio_to_bare']:9.1f}x   "
              f"goal <= 5x")
        for failure in phase["failures"]:
            print(f"    FAILED {failure}")
    print(f"  bare {bare['method']}, one transaction per batch "
          f"{bare['records_per_s']:9,.0f} records/s")
    if "versus_empty" in figures:
        print(f"  rate stored / rate empty          {figures['versus_empty']:9.2f}x   "
              "goal >= 0.7x")
    if "scaling" in figures:
        print(f"  two receivers / one               {figures['scaling']:9.2f}x   goal >= 1.6x")
    r = figures["report"]
    print(f"  clearing report                   {r['seconds']:9.2f} s   (empty database "
          f"{r['empty_seconds']:.2f} s; counts {r['records_counted']} of "
          f"{r['records_expected']} records)")
    if figures["report_day"]:
        d = figures["report_day"]
        for day in d["days"]:
            print(f"  clearing report --day {day['day']}  {day['seconds']:6.2f} s   (empty "
                  f"database {d['empty_seconds']:.2f} s)   goal <= 1 s")


if __name__ == "__main__":
    main()
