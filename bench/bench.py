"""farebox benchmarks: ratios against baselines measured in the same run.

    .venv/bin/python bench/bench.py [--quick]

1. decode + verify of a tap's blocks (identity + two purse slots) with the construct schemas,
   against a hand-written ``struct`` decoder doing the same MAC checks, and ``struct`` alone;
2. one rules decision (decide_payment);
3. terminal CPU per in-process payment tap (poll, read, verify, decide, journal, write, read back,
   commit) with fsync switched off, against bare card I/O (the same 7 commands, no logic) and
   against one raw SQLite insert + fsync (what the intent record costs on this disk);
4. card commands per payment and per add value.
"""

from __future__ import annotations

import argparse
import sqlite3
import struct
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from farebox.cardimage.image import decode_image
from farebox.cardimage.layout import FULL_READ_BLOCKS, TAP_READ_BLOCKS
from farebox.cardimage.mac import verify_area_mac
from farebox.protocol.session import LiteSSession
from farebox.protocol.simcard import SimulatedLiteS
from farebox.protocol.transports.inprocess import InProcessTransport
from farebox.terminal.issue import IssueRequest, issue, new_idm
from farebox.terminal.journal import Journal
from farebox.terminal.keys import published_test_keys
from farebox.terminal.rules import Tariff, decide_payment
from farebox.terminal.tap import Terminal

KEYS = published_test_keys()
AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8)))
TARIFF = Tariff.flat(580)


