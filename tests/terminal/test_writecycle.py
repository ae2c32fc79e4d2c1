"""The write life cycle (terminal/core/writecycle.py) as tables: every pair of states, legal or
not, and each decision the shells take from what a card shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import product

import pytest

from farebox.terminal.core.writecycle import (
    TRANSITIONS, IllegalTransition, IssueStep, WriteState, check_transition, has_in_doubt,
    issue_on_card_step, log_repair, resolution, resolve_open_writes, retap_completes,
)

I, C, V, U = WriteState.INTENT, WriteState.COMMITTED, WriteState.VOID, WriteState.UNRESOLVED

#: the life cycle, written out independently of TRANSITIONS
LEGAL = {(I, C), (I, V), (I, U), (V, C)}


@pytest.mark.parametrize("old,new", list(product(WriteState, repeat=2)),
                         ids=lambda s: s.value)
def test_every_pair_of_states(old, new):
    if (old, new) in LEGAL:
        check_transition(old, new)
        assert new in TRANSITIONS[old]
    else:
        with pytest.raises(IllegalTransition, match=f"from {old.value} to {new.value}"):
            check_transition(old, new)
        assert new not in TRANSITIONS[old]


def test_the_table_names_every_state():
    assert set(TRANSITIONS) == set(WriteState)


AT = datetime(2026, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=8)))


@dataclass(frozen=True)
class W:
    """A journalled write, as the decisions see it."""

    state: WriteState
    counter_before: int
    counter_after: int
    expected_slot: bytes
    kind: str = "payment"
    outcome: dict | None = None
    created: datetime = AT
    log_block: int | None = None
    name: str = ""


NEW, OTHER, OLD = b"new", b"other", b"old"


# card counter, the verified slots' bytes by counter -> what the card shows about a 5 -> 6 write
RESOLUTIONS = [
    # an intent
    (I, 6, {6: NEW, 5: OLD}, C),  # its bytes are there
    (I, 6, {6: OTHER, 5: OLD}, V),  # another write made counter 6: this one never landed
    (I, 5, {5: OLD, 4: OLD}, V),  # the card still shows where it started: it never landed
    (I, 7, {7: OTHER, 6: NEW}, C),  # moved on, and the previous slot still shows it
    (I, 7, {7: OTHER, 6: OTHER}, V),
    (I, 8, {8: OTHER, 7: OTHER}, U),  # moved on and the slot is gone: reconciliation
    (I, 4, {4: OLD, 3: OLD}, None),  # an older copy of the card says nothing
    (I, 5, {5: OLD}, V),  # torn: only the slot it started from verifies
    # a void
    (V, 6, {6: NEW, 5: OLD}, C),  # its exact bytes turned up after all: committed late
    (V, 7, {7: OTHER, 6: NEW}, C),
    (V, 6, {6: OTHER, 5: OLD}, None),  # a void is not voided again
    (V, 5, {5: OLD}, None),
    (V, 8, {8: OTHER, 7: OTHER}, None),  # nor made unresolved
    (V, 4, {4: OLD}, None),
]


@pytest.mark.parametrize("state,counter,slots,expected", RESOLUTIONS)
def test_what_the_card_shows_about_a_write(state, counter, slots, expected):
    assert resolution(W(state, 5, 6, NEW), counter, slots) is expected
    if expected is not None:
        check_transition(state, expected)  # every decision is a legal transition


def test_open_writes_are_resolved_newest_first():
    retry = W(I, 5, 6, NEW, name="retry")  # newest
    voided = W(V, 5, 6, NEW, name="voided")  # an identical earlier attempt
    older = W(I, 3, 4, b"x", name="older")
    repair = W(C, 4, 5, OLD, name="repair")  # only there for its log block
    changes = resolve_open_writes([retry, voided, repair, older], 6, {6: NEW, 5: OLD})
    # the retry made counter 6: the earlier void cannot have made it too, and the writes below
    # that counter are left as they are
    assert [(w.name, s) for w, s in changes] == [("retry", C)]
    changes = resolve_open_writes([voided, repair, older], 6, {6: NEW, 5: OLD})
    assert [(w.name, s) for w, s in changes] == [("voided", C)]
    changes = resolve_open_writes([retry, older], 5, {5: OLD, 4: b"y"})
    assert [(w.name, s) for w, s in changes] == [("retry", V), ("older", V)]


@pytest.mark.parametrize("writes,counter,slots,expected", [
    ([W(I, 5, 6, NEW)], 5, {5: OLD}, [V]),
    ([W(V, 5, 6, NEW)], 5, {5: OLD}, []),  # unchanged: nothing to record
    ([W(V, 5, 6, NEW)], 7, {7: OTHER, 6: NEW}, [C]),
    ([W(I, 6, 7, b"b"), W(I, 5, 6, NEW)], 7, {7: b"b", 6: NEW}, [C]),  # the older is left
    ([W(I, 6, 7, b"b"), W(I, 5, 6, NEW)], 6, {6: NEW, 5: OLD}, [V, C]),
    ([W(C, 5, 6, NEW)], 6, {6: NEW}, []),
    ([], 6, {6: NEW}, []),
])
def test_resolve_open_writes(writes, counter, slots, expected):
    assert [s for _, s in resolve_open_writes(writes, counter, slots)] == expected


WINDOW = timedelta(seconds=60)
DONE = {"approved": True}


@pytest.mark.parametrize("resolved,expected", [
    ([(I, W(C, 5, 6, NEW, outcome=DONE, name="cut"))], "cut"),
    ([(I, W(C, 5, 6, NEW, kind="add_value", outcome=DONE))], None),  # another request
    ([(I, W(C, 5, 6, NEW, outcome=DONE, created=AT - timedelta(seconds=61)))], None),
    ([(I, W(C, 5, 6, NEW, outcome=DONE, created=AT - timedelta(seconds=60), name="edge"))],
     "edge"),
    ([(I, W(C, 4, 5, NEW, outcome=DONE))], None),  # not what the card shows now
    ([(I, W(C, 5, 6, NEW, outcome=None))], None),  # nothing to report again (an issue)
    ([(I, W(V, 5, 6, NEW, outcome=DONE))], None),  # it never landed: served afresh
    ([(I, W(U, 5, 6, NEW, outcome=DONE))], None),
    # a void committed late is not the tap being re-tapped; the newest intent decides
    ([(V, W(C, 5, 6, NEW, outcome=DONE)), (I, W(C, 5, 6, NEW, outcome=DONE, name="intent"))],
     "intent"),
    ([(I, W(V, 5, 6, OTHER, outcome=DONE)), (I, W(C, 5, 6, NEW, outcome=DONE))], None),
    ([], None),
])
def test_which_retap_completes_a_cut_off_tap(resolved, expected):
    found = retap_completes(resolved, "payment", 6, AT, WINDOW)
    assert (found and found.name) == expected


@pytest.mark.parametrize("writes,expected", [
    ([W(I, 5, 6, NEW), W(C, 4, 5, OLD, log_block=9, name="log")], "log"),
    ([W(I, 5, 6, NEW), W(V, 4, 5, OLD)], None),
    ([], None),
])
def test_the_log_block_written_again(writes, expected):
    found = log_repair(writes)
    assert (found and found.name) == expected


ISSUE_A, ISSUE_B = W(I, 0, 1, b"slot-a", "issue", name="a"), W(I, 0, 1, b"slot-b", "issue",
                                                                name="b")


@pytest.mark.parametrize("earlier,verifies,slot,blank,step,writes", [
    ([], False, bytes(48), True, IssueStep.ISSUE, []),
    ([], False, bytes(48), False, IssueStep.NOT_BLANK, []),
    ([], True, b"slot-a", False, IssueStep.ALREADY_ISSUED, []),
    ([ISSUE_B, ISSUE_A], True, b"slot-a", False, IssueStep.COMPLETE, ["a"]),
    ([ISSUE_B, ISSUE_A], True, b"slot-c", False, IssueStep.ALREADY_ISSUED, []),
    ([ISSUE_B, ISSUE_A], False, bytes(48), False, IssueStep.REDO, ["b", "a"]),
    ([ISSUE_A], False, bytes(48), True, IssueStep.REDO, ["a"]),
])
def test_an_issue_onto_a_card_on_a_reader(earlier, verifies, slot, blank, step, writes):
    plan = issue_on_card_step(earlier, verifies, slot, blank)
    assert plan.step is step and [w.name for w in plan.writes] == writes


def test_an_issue_looks_only_at_writes_in_doubt():
    with pytest.raises(ValueError, match="in doubt"):
        issue_on_card_step([W(V, 0, 1, b"slot-a", "issue")], False, bytes(48), True)


@pytest.mark.parametrize("writes,expected", [
    ([W(I, 5, 6, NEW, "return")], True),
    ([W(I, 5, 6, NEW, "payment")], False),
    ([W(V, 5, 6, NEW, "return")], False),
    ([W(C, 5, 6, NEW, "return"), W(I, 4, 5, NEW, "return")], True),
    ([], False),
])
def test_a_request_of_a_kind_in_doubt(writes, expected):
    assert has_in_doubt(writes, "return") is expected
