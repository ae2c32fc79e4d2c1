"""``farebox run``: the terminal daemon on a reader. The daemon itself is
:func:`farebox.terminal.daemon.run.run`; this command parses the options, calls it once and
prints its events."""

from __future__ import annotations

import click

from farebox.terminal.config import MetricsError, parse_listen
from farebox.terminal.core.rules import Tariff
from farebox.terminal.daemon.events import DaemonEvent, MetricsServing, Started, TapEvent
from farebox.terminal.daemon.run import run as run_daemon
from farebox.terminal.runtime import ReaderSpec, RuntimeSetupError

from farebox.tools import output
from farebox.tools.common import (
    InputError, config_option, json_option, say_made_states, settings, state_option,
)
from farebox.tools.params import FARES, POSITIVE_AMOUNT


@click.command()
@click.option("--reader", "reader_spec", metavar="SPEC",
              help="udp:HOST:PORT | usb[:VID:PID] | tty:PORT:DRIVER | pcsc[:NAME] | sim:CARD.json")
@click.option("--pcsc-mode", type=click.Choice(["auto", "acr122u", "part3"]),
              help="how a PC/SC reader carries FeliCa frames (default auto: by name and ATR)")
@click.option("--fare", type=POSITIVE_AMOUNT, help="flat fare for every class")
@click.option("--fares", type=FARES, help="adult=A,child=C,elder=E,student=S,disability=D")
@config_option
@state_option
@click.option("--hotlist", type=click.Path(dir_okay=False), help="action list JSON")
@click.option("--max-taps", type=click.IntRange(min=1), help="stop after N taps")
@click.option("-v", "--verbose", count=True, help="-v: log on stderr; -vv: every frame too")
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="json: one JSON event per line on stdout (taps, reader up/down, start/stop, "
              "log messages), for journald [config log_format; default text]")
@click.option("--metrics", "metrics_listen", metavar="HOST:PORT",
              help="serve Prometheus metrics there (loopback unless the config says "
              "metrics_allow_remote = true; port 0: a free port) "
              "[config metrics_listen; default: none]")
@json_option
def run(reader_spec, pcsc_mode, fare, fares, config_file, state_dir, hotlist, max_taps, verbose,
        log_format, metrics_listen, as_json) -> None:
    """Wait for cards and charge each presentation once (SIGTERM/SIGINT stop it cleanly).

    Under systemd (Type=notify) it says READY=1 once the reader answers, WATCHDOG=1 while the
    loop runs, STATUS= lines and STOPPING=1."""
    if fare is not None and fares is not None:
        raise click.UsageError("give at most one of --fare and --fares")
    if metrics_listen is not None:
        try:
            parse_listen(metrics_listen, allow_remote=True)  # the syntax, before the file
        except MetricsError as error:
            raise InputError(f"--metrics: {error}") from None
    config = settings(config_file, state_dir=state_dir, reader=reader_spec, action_list=hotlist,
                      pcsc_mode=pcsc_mode, log_format=log_format, metrics_listen=metrics_listen,
                      tariff=fares if fares is not None else fare and Tariff.flat(fare))
    if metrics_listen is not None:  # beyond loopback only where the configuration allows it
        try:
            parse_listen(metrics_listen, allow_remote=config.metrics_allow_remote)
        except MetricsError as error:
            raise InputError(f"--metrics: {error}") from None
    if config.reader is None:
        raise click.UsageError("give --reader SPEC (or reader in --config)")
    if config.tariff is None:
        raise click.UsageError("give --fare or --fares (or [fares] in --config)")
    try:
        spec = ReaderSpec.parse(config.reader)
    except RuntimeSetupError as error:
        raise InputError(str(error)) from None
    json_log = config.log_format == "json"

    def show(event: DaemonEvent) -> None:
        if isinstance(event, Started):
            say_made_states()  # now, not when the daemon stops
        if json_log:  # the JSON log on stdout carries every event
            return
        if isinstance(event, MetricsServing):
            click.echo(f"farebox: metrics on {event.url}", err=True)
        elif isinstance(event, TapEvent):
            output.emit(event.fields(), as_json, f"{event.summary()}  ({event.tap_ms:.0f} ms)")

    try:
        stats = run_daemon(config, spec, show, max_taps=max_taps, verbose=verbose)
    except (RuntimeSetupError, MetricsError) as error:
        raise InputError(str(error)) from None
    if not as_json and not json_log:
        click.echo(f"farebox: stopped after {stats.taps} taps", err=True)
