"""The metrics endpoint in process: listen addresses (loopback only), what the gauges say before
and after updates, scraped over real HTTP; the JSON log formatter."""

from __future__ import annotations

import json
import logging
import math
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from farebox.terminal.daemon.jsonlog import JsonFormatter, event_fields
from farebox.terminal.config import MetricsError, parse_listen
from farebox.terminal.daemon.metrics import TerminalMetrics


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:9108", ("127.0.0.1", 9108)), ("localhost:0", ("127.0.0.1", 0)),
    ("[::1]:9108", ("::1", 9108)), ("127.0.0.2:1", ("127.0.0.2", 1))])
def test_loopback_addresses_are_accepted(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["0.0.0.0:9108", "10.1.2.3:9108", "[::]:9108", "example.org:80",
                                   "127.0.0.1", "127.0.0.1:70000", "127.0.0.1:http", ":9108"])
def test_anything_else_is_refused(value):
    with pytest.raises(MetricsError):
        parse_listen(value)


@pytest.mark.parametrize("value, expected", [
    ("0.0.0.0:9108", ("0.0.0.0", 9108)), ("[::]:0", ("::", 0)),
    ("10.1.2.3:9108", ("10.1.2.3", 9108)),
    ("127.0.0.1:9108", ("127.0.0.1", 9108))])
def test_any_ip_address_is_accepted_when_remote_is_allowed(value, expected):
    assert parse_listen(value, allow_remote=True) == expected


@pytest.mark.parametrize("value", ["example.org:80", "127.0.0.1", ":9108", "0.0.0.0:70000"])
def test_names_and_bad_syntax_stay_refused_when_remote_is_allowed(value):
    with pytest.raises(MetricsError):
        parse_listen(value, allow_remote=True)


def samples(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_endpoint_serves_what_the_daemon_and_uploader_set():
    now = [1000.0]
    metrics = TerminalMetrics(clock=lambda: now[0])
    url = metrics.serve("127.0.0.1", 0)
    try:
        first = samples(url)
        assert math.isinf(first[("farebox_seconds_since_last_upload", ())])
        assert math.isinf(first[("farebox_seconds_since_last_action_list_fetch", ())])
        assert first[("farebox_reader_reopens_total", ())] == 0

        metrics.tap("approved", None, 42.0)
        metrics.tap("declined", "insufficient_value", 30.0)
        metrics.reopens(2)
        metrics.reopens(2)  # the daemon's running total, not an increment
        metrics.reopens(3)
        metrics.reader(True)
        metrics.refresh(lambda: 1, lambda: 4)
        metrics.refresh(lambda: 9, lambda: 9)  # within REFRESH_EVERY_S: not read again
        metrics.uploaded()
        now[0] += 12.5
        metrics.fetched()
        now[0] += 2.0

        def broken():
            raise RuntimeError("database is locked")

        metrics.refresh(broken, broken)  # a busy journal: keeps the last counts
        after = samples(url)
    finally:
        metrics.close()
    assert after[("farebox_taps_total", (("outcome", "approved"), ("reason", "")))] == 1
    assert after[("farebox_taps_total", (("outcome", "declined"),
                                         ("reason", "insufficient_value")))] == 1
    assert after[("farebox_tap_duration_seconds_bucket", (("le", "0.05"),))] == 2
    assert after[("farebox_tap_duration_seconds_bucket", (("le", "0.025"),))] == 0
    assert after[("farebox_reader_reopens_total", ())] == 3
    assert after[("farebox_reader_up", ())] == 1
    assert after[("farebox_journal_in_doubt", ())] == 1
    assert after[("farebox_batches_unacknowledged", ())] == 4
    assert after[("farebox_seconds_since_last_upload", ())] == 14.5
    assert after[("farebox_seconds_since_last_action_list_fetch", ())] == 2.0


def test_a_port_in_use_is_one_line():
    metrics = TerminalMetrics()
    url = metrics.serve("127.0.0.1", 0)
    try:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(MetricsError, match="cannot listen on 127.0.0.1"):
            TerminalMetrics().serve("127.0.0.1", port)
    finally:
        metrics.close()


def test_json_log_lines_carry_time_level_event_and_fields():
    formatter = JsonFormatter()
    record = logging.LogRecord("farebox.run", logging.INFO, __file__, 1, "APPROVED %s", ("x",),
                               None)
    record.__dict__.update(event_fields("tap", {"outcome": "approved", "level": "ignored"}))
    line = json.loads(formatter.format(record))
    assert line["event"] == "tap" and line["outcome"] == "approved"
    assert line["level"] == "info" and line["message"] == "APPROVED x"
    assert line["ts"].endswith("Z") and line["logger"] == "farebox.run"
    try:
        raise ValueError("boom")
    except ValueError:
        plain = logging.LogRecord("farebox.x", logging.WARNING, __file__, 1, "oops", (),
                                  sys.exc_info())
    line = json.loads(formatter.format(plain))
    assert line["event"] == "log" and line["level"] == "warning"
    assert "ValueError: boom" in line["exception"]
