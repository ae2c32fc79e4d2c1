"""One error root per layer: every exception the terminal raises is a TerminalError (bad input,
a cut-off card write, or a fault), every one the clearing receiver raises a ClearingError; each
keeps the built-in base it had, so code that catches ValueError or RuntimeError still does."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import farebox.clearing
import farebox.terminal
from farebox.clearing.errors import ClearingError
from farebox.terminal.errors import BadInput, Interrupted, TerminalError


def _exception_classes(package) -> dict[str, type]:
    """Every exception class defined in ``package``'s modules, by ``module.Name``."""
    found = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == module.__name__):
                found[f"{module.__name__.removeprefix(package.__name__ + '.')}.{name}"] = value
    return found


TERMINAL = _exception_classes(farebox.terminal)
CLEARING = _exception_classes(farebox.clearing)

#: the kind of each terminal exception and the built-in base it keeps
KINDS = {
    "config.ConfigError": (BadInput, ValueError),
    "config.MetricsError": (BadInput, ValueError),
    "runtime.RuntimeSetupError": (BadInput, ValueError),
    "failpoints.FailpointError": (BadInput, ValueError),
    "core.service.ServiceRefused": (BadInput, ValueError),
    "core.writecycle.IllegalTransition": (TerminalError, RuntimeError),
    "card.tap.RequestRefused": (BadInput, ValueError),
    "card.tap.TapInterrupted": (Interrupted, Exception),
    "card.desk.IssueInterrupted": (Interrupted, Exception),
    "card.issue.IssueError": (BadInput, ValueError),
    "card.keys.KeyFileError": (BadInput, ValueError),
    "store.journal.JournalError": (TerminalError, Exception),
    "store.journal.JournalBroken": (TerminalError, Exception),
    "store.identity.IdentityError": (BadInput, Exception),
    "store.settlement.SettlementError": (TerminalError, Exception),
    "link.actionlist.ActionListError": (BadInput, ValueError),
    "link.signedlist.SignedListError": (BadInput, ValueError),
    "link.upload.UploadSetupError": (BadInput, ValueError),
    "link.upload.UploadRefused": (TerminalError, Exception),
    "link.upload.UploadFailed": (TerminalError, Exception),
    "ops.dumps.DumpError": (BadInput, ValueError),
    "ops.octopus.OctopusError": (BadInput, ValueError),
    "card.present.NoCard": (BadInput, ValueError),
    "card.present.CardUnusable": (BadInput, ValueError),
    "card.present.ReaderUnusable": (BadInput, ValueError),
    "card.present.CardLeft": (Interrupted, RuntimeError),
    "card.desk.CardDeclined": (BadInput, ValueError),
    "card.desk.PartlyReturned": (TerminalError, Exception),
}


def test_the_walk_finds_the_exception_classes():
    assert {"errors.TerminalError", "errors.BadInput", "store.journal.JournalError"} \
        <= set(TERMINAL)
    assert {"errors.ClearingError", "store.StoreError", "errors.Refused"} <= set(CLEARING)


@pytest.mark.parametrize("name", sorted(TERMINAL))
def test_every_terminal_exception_is_a_terminal_error(name):
    assert issubclass(TERMINAL[name], TerminalError)


@pytest.mark.parametrize("name", sorted(CLEARING))
def test_every_clearing_exception_is_a_clearing_error(name):
    assert issubclass(CLEARING[name], ClearingError)


def test_every_terminal_exception_has_its_kind_listed():
    """A new exception class gets a line in KINDS: its kind is a decision, not an accident."""
    roots = {"errors.TerminalError", "errors.BadInput", "errors.Interrupted"}
    assert set(TERMINAL) - roots == set(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_and_built_in_base(name):
    kind, builtin = KINDS[name]
    cls = TERMINAL[name]
    assert issubclass(cls, kind) and issubclass(cls, builtin)
    others = {BadInput, Interrupted} - {kind}
    assert not any(issubclass(cls, other) for other in others)


def test_the_roots_are_apart():
    assert not issubclass(BadInput, Interrupted) and not issubclass(Interrupted, BadInput)
    assert not issubclass(TerminalError, ValueError)
    assert not issubclass(ClearingError, TerminalError) and not issubclass(TerminalError,
                                                                           ClearingError)


def test_a_built_in_catch_still_catches():
    from farebox.terminal.config import ConfigError
    from farebox.terminal.core.writecycle import WriteState, check_transition

    with pytest.raises(ValueError, match="bad"):
        raise ConfigError("bad")
    with pytest.raises(RuntimeError):
        check_transition(WriteState.COMMITTED, WriteState.INTENT)
    with pytest.raises(TerminalError):
        check_transition(WriteState.COMMITTED, WriteState.INTENT)
