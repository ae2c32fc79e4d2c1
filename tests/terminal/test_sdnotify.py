"""sd_notify over real Unix datagram sockets (a path and an abstract name), and the daemon's
READY/WATCHDOG/STATUS as systemd would receive them, with in-process readers. A reader that
cannot be opened (a USB reader not plugged in yet) is a stand-in that raises the way nfcpy does;
everything else is real: the socket, the daemon loop, the journal, the card."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.protocol.errors import TransportError
from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.daemon.events import Stopped, TapEvent
from farebox.terminal.daemon.loop import Daemon
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.daemon.metrics import TerminalMetrics
from farebox.terminal.core.rules import Tariff
from farebox.terminal.daemon.sdnotify import Notifier, socket_address, watchdog_interval_s
from farebox.terminal.daemon.supervise import Supervision
from farebox.terminal.card.tap import Terminal

KEYS = published_test_keys()
AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8)))


class Listener:
    """The service manager's end: a bound datagram socket collecting what arrives."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, predicate, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(predicate(m) for m in list(self.messages)):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> list[dict[str, str]]:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return self.messages


@pytest.fixture
def listener(tmp_path):
    opened = []

    def make(abstract: bool = False):
        name = (f"@farebox-test-{os.getpid()}-{len(opened)}" if abstract
                else str(tmp_path / "notify"))
        opened.append(Listener(socket_address(name)))
        return name, opened[-1]

    yield make
    for each in opened:
        each.close()


def test_messages_arrive_on_a_path_socket_and_an_abstract_one(listener):
    for abstract in (False, True):
        name, server = listener(abstract)
        notifier = Notifier({"NOTIFY_SOCKET": name})
        notifier.ready("ready: reader x answers")
        notifier.set_status("waiting for the reader: gone")
        notifier.stopping("stopping after 3 taps")
        assert server.wait_for(lambda m: "STOPPING" in m)
        ready, status, stopping = server.messages
        assert ready == {"READY": "1", "STATUS": "ready: reader x answers",
                         "MAINPID": str(os.getpid())}
        assert status == {"STATUS": "waiting for the reader: gone"}
        assert stopping == {"STOPPING": "1", "STATUS": "stopping after 3 taps"}
        notifier.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.send(ready=1) is False
    notifier.ready("x")
    notifier.watchdog()
    assert not notifier.ready_sent


def test_the_watchdog_interval_is_systemds_and_meant_for_this_process():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(mine) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({}) is None


def test_watchdog_pings_go_out_at_most_every_quarter_interval(listener):
    name, server = listener()
    now = [100.0]
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000"}, clock=lambda: now[0])
    for _ in range(40):  # 40 loop passes 0.1 s apart: 4 s, one ping a second
        notifier.watchdog()
        now[0] += 0.1
    assert server.wait_for(lambda m: False, timeout_s=0.2) is False  # let them all arrive
    pings = [m for m in server.messages if m == {"WATCHDOG": "1"}]
    assert len(pings) == 4


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="farebox.terminal.daemon.sdnotify"):
        assert notifier.send(status="a") is False
        assert notifier.send(status="b") is False
    assert len(caplog.records) == 1 and "service manager" in caplog.records[0].getMessage()


def new_card() -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=12345678,
                                      balance_cents=10_000), KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


class OneTapReader(InProcessTransport):
    """The card is in the field for one presentation, then gone for good."""

    def __init__(self, card) -> None:
        super().__init__(card, name="hand")
        self.tapped = False

    def wait_for_card(self, system_code, timeout_s):
        if self.tapped:
            time.sleep(min(timeout_s, 0.02))
            return None
        self.tapped = True
        return super().wait_for_card(system_code, timeout_s)

    def wait_for_removal(self, timeout_s):
        return True


def test_ready_only_once_the_reader_answers_and_the_watchdog_is_fed_while_it_does_not(
        tmp_path, listener):
    """The reader cannot be opened for the first ~0.7 s (backoff 0.1, 0.2, 0.4 s): the service
    manager hears STATUS and WATCHDOG all along, READY only after the reader answered."""
    name, server = listener()
    opened_at = time.monotonic() + 0.7
    attempts = []
    reader = OneTapReader(new_card())

    def open_reader():
        attempts.append(time.monotonic())
        if time.monotonic() < opened_at:
            raise TransportError("no such device (not plugged in yet)")
        return reader

    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"})  # ping every 50 ms
    watch = Supervision(notifier)
    events = []

    def observe(event):
        watch.observe(event)
        events.append(event)

    with Journal(tmp_path / "j.sqlite3") as journal:
        daemon = Daemon(Terminal(journal, KEYS), open_reader, Tariff.flat(100),
                        on_event=observe, max_taps=1, clock=lambda: AT,
                        on_pass=lambda: watch.heartbeat(daemon.stats.reader_reopens))
        daemon.run()
    watch.observe(Stopped(daemon.stats.taps, daemon.stats.reader_reopens))
    assert server.wait_for(lambda m: "STOPPING" in m)
    messages = server.close()
    ready_at = next(i for i, m in enumerate(messages) if m.get("READY") == "1")
    before = messages[:ready_at]
    taps = [event for event in events if isinstance(event, TapEvent)]
    assert len(attempts) >= 3 and taps[0].result.approved
    assert any("waiting for the reader" in m.get("STATUS", "") for m in before)
    # fed during the outage: the backoff pauses call the hook (0.7 s at 50 ms: several pings)
    assert sum(m == {"WATCHDOG": "1"} for m in before) >= 3
    assert messages[ready_at]["STATUS"] == "ready: reader hand answers"
    assert sum(m.get("READY") == "1" for m in messages) == 1


class DeadAtFirst(OneTapReader):
    """Opens, but its first polls fail (pcscd gone, the reader's firmware still starting)."""

    def __init__(self, card, failures: int) -> None:
        super().__init__(card)
        self.failures = failures

    def wait_for_card(self, system_code, timeout_s):
        if self.failures:
            self.failures -= 1
            raise TransportError("cannot reach pcscd: Service not available")
        return super().wait_for_card(system_code, timeout_s)


def test_a_reader_that_opens_but_does_not_answer_is_not_ready(tmp_path, listener):
    name, server = listener()
    reader = DeadAtFirst(new_card(), failures=3)
    opened = []
    notifier = Notifier({"NOTIFY_SOCKET": name})
    metrics = TerminalMetrics()
    watch = Supervision(notifier, metrics)
    with Journal(tmp_path / "j.sqlite3") as journal:
        daemon = Daemon(Terminal(journal, KEYS), lambda: reader, Tariff.flat(100),
                        on_event=watch.observe, max_taps=1, clock=lambda: AT,
                        on_ready=opened.append,
                        on_pass=lambda: watch.heartbeat(daemon.stats.reader_reopens))
        daemon.run()
    assert server.wait_for(lambda m: "READY" in m)
    messages = server.close()
    ready_at = next(i for i, m in enumerate(messages) if "READY" in m)
    assert len(opened) == 4 and daemon.stats.reader_reopens == 3  # opened 4 times, READY once
    assert metrics.registry.get_sample_value("farebox_reader_reopens_total") == 3
    assert metrics.registry.get_sample_value("farebox_reader_up") == 1
    assert metrics.registry.get_sample_value(
        "farebox_taps_total", {"outcome": "approved", "reason": ""}) == 1
    assert [m["STATUS"] for m in messages[:ready_at]] == [
        "waiting for the reader: reader failed (cannot reach pcscd: Service not available)"]
