"""``farebox clearing serve|enroll|report``: the reference clearing receiver."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys

import click

from farebox.tools import output
from farebox.tools.common import InputError, json_option

DB_HELP = "the clearing database: a SQLite file path, or postgresql://..."


def _store(db: str):
    from farebox.clearing.store import Store, StoreError

    try:
        return Store(db)
    except StoreError as error:
        raise InputError(str(error)) from None


@contextlib.contextmanager
def _office_errors():
    """A back-office request refused (OfficeError): exit 2, one line, nothing changed."""
    from farebox.clearing.office import OfficeError

    try:
        yield
    except OfficeError as error:
        raise InputError(str(error)) from None


def _time_option(help_text: str):
    return click.option("--at", "at", default=None, metavar="TIME",
                        help=f"{help_text} (ISO 8601 with offset) [default: now]")


def _when(at: str | None):
    """A back-office time: now, or ``--at`` (a report taken earlier, a file of an earlier
    day), never in the future: a report dated ahead would delay the card's block, a refund or
    import dated ahead would land in a day not yet closed."""
    from datetime import timedelta

    from farebox.terminal.core.clock import now_utc
    from farebox.terminal.link.actionlist import parse_time

    now = now_utc()
    if at is None:
        return now
    try:
        when = parse_time(at)
    except ValueError as error:
        raise InputError(f"--at: {error}") from None
    if when > now + timedelta(minutes=5):
        raise InputError(f"--at: {at} is in the future (now {now.isoformat()})")
    return when


@click.group()
def clearing() -> None:
    """The reference clearing receiver (accepts signed settlement batches)."""


@clearing.command("serve")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="0: a free port")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, metavar="PEM",
              help="serve HTTPS with this certificate (chain, PEM); needs --tls-key")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, metavar="PEM",
              help="the certificate's private key (PEM)")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="worker processes sharing the socket (each its own limits below)")
@click.option("--max-uploads", type=click.IntRange(1), default=16, show_default=True,
              help="uploads received or processed at once, per worker; more: 503")
@click.option("--upload-buffer-mib", type=click.IntRange(16), default=64, show_default=True,
              help="what those uploads' bodies may hold together, per worker; more: 503")
@click.option("--body-timeout", type=click.FloatRange(0, min_open=True), default=30.0,
              show_default=True, metavar="SECONDS",
              help="a body not all here this long after its headers: 408, connection closed")
@click.option("--header-timeout", type=click.FloatRange(0, min_open=True), default=10.0,
              show_default=True, metavar="SECONDS",
              help="a connection without a whole request line and headers this long: closed")
@click.option("--keep-alive-timeout", type=click.FloatRange(0, min_open=True), default=5.0,
              show_default=True, metavar="SECONDS", help="an idle connection: closed")
@click.option("--max-connections", type=click.IntRange(1), default=4096, show_default=True,
              help="open connections, per worker; a request past them: 503")
def serve(db, host, port, tls_cert, tls_key, workers, max_uploads, upload_buffer_mib,
          body_timeout, header_timeout, keep_alive_timeout, max_connections) -> None:
    """Serve the receiver over HTTP (HTTPS with --tls-cert/--tls-key) until SIGINT/SIGTERM;
    prints {"url": ...} once listening. Every ack is signed with the key `clearing key`
    prints."""
    import logging

    try:
        from farebox.clearing.app import MIB, Limits
        from farebox.clearing.server import serve as run_server
    except ImportError as error:
        raise InputError(f"the clearing receiver needs {error.name}: "
                         "pip install 'farebox[clearing]'") from None
    from farebox.clearing.store import StoreError

    if (tls_cert is None) != (tls_key is None):
        raise InputError("--tls-cert and --tls-key go together")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="farebox clearing: %(message)s")
    logging.getLogger("yoyo").setLevel(logging.WARNING)  # its "applying ..." steps: not ours

    limits = Limits(max_uploads=max_uploads, buffer_bytes=upload_buffer_mib * MIB,
                    body_timeout_s=body_timeout, header_timeout_s=header_timeout,
                    keep_alive_timeout_s=keep_alive_timeout, max_connections=max_connections)
    try:
        run_server(db, host, port,
                   on_ready=lambda url: click.echo(json.dumps({"url": url}), nl=True),
                   tls_cert=tls_cert, tls_key=tls_key, limits=limits, workers=workers)
    except StoreError as error:
        raise InputError(str(error)) from None
    except OSError as error:
        raise InputError(str(error.strerror or error)) from None


@clearing.command("enroll")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--terminal", "terminal_id", required=True, metavar="ID")
@click.option("--pubkey", required=True, metavar="HEX",
              help="the terminal's Ed25519 public key (`farebox terminal init` prints it)")
@click.option("--provider", default=None, metavar="NAME",
              help="the service provider the terminal takes taps for (`clearing provider add`)")
@json_option
def enroll(db, terminal_id, pubkey, provider, as_json) -> None:
    """Enroll a terminal's public key (refused if that terminal is enrolled already), under a
    service provider with --provider (fixed from then on)."""
    from farebox.terminal.core.clock import now_utc, utc_iso
    from farebox.terminal.store.identity import IdentityError, check_terminal_id

    try:
        check_terminal_id(terminal_id)
    except IdentityError as error:
        raise InputError(str(error)) from None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", pubkey):
        raise InputError("--pubkey: expected 64 hex digits (an Ed25519 public key)")
    from farebox.clearing import office

    with _store(db) as store, _office_errors():
        office.enroll(store, terminal_id, pubkey.lower(), utc_iso(now_utc()), provider)
    obj = {"terminal_id": terminal_id, "public_key": pubkey.lower()}
    if provider is not None:
        obj["provider"] = provider
    output.emit(obj, as_json, f"enrolled terminal {terminal_id}"
                + (f" under {provider}" if provider is not None else ""))


@clearing.command("report")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--day", "day", type=click.DateTime(["%Y-%m-%d"]), default=None, metavar="DAY",
              help="totals of this UTC day only (YYYY-MM-DD)")
@click.option("--from", "first", type=click.DateTime(["%Y-%m-%d"]), default=None,
              metavar="DAY", help="totals from this UTC day on")
@click.option("--to", "last", type=click.DateTime(["%Y-%m-%d"]), default=None, metavar="DAY",
              help="totals up to this UTC day")
@json_option
def report(db, day, first, last, as_json) -> None:
    """Records and amounts by state and type (every day, or UTC days of the records' times),
    per-terminal sequences and gaps, duplicates ignored, records still open, card counter
    forks. Read from the summaries the receiver keeps: as quick at 10 M records as at 10."""
    from farebox.clearing.report import build

    if day is not None and (first is not None or last is not None):
        raise InputError("--day is one day: give it alone, or --from/--to")
    if day is not None:
        first = last = day
    if first is not None and last is not None and first > last:
        raise InputError("--from is after --to")
    with _store(db) as store:
        obj = build(store, first and first.date().isoformat(), last and last.date().isoformat())
    lines = []
    for state, kinds in obj["totals"].items():
        for kind, t in kinds.items():
            lines.append(f"{state:<11} {kind:<15} {t['count']:>7}  {t['amount']:>12}")
    for t in obj["terminals"]:
        lines.append(f"terminal {t['terminal_id']} ({t['incarnation']}): {t['records']} records, "
                     f"last #{t['last_seq']}, gaps {t['gaps'] or 'none'}")
    lines.append(f"duplicates ignored: {obj['duplicates_ignored']}; open: {len(obj['open'])}; "
                 f"counter forks: {len(obj['counter_forks'])}")
    output.emit(obj, as_json, "\n".join(lines))


@clearing.command("action")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--card", "card", required=True, metavar="NUMBER", help="8 digits (check digit "
              "optional)")
@click.option("--reason", type=click.Choice(["lost", "aavs_suspended", "cancelled"]),
              required=True)
@click.option("--at", "at", required=True, metavar="TIME",
              help="when it was reported (ISO 8601 with offset)")
@json_option
def action(db, card, reason, at, as_json) -> None:
    """Put a card on the published action list (its next serial)."""
    from farebox.terminal.link.actionlist import parse_time
    from farebox.terminal.core.cardnumber import parse_number
    from farebox.clearing.service import Receiver
    from farebox.terminal.core.clock import now_utc, utc_iso

    try:
        number, when = parse_number(card), parse_time(at)
    except ValueError as error:
        raise InputError(str(error)) from None
    with _store(db) as store:
        serial = Receiver(store).add_action(number, reason, utc_iso(when), utc_iso(now_utc()))
    output.emit({"card": f"{number:08d}", "reason": reason, "at": utc_iso(when),
                 "serial": serial}, as_json, f"card {number:08d} listed {reason}; serial {serial}")


@clearing.command("key")
@click.option("--db", required=True, help=DB_HELP)
@json_option
def key(db, as_json) -> None:
    """Print the public key the action lists and acks are signed with (terminals'
    clearing_public_key)."""
    from farebox.clearing.service import Receiver

    with _store(db) as store:
        public = Receiver(store).public_key.hex()
    output.emit({"public_key": public}, as_json, public)


@clearing.command("migrate")
@click.option("--db", required=True, help=DB_HELP)
@json_option
def migrate(db, as_json) -> None:
    """Bring the database's schema to this version's (the migrations it lacks, in order; a
    database made before migrations is recognised); nothing to do is no error."""
    from farebox.clearing.errors import ClearingError
    from farebox.clearing.migrate import HEAD, upgrade

    try:
        applied = upgrade(db)
    except ClearingError as error:
        raise InputError(str(error)) from None
    output.emit({"applied": applied, "version": HEAD}, as_json,
                "\n".join(f"applied {name}" for name in applied)
                or f"nothing to do: at version {HEAD}")


@clearing.command("maintain")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--retention-days", type=click.IntRange(0), default=90, show_default=True,
              help="records of days older than this many days are dropped (their day totals "
              "are kept)")
@click.option("--ahead-days", type=click.IntRange(0), default=7, show_default=True,
              help="PostgreSQL: day partitions made this many days ahead")
@json_option
def maintain(db, retention_days, ahead_days, as_json) -> None:
    """Make the records' day partitions ahead (PostgreSQL), drop records past retention; safe
    while a receiver runs, and again at any time."""
    from datetime import datetime, timezone

    from farebox.clearing.errors import ClearingError
    from farebox.clearing.maintain import maintain as run

    try:
        done = run(db, datetime.now(timezone.utc), ahead_days=ahead_days,
                   retention_days=retention_days)
    except ClearingError as error:
        raise InputError(str(error)) from None
    output.emit(done, as_json,
                f"{done['engine']}: records kept from {done['kept_from']}; partitions made "
                f"{len(done['created'])} (rows moved {done['moved']}), dropped "
                f"{len(done['dropped'])}; rows deleted {done['deleted']}")


# -- the back office (farebox.clearing.office; docs/clearing.md "Back office") -----------------


@clearing.group("provider")
def provider_group() -> None:
    """Service providers: the operators whose terminals take the taps."""


@provider_group.command("add")
@click.option("--db", required=True, help=DB_HELP)
@click.argument("name")
@json_option
def provider_add(db, name, as_json) -> None:
    """Add a service provider (terminals are enrolled under it with `clearing enroll
    --provider`)."""
    from farebox.clearing import office
    from farebox.terminal.core.clock import now_utc, utc_iso

    with _store(db) as store, _office_errors():
        office.add_provider(store, name, utc_iso(now_utc()))
    output.emit({"provider": name}, as_json, f"added provider {name}")


@provider_group.command("list")
@click.option("--db", required=True, help=DB_HELP)
@json_option
def provider_list(db, as_json) -> None:
    """Every service provider and its terminals."""
    from farebox.clearing import office

    with _store(db) as store:
        found = office.providers(store)
    output.emit({"providers": found}, as_json, "\n".join(
        f"{p['provider']}: {', '.join(p['terminals']) or 'no terminals'}" for p in found)
        or "no providers")


#: the CSV statement's columns after the provider's name (amounts as money text)
STATEMENT_CSV = ("payments", "cash_add_values", "aavs_add_values", "deposits", "initial_values",
                 "fees", "refunds", "aavs_collected")


@clearing.command("statement")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--day", "day", type=click.DateTime(["%Y-%m-%d"]), required=True, metavar="DAY",
              help="the Hong Kong business day (YYYY-MM-DD, 00:00-24:00 UTC+08:00)")
@click.option("--provider", default=None, metavar="NAME", help="this provider's line only")
@click.option("--csv", "as_csv", is_flag=True, help="print CSV: a line per provider, then TOTAL")
@json_option
def statement(db, day, provider, as_csv, as_json) -> None:
    """The daily settlement statement: per service provider, the day's settled payments, cash
    and AAVS add values, issue cash, fees and refunds (count and amount), netted into what is
    owed to the provider (negative: owed by it); TOTAL is every provider netted."""
    from farebox.clearing import office

    if as_csv and as_json:
        raise InputError("--csv and --json exclude each other")
    with _store(db) as store, _office_errors():
        obj = office.statement(store, day.date(), provider)
    lines = [*obj["providers"], {**obj["total"], "provider": "TOTAL"}]
    if as_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = ["day", "provider", "terminals"]
        for column in STATEMENT_CSV:
            header += [f"{column}_count", column]
        writer.writerow([*header, "cash_fees", "net", "open_records"])
        for line in lines:
            row = [obj["day"], line["provider"] or "(none)", len(line["terminals"])]
            for column in STATEMENT_CSV:
                row += [line[column]["count"], line[column]["amount"]]
            writer.writerow([*row, line["cash_fees"], line["net"], line["open_records"]])
        output.emit({}, False, buffer.getvalue().rstrip("\n"))
        return
    human = [f"statement of {obj['day']} (Hong Kong), {obj['from_utc']} to {obj['to_utc']}"]
    for line in lines:
        human.append(f"{line['provider'] or '(none)'}: payments {line['payments']['amount']}, "
                     f"cash add values {line['cash_add_values']['amount']}, AAVS "
                     f"{line['aavs_add_values']['amount']}, fees {line['fees']['amount']}, "
                     f"refunds {line['refunds']['amount']}, AAVS owed collected "
                     f"{line['aavs_collected']['amount']}; net {line['net']}"
                     + (f" ({line['open_records']} open)" if line["open_records"] else ""))
    output.emit(obj, as_json, "\n".join(human))


@clearing.group("lost")
def lost_group() -> None:
    """Lost cards: the report (listed at once), the central refund, the list."""


def _card(text: str) -> int:
    from farebox.terminal.core.cardnumber import parse_number

    try:
        return parse_number(text)
    except ValueError as error:
        raise InputError(f"--card: {error}") from None


@lost_group.command("report")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--card", "card", required=True, metavar="NUMBER",
              help="8 digits (check digit optional)")
@click.option("--kind", type=click.Choice(["on-loan", "sold", "mobile"]), required=True,
              help="the card's kind: its deposit and Lost Octopus Service Fee (002 §18(c)-(d))")
@_time_option("when the loss was reported")
@json_option
def lost_report(db, card, kind, at, as_json) -> None:
    """Report a card lost: it goes on the action list at once (service terminals refuse its
    return from now; every terminal blocks it 3 hours after the report, 002 §12)."""
    from farebox.clearing import office
    from farebox.terminal.core.clock import now_utc

    number, reported = _card(card), _when(at)
    with _store(db) as store, _office_errors():
        obj = office.report_lost(store, number, kind.replace("-", "_"), reported, now_utc())
    output.emit(obj, as_json, f"card {obj['card']} reported lost at {obj['reported_utc']}; "
                f"blocked from {obj['blocked_utc']}"
                + (f"; list serial {obj['serial']}" if obj["serial"] is not None else ""))


@lost_group.command("refund")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--card", "card", required=True, metavar="NUMBER",
              help="8 digits (check digit optional)")
@_time_option("when the refund is made")
@json_option
def lost_refund(db, card, at, as_json) -> None:
    """The central refund of a card reported lost, once, after its block: deposit + the value
    as of the block - the Lost Octopus Service Fee (002 §18(c)-(d), 004 §32)."""
    from farebox.clearing import office

    number, when = _card(card), _when(at)
    with _store(db) as store, _office_errors():
        obj = office.refund_lost(store, number, when)
    output.emit(obj, as_json, f"card {obj['card']}: deposit {obj['deposit']} + value "
                f"{obj['value']} - fee {obj['fee']}: refund {obj['refund']}"
                + (f", owed {obj['owed']}" if obj["owed"] != "0.00" else ""))


@lost_group.command("list")
@click.option("--db", required=True, help=DB_HELP)
@json_option
def lost_list(db, as_json) -> None:
    """Every card reported lost, blocked from when, and its refund once made."""
    from farebox.clearing import office

    with _store(db) as store:
        found = office.lost_cards(store)
    output.emit({"lost": found}, as_json, "\n".join(
        f"{c['card']} ({c['kind']}): reported {c['reported_utc']}, blocked from "
        f"{c['blocked_utc']}, " + (f"refunded {c['refund']} at {c['refunded_utc']}"
                                   if c["refunded_utc"] else "not refunded") for c in found)
        or "no lost cards")


@clearing.group("aavs")
def aavs_group() -> None:
    """AAVS, the bank side: linked accounts, daily debit files, dishonoured debits."""


@aavs_group.command("link")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--card", "card", required=True, metavar="NUMBER",
              help="8 digits (check digit optional)")
@click.option("--institution", required=True, metavar="CODE",
              help="the financial institution (1-16 letters or digits)")
@click.option("--account", required=True, metavar="ACCOUNT", help="the AAVS account there")
@_time_option("when the link (or the switch) was approved")
@json_option
def aavs_link(db, card, institution, account, at, as_json) -> None:
    """Link a card's AAVS to an account. A new link replaces the old; one at another
    institution is a switch, whose HK$20 handling fee the new institution deducts from the
    account (001): a debit instruction in its file for that day."""
    from farebox.clearing import office
    from farebox.terminal.core.clock import utc_iso

    number, when = _card(card), _when(at)
    with _store(db) as store, _office_errors():
        obj = office.link_aavs(store, number, institution, account, utc_iso(when))
    fee = (f"; switched from {obj['switched_from']}: HK${obj['switch_fee']} handling fee "
           f"debited ({obj['switch_reference']})" if obj["switch_fee"] else "")
    output.emit(obj, as_json, f"card {number:08d}: AAVS debits to {institution} {account}{fee}")


@aavs_group.command("debits")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--day", "day", type=click.DateTime(["%Y-%m-%d"]), required=True, metavar="DAY",
              help="the Hong Kong business day (YYYY-MM-DD)")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, metavar="DIR",
              help="where the files are written: aavs-debits-DAY-INSTITUTION.txt")
@json_option
def aavs_debits(db, day, out, as_json) -> None:
    """Write the day's AAVS debit file per financial institution: every settled AAVS reload
    and AAVS fee of a linked card, once per reference (docs/clearing.md, "AAVS debit file")."""
    from pathlib import Path

    from farebox.clearing import office
    from farebox.terminal.core.clock import now_utc

    with _store(db) as store, _office_errors():
        obj = office.write_debit_files(store, day.date(), now_utc(), Path(out))
    output.emit(obj, as_json, "\n".join(
        [f"{e['path']}: {e['debits']} debits, {e['amount']}" for e in obj["files"]]
        + [f"not linked: card {u['card']} ({u['reference']}, {u['amount']})"
           for u in obj["unlinked"]]) or f"no AAVS debits on {obj['day']}")


@aavs_group.command("dishonour")
@click.option("--db", required=True, help=DB_HELP)
@click.argument("file", type=click.Path(dir_okay=False))
@_time_option("when the returned debits were received")
@json_option
def aavs_dishonour(db, file, at, as_json) -> None:
    """Import a financial institution's returned (dishonoured) debits, all or nothing: each card
    owes the amount, is listed aavs_suspended on the next action list, and is cancelled on a
    further dishonour (004 §20-21)."""
    from farebox.clearing import office

    from pathlib import Path

    when = _when(at)
    with _store(db) as store, _office_errors():
        obj = office.import_dishonour_file(store, Path(file), when)
    output.emit(obj, as_json, f"{len(obj['dishonoured'])} debits dishonoured "
                f"({len(obj['again'])} known already); suspended: "
                f"{', '.join(obj['suspended']) or 'none'}; cancelled: "
                f"{', '.join(obj['cancelled']) or 'none'}")


@aavs_group.command("list")
@click.option("--db", required=True, help=DB_HELP)
@json_option
def aavs_list(db, as_json) -> None:
    """Every card with a dishonoured debit: the outstanding amount, dishonours, cancellation."""
    from farebox.clearing import office

    with _store(db) as store:
        found = office.aavs_outstanding(store)
    output.emit({"outstanding": found}, as_json, "\n".join(
        f"{c['card']}: owes {c['outstanding']} ({c['dishonours']} dishonoured)"
        + (f", cancelled {c['cancelled_utc']}" if c["cancelled_utc"] else "") for c in found)
        or "no dishonoured debits")


@clearing.group("operator")
def operator() -> None:
    """Accounts of the web console at /console (admin: changes the action list; viewer:
    reads)."""


def _password() -> str:
    """A password from standard input (its first line) or, at a terminal, asked for twice:
    never from the command line."""
    if sys.stdin.isatty():
        return click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    return sys.stdin.readline().rstrip("\r\n")


@operator.command("add")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--name", required=True, metavar="NAME", help="the name the operator signs in "
              "with")
@click.option("--role", type=click.Choice(["admin", "viewer"]), required=True)
@json_option
def operator_add(db, name, role, as_json) -> None:
    """Add an operator. The password is read from standard input (its first line) or, at a
    terminal, asked for twice: never from the command line. Kept as an Argon2id hash."""
    from farebox.clearing.console.auth import add_operator
    from farebox.clearing.console.data import ConsoleData, ConsoleError
    from farebox.terminal.core.clock import now_utc, utc_iso

    password = _password()
    with _store(db) as store:
        try:
            add_operator(ConsoleData(store), name, role, password, utc_iso(now_utc()))
        except ConsoleError as error:
            raise InputError(str(error)) from None
    output.emit({"operator": name, "role": role}, as_json, f"operator {name} added ({role})")


@operator.command("password")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--name", required=True, metavar="NAME", help="the operator")
@json_option
def operator_password(db, name, as_json) -> None:
    """Give an operator a new password (read as for add): every session the account has ends
    at its next request. Audited."""
    from farebox.clearing.console.auth import change_password
    from farebox.clearing.console.data import ConsoleData, ConsoleError
    from farebox.terminal.core.clock import now_utc, utc_iso

    password = _password()
    with _store(db) as store:
        try:
            change_password(ConsoleData(store), name, password, utc_iso(now_utc()))
        except ConsoleError as error:
            raise InputError(str(error)) from None
    output.emit({"operator": name, "password": "changed"}, as_json,
                f"operator {name}: password changed; its sessions have ended")


@operator.command("remove")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--name", required=True, metavar="NAME", help="the operator")
@json_option
def operator_remove(db, name, as_json) -> None:
    """Remove an operator account: its sessions end at their next request; what it did stays
    in the audit. Audited."""
    from farebox.clearing.console.data import ConsoleData, ConsoleError
    from farebox.terminal.core.clock import now_utc, utc_iso

    with _store(db) as store:
        try:
            ConsoleData(store).change_operator(name, utc_iso(now_utc()), remove=True)
        except ConsoleError as error:
            raise InputError(str(error)) from None
    output.emit({"operator": name, "removed": True}, as_json, f"operator {name} removed")


@operator.command("list")
@click.option("--db", required=True, help=DB_HELP)
@json_option
def operator_list(db, as_json) -> None:
    """Every operator account: name, role, when made (never a password hash)."""
    from farebox.clearing.console.data import ConsoleData

    with _store(db) as store:
        found = ConsoleData(store).operators()
    output.emit({"operators": found}, as_json, "\n".join(
        f"{o['operator']} ({o['role']}), since {o['created_utc']}" for o in found)
        or "no operators")
