"""The terminal daemon: card removal to ready for the next card, and the daemon's peak memory.

    .venv/bin/python bench/bench_daemon.py [-n 20] [--pcsc]

removal to ready (in this process, one monotonic clock): a ``Daemon`` on an ``NfcpyReader``
over nfcpy's udp link, the card a ``UdpCardServer`` thread that leaves the field ``dwell`` after
each tap. For every presentation: *left* is when the card side took the card away, *seen* when
the daemon's ``wait_for_removal`` reported it gone, *ready* when the daemon, its after-tap work
done (durable commit mark, WAL checkpoint), waits for the next card. Goal: left -> ready <= 100 ms.
The ratio ready/seen is what the daemon adds to the reader's own removal detection.
With ``--pcsc`` the same over a private pcscd + vpcd (root; pcscd checks a vpcd slot every 0.4 s,
so detection there is bounded by pcscd, not by us).

peak RSS: ``farebox run --reader udp:...`` as a child process serving ``-n`` taps from
``farebox sim serve`` (both real processes), its ``VmHWM``; baseline: a bare
``python -c "import nfc"`` measured the same way in the same run. Goal: <= 50 MB. Run with
``-n`` 10 and 40 to see whether it grows per tap; and once more with ``--log-format json
--metrics 127.0.0.1:0`` (prometheus-client and its HTTP thread loaded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.nfcpy_card import UdpCardServer
from farebox.terminal.daemon.events import TapEvent
from farebox.terminal.daemon.loop import Daemon
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Tariff
from farebox.terminal.runtime import open_transport
from farebox.terminal.card.tap import Terminal

KEYS = published_test_keys()
BIN = Path(sys.executable).parent
MB = 1024 * 1024


def new_card(balance_cents: int = 50_000) -> SimulatedLiteS:
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=12345678,
                                      balance_cents=balance_cents), KEYS, new_idm())
    return SimulatedLiteS(new_idm(), blocks=blocks)


class Timed:
    """A reader proxy stamping when ``wait_for_removal`` first reports the card gone."""

    def __init__(self, reader, seen: list[float]) -> None:
        self._reader = reader
        self._seen = seen

    def wait_for_removal(self, timeout_s: float) -> bool:
        gone = self._reader.wait_for_removal(timeout_s)
        if gone:
            self._seen.append(time.monotonic())
        return gone

    def __getattr__(self, name):
        return getattr(self._reader, name)


def removal_to_ready(reader_factory, serve, n: int, folder: Path) -> dict[str, list[float]]:
    """Run a Daemon for ``n`` taps; per presentation the ms from left to seen and to ready."""
    left: list[float] = []
    seen: list[float] = []
    ready: list[float] = []
    taps = [0]

    def on_event(event) -> None:
        if isinstance(event, TapEvent):  # not the reader's up and down
            taps[0] += 1

    def on_idle() -> None:
        if len(ready) < taps[0]:  # the first idle after a tap: the card has left, work done
            ready.append(time.monotonic())

    stopper = serve(lambda presentation: left.append(time.monotonic()))
    try:
        with Journal(folder / "journal.sqlite3") as journal:
            daemon = Daemon(Terminal(journal, KEYS), lambda: Timed(reader_factory(), seen),
                            Tariff.flat(100), on_event=on_event, on_idle=on_idle,
                            max_taps=n + 1)
            daemon.run()  # stops after the (n+1)th tap: the first n all had a removal
    finally:
        stopper()
    count = min(len(left), len(seen), len(ready), n)
    return {"seen": [(seen[i] - left[i]) * 1000 for i in range(count)],
            "ready": [(ready[i] - left[i]) * 1000 for i in range(count)]}


def udp_removal(n: int, folder: Path) -> dict[str, list[float]]:
    server = UdpCardServer(new_card(), "udp:127.0.0.1:0", dwell_s=0.15, away_s=0.3,
                           idle_timeout_s=10.0)

    def serve(on_presentation):
        def next_dwell(presentation) -> None:
            on_presentation(presentation)
            # the reader checks presence on a fixed 50 ms beat: vary when the card leaves
            # against it (0-48 ms later), as a hand would, instead of measuring one phase
            server.dwell_s = 0.15 + (presentation.number * 0.0137) % 0.049

        server.serve_in_background(n + 1, on_presentation=next_dwell)
        return server.close

    return removal_to_ready(lambda: open_transport(server.path), serve, n, folder)


def pcsc_removal(n: int, folder: Path) -> dict[str, list[float]]:
    from farebox.protocol.sim.vpcd_card import PrivatePcscd, VpcdCard

    daemon = PrivatePcscd(folder / "pcscd")
    daemon.start()
    os.environ.update(daemon.client_env())
    vpcd = VpcdCard(new_card(), daemon.port, "127.0.0.1", connect_timeout_s=10.0)

    def serve(on_presentation):
        vpcd.serve_in_background(n + 1, on_presentation=on_presentation, duration_s=1.0,
                                 away_s=0.6)

        def stop():
            vpcd.close()
            daemon.stop()
        return stop

    return removal_to_ready(lambda: open_transport(f"pcsc:{daemon.reader_name}"), serve, n,
                            folder)


def peak_rss(argv: list[str], **popen) -> tuple[int, int]:
    """``(exit status, peak RSS in bytes)`` of a child process: its ``VmHWM``, read from /proc
    every 10 ms until it exits. (``wait4``'s ``ru_maxrss`` would not do: exec keeps the
    high-water mark of the forking parent, this process, in it.)"""
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    status_file = Path(f"/proc/{child.pid}/status")
    peak = 0
    while child.poll() is None:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return child.returncode, peak


def daemon_rss(taps: int, folder: Path, *options: str, tag: str = "") -> int:
    farebox = str(BIN / "farebox")
    card = folder / f"rss-{taps}{tag}.json"
    subprocess.run([farebox, "card", "new", str(card), "--balance", "500.00"], check=True,
                   capture_output=True)
    server = subprocess.Popen([farebox, "sim", "serve", str(card), "--via", "udp:127.0.0.1:0",
                               "--taps", str(taps), "--dwell-ms", "150", "--away-ms", "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import json

        first = json.loads(server.stderr.readline())  # {"serving": "udp:127.0.0.1:PORT"}
        status, rss = peak_rss([farebox, "run", "--reader", first["serving"], "--fare", "1.00",
                                "--max-taps", str(taps), "--state",
                                str(folder / f"st{taps}{tag}"), "--json", *options])
        if status != 0:
            raise RuntimeError(f"farebox run exited {status}")
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()
    return rss


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(values):6.1f} ms  p90 {p90:6.1f}  max {max(values):6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="taps per measurement")
    parser.add_argument("--pcsc", action="store_true", help="also over pcscd + vpcd (root)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        folder = Path(tmp)
        runs = [("nfcpy udp", udp_removal)]
        if args.pcsc:
            runs.append(("pcscd + vpcd", pcsc_removal))
        for name, measure in runs:
            sub = folder / name.split()[0]
            sub.mkdir()
            result = measure(args.n, sub)
            seen, ready = result["seen"], result["ready"]
            ratio = statistics.median(ready) / statistics.median(seen)
            print(f"removal to ready, {name} ({len(ready)} taps)")
            print(f"  card left -> reader saw it gone   {_ms(seen)}")
            print(f"  card left -> daemon ready         {_ms(ready)}   goal <= 100 ms")
            print(f"  ready / seen (what the daemon adds) {ratio:.2f}x")
        _, bare = peak_rss([sys.executable, "-c", "import nfc, time; time.sleep(0.3)"])
        small, large = max(2, args.n // 2), args.n * 2
        rss = {taps: daemon_rss(taps, folder) for taps in (small, large)}
        print(f"peak RSS, baseline python -c 'import nfc'  {bare / MB:6.1f} MB")
        for taps, value in rss.items():
            print(f"peak RSS, farebox run, {taps:3d} taps over udp    {value / MB:6.1f} MB"
                  f"   {value / bare:.2f}x baseline   goal <= 50 MB")
        print(f"  growth {small} -> {large} taps: {(rss[large] - rss[small]) / 1024:+.0f} KiB")
        ops = daemon_rss(large, folder, "--log-format", "json", "--metrics", "127.0.0.1:0",
                         tag="-ops")
        print(f"peak RSS, farebox run, {large:3d} taps, JSON logs + metrics endpoint "
              f"{ops / MB:6.1f} MB   {(ops - rss[large]) / MB:+.1f} MB   goal <= 50 MB")


if __name__ == "__main__":
    main()
