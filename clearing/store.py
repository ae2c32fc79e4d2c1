"""The clearing receiver's storage: the one module that speaks SQL to the ledger (the migrations
in ``clearing/migrations`` make its tables; ``maintain.py`` rolls its partitions over). SQLite
is the default (``--db`` a file path); PostgreSQL (``--db postgresql://...``, psycopg 3 with a
connection pool) is the engine for a fleet.

Tables (``docs/clearing.md`` draws them): ``terminals`` (enrolled keys, integer ids),
``sources`` (one per terminal incarnation: its last batch and hash, how many sequence numbers
it has stored and the highest, duplicates ignored; the row a batch locks), ``gaps`` (missing
runs of sequence numbers), ``batches``, ``records`` (one row per record and state; partitioned
by day of the record's own time on PostgreSQL), ``card_writes`` (one row per record that changed
a card: the card's history by counter, outside the day partitions), ``day_totals`` (count and
amount per day, source, state and type, kept inside the ingest transaction), ``forks`` (card
counters spent by more than one write, as found), ``actions``, ``meta``.

A batch is stored in one transaction of a handful of statements (:meth:`Store.ingest`): the
source's row locked (two receivers serialise per terminal in the database, and on PostgreSQL
per card too), the records it sends again looked up by key, the card history around the
batch's writes loaded by (card, counter) pairs, the same-change, reconcile and fork checks done
on that neighbourhood in memory (to a fixpoint, loading further back as settled writes reach
back), and the difference written back set-wise.

A record's ``reconciled`` says where its state came from: 0 as the terminal sent it; 1 a record
sent ``unresolved`` that the card's history proved committed (the row's state changed); 2 a row
the receiver derived for a record sent ``in_doubt`` (committed or void, from the card's next
change at any terminal), recomputed whenever a batch touches its card neighbourhood and dropped
once the terminal sends its own resolution.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from farebox.protocol.settlement import GENESIS_HASH, parse_utc, utc_iso

from farebox.clearing.errors import ClearingError

RECORD_COLUMNS = ("source", "seq", "state", "batch_number", "card_number", "counter_before",
                  "counter_after", "type", "amount_cents", "balance_before_cents",
                  "balance_after_cents", "at_utc", "hash", "observed", "reconciled",
                  "not_shown")
_PG_TYPES = ("bigint", "bigint", "text", "bigint", "bigint", "bigint", "bigint", "text",
             "bigint", "bigint", "bigint", "timestamptz", "text", "smallint", "smallint",
             "smallint")
#: where a record's state came from (the ``reconciled`` column)
AS_SENT, PROVED_COMMITTED, DERIVED = 0, 1, 2

#: The state a committed record is stored in when the same card change is already settled from
#: another terminal's write (see :meth:`_Neighbourhood.same_change`): kept, never counted.
SAME_CHANGE = "same_change"
_SETTLED = frozenset({"committed", SAME_CHANGE})
#: a terminal's clock records: card 0, no card's change
_NO_CARD_TYPES = ("clock_reset",)
#: a service terminal's collection of an AAVS amount outstanding (the terminal's RecordType)
PAID_TYPE = "aavs_outstanding_paid"
#: PostgreSQL errors after which a batch's transaction is simply run again
_RETRY_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected


class StoreError(ClearingError):
    """The database cannot be opened or used."""


class Conflict(ClearingError):
    """A batch the store will not take as sent: ``kind`` is ``taken`` (its number holds another
    batch), ``order`` (the batch before it is missing), ``link`` (it does not link to it) or
    ``record`` (a record under a number already stored with another hash)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class StoredBatch:
    terminal_id: str
    incarnation: str
    number: int
    hash: str
    prev_hash: str


@dataclass(frozen=True)
class Stored:
    """What :meth:`Store.ingest` did with a batch."""

    again: bool  # received before (same hash): nothing changed
    duplicates: int  # records stored before, skipped
    forks: tuple[int, ...] = ()  # cards of this batch with a counter spent twice


# -- rows in memory ---------------------------------------------------------------------------


@dataclass
class Row:
    """One ``records`` row; ``at_utc`` as the canonical text (``utc_iso``)."""

    source: int
    seq: int
    state: str
    batch_number: int
    card_number: int
    counter_before: int
    counter_after: int
    type: str
    amount_cents: int
    balance_before_cents: int
    balance_after_cents: int
    at_utc: str
    hash: str
    observed: int = 0
    reconciled: int = 0
    not_shown: int = 0

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.source, self.seq, self.state)

    @property
    def day(self) -> str:
        return self.at_utc[:10]

    def values(self) -> tuple:
        return tuple(getattr(self, column) for column in RECORD_COLUMNS)

    def with_state(self, state: str, reconciled: int) -> Row:
        return Row(**{**self.__dict__, "state": state, "reconciled": reconciled})


