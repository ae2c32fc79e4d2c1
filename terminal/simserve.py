"""Serving a simulated card file to a reader over a real stack: nfcpy's UDP link
(``udp:HOST:PORT``, the card side of nfcpy's own udp driver) or a real pcscd through vsmartcard's
vpcd driver (``vpcd:HOST:PORT``, our own vpcd client). The card file stays locked while it is
served and is saved after every block write that lands and after every presentation.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from farebox.protocol.simcard import CardFileError, Faults
from farebox.protocol.transports.cardfile import CardFile

from .runtime import RuntimeSetupError

VIA_KINDS = ("udp", "vpcd")


@dataclass(frozen=True)
class ServeOptions:
    taps: int | None = None  # presentations to serve (None: until stopped)
    leave_after: int | None = None  # the first presentation: the card leaves after N commands
    torn_write: int | None = None  # the first presentation: the Nth block write tears
    delay_ms: int = 0  # every answer this late
    dwell_ms: int = 400  # how long a presentation holds the card in the field
    away_ms: int = 300  # how long the card stays away before it can be presented again


@dataclass(frozen=True)
class PresentationReport:
    number: int
    commands: int
    ended_by: str
    duration_ms: float


def parse_via(via: str) -> tuple[str, str, int]:
    kind, _, rest = via.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in VIA_KINDS or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise RuntimeSetupError(f"--via {via!r}: expected udp:HOST:PORT or vpcd:HOST:PORT")
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise RuntimeSetupError(f"--via {via!r}: a simulated card is served on a loopback "
                                    "address only (127.0.0.1)")
    except ValueError:
        if host != "localhost":
            raise RuntimeSetupError(f"--via {via!r}: HOST must be a loopback address") from None
    return kind, host, int(port)


def _faults(options: ServeOptions, number: int) -> Faults:
    first = number == 1
    return Faults(leave_after_commands=options.leave_after if first else None,
                  tear_write_number=options.torn_write if first else None,
                  latency_s=options.delay_ms / 1000)


def serve_card(path: str | os.PathLike[str], via: str, options: ServeOptions,
               on_ready: Callable[[str], None] = lambda address: None,
               on_presentation: Callable[[PresentationReport], None] = lambda report: None,
               stop_flag: Callable[[], bool] | None = None) -> int:
    """Serve the card in ``path`` until ``options.taps`` presentations or a stop; return how many.
    ``on_ready`` gets the address actually served (a port 0 picks a free one)."""
    kind, host, port = parse_via(via)
    try:
        card_file = CardFile(Path(path))
    except CardFileError as error:
        raise RuntimeSetupError(str(error)) from None
    try:
        card = card_file.card
        card.on_write = lambda c: card_file.save()
        if kind == "udp":
            from farebox.protocol.transports.nfcpy_card import UdpCardServer

            server = UdpCardServer(card, f"udp:{host}:{port}", dwell_s=options.dwell_ms / 1000,
                                   away_s=options.away_ms / 1000, idle_timeout_s=10.0)
        else:
            from farebox.protocol.transports.vpcd_card import VpcdCardClient

            server = VpcdCardClient(card, host, port, dwell_s=options.dwell_ms / 1000,
                                    away_s=options.away_ms / 1000)
        return _run(server, card_file, options, on_ready, on_presentation, stop_flag)
    finally:
        card_file.close()


def _run(server, card_file: CardFile, options: ServeOptions, on_ready, on_presentation,
         stop_flag) -> int:
    import threading

    with server:
        on_ready(server.path)
        watcher = None
        if stop_flag is not None:
            done = threading.Event()

            def watch() -> None:
                while not done.wait(0.05):
                    if stop_flag():
                        server.stop()
                        return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()

        def after(presentation) -> None:
            card_file.save()
            on_presentation(PresentationReport(
                presentation.number, presentation.commands, presentation.ended_by.value,
                round(presentation.duration_s * 1000, 1)))

        try:
            return server.serve(options.taps, faults=lambda n: _faults(options, n),
                                on_presentation=after)
        finally:
            if watcher is not None:
                done.set()
