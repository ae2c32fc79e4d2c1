"""``farebox run``: the terminal daemon on a reader."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

import click

from farebox.terminal.core.clock import now_utc
from farebox.terminal.daemon.loop import Daemon, TapEvent
from farebox.terminal.daemon.jsonlog import JsonFormatter
from farebox.terminal.daemon.sdnotify import Notifier
from farebox.terminal.daemon.supervise import Supervision
from farebox.terminal.daemon.background import ActionListReloader, batch_closer, start_uploader
from farebox.terminal.runtime import ReaderSpec, RuntimeSetupError, open_transport

from farebox.tools import output
from farebox.tools.common import InputError, config_option, json_option, settings, state_option, terminal
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
              help="serve Prometheus metrics there (loopback only; port 0: a free port) "
              "[config metrics_listen; default: none]")
@json_option
def run(reader_spec, pcsc_mode, fare, fares, config_file, state_dir, hotlist, max_taps, verbose,
        log_format, metrics_listen, as_json) -> None:
    """Wait for cards and charge each presentation once (SIGTERM/SIGINT stop it cleanly).

    Under systemd (Type=notify) it says READY=1 once the reader answers, WATCHDOG=1 while the
    loop runs, STATUS= lines and STOPPING=1."""
    if fare is not None and fares is not None:
        raise click.UsageError("give at most one of --fare and --fares")
    from farebox.terminal.config import MetricsError, parse_listen
    from farebox.terminal.core.rules import Tariff

    if metrics_listen is not None:
        try:
            parse_listen(metrics_listen)
        except MetricsError as error:
            raise InputError(f"--metrics: {error}") from None
    config = settings(config_file, state_dir=state_dir, reader=reader_spec, action_list=hotlist,
                      pcsc_mode=pcsc_mode, log_format=log_format, metrics_listen=metrics_listen,
                      tariff=fares if fares is not None else fare and Tariff.flat(fare))
    if config.reader is None:
        raise click.UsageError("give --reader SPEC (or reader in --config)")
    if config.tariff is None:
        raise click.UsageError("give --fare or --fares (or [fares] in --config)")
    try:
        spec = ReaderSpec.parse(config.reader)
    except RuntimeSetupError as error:
        raise InputError(str(error)) from None
    json_log = config.log_format == "json"
    if json_log:  # journald takes stdout; every line one JSON object
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(handlers=[handler],
                            level=logging.INFO if verbose < 2 else logging.DEBUG)
        logging.raiseExceptions = False  # a closed stdout must not fill stderr with tracebacks
    else:
        logging.basicConfig(stream=sys.stderr, format="farebox: %(name)s: %(message)s",
                            level=logging.WARNING if verbose == 0 else
                            logging.INFO if verbose == 1 else logging.DEBUG)
    with contextlib.suppress(ImportError):
        import nfc  # noqa: F401 - importing nfc sets its logger to INFO; set it after that
    for name in ("nfc", "smartcard"):  # the libraries' own chatter only with -vv
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)

    notifier = Notifier()
    metrics = metrics_url = None
    if config.metrics_listen is not None:
        from farebox.terminal.daemon.metrics import TerminalMetrics

        metrics = TerminalMetrics()
        try:
            metrics_url = metrics.serve(*parse_listen(config.metrics_listen))
        except MetricsError as error:
            raise InputError(str(error)) from None
        if not json_log:
            click.echo(f"farebox: metrics on {metrics_url}", err=True)
    watch = Supervision(notifier, metrics, log_events=json_log)
    watch.waiting(str(spec))
    try:
        _serve(config, spec, max_taps, as_json, watch, metrics_url)
    finally:
        notifier.close()
        if metrics is not None:
            metrics.close()


def _serve(config, spec, max_taps, as_json, watch: Supervision, metrics_url) -> None:
    first = None
    try:
        first = open_transport(spec, pcsc_mode=config.pcsc_mode)
    except RuntimeSetupError as error:
        if spec.kind == "sim":  # a card file that cannot be used is bad input
            raise InputError(str(error)) from None
        logging.getLogger("farebox.terminal.daemon.loop").warning(
            "%s; waiting for the reader", error)

    def open_reader():
        nonlocal first
        if first is not None:
            reader, first = first, None
            return reader
        return open_transport(spec, pcsc_mode=config.pcsc_mode)

    def emit(event: TapEvent) -> None:
        if event.result is not None:
            obj = output.tap_json(event.result, with_fare_class=True)
            human = output.tap_human(event.result, "fare")
        else:
            obj = {"outcome": "interrupted" if event.interrupted else "error",
                   "tap_id": event.interrupted, "error": event.error}
            human = f"NOT COMPLETED  {event.error}"
        obj.update({"reader": event.reader, "idm": event.idm.hex(), "tap_ms": event.tap_ms})
        if not watch.tap(obj, human):
            output.emit(obj, as_json, f"{human}  ({event.tap_ms:.0f} ms)")

    metrics = watch.metrics
    uploader = start_uploader(config, now_utc,
                              on_synced=metrics.uploaded if metrics else lambda: None,
                              on_fetched=metrics.fetched if metrics else lambda: None)
    with terminal(config) as term:
        closer = batch_closer(config, term, now_utc,
                              on_closed=uploader.wake if uploader else lambda: None)
        reload_list = ActionListReloader(config, term)

        unacknowledged = closer.settlement.unacknowledged_count if closer else lambda: 0

        def on_idle() -> None:
            if closer is not None:
                closer()
            reload_list()
            watch.idle(term.journal.in_doubt_count, unacknowledged)

        daemon = Daemon(term, open_reader, config.tariff, on_event=emit, max_taps=max_taps,
                        on_idle=on_idle, on_reader=watch.reader,
                        on_pass=lambda: watch.heartbeat(daemon.stats.reader_reopens))
        watch.idle(term.journal.in_doubt_count, unacknowledged, force=True)
        watch.started(str(spec), term.journal.terminal_id, metrics_url)
        previous = {sig: signal.signal(sig, daemon.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            daemon.run()
        finally:
            watch.stopping(daemon.stats.taps, daemon.stats.reader_reopens)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if uploader is not None:
                uploader.stop()
    if not as_json and not watch.log_events:
        click.echo(f"farebox: stopped after {daemon.stats.taps} taps", err=True)
