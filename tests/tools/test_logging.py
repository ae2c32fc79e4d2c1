"""The daemon's and the reader commands' logs as journald and an operator see them: each line
carries its syslog priority when (and only when) the stream is the journal's, nfcpy's
once-a-second "no reader available" error stays out while a USB reader is unplugged, and ``-vv``
traces every frame on the commands that talk to a reader, not only ``run``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

import pytest

from farebox.terminal.daemon.jsonlog import PriorityPrefix, syslog_priority, writes_to_journal

from .conftest import CONSOLE_SCRIPT
from .test_e2e_udp import served  # noqa: F401 - the fixture

FAREBOX = str(CONSOLE_SCRIPT)
UNPLUGGED = "usb:1234:5678"  # a USB reader that is not there


@pytest.mark.parametrize("level, priority", [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
    (logging.DEBUG, 7)])
def test_each_level_has_its_syslog_priority(level, priority):
    record = logging.LogRecord("farebox.x", level, __file__, 1, "said %s", ("once",), None)
    line = PriorityPrefix(logging.Formatter("%(message)s")).format(record)
    assert syslog_priority(level) == priority
    assert line == f"<{priority}>said once"


def test_only_the_journals_own_stream_is_prefixed(tmp_path, monkeypatch):
    journal, other = tmp_path / "journal", tmp_path / "other"
    with open(journal, "w") as stream, open(other, "w") as elsewhere:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert writes_to_journal(stream)
        assert not writes_to_journal(elsewhere)
        monkeypatch.setenv("JOURNAL_STREAM", "not:numbers")
        assert not writes_to_journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not writes_to_journal(stream)


def _run_unplugged(tmp_path, *options, env=None, seconds=3.0):
    """``farebox run`` on a USB reader that is not plugged in, for ``seconds``, stopped by
    SIGTERM; its stdout and stderr (each written to a file)."""
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        environment = dict(os.environ)
        environment.pop("JOURNAL_STREAM", None)
        if env is not None:
            environment.update(env(stdout, stderr))
        process = subprocess.Popen(
            [FAREBOX, "run", "--reader", UNPLUGGED, "--fare", "1.00",
             "--state", str(tmp_path / "state"), *options],
            stdout=stdout, stderr=stderr, env=environment)
        time.sleep(seconds)  # the daemon retries the reader with backoff (0.1 s doubling to 1 s)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    return out.read_text(), err.read_text()


def _journal_is(stream):
    info = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def test_daemon_lines_in_the_journal_carry_their_priority(tmp_path):
    out, _ = _run_unplugged(tmp_path, "--log-format", "json",
                            env=lambda stdout, stderr: _journal_is(stdout))
    lines = out.splitlines()
    assert lines
    for line in lines:
        assert line[0] == "<" and line[2] == ">", line
        event = json.loads(line[3:])  # behind the prefix, still one JSON object a line
        assert int(line[1]) == {"error": 3, "warning": 4, "info": 6}[event["level"]]
    events = [json.loads(line[3:])["event"] for line in lines]
    assert events.count("reader_down") == 1
    assert [line[:3] for line in lines if '"event": "reader_down"' in line] == ["<4>"]
    assert [line[:3] for line in lines if '"event": "start"' in line] == ["<6>"]


def test_text_lines_on_stderr_in_the_journal_carry_their_priority(tmp_path):
    _, err = _run_unplugged(tmp_path, "-v", env=lambda stdout, stderr: _journal_is(stderr))
    lines = err.splitlines()
    assert any(line.startswith("<4>farebox: ") and "reader not available" in line
               for line in lines), lines
    # the daemon's log lines carry their priority; the command's own closing line has none and
    # so is journald's default, info
    assert [line for line in lines if not line.startswith(("<4>", "<6>"))] == [
        "farebox: stopped after 0 taps"], lines


def test_a_failed_command_under_systemd_says_its_error_at_priority_err(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("fare = [\n")
    with open(tmp_path / "err.log", "w") as stderr:
        done = subprocess.run([FAREBOX, "run", "--config", str(bad), "--reader", UNPLUGGED],
                              stdout=subprocess.DEVNULL, stderr=stderr, timeout=60,
                              env={**os.environ, **_journal_is(stderr)})
    assert done.returncode == 2
    line = (tmp_path / "err.log").read_text()
    assert line.startswith("<3>farebox: error: ") and line.count("\n") == 1, line


def test_not_in_the_journal_no_prefix(tmp_path):
    out, _ = _run_unplugged(tmp_path, "--log-format", "json", seconds=1.5)
    assert out.splitlines() and all(json.loads(line) for line in out.splitlines())


def test_an_unplugged_reader_is_said_once_not_every_retry(tmp_path):
    """nfcpy logs "no reader available on path ..." at ERROR at every open; the daemon retries
    about once a second for as long as the reader is away."""
    out, err = _run_unplugged(tmp_path, "--log-format", "json", seconds=4.0)
    events = [json.loads(line) for line in out.splitlines()]
    assert not [e for e in events if "no reader available" in e["message"]], events
    assert [e["event"] for e in events].count("reader_down") == 1
    assert "no reader available" not in err


def test_with_vv_nfcpys_own_lines_come_through(tmp_path):
    out, _ = _run_unplugged(tmp_path, "--log-format", "json", "-vv", seconds=2.5)
    assert "no reader available on path " + UNPLUGGED in out


def test_vv_traces_every_frame_of_card_show_on_a_reader(farebox, served):
    card = farebox.card(balance="50.00")
    server = served(card, "--taps", "1")
    done = subprocess.run([FAREBOX, "card", "show", "--reader", server.address, "-vv", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["balance"] == "50.00"
    frames = [line for line in done.stderr.splitlines() if ">>> " in line]
    answers = [line for line in done.stderr.splitlines() if "<<< " in line]
    assert frames and len(answers) >= len(frames) - 1, done.stderr
    server.finish()


@pytest.mark.parametrize("argv, codes", [
    (["card", "dump", "--out", "dumped.json"], (0,)),
    (["service", "inactivity-fee", "--at", "2026-11-22T08:00:00+08:00"], (0,)),
    (["doctor", "--timeout", "10"], (0, 3)),  # other checks may fail on this host
])
def test_vv_traces_the_frames_of_every_command_that_talks_to_a_reader(farebox, served, argv,
                                                                      codes, tmp_path):
    card = farebox.card(balance="50.00")
    server = served(card, "--taps", "1")
    reader = ["--reader", server.address, "-vv", "--json"]
    state = ["--state", str(tmp_path / "state")] if argv[0] == "doctor" else []
    done = subprocess.run([FAREBOX, *argv, *reader, *state], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode in codes, done.stderr
    # a card session's commands (">>> ", "<<< "), or the poll doctor's card check makes
    traced = [line for line in done.stderr.splitlines() if ">>> " in line or (
        "farebox.protocol.nfcpy: sense " in line and " -> " in line)]
    assert traced, done.stderr
    if argv[0] != "doctor":  # doctor's check only polls: the served presentation never ends
        server.finish()


def test_without_v_card_show_says_nothing_on_stderr(farebox, served):
    card = farebox.card(balance="50.00")
    server = served(card, "--taps", "1")
    done = subprocess.run([FAREBOX, "card", "show", "--reader", server.address, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    server.finish()


@pytest.mark.parametrize("columns, limit", [(None, 100), ("72", 72)])
def test_tables_in_a_pipe_fit_100_columns_or_COLUMNS(farebox, tmp_path, columns, limit):
    """``doctor`` and ``card diff`` printed 230-250 columns into a pipe; now they wrap."""
    a = farebox.card("a.json", balance="50.00")
    b = farebox.card("b.json", balance="12.30")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    for argv in (["doctor", "--state", tmp_path / "state"], ["card", "diff", a, b]):
        done = subprocess.run([FAREBOX, *map(str, argv)], capture_output=True, text=True,
                              env=env, timeout=60)
        assert done.returncode in (0, 3), done.stderr
        widths = [len(line) for line in done.stdout.splitlines()]
        assert widths and max(widths) <= limit, (argv, max(widths), done.stdout)
        assert max(widths) > limit - 30  # it is wrapped to the width, not cut short
