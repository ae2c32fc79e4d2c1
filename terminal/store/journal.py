"""The terminal's durable journal (SQLite, WAL, synchronous=FULL).

* ``records``: one row per value movement (and per list-ordered status change), with a gapless
  terminal sequence and a hash chain over the previous record.
* ``card_writes``: one row per card write, ``intent`` before the card is touched, then through the
  life cycle in ``terminal/core/writecycle.py``. It keeps what the write was for (request kind,
  outcome), the purse slot bytes it writes and its log block, so a re-tap can complete it and a
  torn log block can be written again.
* ``cards``: the highest counter this terminal has verified on each card and the purse slot bytes
  it saw at that counter. A card presenting a lower counter is an older copy; one presenting the
  same counter with other bytes is a copy that was restored and written again (a fork). Both are
  declined as rollback.
* ``meta``: terminal id, schema version, and the time high-water mark (the latest trusted tap time).

* ``writes_cut_off``: writes whose tap was cut off while the process lived (the card left or
  answered wrongly mid-write): no result was shown for them. Settlement tells the clearing house
  so when such a write rides in doubt (a void of it is then no counter fork).

Durability: the intent is the tap's one fsync (``synchronous=FULL``). Marks made while the card is
in the field (commit, log confirmed, cut off) are committed at once, before the result is shown,
without waiting for the disk (``synchronous=NORMAL`` in WAL): a process that dies loses none of
them; a power cut may. :meth:`sync` makes them durable and :meth:`idle` also checkpoints the WAL.
Call ``idle`` once the card has left (the CLI does it after printing; the daemon between cards); a
new tap starts with ``sync``.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from farebox.protocol.settlement import GENESIS_HASH, record_hash

from farebox.terminal.core.clock import parse_utc, utc_fixed, utc_iso
from farebox.terminal.core.rules import Record, RecordType
from farebox.terminal.core.writecycle import WriteState, check_transition
from farebox.terminal.errors import TerminalError

SCHEMA_VERSION = 3
DEFAULT_BUSY_TIMEOUT_S = 10.0
_WAL_AUTOCHECKPOINT_PAGES = 10_000  # a backstop only: checkpoints normally run in idle()

#: The ``records`` table, the one place its columns are written: each column's name and SQL type,
#: in the table's order. Its CREATE statement, the insert, the selects, the fields a record's hash
#: covers and :class:`JournalRecord` (the same fields, then the write's state) all follow it.
RECORD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("seq", "INTEGER PRIMARY KEY"),
    ("terminal_id", "TEXT NOT NULL"),
    ("tap_id", "TEXT NOT NULL REFERENCES card_writes (tap_id)"),
    ("card_number", "INTEGER NOT NULL"),
    ("counter_before", "INTEGER NOT NULL"),
    ("counter_after", "INTEGER NOT NULL"),
    ("type", "TEXT NOT NULL"),
    ("amount_cents", "INTEGER NOT NULL"),
    ("balance_before_cents", "INTEGER NOT NULL"),
    ("balance_after_cents", "INTEGER NOT NULL"),
    ("at_utc", "TEXT NOT NULL"),
    ("prev_hash", "TEXT NOT NULL"),
    ("hash", "TEXT NOT NULL"),
    ("clock_trusted", "INTEGER NOT NULL DEFAULT 1"),
)
#: The names of the ``records`` columns, in the table's order.
RECORD_FIELDS: tuple[str, ...] = tuple(name for name, _ in RECORD_COLUMNS)
#: A record's hash covers the wire format's HASHED_FIELDS (protocol/settlement.py): every column
#: but the hash itself and ``clock_trusted`` (which enters the hashed text only when false);
#: tests/terminal/test_journal_schema.py holds the two lists together.


def record_columns(alias: str = "") -> str:
    """The ``records`` columns in the table's order, for a SELECT or an INSERT; ``alias`` (e.g.
    ``"r."``) qualifies each one in a join."""
    return ", ".join(alias + name for name in RECORD_FIELDS)


_RECORDS_TABLE = ("CREATE TABLE IF NOT EXISTS records (\n"
                  + ",\n".join(f"    {name} {sql}" for name, sql in RECORD_COLUMNS) + "\n);\n")
_INSERT_RECORD = (f"INSERT INTO records ({record_columns()}) "
                  f"VALUES ({', '.join('?' * len(RECORD_FIELDS))})")

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
    resolved_utc TEXT,
    kind TEXT NOT NULL DEFAULT 'payment',
    outcome TEXT,
    log_block INTEGER,
    log_data TEXT,
    log_confirmed INTEGER NOT NULL DEFAULT 1,
    observed INTEGER NOT NULL DEFAULT 0
);
""" + _RECORDS_TABLE + """CREATE TABLE IF NOT EXISTS cards (
    card_number INTEGER PRIMARY KEY,
    highest_counter INTEGER NOT NULL,
    highest_slot TEXT NOT NULL
);
"""
# Partial indexes keep every per-tap query independent of the journal's size.
_INDEXES = """
CREATE INDEX IF NOT EXISTS card_writes_open ON card_writes (card_number) WHERE state = 'intent';
CREATE INDEX IF NOT EXISTS card_writes_void ON card_writes (card_number, counter_after)
    WHERE state = 'void';
CREATE INDEX IF NOT EXISTS card_writes_log ON card_writes (card_number, counter_after)
    WHERE log_confirmed = 0 AND state = 'committed';
"""
#: Writes whose tap was cut off while this process lived: no result was shown for them
#: (:meth:`Journal.note_cut_off`). A table of its own, made at open in any schema version.
_CUT_OFF = """
CREATE TABLE IF NOT EXISTS writes_cut_off (
    tap_id TEXT PRIMARY KEY REFERENCES card_writes (tap_id)
);
"""
_MIGRATE_1_TO_2 = """
ALTER TABLE card_writes ADD COLUMN kind TEXT NOT NULL DEFAULT 'payment';
ALTER TABLE card_writes ADD COLUMN outcome TEXT;
ALTER TABLE card_writes ADD COLUMN log_block INTEGER;
ALTER TABLE card_writes ADD COLUMN log_data TEXT;
ALTER TABLE card_writes ADD COLUMN log_confirmed INTEGER NOT NULL DEFAULT 1;
ALTER TABLE records ADD COLUMN clock_trusted INTEGER NOT NULL DEFAULT 1;
"""
#: ``observed``: committed because its bytes were seen on the card later, not by the write's
#: own answers (another terminal may have written the very same bytes: clearing counts that
#: change once).
_MIGRATE_2_TO_3 = """
ALTER TABLE card_writes ADD COLUMN observed INTEGER NOT NULL DEFAULT 0;
"""