@dataclass
class _Write:
    """One card write: the records of one tap share source, time and counters."""

    key: tuple  # source, time, counter before, counter after
    counter_before: int
    counter_after: int
    balance_before: int  # its first record's: what the card held before
    balance_after: int = 0  # its last record's: what the card held after
    rows: list = field(default_factory=list)

    @property
    def states(self) -> set[str]:
        return {row.state for row in self.rows}

    @property
    def settled(self) -> bool:
        return bool(self.states & _SETTLED)

    def proved_by(self, others: list[_Write]) -> bool:
        """Whether the card's next change (one of ``others``, all settled) starts from the
        counter and balance this write left, and no other settled write reached that counter."""
        if any(w.counter_after == self.counter_after for w in others):
            return False
        return any(w.counter_before == self.counter_after and w.balance_before == self.balance_after
                   for w in others)


def _writes(rows: Iterable[Row]) -> list[_Write]:
    writes: dict[tuple, _Write] = {}
    for row in sorted(rows, key=lambda r: (r.source, r.seq, r.state)):
        key = (row.source, row.at_utc, row.counter_before, row.counter_after)
        write = writes.get(key)
        if write is None:
            write = writes[key] = _Write(key, row.counter_before, row.counter_after,
                                         row.balance_before_cents)
        if all(r.seq != row.seq for r in write.rows):
            write.balance_after = row.balance_after_cents  # the last record's
        write.rows.append(row)
    return list(writes.values())


class _Neighbourhood:
    """The card history around a batch's writes, in memory: every row at the loaded (card,
    counter before) pairs, as stored (``before``) and as it is to be (``cards``), by card."""

    def __init__(self) -> None:
        self.pairs: dict[int, set[int]] = defaultdict(set)  # card -> counters loaded
        self.before: dict[tuple, Row] = {}
        self.before_by_card: dict[int, list[Row]] = defaultdict(list)
        self.cards: dict[int, dict[tuple, Row]] = defaultdict(dict)

    def loaded(self, card: int, counter: int) -> bool:
        return counter in self.pairs.get(card, ())

    def add_loaded(self, pairs: Iterable[tuple[int, int]], rows: Iterable[Row]) -> None:
        for card, counter in pairs:
            self.pairs[card].add(counter)
        for row in rows:
            if row.key not in self.before and row.key not in self.cards[row.card_number]:
                self.before[row.key] = row
                self.before_by_card[row.card_number].append(row)
                self.cards[row.card_number][row.key] = row

    def put(self, row: Row) -> None:
        self.cards[row.card_number][row.key] = row

    def drop(self, row: Row) -> None:
        self.cards[row.card_number].pop(row.key, None)

    def same_change(self, row: Row) -> bool:
        """Another write's committed record of the very same card change (same card, counters,
        type, amount and balance after), where either was committed by observation: a write in
        doubt at one terminal resolved by the bytes another terminal wrote. It is one change. A
        derived row is no terminal's commit."""
        return any(
            other.state == "committed" and other.reconciled != DERIVED
            and (other.observed or row.observed)
            and (other.counter_before, other.counter_after, other.type, other.amount_cents,
                 other.balance_after_cents) == (
                row.counter_before, row.counter_after, row.type, row.amount_cents,
                row.balance_after_cents)
            and (other.source, other.at_utc) != (row.source, row.at_utc)
            for other in self.cards.get(row.card_number, {}).values())

    def settle(self, cards: Iterable[int]) -> set[tuple[int, int]]:
        """Reconcile the evaluable writes of ``cards`` (their own pair and the next one
        loaded) to a fixpoint; the pairs to load further back (before a write whose settled
        state changed)."""
        wanted: set[tuple[int, int]] = set()
        for card in sorted(set(cards)):
            counters = self.pairs.get(card, set())
            evaluable = {c for c in counters if c + 1 in counters}
            rows = self.cards[card]
            for key, row in list(rows.items()):
                if row.reconciled == DERIVED and row.counter_before in evaluable:
                    del rows[key]
            while self._step(card, evaluable):
                pass
            was = {w.key: w.settled for w in _writes(self.before_by_card.get(card, []))}
            for write in _writes(rows.values()):
                if (was.get(write.key, False) != write.settled and write.counter_before > 0
                        and write.counter_before - 1 not in counters):
                    wanted.add((card, write.counter_before - 1))
        return wanted

    def _step(self, card: int, evaluable: set[int]) -> bool:
        rows = self.cards[card]
        writes = _writes(rows.values())
        settled = [w for w in writes if w.settled]
        for write in writes:
            if write.counter_before not in evaluable:
                continue
            others = [w for w in settled if w.key != write.key]
            states = write.states
            if "unresolved" in states and not states & _SETTLED:
                if write.proved_by(others):
                    for row in write.rows:
                        if row.state == "unresolved":
                            del rows[row.key]
                            proved = row.with_state("committed", PROVED_COMMITTED)
                            rows[proved.key] = proved
                    return True
            elif states == {"in_doubt"}:
                if write.proved_by(others):
                    state = "committed"
                elif any(w.counter_before == write.counter_before for w in others):
                    state = "void"
                else:
                    continue
                for row in list(write.rows):
                    derived = row.with_state(state, DERIVED)
                    rows[derived.key] = derived
                return True
        return False

    def rows(self) -> Iterator[Row]:
        for rows in self.cards.values():
            yield from rows.values()

    def forks(self) -> list[tuple[int, int, int]]:
        """(card, counter, writes) at the loaded pairs where more than one write changed the
        card from that counter: committed writes, and writes in doubt whose result may have
        been shown."""
        spent: dict[tuple[int, int], set] = defaultdict(set)
        for row in self.rows():
            if row.state == "committed" or (row.state == "in_doubt" and not row.not_shown):
                spent[(row.card_number, row.counter_before)].add((row.source, row.at_utc))
        return sorted((card, counter, len(writes)) for (card, counter), writes in spent.items()
                      if len(writes) > 1)

    def changes(self) -> tuple[list[Row], list[Row]]:
        """(rows to delete, rows to insert) to turn what is stored into what is to be."""
        gone = [row for key, row in self.before.items()
                if self.cards[row.card_number].get(key) != row]
        new = [row for row in self.rows() if self.before.get(row.key) != row]
        return gone, new


