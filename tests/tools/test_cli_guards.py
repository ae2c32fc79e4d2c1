"""Operator slips and outages said as what they are (issue 21's guards), through the real
stacks: pyscard against a pcscd socket where no pcscd listens."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import CONSOLE_SCRIPT, Run


@pytest.mark.parametrize("argv", [
    ["card", "show", "--reader", "pcsc"],
    ["card", "show", "--reader", "pcsc:ACS ACR122U"],
    ["card", "dump", "--reader", "pcsc"],
    ["octopus", "balance", "--reader", "pcsc"],
])
def test_pcscd_down_is_the_readers_problem_not_the_cards(tmp_path, argv):
    """With pcscd down, ``card show --reader pcsc`` said "the card does not work with this
    terminal" (and dump and octopus "the card stopped answering")."""
    env = {"PCSCLITE_CSOCK_NAME": str(tmp_path / "no-pcscd.comm"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(CONSOLE_SCRIPT), *argv, "--timeout", "1"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    result = Run(done.returncode, done.stdout, done.stderr)
    result.assert_bad_input()
    assert "the reader cannot be used: cannot reach pcscd" in result.err
    assert "card" not in result.err.split("the reader cannot be used")[1]