_WRITE_COLUMNS = ("tap_id, card_number, idm, kind, counter_before, counter_after, expected_slot, "
                  "state, created_utc, resolved_utc, outcome, log_block, log_data, log_confirmed")


@dataclass(frozen=True)
class CardWrite:
    """One row of ``card_writes``."""

    tap_id: str
    card_number: int
    idm: bytes
    kind: str  # the request: "payment" or "add_value"
    counter_before: int
    counter_after: int
    expected_slot: bytes  # the purse slot's bytes once the write has landed
    state: WriteState
    created_utc: str
    resolved_utc: str | None = None
    outcome: dict | None = None  # what the tap reported (to complete it on a re-tap)
    log_block: int | None = None
    log_data: bytes | None = None
    log_confirmed: bool = True

    @classmethod
    def _from_row(cls, row: Sequence) -> CardWrite:
        return cls(row[0], row[1], bytes.fromhex(row[2]), row[3], row[4], row[5],
                   bytes.fromhex(row[6]), WriteState(row[7]), row[8], row[9],
                   None if row[10] is None else json.loads(row[10]), row[11],
                   None if row[12] is None else bytes.fromhex(row[12]), bool(row[13]))

    @property
    def created(self) -> datetime:
        return parse_utc(self.created_utc)


@dataclass(frozen=True)
class JournalRecord:
    """One row of ``records`` (its fields are :data:`RECORD_FIELDS`, in order) with the state of
    the write it belongs to."""

    seq: int
    terminal_id: str
    tap_id: str
    card_number: int
    counter_before: int
    counter_after: int
    type: RecordType
    amount_cents: int
    balance_before_cents: int
    balance_after_cents: int
    at_utc: str
    prev_hash: str
    hash: str
    clock_trusted: bool
    write_state: WriteState

    def hashed_fields(self) -> dict:
        """The fields :func:`~farebox.protocol.settlement.record_hash` takes (the hash aside)."""
        fields = {name: getattr(self, name) for name in RECORD_FIELDS if name != "hash"}
        return {**fields, "type": self.type.value}