def per_call(fn, n: int) -> float:
    """Best of 5 runs of ``n`` calls, in seconds per call."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def make_card(balance_cents: int = 10**6 // 4) -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), balance_cents=balance_cents,
                                      number=12345678), KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


# ---- 1. decode + verify --------------------------------------------------------------------

_IDENTITY = struct.Struct(">BBIBBHI10x")
_PURSE = struct.Struct(">IiHHHBBHBHB2x")


def struct_decode(blocks: dict[int, bytes], idm: bytes, with_macs: bool) -> tuple:
    """The baseline: the same fields, the same MAC checks, by hand."""
    identity = blocks[0] + blocks[1]
    key_version = identity[1]
    card_key = KEYS.card_key(key_version, idm) if with_macs else b""
    if with_macs and not verify_area_mac(card_key, 1, key_version, idm, (0, 1), identity[:24], identity[24:]):
        raise ValueError("identity")
    fields = _IDENTITY.unpack(identity[:24])
    best = None
    for slot, numbers in enumerate(((2, 3), (4, 5))):
        raw = blocks[numbers[0]] + blocks[numbers[1]]
        if with_macs and not verify_area_mac(card_key, 2, key_version, idm, numbers, raw[:24], raw[24:]):
            continue
        purse = _PURSE.unpack(raw[:24])
        if best is None or purse[0] > best[0]:
            best = purse
    return fields, best


def bench_decode(n: int) -> dict:
    terminal_card = make_card()
    with tempfile.TemporaryDirectory() as folder, Journal(Path(folder) / "j", durable=False) as j:
        Terminal(j, KEYS).pay(LiteSSession(InProcessTransport(terminal_card)), TARIFF, AT)
    blocks = {n_: terminal_card.blocks[n_] for n_ in TAP_READ_BLOCKS}  # both slots in use
    full = {n_: terminal_card.blocks[n_] for n_ in FULL_READ_BLOCKS}
    idm = terminal_card.idm
    key_for = lambda v: KEYS.card_key(v, idm)  # noqa: E731
    ours = per_call(lambda: decode_image(blocks, idm, key_for), n)
    ours_full = per_call(lambda: decode_image(full, idm, key_for), n)
    base_mac = per_call(lambda: struct_decode(blocks, idm, True), n)
    base_raw = per_call(lambda: struct_decode(blocks, idm, False), n)
    return {"ours": ours, "ours_full": ours_full, "struct_mac": base_mac, "struct_raw": base_raw}


# ---- 2. rules -------------------------------------------------------------------------------

def bench_rules(n: int) -> float:
    card = make_card()
    image = decode_image(dict(enumerate(card.blocks)), card.idm, lambda v: KEYS.card_key(v, card.idm))
    return per_call(lambda: decide_payment(image.identity, image.purse, TARIFF, AT), n)


# ---- 3. the tap -----------------------------------------------------------------------------

def bench_tap(n: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        card = make_card()
        with Journal(Path(folder) / "journal.sqlite3", durable=False) as journal:
            terminal = Terminal(journal, KEYS)
            commands = terminal.pay(LiteSSession(InProcessTransport(card)), TARIFF, AT).commands
            add_commands = terminal.add_value(LiteSSession(InProcessTransport(card)), 5000, AT).commands
            start_cpu = time.process_time()
            tap = per_call(lambda: terminal.pay(LiteSSession(InProcessTransport(card)), Tariff.flat(1), AT), n)
            cpu = (time.process_time() - start_cpu) / (5 * n)

        durable_card = make_card()
        with Journal(Path(folder) / "durable.sqlite3") as journal:
            terminal = Terminal(journal, KEYS)
            durable = per_call(lambda: terminal.pay(LiteSSession(InProcessTransport(durable_card)),
                                                    Tariff.flat(1), AT), max(n // 10, 20))

        io_card = make_card()
        writes = [(2, io_card.blocks[2]), (3, io_card.blocks[3]), (6, io_card.blocks[6])]

        def bare_io():
            session = LiteSSession(InProcessTransport(io_card))
            session.poll()
            session.read_blocks(TAP_READ_BLOCKS)
            for block, data in writes:
                session.write_block(block, data)
            session.read_blocks([b for b, _ in writes])

        bare = per_call(bare_io, n)

        db = sqlite3.connect(Path(folder) / "raw.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (a INTEGER, b TEXT)")
        fsync_insert = per_call(lambda: db.execute("INSERT INTO t VALUES (1, 'x')"), max(n // 10, 20))
        db.close()
    return {"tap": tap, "tap_cpu": cpu, "durable": durable, "bare_io": bare, "sqlite_fsync": fsync_insert,
            "commands": commands, "add_value_commands": add_commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args()
    n = 200 if args.quick else 2000

    decode = bench_decode(n)
    rules = bench_rules(n * 5)
    tap = bench_tap(n // 4)
    us = lambda s: f"{s * 1e6:9.1f} µs"  # noqa: E731
    print(f"{'measure':<52}{'time':>12}   ratio")
    print(f"{'decode+verify tap blocks (construct schemas)':<52}{us(decode['ours'])}"
          f"   {decode['ours'] / decode['struct_mac']:.2f}x struct+MAC baseline")
    print(f"{'  baseline: hand-written struct + same MACs':<52}{us(decode['struct_mac'])}")
    print(f"{'  baseline: hand-written struct, no MACs':<52}{us(decode['struct_raw'])}"
          f"   ours is {decode['ours'] / decode['struct_raw']:.1f}x")
    print(f"{'decode+verify all 12 data blocks (with log)':<52}{us(decode['ours_full'])}")
    print(f"{'rules decision (decide_payment)':<52}{us(rules)}")
    print(f"{'in-process payment tap, fsync off (wall)':<52}{us(tap['tap'])}"
          f"   {tap['tap'] / tap['bare_io']:.2f}x bare card I/O")
    print(f"{'  CPU per tap incl. the simulated card (mean)':<52}{us(tap['tap_cpu'])}")
    print(f"{'  baseline: bare card I/O, same 7 commands':<52}{us(tap['bare_io'])}")
    print(f"{'  baseline: raw SQLite insert + fsync (WAL, FULL)':<52}{us(tap['sqlite_fsync'])}"
          f"   tap CPU is {tap['tap'] / tap['sqlite_fsync']:.2f}x one fsync")
    print(f"{'in-process payment tap, durable journal (1 fsync)':<52}{us(tap['durable'])}"
          f"   {tap['durable'] / tap['sqlite_fsync']:.2f}x one raw insert+fsync")
    print(f"{'card commands per payment (poll+reads+writes+read-back)':<52}{tap['commands']:>12}")
    print(f"{'card commands per add value':<52}{tap['add_value_commands']:>12}")


if __name__ == "__main__":
    main()