# -- the store --------------------------------------------------------------------------------


class _Db:
    """One connection, with the store's dialect: ``?`` markers (``%b`` for psycopg)."""

    def __init__(self, conn: Any, postgres: bool) -> None:
        self.conn = conn
        self.postgres = postgres

    def sql(self, statement: str) -> str:
        # %b: parameters in binary (arrays of thousands of values are dumped in C)
        return statement.replace("?", "%b") if self.postgres else statement

    def execute(self, statement: str, parameters: Sequence = ()) -> Any:
        return self.conn.execute(self.sql(statement), tuple(parameters))

    def all(self, statement: str, parameters: Sequence = ()) -> list[tuple]:
        return [tuple(row) for row in self.execute(statement, parameters).fetchall()]

    def many(self, statement: str, rows: Sequence[Sequence]) -> None:
        if not rows:
            return
        if self.postgres:
            with self.conn.cursor() as cursor:
                cursor.executemany(self.sql(statement), [tuple(r) for r in rows])
        else:
            self.conn.executemany(statement, [tuple(r) for r in rows])

    # times: timestamptz on PostgreSQL (datetime in, datetime out), ISO text on SQLite
    def time(self, text: str) -> Any:
        return parse_utc(text) if self.postgres else text

    def day(self, text: str) -> Any:
        return date.fromisoformat(text) if self.postgres else text


def _text_time(value: Any) -> str:
    return utc_iso(value) if isinstance(value, datetime) else value


def _text_day(value: Any) -> str:
    return value.isoformat() if isinstance(value, date) else value


def canonical_time(text: str) -> str:
    """``text`` (a UTC time on the wire) as the store keeps it: :func:`utc_iso` of it."""
    return utc_iso(parse_utc(text))


