"""farebox benchmarks: ratios against baselines measured in the same run.

    .venv/bin/python bench/bench.py [--quick]

1. decode + verify of a tap's blocks (identity + two purse slots) with the construct schemas,
   against a hand-written ``struct`` decoder doing the same MAC checks, and ``struct`` alone;
2. one rules decision (decide_payment);
3. terminal CPU per in-process payment tap (poll, read, verify, decide, journal, write) with
   fsync switched off, against bare card I/O (the same 6 commands, no logic), the work done
   after the card left (commit marks, checkpoint), and a durable tap against one raw SQLite
   insert + fsync (what the intent record costs on this disk);
4. the same tap after 100 and after 10,000 earlier taps (the cost must not grow with history);
5. card commands per payment and per add value;
6. ``farebox --help`` against ``python -c pass``;
7. a service return (docs/rules.md §8, through the same transaction) and issuing a blank card
   held to a reader, against a payment on the same kind of fresh card.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from farebox.cardimage.image import decode_image
from farebox.cardimage.layout import FULL_READ_BLOCKS, TAP_READ_BLOCKS
from farebox.cardimage.mac import verify_area_mac
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Tariff, decide_payment
from farebox.terminal.card.tap import Terminal

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

def _median_us(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _terminal(folder: Path, name: str, durable: bool = False) -> tuple[Journal, Terminal]:
    journal = Journal(folder / name, durable=durable)
    return journal, Terminal(journal, KEYS)


def bench_tap(n: int) -> dict:
    """Per-tap medians. In-field: what ``pay`` takes while the card is in the field; the commit
    mark and checkpoint run afterwards in ``idle()`` (reported separately)."""
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        card, io_card = make_card(), make_card()
        journal, terminal = _terminal(folder, "fast.sqlite3")
        pay = lambda: terminal.pay(LiteSSession(InProcessTransport(card)), Tariff.flat(1), AT)  # noqa: E731
        commands = pay().commands
        add_commands = terminal.add_value(LiteSSession(InProcessTransport(card)), 5000, AT).commands
        writes = [(2, io_card.blocks[2]), (3, io_card.blocks[3]), (6, io_card.blocks[6])]

        def bare_io():
            session = LiteSSession(InProcessTransport(io_card))
            session.poll()
            session.read_blocks(TAP_READ_BLOCKS)
            for block, data in writes:
                session.write_block(block, data)

        for _ in range(50):  # warm up both
            pay(), terminal.idle(), bare_io()
        in_field, bare, with_idle = [], [], []
        for _ in range(n):  # interleaved, so that both see the same machine
            bare.append(_median_us(bare_io, 1))
            start = time.perf_counter()
            pay()
            middle = time.perf_counter()
            terminal.idle()
            end = time.perf_counter()
            in_field.append((middle - start) * 1e6)
            with_idle.append((end - start) * 1e6)
        journal.close()

        durable_card = make_card()
        journal, terminal = _terminal(folder, "durable.sqlite3", durable=True)
        durable, idle = [], []
        for minute in range(max(n // 5, 50)):
            start = time.perf_counter()
            terminal.pay(LiteSSession(InProcessTransport(durable_card)), Tariff.flat(1), AT)
            middle = time.perf_counter()
            terminal.idle()
            durable.append((middle - start) * 1e6)
            idle.append((time.perf_counter() - middle) * 1e6)
        journal.close()

        db = sqlite3.connect(folder / "raw.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (a INTEGER, b TEXT)")
        fsync_insert = _median_us(lambda: db.execute("INSERT INTO t VALUES (1, 'x')"),
                                  max(n // 10, 20))
        db.close()
    durable.sort()
    return {"in_field": statistics.median(in_field), "with_idle": statistics.median(with_idle),
            "bare_io": statistics.median(bare), "durable": statistics.median(durable),
            "durable_p99": durable[int(len(durable) * 0.99) - 1], "durable_max": durable[-1],
            "idle": statistics.median(idle), "sqlite_fsync": fsync_insert,
            "commands": commands, "add_value_commands": add_commands}


# ---- 7. service terminal -------------------------------------------------------------------

def bench_service(n: int) -> dict:
    """Per-operation medians on fresh cards (a return cancels its card), fsync off: a payment,
    a return, an issue onto a blank card (1 poll + 4 reads + 5 writes)."""
    from farebox.terminal.core.service import decide_return
    from farebox.terminal.card.desk import issue_on_card

    def decide(card, day):
        return decide_return(card.identity, card.purse, day)[0]

    with tempfile.TemporaryDirectory() as name:
        journal, terminal = _terminal(Path(name), "service.sqlite3")
        request = IssueRequest(issued=AT.date())
        pay, ret, iss = [], [], []
        for _ in range(n):  # interleaved, so that all see the same machine
            for samples, run in (
                    (pay, lambda s: terminal.pay(s, TARIFF, AT)),
                    (ret, lambda s: terminal.service(s, AT, "return", decide))):
                session = LiteSSession(InProcessTransport(make_card(10_000)))
                start = time.perf_counter()
                run(session)
                samples.append((time.perf_counter() - start) * 1e6)
                terminal.idle()
            session = LiteSSession(InProcessTransport(SimulatedLiteS(new_idm())))
            start = time.perf_counter()
            session.poll()
            issue_on_card(journal, KEYS, session, request, AT)
            iss.append((time.perf_counter() - start) * 1e6)
        journal.close()
    return {"pay": statistics.median(pay), "return": statistics.median(ret),
            "issue": statistics.median(iss)}


# ---- 4. tap cost against journal size -------------------------------------------------------

def bench_journal_size(small: int, large: int, n: int) -> dict:
    """The same card and terminal after ``small`` and after ``large`` earlier taps."""
    out = {}
    with tempfile.TemporaryDirectory() as name:
        for size in (small, large):
            card = make_card(balance_cents=300_000)
            journal, terminal = _terminal(Path(name), f"j{size}.sqlite3")
            pay = lambda: terminal.pay(LiteSSession(InProcessTransport(card)), Tariff.flat(1), AT)  # noqa: E731,B023
            for done in range(size):
                pay()
                if done % 50 == 0:
                    terminal.idle()
            terminal.idle()

            def tap_and_idle():
                pay()  # noqa: B023
                terminal.idle()  # noqa: B023

            out[size] = _median_us(tap_and_idle, n)
            journal.close()
    return out


# ---- 5. start-up ----------------------------------------------------------------------------

def bench_startup(n: int) -> dict:
    """``farebox --help`` against ``python -c pass`` with the same interpreter (both pay for the
    venv's site-packages)."""
    python = sys.executable
    script = str(Path(python).parent / "farebox")

    def run(argv):
        return lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

    return {"python": _median_us(run([python, "-c", "pass"]), n),
            "help": _median_us(run([script, "--help"]), n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args()
    n = 200 if args.quick else 2000

    decode = bench_decode(n)
    rules = bench_rules(n * 5)
    tap = bench_tap(n // 2)
    sizes = bench_journal_size(100, 1_000 if args.quick else 10_000, n // 4)
    startup = bench_startup(10 if args.quick else 30)
    service = bench_service(50 if args.quick else 300)
    us = lambda s: f"{s * 1e6:9.1f} µs"  # noqa: E731
    u = lambda v: f"{v:9.1f} µs"  # noqa: E731
    print(f"{'measure':<56}{'time':>12}   ratio")
    print(f"{'decode+verify tap blocks (layout from construct)':<56}{us(decode['ours'])}"
          f"   {decode['ours'] / decode['struct_mac']:.2f}x struct+MAC baseline")
    print(f"{'  baseline: hand-written struct + same MACs':<56}{us(decode['struct_mac'])}")
    print(f"{'  baseline: hand-written struct, no MACs':<56}{us(decode['struct_raw'])}"
          f"   ours is {decode['ours'] / decode['struct_raw']:.1f}x")
    print(f"{'decode+verify all 12 data blocks (with log)':<56}{us(decode['ours_full'])}")
    print(f"{'rules decision (decide_payment)':<56}{us(rules)}")
    terminal_cpu = tap["in_field"] - tap["bare_io"]
    print(f"{'in-process payment, in the field, fsync off (median)':<56}{u(tap['in_field'])}"
          f"   {tap['in_field'] / tap['bare_io']:.2f}x bare card I/O")
    print(f"{'  baseline: bare card I/O, the same 6 commands':<56}{u(tap['bare_io'])}")
    print(f"{'  terminal CPU per tap (in the field - bare I/O)':<56}{u(terminal_cpu)}"
          f"   goal <= 250 µs")
    print(f"{'  with the after-tap work (marks, checkpoint)':<56}{u(tap['with_idle'])}"
          f"   terminal CPU {tap['with_idle'] - tap['bare_io']:.0f} µs")
    print(f"{'in-process payment, durable journal (1 fsync in field)':<56}{u(tap['durable'])}"
          f"   {tap['durable'] / tap['sqlite_fsync']:.2f}x one raw insert+fsync")
    print(f"{'  p99 / max in the field':<56}{u(tap['durable_p99'])}   max {tap['durable_max']:.0f} µs")
    print(f"{'  after the card left: marks + checkpoint (median)':<56}{u(tap['idle'])}")
    print(f"{'  baseline: raw SQLite insert + fsync (WAL, FULL)':<56}{u(tap['sqlite_fsync'])}")
    small, large = sorted(sizes)
    print(f"{f'tap+idle after {large:,} taps vs after {small} (same card)':<56}{u(sizes[large])}"
          f"   {sizes[large] / sizes[small]:.2f}x (goal <= 1.1)")
    print(f"{'card commands per payment (poll + 2 reads + 3 writes)':<56}{tap['commands']:>12}")
    print(f"{'card commands per add value':<56}{tap['add_value_commands']:>12}")
    print(f"{'farebox --help':<56}{startup['help'] / 1000:9.1f} ms"
          f"   {startup['help'] / startup['python']:.2f}x python -c pass "
          f"({startup['python'] / 1000:.1f} ms; goal <= 2.0)")
    print(f"{'service return, fresh card, fsync off (median)':<56}{u(service['return'])}"
          f"   {service['return'] / service['pay']:.2f}x a payment")
    print(f"{'service issue onto a blank card (10 card commands)':<56}{u(service['issue'])}"
          f"   {service['issue'] / service['pay']:.2f}x a payment")
    print(f"{'  baseline: payment on a fresh card, fsync off':<56}{u(service['pay'])}")


if __name__ == "__main__":
    main()
