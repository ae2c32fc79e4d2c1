"""The README pastes in order: every ```sh block of README.md and hw/README.md runs, in order, in a
fresh directory, as a newcomer pasting them would run them.

Each file's blocks run in one bash session (``set -euo pipefail``, so a failing command fails the
test and names its block) in a new temporary directory holding ``.venv`` (a link to the venv this
test runs in) and copies of the folders the blocks read (examples/, bench/, hw/), with ``HOME``
there too, so no block touches the user's data directory. Servers a block starts in the background
(``&``) are stopped at the end: the session is a process group of its own and the whole group is
terminated.

A block that cannot run here (bootstrap.sh itself, the whole test suite, a Raspberry Pi with a
USB reader, the long benchmarks) carries an HTML comment on the line before it::

    <!-- not run by tests/test_readme.py: the reason -->

Those, and only those, are left out, each with its reason, and there must stay few of them.
A block meant to be pasted calls ``.venv/bin/farebox`` (the venv ``bootstrap.sh`` makes) and
holds no usage placeholders (``[--json]``, ``PORT``): usage listings are ```text blocks.

The blocks start a pcscd of their own (``farebox sim pcscd``), which needs root: as root or with
``CI`` set the test must run; elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "hw/README.md"]
#: the folders blocks read, copied into the fresh directory
FOLDERS = ["examples", "bench", "hw"]
#: at most this many blocks of a page may be left out
MAX_NOT_RUN = {"README.md": 5, "hw/README.md": 2}
#: README.md must keep at least this many blocks that run (the test checks something)
MIN_RUN = {"README.md": 7, "hw/README.md": 0}
TIMEOUT_S = 180  # the whole session; it takes well under a minute
NOT_RUN = re.compile(r"<!--\s*not run by tests/test_readme\.py:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    info: str  # the fence's language
    body: str  # dedented
    not_run: str | None  # the reason, when marked


def blocks(page: str, text: str | None = None) -> list[Block]:
    """Every fenced block of ``page`` in order, with the not-run reason of the line before it."""
    if text is None:
        text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in match.group("body").splitlines(keepends=True))
        before = text[:match.start()].rstrip().rsplit("\n", 1)[-1].strip()
        marked = NOT_RUN.fullmatch(before)
        found.append(Block(page, text.count("\n", 0, match.start()) + 1,
                           match.group("info").strip(), body,
                           marked.group("reason") if marked else None))
    return found


def sh_blocks(page: str) -> list[Block]:
    return [block for block in blocks(page) if block.info == "sh"]


# ---- what the blocks look like ------------------------------------------------------------------

def test_blocks_are_found_with_their_markers():
    text = ("intro\n<!-- not run by tests/test_readme.py: needs a Pi -->\n```sh\nsudo x\n```\n"
            "1. step\n   ```sh\n   echo indented\n   ```\n```text\nfarebox [--json]\n```\n")
    found = blocks("x.md", text)
    assert [(b.info, b.body, b.not_run, b.line) for b in found] == [
        ("sh", "sudo x\n", "needs a Pi", 3),
        ("sh", "echo indented\n", None, 7),
        ("text", "farebox [--json]\n", None, 10)]


@pytest.mark.parametrize("page", PAGES)
def test_few_blocks_are_left_out_and_each_says_why(page):
    found = sh_blocks(page)
    left_out = [block for block in found if block.not_run is not None]
    assert len(left_out) <= MAX_NOT_RUN[page], [(b.line, b.not_run) for b in left_out]
    assert all(len(block.not_run) >= 10 for block in left_out), \
        [(b.line, b.not_run) for b in left_out]
    assert len(found) - len(left_out) >= MIN_RUN[page]
    # a marker always sits right before an sh block: none is left behind by an edit
    text = (ROOT / page).read_text(encoding="utf-8")
    assert len(NOT_RUN.findall(text)) == len(left_out)


_BARE_FAREBOX = re.compile(r"(?<![\w./-])farebox(?=\s)")
#: a usage listing's optional part, or an upper-case word standing for a value (not a variable)
_PLACEHOLDER = re.compile(r"\[--|(?<![\w${])(PORT|HEX|DIR|FILE|SPEC|URL|ID|N|R)\b(?!=)")


@pytest.mark.parametrize("page", PAGES)
def test_blocks_to_paste_call_the_venvs_farebox_and_hold_no_placeholders(page):
    wrong = []
    for block in sh_blocks(page):
        if block.not_run is not None:
            continue
        for number, line in enumerate(block.body.splitlines(), start=block.line + 1):
            code = line.split("#", 1)[0]
            if _BARE_FAREBOX.search(code):
                wrong.append(f"{page}:{number}: call .venv/bin/farebox: {line.strip()}")
            if _PLACEHOLDER.search(code):
                wrong.append(f"{page}:{number}: a placeholder (a ```text block?): {line.strip()}")
    assert not wrong, "\n".join(wrong)


# ---- running them -------------------------------------------------------------------------------

def _venv() -> Path:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "farebox").is_file():
        pytest.fail(f"no farebox console script in {venv}/bin: run the tests from ./bootstrap.sh's "
                    ".venv")
    return venv


def _needs_root() -> None:
    if os.geteuid() != 0:
        message = "README blocks NOT RUN: they start a pcscd of their own, which needs root"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; in CI they must run")
        pytest.skip(message)


def _script(found: list[Block]) -> str:
    lines = ["set -euo pipefail"]
    for number, block in enumerate(found, start=1):
        lines.append(f"echo '=== block {number} ({block.page}:{block.line})'")
        lines.append(block.body.rstrip("\n"))
    lines.append("echo '=== every block ran'")
    return "\n".join(lines) + "\n"


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (zombies left to be reaped are not)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM every process of the session (the servers blocks left in the background), then
    SIGKILL what is still there after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while _group(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)


def run_blocks(page: str, found: list[Block], where: Path) -> tuple[int, str]:
    """Run ``found`` in one bash session in ``where``; ``(exit status, stdout and stderr)``."""
    (where / ".venv").symlink_to(_venv(), target_is_directory=True)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, where / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (where / "home").mkdir()
    script = where / "readme.sh"
    script.write_text(_script(found), encoding="utf-8")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FAREBOX_", "PCSCLITE_", "NOTIFY_SOCKET", "XDG_"))}
    # as a newcomer's shell: the venv is not on PATH (a bare `farebox` would not be found)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [entry for entry in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if entry and Path(entry).resolve() != Path(venv_bin).resolve()]
    env.update(HOME=str(where / "home"), LC_ALL="C.UTF-8", COLUMNS="100",
               PATH=os.pathsep.join(path))
    env.pop("VIRTUAL_ENV", None)
    log_path = where / "readme.log"
    # the output goes to a file, not a pipe: servers left in the background keep a pipe open
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["bash", str(script)], cwd=where, env=env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            _stop_group(process.pid)
            process.wait()
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if status is None:
        pytest.fail(f"{page}: the blocks did not finish in {TIMEOUT_S} s; last block and output:"
                    f"\n{_tail(output)}")
    return status, output


def _tail(output: str, lines: int = 60) -> str:
    marks = [m.start() for m in re.finditer(r"^=== block ", output, re.M)]
    start = marks[-1] if marks else 0
    shown = output[start:].splitlines()
    return "\n".join(shown if len(shown) <= lines else shown[:5] + ["..."] + shown[-lines:])


@pytest.mark.parametrize("page", PAGES)
def test_the_blocks_run_in_order_in_a_fresh_directory(page, tmp_path):
    found = [block for block in sh_blocks(page) if block.not_run is None]
    if not found:
        pytest.skip(f"{page} has no sh block to run")
    _needs_root()
    status, output = run_blocks(page, found, tmp_path)
    assert status == 0, f"{page}: a block failed (exit {status}):\n{_tail(output)}"
    assert "\n=== every block ran\n" in output, _tail(output)
    assert output.count("=== block ") == len(found)


def test_a_failing_block_fails_and_a_server_it_left_is_stopped(tmp_path):
    """The harness itself: a failing command stops the session and names its block; a server
    left in the background does not outlive the test."""
    found = [Block("x.md", 3, "sh", "sleep 300 &\necho $! > server.pid\n", None),
             Block("x.md", 9, "sh", "true\nfalse\necho not reached\n", None)]
    status, output = run_blocks("x.md", found, tmp_path)
    assert status != 0
    assert "=== block 2 (x.md:9)" in output and "not reached" not in output
    server = int((tmp_path / "server.pid").read_text())
    stat = Path(f"/proc/{server}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


# ---- the sample dumps -----------------------------------------------------------------------

def test_the_sample_dumps_hold_metrodroids_published_octopus_vector():
    """examples/ holds Metrodroid's OctopusTest.test2018Card (block 00000164...21, scanned
    2017-10-02 00:00 UTC, HK$-14.40) as a Metrodroid export and as a Flipper Zero .nfc file
    (tests/terminal/test_octopus.py has the vectors and the formats)."""
    from datetime import datetime, timezone

    from farebox.terminal.ops import octopus
    from farebox.terminal.ops.dumps import load_dump

    block = bytes.fromhex("00000164000000000000000000000021")
    metrodroid = load_dump(ROOT / "examples" / "metrodroid-octopus.json")
    flipper = load_dump(ROOT / "examples" / "flipper-octopus.nfc")
    assert metrodroid.scanned_at == datetime(2017, 10, 2, tzinfo=timezone.utc)
    assert flipper.scanned_at is None
    for dumped in (metrodroid, flipper):
        octopus_system = next(s for s in dumped.systems if s.system_code == 0x8008)
        assert octopus_system.services[0x0117][0] == block
    reading = octopus.reading(block, metrodroid.scanned_at, octopus.SCAN_TIME_FROM_DUMP)
    assert reading.balance_cents == -1440
