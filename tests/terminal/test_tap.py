"""The tap transaction over the in-process simulated card: command count, journal, rollback,
writes left in doubt by a card pulled away or a torn block, and every single-bit flip of a card."""

import shutil
from datetime import date, datetime, timedelta, timezone

import pytest

from farebox.cardimage.layout import BLOCK_SIZE, PURSE_SLOT_BLOCKS, USER_BLOCKS
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Reason, RecordType, Tariff
from farebox.terminal.card.tap import TapInterrupted, Terminal
from farebox.terminal.core.writecycle import WriteState

KEYS = published_test_keys()
AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8)))
FARE = Tariff.flat(580)


def new_card(balance_cents=10_000, **fields) -> SimulatedLiteS:
    idm = new_idm()
    request = IssueRequest(issued=date(2026, 1, 15), number=12345678,
                           balance_cents=balance_cents, **fields)
    _, _, blocks = issue(request, KEYS, idm)
    return SimulatedLiteS(idm, blocks=blocks)


def copy_card(card: SimulatedLiteS) -> SimulatedLiteS:
    return SimulatedLiteS(card.idm, card.pmm, list(card.blocks))


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.sqlite3") as journal:
        yield journal


@pytest.fixture
def terminal(journal):
    return Terminal(journal, KEYS)


def pay(terminal, card, tariff=FARE, at=AT):
    return terminal.pay(LiteSSession(InProcessTransport(card)), tariff, at)


def committed_records(journal, number=12345678):
    return [r for r in journal.records(number) if r.write_state is WriteState.COMMITTED]


def types(records):
    return [r.type.value for r in records]


def test_a_payment_uses_six_card_commands_and_one_record(terminal, journal):
    card = new_card()
    result = pay(terminal, card)
    assert result.approved and result.balance_after_cents == 10_000 - 580
    # poll, read 4 + read 2, write purse x2 + log x1 (the write answers confirm it: no read-back)
    assert result.commands == 6
    [record] = committed_records(journal)
    assert (record.type, record.amount_cents, record.balance_before_cents,
            record.balance_after_cents, record.counter_before, record.counter_after) == (
        RecordType.PAYMENT, 580, 10_000, 9_420, 1, 2)
    assert record.at_utc == "2026-11-22T00:00:00Z" and record.clock_trusted
    assert journal.highest_counter(12345678) == 2
    assert journal.verify_chain()


def test_a_decline_writes_nothing_and_records_nothing(terminal, journal):
    card = new_card(balance_cents=0)
    before = list(card.blocks)
    result = pay(terminal, card)
    assert not result.approved and result.reason is Reason.INSUFFICIENT_VALUE
    assert card.blocks == before and journal.records() == []
    assert result.commands == 3  # poll and two reads
    assert journal.highest_counter(12345678) == 1  # but the counter seen is remembered


def test_aavs_reload_makes_two_records_in_one_write(terminal, journal):
    card = new_card(balance_cents=300, aavs_reload_cents=25_000)
    result = pay(terminal, card)
    assert result.approved and result.aavs_reload_cents == 25_000
    assert [r.type for r in result.records] == [RecordType.AUTO_ADD_VALUE, RecordType.PAYMENT]
    records = committed_records(journal)
    assert [(r.type.value, r.balance_before_cents, r.balance_after_cents) for r in records] == [
        ("auto_add_value", 300, 25_300), ("payment", 25_300, 24_720)]
    assert {r.counter_after for r in records} == {2}
    assert result.commands == 6


def test_an_older_copy_of_the_card_is_declined_rollback(terminal):
    card = new_card()
    old = copy_card(card)
    assert pay(terminal, card).approved
    result = pay(terminal, old)
    assert result.reason is Reason.ROLLBACK and old.blocks == copy_card(old).blocks


def test_another_terminal_has_no_memory_of_the_card(terminal, tmp_path):
    card = new_card()
    old = copy_card(card)
    assert pay(terminal, card).approved
    with Journal(tmp_path / "other.sqlite3") as other_journal:
        assert pay(Terminal(other_journal, KEYS), old).approved


def test_a_card_that_is_not_ours_is_invalid(terminal):
    foreign = SimulatedLiteS(new_idm())  # blank Lite-S
    result = pay(terminal, foreign)
    assert result.reason is Reason.INVALID_CARD and result.card_number is None


def test_a_list_ordered_block_is_written_to_the_card_and_journalled(journal):
    from farebox.terminal.core.rules import ListEntry, ListReason
    card = new_card()
    entry = ListEntry(12345678, ListReason.LOST, AT - timedelta(hours=3))
    result = pay(Terminal(journal, KEYS, [entry]), card)
    assert result.reason is Reason.BLOCKED and result.balance_after_cents == 10_000
    assert types(committed_records(journal)) == ["block"]
    again = pay(Terminal(journal, KEYS), card)  # no list any more: the card itself says blocked
    assert again.reason is Reason.BLOCKED and again.commands == 3


