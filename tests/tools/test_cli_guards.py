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


NOTE = "farebox: note: made a new state directory"
AT = "2026-11-22T08:00:00+08:00"


def test_a_state_directory_made_by_a_command_is_said_once(farebox):
    """A mistyped --state makes a new terminal whose memory of the cards' counters is empty.
    The contract (docs/cli.md, DESIGN §7) has ``tap --state DIR`` work on a DIR that is not
    there, so it is not refused: the command that made it says so on stderr, once, naming it."""
    card = farebox.card(balance="10.00")
    typo = farebox.path("stat")
    first = farebox("tap", card, "--fare", "1.00", "--at", AT, "--state", typo)
    assert first.code == 0 and "APPROVED" in first.out and first.out.count("\n") == 1
    assert first.err.count("\n") == 1 and first.err.startswith(f"{NOTE} {typo}:")
    assert "--state" in first.err and typo.is_dir()
    again = farebox("tap", card, "--fare", "1.00", "--at", "2026-11-22T09:00:00+08:00",
                    "--state", typo)
    assert again.code == 0 and again.err == ""
    # read-only commands that make one say it too; FAREBOX_STATE is named
    listed = farebox("journal", "list", "--state", farebox.path("other"))
    assert listed.code == 0 and listed.err.startswith(f"{NOTE} {farebox.path('other')}:")
    assert "FAREBOX_STATE" in listed.err


def test_init_and_demo_make_their_state_without_a_note_and_json_output_is_unchanged(farebox):
    made = farebox("terminal", "init", "--id", "BUS-9", "--state", farebox.path("new"))
    assert made.code == 0 and made.err == ""
    demo = farebox("demo", "--state", farebox.path("demo"))
    assert demo.code == 0 and NOTE not in demo.err
    # --json: stdout and stderr stay what the contract's checks read
    card = farebox.card(balance="10.00")
    quiet = farebox("tap", card, "--fare", "1.00", "--at", AT, "--state", farebox.path("j"),
                    "--json")
    assert quiet.code == 0 and quiet.err == "" and quiet.json()["outcome"] == "approved"


def test_a_failed_command_says_only_its_error(farebox):
    """Bad input and a cut-off tap stay one line on stderr, even on a new state directory."""
    card = farebox.card(balance="10.00")
    cut = farebox("tap", card, "--fare", "1.00", "--at", AT, "--state", farebox.path("cut"),
                  "--leave-after", "1")
    assert cut.code == 1 and cut.err.count("\n") == 1 and NOTE not in cut.err
    bad = farebox("tap", farebox.path("missing.json"), "--fare", "1.00", "--at", AT,
                  "--state", farebox.path("bad"))
    bad.assert_bad_input()
    assert not farebox.path("bad").exists()
