"""The terminal's fsyncs while a card is in the field: one, the intent's (README, step 8), for a
CLI tap and for every tap the daemon serves. Counted by ``strace`` (SQLite's syncs are made in C,
so only the system calls tell the truth) around fsync_harness.py, which marks each card command;
a card is in the field from its first command to its result being shown (the CLI's result line,
the daemon's tap event). The state directory is the terminal's (journal, its WAL, the directory
itself); a card file lives elsewhere and its own syncs (an atomic save per landed block write) are
the card's, not the terminal's."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).with_name("fsync_harness.py")
STRACE = shutil.which("strace")
_CALL = re.compile(r'^\d+\s+(\w+)\((\d+)<([^>]*)>(?:, "((?:[^"\\]|\\.)*)")?')


def traced(tmp_path: Path, *argv: object) -> list[tuple[str, str, str]]:
    """Run the harness under strace: (call, path, data) of each sync, marker and stdout write."""
    assert STRACE, "strace is missing: bootstrap.sh installs it"
    trace, marks = tmp_path / "trace", tmp_path / "marks"
    done = subprocess.run(
        [STRACE, "-f", "-y", "-s", "64", "-e", "trace=fsync,fdatasync,write", "-o", str(trace),
         sys.executable, str(HARNESS), str(marks), *map(str, argv)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = []
    for line in trace.read_text().splitlines():
        found = _CALL.match(line)
        if found is None:
            continue
        call, fd, path, data = found.groups()
        if call == "write" and not (path == str(marks) or (fd == "1" and data)):
            continue
        calls.append((call, "stdout" if call == "write" and fd == "1" else path, data or ""))
    return calls


def in_field_syncs(calls, state: Path, shown) -> list[list[str]]:
    """The terminal's syncs (paths in ``state``) in each span from a card's first command to its
    result shown (``shown(call)``); and checks the card's own syncs are elsewhere."""
    spans, span = [], None
    for call, path, data in calls:
        if call == "write" and data == "command\\n":
            if span is None:
                span = []
        elif call == "write" and shown(path, data):
            assert span is not None, "a result shown with no card command before it"
            spans.append(span)
            span = None
        elif call in ("fsync", "fdatasync") and span is not None:
            if path == str(state) or path.startswith(f"{state}/"):
                span.append(f"{call} {path}")
    return spans


def test_a_cli_tap_makes_one_fsync_in_the_field(tmp_path):
    state, cards = tmp_path / "state", tmp_path / "cards"
    cards.mkdir()
    card = cards / "card.json"
    from farebox.tools.cli import main

    assert main(["card", "new", str(card), "--issued", "2026-01-15", "--balance", "100"]) == 0
    for minute, name in enumerate(("first", "second", "third")):  # a new journal, then in use
        run = tmp_path / name
        run.mkdir()
        calls = traced(run, "cli", "tap", card, "--fare", "1", "--state", state,
                       "--at", f"2026-11-22T08:0{minute}:00+08:00")
        spans = in_field_syncs(calls, state,
                               lambda path, data: path == "stdout" and data.startswith("APPROVED"))
        assert spans == [[f"fdatasync {state}/journal.sqlite3-wal"]], (name, spans)
        assert any(path.startswith(str(cards)) for call, path, _ in calls
                   if call in ("fsync", "fdatasync")), "the card file's saves are synced"


def test_each_tap_the_daemon_serves_makes_one_fsync_in_the_field(tmp_path):
    state = tmp_path / "state"
    calls = traced(tmp_path, "daemon", state, 4)
    spans = in_field_syncs(calls, state, lambda path, data: data == "shown\\n")
    assert spans == [[f"fdatasync {state}/journal.sqlite3-wal"]] * 4, spans


def test_the_count_sees_a_sync_in_the_field(tmp_path):
    """The count can fail: a journal whose WAL is not started before the card comes syncs the
    WAL's header (and its directory) in the intent as well."""
    state = tmp_path / "state"
    calls = traced(tmp_path, "daemon-cold", state, 1)
    spans = in_field_syncs(calls, state, lambda path, data: data == "shown\\n")
    assert len(spans) == 1 and len(spans[0]) > 1, spans