# ---- writes in doubt -----------------------------------------------------------------------

WRITE_COMMANDS = 3  # after poll + 2 reads
LATER = AT + timedelta(minutes=5)  # past the 60 s re-tap window


def sum_of_value(journal):
    """What the journal's committed records say the card's balance moved by."""
    moved = 0
    for record in committed_records(journal):
        if record.type in (RecordType.ADD_VALUE, RecordType.AUTO_ADD_VALUE):
            moved += record.amount_cents
        elif record.type is RecordType.PAYMENT:
            moved -= record.amount_cents
    return moved


def present_again(card):
    card.faults = Faults()
    card.in_field = True


@pytest.mark.parametrize("answered", range(0, 2), ids=lambda n: f"card left after {n} write answers")
def test_a_card_pulled_away_before_the_purse_landed_is_void_and_paid_afresh(journal, answered):
    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(leave_after_commands=3 + answered)
    with pytest.raises(TapInterrupted) as interrupted:
        pay(terminal, card)
    assert journal.write_state(interrupted.value.tap_id) is WriteState.INTENT
    present_again(card)
    result = pay(terminal, card)
    assert journal.write_state(interrupted.value.tap_id) is WriteState.VOID
    assert result.approved and result.completed_from is None
    assert (result.balance_before_cents, result.balance_after_cents) == (10_000, 10_000 - 580)
    assert result.balance_after_cents == 10_000 + sum_of_value(journal)


@pytest.mark.parametrize("answered", [2, 3], ids=lambda n: f"card left after {n} write answers")
def test_once_the_purse_has_landed_the_payment_is_approved(journal, answered):
    """The two purse block writes answered: the value moved. A missing log block answer does not
    make the customer tap again; the next write to the card writes that log block again."""
    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(leave_after_commands=3 + answered)
    result = pay(terminal, card)
    assert result.approved and result.balance_after_cents == 10_000 - 580
    write = journal.write(result.tap_id)
    assert write.state is WriteState.COMMITTED and write.log_confirmed == (answered == 3)


def test_a_retap_after_a_lost_confirmation_completes_the_tap_and_charges_nothing_more(journal):
    """The purse landed but the card left before answering: the customer is told to tap again.
    The re-tap finds the write on the card and reports that payment; it does not pay twice."""
    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(tear_write_number=2, tear_bytes=16)  # lands whole, no answer
    with pytest.raises(TapInterrupted) as interrupted:
        pay(terminal, card)
    present_again(card)
    result = pay(terminal, card, at=AT + timedelta(seconds=20))
    assert result.approved and result.completed_from == interrupted.value.tap_id
    assert (result.balance_before_cents, result.balance_after_cents) == (10_000, 9_420)
    assert result.commands == 4  # poll, 2 reads, and the log block it never confirmed
    assert types(committed_records(journal)) == ["payment"]
    again = pay(terminal, card, at=AT + timedelta(seconds=30))  # a new tap: a new payment
    assert again.completed_from is None and again.balance_after_cents == 9_420 - 580


def test_an_add_value_retap_completes_too(journal):
    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(tear_write_number=2, tear_bytes=16)
    with pytest.raises(TapInterrupted):
        terminal.add_value(LiteSSession(InProcessTransport(card)), 10_000, AT)
    present_again(card)
    result = terminal.add_value(LiteSSession(InProcessTransport(card)), 10_000, AT)
    assert result.completed_from and result.balance_after_cents == 20_000
    assert sum_of_value(journal) == 10_000


def test_a_retap_for_another_kind_of_request_is_served_as_new(journal):
    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(tear_write_number=2, tear_bytes=16)
    with pytest.raises(TapInterrupted) as interrupted:
        pay(terminal, card)
    present_again(card)
    result = terminal.add_value(LiteSSession(InProcessTransport(card)), 10_000, AT)
    assert result.completed_from is None
    assert journal.write_state(interrupted.value.tap_id) is WriteState.COMMITTED
    assert result.balance_before_cents == 9_420 and result.balance_after_cents == 19_420


def test_past_the_retap_window_the_tap_is_resolved_and_the_new_one_served(journal):
    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(tear_write_number=2, tear_bytes=16)
    with pytest.raises(TapInterrupted) as interrupted:
        pay(terminal, card)
    present_again(card)
    result = pay(terminal, card, at=LATER)
    assert result.completed_from is None and result.balance_after_cents == 9_420 - 580
    assert journal.write_state(interrupted.value.tap_id) is WriteState.COMMITTED
    assert types(committed_records(journal)) == ["payment", "payment"]


