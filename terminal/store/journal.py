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
* ``marks``: the hash chain of the two tables above. Every state change of a card write (and
  its log block's confirmation) and every move of a card's memory appends one entry holding what
  the row became; a new write's entry also holds a digest of its fixed columns and the records
  chain's newest record. ``card_writes`` and ``cards`` are the fast indexes of that chain: each
  row names its latest entry (``mark_seq``), and the newest entry counts the rows and sums their
  ``mark_seq`` and the writes' fingerprints, so that a row that disagrees with the chain is
  found by one scan of each table (:meth:`Journal.verify_since_checkpoint`, at the daemon's
  start) without rehashing history (:meth:`Journal.verify`, ``farebox journal verify``,
  rehashes everything).
* ``meta``: terminal id, schema version, the time high-water mark (the latest trusted tap time)
  and the checkpoint the chains were last verified to (``verified_through``).

A damaged file (a flipped bit: SQLite's "malformed", text that is not UTF-8, a row whose values
do not parse, a schema that is not the journal's) is :class:`JournalBroken`, whoever reads it.

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

import functools
import hashlib
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
from farebox.terminal.core.writecycle import IllegalTransition, WriteState, check_transition
from farebox.terminal.errors import TerminalError
from farebox.terminal.store.private import private_directory, private_file

SCHEMA_VERSION = 4
DEFAULT_BUSY_TIMEOUT_S = 10.0
_WAL_AUTOCHECKPOINT_PAGES = 10_000  # a backstop only: checkpoints normally run in idle()
#: A write that changes a page when nothing else is to be written (a commit that changes no page
#: writes nothing to the WAL, so syncs nothing): the meta row ``wal_writes`` counts them.
_TOUCH = ("INSERT INTO meta (key, value) VALUES ('wal_writes', '1') ON CONFLICT (key) "
          "DO UPDATE SET value = CAST(value AS INTEGER) + 1")

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


#: One entry of the ``marks`` chain, the columns its hash covers (with the previous entry's
#: hash), in order. A write's columns (``tap_id`` .. ``observed``) are what its row became, NULL
#: when the entry does not change a write; ``body`` is a new write's digest of its fixed columns
#: (:data:`WRITE_BODY_COLUMNS`); ``card_number`` .. ``slot`` what a card's memory became, NULL
#: when it did not move; ``record_seq``/``record_hash`` the records chain's newest record when
#: the entry came with new records; ``writes``/``cards`` the rows of ``card_writes``/``cards``,
#: ``writes_sum``/``cards_sum`` the sums of their ``mark_seq``, ``writes_fp``/``writes_fp2`` the
#: sums of the ``card_writes`` rows' fingerprints (:func:`write_fingerprint`), all once the entry
#: is applied.
MARK_FIELDS: tuple[str, ...] = (
    "seq", "tap_id", "state", "resolved_utc", "log_confirmed", "observed", "body",
    "card_number", "counter", "slot", "record_seq", "record_hash",
    "writes", "writes_sum", "writes_fp", "writes_fp2", "cards", "cards_sum",
)
#: The columns of a card write that never change once it is made (a new write's entry holds
#: their digest).
WRITE_BODY_COLUMNS: tuple[str, ...] = (
    "tap_id", "card_number", "idm", "kind", "counter_before", "counter_after", "expected_slot",
    "created_utc", "outcome", "log_block", "log_data",
)
_MARKS_TABLE = """CREATE TABLE IF NOT EXISTS marks (
    seq INTEGER PRIMARY KEY,
    tap_id TEXT,
    state TEXT,
    resolved_utc TEXT,
    log_confirmed INTEGER,
    observed INTEGER,
    body TEXT,
    card_number INTEGER,
    counter INTEGER,
    slot TEXT,
    record_seq INTEGER,
    record_hash TEXT,
    writes INTEGER NOT NULL,
    writes_sum INTEGER NOT NULL,
    writes_fp INTEGER NOT NULL,
    writes_fp2 INTEGER NOT NULL,
    cards INTEGER NOT NULL,
    cards_sum INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""
_INSERT_MARK = (f"INSERT INTO marks ({', '.join(MARK_FIELDS)}, hash) "
                f"VALUES ({', '.join('?' * (len(MARK_FIELDS) + 1))})")


#: ``json.dumps(obj, separators=(",", ":"))``, the encoder made once (the same text)
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode


def mark_hash(previous: str, fields: Sequence) -> str:
    """The hash of a ``marks`` entry: SHA-256 over the previous entry's hash and the entry's
    :data:`MARK_FIELDS` values, as compact JSON."""
    text = _COMPACT(["farebox-mark-1", previous, *fields])
    return hashlib.sha256(text.encode()).hexdigest()


#: the fingerprint's modulus (a prime below 2**31: every product stays a 64-bit integer in SQL)
_FP_PRIME = 2_147_483_647
_STATE_CODES = {"intent": 1, "committed": 2, "void": 3, "unresolved": 4}


def write_fingerprint(mark_seq: int, state: str, log_confirmed: int, observed: int
                      ) -> tuple[int, int]:
    """A ``card_writes`` row's fingerprint: the chain entry it names, its state, its log block
    confirmed and observed, mixed into ``x`` below 2**31, and ``x * x`` modulo the same prime
    (what :func:`_fingerprint_sql` computes in SQL). The newest chain entry holds the sums of
    both over the rows: a row edited alone changes ``x`` and so the first sum, whatever it
    holds; rows edited together (states swapped) change the second."""
    x = ((mark_seq % _FP_PRIME) * 48271 + _STATE_CODES[state] * 16807 + log_confirmed * 69621
         + observed * 65539 + 1) % _FP_PRIME
    return x, x * x % _FP_PRIME


def _fingerprint_sql(seq: str, state: str, log_confirmed: str, observed: str) -> str:
    """SQL selecting ``x`` of :func:`write_fingerprint` (a value that is not a state, an integer
    or NULL gives another ``x``)."""
    codes = " ".join(f"WHEN '{name}' THEN {code}" for name, code in _STATE_CODES.items())
    return (f"((coalesce({seq}, 0) % {_FP_PRIME}) * 48271 + (CASE {state} {codes} "
            f"ELSE 5 + coalesce(length({state}), 0) END) * 16807 "
            f"+ coalesce({log_confirmed}, 7) * 69621 + coalesce({observed}, 7) * 65539 + 1) "
            f"% {_FP_PRIME}")


#: SQL: the count, the sum of ``mark_seq`` and the two sums of :func:`write_fingerprint` of
#: the ``card_writes`` rows (one scan; the subquery is kept whole so ``x`` is computed once)
_WRITES_SUMS = (
    f"SELECT count(*), coalesce(sum(named), 0), coalesce(sum(x), 0), "
    f"coalesce(sum(x * x % {_FP_PRIME}), 0) FROM (SELECT w.mark_seq AS named, "
    f"{_fingerprint_sql('w.mark_seq', 'w.state', 'w.log_confirmed', 'w.observed')} AS x "
    "FROM card_writes w LIMIT -1)")
#: SQL: the same over the latest ``marks`` entry of each write (what the rows must be)
_ENTRY_SUMS = (
    f"SELECT count(*), coalesce(sum(named), 0), coalesce(sum(x), 0), "
    f"coalesce(sum(x * x % {_FP_PRIME}), 0) FROM (SELECT m.seq AS named, "
    f"{_fingerprint_sql('m.seq', 'm.state', 'm.log_confirmed', 'm.observed')} AS x "
    "FROM marks m JOIN (SELECT max(seq) AS latest FROM marks WHERE tap_id IS NOT NULL "
    "GROUP BY tap_id) l ON m.seq = l.latest LIMIT -1)")
_HEAD = ("SELECT seq, hash, writes, writes_sum, writes_fp, writes_fp2, cards, cards_sum "
         "FROM marks ORDER BY seq DESC LIMIT 1")


def write_body_digest(values: Sequence) -> str:
    """The digest of a card write's fixed columns (:data:`WRITE_BODY_COLUMNS`, as stored)."""
    text = _COMPACT(["farebox-write-1", *values])
    return hashlib.sha256(text.encode()).hexdigest()


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
    observed INTEGER NOT NULL DEFAULT 0,
    mark_seq INTEGER
);
""" + _RECORDS_TABLE + """CREATE TABLE IF NOT EXISTS cards (
    card_number INTEGER PRIMARY KEY,
    highest_counter INTEGER NOT NULL,
    highest_slot TEXT NOT NULL,
    mark_seq INTEGER
);
""" + _MARKS_TABLE + """CREATE TABLE IF NOT EXISTS shown (
    tap_id TEXT PRIMARY KEY
);
"""
#: ``shown``: the writes whose result the terminal's caller has shown (an add value: a request
#: made again is a new one, not the same run again after a crash). Not money: outside the chain.
# Partial indexes keep every per-tap query independent of the journal's size.
_INDEXES = """
CREATE INDEX IF NOT EXISTS card_writes_open ON card_writes (card_number) WHERE state = 'intent';
CREATE INDEX IF NOT EXISTS card_writes_void ON card_writes (card_number, counter_after)
    WHERE state = 'void';
CREATE INDEX IF NOT EXISTS card_writes_log ON card_writes (card_number, counter_after)
    WHERE log_confirmed = 0 AND state = 'committed';
CREATE INDEX IF NOT EXISTS card_writes_change ON card_writes (card_number, counter_after)
    WHERE state = 'committed';
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

#: Schema 4: the chain of write states and card memory (``marks``), seeded from the tables.
_MIGRATE_3_TO_4 = """
ALTER TABLE card_writes ADD COLUMN mark_seq INTEGER;
ALTER TABLE cards ADD COLUMN mark_seq INTEGER;
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
        try:
            write = cls(row[0], _integer(row[1]), bytes.fromhex(row[2]), row[3],
                        _integer(row[4]), _integer(row[5]), bytes.fromhex(row[6]),
                        WriteState(row[7]), row[8], row[9],
                        None if row[10] is None else json.loads(row[10]),
                        None if row[11] is None else _integer(row[11]),
                        None if row[12] is None else bytes.fromhex(row[12]), bool(row[13]))
            if not isinstance(write.tap_id, str) or not isinstance(write.kind, str) \
                    or not isinstance(write.outcome, (dict, type(None))):
                raise TypeError("a text column holds something else")
            parse_utc(write.created_utc)
            if write.resolved_utc is not None:
                parse_utc(write.resolved_utc)
        except _MALFORMED as error:
            raise JournalBroken(f"the journal is damaged: card_writes row {row[0]!r} does not "
                                f"parse ({type(error).__name__}: {error}); see farebox journal "
                                "verify") from None
        return write

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
    """The result of :meth:`Journal.verify_chain` (the records chain), :meth:`Journal.verify`
    (everything) and :meth:`Journal.verify_since_checkpoint`; true when the chain is whole.
    ``bad_seq``: the record where the records chain breaks; ``table`` and ``row``: where
    anything else is wrong (``table`` None with a problem: the file itself)."""

    ok: bool
    records: int
    bad_seq: int | None = None
    problem: str | None = None
    marks: int = 0
    table: str | None = None
    row: str | None = None

    def __bool__(self) -> bool:
        return self.ok

    @property
    def where(self) -> str:
        """Where the chain breaks, in words ("record 5", "card_writes row 8f2c..")."""
        if self.table == "records" and self.bad_seq is not None:
            return f"record {self.bad_seq}"
        if self.table is None:
            return "the file"
        return self.table if self.row is None else f"{self.table} row {self.row}"


def _broken_at(table: str | None, row: object, problem: str, records: int = 0,
               marks: int = 0) -> ChainCheck:
    bad_seq = row if table == "records" and isinstance(row, int) else None
    return ChainCheck(False, records, bad_seq, problem, marks, table,
                      None if row is None else str(row))


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


class JournalBroken(JournalError):
    """The journal is damaged: its file does not read (a flipped bit), a row does not parse, or
    its chains are not whole. The daemon does not start on it and no batch settles from it
    (``farebox journal verify`` says where; exit 3)."""


#: what a row that does not parse raises while it is turned into values
_MALFORMED = (ValueError, TypeError, KeyError, AttributeError, UnicodeError, OverflowError,
              IndexError)
#: SQLite errors that say the file (not the caller, not the disk) is wrong
_DAMAGE_WORDS = ("malformed", "corrupt", "not a database", "could not decode", "no such column",
                 "has no column", "columns but", "values were supplied", "foreign key mismatch")


def _damaged(error: sqlite3.Error) -> bool:
    """Whether a SQLite error means the journal file is damaged. Busy, locked, I/O and full
    disks, a missing table (a settlement table not made yet) and misuse are not."""
    if isinstance(error, sqlite3.ProgrammingError) or not isinstance(error, sqlite3.DatabaseError):
        return False
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        return any(word in text for word in _DAMAGE_WORDS)
    return True  # DatabaseError itself (corrupt, not a database), Integrity, Data, Internal


def _check_header(path: Path) -> None:
    """SQLite opens a file whose header's read/write format versions (bytes 18 and 19) are
    unknown read-only, and only a write then fails ("attempt to write a readonly database"):
    a journal is always version 2 (WAL), so any other value there is a damaged file."""
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except FileNotFoundError:
        return
    except OSError:
        return  # unreadable: the open says why
    if len(header) == 100 and header.startswith(b"SQLite format 3\x00") and (
            header[18] not in (1, 2) or header[19] not in (1, 2)):
        raise JournalBroken(f"{path}: the journal is damaged (its header's format versions are "
                            f"{header[18]} and {header[19]}); see farebox journal verify")


def _damage(path: Path, error: Exception) -> JournalBroken:
    text = " ".join(str(error).split()) or type(error).__name__
    return JournalBroken(f"{path}: the journal is damaged ({text}); see farebox journal verify")


def _guarded(path: Path, call, *args):
    """``call(*args)`` on the journal's connection or a cursor of it, a damaged file raising
    :class:`JournalBroken`."""
    try:
        return call(*args)
    except sqlite3.Error as error:
        if _damaged(error):
            raise _damage(path, error) from None
        raise
    except UnicodeDecodeError as error:  # SQLite's message quotes a damaged schema
        raise _damage(path, error) from None


class _GuardedCursor:
    """A cursor of :class:`_GuardedConnection`: reading a damaged page raises JournalBroken."""

    __slots__ = ("_cursor", "_path")

    def __init__(self, cursor: sqlite3.Cursor, path: Path) -> None:
        self._cursor = cursor
        self._path = path

    def _guard(self, call, *args):
        return _guarded(self._path, call, *args)

    def fetchone(self):  # the guard inlined: a tap reads a row a dozen times
        try:
            return self._cursor.fetchone()
        except sqlite3.Error as error:
            if _damaged(error):
                raise _damage(self._path, error) from None
            raise
        except UnicodeDecodeError as error:
            raise _damage(self._path, error) from None

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchall(self) -> list:
        return self._guard(self._cursor.fetchall)

    def fetchmany(self, size: int = 1) -> list:
        return self._guard(self._cursor.fetchmany, size)

    def __iter__(self) -> _GuardedCursor:
        return self

    def __next__(self):
        return self._guard(next, self._cursor)

    def __getattr__(self, name: str):
        return getattr(self._cursor, name)  # rowcount, lastrowid, description, close


class _GuardedConnection:
    """The journal's SQLite connection as every user of the journal gets it: a statement that
    meets a damaged file raises :class:`JournalBroken` (one line) instead of a SQLite error, so
    a flipped bit is never an internal error, whoever runs the statement (the journal, the
    settlement batches, the CLI's looks)."""

    __slots__ = ("raw", "_path")

    def __init__(self, raw: sqlite3.Connection, path: Path) -> None:
        self.raw = raw
        self._path = path

    def _guard(self, call, *args):
        return _guarded(self._path, call, *args)

    def execute(self, sql: str, parameters: Sequence = ()) -> _GuardedCursor:
        try:  # _guarded, inlined: a tap runs some twenty statements
            return _GuardedCursor(self.raw.execute(sql, parameters), self._path)
        except sqlite3.Error as error:
            if _damaged(error):
                raise _damage(self._path, error) from None
            raise
        except UnicodeDecodeError as error:
            raise _damage(self._path, error) from None

    def executemany(self, sql: str, rows) -> _GuardedCursor:
        return _GuardedCursor(self._guard(self.raw.executemany, sql, rows), self._path)

    def executescript(self, script: str) -> _GuardedCursor:
        return _GuardedCursor(self._guard(self.raw.executescript, script), self._path)

    def __getattr__(self, name: str):
        return getattr(self.raw, name)  # close, in_transaction, total_changes, ...


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
        self._idle_changes = -1  # total_changes after the last idle(): -1, never
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
        private_directory(self.path.parent)  # 0700 when made here; the journal 0600
        _check_header(self.path)
        self._db = _GuardedConnection(
            sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout_s), self.path)
        private_file(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self._sync}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction():
            existing = {row[0] for row in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            fresh, seed = "meta" not in existing, False
            if "card_writes" in existing and "meta" in existing:
                version = self._db.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                steps = {"1": _MIGRATE_1_TO_2 + _MIGRATE_2_TO_3 + _MIGRATE_3_TO_4,
                         "2": _MIGRATE_2_TO_3 + _MIGRATE_3_TO_4, "3": _MIGRATE_3_TO_4}
                if version is not None and version[0] in steps:
                    for statement in filter(str.strip, steps[version[0]].split(";")):
                        self._db.execute(statement)
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                                     (str(SCHEMA_VERSION),))
                    seed = True
            for statement in filter(str.strip, (_SCHEMA + _CUT_OFF + _INDEXES).split(";")):
                self._db.execute(statement)
            self._check_schema()
            if seed:
                self._seed_chain()
            self.terminal_id = self._meta(
                "terminal_id", lambda: self._wanted_id or "T" + secrets.token_hex(4).upper())
            version = _parsed(int, self._meta("schema_version", lambda: str(SCHEMA_VERSION)),
                              "schema version")
        if version != SCHEMA_VERSION:
            raise JournalError(f"{self.path}: journal schema {version}, expected {SCHEMA_VERSION}")
        self._high_water = None  # the latest trusted time: the meta row or the newest record's
        for row in (self._db.execute("SELECT value FROM meta WHERE key = 'time_high_water_utc'"),
                    self._db.execute("SELECT at_utc FROM records WHERE clock_trusted = 1 "
                                     "ORDER BY seq DESC LIMIT 1")):
            value = row.fetchone()
            if value is not None:
                self._note_high_water(_parsed(parse_utc, value[0], "time high-water mark"))
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
    def connection(self) -> _GuardedConnection:
        """The journal's connection (autocommit; use :meth:`transaction` to change anything):
        ``execute``, ``executemany``, ``executescript`` and their cursors as sqlite3's, a
        damaged file raising :class:`JournalBroken`."""
        self._flush()
        return self._db

    def transaction(self) -> _Transaction:
        """A durable ``BEGIN IMMEDIATE`` .. ``COMMIT``: one writer at a time across processes."""
        self._flush()
        return self._transaction()

    def _check_schema(self) -> None:
        """The journal's tables have the journal's columns (a flipped bit in the schema makes
        every statement fail or mean something else: it is a damaged journal, said once)."""
        for table, expected in _expected_columns().items():
            found = [tuple(row[1:]) for row in self._db.execute(f"PRAGMA table_info({table})")]
            if found != expected:
                raise JournalBroken(f"{self.path}: the journal is damaged (its table {table} "
                                    "does not have the journal's columns); see farebox "
                                    "journal verify")

    def _seed_chain(self) -> None:
        """Start the marks chain of a journal written before it (schema 3 or older) from its
        tables as they stand: one entry per card write (its row, its fixed columns' digest),
        one per card's memory, then one holding the newest record. Runs in the migration's
        transaction. The checkpoint is left at the seeded chain's end and at no record: the
        next start rehashes the records chain once."""
        seq, previous = 0, GENESIS_HASH
        writes = writes_sum = writes_fp = writes_fp2 = cards = cards_sum = 0
        body = ", ".join(WRITE_BODY_COLUMNS)
        last = None
        try:
            while True:
                rows = self._db.execute(
                    f"SELECT rowid, {body}, state, resolved_utc, log_confirmed, observed "
                    "FROM card_writes WHERE rowid > ? ORDER BY rowid LIMIT 5000",
                    (last if last is not None else -(2 ** 63),)).fetchall()
                if not rows:
                    break
                entries, links = [], []
                for row in rows:
                    seq, writes = seq + 1, writes + 1
                    writes_sum += seq
                    x, x2 = write_fingerprint(seq, *row[12:13], *row[14:16])
                    writes_fp, writes_fp2 = writes_fp + x, writes_fp2 + x2
                    fields = (seq, row[1], *row[12:16], write_body_digest(row[1:12]),
                              None, None, None, None, None, writes, writes_sum, writes_fp,
                              writes_fp2, cards, cards_sum)
                    previous = mark_hash(previous, fields)
                    entries.append((*fields, previous))
                    links.append((seq, row[0]))
                self._db.executemany(_INSERT_MARK, entries)
                self._db.executemany("UPDATE card_writes SET mark_seq = ? WHERE rowid = ?", links)
                last = rows[-1][0]
            entries, links = [], []
            for number, counter, slot in self._db.execute(
                    "SELECT card_number, highest_counter, highest_slot FROM cards "
                    "ORDER BY card_number").fetchall():
                seq, cards = seq + 1, cards + 1
                cards_sum += seq
                fields = (seq, None, None, None, None, None, None, number, counter, slot,
                          None, None, writes, writes_sum, writes_fp, writes_fp2, cards,
                          cards_sum)
                previous = mark_hash(previous, fields)
                entries.append((*fields, previous))
                links.append((seq, number))
            self._db.executemany(_INSERT_MARK, entries)
            self._db.executemany("UPDATE cards SET mark_seq = ? WHERE card_number = ?", links)
        except _MALFORMED as error:
            raise JournalBroken(f"{self.path}: the journal is damaged: a row does not parse "
                                f"({type(error).__name__}: {error})") from None
        if seq or self._db.execute("SELECT 1 FROM records LIMIT 1").fetchone():
            seq = self._chain(records_head=True)
            head = self._db.execute("SELECT hash FROM marks WHERE seq = ?", (seq,)).fetchone()
            self._write_checkpoint((0, GENESIS_HASH), (seq, head[0]))

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
                self._db.execute(_TOUCH)
        self._high_water_saved = self._high_water
        self._unsynced = False

    def idle(self, *, closing: bool = False) -> None:
        """Work kept off the in-field path: checkpoint the WAL, then make the last tap's marks
        durable (one FULL commit). In that order: a checkpoint that takes in the whole WAL makes
        the next write start it again, and a write that starts the WAL syncs its header as well
        as its frames; the commit made here is that write, so the next tap's intent appends to
        the WAL and costs one fsync in the field. A no-op when nothing was written on this
        connection since the last call. ``closing``: no tap follows on this connection (the
        journal is closed next, and SQLite deletes the WAL when the last connection closes):
        the marks are synced and the WAL checkpointed, and it is not started again."""
        if not self.unsynced and self._db.total_changes == self._idle_changes:
            return
        if closing:
            self.sync()
            self._checkpoint_wal()
            self._idle_changes = self._db.total_changes
            return
        whole = self._checkpoint_wal()
        if self.unsynced:
            self.sync()  # starts the WAL again if the checkpoint took in all of it
        elif whole:
            self._start_wal()
        self._idle_changes = self._db.total_changes

    def start_wal(self) -> None:
        """Make sure the next write appends to the WAL rather than starting it (SQLite deletes
        the WAL when the last connection closes, so a new process starts it): a write that
        starts the WAL syncs its header too, which must not happen in a tap's intent. Called
        when a terminal opens, before any card is in the field
        (:func:`~farebox.terminal.runtime.open_terminal`)."""
        if self._checkpoint_wal():
            self._start_wal()
        self._idle_changes = self._db.total_changes

    def _checkpoint_wal(self) -> bool:
        """A passive checkpoint; whether all of the WAL (or none: not started) is now in the
        database file, i.e. whether the next write starts the WAL afresh."""
        busy, log, done = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return busy == 0 and log == done

    def _start_wal(self) -> None:
        """A write that changes nothing, committed without waiting for the disk: it starts the
        WAL (writes and syncs its header); nothing in it needs to be durable."""
        with _Transaction(self._db, quick=self._sync == "FULL"):
            self._db.execute(_TOUCH)

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
        return None if row is None else _parsed(
            lambda r: CardMemory(_integer(r[0]), bytes.fromhex(r[1])), row,
            f"cards row {card_number}")

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

    # ---- verifying -----------------------------------------------------------------------

    def verify_chain(self) -> ChainCheck:
        """Recompute every record's hash: the sequence must be gapless from 1 and each record
        must hash to its stored hash and link to the one before (the records chain only;
        :meth:`verify` checks everything)."""
        self._flush()
        with self._reading():
            return self._verify_records(0, GENESIS_HASH)

    def verify(self, *, save: bool = True) -> ChainCheck:
        """Everything, from the start (``farebox journal verify``): SQLite's own check of the
        file, the records chain, the marks chain (every entry rehashed, every write's life cycle
        legal, every card's memory only moving up, every record it names the journal's, every
        write's fixed columns their digest), and ``card_writes`` and ``cards`` each row at its
        latest entry and equal to it. A whole journal moves the start-up checkpoint here
        (unless ``save`` is false)."""
        self._flush()
        with self._reading():
            check = self._verify_all()
        if check and save:
            self._save_checkpoint(check)
        return check

    def verify_since_checkpoint(self, *, save: bool = True) -> ChainCheck:
        """The start-up check (the daemon's, ``doctor``'s), independent of the journal's size
        but for one set-based query per table: both chains from the checkpoint where they were
        last verified (the entries there unchanged), the records chain's newest record the one
        the marks chain holds, and every row of ``card_writes`` and ``cards``, old or new, equal
        to the chain entry it names and at its latest one (the newest entry's counts and sums).
        A whole journal moves the checkpoint (unless ``save`` is false). What it cannot see: an
        old chain entry rewritten together with its row (:meth:`verify` rehashes them)."""
        self._flush()
        with self._reading():
            check = self._verify_recent(caches=True)
        if check and save:
            self._save_checkpoint(check)
        return check

    def advance_checkpoint(self) -> ChainCheck:
        """Verify both chains from the checkpoint and move it to their ends (no table scan:
        a few milliseconds after a few taps). The daemon calls it while it runs, so that its
        next start has little to rehash; a chain not whole is :class:`JournalBroken`."""
        self._flush()
        with self._reading():
            check = self._verify_recent(caches=False)
        if not check:
            raise self._broken(check)
        self._save_checkpoint(check)
        return check

    def ensure_whole(self) -> ChainCheck:
        """:meth:`verify_since_checkpoint`, raising :class:`JournalBroken` (one line saying
        where) when the journal is not whole: what the daemon does before it serves a card."""
        check = self.verify_since_checkpoint()
        if not check:
            raise self._broken(check)
        return check

    def check_writes(self, tap_ids: Sequence[str]) -> None:
        """The card writes a settlement batch is about to carry agree with the chain entries
        their rows name (state, log block, times); :class:`JournalBroken` if one does not."""
        ids = list(dict.fromkeys(tap_ids))
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            row = self._db.execute(
                f"SELECT w.rowid FROM card_writes w LEFT JOIN marks m ON m.seq = w.mark_seq "
                f"WHERE w.tap_id IN ({', '.join('?' * len(part))}) AND ({_WRITE_DIFFERS}) "
                "LIMIT 1", part).fetchone()
            if row is not None:
                raise self._broken(self._write_differs(row[0]),
                                   "nothing was settled; see farebox journal verify")

    def _reading(self):
        """One read transaction: every check sees the same moment of the file (a daemon may be
        writing to it)."""
        return _Reading(self._db)

    def _verify_all(self) -> ChainCheck:
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                return _broken_at(None, None, f"SQLite finds the file damaged: {problems[0]}")
            records = self._verify_records(0, GENESIS_HASH)
            if not records:
                return records
            marks = self._verify_marks(0, GENESIS_HASH, full=True)
            if not marks:
                return ChainCheck(**{**marks.__dict__, "records": records.records})
            for check in (self._checkpoint_holds(), self._check_records_tail(),
                          self._check_caches(exact=True), self._check_history()):
                if check is not None:
                    return ChainCheck(**{**check.__dict__, "records": records.records,
                                         "marks": marks.marks})
            return ChainCheck(True, records.records, marks=marks.marks)
        except JournalBroken as error:
            return _broken_at(None, None, self._damage_text(error))

    def _verify_recent(self, *, caches: bool) -> ChainCheck:
        try:
            point = self._checkpoint()
            if isinstance(point, ChainCheck):
                return point
            (record_seq, record_hash_), (mark_seq, mark_hash_) = point
            held = self._checkpoint_holds(point)
            if held is not None:
                return held
            records = self._verify_records(record_seq, record_hash_)
            if not records:
                return records
            marks = self._verify_marks(mark_seq, mark_hash_)
            if not marks:
                return ChainCheck(**{**marks.__dict__, "records": records.records})
            for check in (self._check_records_tail(), self._check_caches() if caches else None):
                if check is not None:
                    return ChainCheck(**{**check.__dict__, "records": records.records,
                                         "marks": marks.marks})
            return ChainCheck(True, records.records, marks=marks.marks)
        except JournalBroken as error:
            return _broken_at(None, None, self._damage_text(error))

    def _damage_text(self, error: JournalBroken) -> str:
        """A damaged file's message without the path and the pointer to ``journal verify``."""
        return str(error).removeprefix(f"{self.path}: ").removesuffix(
            "; see farebox journal verify")

    def _broken(self, check: ChainCheck, then: str = "see farebox journal verify"
                ) -> JournalBroken:
        return JournalBroken(f"{self.path}: journal chain BROKEN at {check.where}: "
                             f"{check.problem}; {then}")

    def _verify_records(self, after_seq: int, after_hash: str) -> ChainCheck:
        """The records chain after record ``after_seq`` (whose hash is ``after_hash``)."""
        previous, expected_seq = after_hash, after_seq + 1
        cursor = self._db.execute(f"SELECT {record_columns()} FROM records WHERE seq > ? "
                                  "ORDER BY seq", (after_seq,))
        for row in cursor:
            fields = dict(zip(RECORD_FIELDS, row))
            seq = fields["seq"]
            if seq != expected_seq:
                return _broken_at("records", seq, f"sequence jumps from {expected_seq - 1} to "
                                  f"{seq}", expected_seq - 1)
            fields["clock_trusted"] = bool(fields["clock_trusted"])
            if fields["prev_hash"] != previous:
                return _broken_at("records", seq, "does not link to the record before it", seq)
            try:
                digest = record_hash(fields)
            except _MALFORMED:
                digest = None
            if digest != fields["hash"]:
                return _broken_at("records", seq, "its contents do not match its hash", seq)
            previous, expected_seq = fields["hash"], expected_seq + 1
        return ChainCheck(True, expected_seq - 1)

    def _verify_marks(self, after_seq: int, after_hash: str, *, full: bool = False
                      ) -> ChainCheck:
        """The marks chain after entry ``after_seq`` (whose hash is ``after_hash``): gapless,
        each entry hashing to its hash over the one before; with ``full`` also the records it
        names only moving forward."""
        previous, expected_seq, last_record = after_hash, after_seq + 1, 0
        columns = ", ".join(MARK_FIELDS)
        record_at = MARK_FIELDS.index("record_seq")
        for row in self._db.execute(f"SELECT {columns}, hash FROM marks WHERE seq > ? "
                                    "ORDER BY seq", (after_seq,)):
            seq = row[0]
            if seq != expected_seq:
                return _broken_at("marks", seq, f"sequence jumps from {expected_seq - 1} to "
                                  f"{seq}", marks=expected_seq - 1)
            try:
                digest = mark_hash(previous, row[:-1])
            except _MALFORMED:
                digest = None
            if digest != row[-1]:
                return _broken_at("marks", seq, "its contents do not match its hash (or the "
                                  "entry before it changed)", marks=seq)
            if full and row[record_at] is not None:
                if row[record_at] < last_record:
                    return _broken_at("marks", seq, f"names record {row[record_at]} after "
                                      f"record {last_record}", marks=seq)
                last_record = row[record_at]
            previous, expected_seq = row[-1], expected_seq + 1
        return ChainCheck(True, 0, marks=expected_seq - 1)

    def _checkpoint(self) -> tuple[tuple[int, str], tuple[int, str]] | ChainCheck:
        """Where both chains were last verified: ((record seq, hash), (mark seq, hash))."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'verified_through'"
                               ).fetchone()
        if row is None:
            return (0, GENESIS_HASH), (0, GENESIS_HASH)
        try:
            value = json.loads(row[0])
            point = ((_integer(value["records"][0]), str(value["records"][1])),
                     (_integer(value["marks"][0]), str(value["marks"][1])))
        except (*_MALFORMED, json.JSONDecodeError):
            return _broken_at("meta", "verified_through", "the checkpoint does not parse")
        return point

    def _checkpoint_holds(self, point=None) -> ChainCheck | None:
        """The entries at the checkpoint are still there, with the hashes they were verified
        with (a chain rewritten or cut since is not whole)."""
        point = self._checkpoint() if point is None else point
        if isinstance(point, ChainCheck):
            return point
        for table, (seq, digest) in zip(("records", "marks"), point):
            if seq == 0:
                continue
            row = self._db.execute(f"SELECT hash FROM {table} WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return _broken_at(table, seq, f"{'record' if table == 'records' else 'entry'} "
                                  f"{seq} was verified before and is gone")
            if row[0] != digest:
                return _broken_at(table, seq, "it changed since it was verified")
        return None

    def _save_checkpoint(self, check: ChainCheck) -> None:
        """Remember the chains as verified up to where ``check`` (whole) reached. A shortcut
        for the next check only: a file that cannot be written now (read-only, another writer
        holding it) is left as it is."""
        try:
            with self._transaction():
                point = []
                for table, seq in (("records", check.records), ("marks", check.marks)):
                    row = self._db.execute(f"SELECT hash FROM {table} WHERE seq = ?", (seq,)
                                           ).fetchone()
                    point.append((seq, row[0]) if seq and row is not None
                                 else (0, GENESIS_HASH))
                self._write_checkpoint(*point)
        except sqlite3.OperationalError:
            pass

    def _write_checkpoint(self, records: tuple[int, str], marks: tuple[int, str]) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES ('verified_through', ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (json.dumps({"records": records, "marks": marks},
                                     separators=(",", ":")),))

    def _check_records_tail(self) -> ChainCheck | None:
        """The newest record is the one the newest entry that holds a record names: no record
        was added, dropped or changed at the end of the records chain outside the journal."""
        tail = self._db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                                ).fetchone() or (0, GENESIS_HASH)
        held = self._db.execute("SELECT seq, record_seq, record_hash FROM marks "
                                "WHERE record_seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
                                ).fetchone()
        held_record = (0, GENESIS_HASH) if held is None else (held[1], held[2])
        if tuple(tail) != held_record:
            where = tail[0] or held_record[0]
            return _broken_at("records", where, f"the newest record is #{tail[0]}, but the marks "
                              f"chain holds #{held_record[0]}"
                              + ("" if tail[0] != held_record[0] else " with another hash"))
        return None

    def _check_caches(self, *, exact: bool = False) -> ChainCheck | None:
        """Every ``card_writes`` and ``cards`` row at its latest chain entry and equal to it.
        Each row names an entry of its own (``mark_seq``), so the rows' count and the sum of
        their ``mark_seq`` equal the newest entry's only when every row names its latest.
        ``card_writes`` (the big one) is then checked by one scan: the sum of its rows'
        fingerprints (:func:`write_fingerprint`) must be the newest entry's; ``cards`` row by
        row against its entry (so is ``card_writes`` when ``exact``, :meth:`verify`'s)."""
        head = _parsed(_chain_head, self._db.execute(_HEAD).fetchone(), "newest marks entry")
        _, _, writes, writes_sum, writes_fp, writes_fp2, cards, cards_sum = head
        rows, sum_, *fingerprints = self._db.execute(_WRITES_SUMS).fetchone()
        if exact or (rows, sum_, *fingerprints) != (writes, writes_sum, writes_fp, writes_fp2):
            if self._db.execute(f"SELECT 1 FROM card_writes w LEFT JOIN marks m "
                                f"ON m.seq = w.mark_seq WHERE {_WRITE_DIFFERS} LIMIT 1"
                                ).fetchone():
                return self._first_write_differing()
        problem = self._counted("card_writes", rows, writes, sum_, writes_sum)
        if problem is not None:
            return problem
        if fingerprints != [writes_fp, writes_fp2]:
            return _broken_at("card_writes", None, "the rows' fingerprints are not the chain's")
        rows, sum_, bad = self._db.execute(
            f"SELECT count(*), coalesce(sum(c.mark_seq), 0), coalesce(sum({_CARD_DIFFERS}), 0) "
            "FROM cards c LEFT JOIN marks m ON m.seq = c.mark_seq").fetchone()
        if bad:
            return self._first_card_differing()
        return self._counted("cards", rows, cards, sum_, cards_sum)

    def _counted(self, table: str, rows: int, count: int, sum_: int, total: int
                 ) -> ChainCheck | None:
        if rows != count:
            return _broken_at(table, None, f"{rows} rows, but the marks chain holds {count} "
                              "(a row was added or deleted outside the journal)")
        if sum_ != total:
            return self._first_not_latest(table) or _broken_at(
                table, None, "a row names an older chain entry than its latest")
        return None

    def _first_write_differing(self) -> ChainCheck:
        row = self._db.execute(f"SELECT w.rowid FROM card_writes w LEFT JOIN marks m "
                               f"ON m.seq = w.mark_seq WHERE {_WRITE_DIFFERS} "
                               "ORDER BY w.rowid LIMIT 1").fetchone()
        return self._write_differs(row[0])

    def _write_differs(self, rowid: int) -> ChainCheck:
        """How the ``card_writes`` row ``rowid`` differs from the entry it names."""
        names = ("state", "resolved_utc", "log_confirmed", "observed")
        row = self._db.execute(
            f"SELECT w.mark_seq, m.seq, m.tap_id, {', '.join('w.' + n for n in names)}, "
            f"{', '.join('m.' + n for n in names)}, w.tap_id FROM card_writes w "
            "LEFT JOIN marks m ON m.seq = w.mark_seq WHERE w.rowid = ?", (rowid,)).fetchone()
        return _broken_at("card_writes", row[-1], _differs(row[:-1], names, row[-1]))

    def _first_card_differing(self) -> ChainCheck:
        names = ("card_number", "highest_counter", "highest_slot")
        row = self._db.execute(
            "SELECT c.mark_seq, m.seq, m.card_number, c.card_number, c.highest_counter, "
            "c.highest_slot, m.card_number, m.counter, m.slot FROM cards c "
            f"LEFT JOIN marks m ON m.seq = c.mark_seq WHERE {_CARD_DIFFERS} "
            "ORDER BY c.card_number LIMIT 1").fetchone()
        return _broken_at("cards", row[3], _differs(row, names, row[3]))

    def _first_not_latest(self, table: str) -> ChainCheck | None:
        """A row naming an entry that is not its latest, or a row the chain holds that the table
        has lost (a scan of the whole chain: :meth:`verify`'s, or after a failed sum)."""
        key, column = ("tap_id", "tap_id") if table == "card_writes" else ("card_number",
                                                                           "counter")
        latest = (f"SELECT {key}, max(seq) AS latest FROM marks WHERE {column} IS NOT NULL "
                  f"GROUP BY {key}")
        row = self._db.execute(
            f"SELECT t.{key}, t.mark_seq, l.latest FROM {table} t LEFT JOIN ({latest}) l "
            f"ON l.{key} = t.{key} WHERE l.latest IS NOT t.mark_seq LIMIT 1").fetchone()
        if row is not None:
            return _broken_at(table, row[0], f"names chain entry {row[1]}, but its latest is "
                              f"{row[2]}" if row[2] is not None else
                              "is not in the marks chain")
        row = self._db.execute(
            f"SELECT l.{key}, l.latest FROM ({latest}) l WHERE l.{key} NOT IN "
            f"(SELECT {key} FROM {table}) LIMIT 1").fetchone()
        if row is not None:
            return _broken_at(table, row[0], f"is gone, but the marks chain holds it (entry "
                              f"{row[1]})")
        return None

    def _check_history(self) -> ChainCheck | None:
        """What only the whole chain shows: the newest entry's counts and sums, each write's
        life cycle, its first entry (and only that one) holding its digest, which matches its
        row, each card's memory only moving up, each record named being the journal's."""
        for table in ("card_writes", "cards"):
            problem = self._first_not_latest(table)
            if problem is not None:
                return problem
        head = _parsed(_chain_head, self._db.execute(_HEAD).fetchone(), "newest marks entry")
        for held, query, names in (
                (head[2:6], _ENTRY_SUMS, "card writes"),
                (head[6:8], "SELECT count(*), coalesce(sum(latest), 0) FROM (SELECT max(seq) "
                 "AS latest FROM marks WHERE counter IS NOT NULL GROUP BY card_number)",
                 "cards")):
            real = self._db.execute(query).fetchone()
            if tuple(real) != tuple(held):
                return _broken_at("marks", head[0], f"its count and sums of {names} "
                                  f"{tuple(held)} are not the chain's {tuple(real)}")
        for previous, state, seq in self._db.execute(
                "SELECT prev, state, min(seq) FROM (SELECT seq, state, lag(state) OVER "
                "(PARTITION BY tap_id ORDER BY seq) AS prev FROM marks WHERE tap_id IS NOT NULL) "
                "WHERE prev IS NULL OR prev IS NOT state GROUP BY prev, state"):
            try:
                new = WriteState(state)
                if previous is not None:
                    check_transition(WriteState(previous), new)
            except (ValueError, IllegalTransition):
                return _broken_at("marks", seq, f"moves a card write from {previous!r} to "
                                  f"{state!r}" if previous is not None else
                                  f"gives a card write the state {state!r}")
        row = self._db.execute(
            "SELECT seq FROM (SELECT seq, body, lag(seq) OVER (PARTITION BY tap_id ORDER BY seq) "
            "AS prev FROM marks WHERE tap_id IS NOT NULL) WHERE (prev IS NULL) = (body IS NULL) "
            "LIMIT 1").fetchone()
        if row is not None:
            return _broken_at("marks", row[0], "a write's digest is not on its first entry alone")
        row = self._db.execute(
            "SELECT seq FROM (SELECT seq, counter, lag(counter) OVER (PARTITION BY card_number "
            "ORDER BY seq) AS prev FROM marks WHERE counter IS NOT NULL) WHERE prev >= counter "
            "LIMIT 1").fetchone()
        if row is not None:
            return _broken_at("marks", row[0], "moves a card's memory down")
        row = self._db.execute(
            "SELECT m.seq FROM marks m LEFT JOIN records r ON r.seq = m.record_seq "
            "WHERE m.record_seq IS NOT NULL AND m.record_seq != 0 "
            "AND r.hash IS NOT m.record_hash LIMIT 1").fetchone()
        if row is not None:
            return _broken_at("marks", row[0], "names a record the journal does not hold")
        columns = ", ".join("w." + name for name in WRITE_BODY_COLUMNS)
        for row in self._db.execute(
                f"SELECT {columns}, m.body FROM card_writes w JOIN (SELECT tap_id, min(seq) AS "
                "first FROM marks WHERE tap_id IS NOT NULL GROUP BY tap_id) f "
                "ON f.tap_id = w.tap_id JOIN marks m ON m.seq = f.first"):
            try:
                digest = write_body_digest(row[:-1])
            except _MALFORMED:
                digest = None
            if digest != row[-1]:
                return _broken_at("card_writes", row[0], "its fixed columns (card, counters, "
                                  "slot, log block, outcome) differ from its first chain entry")
        return None

    def time_high_water(self) -> datetime | None:
        """The latest tap time this terminal trusted (None before its first tap). Read at open
        and kept in memory; the stored value only ever moves forward."""
        return self._high_water

    def time_high_water_record(self) -> JournalRecord | None:
        """The record that set the time high-water mark: the newest trusted record (a trusted
        time is never behind the mark, and ``clock_reset`` moves it), when its time is the mark.
        None before the first trusted record, or when a tap that wrote no record (a decline)
        moved the mark past it. For ``doctor``: which tap put the mark where it is."""
        self._flush()
        row = self._db.execute(
            f"SELECT {record_columns('r.')}, w.state FROM records r JOIN card_writes w "
            "USING (tap_id) WHERE r.clock_trusted = 1 ORDER BY r.seq DESC LIMIT 1").fetchone()
        if row is None or self._high_water is None:
            return None
        record = _record_from_row(row)
        try:
            at = parse_utc(record.at_utc)
        except ValueError:
            return None
        return record if at == self._high_water else None

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

    def _remember(self, card_number: int, counter: int, slot: bytes, *,
                  chain: bool = True) -> bool:
        """Move the card's memory to ``counter`` and ``slot`` if that is higher; whether it
        moved. A move is chained at once, unless ``chain`` is false: the caller then chains it
        with its write's entry (:meth:`_chain`, ``card_number``), in the same transaction."""
        moved = self._db.execute(
            "INSERT INTO cards (card_number, highest_counter, highest_slot) VALUES (?, ?, ?) "
            "ON CONFLICT (card_number) DO UPDATE SET highest_counter = excluded.highest_counter, "
            "highest_slot = excluded.highest_slot WHERE excluded.highest_counter > highest_counter",
            (card_number, counter, slot.hex())).rowcount == 1
        if moved and chain:
            self._chain(card_number=card_number)
        return moved

    def _chain(self, *, tap_id: str | None = None, body: str | None = None,
               card_number: int | None = None, records_head: bool | tuple[int, str] = False,
               new_write: bool = False) -> int:
        """Append the ``marks`` entry for what the running transaction has just changed: the
        write ``tap_id`` as its row now stands (``body``: a new write's digest; ``new_write``:
        its row was just inserted as an intent naming this entry, so it is not read back), the
        memory of card ``card_number`` as its row now stands, and with ``records_head`` the
        records chain's newest record (given as (seq, hash) by a caller that just wrote it, else
        read). The rows then name the entry (``mark_seq``); its sequence."""
        seq, previous, writes, writes_sum, writes_fp, writes_fp2, cards, cards_sum = _parsed(
            _chain_head, self._db.execute(_HEAD).fetchone(), "newest marks entry")
        seq += 1
        write: tuple = (None, None, None, None, None)
        if tap_id is not None:
            # the row as it now stands, with the entry it named so far (one statement)
            row = (WriteState.INTENT.value, None, 0, 0, seq) if new_write else self._db.execute(
                "SELECT w.state, w.resolved_utc, w.log_confirmed, w.observed, w.mark_seq, "
                "m.state, m.log_confirmed, m.observed FROM card_writes w "
                "LEFT JOIN marks m ON m.seq = w.mark_seq WHERE w.tap_id = ?", (tap_id,)
            ).fetchone()
            if row is None:
                raise JournalError(f"card write {tap_id} is not in the journal")
            before = _parsed(_optional_integer, row[4], f"card_writes row {tap_id!r} mark_seq")
            if before is None or before == seq:  # a new write (made naming this entry)
                writes += 1
            else:
                old = None if row[5] is None else row[5:8]  # no such entry: damaged, below
                x, x2 = _parsed(lambda r: write_fingerprint(before, *r), old,
                                f"marks entry {before}")
                writes_sum, writes_fp, writes_fp2 = (writes_sum - before, writes_fp - x,
                                                     writes_fp2 - x2)
            x, x2 = _parsed(lambda r: write_fingerprint(seq, *r), (row[0], *row[2:4]),
                            f"card_writes row {tap_id!r}")
            writes_sum, writes_fp, writes_fp2 = writes_sum + seq, writes_fp + x, writes_fp2 + x2
            write = (tap_id, *row[:4])
            if before != seq:
                self._db.execute("UPDATE card_writes SET mark_seq = ? WHERE tap_id = ?",
                                 (seq, tap_id))
        card: tuple = (None, None, None)
        if card_number is not None:
            row = self._db.execute("SELECT highest_counter, highest_slot, mark_seq FROM cards "
                                   "WHERE card_number = ?", (card_number,)).fetchone()
            before = _parsed(_optional_integer, row[2], f"cards row {card_number} mark_seq")
            cards, cards_sum = cards + (before is None), cards_sum - (before or 0) + seq
            card = (card_number, row[0], row[1])
            self._db.execute("UPDATE cards SET mark_seq = ? WHERE card_number = ?",
                             (seq, card_number))
        record: tuple = (None, None)
        if isinstance(records_head, tuple):
            record = records_head
        elif records_head:
            row = self._db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                                   ).fetchone()
            record = tuple(row) if row is not None else (0, GENESIS_HASH)
        fields = (seq, *write[:5], body, *card, *record, writes, writes_sum, writes_fp,
                  writes_fp2, cards, cards_sum)
        self._db.execute(_INSERT_MARK, (*fields, _parsed(
            lambda f: mark_hash(previous, f), fields, f"marks entry {seq}")))
        return seq

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
        body = (tap_id, card_number, idm.hex(), kind, counter_before, counter_after,
                expected_slot.hex(), at_utc, _COMPACT(outcome),
                log_block, log_data.hex())  # WRITE_BODY_COLUMNS
        with self._transaction():
            self._db.execute(  # naming the chain entry it gets below (_chain)
                f"INSERT INTO card_writes ({', '.join(WRITE_BODY_COLUMNS)}, state, "
                f"log_confirmed, mark_seq) VALUES ({', '.join('?' * len(WRITE_BODY_COLUMNS))}, "
                "'intent', 0, (SELECT coalesce(max(seq), 0) + 1 FROM marks))", body)
            moved = remember_before and self._remember(card_number, counter_before, slot_before,
                                                       chain=False)
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
            self._chain(tap_id=tap_id, body=write_body_digest(body),
                        card_number=card_number if moved else None,
                        records_head=(seq, previous), new_write=True)
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
        body = (tap_id, 0, "", "clock_reset", 0, 0, "", at_utc, json.dumps(
            {"reason": reason, "previous_high_water": previous_mark}, separators=(",", ":")),
            None, None)  # WRITE_BODY_COLUMNS
        with self._transaction():
            self._db.execute(
                f"INSERT INTO card_writes ({', '.join(WRITE_BODY_COLUMNS)}, state, resolved_utc, "
                f"log_confirmed, mark_seq) VALUES ({', '.join('?' * len(WRITE_BODY_COLUMNS))}, "
                "'committed', ?, 1, (SELECT coalesce(max(seq), 0) + 1 FROM marks))",
                (*body, at_utc))
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
            self._chain(tap_id=tap_id, body=write_body_digest(body), records_head=True)
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
            if self._db.execute("UPDATE card_writes SET log_confirmed = 1 WHERE tap_id = ? "
                                "AND log_confirmed = 0", (write.tap_id,)).rowcount:
                self._chain(tap_id=write.tap_id)
            return
        changed = self._db.execute(
            "UPDATE card_writes SET state = ?, resolved_utc = ?, "
            "log_confirmed = log_confirmed OR ?, observed = ? WHERE tap_id = ? AND state = ?",
            (mark.state.value, mark.at_utc, int(mark.log_confirmed), int(mark.observed),
             write.tap_id, write.state.value)).rowcount
        if changed != 1:
            raise JournalError(f"card write {write.tap_id} is no longer {write.state.value}")
        moved = mark.state is WriteState.COMMITTED and self._remember(
            write.card_number, write.counter_after, write.expected_slot, chain=False)
        self._chain(tap_id=write.tap_id, card_number=write.card_number if moved else None)

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

    # ---- for a request made again (issue 17 item 1): read only ----------------------------

    def last_change(self, card_number: int, counter: int, slot: bytes) -> CardWrite | None:
        """This terminal's committed write that left the card at ``counter`` with exactly the
        purse slot bytes ``slot``: the card's last change, when the card shows those bytes now
        (None: what the card shows is not a write of this terminal's). The newest such write;
        the scan goes back from the newest write and stops there (callers ask only when the
        card's state is one this terminal remembers)."""
        self._flush()
        row = self._db.execute(
            f"SELECT {_WRITE_COLUMNS} FROM card_writes WHERE card_number = ? "
            "AND counter_after = ? AND expected_slot = ? AND state = 'committed' "
            "ORDER BY rowid DESC LIMIT 1", (card_number, counter, slot.hex())).fetchone()
        return None if row is None else CardWrite._from_row(row)

    def mark_shown(self, tap_ids: Sequence[str]) -> None:
        """The results of these writes were shown: a later request is not taken for the same
        one run again after a crash. Not waited for: lost to a crash, the write is reported once
        more rather than made twice."""
        with self._quick():
            self._db.executemany("INSERT OR IGNORE INTO shown (tap_id) VALUES (?)",
                                 [(tap_id,) for tap_id in tap_ids])

    def was_shown(self, tap_id: str) -> bool:
        """Whether :meth:`mark_shown` was told of this write."""
        self._flush()
        return self._db.execute("SELECT 1 FROM shown WHERE tap_id = ?",
                                (tap_id,)).fetchone() is not None


def _record_from_row(row: Sequence) -> JournalRecord:
    """A record from its columns (:data:`RECORD_FIELDS`) followed by its write's state."""
    fields = dict(zip(RECORD_FIELDS, row))
    try:
        for name, sql in RECORD_COLUMNS:
            if sql.startswith("INTEGER"):
                _integer(fields[name])
            elif not isinstance(fields[name], str):
                raise TypeError(f"{name} is not text")
        parse_utc(fields["at_utc"])
        return JournalRecord(**{**fields, "type": RecordType(fields["type"]),
                                "clock_trusted": bool(fields["clock_trusted"])},
                             write_state=WriteState(row[len(RECORD_FIELDS)]))
    except _MALFORMED as error:
        raise JournalBroken(f"the journal is damaged: record {fields.get('seq')!r} does not "
                            f"parse ({type(error).__name__}: {error}); see farebox journal "
                            "verify") from None


def _integer(value: object) -> int:
    """An INTEGER column's value, or TypeError (a damaged row: text, a blob, a real)."""
    if type(value) is not int:
        raise TypeError(f"{value!r} is not an integer")
    return value


#: SQL: a ``card_writes`` row ``w`` differs from the ``marks`` entry ``m`` it names
_WRITE_DIFFERS = ("m.seq IS NULL OR m.tap_id IS NOT w.tap_id OR m.state IS NOT w.state "
                  "OR m.resolved_utc IS NOT w.resolved_utc "
                  "OR m.log_confirmed IS NOT w.log_confirmed OR m.observed IS NOT w.observed")
#: SQL: a ``cards`` row ``c`` differs from the ``marks`` entry ``m`` it names
_CARD_DIFFERS = ("m.seq IS NULL OR m.card_number IS NOT c.card_number "
                 "OR m.counter IS NOT c.highest_counter OR m.slot IS NOT c.highest_slot")


def _differs(row: Sequence, names: Sequence[str], key: object) -> str:
    """How a row differs from the entry it names; ``row``: the row's ``mark_seq``, the entry's
    seq and key, then the row's ``names`` and the entry's same values."""
    named, seq, entry_key = row[0], row[1], row[2]
    if named is None:
        return "names no chain entry"
    if seq is None:
        return f"names chain entry {named!r}, which does not exist"
    if entry_key != key:
        return f"names chain entry {seq}, which is another's ({entry_key!r})"
    mine, chained = row[3:3 + len(names)], row[3 + len(names):]
    return "; ".join(f"{name} is {value!r} but its chain entry {seq} says {held!r}"
                     for name, value, held in zip(names, mine, chained) if value != held
                     or type(value) is not type(held)) or f"differs from its chain entry {seq}"


class _Reading:
    """A read transaction (BEGIN DEFERRED .. COMMIT) on an autocommit connection."""

    def __init__(self, db) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, *exc) -> None:
        self._db.execute("COMMIT")


