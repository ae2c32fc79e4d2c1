"""The clearing receiver's storage: the one module that speaks SQL. Its statements are plain
SQL that runs unchanged on SQLite (the default: ``--db`` is a file path) and PostgreSQL
(``--db postgresql://...``, psycopg 3); only the parameter marker differs (``?`` here, turned
into ``%s`` for psycopg).

Tables: ``terminals`` (enrolled keys), ``batches`` (one row per accepted batch, keyed by terminal,
incarnation and number), ``records`` (one row per record and state, keyed by terminal,
incarnation, sequence and state: a record sent twice is stored once).

A record's ``reconciled`` says where its state came from: 0 as the terminal sent it; 1 a record
sent ``unresolved`` that the card's history proved committed (the row's state changed); 2 a row
the receiver derived for a record sent ``in_doubt`` (committed or void, from the card's next
change at any terminal), recomputed whenever a batch touches the card and dropped once the
terminal sends its own resolution.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from farebox.clearing.errors import ClearingError

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS terminals (
        terminal_id TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        enrolled_utc TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS batches (
        terminal_id TEXT NOT NULL,
        incarnation TEXT NOT NULL,
        number BIGINT NOT NULL,
        hash TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        items BIGINT NOT NULL,
        duplicates BIGINT NOT NULL,
        received_utc TEXT NOT NULL,
        PRIMARY KEY (terminal_id, incarnation, number))""",
    """CREATE TABLE IF NOT EXISTS records (
        terminal_id TEXT NOT NULL,
        incarnation TEXT NOT NULL,
        seq BIGINT NOT NULL,
        state TEXT NOT NULL,
        batch_number BIGINT NOT NULL,
        card_number BIGINT NOT NULL,
        counter_before BIGINT NOT NULL,
        counter_after BIGINT NOT NULL,
        type TEXT NOT NULL,
        amount_cents BIGINT NOT NULL,
        balance_before_cents BIGINT NOT NULL,
        balance_after_cents BIGINT NOT NULL,
        at_utc TEXT NOT NULL,
        hash TEXT NOT NULL,
        observed BIGINT NOT NULL,
        reconciled BIGINT NOT NULL DEFAULT 0,
        not_shown BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (terminal_id, incarnation, seq, state))""",
    "CREATE INDEX IF NOT EXISTS records_card ON records (card_number, counter_before)",
    """CREATE TABLE IF NOT EXISTS actions (
        card_number BIGINT PRIMARY KEY,
        reason TEXT NOT NULL,
        at_utc TEXT NOT NULL,
        added_utc TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
)

RECORD_COLUMNS = ("terminal_id", "incarnation", "seq", "state", "batch_number", "card_number",
                  "counter_before", "counter_after", "type", "amount_cents",
                  "balance_before_cents", "balance_after_cents", "at_utc", "hash", "observed",
                  "not_shown")
#: columns added to ``records`` after its first version: (name, definition), added at open
_ADDED_COLUMNS = (("not_shown", "BIGINT NOT NULL DEFAULT 0"),)

_AS_STATE = {"state": "CAST(? AS TEXT)"}  # a derived row: its record's columns, another state
#: where a record's state came from (the ``reconciled`` column)
AS_SENT, PROVED_COMMITTED, DERIVED = 0, 1, 2


#: The state a committed record is stored in when the same card change is already settled from
#: another terminal's write (see ``Store._same_change_stored``): kept, never counted.
SAME_CHANGE = "same_change"


@dataclass
class _Write:
    """One card write as the store holds it (for :meth:`Store.reconcile`)."""

    key: tuple  # terminal, incarnation, time, counter before, counter after
    counter_before: int
    counter_after: int
    balance_before: int  # its first record's: what the card held before
    balance_after: int = 0  # its last record's: what the card held after
    states: set = field(default_factory=set)
    seqs: list = field(default_factory=list)

    def proved_by(self, others: list[_Write]) -> bool:
        """Whether the card's next change (one of ``others``, all committed) starts from the
        counter and balance this write left, and no other committed write reached that
        counter."""
        if any(w.counter_after == self.counter_after for w in others):
            return False
        return any(w.counter_before == self.counter_after and w.balance_before == self.balance_after
                   for w in others)


class StoreError(ClearingError):
    """The database cannot be opened or used."""


@dataclass(frozen=True)
class StoredBatch:
    terminal_id: str
    incarnation: str
    number: int
    hash: str
    prev_hash: str


class Store:
    """One connection to the clearing database; use from one thread at a time."""

    def __init__(self, db: str) -> None:
        self.db = db
        self._postgres = db.startswith(("postgresql://", "postgres://"))
        try:
            if self._postgres:
                import psycopg  # optional: pip install 'psycopg[binary]'

                self._conn: Any = psycopg.connect(db, autocommit=True)
            else:
                self._conn = sqlite3.connect(db, isolation_level=None, timeout=30,
                                             check_same_thread=False)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
        except ImportError:
            raise StoreError("a PostgreSQL --db needs psycopg: pip install 'psycopg[binary]'"
                             ) from None
        except Exception as error:  # sqlite3.Error, psycopg.Error: a bad path or URL
            raise StoreError(f"cannot open {db}: {error}") from None
        with self.transaction():
            for statement in SCHEMA:
                self._execute(statement)
            present = self._columns("records")
            for name, definition in _ADDED_COLUMNS:
                if name not in present:
                    self._execute(f"ALTER TABLE records ADD COLUMN {name} {definition}")

    def _columns(self, table: str) -> set[str]:
        if self._postgres:
            return {row[0] for row in self._all(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "AND table_schema = current_schema()", (table,))}
        return {row[1] for row in self._all(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self._postgres else statement

    def _execute(self, statement: str, parameters: Sequence = ()) -> Any:
        return self._conn.execute(self._sql(statement), tuple(parameters))

    def _all(self, statement: str, parameters: Sequence = ()) -> list[tuple]:
        return [tuple(row) for row in self._execute(statement, parameters).fetchall()]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._execute("BEGIN" if self._postgres else "BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._execute("ROLLBACK")
            raise
        self._execute("COMMIT")

    # -- terminals --

    def enroll(self, terminal_id: str, public_key_hex: str, at_utc: str) -> bool:
        """Enroll a terminal's key; False if it is enrolled already (with this or another key)."""
        with self.transaction():
            if self._all("SELECT 1 FROM terminals WHERE terminal_id = ?", (terminal_id,)):
                return False
            self._execute("INSERT INTO terminals (terminal_id, public_key, enrolled_utc) "
                          "VALUES (?, ?, ?)", (terminal_id, public_key_hex, at_utc))
        return True

    def public_key(self, terminal_id: str) -> bytes | None:
        rows = self._all("SELECT public_key FROM terminals WHERE terminal_id = ?", (terminal_id,))
        return bytes.fromhex(rows[0][0]) if rows else None

    # -- batches --

    def batch(self, terminal_id: str, incarnation: str, number: int) -> StoredBatch | None:
        rows = self._all("SELECT terminal_id, incarnation, number, hash, prev_hash FROM batches "
                         "WHERE terminal_id = ? AND incarnation = ? AND number = ?",
                         (terminal_id, incarnation, number))
        return StoredBatch(*rows[0]) if rows else None

    def store_batch(self, batch: StoredBatch, records: list[dict], received_utc: str) -> int:
        """Store an accepted batch and its records (a record already stored is skipped: the
        count of those is returned). Call inside :meth:`transaction`."""
        duplicates = 0
        for record in records:
            key = (record["terminal_id"], record["incarnation"], record["seq"])
            if record["state"] != "in_doubt":  # the terminal's word replaces the derived one
                self._execute("DELETE FROM records WHERE terminal_id = ? AND incarnation = ? "
                              "AND seq = ? AND reconciled = ?", (*key, DERIVED))
            states = ([record["state"], SAME_CHANGE] if record["state"] == "committed"
                      else [record["state"]])
            if any(self._all("SELECT 1 FROM records WHERE terminal_id = ? AND incarnation = ? "
                             "AND seq = ? AND state = ?", (*key, state)) for state in states):
                duplicates += 1
                continue
            if record["state"] == "committed" and self._same_change_stored(record):
                record = {**record, "state": SAME_CHANGE}
            self._execute(f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) VALUES "
                          f"({', '.join('?' * len(RECORD_COLUMNS))})",
                          [record[column] for column in RECORD_COLUMNS])
        self._execute("INSERT INTO batches (terminal_id, incarnation, number, hash, prev_hash, "
                      "items, duplicates, received_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (batch.terminal_id, batch.incarnation, batch.number, batch.hash,
                       batch.prev_hash, len(records), duplicates, received_utc))
        return duplicates

    def _same_change_stored(self, record: dict) -> bool:
        """Another write's committed record of the very same card change (same card, counters,
        type, amount and balance after), where either was committed by observation: a write in
        doubt at one terminal resolved by the bytes another terminal wrote. It is one change. A
        row derived from the card's history (``reconciled`` 2) is no terminal's commit: it is
        recomputed after this record is stored."""
        rows = self._all(
            "SELECT observed FROM records WHERE card_number = ? AND counter_before = ? "
            "AND counter_after = ? AND type = ? AND amount_cents = ? AND balance_after_cents = ? "
            "AND state = 'committed' AND reconciled != ? AND NOT (terminal_id = ? "
            "AND incarnation = ? AND at_utc = ?)",
            (record["card_number"], record["counter_before"], record["counter_after"],
             record["type"], record["amount_cents"], record["balance_after_cents"], DERIVED,
             record["terminal_id"], record["incarnation"], record["at_utc"]))
        return any(observed or record["observed"] for (observed,) in rows)

    def reconcile(self, card_numbers: Sequence[int]) -> int:
        """Settle, from each card's own history, the records their terminal could not (inside a
        transaction; run after :meth:`store_batch`), to a fixpoint (one settled write can settle
        the one before it). A write's *next change* is another write, committed anywhere, that
        starts from the counter it left:

        * a write sent ``unresolved`` (the card had moved on before its terminal saw it again)
          landed if its next change also starts from the balance it left and no other committed
          write reached that counter: its records become committed (``reconciled`` 1).
        * a write sent ``in_doubt`` and not yet resolved by its terminal is committed the same
          way; it is void when another committed write starts from the counter it started
          from (the card went on without it). Those rows are derived (``reconciled`` 2, next to
          the ``in_doubt`` row): recomputed here every time, dropped once the terminal sends
          its own resolution. An ``in_doubt`` write whose result may have been shown (not
          ``not_shown``) still counts as a change from its counter: a void of it is a counter
          fork (:meth:`counter_forks`), e.g. a card image copied before the tap and restored
          after the approval.

        How many records changed (derived rows counted each time they are made)."""
        changed = 0
        for card in sorted(set(card_numbers)):
            self._execute("DELETE FROM records WHERE card_number = ? AND reconciled = ?",
                          (card, DERIVED))
            while True:
                step = self._reconcile_step(card)
                if not step:
                    break
                changed += step
        return changed

    def _reconcile_step(self, card: int) -> int:
        """One pass over a card's writes; how many records it changed."""
        writes = self._card_writes(card)
        settled = [w for w in writes if w.states & {"committed", SAME_CHANGE}]
        for write in writes:
            others = [w for w in settled if w.key != write.key]
            if "unresolved" in write.states and not write.states & {"committed", SAME_CHANGE}:
                if write.proved_by(others):
                    for seq in write.seqs:
                        self._execute("UPDATE records SET state = 'committed', reconciled = ? "
                                      "WHERE terminal_id = ? AND incarnation = ? AND seq = ? "
                                      "AND state = 'unresolved'",
                                      (PROVED_COMMITTED, write.key[0], write.key[1], seq))
                    return len(write.seqs)
            elif write.states == {"in_doubt"}:
                if write.proved_by(others):
                    state = "committed"
                elif any(w.counter_before == write.counter_before for w in others):
                    state = "void"
                else:
                    continue
                for seq in write.seqs:
                    self._execute(
                        f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}, reconciled) "
                        f"SELECT {', '.join(_AS_STATE.get(c, c) for c in RECORD_COLUMNS)}, "
                        "CAST(? AS BIGINT) FROM records WHERE terminal_id = ? AND incarnation = ? "
                        "AND seq = ? AND state = 'in_doubt'",
                        (state, DERIVED, write.key[0], write.key[1], seq))
                return len(write.seqs)
        return 0

    def _card_writes(self, card: int) -> list[_Write]:
        """The card's writes as this store holds them: the records of one write share terminal,
        incarnation, time and counters."""
        writes: dict[tuple, _Write] = {}
        for (terminal_id, incarnation, seq, state, counter_before, counter_after, balance_before,
             balance_after, at_utc) in self._all(
                "SELECT terminal_id, incarnation, seq, state, counter_before, counter_after, "
                "balance_before_cents, balance_after_cents, at_utc FROM records "
                "WHERE card_number = ? AND type != 'clock_reset' "
                "ORDER BY terminal_id, incarnation, seq", (card,)):
            key = (terminal_id, incarnation, at_utc, counter_before, counter_after)
            write = writes.get(key)
            if write is None:
                write = writes[key] = _Write(key, counter_before, counter_after, balance_before)
            write.states.add(state)
            if seq not in write.seqs:
                write.seqs.append(seq)
                write.balance_after = balance_after  # the last record's: what the card held
        return list(writes.values())

    # -- report --

    def totals_by_type(self) -> list[tuple[str, str, int, int]]:
        """(state, type, count, amount_cents), every state and type."""
        # CAST: PostgreSQL's sum() of BIGINT is NUMERIC (a Decimal to the driver)
        return self._all("SELECT state, type, count(*), CAST(sum(amount_cents) AS BIGINT) "
                         "FROM records "
                         "GROUP BY state, type ORDER BY state, type")

    def terminal_sequences(self) -> list[tuple[str, str, int, int, int]]:
        """(terminal, incarnation, distinct sequences, lowest, highest) per incarnation."""
        return self._all("SELECT terminal_id, incarnation, count(DISTINCT seq), min(seq), "
                         "max(seq) FROM records GROUP BY terminal_id, incarnation "
                         "ORDER BY terminal_id, incarnation")

    def sequences(self, terminal_id: str, incarnation: str) -> list[int]:
        return [row[0] for row in self._all(
            "SELECT DISTINCT seq FROM records WHERE terminal_id = ? AND incarnation = ? "
            "ORDER BY seq", (terminal_id, incarnation))]

    def duplicates_ignored(self) -> int:
        return self._all("SELECT CAST(coalesce(sum(duplicates), 0) AS BIGINT) FROM batches"
                         )[0][0]

    def open_unresolved(self) -> list[tuple]:
        """Records left for reconciliation: settled as unresolved (the card no longer showed
        whether the write landed) and never as committed, or sent in doubt and settled neither
        by their terminal nor from the card's history."""
        return self._all(
            "SELECT u.terminal_id, u.incarnation, u.seq, u.state, u.card_number, u.amount_cents "
            "FROM records u WHERE (u.state = 'unresolved' AND NOT EXISTS ("
            "SELECT 1 FROM records c WHERE c.terminal_id = u.terminal_id AND "
            "c.incarnation = u.incarnation AND c.seq = u.seq AND c.state = 'committed')) "
            "OR (u.state = 'in_doubt' AND NOT EXISTS ("
            "SELECT 1 FROM records c WHERE c.terminal_id = u.terminal_id AND "
            "c.incarnation = u.incarnation AND c.seq = u.seq AND c.state != 'in_doubt')) "
            "ORDER BY u.terminal_id, u.incarnation, u.seq")

    def counter_forks(self) -> list[tuple[int, int, int]]:
        """(card, counter spent, how many writes spent it) where more than one write changed
        the card from the same counter (a restored card image used again): writes committed,
        and writes sent in doubt whose result may have been shown (not ``not_shown``) whatever
        became of them, since an approval may have been shown for them. The records of one
        write share terminal, incarnation and time. A terminal's ``clock_reset`` records
        (card 0, no card involved) are no card's change."""
        return self._all(
            "SELECT card_number, counter_before, "
            "count(DISTINCT terminal_id || ':' || incarnation || ':' || at_utc) FROM records "
            "WHERE (state = 'committed' OR (state = 'in_doubt' AND not_shown = 0)) "
            "AND type != 'clock_reset' "
            "GROUP BY card_number, counter_before "
            "HAVING count(DISTINCT terminal_id || ':' || incarnation || ':' || at_utc) > 1 "
            "ORDER BY card_number, counter_before")

    # -- action lists --

    def set_action(self, card_number: int, reason: str, at_utc: str, added_utc: str) -> int:
        """Put a card on the action list (replacing its entry); the list's new serial."""
        with self.transaction():
            self._execute("DELETE FROM actions WHERE card_number = ?", (card_number,))
            self._execute("INSERT INTO actions (card_number, reason, at_utc, added_utc) "
                          "VALUES (?, ?, ?, ?)", (card_number, reason, at_utc, added_utc))
            return self._bump_serial()

    def add_actions_if_absent(self, entries: list[tuple[int, str, str]], added_utc: str) -> int:
        """Add ``(card, reason, at)`` entries for cards not on the list yet (inside a
        transaction); how many were added (the serial moves when any was)."""
        added = 0
        for card_number, reason, at_utc in entries:
            if self._all("SELECT 1 FROM actions WHERE card_number = ?", (card_number,)):
                continue
            self._execute("INSERT INTO actions (card_number, reason, at_utc, added_utc) "
                          "VALUES (?, ?, ?, ?)", (card_number, reason, at_utc, added_utc))
            added += 1
        if added:
            self._bump_serial()
        return added

    def actions(self) -> tuple[int, list[tuple[int, str, str]]]:
        """The list's serial and its ``(card, reason, at)`` entries."""
        return self._serial(), self._all(
            "SELECT card_number, reason, at_utc FROM actions ORDER BY card_number")

    def forked_cards(self, card_numbers: Sequence[int]) -> list[int]:
        return sorted({card for card, _, _ in self.counter_forks() if card in set(card_numbers)})

    def meta(self, name: str) -> str | None:
        rows = self._all("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def set_meta_if_absent(self, name: str, value: str) -> str:
        with self.transaction():
            current = self.meta(name)
            if current is None:
                self._execute("INSERT INTO meta (name, value) VALUES (?, ?)", (name, value))
                return value
            return current

    def _serial(self) -> int:
        value = self.meta("action_list_serial")
        return int(value) if value is not None else 0

    def _bump_serial(self) -> int:
        serial = self._serial() + 1
        self._execute("DELETE FROM meta WHERE name = 'action_list_serial'")
        self._execute("INSERT INTO meta (name, value) VALUES ('action_list_serial', ?)",
                      (str(serial),))
        return serial
