"""A stateful model of one card at one terminal through the whole shell (journal + simulated card)
with cards pulled away mid-write, torn blocks and old copies presented: the journal's committed
records always explain the card's balance to the cent, and the counter never goes backwards."""

from datetime import date, datetime, timedelta, timezone

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from farebox.cardimage.image import decode_image
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Reason, Tariff
from farebox.terminal.card.tap import TapInterrupted, Terminal
from farebox.terminal.core.writecycle import WriteState

KEYS = published_test_keys()
START = datetime(2026, 11, 1, 7, 0, tzinfo=timezone(timedelta(hours=8)))
SIGN = {"payment": -1, "auto_add_value": 1, "add_value": 1, "block": 0, "suspend": 0, "cancel": 0}


class OneCardOneTerminal(RuleBasedStateMachine):
    @initialize(balance=st.integers(0, 20_000), aavs=st.sampled_from([0, 15_000, 25_000]))
    def start(self, balance, aavs):
        import tempfile
        self._folder = tempfile.TemporaryDirectory()
        self.journal = Journal(f"{self._folder.name}/j.sqlite3", durable=False)
        self.terminal = Terminal(self.journal, KEYS)
        idm = new_idm()
        _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 1), number=31415926,
                                          balance_cents=balance, aavs_reload_cents=aavs), KEYS, idm)
        self.card = SimulatedLiteS(idm, blocks=blocks)
        self.initial = balance
        self.now = START
        self.copies = []
        self.highest_seen = 1

    def teardown(self):
        if not hasattr(self, "journal"):
            return
        try:
            # one more ordinary tap settles whatever is in doubt; then the books must balance
            self.tap(("pay", 1))
            assert not [w for w in self.journal.unresolved_writes(31415926)
                        if w.state is WriteState.INTENT]
            self.journal_explains_the_card()
        finally:
            self.journal.close()
            self._folder.cleanup()

    def _tap(self, card, action, gap=timedelta(minutes=37)):
        self.now += gap
        session = LiteSSession(InProcessTransport(card))
        self.interrupted = None
        try:
            if action[0] == "pay":
                return self.terminal.pay(session, Tariff.flat(action[1]), self.now)
            return self.terminal.add_value(session, action[1], self.now)
        except TapInterrupted as error:
            self.interrupted = (error.tap_id, action)
            return None
        finally:
            card.faults = Faults()
            card.in_field = True

    @staticmethod
    def _purse(card):
        return decode_image(dict(enumerate(card.blocks)), card.idm,
                            lambda v: KEYS.card_key(v, card.idm)).purse

    def _counter(self, card):
        return self._purse(card).counter

    actions = st.tuples(st.just("pay"), st.integers(1, 9_000)) | st.tuples(
        st.just("add"), st.integers(5_000, 60_000))

    @rule(action=actions)
    def tap(self, action):
        result = self._tap(self.card, action)
        assert result is not None and result.reason is not Reason.ROLLBACK, result
        if not result.approved:
            assert result.balance_after_cents == result.balance_before_cents

    @rule(action=actions, answered=st.integers(0, 3))
    def pulled_away(self, action, answered):
        self.card.faults = Faults(leave_after_commands=3 + answered)
        self._tap(self.card, action)

    @rule(action=actions, write=st.integers(1, 3), torn=st.integers(0, 16))
    def torn_write(self, action, write, torn):
        self.card.faults = Faults(tear_write_number=write, tear_bytes=torn)
        self._tap(self.card, action)

    @rule(torn=st.integers(0, 16), gap_s=st.integers(1, 90))
    def retap_after_a_lost_answer(self, torn, gap_s):
        """The customer taps again soon after a tap was cut off: within the window a write that
        landed is reported, never charged again; otherwise the request is served afresh."""
        action = ("pay", 580)
        self.card.faults = Faults(tear_write_number=2, tear_bytes=torn)
        self._tap(self.card, action)
        if self.interrupted is None:
            return  # declined: nothing was written
        tap_id, _ = self.interrupted
        records_before = len(self.journal.records(31415926))
        result = self._tap(self.card, action, gap=timedelta(seconds=gap_s))
        landed = self.journal.write_state(tap_id) is WriteState.COMMITTED
        if landed and gap_s <= 60:
            assert result.completed_from == tap_id
            assert len(self.journal.records(31415926)) == records_before
        else:
            assert result.completed_from is None

    @rule()
    def keep_a_copy(self):
        self.copies.append(SimulatedLiteS(self.card.idm, self.card.pmm, list(self.card.blocks)))

    @rule(data=st.data())
    def present_an_old_copy(self, data):
        if not self.copies:
            return
        copy = data.draw(st.sampled_from(self.copies))
        counter_before = self._counter(copy)
        known = self.journal.highest_counter(31415926) or 0
        result = self._tap(copy, ("pay", 100))
        if counter_before < known:
            assert result.reason is Reason.ROLLBACK
        if self._counter(copy) != counter_before:
            # A copy no older than anything this terminal verified is, to it, the card: it was
            # accepted and written, so it is now the live card and the other one the stale copy.
            self.copies.remove(copy)
            self.copies.append(self.card)
            self.card = copy

    @invariant()
    def journal_explains_the_card(self):
        if not hasattr(self, "journal"):
            return
        purse = self._purse(self.card)
        balance, counter = purse.balance_cents, purse.counter
        assert counter >= self.highest_seen
        self.highest_seen = counter
        if self.journal.unresolved_writes(31415926):
            return  # resolved at the next tap of this card (see teardown)
        records = self.journal.records(31415926)
        committed = sum(SIGN[r.type.value] * r.amount_cents for r in records
                        if r.write_state is WriteState.COMMITTED)
        assert balance == self.initial + committed
        assert self.journal.verify_chain()


OneCardOneTerminal.TestCase.settings = settings(max_examples=150, stateful_step_count=30,
                                                deadline=None)
TestOneCardOneTerminal = OneCardOneTerminal.TestCase