def test_the_retap_window_is_configurable(journal):
    terminal = Terminal(journal, KEYS, retap_window_s=600)
    card = new_card()
    card.faults = Faults(tear_write_number=2, tear_bytes=16)
    with pytest.raises(TapInterrupted):
        pay(terminal, card)
    present_again(card)
    assert pay(terminal, card, at=LATER).completed_from is not None


def test_a_retap_of_a_write_that_never_landed_runs_afresh_within_the_window(journal):
    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(tear_write_number=2, tear_bytes=5)  # the slot is torn: never landed
    with pytest.raises(TapInterrupted) as interrupted:
        pay(terminal, card)
    present_again(card)
    result = pay(terminal, card, at=AT + timedelta(seconds=5))
    assert result.completed_from is None and result.balance_after_cents == 9_420
    assert journal.write_state(interrupted.value.tap_id) is WriteState.VOID


@pytest.mark.parametrize("write_number", [1, 2, 3])
@pytest.mark.parametrize("tear_bytes", [0, 5, 16])
def test_a_torn_block_write_is_treated_as_torn_not_rollback(journal, write_number, tear_bytes):
    terminal = Terminal(journal, KEYS)
    card = new_card()
    assert pay(terminal, card).approved  # history: counter 2 committed
    card.faults = Faults(tear_write_number=write_number, tear_bytes=tear_bytes)
    if write_number == 3:  # the log block: the purse landed and answered, approved at once
        first = pay(terminal, card)
        assert first.approved and not journal.write(first.tap_id).log_confirmed
        tap_id = first.tap_id
    else:
        with pytest.raises(TapInterrupted) as interrupted:
            pay(terminal, card)
        tap_id = interrupted.value.tap_id
    present_again(card)
    result = pay(terminal, card, at=LATER)
    landed = write_number == 3 or (write_number == 2 and tear_bytes == 16)
    assert result.approved and result.reason is None
    assert journal.write_state(tap_id) is (WriteState.COMMITTED if landed else WriteState.VOID)
    assert result.balance_after_cents == 10_000 + sum_of_value(journal)


def test_a_torn_log_block_is_written_again_by_the_next_write(journal, tmp_path):
    from farebox.terminal.card.present import read_card
    from farebox.terminal.ops.cardview import history

    terminal = Terminal(journal, KEYS)
    card = new_card()
    card.faults = Faults(tear_write_number=3, tear_bytes=5)  # the log block of counter 2 tears
    first = pay(terminal, card)
    present_again(card)
    torn = read_card(LiteSSession(InProcessTransport(card)), KEYS)
    assert torn.unreadable_log_blocks == 1 and [e.counter for e in torn.log] == [1]
    second = pay(terminal, card, at=LATER)
    assert second.commands == 7  # 6, and the repaired log block
    assert journal.write(first.tap_id).log_confirmed
    image = read_card(LiteSSession(InProcessTransport(card)), KEYS)
    assert image.unreadable_log_blocks == 0
    assert [(line.entry.counter, line.balance_after_cents) for line in history(image)] == [
        (3, 10_000 - 2 * 580), (2, 10_000 - 580), (1, 10_000)]
    third = pay(terminal, card, at=LATER)
    assert third.commands == 6  # nothing left to repair


def test_an_intent_is_not_resolved_by_an_older_copy(journal):
    terminal = Terminal(journal, KEYS)
    card = new_card()
    assert pay(terminal, card).approved
    old = copy_card(card)  # counter 2
    assert pay(terminal, card).approved  # counter 3
    card.faults = Faults(tear_write_number=2, tear_bytes=16)  # counter 4 lands, no answer
    with pytest.raises(TapInterrupted) as interrupted:
        pay(terminal, card)
    assert pay(terminal, old).reason is Reason.ROLLBACK
    assert journal.write_state(interrupted.value.tap_id) is WriteState.INTENT


# ---- every single-bit flip -----------------------------------------------------------------

