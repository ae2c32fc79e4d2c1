"""Daemon operations through real stacks: ``farebox run`` on nfcpy's UDP driver against
``farebox sim serve``, its sd_notify messages received on a real Unix datagram socket, its JSON
event log read line by line from stdout, its metrics endpoint scraped over HTTP and parsed with
prometheus-client's own parser, uploads to a real ``farebox clearing serve``."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import CONSOLE_SCRIPT
from .test_clearing_http import start_receiver
from .test_e2e_udp import Served

FAREBOX = str(CONSOLE_SCRIPT)


class NotifySocket:
    """The service manager's end of sd_notify: a bound datagram socket."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def receive_until(self, predicate, timeout_s: float = 30.0) -> bool:
        """Collect messages until one satisfies ``predicate`` (False when none came in time)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                return False
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if predicate(message):
                return True
        return False

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """``farebox run ... --log-format json`` in the background, its stdout read as events."""

    def __init__(self, *argv: object, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [FAREBOX, "run", "--log-format", "json", *map(str, argv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        self.events: list[dict] = []

    def read_until(self, predicate) -> dict:
        for line in self.process.stdout:
            event = json.loads(line)  # every line is one JSON object
            self.events.append(event)
            if predicate(event):
                return event
        raise AssertionError(f"the daemon ended first: {self.process.communicate()[1]}")

    def stop(self) -> list[dict]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, err
        self.events += [json.loads(line) for line in out.splitlines()]
        return self.events

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """The endpoint's samples as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def wait_for_scrape(url: str, predicate, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.fixture
def running():
    started = []

    def start(kind, *argv, **options):
        started.append(kind(*argv, **options))
        return started[-1]

    yield start
    for each in started:
        each.kill()


