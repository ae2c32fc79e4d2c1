"""Fixtures for the CLI contract tests (docs/cli.md).

``farebox`` runs the command in-process through ``farebox.tools.cli.main(argv)`` (the exit code is its
return value; stdout/stderr come from capsys) and, for the few tests that must prove the installed
entry point, through the real console script next to ``sys.executable``.

Every terminal command gets ``--state`` inside ``tmp_path`` so no test touches the user's data
directory; times are always given with ``--at``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from farebox.tools.cli import main

CONSOLE_SCRIPT = Path(sys.executable).parent / "farebox"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        assert self.code == 0, f"exit {self.code}: {self.err!r}"
        assert self.out.count("\n") == 1 and self.out.endswith("\n"), \
            f"--json must print exactly one line: {self.out!r}"
        return json.loads(self.out)

    def assert_bad_input(self) -> None:
        """docs/cli.md: exit 2, a one-line message on stderr, no traceback, nothing on stdout."""
        assert self.code == 2, f"exit {self.code}, stdout {self.out!r}, stderr {self.err!r}"
        assert self.out == ""
        assert self.err.endswith("\n") and self.err.count("\n") == 1, \
            f"stderr must be exactly one line: {self.err!r}"
        assert self.err.strip(), "the message must not be empty"
        assert "Traceback" not in self.err


class Farebox:
    """The ``farebox`` command, in-process, with helpers for the common calls."""

    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp = tmp_path
        self.capsys = capsys
        self.state = tmp_path / "state"

    # ---- running -----------------------------------------------------------------------------

    def __call__(self, *argv: object) -> Run:
        self.capsys.readouterr()  # drop anything printed before this call
        code = main([str(a) for a in argv])
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)

    def script(self, *argv: object, env: dict | None = None, timeout: float = 30) -> Run:
        """The real console script, as a user runs it."""
        assert CONSOLE_SCRIPT.is_file(), f"no console script at {CONSOLE_SCRIPT}"
        full_env = {k: v for k, v in os.environ.items() if k != "FAREBOX_DEBUG"}
        full_env.update(env or {})
        done = subprocess.run([str(CONSOLE_SCRIPT), *map(str, argv)], capture_output=True,
                              text=True, env=full_env, cwd=self.tmp, timeout=timeout)
        return Run(done.returncode, done.stdout, done.stderr)

    # ---- cards -------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.tmp / name

    def card(self, name: str = "card.json", *, issued: str = "2026-01-15", **options: object) -> Path:
        """``card new`` with ``--issued`` fixed and ``option_name=value`` as ``--option-name``."""
        path = self.tmp / name
        argv: list[object] = ["card", "new", path, "--issued", issued]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", value]
        run = self(*argv)
        assert run.code == 0, f"card new {argv[3:]}: exit {run.code}: {run.err!r}"
        return path

    def show(self, card: Path) -> dict:
        return self("card", "show", card, "--json").json()

    # ---- terminal commands -------------------------------------------------------------------

    def tap(self, card: Path, *fare: object, at: str, state: Path | None = None,
            hotlist: Path | None = None) -> Run:
        """``tap CARD <fare args> --at AT --state STATE [--hotlist H] --json``."""
        argv: list[object] = ["tap", card, *fare, "--at", at, "--state", state or self.state]
        if hotlist is not None:
            argv += ["--hotlist", hotlist]
        return self(*argv, "--json")

    def add_value(self, card: Path, amount: str, *, at: str, state: Path | None = None,
                  hotlist: Path | None = None) -> Run:
        argv: list[object] = ["add-value", card, "--amount", amount, "--at", at,
                              "--state", state or self.state]
        if hotlist is not None:
            argv += ["--hotlist", hotlist]
        return self(*argv, "--json")

    def hotlist(self, entries: list[dict], name: str = "hotlist.json") -> Path:
        path = self.tmp / name
        path.write_text(json.dumps({"entries": entries}), encoding="utf-8")
        return path


@pytest.fixture
def farebox(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> Farebox:
    monkeypatch.delenv("FAREBOX_DEBUG", raising=False)
    return Farebox(tmp_path, capsys)