def flips(card: SimulatedLiteS):
    for block in range(USER_BLOCKS):
        for bit in range(BLOCK_SIZE * 8):
            flipped = bytearray(card.blocks[block])
            flipped[bit // 8] ^= 1 << (bit % 8)
            copy = copy_card(card)
            copy.blocks[block] = bytes(flipped)
            yield block, bit, copy


def test_no_single_bit_flip_makes_a_tap_see_a_wrong_balance(tmp_path):
    """The terminal that committed the newest state: invalid_card, rollback (only for a flip in
    the newest purse slot, which exposes the previous one) or a normal tap on the true balance."""
    state = tmp_path / "state.sqlite3"
    with Journal(state) as journal:
        terminal = Terminal(journal, KEYS)
        card = new_card(balance_cents=2_000)
        for _ in range(3):
            assert pay(terminal, card).approved
        true_balance, newest_slot = 2_000 - 3 * 580, PURSE_SLOT_BLOCKS[1]  # counter 4 is in slot 1
    outcomes = {}
    for block, bit, flipped in flips(card):
        copy = tmp_path / f"s{block}.sqlite3"
        shutil.copyfile(state, copy)
        with Journal(copy, durable=False) as journal:
            result = pay(Terminal(journal, KEYS), flipped)
        key = result.reason.value if result.reason else "approved"
        outcomes.setdefault(block, set()).add(key)
        if result.reason is Reason.INVALID_CARD:
            continue
        if result.reason is Reason.ROLLBACK:
            assert block in newest_slot, (block, bit)
            continue
        assert result.balance_before_cents == true_balance, (block, bit)
    assert outcomes[0] == outcomes[1] == {"invalid_card"}
    assert outcomes[newest_slot[0]] == outcomes[newest_slot[1]] == {"rollback"}
    assert outcomes[2] == outcomes[3] == {"approved"}  # the previous slot is not consulted
    assert all(outcomes[b] == {"approved"} for b in range(6, 14))


def test_a_flip_in_the_newest_slot_after_an_unconfirmed_write_is_torn_not_rollback(tmp_path):
    state = tmp_path / "state.sqlite3"
    with Journal(state) as journal:
        terminal = Terminal(journal, KEYS)
        card = new_card(balance_cents=2_000)
        assert pay(terminal, card).approved  # counter 2 in slot 1, committed
        card.faults = Faults(tear_write_number=2, tear_bytes=16)  # counter 3 lands, unanswered
        with pytest.raises(TapInterrupted) as interrupted:
            pay(terminal, card)
    checked = 0
    for block, bit, flipped in flips(card):
        if block not in PURSE_SLOT_BLOCKS[0] or bit % 7:
            continue
        copy = tmp_path / f"c{block}-{bit}.sqlite3"
        shutil.copyfile(state, copy)
        with Journal(copy, durable=False) as journal:
            result = pay(Terminal(journal, KEYS), flipped)
            assert result.approved and result.balance_before_cents == 2_000 - 580
            assert journal.write_state(interrupted.value.tap_id) is WriteState.VOID
        checked += 1
    assert checked == 2 * 19


# ---- restored copies -----------------------------------------------------------------------

def test_a_copy_written_elsewhere_to_the_same_counter_is_a_fork_and_declined(terminal, tmp_path):
    card = new_card()
    copy = copy_card(card)
    assert pay(terminal, card).approved  # this terminal knows counter 2 with its bytes
    with Journal(tmp_path / "other.sqlite3") as other:
        assert pay(Terminal(other, KEYS), copy, Tariff.flat(100)).approved  # counter 2, other bytes
    result = pay(terminal, copy)
    assert result.reason is Reason.ROLLBACK and result.counter == 2


def test_a_void_whose_write_turns_up_later_is_committed_late(journal):
    """Pull the card away after an AAVS reload landed, show the terminal the image from before
    (it voids the write: it looks torn), then the real card: the reload is recorded after all."""
    terminal = Terminal(journal, KEYS)
    card = new_card(balance_cents=300, aavs_reload_cents=25_000)
    before = copy_card(card)
    card.faults = Faults(tear_write_number=2, tear_bytes=16)  # both purse blocks land, unanswered
    with pytest.raises(TapInterrupted) as interrupted:
        pay(terminal, card)
    declined = pay(terminal, before, Tariff.flat(50_000))  # too dear even with a reload
    assert declined.reason is Reason.INSUFFICIENT_VALUE
    assert journal.write_state(interrupted.value.tap_id) is WriteState.VOID
    present_again(card)
    result = pay(terminal, card, at=LATER)
    assert result.approved and result.balance_before_cents == 300 + 25_000 - 580
    assert journal.write_state(interrupted.value.tap_id) is WriteState.COMMITTED
    assert types(committed_records(journal)) == ["auto_add_value", "payment", "payment"]


def test_identical_retries_after_torn_writes_are_committed_once(journal):
    """Three attempts at the same payment write the same bytes (same day, same fare); the first
    two never land, the third does: one payment, one reload, not three."""
    terminal = Terminal(journal, KEYS)
    card = new_card(balance_cents=0, aavs_reload_cents=15_000)
    tap_ids = []
    for write, tear in ((1, 0), (1, 0), (2, 16)):
        card.faults = Faults(tear_write_number=write, tear_bytes=tear)
        with pytest.raises(TapInterrupted) as interrupted:
            pay(terminal, card, Tariff.flat(1))
        tap_ids.append(interrupted.value.tap_id)
        present_again(card)
    result = pay(terminal, card, Tariff.flat(1))  # the re-tap completes the third attempt
    assert [journal.write_state(t) for t in tap_ids] == ["void", "void", "committed"]
    assert result.completed_from == tap_ids[2] and result.balance_after_cents == 15_000 - 1
    assert types(committed_records(journal)) == ["auto_add_value", "payment"]