@dataclass(frozen=True)
class ChainCheck:
    """The result of :meth:`Journal.verify_chain`; true when the chain is whole."""

    ok: bool
    records: int
    bad_seq: int | None = None
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class _Mark:
    """A change to a write (:meth:`Journal._apply`); ``state`` None: only its log block
    confirmed."""

    write: CardWrite
    state: WriteState | None
    at_utc: str | None
    log_confirmed: bool
    observed: bool = False


@dataclass(frozen=True)
class CardMemory:
    """The newest state this terminal verified on a card."""

    counter: int
    slot: bytes


class JournalError(TerminalError):
    """The journal cannot be opened or is not ours."""


class Journal:
    def __init__(self, path: Path, *, durable: bool = True, terminal_id: str | None = None,
                 busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        """``durable=False`` (synchronous=OFF) is for benchmarks that measure CPU without fsync.

        Several processes may open one journal, the first ones at the same moment: each waits
        for the others (up to ``busy_timeout_s``) rather than failing. ``terminal_id`` names a
        new journal's terminal (else a random id); an existing journal must already carry it."""
        self.path = Path(path)
        self._wanted_id = terminal_id
        self._sync = "FULL" if durable else "OFF"
        self._unsynced = False
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                self._open(busy_timeout_s)
                break
            except sqlite3.OperationalError as error:
                if _is_busy(error) and time.monotonic() < deadline:
                    self._close_quietly()
                    time.sleep(0.05)
                    continue
                self._close_quietly()
                raise JournalError(f"{self.path}: cannot open the journal ({error})") from None
            except JournalError:
                self._close_quietly()
                raise
            except (OSError, sqlite3.Error) as error:
                self._close_quietly()
                raise JournalError(f"{self.path}: cannot open the journal ({error})") from None

    def _open(self, busy_timeout_s: float) -> None:
        self._db = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self._sync}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction():
            existing = {row[0] for row in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            fresh = "meta" not in existing
            if "card_writes" in existing and "meta" in existing:
                version = self._db.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                steps = {"1": _MIGRATE_1_TO_2 + _MIGRATE_2_TO_3, "2": _MIGRATE_2_TO_3}
                if version is not None and version[0] in steps:
                    for statement in filter(str.strip, steps[version[0]].split(";")):
                        self._db.execute(statement)
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                                     (str(SCHEMA_VERSION),))
            for statement in filter(str.strip, (_SCHEMA + _CUT_OFF + _INDEXES).split(";")):
                self._db.execute(statement)
            self.terminal_id = self._meta(
                "terminal_id", lambda: self._wanted_id or "T" + secrets.token_hex(4).upper())
            version = int(self._meta("schema_version", lambda: str(SCHEMA_VERSION)))
        if version != SCHEMA_VERSION:
            raise JournalError(f"{self.path}: journal schema {version}, expected {SCHEMA_VERSION}")
        self._high_water = None  # the latest trusted time: the meta row or the newest record's
        for row in (self._db.execute("SELECT value FROM meta WHERE key = 'time_high_water_utc'"),
                    self._db.execute("SELECT at_utc FROM records WHERE clock_trusted = 1 "
                                     "ORDER BY seq DESC LIMIT 1")):
            value = row.fetchone()
            if value is not None:
                self._note_high_water(parse_utc(value[0]))
        self._high_water_saved = self._high_water
        if self._wanted_id is not None and self._wanted_id != self.terminal_id:
            raise JournalError(f"{self.path}: this journal belongs to terminal {self.terminal_id}, "
                               f"not {self._wanted_id}")
        self.created = fresh

    def _close_quietly(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None

    def close(self) -> None:
        if self._db is not None:
            try:
                self.sync()
            finally:
                self._db.close()
                self._db = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transaction(self):
        return _Transaction(self._db)

    # ---- for the settlement tables kept in the same file (settlement.py) ------------------

    @property
    def connection(self) -> sqlite3.Connection:
        """The journal's connection (autocommit; use :meth:`transaction` to change anything)."""
        self._flush()
        return self._db

    def transaction(self) -> _Transaction:
        """A durable ``BEGIN IMMEDIATE`` .. ``COMMIT``: one writer at a time across processes."""
        self._flush()
        return self._transaction()

    def _meta(self, key: str, default) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return row[0]
        value = default()
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return value

    # ---- durability ----------------------------------------------------------------------

    @property
    def unsynced(self) -> bool:
        """True while something recorded is not yet durable: a mark committed without waiting
        for the disk (commit, log confirmed, cut off), a newer high-water time."""
        return self._unsynced or self._high_water != self._high_water_saved

    def sync(self) -> None:
        """Make everything durable (one FULL commit: it syncs the WAL and every frame before it,
        the marks committed without waiting included) and save a newer high-water time. A no-op
        when nothing is outstanding."""
        if not self.unsynced:
            return
        with self._transaction():
            if self._high_water != self._high_water_saved:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('time_high_water_utc', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value "
                    "WHERE excluded.value > value", (utc_fixed(self._high_water),))
            else:  # still one write, so that the commit syncs the WAL
                self._db.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
        self._high_water_saved = self._high_water
        self._unsynced = False

    def idle(self) -> None:
        """Work kept off the in-field path: make the last tap's marks durable, checkpoint the WAL."""
        self.sync()
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _quick(self):
        """A transaction committed without waiting for the disk (synchronous=NORMAL in WAL): it
        survives the process (a crash, ``kill -9``) but not a power cut until the next
        :meth:`sync`; WAL order keeps it behind every earlier commit."""
        return _Transaction(self._db, quick=self._sync == "FULL", on_commit=self._mark_unsynced)

    def _mark_unsynced(self) -> None:
        self._unsynced = True

    # ---- reads ---------------------------------------------------------------------------

    def card_memory(self, card_number: int) -> CardMemory | None:
        self._flush()
        row = self._db.execute("SELECT highest_counter, highest_slot FROM cards "
                               "WHERE card_number = ?", (card_number,)).fetchone()
        return None if row is None else CardMemory(row[0], bytes.fromhex(row[1]))

    def highest_counter(self, card_number: int) -> int | None:
        memory = self.card_memory(card_number)
        return None if memory is None else memory.counter

    def unresolved_writes(self, card_number: int, known_counter: int | None = None) -> list[CardWrite]:
        """Intents, and voids that could still turn up on the card (beyond its known counter,
        looked up unless given), newest first. Both queries use partial indexes: the cost does
        not grow with history."""
        self._flush()
        known = (self.highest_counter(card_number) if known_counter is None else known_counter) or 0
        rows = self._db.execute(
            f"SELECT {_WRITE_COLUMNS}, rowid FROM card_writes "
            "WHERE card_number = ? AND state = 'intent'", (card_number,)).fetchall()
        rows += self._db.execute(
            f"SELECT {_WRITE_COLUMNS}, rowid FROM card_writes "
            "WHERE card_number = ? AND state = 'void' AND counter_after > ?",
            (card_number, known)).fetchall()
        rows.sort(key=lambda row: row[-1], reverse=True)
        return [CardWrite._from_row(row) for row in rows]

    def open_writes(self, card_number: int, known_counter: int,
                    current_counter: int) -> list[CardWrite]:
        """What a tap of this card must look at, in one indexed query: intents, voids beyond
        ``known_counter`` (newest first), and this terminal's committed write that produced
        ``current_counter`` if its log block was never confirmed."""
        self._flush()
        rows = self._db.execute(
            f"SELECT {_WRITE_COLUMNS} FROM card_writes WHERE card_number = ? AND ("
            "state = 'intent' OR (state = 'void' AND counter_after > ?) OR "
            "(log_confirmed = 0 AND state = 'committed' AND counter_after = ?)) "
            "ORDER BY rowid DESC", (card_number, known_counter, current_counter)).fetchall()
        return [CardWrite._from_row(row) for row in rows]

    def unconfirmed_log(self, card_number: int, counter: int) -> CardWrite | None:
        """This terminal's committed write that produced ``counter`` on the card, if its log block
        was never confirmed written (the card left before, or the block tore)."""
        self._flush()
        row = self._db.execute(
            f"SELECT {_WRITE_COLUMNS} FROM card_writes WHERE card_number = ? "
            "AND counter_after = ? AND log_confirmed = 0 AND state = 'committed' "
            "AND log_block IS NOT NULL", (card_number, counter)).fetchone()
        return None if row is None else CardWrite._from_row(row)

    def write(self, tap_id: str) -> CardWrite | None:
        self._flush()
        row = self._db.execute(f"SELECT {_WRITE_COLUMNS} FROM card_writes WHERE tap_id = ?",
                               (tap_id,)).fetchone()
        return None if row is None else CardWrite._from_row(row)

    def in_doubt_count(self) -> int:
        """Writes whose landing on the card is not yet known (state intent; a partial index)."""
        return self._db.execute("SELECT count(*) FROM card_writes WHERE state = 'intent'"
                                ).fetchone()[0]

    def write_state(self, tap_id: str) -> WriteState | None:
        write = self.write(tap_id)
        return None if write is None else write.state

    def writes(self) -> list[CardWrite]:
        """Every card write: in doubt first, then newest first."""
        self._flush()
        rows = self._db.execute(
            f"SELECT {_WRITE_COLUMNS} FROM card_writes "
            "ORDER BY state = 'intent' DESC, rowid DESC").fetchall()
        return [CardWrite._from_row(row) for row in rows]

    def open_writes_for_idm(self, idm: bytes, kind: str) -> list[CardWrite]:
        """Writes of ``kind`` still in doubt on the card with this IDm, newest first (an issue
        onto a card held to a reader that was cut off: the card has no number yet to look by)."""
        self._flush()
        rows = self._db.execute(
            f"SELECT {_WRITE_COLUMNS} FROM card_writes WHERE state = 'intent' AND idm = ? "
            "AND kind = ? ORDER BY rowid DESC", (idm.hex(), kind)).fetchall()
        return [CardWrite._from_row(row) for row in rows]

    def records(self, card_number: int | None = None) -> list[JournalRecord]:
        self._flush()
        query = (f"SELECT {record_columns('r.')}, w.state "
                 "FROM records r JOIN card_writes w USING (tap_id)"
                 + (" WHERE r.card_number = ?" if card_number is not None else "")
                 + " ORDER BY seq")
        cursor = self._db.execute(query, () if card_number is None else (card_number,))
        return [_record_from_row(row) for row in cursor]

    def verify_chain(self) -> ChainCheck:
        """Recompute every record's hash: the sequence must be gapless from 1 and each record
        must hash to its stored hash and link to the one before."""
        previous, expected_seq, count = GENESIS_HASH, 1, 0
        cursor = self._db.execute(f"SELECT {record_columns()} FROM records ORDER BY seq")
        for row in cursor:
            count += 1
            fields = dict(zip(RECORD_FIELDS, row))
            seq = fields["seq"]
            if seq != expected_seq:
                return ChainCheck(False, count, seq, f"sequence jumps from {expected_seq - 1} to {seq}")
            fields["clock_trusted"] = bool(fields["clock_trusted"])
            if fields["prev_hash"] != previous:
                return ChainCheck(False, count, seq, "does not link to the record before it")
            if record_hash(fields) != fields["hash"]:
                return ChainCheck(False, count, seq, "its contents do not match its hash")
            previous, expected_seq = fields["hash"], expected_seq + 1
        return ChainCheck(True, count)

    def time_high_water(self) -> datetime | None:
        """The latest tap time this terminal trusted (None before its first tap). Read at open
        and kept in memory; the stored value only ever moves forward."""
        return self._high_water

    # ---- writes --------------------------------------------------------------------------

    def observe(self, card_number: int, counter: int, slot: bytes,
                trusted_at: datetime | None = None, *, remember: bool = True) -> None:
        """Remember a purse verified on the card (only a higher counter replaces the memory) and
        a trusted tap time (saved by the next :meth:`sync`). Not waited for: the card itself
        proves it again if it is lost."""
        if remember:
            with self._quick():
                self._remember(card_number, counter, slot)
        if trusted_at is not None:
            self._note_high_water(trusted_at)

    def _note_high_water(self, at: datetime) -> None:
        if self._high_water is None or at > self._high_water:
            self._high_water = at

    def _remember(self, card_number: int, counter: int, slot: bytes) -> None:
        self._db.execute(
            "INSERT INTO cards (card_number, highest_counter, highest_slot) VALUES (?, ?, ?) "
            "ON CONFLICT (card_number) DO UPDATE SET highest_counter = excluded.highest_counter, "
            "highest_slot = excluded.highest_slot WHERE excluded.highest_counter > highest_counter",
            (card_number, counter, slot.hex()))

    def record_intent(self, *, tap_id: str, card_number: int, idm: bytes, kind: str,
                      counter_before: int, slot_before: bytes, counter_after: int,
                      expected_slot: bytes, log_block: int, log_data: bytes,
                      balance_before_cents: int, records: Sequence[Record], outcome: dict,
                      at: datetime, clock_trusted: bool = True,
                      remember_before: bool = True) -> CardWrite:
        """Durably record what is about to be written, before the card is touched (one fsync).
        ``remember_before=False`` when this terminal's memory of the card already is
        ``counter_before`` with ``slot_before``."""
        at_utc = utc_iso(at)
        with self._transaction():
            self._db.execute(
                "INSERT INTO card_writes (tap_id, card_number, idm, kind, counter_before, "
                "counter_after, expected_slot, state, created_utc, outcome, log_block, log_data, "
                "log_confirmed) VALUES (?, ?, ?, ?, ?, ?, ?, 'intent', ?, ?, ?, ?, 0)",
                (tap_id, card_number, idm.hex(), kind, counter_before, counter_after,
                 expected_slot.hex(), at_utc, json.dumps(outcome, separators=(",", ":")),
                 log_block, log_data.hex()))
            if remember_before:
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
                    "prev_hash": previous, "clock_trusted": clock_trusted,
                }
                fields["hash"] = previous = record_hash(fields)
                self._db.execute(_INSERT_RECORD, tuple(fields[name] for name in RECORD_FIELDS))
                balance = record.balance_after_cents
        self._unsynced = False  # that commit synced the WAL, and every frame before it
        if clock_trusted:  # durable with the record itself; the meta row follows at sync()
            self._note_high_water(at)
        return CardWrite(tap_id, card_number, idm, kind, counter_before, counter_after,
                         expected_slot, WriteState.INTENT, at_utc, outcome=outcome,
                         log_block=log_block, log_data=log_data, log_confirmed=False)

    def reset_clock(self, at: datetime, reason: str) -> JournalRecord:
        """An operator's reset of the time high-water mark to ``at`` (``farebox terminal clock
        reset``): one durable transaction writes a ``clock_reset`` record (amount 0, card 0,
        counters 0, balances 0, trusted: it is the operator's word for the time) and sets the
        mark to ``at``, lower or higher. The record rides in the next batch like any other (its
        card write, kind ``clock_reset``, is committed at once); the reason and the mark it
        replaced are kept with that write."""
        reason = reason.strip()
        if not reason or "\x00" in reason:
            raise ValueError("a reset needs a reason")
        at_utc = utc_iso(at)
        tap_id = "clock-reset-" + secrets.token_hex(6)
        previous_mark = None if self._high_water is None else utc_iso(self._high_water)
        self._flush()
        with self._transaction():
            self._db.execute(
                "INSERT INTO card_writes (tap_id, card_number, idm, kind, counter_before, "
                "counter_after, expected_slot, state, created_utc, resolved_utc, outcome, "
                "log_confirmed) VALUES (?, 0, '', 'clock_reset', 0, 0, '', 'committed', ?, ?, ?, 1)",
                (tap_id, at_utc, at_utc, json.dumps(
                    {"reason": reason, "previous_high_water": previous_mark},
                    separators=(",", ":"))))
            row = self._db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, previous = (row[0] + 1, row[1]) if row else (1, GENESIS_HASH)
            fields = {
                "seq": seq, "terminal_id": self.terminal_id, "tap_id": tap_id, "card_number": 0,
                "counter_before": 0, "counter_after": 0, "type": RecordType.CLOCK_RESET.value,
                "amount_cents": 0, "balance_before_cents": 0, "balance_after_cents": 0,
                "at_utc": at_utc, "prev_hash": previous, "clock_trusted": True,
            }
            fields["hash"] = record_hash(fields)
            self._db.execute(_INSERT_RECORD, tuple(fields[name] for name in RECORD_FIELDS))
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('time_high_water_utc', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (utc_fixed(at),))
        self._unsynced = False
        self._high_water = self._high_water_saved = at
        return JournalRecord(**{**fields, "type": RecordType.CLOCK_RESET},
                             write_state=WriteState.COMMITTED)

    def resolve_write(self, write: CardWrite, state: WriteState, at: datetime, *,
                      log_confirmed: bool = False, sync: bool = True,
                      observed: bool = False) -> CardWrite:
        """Move a write through its life cycle (``terminal/core/writecycle.py``, which also
        decides the change): ``committed`` (its bytes are on the card), ``void`` (it never
        landed) or ``unresolved`` (the card no longer shows which; left for reconciliation).
        Returns the write in its new state.

        ``sync=False`` commits without waiting for the disk: the commit mark made while the card
        is in the field; :meth:`sync` (after the card has left) makes it durable. ``observed``:
        committed because the card shows its bytes, not by the write's own answers."""
        state = WriteState(state)
        check_transition(write.state, state)
        self._flush()
        with (self._transaction() if sync else self._quick()):
            self._apply(_Mark(write, state, utc_iso(at), log_confirmed, observed))
        if sync:
            self._unsynced = False
        return CardWrite(**{**write.__dict__, "state": state, "resolved_utc": utc_iso(at),
                            "log_confirmed": write.log_confirmed or log_confirmed})

    def commit_later(self, write: CardWrite, at: datetime, *, log_confirmed: bool) -> CardWrite:
        """The commit mark of a write the card has just confirmed, made while the card is in
        the field and before the result is shown: committed at once without waiting for the disk
        (a process that dies after this loses nothing), made durable by the next :meth:`sync`
        (after the card has left, and before the next tap starts). A power cut before that may
        lose it: the card proves the write again when seen, and settlement sends a write left
        in doubt for longer than a batch period as ``in_doubt`` for the clearing house to
        resolve."""
        return self.resolve_write(write, WriteState.COMMITTED, at, log_confirmed=log_confirmed,
                                  sync=False)

    def confirm_log(self, write: CardWrite) -> None:
        """The write's log block is on the card (answered by the card): committed at once,
        durable at the next :meth:`sync`."""
        with self._quick():
            self._apply(_Mark(write, None, None, True))

    def note_cut_off(self, write: CardWrite) -> None:
        """The tap of this write (still in doubt) was cut off while this process lived: no result
        was shown for it. Committed at once, durable at the next :meth:`sync`; lost to a power
        cut, the write only counts as one whose result may have been shown."""
        with self._quick():
            self._db.execute("INSERT OR IGNORE INTO writes_cut_off (tap_id) VALUES (?)",
                             (write.tap_id,))

    def _flush(self) -> None:
        """Nothing to write before a read: every mark is committed when it is made (kept for the
        readers that call it)."""

    def _apply(self, mark: _Mark) -> None:
        write = mark.write
        if mark.state is None:
            self._db.execute("UPDATE card_writes SET log_confirmed = 1 WHERE tap_id = ?",
                             (write.tap_id,))
            return
        changed = self._db.execute(
            "UPDATE card_writes SET state = ?, resolved_utc = ?, "
            "log_confirmed = log_confirmed OR ?, observed = ? WHERE tap_id = ? AND state = ?",
            (mark.state.value, mark.at_utc, int(mark.log_confirmed), int(mark.observed),
             write.tap_id, write.state.value)).rowcount
        if changed != 1:
            raise JournalError(f"card write {write.tap_id} is no longer {write.state.value}")
        if mark.state is WriteState.COMMITTED:
            self._remember(write.card_number, write.counter_after, write.expected_slot)

    # ---- for settlement (settlement.py): what batches are made of -------------------------

    def last_seq(self) -> int:
        """The newest record's sequence (0 when there is none)."""
        return self._db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]

    def record_hashes(self) -> dict[int, str]:
        """Every record's hash by sequence."""
        return dict(self._db.execute("SELECT seq, hash FROM records"))

    def records_in_doubt(self) -> int:
        """Records whose card write is still in doubt (``intent``)."""
        return self._db.execute(
            "SELECT count(*) FROM records r JOIN card_writes w USING (tap_id) "
            "WHERE w.state = 'intent'").fetchone()[0]




def _record_from_row(row: Sequence) -> JournalRecord:
    """A record from its columns (:data:`RECORD_FIELDS`) followed by its write's state."""
    fields = dict(zip(RECORD_FIELDS, row))
    return JournalRecord(**{**fields, "type": RecordType(fields["type"]),
                            "clock_trusted": bool(fields["clock_trusted"])},
                         write_state=WriteState(row[len(RECORD_FIELDS)]))


def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection. ``quick``
    commits with synchronous=NORMAL (no fsync; WAL order keeps it behind every earlier commit)."""

    def __init__(self, db: sqlite3.Connection, *, quick: bool = False, on_commit=None) -> None:
        self._db = db
        self._quick = quick
        self._on_commit = on_commit

    def __enter__(self) -> None:
        if self._quick:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._restore()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
            if exc_type is None and self._on_commit is not None:
                self._on_commit()
        finally:
            self._restore()

    def _restore(self) -> None:
        if self._quick:
            self._db.execute("PRAGMA synchronous=FULL")
