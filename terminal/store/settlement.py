"""Settlement batches: the journal's records, closed into signed, hash-chained batches kept until
the clearing house acknowledges them.

A batch item is a record together with the state of its card write when the batch closed:

* ``committed``: the value moved; ``void``: the write never landed (the sequence number is
  accounted for, nothing moved); ``unresolved``: the card moved past it and no longer shows
  which, left for reconciliation.
* A record whose write is still in doubt (``intent``) waits: it rides in a later batch once the
  card has been seen again and the write resolved. One still in doubt a batch period after it
  was made (``in_doubt_after``, the daemon's ``batch_max_age_s``; a power cut lost its commit
  mark, or the card has not come back) rides once as ``in_doubt`` (``not_shown`` when its tap
  was cut off before any result was shown): the clearing house resolves it from the card's next
  change seen at any terminal. It rides again, resolved, once this terminal sees the card.
* A write voided and later found on the card after all (void -> committed) rides again, as a
  ``committed`` item: the pair (sequence, state) is unique, so a record is settled as committed
  at most once, whatever is closed, retried or closed concurrently.

The batch body, its hash and signature are the settlement wire format
(``farebox.protocol.settlement``: :class:`BatchBody`, :class:`SignedBatch`): canonical JSON
holding the terminal id and incarnation, the batch number (gapless from 1), the previous batch's
hash, the items (each record's hashed fields and hash) and totals by state and record type;
``hash`` is the SHA-256 of the body, ``signature`` the terminal's Ed25519 signature of it. Both
tables live in the journal's SQLite file; closing a batch is one durable transaction.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from farebox.protocol.settlement import (
    BATCH_FORMAT, GENESIS_HASH, IN_DOUBT, BatchBody, BatchItem, SettlementRecord, SignedBatch,
    WireError, canonical, sha256_hex, verify_batch, verify_signature,
)

from farebox.terminal import failpoints
from farebox.terminal.core.clock import hk_date, parse_utc, utc_iso
from farebox.terminal.store.identity import TerminalIdentity
from farebox.terminal.store.journal import Journal, parsing
from farebox.terminal.errors import TerminalError

LOG = logging.getLogger("farebox.terminal.store.settlement")

DEFAULT_MAX_ITEMS = 1000
DEFAULT_MAX_AGE_S = 900.0
DEFAULT_RETENTION = timedelta(days=90)
#: a write still in doubt this long after it was made rides as in doubt (one batch period)
DEFAULT_IN_DOUBT_AFTER = timedelta(seconds=DEFAULT_MAX_AGE_S)

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
CREATE TABLE IF NOT EXISTS batch_in_doubt (
    seq INTEGER PRIMARY KEY,
    batch INTEGER NOT NULL REFERENCES batches (number)
);
"""

_RECORD = """r.seq, r.terminal_id, r.tap_id, r.card_number, r.counter_before, r.counter_after,
       r.type, r.amount_cents, r.balance_before_cents, r.balance_after_cents, r.at_utc, r.prev_hash,
       r.hash, r.clock_trusted"""
#: records whose write is resolved, in a state not yet batched: the record's columns, the
#: write's state and whether it was committed by seeing its bytes on the card later
_READY = f"""
SELECT {_RECORD}, w.state, w.observed
FROM records r JOIN card_writes w USING (tap_id)
WHERE w.state IN ('committed', 'void', 'unresolved')
  AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.seq = r.seq AND i.state = w.state)
ORDER BY r.seq
LIMIT ?
"""
#: records whose write is still in doubt and not yet sent as in doubt: the record's columns,
#: when the write was made, whether its tap was cut off (no result shown)
_IN_DOUBT = f"""
SELECT {_RECORD}, w.created_utc,
       EXISTS (SELECT 1 FROM writes_cut_off c WHERE c.tap_id = w.tap_id)
FROM records r JOIN card_writes w USING (tap_id)
WHERE w.state = 'intent' AND NOT EXISTS (SELECT 1 FROM batch_in_doubt d WHERE d.seq = r.seq)
ORDER BY r.seq
"""
#: records whose write is in doubt, sent (or not) as in doubt
_HELD = """
SELECT count(*) FROM records r JOIN card_writes w USING (tap_id)
WHERE w.state = 'intent' AND {} EXISTS (SELECT 1 FROM batch_in_doubt d WHERE d.seq = r.seq)
"""
_BATCH_COLUMNS = ("number, closed_utc, items, first_seq, last_seq, body, hash, signature, "
                  "acked_utc, prev_hash, totals")


