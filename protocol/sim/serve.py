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

from farebox.protocol.errors import TransportError
from farebox.protocol.sim.card import CardFileError, Faults
from farebox.protocol.sim.cardfile import CardFile


VIA_KINDS = ("udp", "vpcd")


class ServeError(ValueError):
    """What was asked cannot be served (a bad --via, an unusable card file, a pcscd that does not
    start); the message is one line naming it."""


@dataclass(frozen=True)
class ServeOptions:
    taps: int | None = None  # presentations to serve (None: until stopped)
    leave_after: int | None = None  # the first presentation: the card leaves after N commands
    torn_write: int | None = None  # the first presentation: the Nth block write tears
    delay_ms: int = 0  # every answer this late
    dwell_ms: int | None = None  # how long a presentation holds the card (None: the link's default)
    away_ms: int | None = None  # how long the card stays away between presentations (likewise)


#: (dwell_ms, away_ms) per link when not given. pcscd looks at a vpcd slot every 0.4 s, so a
#: presentation there must last longer for pcscd to see it and the card must stay away longer
#: for pcscd to see it leave.
DEFAULT_TIMING_MS = {"udp": (400, 300), "vpcd": (1500, 600)}


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
        raise ServeError(f"--via {via!r}: expected udp:HOST:PORT or vpcd:HOST:PORT")
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise ServeError(f"--via {via!r}: a simulated card is served on a loopback "
                                    "address only (127.0.0.1)")
    except ValueError:
        if host != "localhost":
            raise ServeError(f"--via {via!r}: HOST must be a loopback address") from None
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
    default_dwell_ms, default_away_ms = DEFAULT_TIMING_MS[kind]
    dwell_s = (options.dwell_ms if options.dwell_ms is not None else default_dwell_ms) / 1000
    away_s = (options.away_ms if options.away_ms is not None else default_away_ms) / 1000
    try:
        card_file = CardFile(Path(path))
    except CardFileError as error:
        raise ServeError(str(error)) from None
    try:
        card = card_file.card
        card.on_write = lambda c: card_file.save()
        if kind == "udp":
            from farebox.protocol.sim.nfcpy_card import UdpCardServer

            try:
                server = UdpCardServer(card, f"udp:{host}:{port}", dwell_s=dwell_s,
                                       away_s=away_s, idle_timeout_s=10.0)
            except TransportError as error:
                raise ServeError(f"--via {via}: {error}") from None
        else:
            server = _VpcdServer(card, host, port, dwell_s, away_s)
        try:
            return _run(server, card_file, options, on_ready, on_presentation, stop_flag)
        except ConnectionError as error:  # nothing listens where vpcd should
            raise ServeError(f"--via {via}: {error}") from None
    finally:
        card_file.close()


class _VpcdServer:
    """A :class:`VpcdCard` with the serving interface of ``UdpCardServer``: every presentation is
    one connection to vpcd lasting ``dwell_s``, then ``away_s`` out of the field."""

    def __init__(self, card, host: str, port: int, dwell_s: float, away_s: float) -> None:
        from farebox.protocol.sim.vpcd_card import VpcdCard

        self.vpcd = VpcdCard(card, port, host, connect_timeout_s=10.0)
        self.path = f"vpcd:{host}:{port}"
        self.dwell_s = dwell_s
        self.away_s = away_s

    def __enter__(self) -> _VpcdServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.vpcd.close()

    def stop(self) -> None:
        self.vpcd.stop()

    def serve(self, taps: int | None, *, faults, on_presentation) -> int:
        return self.vpcd.serve(taps, faults=faults, on_presentation=on_presentation,
                               duration_s=self.dwell_s, away_s=self.away_s)


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


@dataclass(frozen=True)
class PcscdInfo:
    """Where a private pcscd answers: clients set ``PCSCLITE_CSOCK_NAME`` to ``socket``; a
    simulated card is served with ``--via vpcd:127.0.0.1:PORT``; the reader is ``pcsc:READER``."""

    socket: str
    port: int
    reader: str
    log: str
    pid: int


def run_private_pcscd(directory: str | os.PathLike[str], port: int | None,
                      on_ready: Callable[[PcscdInfo], None],
                      stop_flag: Callable[[], bool]) -> int:
    """Run pcscd in the foreground with a config dir holding only a vpcd entry and a socket of
    its own in ``directory``, until ``stop_flag()`` or until pcscd exits; return pcscd's exit
    status (0 when we stopped it)."""
    import time

    from farebox.protocol.sim.vpcd_card import PcscdError, PrivatePcscd

    if len(str(Path(directory).resolve() / "pcscd.comm")) >= 100:
        raise ServeError(f"--dir {directory}: too long a path for a unix socket")
    daemon = PrivatePcscd(directory, port=port)
    try:
        daemon.start()
    except (PcscdError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ServeError(f"pcscd did not start: {first_line} (log: {daemon.log_path})"
                                ) from None
    try:
        assert daemon.process is not None
        on_ready(PcscdInfo(str(daemon.socket_path), daemon.port, daemon.reader_name,
                           str(daemon.log_path), daemon.process.pid))
        while daemon.running and not stop_flag():
            time.sleep(0.05)
        exited = daemon.process.returncode if not daemon.running else None
    finally:
        status = daemon.stop()
    return exited if exited is not None else (0 if status in (0, -15) else status or 0)
