"""Failpoints: named places where the process can be made to die, to prove that a crash at any
step of a tap or a batch close loses nothing and counts nothing twice.

``FAREBOX_FAILPOINT=NAME`` makes the process exit at once (``os._exit``: no cleanup, nothing in
the process's memory kept, as SIGKILL would) with status :data:`FAILPOINT_EXIT` when it reaches
NAME. What the journal committed stays, synced or not; a power cut can also lose a commit not yet
synced (the commit mark until the card has left): ``after-log-write`` leaves the state that
leaves, and the unit tests and the stateful model cut the power by restoring the journal as it
was when the intent was synced. Unset, a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os

from farebox.terminal.errors import BadInput

ENV = "FAREBOX_FAILPOINT"
FAILPOINT_EXIT = 86

#: Every failpoint, in the order a tap, its after-work and a batch close reach them.
FAILPOINTS: dict[str, str] = {
    "after-intent": "the tap's intent is durable; nothing written to the card yet",
    "after-purse-write": "both purse blocks have landed (the value moved); the log block not yet",
    "after-log-write": "the log block has landed; the commit mark not yet made (a power cut "
                       "that loses the mark leaves this too)",
    "after-commit-mark": "the commit mark is committed but not yet synced; the result not yet "
                         "shown",
    "before-durable-mark": "the result was shown; the card has left; the mark committed but "
                           "not yet synced",
    "batch-before-commit": "a batch's rows are written inside its transaction, not committed",
    "batch-after-commit": "a batch is durable; the command has not reported it",
    "upload-before-send": "a batch is about to be sent",
    "upload-after-ack": "the clearing house stored and acknowledged a batch; not yet marked here",
}


class FailpointError(BadInput, ValueError):
    """``FAREBOX_FAILPOINT`` names no failpoint."""


def hit(name: str) -> None:
    """Die here if ``FAREBOX_FAILPOINT`` names this failpoint."""
    if os.environ.get(ENV) == name:
        if name not in FAILPOINTS:  # pragma: no cover - a typo in the code, caught by a test
            raise ValueError(f"unknown failpoint {name!r}")
        os.write(2, f"farebox: failpoint {name}: dying\n".encode())
        os._exit(FAILPOINT_EXIT)


def check_environment() -> str | None:
    """The failpoint named in the environment, if any; FailpointError for an unknown name."""
    name = os.environ.get(ENV)
    if name and name not in FAILPOINTS:
        raise FailpointError(f"{ENV}={name!r} is not a failpoint (farebox failpoints lists them)")
    return name or None


__all__ = ["ENV", "FAILPOINTS", "FAILPOINT_EXIT", "FailpointError", "check_environment", "hit"]
