"""Operator slips and outages said as what they are (issue 21's guards), through the real
stacks: pyscard against a pcscd socket where no pcscd listens."""

from __future__ import annotations

import json
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


def _doctor(farebox, config):
    run = farebox("doctor", "--config", config, "--state", farebox.state, "--json")
    assert run.code in (0, 3), run
    return {check["check"]: check for check in json.loads(run.out)["checks"]}


def test_doctor_names_settings_by_the_configuration_files_own_keys(farebox):
    config = farebox.path("terminal.toml")
    config.write_text('[terminal]\nid = "BUS-1"\nminimum_add_value = "60.00"\n'
                      'allow_test_keys = true\n[fares]\nadult = "5.00"\n')
    found = _doctor(farebox, config)["config"]["found"]
    assert "minimum_add_value" in found and "minimum_add_value_cents" not in found
    assert "id" in found and "terminal_id" not in found and "[fares]" in found


def test_doctor_fails_a_configured_action_list_that_is_missing(farebox):
    """It said config OK while every tap then failed on the missing file."""
    config = farebox.path("terminal.toml")
    missing = farebox.path("hotlist.json")
    config.write_text(f'[terminal]\naction_list = "{missing}"\nallow_test_keys = true\n')
    check = _doctor(farebox, config)["hotlist"]
    assert check["status"] == "fail" and str(missing) in check["found"]
    tap = farebox.tap(farebox.card(), "--fare", "1.00", "--config", config,
                      at="2026-11-22T08:00:00+08:00")
    tap.assert_bad_input()  # what doctor warns of
    missing.write_text('{"entries": []}')
    assert _doctor(farebox, config)["hotlist"]["status"] == "ok"
