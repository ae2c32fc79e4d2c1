"""Settlement batches: the journal's records, closed into signed, hash-chained batches kept until
the clearing house acknowledges them.

A batch item is a record together with the state of its card write when the batch closed:

* ``committed``: the value moved; ``void``: the write never landed (the sequence number is
  accounted for, nothing moved); ``unresolved``: the card moved past it and no longer shows
  which, left for reconciliation.
* A record whose write is still in doubt (``intent``) waits: it rides in a later batch once the
  card has been seen again and the write resolved.
* A write voided and later found on the card after all (void -> committed) rides again, as a
  ``committed`` item: the pair (sequence, state) is unique, so a record is settled as committed
  at most once, whatever is closed, retried or closed concurrently.

The batch body is canonical JSON (sorted keys, no spaces) holding the terminal id and
incarnation, the batch number (gapless from 1), the previous batch's hash, the items (each
record's hashed fields and hash) and totals by state and record type. ``hash`` is the SHA-256 of
the body, ``signature`` the terminal's Ed25519 signature of it. Both tables live in the journal's
SQLite file; closing a batch is one durable transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from farebox.terminal import failpoints
from farebox.terminal.core.clock import hk_date, parse_utc, utc_iso
from farebox.terminal.errors import TerminalError
from farebox.terminal.store.identity import TerminalIdentity, verify_signature
from farebox.terminal.store.journal import GENESIS_HASH, Journal, _record_hash

LOG = logging.getLogger("farebox.terminal.store.settlement")

BATCH_FORMAT = 1
DEFAULT_MAX_ITEMS = 1000
DEFAULT_MAX_AGE_S = 900.0
DEFAULT_RETENTION = timedelta(days=90)
SETTLED_STATES = ("committed", "void", "unresolved")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    number INTEGER PRIMARY KEY,
    closed_utc TEXT NOT NULL,
    items INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    acked_utc TEXT,
    prev_hash TEXT NOT NULL,
    totals TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    seq INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('committed', 'void', 'unresolved')),
    batch INTEGER NOT NULL REFERENCES batches (number),
    PRIMARY KEY (seq, state)
);
"""

_READY = """
SELECT r.seq, r.terminal_id, r.tap_id, r.card_number, r.counter_before, r.counter_after, r.type,
       r.amount_cents, r.balance_before_cents, r.balance_after_cents, r.at_utc, r.prev_hash,
       r.hash, r.clock_trusted, w.state, w.observed
FROM records r JOIN card_writes w USING (tap_id)
WHERE w.state IN ('committed', 'void', 'unresolved')
  AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.seq = r.seq AND i.state = w.state)
ORDER BY r.seq
LIMIT ?
"""
_BATCH_COLUMNS = ("number, closed_utc, items, first_seq, last_seq, body, hash, signature, "
                  "acked_utc, prev_hash, totals")
_RECORD_FIELDS = ("seq", "terminal_id", "tap_id", "card_number", "counter_before",
                  "counter_after", "type", "amount_cents", "balance_before_cents",
                  "balance_after_cents", "at_utc", "prev_hash", "hash", "clock_trusted")


@dataclass(frozen=True)
class BatchPolicy:
    """When records close into a batch: ``max_records`` ready, the oldest ready one older than
    ``max_age_s``, or ready records from an earlier Hong Kong day (the daily close)."""

    max_records: int = DEFAULT_MAX_ITEMS
    max_age_s: float = DEFAULT_MAX_AGE_S
    retention: timedelta = DEFAULT_RETENTION  # acknowledged batches' bodies kept this long


class SettlementError(TerminalError):
    """The batches do not belong to this identity or cannot be closed."""


@dataclass(frozen=True)
class Batch:
    number: int
    closed_utc: str
    items: int
    first_seq: int
    last_seq: int
    body: str
    hash: str
    signature: str
    acked_utc: str | None
    prev_hash: str
    totals_json: str

    @property
    def totals(self) -> dict:
        return json.loads(self.totals_json)

    @property
    def pruned(self) -> bool:
        """Acknowledged long enough ago that its body was dropped (hash, chain and totals kept;
        the journal keeps every record)."""
        return self.body == ""


