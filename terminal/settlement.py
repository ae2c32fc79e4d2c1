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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from .clock import utc_iso
from .identity import TerminalIdentity, verify_signature
from .journal import GENESIS_HASH, Journal, _record_hash

BATCH_FORMAT = 1
DEFAULT_MAX_ITEMS = 1000
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
    acked_utc TEXT
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
       r.hash, r.clock_trusted, w.state
FROM records r JOIN card_writes w USING (tap_id)
WHERE w.state IN ('committed', 'void', 'unresolved')
  AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.seq = r.seq AND i.state = w.state)
ORDER BY r.seq
LIMIT ?
"""
_RECORD_FIELDS = ("seq", "terminal_id", "tap_id", "card_number", "counter_before",
                  "counter_after", "type", "amount_cents", "balance_before_cents",
                  "balance_after_cents", "at_utc", "prev_hash", "hash", "clock_trusted")


class SettlementError(Exception):
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

    @property
    def totals(self) -> dict:
        return json.loads(self.body)["totals"]


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
        return list(self._rows("SELECT number, closed_utc, items, first_seq, last_seq, body, "
                               "hash, signature, acked_utc FROM batches ORDER BY number"))

    def pending_items(self) -> int:
        """Records ready to be batched (their writes resolved, not yet in a batch)."""
        return len(self._db.execute(_READY, (-1,)).fetchall())

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
                items.append({"state": row[14], "record": record})
            body = canonical({
                "format": BATCH_FORMAT, "terminal_id": self.identity.terminal_id,
                "incarnation": self.identity.incarnation, "batch": number,
                "closed_utc": utc_iso(now), "prev_hash": previous, "items": items,
                "totals": totals(items)})
            digest = hashlib.sha256(body.encode()).hexdigest()
            signature = self.identity.sign(body.encode()).hex()
            batch = Batch(number, utc_iso(now), len(items), rows[0][0], rows[-1][0], body, digest,
                          signature, None)
            self._db.execute(
                "INSERT INTO batches (number, closed_utc, items, first_seq, last_seq, body, hash, "
                "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (batch.number, batch.closed_utc, batch.items, batch.first_seq, batch.last_seq,
                 body, digest, signature))
            self._db.executemany("INSERT INTO batch_items (seq, state, batch) VALUES (?, ?, ?)",
                                 [(item["record"]["seq"], item["state"], number) for item in items])
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
        if hashlib.sha256(batch.body.encode()).hexdigest() != batch.hash:
            return "its body does not match its hash"
        try:
            signature = bytes.fromhex(batch.signature)
        except ValueError:
            return "its signature is not hex"
        if not verify_signature(self.identity.public_key, signature, batch.body.encode()):
            return "its signature does not verify with this terminal's key"
        try:
            body = json.loads(batch.body)
            items = body["items"]
            header_ok = (body["format"] == BATCH_FORMAT and body["batch"] == batch.number
                         and body["terminal_id"] == self.identity.terminal_id)
        except (ValueError, KeyError, TypeError):
            return "its body is not a batch"
        if not header_ok:
            return "its header does not name this batch and terminal"
        if body["prev_hash"] != previous:
            return "it does not link to the batch before it"
        if body["totals"] != totals(items) or len(items) != batch.items:
            return "its totals do not add up"
        for item in items:
            record = item["record"]
            key = (record["seq"], item["state"])
            if key in seen:
                return f"record {key[0]} is in a batch twice as {key[1]}"
            seen.add(key)
            if _record_hash(record) != record["hash"]:
                return f"record {record['seq']} does not match its hash"
            if journal_hashes.get(record["seq"], record["hash"]) != record["hash"]:
                return f"record {record['seq']} differs from the journal's"
        return None
