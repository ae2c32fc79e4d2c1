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
                  "balance_before_cents", "balance_after_cents", "at_utc", "hash", "observed")


#: The state a committed record is stored in when the same card change is already settled from
#: another terminal's write (see ``Store._same_change_stored``): kept, never counted.
SAME_CHANGE = "same_change"


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
        doubt at one terminal resolved by the bytes another terminal wrote. It is one change."""
        rows = self._all(
            "SELECT observed FROM records WHERE card_number = ? AND counter_before = ? "
            "AND counter_after = ? AND type = ? AND amount_cents = ? AND balance_after_cents = ? "
            "AND state = 'committed' AND NOT (terminal_id = ? AND incarnation = ? "
            "AND at_utc = ?)",
            (record["card_number"], record["counter_before"], record["counter_after"],
             record["type"], record["amount_cents"], record["balance_after_cents"],
             record["terminal_id"], record["incarnation"], record["at_utc"]))
        return any(observed or record["observed"] for (observed,) in rows)

    def reconcile(self, card_numbers: Sequence[int]) -> int:
        """Settle unresolved writes the card's own history proves landed (inside a transaction):
        a write left unresolved at one terminal (the card had moved on before it was seen again)
        landed if the card's next change, committed anywhere, starts from the counter and the
        balance that write left, and no other committed write reached that counter. Its records
        become committed (``reconciled`` = 1). How many records changed."""
        changed = 0
        for card in sorted(set(card_numbers)):
            rows = self._all(
                "SELECT terminal_id, incarnation, seq, state, counter_before, counter_after, "
                "balance_before_cents, balance_after_cents, at_utc FROM records "
                "WHERE card_number = ? AND state IN ('committed', 'same_change', 'unresolved') "
                "ORDER BY terminal_id, incarnation, seq", (card,))
            writes: dict[tuple, list[tuple]] = {}
            for row in rows:
                writes.setdefault((row[0], row[1], row[8], row[4], row[5], row[3]), []).append(row)
            settled = [w for key, w in writes.items() if key[5] != "unresolved"]
            for key, records in writes.items():
                if key[5] != "unresolved":
                    continue
                counter_after, final_balance = key[4], records[-1][7]
                if any(w[0][5] == counter_after for w in settled):
                    continue  # another write reached that counter
                if not any(w[0][4] == counter_after and w[0][6] == final_balance
                           for w in settled):
                    continue
                for record in records:
                    self._execute("UPDATE records SET state = 'committed', reconciled = 1 "
                                  "WHERE terminal_id = ? AND incarnation = ? AND seq = ? "
                                  "AND state = 'unresolved'", record[:3])
                    changed += 1
        return changed

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
        of one write share terminal, incarnation and time. A terminal's ``clock_reset`` records
        (card 0, no card involved) are no card's change."""
        return self._all(
            "SELECT card_number, counter_before, "
            "count(DISTINCT terminal_id || ':' || incarnation || ':' || at_utc) FROM records "
            "WHERE state = 'committed' AND type != 'clock_reset' "
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
