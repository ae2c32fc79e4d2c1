"""``farebox clearing serve|enroll|report``: the reference clearing receiver."""

from __future__ import annotations

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
@json_option
def enroll(db, terminal_id, pubkey, as_json) -> None:
    """Enroll a terminal's public key (refused if that terminal is enrolled already)."""
    from farebox.terminal.core.clock import now_utc, utc_iso
    from farebox.terminal.store.identity import IdentityError, check_terminal_id

    try:
        check_terminal_id(terminal_id)
    except IdentityError as error:
        raise InputError(str(error)) from None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", pubkey):
        raise InputError("--pubkey: expected 64 hex digits (an Ed25519 public key)")
    with _store(db) as store:
        if not store.enroll(terminal_id, pubkey.lower(), utc_iso(now_utc())):
            raise InputError(f"terminal {terminal_id} is enrolled already")
    output.emit({"terminal_id": terminal_id, "public_key": pubkey.lower()}, as_json,
                f"enrolled terminal {terminal_id}")


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
