"""The daemon as one call, in process, without the command line: :func:`run` on a card file
(``sim:CARD.json``: the card stays in the field, so one presentation), ended by ``max_taps``, by a
stop flag, by SIGTERM; what it reports as typed events, to its caller, to sd_notify (a real Unix
datagram socket), to the metrics endpoint (scraped over HTTP) and to the JSON log; and setup that
fails before any tap, releasing what it had opened."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.cardfile import CardFile, load_card, save_card
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.config import MetricsError, TerminalConfig
from farebox.terminal.core.rules import Tariff
from farebox.terminal.daemon.events import (
    MetricsServing, ReaderDown, ReaderUp, Started, Stopped, TapEvent,
)
from farebox.terminal.daemon.jsonlog import EVENT_KEY, FIELDS_KEY, JsonFormatter
from farebox.terminal.daemon.run import run
from farebox.terminal.daemon.sdnotify import Notifier
from farebox.terminal.runtime import RuntimeSetupError, open_journal
from farebox.tools.output import tap_json

KEYS = published_test_keys()
AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8)))
TAP_KEYS = {"outcome", "reason", "card", "fare_class", "amount", "balance_before",
            "balance_after", "aavs_reload", "records", "counter", "card_commands",
            "completed_from", "clock_trusted", "reader", "idm", "tap_ms"}


def card_file(path, balance_cents: int = 10_000):
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=12345678,
                                      balance_cents=balance_cents), KEYS, idm)
    save_card(SimulatedLiteS(idm, blocks=blocks), path)
    return path


def configured(tmp_path, **options) -> TerminalConfig:
    return TerminalConfig(state_dir=tmp_path / "state", terminal_id="T-0001",
                          tariff=Tariff.flat(100), **options)


@pytest.fixture
def card(tmp_path):
    return card_file(tmp_path / "card.json")


def test_one_tap_on_a_card_file_and_its_events_in_order(tmp_path, card):
    events = []
    before = signal.getsignal(signal.SIGTERM)
    stats = run(configured(tmp_path), f"sim:{card}", events.append, max_taps=1,
                clock=lambda: AT)
    assert signal.getsignal(signal.SIGTERM) is before  # its handlers were put back
    assert stats.taps == 1 and stats.reader_reopens == 0 and stats.outcomes == {"approved": 1}
    started, up, tap, stopped = events
    assert started == Started(f"sim:{card}", "T-0001", None, os.getpid())
    assert up == ReaderUp(f"sim:{card}")
    assert stopped == Stopped(taps=1, reader_reopens=0)
    assert isinstance(tap, TapEvent) and tap.outcome == "approved" and tap.reason is None
    assert tap.result.balance_after_cents == 9_900 and tap.idm == load_card(card).idm
    # the printed record: the fields of ``farebox tap --json`` and where and how fast
    fields = tap.fields()
    assert set(fields) == TAP_KEYS
    assert fields == {**tap_json(tap.result, with_fare_class=True), "reader": f"sim:{card}",
                      "idm": tap.idm.hex(), "tap_ms": tap.tap_ms}
    assert fields["balance_after"] == "99.00" and fields["amount"] == "1.00"
    assert tap.summary().startswith("APPROVED  card ")
    assert tap.summary().endswith("  balance 100.00 -> 99.00")
    # the payment is in the journal and the card file; the file's lock was released
    with open_journal(configured(tmp_path)) as journal:
        assert len(journal.records()) == 1
    with CardFile(card) as again:
        assert again.card.idm == tap.idm


def test_events_are_frozen_values():
    down = ReaderDown("reader failed (gone)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        down.error = "x"
    assert down.kind == "reader_down" and down.fields() == {"error": "reader failed (gone)"}
    cut = TapEvent(None, "hand", b"\x01\x02", 12.5, interrupted="T-1", error="the card left")
    assert cut.outcome == "interrupted" and cut.reason is None
    assert cut.fields() == {"outcome": "interrupted", "tap_id": "T-1", "error": "the card left",
                            "reader": "hand", "idm": "0102", "tap_ms": 12.5}
    refused = TapEvent(None, "hand", b"\x01", 3.0, error="refused")
    assert refused.outcome == "error" and refused.summary() == "NOT COMPLETED  refused"
    assert Stopped(2, 1).fields() == {"taps": 2, "reader_reopens": 1}


def test_a_stop_flag_ends_the_run_after_the_tap_in_progress(tmp_path, card):
    stop = threading.Event()
    events = []

    def on_event(event):
        events.append(event)
        if isinstance(event, TapEvent):
            stop.set()  # the card stays in the field: without the flag the run would not end

    stats = run(configured(tmp_path), f"sim:{card}", on_event, stop=stop, clock=lambda: AT)
    assert stats.taps == 1 and isinstance(events[-1], Stopped)


def test_a_stop_flag_set_before_the_run_serves_nothing(tmp_path, card):
    stop = threading.Event()
    stop.set()
    events = []
    stats = run(configured(tmp_path), f"sim:{card}", events.append, stop=stop)
    assert stats.taps == 0
    assert [type(e) for e in events] == [Started, Stopped]
    with CardFile(card, lock_timeout_s=0.1):  # the reader opened and closed again
        pass


def test_sigterm_asks_the_loop_to_stop_and_the_tap_in_progress_finishes(tmp_path, card):
    """SIGTERM arrives as the reader first answers (the card already found): that tap is
    served, then the run ends. A guard handler and a timer make a broken run fail, not hang
    or kill the test process."""
    caught = []

    def guard(*args):
        caught.append(args)

    previous = signal.signal(signal.SIGTERM, guard)
    stop = threading.Event()
    timer = threading.Timer(10, stop.set)
    timer.start()

    def on_event(event):
        if isinstance(event, ReaderUp):
            signal.raise_signal(signal.SIGTERM)

    try:
        stats = run(configured(tmp_path), f"sim:{card}", on_event, stop=stop, clock=lambda: AT)
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert stats.taps == 1 and not stop.is_set() and not caught
    assert restored is guard  # the handler before the run is back


def test_off_the_main_thread_no_signal_handlers_are_touched(tmp_path, card):
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def in_thread():
        result["stats"] = run(configured(tmp_path), f"sim:{card}", max_taps=1, clock=lambda: AT)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(20)
    assert result["stats"].taps == 1 and signal.getsignal(signal.SIGTERM) is before


class NotifySocket:
    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def messages(self) -> list[dict[str, str]]:
        got = []
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                return got
            got.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_sd_notify_and_the_metrics_endpoint_follow_the_run(tmp_path, card):
    listener = NotifySocket(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    events = []
    scraped = []

    def on_event(event):
        events.append(event)
        if isinstance(event, TapEvent):  # supervision has counted it before the caller hears
            scraped.append(scrape(events[0].url))

    config = configured(tmp_path, metrics_listen="127.0.0.1:0")
    stats = run(config, f"sim:{card}", on_event, max_taps=1, notifier=notifier,
                clock=lambda: AT)
    assert stats.taps == 1
    serving, started = events[:2]
    assert isinstance(serving, MetricsServing) and started.metrics_url == serving.url
    assert serving.url.startswith("http://127.0.0.1:") and serving.url.endswith("/metrics")
    assert 'farebox_taps_total{outcome="approved",reason=""} 1.0' in scraped[0]
    assert "farebox_reader_up 1.0" in scraped[0]
    with pytest.raises(urllib.error.URLError):  # the endpoint closed with the run
        scrape(serving.url)
    messages = listener.messages()
    listener.sock.close()
    assert [m for m in messages if "READY" in m] == [
        {"READY": "1", "STATUS": f"ready: reader sim:{card} answers", "MAINPID": str(os.getpid())}]
    assert messages[0] == {"STATUS": f"waiting for the reader sim:{card}"}
    assert messages[-1] == {"STOPPING": "1", "STATUS": "stopping after 1 taps"}


def test_json_logs_carry_the_same_events(tmp_path, card, caplog):
    events = []
    with caplog.at_level(logging.INFO, logger="farebox.run"):
        run(configured(tmp_path, log_format="json"), f"sim:{card}", events.append, max_taps=1,
            clock=lambda: AT)
    logged = [r for r in caplog.records if r.name == "farebox.run"]
    assert [getattr(r, EVENT_KEY) for r in logged] == ["start", "reader_up", "tap", "stop"]
    assert [getattr(r, FIELDS_KEY) for r in logged] == [e.fields() for e in events]
    line = json.loads(JsonFormatter().format(logged[2]))
    tap = events[2]
    assert line["event"] == "tap" and line["message"] == tap.summary()
    assert {k: v for k, v in line.items() if k in TAP_KEYS} == json.loads(
        json.dumps(tap.fields()))
    assert logged[0].getMessage() == f"farebox started on reader sim:{card}"
    assert logged[-1].getMessage() == "farebox stopped after 1 taps"


def test_text_logs_carry_no_events(tmp_path, card, caplog):
    with caplog.at_level(logging.INFO, logger="farebox.run"):
        run(configured(tmp_path), f"sim:{card}", max_taps=1, clock=lambda: AT)
    assert not [r for r in caplog.records if r.name == "farebox.run"]


def test_a_reader_that_is_not_there_is_waited_for_not_bad_input(tmp_path, caplog):
    stop = threading.Event()
    events = []

    def on_event(event):
        events.append(event)
        if isinstance(event, ReaderDown):
            stop.set()

    with caplog.at_level(logging.WARNING, logger="farebox.terminal.daemon.loop"):
        stats = run(configured(tmp_path), "usb:ffff:fffe", on_event, stop=stop)
    assert stats.taps == 0
    assert [type(e) for e in events] == [Started, ReaderDown, Stopped]
    assert "usb:ffff:fffe" in events[1].error
    assert "waiting for the reader" in caplog.text


def test_setup_that_fails_raises_before_anything_runs(tmp_path, card):
    events = []
    with pytest.raises(RuntimeSetupError, match="none.json"):
        run(configured(tmp_path), f"sim:{tmp_path / 'none.json'}", events.append)
    with pytest.raises(RuntimeSetupError, match="expected one of"):
        run(configured(tmp_path), "ftp:x", events.append)
    with pytest.raises(RuntimeSetupError, match="no fares"):
        run(TerminalConfig(state_dir=tmp_path / "state"), f"sim:{card}", events.append)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = configured(tmp_path, metrics_listen=f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(MetricsError, match="cannot listen"):
            run(busy, f"sim:{card}", events.append)
    assert events == []


def test_a_terminal_that_cannot_open_releases_the_reader_it_opened(tmp_path, card):
    hotlist = tmp_path / "hotlist.json"
    hotlist.write_text("not json")
    config = configured(tmp_path, action_list=hotlist)
    with pytest.raises(RuntimeSetupError):
        run(config, f"sim:{card}", max_taps=1)
    with CardFile(card, lock_timeout_s=0.1):  # not left locked by this process
        pass
