"""The terminal's durable journal (SQLite, WAL, synchronous=FULL).

* ``records``: one row per value movement (and per list-ordered status change), with a gapless
  terminal sequence and a hash chain over the previous record.
* ``card_writes``: one row per card write, ``intent`` before the card is touched, then
  ``committed`` once the written blocks read back, or ``void`` when the card shows the write never
  landed. An ``intent`` left by a crash or a card pulled away is resolved when that card is seen
  again (see :meth:`Journal.resolve`).
* ``cards``: the highest counter this terminal has verified on each card and the purse slot bytes
  it saw at that counter. A card presenting a lower counter is an older copy; one presenting the
  same counter with other bytes is a copy that was restored and written again (a fork). Both are
  declined as rollback.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .clock import utc_iso
from .rules import Record

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS card_writes (
    tap_id TEXT PRIMARY KEY,
    card_number INTEGER NOT NULL,
    idm TEXT NOT NULL,
    counter_before INTEGER NOT NULL,
    counter_after INTEGER NOT NULL,
    expected_slot TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('intent', 'committed', 'void', 'unresolved')),
    created_utc TEXT NOT NULL,
    resolved_utc TEXT
);
CREATE INDEX IF NOT EXISTS card_writes_open ON card_writes (card_number) WHERE state = 'intent';
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    terminal_id TEXT NOT NULL,
    tap_id TEXT NOT NULL REFERENCES card_writes (tap_id),
    card_number INTEGER NOT NULL,
    counter_before INTEGER NOT NULL,
    counter_after INTEGER NOT NULL,
    type TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    balance_before_cents INTEGER NOT NULL,
    balance_after_cents INTEGER NOT NULL,
    at_utc TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    card_number INTEGER PRIMARY KEY,
    highest_counter INTEGER NOT NULL,
    highest_slot TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class PendingWrite:
    """A card write not known to be on the card: ``intent`` (in doubt) or ``void`` (judged not to
    have landed; committed late if its bytes turn up on the card after all)."""

    tap_id: str
    card_number: int
    counter_before: int
    counter_after: int
    expected_slot: bytes
    state: str = "intent"


@dataclass(frozen=True)
class CardMemory:
    """The newest state this terminal verified on a card."""

    counter: int
    slot: bytes


class JournalError(Exception):
    """The journal cannot be opened or is not ours."""


class Journal:
    def __init__(self, path: Path, *, durable: bool = True) -> None:
        """``durable=False`` (synchronous=OFF) is for benchmarks that measure CPU without fsync."""
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._sync = "FULL" if durable else "OFF"
            self._db.execute(f"PRAGMA synchronous={self._sync}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            with self._transaction():
                self.terminal_id = self._meta("terminal_id", lambda: "T" + secrets.token_hex(4).upper())
                version = int(self._meta("schema_version", lambda: str(SCHEMA_VERSION)))
        except (OSError, sqlite3.Error) as error:
            raise JournalError(f"{self.path}: cannot open the journal ({error})") from None
        if version != SCHEMA_VERSION:
            raise JournalError(f"{self.path}: journal schema {version}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transaction(self):
        return _Transaction(self._db)

    def _meta(self, key: str, default) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return row[0]
        value = default()
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return value

    # ---- reads ---------------------------------------------------------------------------

    def card_memory(self, card_number: int) -> CardMemory | None:
        row = self._db.execute("SELECT highest_counter, highest_slot FROM cards "
                               "WHERE card_number = ?", (card_number,)).fetchone()
        return None if row is None else CardMemory(row[0], bytes.fromhex(row[1]))

    def highest_counter(self, card_number: int) -> int | None:
        memory = self.card_memory(card_number)
        return None if memory is None else memory.counter

    def unsettled_writes(self, card_number: int) -> list[PendingWrite]:
        """Intents, and voids that could still turn up on the card (beyond its known counter),
        newest first."""
        rows = self._db.execute(
            "SELECT w.tap_id, w.card_number, w.counter_before, w.counter_after, w.expected_slot, "
            "w.state FROM card_writes w LEFT JOIN cards c USING (card_number) "
            "WHERE w.card_number = ? AND (w.state = 'intent' OR (w.state = 'void' "
            "AND w.counter_after > coalesce(c.highest_counter, 0))) ORDER BY w.rowid DESC",
            (card_number,)).fetchall()
        return [PendingWrite(*row[:4], bytes.fromhex(row[4]), row[5]) for row in rows]

    def write_state(self, tap_id: str) -> str | None:
        row = self._db.execute("SELECT state FROM card_writes WHERE tap_id = ?", (tap_id,)).fetchone()
        return None if row is None else row[0]

    def records(self, card_number: int | None = None) -> list[dict]:
        query = ("SELECT r.*, w.state AS state FROM records r JOIN card_writes w USING (tap_id)"
                 + (" WHERE r.card_number = ?" if card_number is not None else "")
                 + " ORDER BY seq")
        cursor = self._db.execute(query, () if card_number is None else (card_number,))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def verify_chain(self) -> bool:
        """Recompute every record's hash; False if any link is broken or a sequence is missing."""
        previous, expected_seq = GENESIS_HASH, 1
        for record in self.records():
            if record["seq"] != expected_seq or record["prev_hash"] != previous:
                return False
            if _record_hash(record) != record["hash"]:
                return False
            previous, expected_seq = record["hash"], expected_seq + 1
        return True

    # ---- writes --------------------------------------------------------------------------

    def observe(self, card_number: int, counter: int, slot: bytes) -> None:
        """Remember a purse verified on the card (only a higher counter replaces the memory)."""
        with self._transaction():
            self._remember(card_number, counter, slot)

    def _remember(self, card_number: int, counter: int, slot: bytes) -> None:
        self._db.execute(
            "INSERT INTO cards (card_number, highest_counter, highest_slot) VALUES (?, ?, ?) "
            "ON CONFLICT (card_number) DO UPDATE SET highest_counter = excluded.highest_counter, "
            "highest_slot = excluded.highest_slot WHERE excluded.highest_counter > highest_counter",
            (card_number, counter, slot.hex()))

    def record_intent(self, *, tap_id: str, card_number: int, idm: bytes, counter_before: int,
                      slot_before: bytes, counter_after: int, expected_slot: bytes,
                      balance_before_cents: int,
                      records: Sequence[Record], at: datetime) -> PendingWrite:
        """Durably record what is about to be written, before the card is touched (one fsync)."""
        at_utc = utc_iso(at)
        with self._transaction():
            self._db.execute(
                "INSERT INTO card_writes (tap_id, card_number, idm, counter_before, counter_after, "
                "expected_slot, state, created_utc) VALUES (?, ?, ?, ?, ?, ?, 'intent', ?)",
                (tap_id, card_number, idm.hex(), counter_before, counter_after,
                 expected_slot.hex(), at_utc))
            self._remember(card_number, counter_before, slot_before)
            row = self._db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, previous = (row[0], row[1]) if row else (0, GENESIS_HASH)
            balance = balance_before_cents
            for record in records:
                seq += 1
                fields = {
                    "seq": seq, "terminal_id": self.terminal_id, "tap_id": tap_id,
                    "card_number": card_number, "counter_before": counter_before,
                    "counter_after": counter_after, "type": record.type.value,
                    "amount_cents": record.amount_cents, "balance_before_cents": balance,
                    "balance_after_cents": record.balance_after_cents, "at_utc": at_utc,
                    "prev_hash": previous,
                }
                fields["hash"] = previous = _record_hash(fields)
                self._db.execute(
                    f"INSERT INTO records ({', '.join(fields)}) "
                    f"VALUES ({', '.join('?' * len(fields))})", tuple(fields.values()))
                balance = record.balance_after_cents
        return PendingWrite(tap_id, card_number, counter_before, counter_after, expected_slot)

    def resolve_write(self, pending: PendingWrite, state: str, at: datetime, *,
                      sync: bool = True) -> None:
        """Settle a write: ``committed`` (its bytes are on the card; a void may turn committed
        late), ``void`` (it never landed) or ``unresolved`` (the card no longer shows which;
        left for reconciliation).

        ``sync=False`` commits without waiting for the disk (WAL, synchronous=NORMAL): the next
        durable commit carries it. Losing it to a power cut only leaves the write in doubt, and
        the card settles it again when next seen; this keeps a tap to one fsync."""
        if state not in ("committed", "void", "unresolved"):
            raise ValueError(state)
        if not sync and self._sync == "FULL":
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._settle(pending, state, at)
        finally:
            if not sync and self._sync == "FULL":
                self._db.execute("PRAGMA synchronous=FULL")

    def _settle(self, pending: PendingWrite, state: str, at: datetime) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE card_writes SET state = ?, resolved_utc = ? WHERE tap_id = ? "
                "AND state = ?", (state, utc_iso(at), pending.tap_id, pending.state))
            if state == "committed":
                self._remember(pending.card_number, pending.counter_after, pending.expected_slot)


_HASHED = ("seq", "terminal_id", "tap_id", "card_number", "counter_before", "counter_after", "type",
           "amount_cents", "balance_before_cents", "balance_after_cents", "at_utc", "prev_hash")


def _record_hash(fields: dict) -> str:
    canonical = json.dumps({k: fields[k] for k in _HASHED}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