@dataclass(frozen=True)
class BatchCheck:
    ok: bool
    batches: int
    bad_batch: int | None = None
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def totals(items: list[dict]) -> dict:
    """``{state: {type: {"count", "amount_cents"}}}`` over ``items``."""
    result: dict[str, dict[str, dict[str, int]]] = {}
    for item in items:
        record = item["record"]
        bucket = result.setdefault(item["state"], {}).setdefault(
            record["type"], {"count": 0, "amount_cents": 0})
        bucket["count"] += 1
        bucket["amount_cents"] += record["amount_cents"]
    return result


class BatchRejected(TerminalError, ValueError):
    """A batch that does not verify: the reason is one line."""


def check_batch(body: str, digest: str, signature_hex: str, public_key: bytes) -> dict:
    """The parsed body of a batch whose hash, signature, header, totals and record hashes all
    verify; BatchRejected otherwise. The chain (prev_hash) is the caller's to check."""
    if hashlib.sha256(body.encode()).hexdigest() != digest:
        raise BatchRejected("its body does not match its hash")
    try:
        signature = bytes.fromhex(signature_hex)
    except (ValueError, TypeError):
        raise BatchRejected("its signature is not hex") from None
    if not verify_signature(public_key, signature, body.encode()):
        raise BatchRejected("its signature does not verify with the terminal's key")
    try:
        parsed = json.loads(body)
        items = parsed["items"]
        if parsed["format"] != BATCH_FORMAT or not isinstance(parsed["batch"], int):
            raise BatchRejected("its header is not a batch of this format")
        if parsed["totals"] != totals(items):
            raise BatchRejected("its totals do not add up")
        seen = set()
        for item in items:
            record = item["record"]
            if item["state"] not in SETTLED_STATES:
                raise BatchRejected(f"record {record['seq']} has state {item['state']!r}")
            key = (record["seq"], item["state"])
            if key in seen:
                raise BatchRejected(f"record {key[0]} is in the batch twice as {key[1]}")
            seen.add(key)
            if record["terminal_id"] != parsed["terminal_id"]:
                raise BatchRejected(f"record {record['seq']} names another terminal")
            if _record_hash(record) != record["hash"]:
                raise BatchRejected(f"record {record['seq']} does not match its hash")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        if isinstance(error, BatchRejected):
            raise
        raise BatchRejected(f"its body is not a batch ({type(error).__name__})") from None
    return parsed


