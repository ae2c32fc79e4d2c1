"""The life cycle of one card write, as a state machine (in the spirit of h11's ``_state.py``).

    intent ──> committed      its bytes are on the card (write answered, or seen later)
       │──> void ──> committed   void: the card showed it never landed; committed late if its
       │                          exact bytes turn up on the card after all
       └──> unresolved        the card moved past it and no longer shows which: reconciliation

Every change of a write's state goes through :func:`check_transition`; the journal applies it
only if the row is still in the state the caller saw.
"""

from __future__ import annotations

from enum import Enum

from farebox.terminal.errors import TerminalError


class WriteState(str, Enum):
    INTENT = "intent"
    COMMITTED = "committed"
    VOID = "void"
    UNRESOLVED = "unresolved"

    def __str__(self) -> str:
        return self.value


TRANSITIONS: dict[WriteState, frozenset[WriteState]] = {
    WriteState.INTENT: frozenset({WriteState.COMMITTED, WriteState.VOID, WriteState.UNRESOLVED}),
    WriteState.VOID: frozenset({WriteState.COMMITTED}),
    WriteState.COMMITTED: frozenset(),
    WriteState.UNRESOLVED: frozenset(),
}

#: A write whose outcome this terminal does not know yet.
IN_DOUBT = frozenset({WriteState.INTENT})


class IllegalTransition(TerminalError, RuntimeError):
    """A change the life cycle does not allow (a bug, never a card's doing)."""


def check_transition(old: WriteState, new: WriteState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a card write cannot go from {old.value} to {new.value}")
