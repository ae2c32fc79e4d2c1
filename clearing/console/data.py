"""What the console shows, read from the receiver's kept summaries (``sources``, ``gaps``,
``batches``, ``day_totals``, ``forks``, ``actions``) and, by index only, from ``card_writes``
(the card's history by card number, and the writes per hour of a day by ``card_writes_at``)
and ``records`` (by its key, the open-records partial index and ``records_batch``). Nothing
here scans the records table. The operators' accounts and the audit (migration 0004) are
kept here too."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from farebox.protocol.settlement import parse_utc

from farebox.clearing.errors import ClearingError
from farebox.clearing.store import Store, _text_day, _text_time

ROLES = ("admin", "viewer")
#: how long since a terminal's last upload before it shows amber, and red
LAG_AMBER = timedelta(hours=2)
LAG_RED = timedelta(hours=24)
FLEET_SORTS = ("terminal", "provider", "last_upload", "lag", "gaps", "open", "forks", "records",
               "status")
_STATUS_ORDER = {"red": 0, "amber": 1, "green": 2}
#: the most records of one card the card page shows (its latest): a card a compromised
#: terminal wrote millions of records for cannot make the page unbounded
CARD_ROWS = 2_000


class ConsoleError(ClearingError):
    """A console request or account change that cannot be done (said to the operator)."""


@dataclass(frozen=True)
class Operator:
    id: int
    name: str
    role: str
    password_hash: str
    session_epoch: int = 0  # moved at sign-out: the account's sessions end

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class ConsoleData:
    """The console's reads and writes on one :class:`Store` (thread-safe as the store is)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _rows(self, statement: str, parameters: tuple = ()) -> list[tuple]:
        with self.store._session() as db:  # noqa: SLF001 - the store's dialect and pool
            return [tuple(_text_time(v) for v in row)
                    for row in db.all(statement, parameters)]

    # -- operators and the audit ---------------------------------------------------------------

    def add_operator(self, name: str, role: str, password_hash: str, at_utc: str) -> None:
        with self.store._transaction() as db:  # noqa: SLF001
            if db.all("SELECT 1 FROM operators WHERE name = ?", (name,)):
                raise ConsoleError(f"operator {name!r} exists already")
            db.execute("INSERT INTO operators (name, password_hash, role, created_utc) "
                       "VALUES (?, ?, ?, ?)", (name, password_hash, role, db.time(at_utc)))
            db.execute("INSERT INTO audit (at_utc, operator, action, card_number, detail) "
                       "VALUES (?, ?, ?, ?, ?)", (db.time(at_utc), "(command line)",
                                                   "operator added", None, f"{name} as {role}"))

    def operators(self) -> list[dict]:
        """Every account: name, role, when made."""
        return [{"operator": name, "role": role, "created_utc": created}
                for name, role, created in self._rows(
                    "SELECT name, role, created_utc FROM operators ORDER BY name")]

    def change_operator(self, name: str, at_utc: str, *, password_hash: str | None = None,
                        remove: bool = False) -> None:
        """A new password (every session of the account ends: they are bound to its hash) or
        the account removed (its sessions end at their next request), audited in the same
        transaction; ConsoleError for an unknown name."""
        with self.store._transaction() as db:  # noqa: SLF001
            if not db.all("SELECT 1 FROM operators WHERE name = ?", (name,)):
                raise ConsoleError(f"no operator {name!r}")
            if remove:
                db.execute("DELETE FROM operators WHERE name = ?", (name,))
                action = "operator removed"
            else:
                db.execute("UPDATE operators SET password_hash = ? WHERE name = ?",
                           (password_hash, name))
                action = "password changed"
            db.execute("INSERT INTO audit (at_utc, operator, action, card_number, detail) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (db.time(at_utc), "(command line)", action, None, name))

    def operator(self, name: str) -> Operator | None:
        rows = self._rows("SELECT id, name, role, password_hash, session_epoch FROM operators "
                          "WHERE name = ?", (name,))
        return Operator(*rows[0]) if rows else None

    def set_password_hash(self, name: str, password_hash: str, was: str) -> bool:
        """A rehash at sign-in (Argon2's parameters raised since the hash was made), only if
        the hash is still ``was`` (a new password set meanwhile wins); whether it was."""
        with self.store._transaction() as db:  # noqa: SLF001
            return bool(db.execute("UPDATE operators SET password_hash = ? WHERE name = ? "
                                   "AND password_hash = ?", (password_hash, name, was)).rowcount)

    def audit(self, at_utc: str, operator: str, action: str, card: int | None,
              detail: str) -> None:
        with self.store._session() as db:  # noqa: SLF001
            audit_into(db, at_utc, operator, action, card, detail)

    def refusals_since(self, name: str, since_utc: str, action: str = "sign-in refused",
                       detail: str | None = None) -> int:
        """Sign-ins refused for ``name`` since then (the audit, by its operator index), those
        with ``detail`` only when given (the address they came from)."""
        extra, parameters = ("AND detail = ? ", (detail,)) if detail is not None else ("", ())
        with self.store._session() as db:  # noqa: SLF001
            return db.all("SELECT count(*) FROM audit WHERE operator = ? AND action = ? "
                          f"AND at_utc >= ? {extra}",
                          (name, action, db.time(since_utc), *parameters))[0][0]

    def end_sessions(self, name: str, at_utc: str) -> None:
        """Sign-out: every session the account has ends (its session epoch moves), audited."""
        with self.store._transaction() as db:  # noqa: SLF001
            db.execute("UPDATE operators SET session_epoch = session_epoch + 1 WHERE name = ?",
                       (name,))
            db.execute("INSERT INTO audit (at_utc, operator, action, card_number, detail) "
                       "VALUES (?, ?, ?, ?, ?)", (db.time(at_utc), name, "signed out", None,
                                                  "every session of the account ended"))

    def audit_log(self, limit: int = 200, card: int | None = None) -> list[dict]:
        where, parameters = ("WHERE card_number = ? ", (card,)) if card is not None else ("", ())
        return [dict(zip(("at", "operator", "action", "card", "detail"), row)) for row in
                self._rows("SELECT at_utc, operator, action, card_number, detail FROM audit "
                           f"{where}ORDER BY id DESC LIMIT {int(limit)}", parameters)]

    # -- fleet ---------------------------------------------------------------------------------

    def fleet(self, now: datetime, *, sort: str = "status", descending: bool = False,
              status: str | None = None, text: str = "") -> list[dict]:
        """One row per terminal incarnation: records, last sequence, last upload (its last
        batch's receipt, by the batches key) and the lag since, open gaps and the numbers
        missing in them, records still open (the partial index), counter forks its writes are
        part of (forks joined to card_writes by key); red (gaps, forks, no upload for a day),
        amber (records open, no upload for two hours), green."""
        gaps: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for source, runs, missing in self._rows(
                "SELECT source, count(*), CAST(sum(last_seq - first_seq + 1) AS BIGINT) "
                "FROM gaps GROUP BY source"):
            gaps[source] = [runs, missing]
        open_by_source = dict(self._rows(
            "SELECT u.source, count(*) FROM records u "
            "WHERE u.state IN ('unresolved', 'in_doubt') AND NOT EXISTS ("
            "SELECT 1 FROM records c WHERE c.source = u.source AND c.seq = u.seq "
            "AND c.at_utc = u.at_utc AND ((u.state = 'unresolved' AND c.state = 'committed') "
            "OR (u.state = 'in_doubt' AND c.state != 'in_doubt'))) GROUP BY u.source"))
        forks_by_source = dict(self._rows(
            "SELECT w.source, count(DISTINCT CAST(f.card_number AS TEXT) || ':' || "
            "CAST(f.counter AS TEXT)) FROM forks f JOIN card_writes w "
            "ON w.card_number = f.card_number AND w.counter_before = f.counter "
            "GROUP BY w.source"))
        rows = []
        for (source, terminal_id, incarnation, records, last_seq, last_batch, duplicates,
             received, provider) in self._rows(
                "SELECT s.id, t.terminal_id, s.incarnation, s.records, s.last_seq, "
                "s.last_batch, s.duplicates, b.received_utc, p.name FROM sources s "
                "JOIN terminals t ON t.id = s.terminal LEFT JOIN batches b "
                "ON b.source = s.id AND b.number = s.last_batch "
                "LEFT JOIN terminal_providers tp ON tp.terminal = t.id "
                "LEFT JOIN providers p ON p.id = tp.provider"):
            lag = now - parse_utc(received) if received else None
            runs, missing = gaps.get(source, [0, 0])
            opened, forked = open_by_source.get(source, 0), forks_by_source.get(source, 0)
            if runs or forked or lag is None or lag > LAG_RED:
                colour = "red"
            elif opened or lag > LAG_AMBER:
                colour = "amber"
            else:
                colour = "green"
            rows.append({"source": source, "terminal": terminal_id, "incarnation": incarnation,
                         "provider": provider or "",
                         "records": records, "last_seq": last_seq, "last_batch": last_batch,
                         "duplicates": duplicates, "last_upload": received,
                         "lag_s": None if lag is None else int(lag.total_seconds()),
                         "lag": _lag_text(lag), "gaps": runs, "missing": missing,
                         "open": opened, "forks": forked, "status": colour})
        if status in _STATUS_ORDER:
            rows = [r for r in rows if r["status"] == status]
        if text:
            rows = [r for r in rows if text.lower() in r["terminal"].lower()
                    or text.lower() in r["incarnation"].lower()
                    or text.lower() in r["provider"].lower()]
        key = {"terminal": lambda r: (r["terminal"], r["incarnation"]),
               "provider": lambda r: (r["provider"], r["terminal"]),
               "last_upload": lambda r: r["last_upload"] or "",
               "lag": lambda r: r["lag_s"] if r["lag_s"] is not None else 1 << 62,
               "status": lambda r: (_STATUS_ORDER[r["status"]], r["terminal"])}.get(
                   sort, lambda r: r.get(sort, 0))
        rows.sort(key=key, reverse=descending)
        return rows

    # -- a day ---------------------------------------------------------------------------------

    def day(self, day: str) -> dict:
        """The day's card writes per UTC hour (``card_writes`` through its time index: one row
        per record that changed a card) and its kept totals by state and type."""
        first = date.fromisoformat(day)
        start = datetime(first.year, first.month, first.day, tzinfo=timezone.utc)
        end = start + timedelta(days=1)
        hours = [0] * 24
        with self.store._session() as db:  # noqa: SLF001
            if db.postgres:
                found = db.all("SELECT CAST(extract(hour FROM at_utc AT TIME ZONE 'UTC') AS "
                               "INTEGER), count(*) FROM card_writes WHERE at_utc >= ? AND "
                               "at_utc < ? GROUP BY 1", (start, end))
            else:
                found = db.all("SELECT CAST(substr(at_utc, 12, 2) AS INTEGER), count(*) FROM "
                               "card_writes WHERE at_utc >= ? AND at_utc < ? GROUP BY 1",
                               (f"{day}T00:00:00Z", f"{end.date().isoformat()}T00:00:00Z"))
            for hour, count in found:
                hours[int(hour)] = count
            totals = db.all("SELECT state, type, CAST(sum(count) AS BIGINT), "
                            "CAST(sum(amount_cents) AS BIGINT) FROM day_totals WHERE day = ? "
                            "GROUP BY state, type HAVING sum(count) != 0 ORDER BY state, type",
                            (db.day(day),))
            days = [_text_day(d) for (d,) in db.all(
                "SELECT DISTINCT day FROM day_totals ORDER BY day DESC LIMIT 60")]
        return {"day": day, "hours": hours, "writes": sum(hours),
                "totals": [dict(zip(("state", "type", "count", "amount_cents"), row))
                           for row in totals], "days": days, **self._providers_of(first)}

    def _providers_of(self, day: date) -> dict:
        """The per-provider totals of the Hong Kong business day of that date: the settlement
        statement's lines (``clearing statement``), or why there are none."""
        from farebox.clearing.office import OfficeError, statement

        try:
            shown = statement(self.store, day)
        except OfficeError as error:
            return {"providers": [], "providers_note": str(error)}
        return {"providers": [*shown["providers"], {**shown["total"], "provider": "TOTAL"}],
                "providers_note": f"Hong Kong business day {shown['day']} ({shown['from_utc']} "
                                  f"to {shown['to_utc']})"}

    def latest_day(self) -> str | None:
        rows = self._rows("SELECT max(day) FROM day_totals")
        return _text_day(rows[0][0]) if rows and rows[0][0] is not None else None

    # -- a card --------------------------------------------------------------------------------

    def card(self, card: int) -> dict:
        """The card's writes at every terminal (``card_writes`` by card number, each joined to
        its records by key), in counter order; its list entry; its forks."""
        rows = self._rows(
            "SELECT w.counter_before, r.counter_after, r.at_utc, t.terminal_id, s.incarnation, "
            "r.seq, r.batch_number, r.state, r.type, r.amount_cents, r.balance_before_cents, "
            "r.balance_after_cents, r.reconciled, r.not_shown FROM card_writes w "
            "JOIN records r ON r.source = w.source AND r.seq = w.seq AND r.at_utc = w.at_utc "
            "JOIN sources s ON s.id = w.source JOIN terminals t ON t.id = s.terminal "
            "WHERE w.card_number = ? ORDER BY w.counter_before DESC, r.at_utc DESC, "
            "t.terminal_id DESC, r.seq DESC, r.state DESC LIMIT ?", (card, CARD_ROWS + 1))
        truncated = len(rows) > CARD_ROWS
        rows = rows[:CARD_ROWS][::-1]  # the latest CARD_ROWS records, in counter order
        names = ("counter_before", "counter_after", "at", "terminal", "incarnation", "seq",
                 "batch", "state", "type", "amount_cents", "balance_before_cents",
                 "balance_after_cents", "reconciled", "not_shown")
        listed = self._rows("SELECT reason, at_utc, added_utc FROM actions WHERE "
                            "card_number = ?", (card,))
        forks = self._rows("SELECT counter, writes, found_utc FROM forks WHERE card_number = ? "
                           "ORDER BY counter", (card,))
        return {"card": card, "writes": [dict(zip(names, row)) for row in rows],
                "truncated": truncated, "shown_rows": CARD_ROWS,
                "listed": dict(zip(("reason", "at", "added"), listed[0])) if listed else None,
                "forks": [dict(zip(("counter", "writes", "found"), row)) for row in forks],
                "audit": self.audit_log(50, card)}

    # -- batches -------------------------------------------------------------------------------

    def batches(self, limit: int = 100, terminal: str = "") -> list[dict]:
        where, parameters = ("WHERE t.terminal_id = ? ", (terminal,)) if terminal else ("", ())
        return [dict(zip(("source", "terminal", "incarnation", "number", "items", "duplicates",
                          "received", "hash"), row)) for row in self._rows(
            "SELECT b.source, t.terminal_id, s.incarnation, b.number, b.items, b.duplicates, "
            "b.received_utc, b.hash FROM batches b JOIN sources s ON s.id = b.source "
            f"JOIN terminals t ON t.id = s.terminal {where}"
            f"ORDER BY b.received_utc DESC, b.source, b.number DESC LIMIT {int(limit)}",
            parameters)]

    def batch(self, source: int, number: int) -> dict | None:
        """A batch, its records (``records_batch``), and what verifies: its link to the batch
        before it (that batch's hash, or the genesis hash for number 1), the records stored
        under it against the items it carried."""
        from farebox.protocol.settlement import GENESIS_HASH

        found = self._rows(
            "SELECT t.terminal_id, s.incarnation, b.number, b.hash, b.prev_hash, b.items, "
            "b.duplicates, b.received_utc, t.public_key FROM batches b "
            "JOIN sources s ON s.id = b.source JOIN terminals t ON t.id = s.terminal "
            "WHERE b.source = ? AND b.number = ?", (source, number))
        if not found:
            return None
        names = ("terminal", "incarnation", "number", "hash", "prev_hash", "items",
                 "duplicates", "received", "public_key")
        batch = dict(zip(names, found[0]))
        if number == 1:
            expected, before = GENESIS_HASH, "the genesis hash"
        else:
            earlier = self._rows("SELECT hash FROM batches WHERE source = ? AND number = ?",
                                 (source, number - 1))
            expected = earlier[0][0] if earlier else None
            before = f"batch {number - 1}'s hash" if earlier else f"batch {number - 1} (not stored)"
        records = [dict(zip(("seq", "state", "card", "counter_before", "counter_after", "type",
                             "amount_cents", "balance_after_cents", "at", "hash", "reconciled"),
                            row)) for row in self._rows(
            "SELECT seq, state, card_number, counter_before, counter_after, type, amount_cents, "
            "balance_after_cents, at_utc, hash, reconciled FROM records "
            "WHERE source = ? AND batch_number = ? ORDER BY seq, state", (source, number))]
        sent = {(r["seq"]) for r in records if r["reconciled"] != 2}
        checks = [
            ("signature", True, f"the batch's hash and its Ed25519 signature verified with the "
             f"terminal's enrolled key ({batch['public_key'][:16]}...) when it was received: "
             "the receiver stores nothing else"),
            ("chain", expected == batch["prev_hash"],
             f"it links to {before}" + ("" if expected == batch["prev_hash"] else
                                       f": {expected} expected")),
            ("records", len(sent) == batch["items"] - batch["duplicates"],
             f"{len(sent)} sequence numbers stored under it; it carried {batch['items']}, "
             f"{batch['duplicates']} of them stored before"),
        ]
        return {**batch, "records": records, "checks": checks}

    # -- the action list -----------------------------------------------------------------------

    def actions(self) -> tuple[int, list[dict]]:
        serial, entries = self.store.action_details()
        added = dict(self._rows("SELECT card_number, added_utc FROM actions"))
        return serial, [{"card": card, "reason": reason, "at": at, "added": added.get(card),
                         "outstanding": owed, "suspension": number}
                        for card, reason, at, owed, number in entries]


def _lag_text(lag: timedelta | None) -> str:
    if lag is None:
        return "never"
    seconds = max(0, int(lag.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def audit_into(db, at_utc: str, operator: str, action: str, card: int | None,
               detail: str) -> None:
    """One audit row through ``db`` (a store session or the transaction of the change it
    records)."""
    db.execute("INSERT INTO audit (at_utc, operator, action, card_number, detail) "
               "VALUES (?, ?, ?, ?, ?)", (db.time(at_utc), operator, action, card, detail))
