"""PcscReader + LiteSSession against bare pyscard, through a real pcscd + vpcd, in the same run.

    .venv/bin/python bench/bench_pcsc.py [-n 200] [--repeats 5] [--mode part3|acr122u|both]

Starts a private pcscd (its own socket and config, vpcd on a free port; needs pcscd and
vsmartcard-vpcd installed, and root unless /run/pcscd exists) and presents a SimulatedLiteS
through VpcdCard on a thread of this process, so the card side's cost is in both numbers.

One sequence is a tap's card I/O: poll + 2 reads (4 + 2 blocks) + 3 single-block writes.

* frames: "ours" sends the six frames through ``LiteSSession`` over ``PcscReader.exchange``
  (pseudo-APDUs built and parsed, errors mapped, DEBUG logging checked but off); "bare" sends
  the same six pseudo-APDUs, prebuilt, through pyscard's ``connection.transmit``.
* tap: the same plus finding the card: "ours" is ``wait_for_card`` (status, connect, GET DATA,
  transparent session, the poll) and the five commands; "bare" connects, sends GET DATA, the
  session APDUs and the six frames, and disconnects.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

from farebox.protocol.frames import (
    SERVICE_LITE_S_RO,
    SERVICE_LITE_S_RW,
    SYSTEM_CODE_LITE_S,
    BlockListElement,
    Polling,
    ReadWithoutEncryption,
    WriteWithoutEncryption,
)
from farebox.protocol.session import (
    PMM_READ_INDEX,
    PMM_WRITE_INDEX,
    LiteSSession,
    response_timeout_s,
)
from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.vpcd_card import PcscdError, PrivatePcscd, VpcdCard

IDM = bytes.fromhex("012E4C0A11223344")
READ_BLOCKS = (0, 1, 2, 3, 4, 5)  # two Read Without Encryption commands: 4 + 2 blocks
WRITE_BLOCKS = (6, 7, 8)
MARGIN_S = 0.05  # LiteSSession's default
POLL_TIMEOUT_S = 0.02


def _frames(idm: bytes, pmm: bytes) -> list[tuple[bytes, float]]:
    """The six command frames of a sequence, with the timeouts LiteSSession would use."""
    frames = [(Polling(SYSTEM_CODE_LITE_S).to_frame(), POLL_TIMEOUT_S)]
    for chunk in (READ_BLOCKS[:4], READ_BLOCKS[4:]):
        command = ReadWithoutEncryption(
            idm, (SERVICE_LITE_S_RO,), tuple(BlockListElement(n) for n in chunk)
        )
        frames.append(
            (command.to_frame(), response_timeout_s(pmm[PMM_READ_INDEX], len(chunk)) + MARGIN_S)
        )
    for number in WRITE_BLOCKS:
        command = WriteWithoutEncryption(
            idm, (SERVICE_LITE_S_RW,), (BlockListElement(number),), (bytes([number]) * 16,)
        )
        frames.append((command.to_frame(), response_timeout_s(pmm[PMM_WRITE_INDEX], 1) + MARGIN_S))
    return frames


def _best(runs: dict[str, Callable[[], None]], n: int, repeats: int) -> dict[str, float]:
    """Seconds per call, best of ``repeats`` runs of ``n``, the paths taking turns."""
    best = dict.fromkeys(runs, float("inf"))
    for run in runs.values():
        run()  # warm up
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(n):
                run()
            best[name] = min(best[name], (time.perf_counter() - started) / n)
    return best


def bench_mode(reader_name: str, card: SimulatedLiteS, mode, n: int, repeats: int) -> dict:
    from smartcard.System import readers

    from farebox.protocol.transports.pcsc import (
        END_TRANSPARENT_SESSION_APDU,
        GET_IDM_APDU,
        START_TRANSPARENT_SESSION_APDU,
        SWITCH_PROTOCOL_FELICA_APDU,
        ExchangeMode,
        PcscReader,
        direct_transmit_apdu,
        transparent_exchange_apdu,
    )

    transparent = mode is ExchangeMode.TRANSPARENT
    wrap = transparent_exchange_apdu if transparent else direct_transmit_apdu
    apdus = [
        list(wrap(frame, timeout_s) if transparent else wrap(frame))
        for frame, timeout_s in _frames(card.idm, card.pmm)
    ]
    session_apdus = (
        [list(START_TRANSPARENT_SESSION_APDU), list(SWITCH_PROTOCOL_FELICA_APDU)]
        if transparent
        else []
    )
    end_apdus = [list(END_TRANSPARENT_SESSION_APDU)] if transparent else []
    pcsc_reader = next(r for r in readers() if str(r) == reader_name)

    reader = PcscReader(f"pcsc:{reader_name}", mode)
    polling = reader.wait_for_card(SYSTEM_CODE_LITE_S, 5.0)
    if polling is None:
        raise RuntimeError("no card in the vpcd reader")

    def ours_frames() -> None:
        session = LiteSSession(reader, margin_s=MARGIN_S)
        session.poll(timeout_s=POLL_TIMEOUT_S)
        session.read_blocks(READ_BLOCKS)
        for number in WRITE_BLOCKS:
            session.write_block(number, bytes([number]) * 16)

    def ours_tap() -> None:
        found = reader.wait_for_card(SYSTEM_CODE_LITE_S, 1.0)
        if found is None:
            raise RuntimeError("no card")
        session = LiteSSession(reader, margin_s=MARGIN_S)
        session.activate(found)
        session.read_blocks(READ_BLOCKS)
        for number in WRITE_BLOCKS:
            session.write_block(number, bytes([number]) * 16)

    connection = pcsc_reader.createConnection()
    connection.connect()
    for apdu in session_apdus:
        connection.transmit(apdu)

    def bare_frames() -> None:
        for apdu in apdus:
            _, sw1, _ = connection.transmit(apdu)
            if sw1 != 0x90:
                raise RuntimeError("transmit failed")

    def bare_tap() -> None:
        tap_connection = pcsc_reader.createConnection()
        tap_connection.connect()
        for apdu in [list(GET_IDM_APDU), *session_apdus, *apdus, *end_apdus]:
            _, sw1, _ = tap_connection.transmit(apdu)
            if sw1 != 0x90:
                raise RuntimeError("transmit failed")
        tap_connection.disconnect()

    try:
        frames = _best({"ours": ours_frames, "bare": bare_frames}, n, repeats)
        for apdu in end_apdus:
            connection.transmit(apdu)
        taps = _best({"ours": ours_tap, "bare": bare_tap}, max(n // 4, 10), repeats)
    finally:
        connection.disconnect()
        reader.close()
    return {"frames": frames, "tap": taps}


def bench_pcsc(n: int = 200, repeats: int = 5, modes: str = "both") -> dict:
    from farebox.protocol.transports.pcsc import ExchangeMode

    chosen = list(ExchangeMode) if modes == "both" else [ExchangeMode(modes)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="farebox-bench-pcscd-") as directory:
        pcscd = PrivatePcscd(directory)
        os.environ.update(pcscd.client_env())  # before pyscard's first call
        try:
            pcscd.start()
        except PcscdError as error:
            sys.exit(f"bench_pcsc: {error}")
        try:
            card = SimulatedLiteS(IDM)
            with VpcdCard(card, pcscd.port) as vpcd:
                vpcd.serve_in_background(1)
                for mode in chosen:
                    results[mode.value] = bench_mode(pcscd.reader_name, card, mode, n, repeats)
        finally:
            pcscd.stop()
    for mode, result in results.items():
        print(f"pcscd + vpcd, {mode}, best of {repeats}:")
        for what, label in (
            ("frames", "poll + 2 reads (4+2) + 3 writes"),
            ("tap", "the same with wait_for_card / connect"),
        ):
            ours_s, bare_s = result[what]["ours"], result[what]["bare"]
            print(
                f"  {label}\n"
                f"    PcscReader + LiteSSession  {ours_s * 1e3:8.3f} ms/sequence\n"
                f"    bare connection.transmit   {bare_s * 1e3:8.3f} ms/sequence\n"
                f"    ratio                      {ours_s / bare_s:8.2f}x"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="sequences per run (taps: n / 4)")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best counts")
    parser.add_argument("--mode", choices=["both", "part3", "acr122u"], default="both")
    args = parser.parse_args()
    bench_pcsc(args.n, args.repeats, args.mode)


if __name__ == "__main__":
    main()