@functools.cache
def _expected_columns() -> dict[str, list[tuple]]:
    """What ``PRAGMA table_info`` says of each of the journal's tables when whole."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(_SCHEMA)
        return {table: [tuple(row[1:]) for row in db.execute(f"PRAGMA table_info({table})")]
                for table in ("meta", "card_writes", "records", "cards", "marks")}
    finally:
        db.close()


def _optional_integer(value: object) -> int | None:
    return None if value is None else _integer(value)


def _chain_head(row: Sequence | None) -> tuple[int, str, int, int, int, int, int, int]:
    """The newest ``marks`` entry's sequence, hash, counts and sums (:data:`_HEAD`; an empty
    chain's, with no row)."""
    if row is None:
        return 0, GENESIS_HASH, 0, 0, 0, 0, 0, 0
    if not isinstance(row[1], str):
        raise TypeError("the hash is not text")
    return (_integer(row[0]), row[1], *(_integer(value) for value in row[2:]))


def parsing(what: str):
    """A decorator for the methods that turn the journal file's rows into values (the settlement
    batches'): a row that does not parse is :class:`JournalBroken` naming ``what``, never an
    internal error."""
    def decorate(method):
        @functools.wraps(method)
        def guarded(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except _MALFORMED as error:
                raise JournalBroken(f"the journal is damaged: {what} does not parse "
                                    f"({type(error).__name__}: {error}); see farebox journal "
                                    "verify") from None
        return guarded
    return decorate


def _parsed(parse, value: object, what: str):
    """``parse(value)``, or JournalBroken when the stored value does not parse."""
    try:
        return parse(value)
    except _MALFORMED as error:
        raise JournalBroken(f"the journal is damaged: its {what} does not parse "
                            f"({type(error).__name__}: {error}); see farebox journal verify"
                            ) from None


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
