"""NfcpyReader + LiteSSession against bare nfcpy, over nfcpy's udp driver on loopback.

    .venv/bin/python bench/bench_nfcpy.py [-n 200] [--repeats 5] [--no-pmm-timing]

One sequence is a tap's card I/O: poll (``sense``) + 2 reads (4 + 2 blocks) + 3 single-block
writes. "ours" runs it through ``NfcpyReader.wait_for_card`` and a ``LiteSSession`` (frames built
and parsed, errors mapped, timings logged only if DEBUG is on); "bare" sends the same, prebuilt
command frames through ``clf.sense`` and ``clf.exchange`` on the same frontend, in the same run.
Both talk to the same ``UdpCardServer`` (a thread in this process), so the card side's cost is in
both numbers; the ratio shows what our layers add. The card answers each Read and Write after the
response time its PMm declares (``pmm_timing``, a real Lite-S's timing: about 22 ms a tap here),
and, for comparison, at once (a loopback round trip, ~100 µs, which no card answers in).
"""

from __future__ import annotations

import argparse
import time

import nfc.clf

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
from farebox.protocol.sim.nfcpy_card import UdpCardServer
from farebox.protocol.transports.nfcpy_reader import NfcpyReader

IDM = bytes.fromhex("012E4C0A11223344")
READ_BLOCKS = (0, 1, 2, 3, 4, 5)  # two Read Without Encryption commands: 4 + 2 blocks
WRITE_BLOCKS = (6, 7, 8)
MARGIN_S = 0.05  # LiteSSession's default


def _ours(reader: NfcpyReader) -> None:
    polling = reader.wait_for_card(SYSTEM_CODE_LITE_S, 1.0)
    if polling is None:
        raise RuntimeError("no card")
    session = LiteSSession(reader, margin_s=MARGIN_S)
    session.activate(polling)
    session.read_blocks(READ_BLOCKS)
    for number in WRITE_BLOCKS:
        session.write_block(number, bytes([number]) * 16)


def _bare_frames(idm: bytes, pmm: bytes) -> list[tuple[bytearray, float]]:
    """The five command frames of a sequence, with the timeouts LiteSSession would use."""
    frames = []
    for chunk in (READ_BLOCKS[:4], READ_BLOCKS[4:]):
        command = ReadWithoutEncryption(
            idm, (SERVICE_LITE_S_RO,), tuple(BlockListElement(n) for n in chunk)
        )
        timeout_s = response_timeout_s(pmm[PMM_READ_INDEX], len(chunk)) + MARGIN_S
        frames.append((bytearray(command.to_frame()), timeout_s))
    for number in WRITE_BLOCKS:
        command = WriteWithoutEncryption(
            idm, (SERVICE_LITE_S_RW,), (BlockListElement(number),), (bytes([number]) * 16,)
        )
        timeout_s = response_timeout_s(pmm[PMM_WRITE_INDEX], 1) + MARGIN_S
        frames.append((bytearray(command.to_frame()), timeout_s))
    return frames


def bench_nfcpy(n: int = 200, repeats: int = 5, *, pmm_timing: bool = True
                ) -> tuple[float, float]:
    """Seconds per sequence (best of ``repeats`` runs of ``n``): (ours, bare). Prints both and
    the ratio."""
    card = SimulatedLiteS(IDM)
    target = nfc.clf.RemoteTarget(
        "212F", sensf_req=bytearray(Polling(SYSTEM_CODE_LITE_S).to_frame()[1:])
    )
    frames = _bare_frames(card.idm, card.pmm)

    with UdpCardServer(card, "udp:127.0.0.1:0", pmm_timing=pmm_timing) as server:
        server.serve_in_background()
        with NfcpyReader(server.path) as reader:
            clf = reader.frontend

            def bare() -> None:
                if clf.sense(target, iterations=1) is None:
                    raise RuntimeError("no card")
                for frame, timeout_s in frames:
                    clf.exchange(frame, timeout_s)

            def ours() -> None:
                _ours(reader)

            best = {"ours": float("inf"), "bare": float("inf")}
            ours(), bare()  # warm up both paths
            for _ in range(repeats):
                for name, sequence in (("ours", ours), ("bare", bare)):
                    started = time.perf_counter()
                    for _ in range(n):
                        sequence()
                    best[name] = min(best[name], (time.perf_counter() - started) / n)
    ours_s, bare_s = best["ours"], best["bare"]
    timing = "the card's PMm timing" if pmm_timing else "answers at once"
    goal = "   (goal <= 1.10)" if pmm_timing else ""
    print(
        f"nfcpy udp, poll + 2 reads (4+2 blocks) + 3 writes, {timing}, best of {repeats} x {n}:\n"
        f"  NfcpyReader + LiteSSession  {ours_s * 1e3:8.3f} ms/sequence\n"
        f"  bare clf.sense/exchange     {bare_s * 1e3:8.3f} ms/sequence\n"
        f"  ratio                       {ours_s / bare_s:8.2f}x{goal}"
    )
    return ours_s, bare_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="sequences per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best counts")
    parser.add_argument("--no-pmm-timing", action="store_true",
                        help="only the card answering at once (no PMm response times)")
    args = parser.parse_args()
    if not args.no_pmm_timing:
        bench_nfcpy(max(args.n // 5, 10), args.repeats, pmm_timing=True)
    bench_nfcpy(args.n, args.repeats, pmm_timing=False)


if __name__ == "__main__":
    main()