class Settlement:
    """The batches of one terminal, over its journal."""

    def __init__(self, journal: Journal, identity: TerminalIdentity) -> None:
        if journal.terminal_id != identity.terminal_id:
            raise SettlementError(f"the journal belongs to terminal {journal.terminal_id}, the "
                                  f"identity to {identity.terminal_id}")
        self.journal = journal
        self.identity = identity
        self._db = journal.connection
        self._db.executescript(_SCHEMA)

    # -- reading --

    def batches(self) -> list[Batch]:
        return list(self._rows(f"SELECT {_BATCH_COLUMNS} FROM batches ORDER BY number"))

    def pending_items(self) -> int:
        """Records ready to be batched (their writes resolved, not yet in a batch)."""
        return len(self._db.execute(_READY, (-1,)).fetchall())

    def due(self, now: datetime, policy: BatchPolicy) -> str | None:
        """Why a batch should close now ("count", "age", "day"), or None."""
        row = self._db.execute(
            "SELECT count(*), min(at_utc) FROM (" + _READY.replace("LIMIT ?", "") + ")"
        ).fetchone()
        count, oldest = row
        if not count:
            return None
        if count >= policy.max_records:
            return "count"
        oldest_at = parse_utc(oldest)
        if (now - oldest_at).total_seconds() >= policy.max_age_s:
            return "age"
        if hk_date(oldest_at) < hk_date(now):
            return "day"
        return None

    def close_due(self, now: datetime, policy: BatchPolicy) -> list[Batch]:
        """Close batches while the policy says one is due; the batches closed."""
        closed = []
        while self.due(now, policy) is not None:
            batch = self.close_batch(now, policy.max_records)
            if batch is None:
                break
            closed.append(batch)
        self.prune(now, policy.retention)
        return closed

    def unacknowledged(self) -> list[Batch]:
        """Batches the clearing house has not acknowledged, oldest first (the upload order)."""
        return list(self._rows(f"SELECT {_BATCH_COLUMNS} FROM batches "
                               "WHERE acked_utc IS NULL ORDER BY number"))

    def unacknowledged_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM batches WHERE acked_utc IS NULL"
                                ).fetchone()[0]

    def prune(self, now: datetime, retention: timedelta) -> int:
        """Drop the bodies of batches acknowledged before ``now - retention`` (never one not
        acknowledged); how many. Their hash, link and totals stay, so the chain still verifies."""
        with self.journal.transaction():
            return self._db.execute(
                "UPDATE batches SET body = '', signature = '' WHERE acked_utc IS NOT NULL "
                "AND acked_utc < ? AND body != ''", (utc_iso(now - retention),)).rowcount

    def acknowledge(self, number: int, digest: str, at: datetime) -> bool:
        """Mark batch ``number`` acknowledged, only if its hash is ``digest`` (the ack must name
        exactly what was sent); False when no such unacknowledged batch exists."""
        with self.journal.transaction():
            changed = self._db.execute(
                "UPDATE batches SET acked_utc = ? WHERE number = ? AND hash = ? "
                "AND acked_utc IS NULL", (utc_iso(at), number, digest)).rowcount
        return changed == 1

    def last_seq(self) -> int:
        """The journal's newest record sequence (0 when empty)."""
        return self._db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]

    def held_back(self) -> int:
        """Records waiting for their card write to be resolved (in doubt)."""
        return self._db.execute(
            "SELECT count(*) FROM records r JOIN card_writes w USING (tap_id) "
            "WHERE w.state = 'intent'").fetchone()[0]

    def _rows(self, query: str, parameters: tuple = ()) -> Iterator[Batch]:
        for row in self._db.execute(query, parameters):
            yield Batch(*row)

    # -- closing --

    def close_batch(self, now: datetime, max_items: int = DEFAULT_MAX_ITEMS) -> Batch | None:
        """Close the records ready now (at most ``max_items``) into the next batch, signed;
        None when nothing is ready. One durable transaction: a crash leaves no half batch."""
        if max_items < 1:
            raise SettlementError(f"a batch holds at least one record, not {max_items}")
        with self.journal.transaction():
            rows = self._db.execute(_READY, (max_items,)).fetchall()
            if not rows:
                return None
            last = self._db.execute(
                "SELECT number, hash FROM batches ORDER BY number DESC LIMIT 1").fetchone()
            number, previous = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
            items = []
            for row in rows:
                record = dict(zip(_RECORD_FIELDS, row[:14]))
                record["clock_trusted"] = bool(record["clock_trusted"])
                item = {"state": row[14], "record": record}
                if row[14] == "committed" and row[15]:
                    item["observed"] = True  # committed by seeing its bytes on the card later
                items.append(item)
            body = canonical({
                "format": BATCH_FORMAT, "terminal_id": self.identity.terminal_id,
                "incarnation": self.identity.incarnation, "batch": number,
                "closed_utc": utc_iso(now), "prev_hash": previous, "items": items,
                "totals": totals(items)})
            digest = hashlib.sha256(body.encode()).hexdigest()
            signature = self.identity.sign(body.encode()).hex()
            totals_json = canonical(totals(items))
            batch = Batch(number, utc_iso(now), len(items), rows[0][0], rows[-1][0], body, digest,
                          signature, None, previous, totals_json)
            self._db.execute(
                "INSERT INTO batches (number, closed_utc, items, first_seq, last_seq, body, hash, "
                "signature, prev_hash, totals) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch.number, batch.closed_utc, batch.items, batch.first_seq, batch.last_seq,
                 body, digest, signature, previous, totals_json))
            self._db.executemany("INSERT INTO batch_items (seq, state, batch) VALUES (?, ?, ?)",
                                 [(item["record"]["seq"], item["state"], number) for item in items])
            failpoints.hit("batch-before-commit")
        failpoints.hit("batch-after-commit")
        return batch

    # -- checking --

    def verify(self) -> BatchCheck:
        """Every batch: numbered from 1 without gaps, its body hashing to its hash and linking
        to the batch before, signed by this terminal's key, its items' records hashing right
        and equal to the journal's, no (sequence, state) twice."""
        journal_hashes = dict(self._db.execute("SELECT seq, hash FROM records"))
        previous, seen, count = GENESIS_HASH, set(), 0
        for batch in self.batches():
            count += 1
            problem = self._check(batch, count, previous, journal_hashes, seen)
            if problem:
                return BatchCheck(False, count, batch.number, problem)
            previous = batch.hash
        return BatchCheck(True, count)

    def _check(self, batch: Batch, expected: int, previous: str, journal_hashes: dict,
               seen: set) -> str | None:
        if batch.number != expected:
            return f"batch numbers jump from {expected - 1} to {batch.number}"
        if batch.prev_hash != previous:
            return "it does not link to the batch before it"
        if batch.pruned:
            if batch.acked_utc is None:
                return "its body is gone but it was never acknowledged"
            return None  # verified when closed and when acknowledged; its hash still links
        try:
            body = check_batch(batch.body, batch.hash, batch.signature, self.identity.public_key)
        except BatchRejected as rejected:
            return str(rejected)
        if body["batch"] != batch.number or body["terminal_id"] != self.identity.terminal_id \
                or len(body["items"]) != batch.items:
            return "its header does not name this batch and terminal"
        if body["prev_hash"] != previous:
            return "it does not link to the batch before it"
        for item in body["items"]:
            record = item["record"]
            key = (record["seq"], item["state"])
            if key in seen:
                return f"record {key[0]} is in a batch twice as {key[1]}"
            seen.add(key)
            if journal_hashes.get(record["seq"], record["hash"]) != record["hash"]:
                return f"record {record['seq']} differs from the journal's"
        if canonical(body["totals"]) != batch.totals_json:
            return "its totals differ from the ones it was closed with"
        return None

