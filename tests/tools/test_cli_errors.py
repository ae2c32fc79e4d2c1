"""The one mapping from errors to exit statuses (``farebox.tools.cli.main``): what the operator
gave that cannot be used is exit 2 with one line whatever command let it through; a card write
cut off midway is exit 1 with one line saying what to do; anything else is an internal error
(exit 1, its type named, a traceback only with FAREBOX_DEBUG)."""

from __future__ import annotations

import pytest

from farebox.clearing.service import Refused
from farebox.clearing.store import StoreError
from farebox.protocol.errors import TransportError
from farebox.protocol.sim.card import CardFileError
from farebox.protocol.sim.serve import ServeError
from farebox.terminal.card.desk import IssueInterrupted
from farebox.terminal.card.tap import RequestRefused, TapInterrupted
from farebox.terminal.config import ConfigError
from farebox.terminal.core.service import ServiceRefused
from farebox.terminal.core.writecycle import IllegalTransition
from farebox.terminal.errors import BadInput, TerminalError
from farebox.terminal.failpoints import ENV as FAILPOINT_ENV
from farebox.terminal.ops.dumps import DumpError
from farebox.terminal.store.journal import JournalError
from farebox.terminal.store.settlement import SettlementError
from farebox.tools.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, exit_status


@pytest.mark.parametrize("error, status", [
    (BadInput("x"), EXIT_BAD_INPUT),
    (ConfigError("x"), EXIT_BAD_INPUT),
    (ServiceRefused("x"), EXIT_BAD_INPUT),
    (RequestRefused("x"), EXIT_BAD_INPUT),
    (DumpError("x"), EXIT_BAD_INPUT),
    (CardFileError("x"), EXIT_BAD_INPUT),
    (ServeError("x"), EXIT_BAD_INPUT),
    (StoreError("x"), EXIT_BAD_INPUT),
    (TapInterrupted("tap-1", TransportError("gone")), EXIT_INTERRUPTED),
    (IssueInterrupted("tap-1", TransportError("gone")), EXIT_INTERRUPTED),
    (TerminalError("x"), None),
    (JournalError("x"), None),
    (SettlementError("x"), None),
    (IllegalTransition("x"), None),
    (Refused(400, "x"), None),
    (ValueError("x"), None),
    (RuntimeError("x"), None),
])
def test_exit_status(error, status):
    assert exit_status(error) == status


def test_the_statuses():
    assert (EXIT_BAD_INPUT, EXIT_INTERRUPTED) == (2, 1)


def _raising(error: Exception):
    def fault(*args, **kwargs):
        raise error
    return fault


def test_bad_input_a_command_lets_through_is_exit_two_and_one_line(farebox, monkeypatch):
    from farebox.tools import terminal_cmd

    monkeypatch.setattr(terminal_cmd, "init_terminal",
                        _raising(ServiceRefused("the card is\nblocked")))
    run = farebox("terminal", "init", "--state", farebox.state, "--id", "T1")
    run.assert_bad_input()
    assert run.err == "farebox: error: the card is blocked\n"


def test_bad_input_is_not_a_traceback_even_when_debugging(farebox, monkeypatch):
    from farebox.tools import terminal_cmd

    monkeypatch.setenv("FAREBOX_DEBUG", "1")
    monkeypatch.setattr(terminal_cmd, "init_terminal", _raising(ConfigError("bad key")))
    run = farebox("terminal", "init", "--state", farebox.state, "--id", "T1")
    run.assert_bad_input()
    assert run.err == "farebox: error: bad key\n"


def test_a_cut_off_card_write_is_exit_one_and_one_line(farebox, monkeypatch):
    from farebox.tools import terminal_cmd

    cut = TapInterrupted("tap-1", TransportError("the card left"))
    monkeypatch.setattr(terminal_cmd, "init_terminal", _raising(cut))
    run = farebox("terminal", "init", "--state", farebox.state, "--id", "T1")
    assert (run.code, run.out) == (1, "")
    assert run.err == ("farebox: error: card write interrupted (the card left); tap the card "
                       "again\n")


def test_a_terminal_fault_is_an_internal_error(farebox, monkeypatch):
    from farebox.tools import terminal_cmd

    monkeypatch.setattr(terminal_cmd, "init_terminal",
                        _raising(JournalError("card write t is no longer intent")))
    run = farebox("terminal", "init", "--state", farebox.state, "--id", "T1")
    assert (run.code, run.out) == (1, "")
    assert run.err.startswith("farebox: internal error: JournalError: card write t is no longer "
                              "intent (set FAREBOX_DEBUG=1")
    assert run.err.count("\n") == 1


def test_a_terminal_fault_is_a_traceback_when_debugging(farebox, monkeypatch):
    from farebox.tools import terminal_cmd

    monkeypatch.setenv("FAREBOX_DEBUG", "1")
    monkeypatch.setattr(terminal_cmd, "init_terminal", _raising(JournalError("x")))
    with pytest.raises(JournalError):
        farebox("terminal", "init", "--state", farebox.state, "--id", "T1")


def test_an_unknown_failpoint_is_bad_input(farebox, monkeypatch):
    monkeypatch.setenv(FAILPOINT_ENV, "after-lunch")
    run = farebox("failpoints")
    run.assert_bad_input()
    assert run.err == ("farebox: error: FAREBOX_FAILPOINT='after-lunch' is not a failpoint "
                       "(farebox failpoints lists them)\n")


def test_journal_commands_refuse_a_state_that_is_not_a_directory(farebox):
    """``journal`` lets the runtime's setup error through: main makes it exit 2."""
    farebox.state.write_text("not a directory")
    for argv in (["list"], ["show", "1"], ["verify"]):
        run = farebox("journal", *argv, "--state", farebox.state)
        run.assert_bad_input()
        assert str(farebox.state) in run.err


def test_terminal_init_refuses_a_bad_id(farebox):
    run = farebox("terminal", "init", "--state", farebox.state, "--id", "no spaces")
    run.assert_bad_input()
    assert "terminal id 'no spaces'" in run.err
    assert not farebox.state.exists() or not any(farebox.state.iterdir())


def test_sim_serve_refuses_a_bad_via(farebox):
    card = farebox.card()
    before = card.read_bytes()
    run = farebox("sim", "serve", card, "--via", "tcp:127.0.0.1:1")
    run.assert_bad_input()
    assert run.err == ("farebox: error: --via 'tcp:127.0.0.1:1': expected udp:HOST:PORT or "
                       "vpcd:HOST:PORT\n")
    assert card.read_bytes() == before


def test_octopus_balance_refuses_a_dump_it_cannot_read(farebox):
    dump = farebox.path("dump.json")
    dump.write_text('{"felica": 1}')
    run = farebox("octopus", "balance", dump)
    run.assert_bad_input()
    assert run.err == f"farebox: error: {dump}: 'felica' must be an object\n"