def test_taps_over_udp_show_in_json_logs_metrics_and_sd_notify(farebox, running, tmp_path):
    """Two presentations (one approved, one declined: the balance went negative), a batch
    closed and uploaded to a real receiver, the action list fetched from it; then SIGTERM."""
    made = farebox("terminal", "init", "--state", farebox.state, "--id", "T-0001",
                   "--json").json()
    with start_receiver(tmp_path / "clearing.sqlite3") as clearing_url:
        db = tmp_path / "clearing.sqlite3"
        farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey",
                made["public_key"], "--json").json()
        house_key = farebox("clearing", "key", "--db", db, "--json").json()["public_key"]
        config = tmp_path / "terminal.toml"
        config.write_text('[terminal]\nallow_test_keys = true\n'
                          f'batch_max_records = 1\nclearing_url = "{clearing_url}"\n'
                          f'upload_interval_s = 1\nclearing_public_key = "{house_key}"\n'
                          'metrics_listen = "127.0.0.1:0"\nlog_format = "json"\n')
        card = farebox.card(balance="1.00")
        server = running(Served, card, "--taps", 2)
        notify = NotifySocket(tmp_path / "notify")
        daemon = running(Daemon, "--reader", server.address, "--fare", "1.50", "--config", config,
                         "--state", farebox.state,
                         env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
        start = daemon.read_until(lambda e: e["event"] == "start")
        assert start["reader"] == server.address and start["terminal_id"] == "T-0001"
        url = start["metrics"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        assert notify.receive_until(lambda m: m.get("READY") == "1")
        daemon.read_until(lambda e: e["event"] == "tap" and e["outcome"] == "declined")
        assert notify.receive_until(lambda m: m == {"WATCHDOG": "1"})

        samples = wait_for_scrape(url, lambda s: s.get(
            ("farebox_batches_unacknowledged", ())) == 0 and math.isfinite(
            s[("farebox_seconds_since_last_upload", ())]) and math.isfinite(
            s[("farebox_seconds_since_last_action_list_fetch", ())]))
        events = daemon.stop()
    server.finish()
    taps = [e for e in events if e["event"] == "tap"]
    assert [(t["outcome"], t["balance_after"]) for t in taps] == [("approved", "-0.50"),
                                                                  ("declined", "-0.50")]
    reason = taps[1]["reason"]
    assert reason and taps[1]["reader"] == server.address and taps[1]["idm"]
    assert samples[("farebox_taps_total", (("outcome", "approved"), ("reason", "")))] == 1
    assert samples[("farebox_taps_total", (("outcome", "declined"), ("reason", reason)))] == 1
    assert samples[("farebox_tap_duration_seconds_count", ())] == 2
    assert samples[("farebox_tap_duration_seconds_sum", ())] == pytest.approx(
        sum(t["tap_ms"] for t in taps) / 1000, abs=1e-6)
    assert samples[("farebox_journal_in_doubt", ())] == 0
    assert samples[("farebox_batches_unacknowledged", ())] == 0
    assert samples[("farebox_reader_up", ())] == 1
    assert samples[("farebox_reader_reopens_total", ())] == 0
    assert 0 <= samples[("farebox_seconds_since_last_upload", ())] < 600
    batches = farebox("batch", "list", "--state", farebox.state, "--json").json()["batches"]
    assert [b["acked"] for b in batches] == [True]  # the approved tap's record, uploaded
    # every line one JSON event, with its time and level; the stop event ends the log
    assert all({"ts", "level", "logger", "event", "message"} <= set(e) for e in events)
    assert events[-1]["event"] == "stop" and events[-1]["taps"] == 2
    assert {"start", "reader_up", "tap", "stop"} <= {e["event"] for e in events}
    assert notify.receive_until(lambda m: m.get("STOPPING") == "1")
    ready = [m for m in notify.messages if m.get("READY") == "1"]
    assert len(ready) == 1 and ready[0]["MAINPID"] == str(daemon.process.pid)
    notify.close()


def test_no_ready_while_the_reader_cannot_be_opened_but_the_watchdog_is_fed(
        farebox, running, tmp_path):
    """No such USB reader: the daemon waits with backoff, tells systemd why in STATUS and keeps
    the watchdog fed, never READY; SIGTERM still stops it cleanly with STOPPING=1."""
    notify = NotifySocket(tmp_path / "notify")
    daemon = running(Daemon, "--reader", "usb:ffff:fffe", "--fare", "1.00",
                     "--state", farebox.state,
                     env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    daemon.read_until(lambda e: e["event"] == "start")
    pings = 0

    def five_pings(message):
        nonlocal pings
        pings += message == {"WATCHDOG": "1"}
        return pings >= 5

    assert notify.receive_until(five_pings)  # 5 pings 0.1 s apart: through several retries
    events = daemon.stop()
    assert notify.receive_until(lambda m: m.get("STOPPING") == "1")
    notify.close()
    assert not any("READY" in m for m in notify.messages)
    assert any(m.get("STATUS", "").startswith("waiting for the reader")
               for m in notify.messages)
    down = [e for e in events if e["event"] == "reader_down"]
    assert len(down) == 1 and "usb:ffff:fffe" in down[0]["error"]  # said once, not per retry
    assert events[-1]["event"] == "stop" and events[-1]["taps"] == 0


def test_metrics_and_log_format_are_checked_before_anything_runs(farebox, tmp_path):
    base = ["run", "--reader", "udp:127.0.0.1:9", "--fare", "1.00", "--state", farebox.state]
    far = farebox(*base, "--metrics", "10.1.2.3:9108")
    far.assert_bad_input()
    assert "loopback" in far.err
    farebox(*base, "--metrics", "127.0.0.1").assert_bad_input()
    assert farebox(*base, "--log-format", "xml").code == 2
    for line, key in (('metrics_listen = "0.0.0.0:9108"', "metrics_listen"),
                      ('metrics_listen = "[::]:9108"', "metrics_listen"),
                      ('log_format = "xml"', "log_format")):
        config = tmp_path / "bad.toml"
        config.write_text(f"[terminal]\n{line}\n")
        bad = farebox(*base, "--config", config)
        bad.assert_bad_input()
        assert f"terminal.{key}" in bad.err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = farebox(*base, "--metrics", f"127.0.0.1:{taken.getsockname()[1]}")
    busy.assert_bad_input()
    assert "cannot listen" in busy.err


def doctor_checks(farebox, *argv) -> dict[str, dict]:
    """``doctor --json`` (exit 0 or 3: other checks may fail here), its checks by name."""
    done = farebox("doctor", "--state", farebox.state, *argv, "--json")
    assert done.code in (0, 3), done.err
    return {check["check"]: check for check in json.loads(done.out)["checks"]}


@pytest.mark.parametrize("listen", ["0.0.0.0:9108", "[::]:9108", "192.0.2.7:9108"])
def test_a_metrics_address_beyond_loopback_needs_metrics_allow_remote(farebox, tmp_path, listen):
    """issue 21 item 5: without ``metrics_allow_remote = true`` a non-loopback ``metrics_listen``
    (or ``--metrics``) is exit 2 naming the key; with it the configuration is accepted (in
    either order of the two keys), ``doctor`` says where the endpoint listens and warns, and
    ``run`` gets past its metrics checks (it then stops at the test keys, before it listens:
    nothing is bound beyond 127.0.0.1 here)."""
    base = ["run", "--reader", "udp:127.0.0.1:9", "--fare", "1.00", "--state", farebox.state]
    refused = tmp_path / "refused.toml"
    refused.write_text(f'[terminal]\nmetrics_listen = "{listen}"\nmetrics_allow_remote = false\n')
    bad = farebox(*base, "--config", refused)
    bad.assert_bad_input()
    assert "terminal.metrics_listen" in bad.err and "metrics_allow_remote" in bad.err
    assert doctor_checks(farebox, "--config", refused)["config"]["status"] == "fail"
    flag = farebox(*base, "--metrics", listen)  # no configuration at all: the same
    flag.assert_bad_input()
    assert "--metrics" in flag.err and "metrics_allow_remote" in flag.err
    assert not farebox.state.exists()  # nothing was started, nothing made

    for text in (f'metrics_listen = "{listen}"\nmetrics_allow_remote = true\n',
                 f'metrics_allow_remote = true\nmetrics_listen = "{listen}"\n'):
        allowed = tmp_path / "allowed.toml"
        allowed.write_text(f"[terminal]\n{text}")
        checks = doctor_checks(farebox, "--config", allowed)
        assert checks["config"]["status"] == "ok"
        assert "metrics_allow_remote" in checks["config"]["found"]
        assert checks["metrics"]["status"] == "warn" and listen in checks["metrics"]["found"]
        for extra in ((), ("--metrics", listen)):
            past = farebox(*base, "--config", allowed, *extra)
            past.assert_bad_input()  # a file that does not allow the published test keys
            assert "test keys" in past.err and "metrics" not in past.err


def test_metrics_allow_remote_still_serves_loopback_and_a_name_is_refused(
        farebox, running, tmp_path):
    config = tmp_path / "terminal.toml"
    config.write_text('[terminal]\nallow_test_keys = true\nmetrics_allow_remote = true\n'
                      'metrics_listen = "127.0.0.1:0"\n')
    assert doctor_checks(farebox, "--config", config)["metrics"]["status"] == "ok"
    daemon = running(Daemon, "--reader", "usb:ffff:fffe", "--fare", "1.00", "--config", config,
                     "--state", farebox.state)
    url = daemon.read_until(lambda e: e["event"] == "start")["metrics"]
    assert url.startswith("http://127.0.0.1:")
    assert ("farebox_reader_reopens_total", ()) in scrape(url)
    assert daemon.stop()[-1]["event"] == "stop"
    named = tmp_path / "named.toml"
    named.write_text('[terminal]\nmetrics_allow_remote = true\n'
                     'metrics_listen = "example.org:9108"\n')
    bad = farebox("run", "--reader", "udp:127.0.0.1:9", "--fare", "1.00", "--config", named)
    bad.assert_bad_input()
    assert "terminal.metrics_listen" in bad.err and "IP address" in bad.err


def test_metrics_count_a_write_in_doubt_and_batches_not_acknowledged(farebox, running, tmp_path):
    """A batch closed and never uploaded (no clearing house), then a tap torn mid-write over
    udp: the endpoint says 1 batch unacknowledged and 1 write in doubt while the daemon runs."""
    farebox("terminal", "init", "--state", farebox.state, "--id", "T-0002", "--json").json()
    card = farebox.card(balance="10.00")
    farebox.tap(card, "--fare", "1.00", at="2026-11-22T08:00:00+08:00").json()
    closed = farebox("batch", "close", "--state", farebox.state, "--json").json()
    assert closed
    other = farebox.card("other.json", balance="10.00")
    server = running(Served, other, "--taps", 1, "--torn-write", 2)
    daemon = running(Daemon, "--reader", server.address, "--fare", "1.00", "--state",
                     farebox.state, "--metrics", "127.0.0.1:0")
    url = daemon.read_until(lambda e: e["event"] == "start")["metrics"]
    cut = daemon.read_until(lambda e: e["event"] == "tap")
    assert cut["outcome"] == "interrupted" and cut["tap_id"]
    samples = wait_for_scrape(url, lambda s: s[("farebox_journal_in_doubt", ())] == 1)
    daemon.stop()
    server.finish()
    assert samples[("farebox_journal_in_doubt", ())] == 1
    assert samples[("farebox_batches_unacknowledged", ())] == 1
    assert samples[("farebox_taps_total", (("outcome", "interrupted"), ("reason", "")))] == 1
    assert math.isinf(samples[("farebox_seconds_since_last_upload", ())])
    listing = farebox("journal", "list", "--state", farebox.state, "--json").json()
    assert listing["in_doubt"] == 1


TAP_KEYS = ["outcome", "reason", "card", "fare_class", "amount", "balance_before", "balance_after",
            "aavs_reload", "records", "counter", "card_commands", "completed_from",
            "clock_trusted", "reader", "idm", "tap_ms"]


def test_run_prints_each_tap_as_a_line_or_a_json_object_and_says_when_it_stopped(farebox):
    """What ``farebox run`` prints on a card file (``--max-taps``: the card stays in the field):
    text, one line per tap and the stop on stderr; ``--json``, one object per tap and nothing
    else; the installed entry point, so the log set-up is the real one."""
    farebox("terminal", "init", "--state", farebox.state, "--id", "T-0003", "--json").json()
    card = farebox.card(balance="10.00")
    base = ["run", "--reader", f"sim:{card}", "--fare", "1.00", "--max-taps", 1,
            "--state", farebox.state]
    text = farebox.script(*base)
    assert text.code == 0, text.err
    assert re.fullmatch(r"APPROVED  card \d{8}\(\d\)  adult fare 1\.00  "
                        r"balance 10\.00 -> 9\.00  \(\d+ ms\)\n", text.out), text.out
    assert text.err == "farebox: stopped after 1 taps\n"
    as_json = farebox.script(*base, "--json")
    assert as_json.err == ""
    tap = as_json.json()
    assert list(tap) == TAP_KEYS
    assert (tap["outcome"], tap["amount"], tap["balance_before"], tap["balance_after"]) == (
        "approved", "1.00", "9.00", "8.00")
    assert tap["reader"] == f"sim:{card}" and tap["idm"] == farebox.show(card)["idm"]
    assert tap["records"] == [{"type": "payment", "amount": "1.00", "balance_after": "8.00"}]