@dataclass(frozen=True)
class BatchPolicy:
    """When records close into a batch: ``max_records`` ready, the oldest ready one older than
    ``max_age_s``, or ready records from an earlier Hong Kong day (the daily close)."""

    max_records: int = DEFAULT_MAX_ITEMS
    max_age_s: float = DEFAULT_MAX_AGE_S
    retention: timedelta = DEFAULT_RETENTION  # acknowledged batches' bodies kept this long

    @property
    def in_doubt_after(self) -> timedelta:
        """A write still in doubt this long after it was made rides as ``in_doubt``: one batch
        period."""
        return timedelta(seconds=self.max_age_s)


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
    @parsing("a batch's totals")
    def totals(self) -> dict:
        return json.loads(self.totals_json)

    @property
    def signed(self) -> SignedBatch:
        """The batch as it is sent (empty once pruned)."""
        return SignedBatch(self.body, self.hash, self.signature)

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

    def pending_items(self, now: datetime | None = None,
                      in_doubt_after: timedelta = DEFAULT_IN_DOUBT_AFTER) -> int:
        """Records ready to be batched (their writes resolved, not yet in a batch in that state;
        given ``now``, also those to ride in doubt then)."""
        if now is None:
            return len(self._db.execute(_READY, (-1,)).fetchall())
        return len(self._ready(now, in_doubt_after, None))

    @parsing("a record ready for settlement")
    def due(self, now: datetime, policy: BatchPolicy) -> str | None:
        """Why a batch should close now ("count", "age", "day"), or None."""
        ready = self._ready(now, policy.in_doubt_after, None)
        if not ready:
            return None
        if len(ready) >= policy.max_records:
            return "count"
        if any(item.state == IN_DOUBT for item in ready):
            return "age"  # in doubt for a batch period
        oldest_at = min(parse_utc(item.record.at_utc) for item in ready)
        if (now - oldest_at).total_seconds() >= policy.max_age_s:
            return "age"
        if hk_date(oldest_at) < hk_date(now):
            return "day"
        return None

    def close_due(self, now: datetime, policy: BatchPolicy) -> list[Batch]:
        """Close batches while the policy says one is due; the batches closed."""
        closed = []
        while self.due(now, policy) is not None:
            batch = self.close_batch(now, policy.max_records, policy.in_doubt_after)
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
        return self.journal.last_seq()

    def held_back(self) -> int:
        """Records waiting for their card write to be resolved (in doubt), not yet sent as in
        doubt."""
        return self._db.execute(_HELD.format("NOT")).fetchone()[0]

    def sent_in_doubt(self) -> int:
        """Records sent as in doubt whose card write this terminal has still not resolved."""
        return self._db.execute(_HELD.format("")).fetchone()[0]

    def _rows(self, query: str, parameters: tuple = ()) -> Iterator[Batch]:
        for row in self._db.execute(query, parameters):
            yield Batch(*row)

    # -- closing --

    @parsing("a record ready for settlement or the last batch")
    def close_batch(self, now: datetime, max_items: int = DEFAULT_MAX_ITEMS,
                    in_doubt_after: timedelta = DEFAULT_IN_DOUBT_AFTER) -> Batch | None:
        """Close the records ready now (at most ``max_items``) into the next batch, signed;
        None when nothing is ready. A record whose write is still in doubt ``in_doubt_after``
        after it was made (one batch period) rides once as ``in_doubt``. One durable
        transaction: a crash leaves no half batch."""
        if max_items < 1:
            raise SettlementError(f"a batch holds at least one record, not {max_items}")
        with self.journal.transaction():
            items = self._ready(now, in_doubt_after, max_items)
            if not items:
                return None
            # each write's state as its chain holds it, or nothing is settled (JournalBroken)
            self.journal.check_writes([item.record.tap_id for item in items])
            last = self._db.execute(
                "SELECT number, hash FROM batches ORDER BY number DESC LIMIT 1").fetchone()
            number, previous = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
            body = BatchBody.close(self.identity.terminal_id, self.identity.incarnation, number,
                                   now, previous, items)
            signed = SignedBatch.sign(body, self.identity.sign)
            totals_json = body.totals.text()
            batch = Batch(number, body.closed_utc, len(items), items[0].record.seq,
                          items[-1].record.seq, signed.body, signed.hash, signed.signature, None,
                          previous, totals_json)
            self._db.execute(
                "INSERT INTO batches (number, closed_utc, items, first_seq, last_seq, body, hash, "
                "signature, prev_hash, totals) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch.number, batch.closed_utc, batch.items, batch.first_seq, batch.last_seq,
                 batch.body, batch.hash, batch.signature, previous, totals_json))
            self._db.executemany("INSERT INTO batch_items (seq, state, batch) VALUES (?, ?, ?)",
                                 [(item.record.seq, item.state, number) for item in items
                                  if item.state != IN_DOUBT])
            self._db.executemany("INSERT INTO batch_in_doubt (seq, batch) VALUES (?, ?)",
                                 [(item.record.seq, number) for item in items
                                  if item.state == IN_DOUBT])
            failpoints.hit("batch-before-commit")
        failpoints.hit("batch-after-commit")
        return batch

    def _ready(self, now: datetime, in_doubt_after: timedelta,
               limit: int | None) -> list[BatchItem]:
        """The items the next batch would hold (at most ``limit``), by sequence: records whose
        write is resolved in a state not yet batched, and records whose write is still in doubt
        ``in_doubt_after`` after it was made (by ``now`` or this terminal's trusted time,
        whichever is later) and not yet sent as in doubt."""
        rows = self._db.execute(_READY, (-1 if limit is None else limit,)).fetchall()
        # row: the record's columns (its hash, then clock_trusted), its write's state and
        # whether that write was committed by seeing its bytes on the card later
        items = [BatchItem(row[14], _record(row), observed=row[14] == "committed"
                           and bool(row[15])) for row in rows]
        mark = self.journal.time_high_water()
        cutoff = (now if mark is None else max(now, mark)) - in_doubt_after
        items += [BatchItem(IN_DOUBT, _record(row), not_shown=bool(row[15]))
                  for row in self._db.execute(_IN_DOUBT) if parse_utc(row[14]) <= cutoff]
        items.sort(key=lambda item: item.record.seq)
        return items if limit is None else items[:limit]

    # -- checking --

    @parsing("a batch")
    def verify(self, *, deep: bool = False) -> BatchCheck:
        """Every batch: numbered from 1 without gaps, its body hashing to its hash and linking
        to the batch before, signed by this terminal's key, naming this batch and terminal, its
        items' record hashes equal to the journal's, no (sequence, state) twice, its totals the
        ones it was closed with. ``deep``: also every record parsed and hashed again from its
        fields, and the totals added up again (what the clearing house does with a batch it
        receives); without it the stored hashes are trusted as signed (the journal's own chain
        is ``farebox journal verify``'s)."""
        journal_hashes = self.journal.record_hashes()
        previous, seen, count = GENESIS_HASH, set(), 0
        check = self._check if deep else self._check_signed
        for batch in self.batches():
            count += 1
            problem = check(batch, count, previous, journal_hashes, seen)
            if problem:
                return BatchCheck(False, count, batch.number, problem)
            previous = batch.hash
        return BatchCheck(True, count)

    def _check_signed(self, batch: Batch, expected: int, previous: str, journal_hashes: dict,
                      seen: set) -> str | None:
        """:meth:`_check` without parsing or hashing the records again: the body's hash, the
        signature, the header, the chain, the totals as closed and each item's stored record
        hash against the journal's."""
        if batch.number != expected:
            return f"batch numbers jump from {expected - 1} to {batch.number}"
        if batch.prev_hash != previous:
            return "it does not link to the batch before it"
        if batch.pruned:
            if batch.acked_utc is None:
                return "its body is gone but it was never acknowledged"
            return None
        if not isinstance(batch.body, str) or sha256_hex(batch.body) != batch.hash:
            return "its body does not match its hash"
        try:
            signature = bytes.fromhex(batch.signature)
        except (ValueError, TypeError):
            return "its signature is not hex"
        if not verify_signature(self.identity.public_key, signature, batch.body.encode()):
            return "its signature does not verify with the terminal's key"
        parsed = _signed_items(batch.body, batch, self.identity.terminal_id)
        if isinstance(parsed, str):
            return parsed
        items, totals = parsed
        for seq, state, digest in items:
            key = (seq, state)
            if key in seen:
                return f"record {seq} is in a batch twice as {state}"
            seen.add(key)
            if journal_hashes.get(seq, digest) != digest:
                return f"record {seq} differs from the journal's"
        if totals != batch.totals_json:
            return "its totals differ from the ones it was closed with"
        return None

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
            body = verify_batch(batch.body, batch.hash, batch.signature, self.identity.public_key)
        except WireError as rejected:
            return str(rejected)
        if body.number != batch.number or body.terminal_id != self.identity.terminal_id \
                or len(body.items) != batch.items:
            return "its header does not name this batch and terminal"
        if body.prev_hash != previous:
            return "it does not link to the batch before it"
        for item in body.items:
            record = item.record
            key = (record.seq, item.state)
            if key in seen:
                return f"record {key[0]} is in a batch twice as {key[1]}"
            seen.add(key)
            if journal_hashes.get(record.seq, record.hash) != record.hash:
                return f"record {record.seq} differs from the journal's"
        if body.totals.text() != batch.totals_json:
            return "its totals differ from the ones it was closed with"
        return None


def _signed_items(text: str, batch: Batch, terminal_id: str
                  ) -> tuple[list[tuple[int, str, str]], str] | str:
    """The (sequence, state, record hash) of each item of a batch body whose hash and signature
    have verified, and its totals' canonical text, after its header is checked against the
    batch; a problem (text) otherwise."""
    try:
        body = json.loads(text)
        if body["format"] != BATCH_FORMAT or body["batch"] != batch.number \
                or body["terminal_id"] != terminal_id or len(body["items"]) != batch.items:
            return "its header does not name this batch and terminal"
        if body["prev_hash"] != batch.prev_hash:
            return "it does not link to the batch before it"
        items = [(item["record"]["seq"], item["state"], item["record"]["hash"])
                 for item in body["items"]]
        totals = canonical(body["totals"])
    except (ValueError, TypeError, KeyError, RecursionError):
        return "its body is not a batch"
    return items, totals


def _record(row) -> SettlementRecord:
    """A record from the journal's columns (its hash, then clock_trusted: :data:`_RECORD`)."""
    return SettlementRecord(*row[:12], bool(row[13]), row[12])


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