class Store:
    """The clearing database. Thread-safe: on PostgreSQL each call takes a connection from a
    pool of ``pool_size``; on SQLite one connection is shared under a lock (SQLite has one
    writer anyway)."""

    def __init__(self, db: str, *, pool_size: int = 8) -> None:
        self.db = db
        self.postgres = db.startswith(("postgresql://", "postgres://"))
        self._lock = threading.RLock()
        self._pool: Any = None
        self._conn: Any = None
        from farebox.clearing.migrate import ensure_current

        try:
            ensure_current(db)
            if self.postgres:
                from psycopg_pool import ConnectionPool

                self._pool = ConnectionPool(db, min_size=1, max_size=max(1, pool_size),
                                            kwargs={"autocommit": True}, open=True, timeout=30)
                self._pool.wait(timeout=30)
            else:
                self._conn = sqlite3.connect(db, isolation_level=None, timeout=30,
                                             check_same_thread=False)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                # the card history's and records' indexes in memory (the default is 2 MiB)
                self._conn.execute("PRAGMA cache_size=-131072")
        except ImportError as error:
            raise StoreError(f"a PostgreSQL --db needs {error.name}: "
                             "pip install 'farebox[clearing]'") from None
        except ClearingError:
            self.close()
            raise
        except Exception as error:  # sqlite3.Error, psycopg.Error, PoolTimeout: a bad path or URL
            self.close()
            raise StoreError(f"cannot open {db}: {error}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --

    @contextmanager
    def _session(self) -> Iterator[_Db]:
        if self.postgres:
            with self._pool.connection() as conn:
                yield _Db(conn, True)
        else:
            with self._lock:
                yield _Db(self._conn, False)

    @contextmanager
    def _transaction(self) -> Iterator[_Db]:
        with self._session() as db:
            if self.postgres:
                with db.conn.transaction():
                    yield db
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _all(self, statement: str, parameters: Sequence = ()) -> list[tuple]:
        """Rows of one statement (times as text): for reports and tests."""
        with self._session() as db:
            return [tuple(_text_time(v) for v in row) for row in db.all(statement, parameters)]

    def _execute(self, statement: str, parameters: Sequence = ()) -> None:
        with self._session() as db:
            db.execute(statement, parameters)

    # -- terminals --

    def enroll(self, terminal_id: str, public_key_hex: str, at_utc: str) -> bool:
        """Enroll a terminal's key; False if it is enrolled already (with this or another key)."""
        with self._transaction() as db:
            if db.all("SELECT 1 FROM terminals WHERE terminal_id = ?", (terminal_id,)):
                return False
            db.execute("INSERT INTO terminals (terminal_id, public_key, enrolled_utc) "
                       "VALUES (?, ?, ?)", (terminal_id, public_key_hex, db.time(at_utc)))
        return True

    def terminal(self, terminal_id: str) -> tuple[int, bytes] | None:
        """(its id in the store, its public key) of an enrolled terminal, else None."""
        rows = self._all("SELECT id, public_key FROM terminals WHERE terminal_id = ?",
                         (terminal_id,))
        return (rows[0][0], bytes.fromhex(rows[0][1])) if rows else None

    def public_key(self, terminal_id: str) -> bytes | None:
        found = self.terminal(terminal_id)
        return found[1] if found else None

    # -- batches --

    def ingest(self, terminal: int, incarnation: str, number: int, batch_hash: str,
               prev_hash: str, rows: list[Row], received_utc: str) -> Stored:
        """Store a verified batch of ``terminal`` (its store id) and its records (``rows`` with
        ``source`` 0, filled in here) in one transaction, exactly once; raises
        :class:`Conflict`. Run again after a deadlock or serialization failure."""
        for attempt in range(5):
            try:
                with self._transaction() as db:
                    return _Ingest(db, terminal, incarnation, rows, received_utc).run(
                        number, batch_hash, prev_hash)
            except Exception as error:  # noqa: BLE001 - only the retryable ones go round
                if getattr(error, "sqlstate", None) not in _RETRY_SQLSTATES or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    # -- report --

    def totals(self, first_day: str | None = None, last_day: str | None = None
               ) -> list[tuple[str, str, int, int]]:
        """(state, type, count, amount_cents) from the kept day totals, every day or the days
        from ``first_day`` to ``last_day`` (``YYYY-MM-DD``, UTC days of the records' times)."""
        where, parameters = [], []
        with self._session() as db:
            if first_day is not None:
                where.append("day >= ?")
                parameters.append(db.day(first_day))
            if last_day is not None:
                where.append("day <= ?")
                parameters.append(db.day(last_day))
            clause = f"WHERE {' AND '.join(where)} " if where else ""
            # CAST: PostgreSQL's sum() of BIGINT is NUMERIC (a Decimal to the driver)
            return db.all("SELECT state, type, CAST(sum(count) AS BIGINT), "
                          "CAST(sum(amount_cents) AS BIGINT) FROM day_totals "
                          f"{clause}GROUP BY state, type HAVING sum(count) != 0 "
                          "ORDER BY state, type", parameters)

    def sources(self) -> list[tuple[str, str, int, int, list[list[int]]]]:
        """(terminal, incarnation, records, last sequence, gaps) per incarnation."""
        gaps: dict[int, list[list[int]]] = defaultdict(list)
        for source, first, last in self._all("SELECT source, first_seq, last_seq FROM gaps "
                                             "ORDER BY source, first_seq"):
            gaps[source].append([first, last])
        return [(terminal_id, incarnation, records, last_seq, gaps.get(source, []))
                for source, terminal_id, incarnation, records, last_seq in self._all(
                    "SELECT s.id, t.terminal_id, s.incarnation, s.records, s.last_seq "
                    "FROM sources s JOIN terminals t ON t.id = s.terminal "
                    "WHERE s.records > 0 ORDER BY t.terminal_id, s.incarnation")]

    def duplicates_ignored(self) -> int:
        return self._all("SELECT CAST(coalesce(sum(duplicates), 0) AS BIGINT) FROM sources"
                         )[0][0]

    def open_unresolved(self) -> list[tuple]:
        """Records left for reconciliation: settled as unresolved (the card no longer showed
        whether the write landed) and never as committed, or sent in doubt and settled neither
        by their terminal nor from the card's history."""
        return self._all(
            "SELECT t.terminal_id, s.incarnation, u.seq, u.state, u.card_number, u.amount_cents "
            "FROM records u JOIN sources s ON s.id = u.source "
            "JOIN terminals t ON t.id = s.terminal "
            "WHERE u.state IN ('unresolved', 'in_doubt') AND NOT EXISTS ("
            "SELECT 1 FROM records c WHERE c.source = u.source AND c.seq = u.seq "
            "AND c.at_utc = u.at_utc AND ((u.state = 'unresolved' AND c.state = 'committed') "
            "OR (u.state = 'in_doubt' AND c.state != 'in_doubt'))) "
            "ORDER BY t.terminal_id, s.incarnation, u.seq")

    def counter_forks(self) -> list[tuple[int, int, int]]:
        """(card, counter spent, how many writes spent it) where more than one write changed
        the card from the same counter (a restored card image used again): writes committed,
        and writes sent in doubt whose result may have been shown (not ``not_shown``), since an
        approval may have been shown for them. Kept as found."""
        return self._all("SELECT card_number, counter, writes FROM forks "
                         "ORDER BY card_number, counter")

    # -- action lists --

    def set_action(self, card_number: int, reason: str, at_utc: str, added_utc: str,
                   then: Callable[[_Db, int], None] | None = None) -> int:
        """Put a card on the action list (replacing its entry); the list's new serial.
        ``then(db, serial)`` runs inside the same transaction (an audit row: the change and
        its record commit together or not at all)."""
        with self._transaction() as db:
            db.execute("DELETE FROM actions WHERE card_number = ?", (card_number,))
            db.execute("INSERT INTO actions (card_number, reason, at_utc, added_utc) "
                       "VALUES (?, ?, ?, ?)",
                       (card_number, reason, db.time(at_utc), db.time(added_utc)))
            serial = _bump_serial(db)
            if then is not None:
                then(db, serial)
            return serial

    def remove_action(self, card_number: int,
                      then: Callable[[_Db, int], None] | None = None) -> int | None:
        """Take a card off the action list; the list's new serial, None if it was not on it
        (nothing changed). ``then`` as for :meth:`set_action`."""
        with self._transaction() as db:
            if not db.all("SELECT 1 FROM actions WHERE card_number = ?", (card_number,)):
                return None
            db.execute("DELETE FROM actions WHERE card_number = ?", (card_number,))
            serial = _bump_serial(db)
            if then is not None:
                then(db, serial)
            return serial

    def actions(self) -> tuple[int, list[tuple[int, str, str]]]:
        """The list's serial and its ``(card, reason, at)`` entries."""
        with self._session() as db:
            return _serial(db), [(card, reason, _text_time(at)) for card, reason, at in db.all(
                "SELECT card_number, reason, at_utc FROM actions ORDER BY card_number")]

    def action_details(self) -> tuple[int, list[tuple[int, str, str, int | None, int | None]]]:
        """The list's serial and its ``(card, reason, at, outstanding cents, suspension)``
        entries: the last two set on an AAVS suspension made from a dishonoured debit
        (``clearing/office.py``), None otherwise."""
        with self._session() as db:
            return _serial(db), [
                (card, reason, _text_time(at), owed, number)
                for card, reason, at, owed, number in db.all(
                    "SELECT card_number, reason, at_utc, outstanding_cents, suspension "
                    "FROM actions ORDER BY card_number")]

    def meta(self, name: str) -> str | None:
        rows = self._all("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def set_meta_if_absent(self, name: str, value: str) -> str:
        with self._transaction() as db:
            rows = db.all("SELECT value FROM meta WHERE name = ?", (name,))
            if rows:
                return rows[0][0]
            db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (name, value))
            return value


def _serial(db: _Db) -> int:
    rows = db.all("SELECT value FROM meta WHERE name = 'action_list_serial'")
    return int(rows[0][0]) if rows else 0


def lock_cards(db: _Db, cards) -> None:
    """On PostgreSQL, the per-card locks of this transaction, taken in card order: a batch
    settling a card's records, a back-office change of the card (clearing/office.py) and two
    operators changing one card take turns. SQLite writers take turns anyway."""
    if db.postgres and cards:
        db.execute("SELECT count(pg_advisory_xact_lock(1, c)) FROM "
                   "(SELECT c FROM unnest(?::int[]) AS c ORDER BY c) AS ordered",
                   ([card % 2_147_483_647 for card in sorted(set(cards))],))


def _bump_serial(db: _Db) -> int:
    """The action list's next serial, in one statement: on PostgreSQL the upsert locks the row
    and reads its latest committed value, so two transactions moving it at once (receivers,
    a dishonour import, the console) take turns instead of one failing on the key."""
    db.execute("INSERT INTO meta (name, value) VALUES ('action_list_serial', '1') "
               "ON CONFLICT (name) DO UPDATE SET value = "
               "CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)")
    serial = _serial(db)
    return serial


_SELECT_ROWS = f"SELECT {', '.join('r.' + c for c in RECORD_COLUMNS)} FROM records r"
_SELECT_ROWS_FROM_P = f"SELECT {', '.join('r.' + c for c in RECORD_COLUMNS)} FROM p"


class _Ingest:
    """One batch into the store, inside its transaction."""

    def __init__(self, db: _Db, terminal: int, incarnation: str, rows: list[Row],
                 received_utc: str) -> None:
        self.db = db
        self.terminal = terminal
        self.incarnation = incarnation
        self.rows = rows
        self.received_utc = received_utc
        self.expired: set[int] = set()  # sent again from before the days the store keeps

    def run(self, number: int, batch_hash: str, prev_hash: str) -> Stored:
        db = self.db
        source, last_batch, last_hash, last_seq = self._lock_source()
        if number <= last_batch:
            known = db.all("SELECT hash FROM batches WHERE source = ? AND number = ?",
                           (source, number))
            if known and known[0][0] == batch_hash:
                return Stored(True, 0)
            raise Conflict("taken", f"batch {number} was received before with another hash")
        if number > last_batch + 1:
            raise Conflict("order", f"batch {number} is out of order: batch {number - 1} has "
                           "not been received")
        expected = GENESIS_HASH if number == 1 else last_hash
        if prev_hash != expected:
            raise Conflict("link", f"batch {number} does not link to batch {number - 1}")
        for row in self.rows:
            row.source = source
        # per card, in one order: two receivers see each other's writes
        lock_cards(db, {r.card_number for r in self.rows if r.type not in _NO_CARD_TYPES})
        stored_before, gap_fills = self._stored_before(source, last_seq)
        hood = _Neighbourhood()
        card_rows = [r for r in self.rows if r.type not in _NO_CARD_TYPES]
        self._load(hood, {(r.card_number, r.counter_before + d) for r in card_rows
                          for d in (-1, 0, 1) if r.counter_before + d >= 0})
        other_new: list[Row] = []  # records of no card change (a terminal's clock)
        other_gone: list[Row] = []
        duplicates, seen = 0, set()
        for row in self.rows:
            if (row.seq, row.state) in seen:
                duplicates += 1
                continue
            seen.add((row.seq, row.state))
            if row.seq in self.expired:
                duplicates += 1
                continue
            known = stored_before.get(row.seq, {})
            if row.state != "in_doubt":  # the terminal's word replaces the derived one
                for state, stored in known.items():
                    if stored.reconciled == DERIVED:
                        if row.type in _NO_CARD_TYPES:
                            other_gone.append(stored)
                        else:
                            hood.drop(stored)
            states = {s for s, r in known.items() if r.reconciled != DERIVED}
            if row.state in states or (row.state == "committed" and SAME_CHANGE in states):
                duplicates += 1
                continue
            if row.type in _NO_CARD_TYPES:
                other_new.append(row)
                continue
            if row.state == "committed" and hood.same_change(row):
                row = row.with_state(SAME_CHANGE, AS_SENT)
            hood.put(row)
        cards = {r.card_number for r in card_rows}
        while True:
            wanted = hood.settle(cards)
            if not wanted:
                break
            self._load(hood, wanted)
        gone, new = hood.changes()
        gone += other_gone
        new += other_new
        self._write(gone, new)
        forks = hood.forks()
        forked = self._record_forks(forks, cards)
        # after the forks' entries: `actions` rows, then the serial (meta), as the console's
        # set_action takes them: two transactions never wait for each other the other way round
        self._aavs_collected(gone, new)
        self._summarise(source, number, batch_hash, prev_hash, last_seq, gap_fills, duplicates)
        return Stored(False, duplicates, forked)

    def _aavs_collected(self, gone: list[Row], new: list[Row]) -> None:
        """Keep what service terminals collected of cards' AAVS amounts outstanding (settled
        ``aavs_outstanding_paid`` records, docs/clearing.md "Dishonoured debits"): a card that
        owes nothing more is taken off the list (its numbered suspension: the card keeps the
        number, so the entry only made the list longer), in this transaction."""
        delta: dict[int, int] = {}
        for rows, sign in ((new, 1), (gone, -1)):
            for row in rows:
                if row.type == PAID_TYPE and row.state == "committed":
                    delta[row.card_number] = delta.get(row.card_number, 0) + sign * row.amount_cents
        db, released = self.db, False
        for card, cents in sorted(delta.items()):
            if not cents:
                continue
            db.execute("INSERT INTO aavs_outstanding (card_number, outstanding_cents, dishonours, "
                       "last_utc, paid_cents) VALUES (?, 0, 0, ?, ?) ON CONFLICT (card_number) "
                       "DO UPDATE SET paid_cents = aavs_outstanding.paid_cents + "
                       "excluded.paid_cents", (card, db.time(self.received_utc), cents))
            owed = db.all("SELECT outstanding_cents - paid_cents FROM aavs_outstanding "
                          "WHERE card_number = ?", (card,))[0][0]
            if cents > 0 and owed <= 0 and db.execute(
                    "DELETE FROM actions WHERE card_number = ? AND reason = 'aavs_suspended' "
                    "AND suspension IS NOT NULL", (card,)).rowcount:
                released = True
        if released:
            _bump_serial(db)

    def _lock_source(self) -> tuple[int, int, str, int]:
        db = self.db
        lock = " FOR UPDATE" if db.postgres else ""
        select = ("SELECT id, last_batch, last_hash, last_seq FROM sources "
                  f"WHERE terminal = ? AND incarnation = ?{lock}")
        rows = db.all(select, (self.terminal, self.incarnation))
        if not rows:
            db.execute("INSERT INTO sources (terminal, incarnation, last_hash) VALUES (?, ?, ?) "
                       "ON CONFLICT (terminal, incarnation) DO NOTHING",
                       (self.terminal, self.incarnation, GENESIS_HASH))
            rows = db.all(select, (self.terminal, self.incarnation))
        return rows[0]

    def _stored_before(self, source: int, last_seq: int
                       ) -> tuple[dict[int, dict[str, Row]], set[int]]:
        """The rows already stored under the batch's sequence numbers (only those at or below
        the source's last can be), and which of those numbers were missing (gap fills). A
        number stored before whose record had another hash is a conflict."""
        db = self.db
        old = {r.seq: r for r in self.rows if r.seq <= last_seq}
        found: dict[int, dict[str, Row]] = defaultdict(dict)
        if not old:
            return found, set()
        missing = set()
        for first, last in db.all("SELECT first_seq, last_seq FROM gaps WHERE source = ? "
                                  "AND first_seq <= ? AND last_seq >= ?",
                                  (source, max(old), min(old))):
            missing.update(seq for seq in old if first <= seq <= last)
        pairs = [(seq, r.at_utc) for seq, r in sorted(old.items())]
        for row in self._select("CROSS JOIN records r ON r.source = p.source AND r.seq = p.seq "
                                "AND r.at_utc = p.at", "source, seq, at",
                                [(source, s, at) for s, at in pairs],
                                "JOIN unnest(?::bigint[], ?::timestamptz[]) AS p(seq, at) "
                                "ON r.source = ? AND r.seq = p.seq AND r.at_utc = p.at",
                                lambda: ([s for s, _ in pairs],
                                         [parse_utc(at) for _, at in pairs], source)):
            found[row.seq][row.state] = row
        retained_from = None
        for seq, sent in old.items():
            if seq in missing:
                continue
            stored = found.get(seq)
            if not stored:
                if retained_from is None:
                    rows = db.all("SELECT value FROM meta WHERE name = 'retained_from'")
                    retained_from = rows[0][0] if rows else ""
                if sent.day < retained_from:  # stored once, dropped with its day: sent again
                    self.expired.add(seq)
                    continue
            if not stored or any(r.hash != sent.hash for r in stored.values()):
                raise Conflict("record", f"record {seq} was received before with another hash")
        return found, missing

    def _select(self, sqlite_join: str, key_columns: str, keys: list[tuple],
                pg_join: str, pg_parameters) -> list[Row]:
        """Rows by many keys, joined from a list of keys ``p(key_columns)`` each side probes an
        index with: on SQLite a ``VALUES`` list of a few hundred keys a statement (CROSS JOIN:
        the keys first), on PostgreSQL unnest()ed arrays (one round trip)."""
        db = self.db
        if db.postgres:
            rows = db.all(f"{_SELECT_ROWS} {pg_join}", pg_parameters())
        else:
            rows, width = [], len(keys[0]) if keys else 0
            one = f"({', '.join('?' * width)})"
            for start in range(0, len(keys), 300):
                chunk = keys[start:start + 300]
                rows += db.all(f"WITH p({key_columns}) AS (VALUES "
                               f"{', '.join([one] * len(chunk))}) {_SELECT_ROWS_FROM_P} "
                               f"{sqlite_join}", [value for key in chunk for value in key])
        return [Row(*[_text_time(v) if c == "at_utc" else v
                      for c, v in zip(RECORD_COLUMNS, row)]) for row in rows]

    def _load(self, hood: _Neighbourhood, pairs: set[tuple[int, int]]) -> None:
        """Every record at these (card, counter before) pairs into the neighbourhood."""
        pairs = sorted(p for p in pairs if not hood.loaded(*p))
        if not pairs:
            return
        rows = self._select(
            "CROSS JOIN card_writes w ON w.card_number = p.card AND w.counter_before = p.counter "
            "CROSS JOIN records r ON r.source = w.source AND r.seq = w.seq "
            "AND r.at_utc = w.at_utc", "card, counter", pairs,
            "JOIN card_writes w ON r.source = w.source AND r.seq = w.seq AND r.at_utc = w.at_utc "
            "JOIN unnest(?::bigint[], ?::bigint[]) AS p(card, counter) "
            "ON w.card_number = p.card AND w.counter_before = p.counter",
            lambda: ([c for c, _ in pairs], [n for _, n in pairs]))
        hood.add_loaded(pairs, rows)

    def _write(self, gone: list[Row], new: list[Row]) -> None:
        db = self.db
        if gone:
            keys = [(r.source, r.seq, r.state, db.time(r.at_utc)) for r in gone]
            if db.postgres:
                db.execute("DELETE FROM records r USING unnest(?::bigint[], ?::bigint[], "
                           "?::text[], ?::timestamptz[]) AS k(source, seq, state, at) "
                           "WHERE r.source = k.source AND r.seq = k.seq AND r.state = k.state "
                           "AND r.at_utc = k.at", [list(c) for c in zip(*keys)])
            else:
                db.many("DELETE FROM records WHERE source = ? AND seq = ? AND state = ? "
                        "AND at_utc = ?", keys)
        if new:
            values = [[db.time(v) if c == "at_utc" else v
                       for c, v in zip(RECORD_COLUMNS, r.values())] for r in new]
            if db.postgres:
                casts = ", ".join(f"?::{t}[]" for t in _PG_TYPES)
                db.execute(f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) "
                           f"SELECT * FROM unnest({casts}) ON CONFLICT DO NOTHING",
                           [list(c) for c in zip(*values)])
            else:
                db.many(f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) VALUES "
                        f"({', '.join('?' * len(RECORD_COLUMNS))}) ON CONFLICT DO NOTHING",
                        values)
        # the card's history by counter: one row per record that changed a card
        written = {(r.card_number, r.counter_before, r.source, r.seq): r.at_utc
                   for r in new if r.type not in _NO_CARD_TYPES and r.reconciled != DERIVED}
        if written:
            index = [(c, n, s, q, db.time(at)) for (c, n, s, q), at in sorted(written.items())]
            if db.postgres:
                db.execute("INSERT INTO card_writes (card_number, counter_before, source, seq, "
                           "at_utc) SELECT * FROM unnest(?::bigint[], ?::bigint[], ?::bigint[], "
                           "?::bigint[], ?::timestamptz[]) ON CONFLICT DO NOTHING",
                           [list(c) for c in zip(*index)])
            else:
                db.many("INSERT INTO card_writes (card_number, counter_before, source, seq, "
                        "at_utc) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", index)
        totals: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for sign, rows in ((-1, gone), (1, new)):
            for r in rows:
                figure = totals[(r.day, r.source, r.state, r.type)]
                figure[0] += sign
                figure[1] += sign * r.amount_cents
        deltas = [(db.day(d), s, st, t, n, a) for (d, s, st, t), (n, a) in sorted(totals.items())
                  if n or a]
        upsert = ("ON CONFLICT (day, source, state, type) DO UPDATE SET "
                  "count = day_totals.count + excluded.count, "
                  "amount_cents = day_totals.amount_cents + excluded.amount_cents")
        if deltas and db.postgres:
            db.execute("INSERT INTO day_totals (day, source, state, type, count, amount_cents) "
                       "SELECT * FROM unnest(?::date[], ?::bigint[], ?::text[], ?::text[], "
                       f"?::bigint[], ?::bigint[]) {upsert}", [list(c) for c in zip(*deltas)])
        else:
            db.many("INSERT INTO day_totals (day, source, state, type, count, amount_cents) "
                    f"VALUES (?, ?, ?, ?, ?, ?) {upsert}", deltas)

    def _record_forks(self, forks: list[tuple[int, int, int]], cards: set[int]
                      ) -> tuple[int, ...]:
        """Keep the forks found; list (action list, ``cancelled``) the batch's cards that have
        one, if not listed yet; the cards listed."""
        db = self.db
        found = self.db.time(self.received_utc)
        greatest = "greatest" if db.postgres else "max"
        db.many("INSERT INTO forks (card_number, counter, writes, found_utc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (card_number, counter) DO UPDATE SET "
                f"writes = {greatest}(forks.writes, excluded.writes)",
                [(card, counter, writes, found) for card, counter, writes in forks])
        if not cards:
            return ()
        if db.postgres:
            forked = [c for (c,) in db.all("SELECT DISTINCT card_number FROM forks WHERE "
                                           "card_number = ANY(?::bigint[])", (sorted(cards),))]
        else:
            forked = [c for card in sorted(cards) for (c,) in db.all(
                "SELECT DISTINCT card_number FROM forks WHERE card_number = ?", (card,))]
        if not forked:
            return ()
        listed = {c for card in forked for (c,) in db.all(
            "SELECT card_number FROM actions WHERE card_number = ?", (card,))}
        added = [(card, FORK_REASON, found, found) for card in sorted(forked)
                 if card not in listed]
        db.many("INSERT INTO actions (card_number, reason, at_utc, added_utc) "
                "VALUES (?, ?, ?, ?)", added)
        if added:
            _bump_serial(db)
        return tuple(sorted(forked))

    def _summarise(self, source: int, number: int, batch_hash: str, prev_hash: str,
                   last_seq: int, gap_fills: set[int], duplicates: int) -> None:
        """The source's summary and gaps, and the batch's row."""
        db = self.db
        seqs = sorted({r.seq for r in self.rows})
        above = [s for s in seqs if s > last_seq]
        fresh = len(above) + len(gap_fills & set(seqs))
        new_gaps, expected = [], last_seq + 1
        for seq in above:
            if seq > expected:
                new_gaps.append((source, expected, seq - 1))
            expected = seq + 1
        if gap_fills:  # numbers that filled gaps: split those gaps
            for first, last in db.all("SELECT first_seq, last_seq FROM gaps WHERE source = ? "
                                      "AND first_seq <= ? AND last_seq >= ?",
                                      (source, max(gap_fills), min(gap_fills))):
                inside = sorted(s for s in gap_fills if first <= s <= last)
                if not inside:
                    continue
                db.execute("DELETE FROM gaps WHERE source = ? AND first_seq = ?",
                           (source, first))
                start = first
                for seq in inside:
                    if seq > start:
                        new_gaps.append((source, start, seq - 1))
                    start = seq + 1
                if start <= last:
                    new_gaps.append((source, start, last))
        db.many("INSERT INTO gaps (source, first_seq, last_seq) VALUES (?, ?, ?)", new_gaps)
        db.execute("UPDATE sources SET last_batch = ?, last_hash = ?, records = records + ?, "
                   "last_seq = ?, duplicates = duplicates + ? WHERE id = ?",
                   (number, batch_hash, fresh, max([last_seq, *seqs]), duplicates, source))
        db.execute("INSERT INTO batches (source, number, hash, prev_hash, items, duplicates, "
                   "received_utc) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (source, number, batch_hash, prev_hash, len(self.rows), duplicates,
                    db.time(self.received_utc)))


#: What a card whose counter was spent twice (a restored card image used again, or a write sent
#: in doubt whose result may have been shown, then another change from the same counter) is
#: listed as.
FORK_REASON = "cancelled"
