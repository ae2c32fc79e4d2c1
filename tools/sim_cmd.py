"""``farebox sim serve``: present a simulated card file to a reader over a real stack."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from farebox.protocol.sim.serve import ServeOptions, run_private_pcscd, serve_card


@click.group()
def sim() -> None:
    """Serve simulated cards to readers."""


@sim.command("serve")
@click.argument("card_file", metavar="CARD", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--via", required=True, metavar="udp:HOST:PORT|vpcd:HOST:PORT",
              help="nfcpy's UDP link, or a pcscd's vpcd driver (loopback only)")
@click.option("--taps", type=click.IntRange(min=1), help="exit after N presentations")
@click.option("--leave-after", type=click.IntRange(min=0), metavar="N",
              help="first presentation: the card leaves the field after N card commands")
@click.option("--torn-write", type=click.IntRange(min=1), metavar="N",
              help="first presentation: the Nth block write lands torn")
@click.option("--delay-ms", type=click.IntRange(min=0, max=10_000), default=0,
              help="every answer this late")
@click.option("--dwell-ms", type=click.IntRange(min=1, max=60_000),
              help="how long each presentation holds the card in the field "
                   "[default: udp 400, vpcd 1500]")
@click.option("--away-ms", type=click.IntRange(min=0, max=60_000),
              help="how long the card is away between presentations "
                   "[default: udp 300, vpcd 600]")
def serve(card_file, via, taps, leave_after, torn_write, delay_ms, dwell_ms, away_ms) -> None:
    """Present the card in CARD to a reader; one JSON line per presentation on stdout.

    The card file is locked while served and saved after every landed write."""
    stop = False

    def request_stop(*_args) -> None:
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    options = ServeOptions(taps=taps, leave_after=leave_after, torn_write=torn_write,
                           delay_ms=delay_ms, dwell_ms=dwell_ms, away_ms=away_ms)
    try:
        serve_card(card_file, via, options,
                   on_ready=lambda address: click.echo(json.dumps({"serving": address}),
                                                       err=True),
                   on_presentation=lambda r: click.echo(json.dumps(r.__dict__)),
                   stop_flag=lambda: stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@sim.command("pcscd")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="where its socket, config and log go [default: a new temporary directory]")
@click.option("--port", type=click.IntRange(min=1, max=65534),
              help="vpcd's TCP port [default: a free one]")
def pcscd(directory, port) -> None:
    """Run a pcscd of our own with only vsmartcard's vpcd reader (needs root).

    Prints one JSON line on stdout when ready: its socket (set PCSCLITE_CSOCK_NAME to it for
    `farebox run --reader pcsc`), vpcd's port (for `sim serve --via vpcd:127.0.0.1:PORT`) and the
    reader's name. Runs until SIGTERM/SIGINT."""
    import tempfile

    stop = False

    def request_stop(*_args) -> None:
        nonlocal stop
        stop = True

    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="farebox-pcscd-"))
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = run_private_pcscd(
            directory, port,
            on_ready=lambda info: click.echo(json.dumps(
                {**info.__dict__, "env": f"PCSCLITE_CSOCK_NAME={info.socket}"}), nl=True),
            stop_flag=lambda: stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status:
        raise click.exceptions.Exit(1)
