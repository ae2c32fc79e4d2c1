"""The back office (docs/clearing.md "Back office"): what the clearing house does with the records
the receiver keeps, beyond receiving them.

- **Service providers** (004 "Service Provider"): terminals are enrolled under a provider; the
  daily settlement statement (:func:`statement`) sums each provider's settled records of one
  Hong Kong business day by kind (payments, cash and AAVS add values, issue cash, fees, refunds)
  and nets them into what the card company owes the provider (or the provider owes it).
- **Lost cards** (002 §12, §18(c)-(d); 004 §31-32): a loss report lists the card at once
  (:func:`report_lost`); after the Notification Period the card company refunds the deposit and
  the value as of the block, less the Lost Octopus Service Fee (:func:`refund_lost`).

Every figure is integer cents. Times are UTC in the store; the business day is the Hong Kong day
(UTC+08:00, docs/rules.md §1). The records are read through ``card_writes`` (outside the day
partitions, indexed by time and by card) joined to ``records`` by key and by time range, so
PostgreSQL reads only the day partitions concerned.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

from farebox.cardimage.money import format_cents
from farebox.protocol.settlement import parse_utc, utc_iso

from farebox.clearing.errors import ClearingError
from farebox.clearing.store import Store, _bump_serial, _Db, _text_time, lock_cards

#: Hong Kong time, the scheme's (docs/rules.md §1: UTC+08:00, no daylight saving)
HONG_KONG = timezone(timedelta(hours=8))


class OfficeError(ClearingError):
    """A back-office request refused as given (exit 2): nothing was changed."""


def _session(store: Store):
    return store._session()  # noqa: SLF001 - the back office is the store's other reader


def _transaction(store: Store):
    return store._transaction()  # noqa: SLF001


@contextmanager
def _snapshot(store: Store) -> Iterator[_Db]:
    """One consistent read of several statements while receivers ingest: a read-only
    REPEATABLE READ transaction on PostgreSQL, a deferred (read) transaction on SQLite."""
    if store.postgres:
        with _transaction(store) as db:
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield db
        return
    with _session(store) as db:
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")


def _between(db: _Db, start: datetime, end: datetime) -> tuple:
    """Bounds for ``at_utc >= ? AND at_utc < ?``. SQLite keeps ISO text, ``...00Z`` and
    ``...00.5Z``: bounds without the ``Z`` order both correctly."""
    if db.postgres:
        return start, end
    return (utc_iso(start).rstrip("Z"), utc_iso(end).rstrip("Z"))


def _time_bound(db: _Db, at: datetime):
    return at if db.postgres else utc_iso(at).rstrip("Z")


# -- service providers --------------------------------------------------------------------------

_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


def check_provider_name(name: str) -> str:
    if not _PROVIDER_NAME.fullmatch(name):
        raise OfficeError(f"provider name {name!r}: 1-64 letters, digits, space . _ -, "
                          "starting with a letter or digit")
    return name


def add_provider(store: Store, name: str, at_utc: str) -> None:
    """Add a service provider (refused if one has that name)."""
    check_provider_name(name)
    with _transaction(store) as db:
        if db.all("SELECT 1 FROM providers WHERE name = ?", (name,)):
            raise OfficeError(f"provider {name} exists already")
        db.execute("INSERT INTO providers (name, added_utc) VALUES (?, ?)",
                   (name, db.time(at_utc)))


def providers(store: Store) -> list[dict]:
    """Every provider with its terminals."""
    with _session(store) as db:
        found = {name: [] for (name,) in db.all("SELECT name FROM providers ORDER BY name")}
        for name, terminal_id in db.all(
                "SELECT p.name, t.terminal_id FROM terminal_providers tp "
                "JOIN providers p ON p.id = tp.provider JOIN terminals t ON t.id = tp.terminal "
                "ORDER BY p.name, t.terminal_id"):
            found[name].append(terminal_id)
    return [{"provider": name, "terminals": terminals} for name, terminals in found.items()]


def enroll(store: Store, terminal_id: str, public_key_hex: str, at_utc: str,
           provider: str | None) -> None:
    """Enroll a terminal's key (:meth:`Store.enroll`), under ``provider`` when one is named (an
    unknown provider is refused before anything is enrolled)."""
    if provider is not None:
        with _session(store) as db:
            if not db.all("SELECT 1 FROM providers WHERE name = ?", (provider,)):
                raise OfficeError(f"no provider {provider}: add it with farebox clearing "
                                  "provider add")
    if not store.enroll(terminal_id, public_key_hex, at_utc):
        raise OfficeError(f"terminal {terminal_id} is enrolled already")
    if provider is not None:
        assign_provider(store, terminal_id, provider)


def assign_provider(store: Store, terminal_id: str, name: str) -> None:
    """Enrol an enrolled terminal under provider ``name`` (once: a terminal's provider is fixed,
    so that no day's statement changes afterwards)."""
    with _transaction(store) as db:
        provider = db.all("SELECT id FROM providers WHERE name = ?", (name,))
        if not provider:
            raise OfficeError(f"no provider {name}: add it with farebox clearing provider add")
        terminal = db.all("SELECT id FROM terminals WHERE terminal_id = ?", (terminal_id,))
        if not terminal:
            raise OfficeError(f"terminal {terminal_id} is not enrolled")
        if db.all("SELECT 1 FROM terminal_providers WHERE terminal = ?", (terminal[0][0],)):
            raise OfficeError(f"terminal {terminal_id} is enrolled under a provider already")
        db.execute("INSERT INTO terminal_providers (terminal, provider) VALUES (?, ?)",
                   (terminal[0][0], provider[0][0]))


#: The statement's columns: record types by what they are to the provider. Cash the provider took
#: from customers (add values, issue cash, AAVS amounts outstanding collected before a
#: reactivation) is owed to the card company; value the provider gave (payments it was paid
#: with) and cash it paid out (refunds at returns) are owed to the provider. Fees other than the
#: issue's administrative fee are kept out of a card's value or deposit, or charged to a bank
#: account (docs/rules.md §8): no cash passes at the provider for them.
COLUMNS = {
    "payments": ("payment",),
    "cash_add_values": ("add_value",),
    "aavs_add_values": ("auto_add_value",),
    "deposits": ("deposit",),
    "initial_values": ("initial_value",),
    "fees": ("admin_fee", "handling_fee", "damage_fee", "personalisation_fee", "inactivity_fee",
             "aavs_reactivation_fee"),
    "refunds": ("refund",),
    "aavs_collected": ("aavs_outstanding_paid",),
}
#: the fees paid in cash at the provider's counter (issue of a Personalised card, 002 §18(a))
CASH_FEES = ("admin_fee",)
#: net to the provider = sum(sign * column), the cash fees taken on top
NET_SIGNS = {"payments": 1, "refunds": 1, "cash_add_values": -1, "deposits": -1,
             "initial_values": -1, "aavs_collected": -1}
#: terminals enrolled without a provider: their own line, after the providers', so nothing is lost
UNASSIGNED = ""


def business_day_bounds(day: date) -> tuple[datetime, datetime]:
    """The UTC times a Hong Kong business day runs from (inclusive) and to (exclusive);
    OfficeError for a day no card records (before 1990, after 2199)."""
    if not date(1990, 1, 1) <= day <= date(2199, 12, 31):
        raise OfficeError(f"day {day.isoformat()}: not a day of the scheme (1990 to 2199)")
    start = datetime.combine(day, time(0), HONG_KONG).astimezone(timezone.utc)
    return start, start + timedelta(days=1)


def statement(store: Store, day: date, provider: str | None = None) -> dict:
    """The settlement statement of Hong Kong business day ``day``: per provider (and a line
    for terminals enrolled without one), the settled (committed) records of the day by type and
    by column (:data:`COLUMNS`), each with its count and cents, the net, and the totals over
    every provider (whose net is the card company's cash position: the providers netted).
    Records still open (unresolved or in doubt) are counted, not summed: the statement of a day
    is final once they are settled. ``provider`` limits the lines to one (the totals stay the
    whole day's)."""
    start, end = business_day_bounds(day)
    with _snapshot(store) as db:
        kept = db.all("SELECT value FROM meta WHERE name = 'retained_from'")
        if kept and start.date().isoformat() < kept[0][0]:
            raise OfficeError(f"the records of {day.isoformat()} are past retention (kept from "
                              f"{kept[0][0]}): no statement can be made")
        if provider is not None and not db.all("SELECT 1 FROM providers WHERE name = ?",
                                               (provider,)):
            raise OfficeError(f"no provider {provider}")
        low, high = _between(db, start, end)
        joins = ("FROM card_writes w JOIN records r ON r.source = w.source AND r.seq = w.seq "
                 "AND r.at_utc = w.at_utc JOIN sources s ON s.id = r.source "
                 "JOIN terminals t ON t.id = s.terminal "
                 "LEFT JOIN terminal_providers tp ON tp.terminal = t.id "
                 "LEFT JOIN providers p ON p.id = tp.provider "
                 "WHERE w.at_utc >= ? AND w.at_utc < ? AND r.at_utc >= ? AND r.at_utc < ? ")
        rows = db.all("SELECT coalesce(p.name, ''), t.terminal_id, r.type, count(*), "
                      f"CAST(sum(r.amount_cents) AS BIGINT) {joins}AND r.state = 'committed' "
                      "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (low, high, low, high))
        open_rows = db.all(
            f"SELECT coalesce(p.name, ''), count(*) {joins}"
            "AND r.state IN ('unresolved', 'in_doubt') AND NOT EXISTS (SELECT 1 FROM records c "
            "WHERE c.source = r.source AND c.seq = r.seq AND c.at_utc = r.at_utc AND "
            "c.at_utc >= ? AND c.at_utc < ? AND ((r.state = 'unresolved' AND "
            "c.state = 'committed') OR (r.state = 'in_doubt' AND c.state != 'in_doubt'))) "
            "GROUP BY 1", (low, high, low, high, low, high))
        names = [n for (n,) in db.all("SELECT name FROM providers ORDER BY name")]
        central = _central(db, day, start, end)
    lines: dict[str, dict] = {name: _line(name) for name in names}
    total = _line(None)
    for name, terminal_id, kind, count, cents in rows:
        line = lines.setdefault(name, _line(name))
        for figure in (line, total):
            _add(figure, terminal_id, kind, count, cents)
    for name, count in open_rows:
        lines.setdefault(name, _line(name))["open_records"] += count
        total["open_records"] += count
    shown = [_finish(line) for name, line in sorted(lines.items(),
                                                    key=lambda item: (not item[0], item[0]))
             if (provider is None and (name != UNASSIGNED or line["types"]
                                       or line["open_records"])) or name == provider]
    return {"day": day.isoformat(), "from_utc": utc_iso(start), "to_utc": utc_iso(end),
            "providers": shown, "total": _finish(total), "central": central}


def _central(db: _Db, day: date, start: datetime, end: datetime) -> dict:
    """What the card company settled itself that day, outside any provider: lost-card refunds
    made (002 §18(c)-(d)), and the AAVS debits of the day's records (004 §16) with those
    returned so far."""
    low, high = _between(db, start, end)
    lost = db.all("SELECT count(*), CAST(coalesce(sum(refund_cents), 0) AS BIGINT), "
                  "CAST(coalesce(sum(fee_cents), 0) AS BIGINT), "
                  "CAST(coalesce(sum(owed_cents), 0) AS BIGINT) FROM lost_cards "
                  "WHERE refunded_utc >= ? AND refunded_utc < ?", (low, high))[0]
    debited = db.all("SELECT count(*), CAST(coalesce(sum(amount_cents), 0) AS BIGINT), "
                     "count(dishonoured_utc), CAST(coalesce(sum(CASE WHEN dishonoured_utc IS "
                     "NOT NULL THEN amount_cents ELSE 0 END), 0) AS BIGINT) FROM aavs_debits "
                     "WHERE day = ?", (db.day(day.isoformat()),))[0]
    return {"lost_card_refunds": {"count": lost[0], "amount": format_cents(lost[1])},
            "lost_card_fees": format_cents(lost[2]), "lost_card_owed": format_cents(lost[3]),
            "aavs_debits": {"count": debited[0], "amount": format_cents(debited[1])},
            "aavs_dishonoured": {"count": debited[2], "amount": format_cents(debited[3])}}


def _line(name: str | None) -> dict:
    return {"provider": name, "terminals": set(), "types": {}, "open_records": 0}


def _add(line: dict, terminal_id: str, kind: str, count: int, cents: int) -> None:
    line["terminals"].add(terminal_id)
    figure = line["types"].setdefault(kind, [0, 0])
    figure[0] += count
    figure[1] += cents


def _finish(line: dict) -> dict:
    types = line["types"]
    columns = {}
    cents = {}
    for column, kinds in COLUMNS.items():
        cents[column] = sum(types.get(k, (0, 0))[1] for k in kinds)
        columns[column] = {"count": sum(types.get(k, (0, 0))[0] for k in kinds),
                           "amount": format_cents(cents[column])}
    cash_fees = sum(types.get(k, (0, 0))[1] for k in CASH_FEES)
    net = sum(sign * cents[c] for c, sign in NET_SIGNS.items()) - cash_fees
    out = {"provider": line["provider"], "terminals": sorted(line["terminals"]), **columns,
           "cash_fees": format_cents(cash_fees), "net": format_cents(net),
           "open_records": line["open_records"],
           "types": {k: {"count": n, "amount": format_cents(c)}
                     for k, (n, c) in sorted(types.items())}}
    if out["provider"] == UNASSIGNED:
        out["provider"] = None
    return out


# -- lost cards ---------------------------------------------------------------------------------

#: The Lost Octopus Notification Period (002 §12): the card is protected, and blocked, this long
#: after the report (the terminals' LOST_CARD_DELAY).
NOTIFICATION_PERIOD = timedelta(hours=3)
#: SVF deposit by kind (002 §6-7; a Sold card has none, docs/rules.md §2)
DEPOSIT_CENTS = {"on_loan": 5_000, "sold": 0, "mobile": 5_000}
#: Lost Octopus Service Fee by kind: On-Loan HK$50 deducted from the deposit (002 §18(c));
#: Sold HK$20 charged (002 §18(c)), deducted from the refund of the value (004 §32); Mobile
#: HK$20 deducted from the deposit (002 §18(d))
LOST_FEE_CENTS = {"on_loan": 5_000, "sold": 2_000, "mobile": 2_000}
KINDS = tuple(DEPOSIT_CENTS)


def report_lost(store: Store, card: int, kind: str, reported: datetime, added: datetime) -> dict:
    """Record a loss report and list the card ``lost`` at once (the action list's next serial;
    terminals block it from the report + 3 h, service terminals refuse its return at once). A
    card listed more severely (``cancelled``) stays so. Refused for a card reported already."""
    if kind not in KINDS:
        raise OfficeError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    blocked = reported + NOTIFICATION_PERIOD
    with _transaction(store) as db:
        lock_cards(db, [card])
        if db.all("SELECT 1 FROM lost_cards WHERE card_number = ?", (card,)):
            raise OfficeError(f"card {card:08d} was reported lost already")
        _check_kind(db, card, kind)
        db.execute("INSERT INTO lost_cards (card_number, kind, reported_utc, blocked_utc) "
                   "VALUES (?, ?, ?, ?)", (card, kind, db.time(utc_iso(reported)),
                                           db.time(utc_iso(blocked))))
        listed = db.all("SELECT reason FROM actions WHERE card_number = ?", (card,))
        serial = None
        if not listed or listed[0][0] != "cancelled":
            db.execute("DELETE FROM actions WHERE card_number = ?", (card,))
            db.execute("INSERT INTO actions (card_number, reason, at_utc, added_utc) "
                       "VALUES (?, 'lost', ?, ?)",
                       (card, db.time(utc_iso(reported)), db.time(utc_iso(added))))
            serial = _bump_serial(db)
    return {"card": f"{card:08d}", "kind": kind, "reported_utc": utc_iso(reported),
            "blocked_utc": utc_iso(blocked), "serial": serial}


def _check_kind(db: _Db, card: int, kind: str) -> None:
    """The kind the operator names against the card's issue records, when they are kept (a
    deposit record: its amount; an issue without one: a Sold card): OfficeError if they
    disagree. Without them (issued before the records kept) the operator's word stands."""
    rows = db.all(
        "SELECT r.type, r.amount_cents, r.source, r.at_utc, r.counter_before FROM card_writes w "
        "JOIN records r ON r.source = w.source AND r.seq = w.seq AND r.at_utc = w.at_utc "
        "WHERE w.card_number = ? AND r.type IN ('deposit', 'initial_value') "
        "AND r.state = 'committed' ORDER BY r.at_utc DESC", (card,))
    if not rows:
        return
    # the latest issue (a number can be issued again): the records of its write
    write = rows[0][2:]
    deposit = sum(cents for kind, cents, *key in rows
                  if kind == "deposit" and tuple(key) == write)
    if deposit != DEPOSIT_CENTS[kind]:
        raise OfficeError(f"card {card:08d} was issued with a deposit of "
                          f"{format_cents(deposit)}: not a {kind.replace('_', '-')} card "
                          f"(deposit {format_cents(DEPOSIT_CENTS[kind])})")


def lost_refund_figures(kind: str, value: int) -> dict:
    """002 §18(c)-(d), 004 §32: deposit + value as of the block - the Lost Octopus Service Fee;
    a negative value is set against the deposit; what the deposit and value do not cover is
    owed (charged to the holder or the AAVS account, 004 §32); the refund never goes below 0."""
    deposit, fee = DEPOSIT_CENTS[kind], LOST_FEE_CENTS[kind]
    gross = deposit + value - fee
    return {"deposit_cents": deposit, "value_cents": value, "fee_cents": fee,
            "negative_offset_cents": min(max(0, -value), deposit),
            "refund_cents": max(0, gross), "owed_cents": max(0, -gross)}


def card_value_at(db: _Db, card: int, before: datetime) -> tuple[int, int] | None:
    """(counter, balance) the card's settled history reaches before ``before``: the balance
    after the settled write with the highest counter dated before it (its last record's), or
    None when no settled write of the card is kept."""
    rows = db.all(
        "SELECT r.counter_after, r.balance_after_cents FROM card_writes w JOIN records r "
        "ON r.source = w.source AND r.seq = w.seq AND r.at_utc = w.at_utc "
        "WHERE w.card_number = ? AND w.at_utc < ? AND r.at_utc < ? "
        "AND r.state IN ('committed', 'same_change') "
        "ORDER BY r.counter_after DESC, r.at_utc DESC, r.seq DESC LIMIT 1",
        (card, _time_bound(db, before), _time_bound(db, before)))
    return (rows[0][0], rows[0][1]) if rows else None


def _open_before(db: _Db, card: int, before: datetime) -> int:
    """Writes of the card before ``before`` still open (unresolved, in doubt, unsettled)."""
    bound = _time_bound(db, before)
    return db.all(
        "SELECT count(*) FROM card_writes w JOIN records r ON r.source = w.source "
        "AND r.seq = w.seq AND r.at_utc = w.at_utc WHERE w.card_number = ? AND w.at_utc < ? "
        "AND r.state IN ('unresolved', 'in_doubt') AND NOT EXISTS (SELECT 1 FROM records c "
        "WHERE c.source = r.source AND c.seq = r.seq AND c.at_utc = r.at_utc AND "
        "((r.state = 'unresolved' AND c.state = 'committed') OR "
        "(r.state = 'in_doubt' AND c.state != 'in_doubt')))", (card, bound))[0][0]


def refund_lost(store: Store, card: int, at: datetime) -> dict:
    """The central refund of a card reported lost (once), at ``at``: not before the block
    (the holder may still use the card until then); from its value as of the block — the last
    settled state plus what was settled later inside the window; writes after the block are
    the card company's loss (004 §31). Refused while a write of the card before the block is
    still open, and when no settled record of the card is kept."""
    with _transaction(store) as db:
        lock_cards(db, [card])
        found = db.all("SELECT kind, reported_utc, blocked_utc, refunded_utc FROM lost_cards "
                       "WHERE card_number = ?", (card,))
        if not found:
            raise OfficeError(f"card {card:08d} has not been reported lost")
        kind, reported, blocked, refunded = found[0]
        blocked_at = parse_utc(_text_time(blocked))
        if refunded is not None:
            raise OfficeError(f"card {card:08d} was refunded already, at {_text_time(refunded)}")
        if at < blocked_at:
            raise OfficeError(f"card {card:08d} is blocked from {utc_iso(blocked_at)} (the "
                              "Notification Period, 002 §12): no refund before then")
        _check_not_settled_otherwise(db, card, blocked_at)
        if _open_before(db, card, blocked_at):
            raise OfficeError(f"card {card:08d} has writes before its block still open "
                              "(unresolved or in doubt): refund it once they are settled")
        value = card_value_at(db, card, blocked_at)
        if value is None:
            raise OfficeError(f"no settled record of card {card:08d} is kept: its value as of "
                              "the block is not known here")
        counter, balance = value
        figures = lost_refund_figures(kind, balance)
        if not db.execute(
                "UPDATE lost_cards SET refunded_utc = ?, value_cents = ?, deposit_cents = ?, "
                "fee_cents = ?, negative_offset_cents = ?, refund_cents = ?, owed_cents = ?, "
                "last_counter = ? WHERE card_number = ? AND refunded_utc IS NULL",
                (db.time(utc_iso(at)), balance, figures["deposit_cents"],
                 figures["fee_cents"], figures["negative_offset_cents"],
                 figures["refund_cents"], figures["owed_cents"], counter, card)).rowcount:
            raise OfficeError(f"card {card:08d} was refunded already")
    return _shown({"card": f"{card:08d}", "kind": kind, "reported_utc": _text_time(reported),
                   "blocked_utc": utc_iso(blocked_at), "refunded_utc": utc_iso(at),
                   "counter": counter, **figures})


def _check_not_settled_otherwise(db: _Db, card: int, blocked_at: datetime) -> None:
    """OfficeError for a card whose value and deposit were settled another way before its
    block: returned at a service terminal (its refund paid there), or listed cancelled (a
    counter spent twice: a copied card is refunded by nobody); or cancelled for dishonoured
    AAVS debits (its value applied to what it owed and its deposit forfeited, 004 §21). What
    happened after the block (a finder returning it at a terminal with an old list) is the
    card company's loss (004 §31), not the holder's."""
    bound = _time_bound(db, blocked_at)
    if db.all("SELECT 1 FROM card_writes w JOIN records r ON r.source = w.source "
              "AND r.seq = w.seq AND r.at_utc = w.at_utc WHERE w.card_number = ? "
              "AND w.at_utc < ? AND r.at_utc < ? "
              "AND r.type = 'refund' AND r.state IN ('committed', 'same_change') LIMIT 1",
              (card, bound, bound)):
        raise OfficeError(f"card {card:08d} was returned at a service terminal and refunded "
                          "there: no lost-card refund")
    if db.all("SELECT 1 FROM aavs_outstanding WHERE card_number = ? AND cancelled_utc IS NOT "
              "NULL", (card,)):
        raise OfficeError(f"card {card:08d} was cancelled for dishonoured AAVS debits: its "
                          "value went to what it owed and its deposit was forfeited (004 §21)")
    if db.all("SELECT 1 FROM actions WHERE card_number = ? AND reason = 'cancelled' "
              "AND at_utc < ?", (card, bound)):
        raise OfficeError(f"card {card:08d} is listed cancelled: no lost-card refund")


def _shown(entry: dict) -> dict:
    """Cents as money text (docs/rules.md §1): ``fee_cents`` 5000 becomes ``fee`` "50.00"."""
    return {(k[:-6] if k.endswith("_cents") else k):
            (format_cents(v) if k.endswith("_cents") else v) for k, v in entry.items()}


def lost_cards(store: Store) -> list[dict]:
    """Every card reported lost, with its refund when made."""
    with _session(store) as db:
        rows = db.all("SELECT card_number, kind, reported_utc, blocked_utc, refunded_utc, "
                      "value_cents, deposit_cents, fee_cents, negative_offset_cents, "
                      "refund_cents, owed_cents, last_counter FROM lost_cards "
                      "ORDER BY card_number")
    out = []
    for (card, kind, reported, blocked, refunded, value, deposit, fee, offset, refund, owed,
         counter) in rows:
        entry = {"card": f"{card:08d}", "kind": kind, "reported_utc": _text_time(reported),
                 "blocked_utc": _text_time(blocked),
                 "refunded_utc": None if refunded is None else _text_time(refunded)}
        if refunded is not None:
            entry.update(counter=counter, value_cents=value, deposit_cents=deposit,
                         fee_cents=fee, negative_offset_cents=offset, refund_cents=refund,
                         owed_cents=owed)
        out.append(_shown(entry))
    return out


# -- AAVS: the bank side (001; 004 §15-21) -------------------------------------------------------

#: the records that are debits to the card's linked account: an AAVS reload (004 §15: due at
#: once) and the AAVS fees charged to the account (002 §18(e), 001: re-activation, re-enabling)
AAVS_DEBIT_TYPES = {"auto_add_value": "reload", "aavs_reactivation_fee": "fee"}
_INSTITUTION = re.compile(r"[A-Za-z0-9]{1,16}")
_ACCOUNT = re.compile(r"[A-Za-z0-9-]{1,34}")


#: the handling fee for switching financial institution, deducted from the account by the
#: newly designated institution (001 "switching financial institution")
SWITCH_FEE_CENTS = 2_000


def link_aavs(store: Store, card: int, institution: str, account: str, at_utc: str) -> dict:
    """Link a card's AAVS to an account at a financial institution, replacing an earlier link.
    A link replacing one at another institution is a switch (001: "without cancelling the
    AAVS"): its HK$20 handling fee is a debit instruction (kind ``switch_fee``, reference
    ``switch:<card>:<time>``) in the new institution's file for the Hong Kong day of the
    switch. Another account at the same institution costs nothing."""
    if not _INSTITUTION.fullmatch(institution):
        raise OfficeError(f"institution {institution!r}: 1-16 letters or digits")
    if not _ACCOUNT.fullmatch(account):
        raise OfficeError(f"account {account!r}: 1-34 letters, digits or -")
    at = parse_utc(at_utc)
    with _transaction(store) as db:
        lock_cards(db, [card])  # two links of one card at once take turns
        old = db.all("SELECT institution FROM aavs_links WHERE card_number = ?", (card,))
        switched_from = old[0][0] if old and old[0][0] != institution else None
        db.execute("DELETE FROM aavs_links WHERE card_number = ?", (card,))
        db.execute("INSERT INTO aavs_links (card_number, institution, account, linked_utc) "
                   "VALUES (?, ?, ?, ?)", (card, institution, account, db.time(at_utc)))
        reference = None
        if switched_from is not None:
            reference = f"switch:{card:08d}:{utc_iso(at)}"
            day = at.astimezone(HONG_KONG).date()
            db.execute("INSERT INTO aavs_debits (reference, day, institution, account, "
                       "card_number, kind, amount_cents, at_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (reference) DO NOTHING",
                       (reference, db.day(day.isoformat()), institution, account, card,
                        "switch_fee", SWITCH_FEE_CENTS, db.time(utc_iso(at))))
    return {"card": f"{card:08d}", "institution": institution, "account": account,
            "switched_from": switched_from,
            "switch_fee": format_cents(SWITCH_FEE_CENTS) if switched_from else None,
            "switch_reference": reference}


#: how many Hong Kong days before a file's day its making looks for records settled since
#: their own day's file was made (uploaded late, settled from doubt, a card linked late)
LATE_DEBIT_DAYS = 7


def debits(store: Store, day: date, created: datetime) -> dict:
    """The AAVS debit instructions of Hong Kong business day ``day``, per institution: every
    settled record of :data:`AAVS_DEBIT_TYPES` of a linked card, kept (once, by reference) and
    returned as the text of each institution's file (docs/clearing.md "AAVS debit file"). A
    record of the :data:`LATE_DEBIT_DAYS` days before, not yet in any file, goes in this one
    (``late``): a debit is in the first file made once its record settled. Records of cards
    with no link are returned as ``unlinked`` (nothing to debit yet: link the card and make the
    file again; a debit already kept keeps its account); records dated from a lost card's block
    on, as ``after_block`` (never debited: 004 §31 protects the holder from then)."""
    start, end = business_day_bounds(day)
    types = sorted(AAVS_DEBIT_TYPES)
    with _transaction(store) as db:
        made = db.all("SELECT value FROM meta WHERE name = 'aavs_debits_newest_day'")
        newest = made[0][0] if made else None
        # only the newest day's file takes earlier days' stragglers: a day's file made again
        # (to look at it, or to send it again) holds what it held and its own day's since
        sweep = newest is None or newest <= day.isoformat()
        if sweep:  # the newest day made, moved only forward (two makers at once: the later)
            db.execute("INSERT INTO meta (name, value) VALUES ('aavs_debits_newest_day', ?) "
                       "ON CONFLICT (name) DO UPDATE SET value = CASE WHEN meta.value < "
                       "excluded.value THEN excluded.value ELSE meta.value END",
                       (day.isoformat(),))
        back = timedelta(days=LATE_DEBIT_DAYS if sweep else 0)
        low, high = _between(db, start - back, end)
        rows = db.all(
            "SELECT t.terminal_id, s.incarnation, r.seq, r.card_number, r.type, r.amount_cents, "
            "r.at_utc, l.institution, l.account, lc.blocked_utc FROM card_writes w "
            "JOIN records r ON r.source = w.source AND r.seq = w.seq AND r.at_utc = w.at_utc "
            "JOIN sources s ON s.id = r.source JOIN terminals t ON t.id = s.terminal "
            "LEFT JOIN aavs_links l ON l.card_number = r.card_number "
            "LEFT JOIN lost_cards lc ON lc.card_number = r.card_number "
            "WHERE w.at_utc >= ? AND w.at_utc < ? AND r.at_utc >= ? AND r.at_utc < ? "
            f"AND r.state = 'committed' AND r.type IN ({', '.join('?' * len(types))}) "
            "ORDER BY r.at_utc, t.terminal_id, r.seq", (low, high, low, high, *types))
        kept_before = {reference for (reference,) in db.all(
            "SELECT reference FROM aavs_debits WHERE day >= ? AND day <= ?",
            (db.day((day - back).isoformat()), db.day(day.isoformat())))} if sweep else set()
        unlinked, new, after_block, late = [], [], [], 0
        for (terminal_id, incarnation, seq, card, kind, cents, at, institution, account,
             blocked) in rows:
            reference = f"{terminal_id}:{incarnation}:{seq}"
            when = parse_utc(_text_time(at))
            earlier = when < start
            if earlier and reference in kept_before:
                continue  # in its own day's file (or another earlier one)
            if blocked is not None and when >= parse_utc(_text_time(blocked)):
                after_block.append({"reference": reference, "card": f"{card:08d}",
                                    "amount": format_cents(cents)})
                continue
            if institution is None:
                unlinked.append({"reference": reference, "card": f"{card:08d}",
                                 "amount": format_cents(cents)})
            else:
                late += earlier
                new.append((reference, db.day(day.isoformat()), institution, account, card,
                            AAVS_DEBIT_TYPES[kind], cents, at))
        db.many("INSERT INTO aavs_debits (reference, day, institution, account, card_number, "
                "kind, amount_cents, at_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (reference) DO NOTHING", new)
        kept = db.all("SELECT institution, reference, account, card_number, kind, amount_cents, "
                      "at_utc FROM aavs_debits WHERE day = ? ORDER BY institution, at_utc, "
                      "reference", (db.day(day.isoformat()),))
    files: dict[str, list] = {}
    for institution, reference, account, card, kind, cents, at in kept:
        files.setdefault(institution, []).append(
            ["D", reference, account, f"{card:08d}", kind, format_cents(cents), _text_time(at)])
    out = []
    for institution, lines in files.items():
        total = sum(row[5] for row in kept if row[0] == institution)
        text = "\n".join(",".join(str(v) for v in line) for line in (
            ["H", institution, day.isoformat(), utc_iso(created)], *lines,
            ["T", len(lines), format_cents(total)])) + "\n"
        out.append({"institution": institution, "debits": len(lines),
                    "amount": format_cents(total), "text": text})
    return {"day": day.isoformat(), "files": out, "unlinked": unlinked, "late": late,
            "after_block": after_block}


def write_debit_files(store: Store, day: date, created: datetime, folder: Path) -> dict:
    """:func:`debits`, each institution's file written to ``folder`` as
    ``aavs-debits-DAY-INSTITUTION.txt`` (its ``path`` in place of its ``text``)."""
    made = debits(store, day, created)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for entry in made["files"]:
            path = folder / f"aavs-debits-{made['day']}-{entry['institution']}.txt"
            path.write_text(entry.pop("text"), encoding="utf-8")
            entry["path"] = str(path)
    except OSError as error:
        raise OfficeError(f"{folder}: {error.strerror or error}") from None
    return made


#: the largest returned-debits file read
MAX_DISHONOUR_FILE = 1 << 20


def import_dishonour_file(store: Store, path: Path, at: datetime) -> dict:
    """:func:`import_dishonours` of a file (UTF-8, at most 1 MiB)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_DISHONOUR_FILE + 1)
    except OSError as error:
        raise OfficeError(f"{path}: {error.strerror or error}") from None
    if len(raw) > MAX_DISHONOUR_FILE:
        raise OfficeError(f"{path}: larger than 1 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OfficeError(f"{path}: not UTF-8 text") from None
    return import_dishonours(store, text, at)


def parse_dishonours(text: str) -> list[tuple[str, str]]:
    """``R,<reference>,<reason>`` lines (blank lines and ``#`` comments skipped) of a returned
    debits file; OfficeError naming the first line that is not one."""
    found, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(",", 2)
        if len(parts) != 3 or parts[0] != "R" or not parts[1] or len(line) > 256:
            raise OfficeError(f"line {number}: expected R,<reference>,<reason>")
        if parts[1] in seen:
            raise OfficeError(f"line {number}: debit {parts[1]} returned twice in one file")
        seen.add(parts[1])
        found.append((parts[1], parts[2].strip()))
    if not found:
        raise OfficeError("no returned debit in the file")
    return found


def import_dishonours(store: Store, text: str, at: datetime) -> dict:
    """Returned debits into the cards' outstanding amounts, all or nothing (004 §20). The debits
    of one card returned in one file are one dishonour. A card's dishonour while it owes
    nothing lists it ``aavs_suspended`` (001: suspended until the outstanding amount is paid; a
    card listed lost or cancelled stays so) with the amount it owes and its next suspension
    number, which a service terminal collects and releases (docs/rules.md §8). A dishonour
    while an amount is still outstanding cancels it (004 §21: its remaining value, the last
    settled one, is applied to the amount due and its deposit forfeited; listed
    ``cancelled``). A debit returned before is left as it is (a file imported twice)."""
    returned = parse_dishonours(text)
    now = utc_iso(at)
    outcome = {"dishonoured": [], "again": [], "suspended": [], "cancelled": [], "covered": []}
    with _transaction(store) as db:
        by_card: dict[int, int] = {}
        # in reference order: two imports of files holding the same debits lock their rows in
        # one order, never each waiting for the other
        for reference, _ in sorted(returned):
            found = db.all("SELECT card_number, amount_cents, dishonoured_utc FROM aavs_debits "
                           "WHERE reference = ?", (reference,))
            if not found:
                raise OfficeError(f"no debit {reference} was sent: nothing was imported")
            card, cents, earlier = found[0]
            # conditional: the same file imported twice at once counts the debit once (the
            # second waits for the first's row lock, then finds it returned)
            if earlier is not None or not db.execute(
                    "UPDATE aavs_debits SET dishonoured_utc = ? WHERE reference = ? "
                    "AND dishonoured_utc IS NULL", (db.time(now), reference)).rowcount:
                outcome["again"].append(reference)
                continue
            outcome["dishonoured"].append(reference)
            by_card[card] = by_card.get(card, 0) + cents
        lock_cards(db, by_card)  # a collection settled at the same time is seen, or waits
        for card, cents in sorted(by_card.items()):
            db.execute("INSERT INTO aavs_outstanding (card_number, outstanding_cents, "
                       "dishonours, last_utc) VALUES (?, 0, 0, ?) ON CONFLICT (card_number) "
                       "DO NOTHING", (card, db.time(now)))
            cancelled, suspensions = db.all("SELECT cancelled_utc, suspensions FROM "
                                            "aavs_outstanding WHERE card_number = ?", (card,))[0]
            pending = _pending(db, card)
            further = cancelled is None and _owed(db, card) - pending > 0
            db.execute("UPDATE aavs_outstanding SET outstanding_cents = outstanding_cents "
                       "+ ?, dishonours = dishonours + 1, last_utc = ? WHERE card_number = ?",
                       (cents, db.time(now), card))
            if cancelled is not None:
                continue  # cancelled before: the amount is owed, the card stays cancelled
            if further:
                _cancel_for_dishonour(db, card, at)
                outcome["cancelled"].append(f"{card:08d}")
                continue
            owed = _owed(db, card) - pending
            if owed <= 0:  # what was collected (or is on its way) covers it: nothing owed
                outcome["covered"].append(f"{card:08d}")
                continue
            number = suspensions + 1
            if number > SUSPENSION_MAX:  # the card cannot keep a higher number: by hand
                listed = _list(db, card, "aavs_suspended", now)
            else:
                listed = _list(db, card, "aavs_suspended", now, owed, number)
                if listed:
                    db.execute("UPDATE aavs_outstanding SET suspensions = ? "
                               "WHERE card_number = ?", (number, card))
            if listed:
                outcome["suspended"].append(f"{card:08d}")
        if outcome["suspended"] or outcome["cancelled"]:
            outcome["serial"] = _bump_serial(db)
    return outcome


#: the highest suspension number (the card keeps it in one byte); a card suspended more often
#: is listed without a number, as by hand: released only by the house taking it off the list
SUSPENSION_MAX = 255


def _owed(db: _Db, card: int) -> int:
    """What the card owes for returned debits now: the amounts dishonoured, less its value
    applied at a cancellation and what service terminals collected (settled
    ``aavs_outstanding_paid`` records)."""
    kept = db.all("SELECT outstanding_cents FROM aavs_outstanding WHERE card_number = ?",
                  (card,))
    return (kept[0][0] if kept else 0) - _paid(db, card)


def _paid(db: _Db, card: int) -> int:
    """The AAVS amounts outstanding service terminals collected on the card (settled
    ``aavs_outstanding_paid`` records, kept by the receiver: ``Store`` ``_Ingest``)."""
    rows = db.all("SELECT paid_cents FROM aavs_outstanding WHERE card_number = ?", (card,))
    return rows[0][0] if rows else 0


def _pending(db: _Db, card: int) -> int:
    """The AAVS amounts outstanding collected at service terminals and sent in doubt (or
    unresolved), settled neither way yet: on their way, so not owed (a further dishonour
    meanwhile is not one "while an amount is outstanding")."""
    return db.all(
        "SELECT coalesce(sum(u.amount_cents), 0) FROM card_writes w JOIN records u "
        "ON u.source = w.source AND u.seq = w.seq AND u.at_utc = w.at_utc "
        "WHERE w.card_number = ? AND u.type = 'aavs_outstanding_paid' "
        "AND u.state IN ('unresolved', 'in_doubt') AND NOT EXISTS ("
        "SELECT 1 FROM records c WHERE c.source = u.source AND c.seq = u.seq "
        "AND c.at_utc = u.at_utc AND c.state NOT IN ('unresolved', 'in_doubt'))",
        (card,))[0][0]


def _list(db: _Db, card: int, reason: str, now: str, outstanding: int | None = None,
          suspension: int | None = None) -> bool:
    """List ``card`` for ``reason`` unless it is listed more severely or so already; whether
    it was. A numbered AAVS suspension replaces the card's earlier numbered one (the card was
    released from that: it owed nothing more), never one put on the list by hand."""
    listed = db.all("SELECT reason, suspension FROM actions WHERE card_number = ?", (card,))
    order = ["aavs_suspended", "lost", "cancelled"]
    if listed:
        held = order.index(listed[0][0])
        if held > order.index(reason) or (held == order.index(reason) and (
                suspension is None or listed[0][1] is None)):
            return False
    db.execute("DELETE FROM actions WHERE card_number = ?", (card,))
    db.execute("INSERT INTO actions (card_number, reason, at_utc, added_utc, outstanding_cents, "
               "suspension) VALUES (?, ?, ?, ?, ?, ?)",
               (card, reason, db.time(now), db.time(now), outstanding, suspension))
    return True


def _cancel_for_dishonour(db: _Db, card: int, at: datetime) -> None:
    """004 §21: the card cancelled (listed), its last settled value applied to what is owed,
    the deposit forfeited (a Sold card has none: the deposit is known from its issue record)."""
    value = card_value_at(db, card, at + timedelta(microseconds=1))
    balance = max(0, value[1]) if value else 0
    refunded = db.all("SELECT 1 FROM lost_cards WHERE card_number = ? AND refunded_utc IS NOT "
                      "NULL", (card,))
    if refunded:  # its value and deposit were paid out at the lost-card refund
        balance = 0
    applied = min(balance, max(0, _owed(db, card) - _pending(db, card)))
    deposit = db.all("SELECT coalesce(max(r.amount_cents), 0) FROM card_writes w JOIN records r "
                     "ON r.source = w.source AND r.seq = w.seq AND r.at_utc = w.at_utc "
                     "WHERE w.card_number = ? AND r.type = 'deposit' AND r.state = 'committed'",
                     (card,))[0][0]
    db.execute("UPDATE aavs_outstanding SET outstanding_cents = outstanding_cents - ?, "
               "value_applied_cents = value_applied_cents + ?, deposit_forfeited_cents = ?, "
               "cancelled_utc = ? WHERE card_number = ?",
               (applied, applied, 0 if refunded else deposit, db.time(utc_iso(at)), card))
    _list(db, card, "cancelled", utc_iso(at))


def aavs_outstanding(store: Store) -> list[dict]:
    """Every card with a dishonoured debit: what it owes (dishonoured, less value applied at a
    cancellation and what service terminals collected), what is due back to its holder
    (collected beyond that), how many dishonours and suspensions, cancelled when."""
    with _session(store) as db:
        rows = db.all("SELECT o.card_number, o.outstanding_cents, o.dishonours, o.last_utc, "
                      "o.cancelled_utc, o.value_applied_cents, o.deposit_forfeited_cents, "
                      "o.suspensions, l.institution FROM aavs_outstanding o "
                      "LEFT JOIN aavs_links l ON l.card_number = o.card_number "
                      "ORDER BY o.card_number")
        paid = dict(db.all("SELECT card_number, paid_cents FROM aavs_outstanding"))
    return [_shown({"card": f"{card:08d}", "institution": institution,
                    "outstanding_cents": max(0, owed - paid[card]), "paid_cents": paid[card],
                    # collected beyond what it owed (a collection that reached the house
                    # after a cancellation applied the card's value): the holder's money
                    "refund_due_cents": max(0, paid[card] - owed),
                    "dishonours": count, "suspensions": suspensions,
                    "last_dishonour_utc": _text_time(last),
                    "cancelled_utc": None if cancelled is None else _text_time(cancelled),
                    "value_applied_cents": applied, "deposit_forfeited_cents": forfeited})
            for (card, owed, count, last, cancelled, applied, forfeited, suspensions,
                 institution) in rows]
