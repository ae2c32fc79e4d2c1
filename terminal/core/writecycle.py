"""The life cycle of one card write, as a state machine (in the spirit of h11's ``_state.py``):
its states, the transitions between them, and the decisions which transition to take given
what the card shows. The shells (the tap, the service desk, the journal) only carry them out.

    intent ──> committed      its bytes are on the card (write answered, or seen later)
       │──> void ──> committed   void: the card showed it never landed; committed late if its
       │                          exact bytes turn up on the card after all
       └──> unresolved        the card moved past it and no longer shows which: reconciliation

Every change of a write's state goes through :func:`check_transition`; the journal applies it
only if the row is still in the state the caller saw. The decisions:

* :func:`resolution`: what a card shows about one write (commit, void, unresolved, commit late,
  or nothing to conclude); :func:`resolve_open_writes` for all of a card's writes in one tap.
* :func:`retap_completes`: the re-tap that completes a tap cut off after its write landed.
* :func:`log_repair`: a committed write whose log block was never confirmed, to write again.
* :func:`issue_on_card_step`: what an issue onto a card held to a reader does with earlier
  issues cut off on the same card (complete one, void them and issue again, or refuse).
* :func:`has_in_doubt`: whether a card has a write of a kind still in doubt (a request's
  all-or-nothing checks leave such a card to the write that resolves it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Protocol, TypeVar

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


class Write(Protocol):
    """What the decisions look at in a journalled write (the journal's ``CardWrite``)."""

    @property
    def state(self) -> WriteState: ...
    @property
    def kind(self) -> str: ...
    @property
    def counter_before(self) -> int: ...
    @property
    def counter_after(self) -> int: ...
    @property
    def expected_slot(self) -> bytes: ...


W = TypeVar("W", bound=Write)


# ---- what the card shows about a write ------------------------------------------------------

def resolution(write: Write, current_counter: int,
               slot_bytes: dict[int, bytes]) -> WriteState | None:
    """What the card shows about a write, given its current counter and the raw bytes of each
    purse slot that verifies (by counter): ``committed`` (its bytes are there: a void whose
    bytes turn up is committed late), ``void`` (the card still shows the counter it started
    from, or other bytes at the counter it would make), ``unresolved`` (the card moved on and
    the slot is gone), or None (nothing to conclude: an older copy cannot resolve it, nor
    undo a void)."""
    if write.counter_after in slot_bytes:
        if slot_bytes[write.counter_after] == write.expected_slot:
            return WriteState.COMMITTED
        return WriteState.VOID if write.state is WriteState.INTENT else None
    if write.state is WriteState.VOID or current_counter < write.counter_before:
        return None
    if current_counter == write.counter_before:
        return WriteState.VOID  # the write never landed (torn, or the card left before it)
    return WriteState.UNRESOLVED


def resolve_open_writes(open_writes: Iterable[W], current_counter: int,
                        slot_bytes: dict[int, bytes]) -> list[tuple[W, WriteState]]:
    """The changes a tap makes to a card's open writes (intents and voids, newest first; the
    committed ones there only for their unconfirmed log block are skipped): each write with its
    new state. Newest first: a retry can write the very bytes an earlier voided attempt would
    have, and only one write can have produced a counter, so once a write is committed the
    older ones up to its counter are left alone."""
    committed_up_to = 0
    changes = []
    for write in open_writes:
        if write.state is WriteState.COMMITTED or write.counter_after <= committed_up_to:
            continue
        state = resolution(write, current_counter, slot_bytes)
        if state is WriteState.COMMITTED:
            committed_up_to = write.counter_after
        if state is not None and state is not write.state:
            check_transition(write.state, state)
            changes.append((write, state))
    return changes


# ---- the re-tap that completes a cut-off tap ------------------------------------------------

class Retap(Protocol):
    """A write as it is after this tap's resolution, with what the re-tap needs to report."""

    @property
    def state(self) -> WriteState: ...
    @property
    def kind(self) -> str: ...
    @property
    def counter_after(self) -> int: ...
    @property
    def outcome(self) -> dict | None: ...
    @property
    def created(self) -> datetime: ...


R = TypeVar("R", bound=Retap)


def retap_completes(resolved: Iterable[tuple[WriteState, R]], kind: str, current_counter: int,
                    at: datetime, window: timedelta) -> R | None:
    """The write a re-tap completes instead of serving its request afresh, given this tap's
    resolved writes (newest first, each as (the state it had, the write as it is now)): only
    the newest one that was in doubt can be the one the customer is re-tapping for, and only
    if it turned out committed, is what the card now shows, is for the same kind of request,
    and was made within the re-tap window."""
    for before, now in resolved:
        if before is not WriteState.INTENT:
            continue
        if (now.state is WriteState.COMMITTED and now.kind == kind
                and now.counter_after == current_counter and now.outcome is not None
                and at - now.created <= window):
            return now
        return None
    return None


# ---- log blocks written again ---------------------------------------------------------------

class LoggedWrite(Write, Protocol):
    @property
    def log_block(self) -> int | None: ...


L = TypeVar("L", bound=LoggedWrite)


def log_repair(open_writes: Iterable[L]) -> L | None:
    """The committed write among a card's open writes (it is there only because its log block
    was never confirmed on the card): its log block is written again once the next write to the
    card has landed (unless that write's own log entry takes the same block)."""
    return next((w for w in open_writes if w.state is WriteState.COMMITTED), None)


# ---- an issue onto a card held to a reader --------------------------------------------------

class IssueStep(str, Enum):
    COMPLETE = "complete"  # an earlier cut-off issue landed: commit it, collect nothing again
    ISSUE = "issue"  # a blank card: issue it
    REDO = "redo"  # earlier issues cut off without landing: void them, issue again over them
    ALREADY_ISSUED = "already_issued"  # refused: the card verifies and no issue of ours made it
    NOT_BLANK = "not_blank"  # refused: data this terminal did not write

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class IssuePlan:
    step: IssueStep
    #: COMPLETE: the write to commit; REDO: the writes to void (newest first)
    writes: tuple = ()


def issue_on_card_step(earlier: Sequence[W], verifies: bool, purse_slot: bytes,
                       blank: bool) -> IssuePlan:
    """What an issue onto a card held to a reader does, given this terminal's issues to the
    same card still in doubt (newest first), whether the card verifies with this terminal's
    keys, the bytes of its first purse slot (the slot an issue writes last) and whether every
    user block is zero. A card that verifies holds either one of those issues (complete it) or
    someone's issued card (refuse); one that does not verify is blank, or holds what cut-off
    issues left (void them and issue again), or someone else's data (refuse)."""
    for write in earlier:
        if write.state is not WriteState.INTENT:
            raise ValueError(f"card write {write.state.value}: only writes in doubt are looked at")
    if verifies:
        landed = next((w for w in earlier if w.expected_slot == purse_slot), None)
        if landed is not None:
            return IssuePlan(IssueStep.COMPLETE, (landed,))
        return IssuePlan(IssueStep.ALREADY_ISSUED)
    if earlier:
        return IssuePlan(IssueStep.REDO, tuple(earlier))
    return IssuePlan(IssueStep.ISSUE if blank else IssueStep.NOT_BLANK)


# ---- a request's checks ---------------------------------------------------------------------

def has_in_doubt(writes: Iterable[Write], kind: str) -> bool:
    """Whether one of a card's writes of ``kind`` is still in doubt: a request of that kind
    made again resolves it (completes it if it landed) rather than being checked afresh."""
    return any(w.state in IN_DOUBT and w.kind == kind for w in writes)