class BatchCloser:
    """The daemon's idle hook: when the journal has new records, and otherwise every
    ``check_every_s``, close the batches the policy says are due. A journal that is busy or
    failing is logged, never raised: taps go on."""

    def __init__(self, settlement: Settlement, policy: BatchPolicy,
                 clock: Callable[[], datetime], check_every_s: float = 30.0,
                 on_closed: Callable[[], None] = lambda: None) -> None:
        self.settlement = settlement
        self.on_closed = on_closed
        self.policy = policy
        self.clock = clock
        self.check_every_s = check_every_s
        self._last_check = float("-inf")
        self._last_seq: int | None = None

    def __call__(self) -> list[Batch]:
        now_s = time.monotonic()
        try:
            last_seq = self.settlement.last_seq()
            if last_seq == self._last_seq and now_s - self._last_check < self.check_every_s:
                return []
            self._last_check, self._last_seq = now_s, last_seq
            closed = self.settlement.close_due(self.clock(), self.policy)
        except sqlite3.Error as error:
            LOG.warning("closing batches failed (%s); trying again later", error)
            return []
        for batch in closed:
            LOG.info("closed batch %d: %d records (#%d-#%d)", batch.number, batch.items,
                     batch.first_seq, batch.last_seq)
        if closed:
            self.on_closed()
        return closed
