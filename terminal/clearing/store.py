"""The clearing receiver's storage: the one module that speaks SQL. Its statements are plain
SQL that runs unchanged on SQLite (the default: ``--db`` is a file path) and PostgreSQL
(``--db postgresql://...``, psycopg 3); only the parameter marker differs (``?`` here, turned
into ``%s`` for psycopg).

Tables: ``terminals`` (enrolled keys), ``batches`` (one row per accepted batch, keyed by terminal,
incarnation and number), ``records`` (one row per record and state, keyed by terminal,
incarnation, sequence and state: a record sent twice is stored once).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
                  "balance_before_cents", "balance_after_cents", "at_utc", "hash")


class StoreError(Exception):
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
            key = (record["terminal_id"], record["incarnation"], record["seq"], record["state"])
            if self._all("SELECT 1 FROM records WHERE terminal_id = ? AND incarnation = ? "
                         "AND seq = ? AND state = ?", key):
                duplicates += 1
                continue
            self._execute(f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) VALUES "
                          f"({', '.join('?' * len(RECORD_COLUMNS))})",
                          [record[column] for column in RECORD_COLUMNS])
        self._execute("INSERT INTO batches (terminal_id, incarnation, number, hash, prev_hash, "
                      "items, duplicates, received_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (batch.terminal_id, batch.incarnation, batch.number, batch.hash,
                       batch.prev_hash, len(records), duplicates, received_utc))
        return duplicates

    # -- report --

    def totals_by_type(self) -> list[tuple[str, str, int, int]]:
        """(state, type, count, amount_cents), every state and type."""
        return self._all("SELECT state, type, count(*), sum(amount_cents) FROM records "
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
        return self._all("SELECT coalesce(sum(duplicates), 0) FROM batches")[0][0]

    def open_unresolved(self) -> list[tuple]:
        """Records settled as unresolved (the card no longer showed whether the write landed)
        and never as committed: left for reconciliation."""
        return self._all(
            "SELECT u.terminal_id, u.incarnation, u.seq, u.state, u.card_number, u.amount_cents "
            "FROM records u WHERE u.state = 'unresolved' AND NOT EXISTS ("
            "SELECT 1 FROM records c WHERE c.terminal_id = u.terminal_id AND "
            "c.incarnation = u.incarnation AND c.seq = u.seq AND c.state = 'committed') "
            "ORDER BY u.terminal_id, u.incarnation, u.seq")

    def counter_forks(self) -> list[tuple[int, int, int]]:
        """(card, counter spent, how many writes spent it) where more than one write committed
        a change from the same card counter (a restored card image used again). The records
        of one write share terminal, incarnation and time."""
        return self._all(
            "SELECT card_number, counter_before, "
            "count(DISTINCT terminal_id || ':' || incarnation || ':' || at_utc) FROM records "
            "WHERE state = 'committed' GROUP BY card_number, counter_before "
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
