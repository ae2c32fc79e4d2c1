"""A stateful model of settlement: two terminals, three AAVS cards, taps and add values, cards
pulled away and torn writes, crashes that lose what was not yet durable, batch closes, uploads
whose acknowledgements are lost, duplicate uploads, day changes and clocks that jump back.

The receiver is the real service (``clearing/service.py`` over a SQLite store); the upload is
the real ``upload()`` over httpx, its transport an in-process hand-off to the service (real HTTP
is tested in tests/tools/test_clearing_http.py), which can lose the answer after the receiver
stored the batch.

Always: the receiver holds no record a journal does not hold committed, every (terminal, seq,
state) once, and no card is reloaded by AAVS twice on one Hong Kong day. At the end, after every
card is presented once more at every terminal and everything is closed and uploaded: each card's
balance is its initial value less the payments and plus the loads the receiver settled."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from farebox.cardimage.image import decode_image
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.clearing.service import Receiver, Refused
from farebox.clearing.store import Store
from farebox.terminal.core.clock import hk_date, parse_utc
from farebox.terminal.store.identity import init_identity
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.store.journal import Journal
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import Tariff
from farebox.terminal.store.settlement import Settlement
from farebox.terminal.card.tap import TapInterrupted, Terminal
from farebox.terminal.link.upload import clearing_house, upload

KEYS = published_test_keys()
START = datetime(2026, 11, 1, 7, 0, tzinfo=timezone(timedelta(hours=8)))
CARDS = (40_000_001, 40_000_002, 40_000_003)
SIGN = {"payment": -1, "auto_add_value": 1, "add_value": 1}


class Station:
    """One terminal: its state directory, journal, shell and batches."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder / name
        self.identity = init_identity(self.folder, name, START)
        self.name = name
        self.open()

    def open(self) -> None:
        self.journal = Journal(self.folder / "journal.sqlite3", durable=False,
                               terminal_id=self.name)
        self.terminal = Terminal(self.journal, KEYS)
        self.settlement = Settlement(self.journal, self.identity)

    def crash(self) -> None:
        """The process dies: what it committed stays with the file (the marks included)."""
        self.journal._db.close()  # noqa: SLF001 - gone without sync()
        self.open()

    def power_cut(self, durable: Path | None) -> None:
        """The power goes: the journal is what was durable (``durable``, a copy taken when the
        intent had just been synced), or, with nothing written to a card, what it committed."""
        self.journal._db.close()  # noqa: SLF001
        if durable is not None:
            path = self.folder / "journal.sqlite3"
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            path.write_bytes(durable.read_bytes())
            durable.unlink()
        self.open()

    def committed(self) -> list:
        return [r for r in self.journal.records() if r.write_state.value == "committed"]


class Settling(RuleBasedStateMachine):
    @initialize(balances=st.lists(st.integers(0, 3_000), min_size=3, max_size=3))
    def start(self, balances):
        self._folder = tempfile.TemporaryDirectory()
        folder = Path(self._folder.name)
        self.stations = [Station(folder, "T-A"), Station(folder, "T-B")]
        self.store = Store(str(folder / "clearing.sqlite3"))
        self.receiver = Receiver(self.store)
        for station in self.stations:
            self.store.enroll(station.name, station.identity.public_key.hex(), "x")
        self.cards, self.initial = [], {}
        for number, balance in zip(CARDS, balances):
            idm = new_idm()
            _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 1), number=number,
                                              balance_cents=balance, aavs_reload_cents=25_000),
                                 KEYS, idm)
            self.cards.append(SimulatedLiteS(idm, blocks=blocks))
            self.initial[number] = balance
        self.now = START
        self.lose_next_ack = False

    def teardown(self):
        if not hasattr(self, "stations"):
            return
        try:
            for station in self.stations:  # every card once more everywhere: nothing in doubt
                for card in self.cards:
                    self._tap(station, card, ("pay", 1), timedelta(minutes=5))
            for station in self.stations:
                while station.settlement.close_batch(self.now) is not None:
                    pass
                result = self._upload(station)
                assert result.complete and result.pending == 0, result
                assert station.settlement.held_back() == 0
            self.books_balance()
        finally:
            for station in self.stations:
                station.journal.close()
            self.store.close()
            self._folder.cleanup()

    # -- helpers --

    def _tap(self, station, card, action, gap, *, idle=True):
        self.now += gap
        session = LiteSSession(InProcessTransport(card))
        try:
            if action[0] == "pay":
                station.terminal.pay(session, Tariff.flat(action[1]), self.now)
            else:
                station.terminal.add_value(session, action[1], self.now)
        except TapInterrupted:
            pass
        finally:
            card.faults = Faults()
            card.in_field = True
        if idle:
            station.terminal.idle()

    def _upload(self, station):
        def hand_off(request: httpx.Request) -> httpx.Response:
            try:
                ack = self.receiver.ingest(json.loads(request.content), "2026-11-01T00:00:00Z")
            except Refused as refused:
                return httpx.Response(refused.status, json={"error": refused.reason})
            if self.lose_next_ack:
                self.lose_next_ack = False
                return httpx.Response(502, json={"error": "gateway lost the answer"})
            return httpx.Response(200, json=self.receiver.sign_ack(ack).to_json())

        house = clearing_house("http://clearing.invalid", self.receiver.public_key,
                               insecure_http=True)  # an in-process hand-off: nothing crosses
        with httpx.Client(transport=httpx.MockTransport(hand_off)) as client:
            return upload(station.settlement, house, lambda: self.now,
                          client=client, attempts=3, sleep=lambda s: None)

    def _balance(self, card):
        return decode_image(dict(enumerate(card.blocks)), card.idm,
                            lambda v: KEYS.card_key(v, card.idm)).purse.balance_cents

    # -- rules --

    stations_ = st.integers(0, 1)
    cards_ = st.integers(0, 2)
    actions = st.tuples(st.just("pay"), st.integers(100, 3_000)) | st.tuples(
        st.just("add"), st.integers(5_000, 20_000))

    @rule(station=stations_, card=cards_, action=actions, minutes=st.integers(1, 600))
    def tap(self, station, card, action, minutes):
        self._tap(self.stations[station], self.cards[card], action, timedelta(minutes=minutes))

    @rule(station=stations_, card=cards_, action=actions, answered=st.integers(0, 3))
    def pulled_away(self, station, card, action, answered):
        self.cards[card].faults = Faults(leave_after_commands=3 + answered)
        self._tap(self.stations[station], self.cards[card], action, timedelta(minutes=3))

    @rule(station=stations_, card=cards_, write=st.integers(1, 3), torn=st.integers(0, 16))
    def torn_write(self, station, card, write, torn):
        self.cards[card].faults = Faults(tear_write_number=write, tear_bytes=torn)
        self._tap(self.stations[station], self.cards[card], ("pay", 500), timedelta(minutes=3))

    @rule(station=stations_)
    def crash(self, station):
        self.stations[station].crash()

    @rule(station=stations_, card=cards_, action=actions)
    def power_cut_mid_tap(self, station, card, action):
        """The power goes while the card is still on the reader: the commit mark (committed,
        not synced) is lost with everything after the intent's fsync."""
        station, card = self.stations[station], self.cards[card]
        durable = station.folder / "durable.sqlite3"

        def keep(_card):  # the card's first landed write: the intent is durable
            if not durable.exists():
                with sqlite3.connect(durable) as copy:
                    station.journal._db.backup(copy)  # noqa: SLF001

        card.on_write = keep
        try:
            self._tap(station, card, action, timedelta(minutes=3), idle=False)
        finally:
            card.on_write = None
        station.power_cut(durable if durable.exists() else None)

    @rule(station=stations_, size=st.integers(1, 5))
    def close_batches(self, station, size):
        settlement = self.stations[station].settlement
        while settlement.close_batch(self.now, size) is not None:
            pass

    @rule(station=stations_, lose_ack=st.booleans())
    def upload(self, station, lose_ack):
        self.lose_next_ack = lose_ack
        self._upload(self.stations[station])
        self.lose_next_ack = False

    @rule(station=stations_)
    def upload_everything_again(self, station):
        """Every acknowledgement lost at once: the whole history is sent again."""
        settlement = self.stations[station].settlement
        settlement.journal.connection.execute("UPDATE batches SET acked_utc = NULL")
        self._upload(self.stations[station])

    @rule()
    def next_day(self):
        self.now += timedelta(days=1)

    @rule(hours=st.integers(1, 48))
    def clock_jumps_back(self, hours):
        self.now -= timedelta(hours=hours)

    # -- invariants --

    @invariant()
    def the_receiver_holds_only_what_happened_once(self):
        if not hasattr(self, "stations"):
            return
        stored = self.store._all(  # noqa: SLF001 - the test reads the store's table directly
            "SELECT t.terminal_id, r.seq, r.state, r.hash "
            "FROM records r JOIN sources s ON s.id = r.source JOIN terminals t ON t.id = s.terminal")
        reconciled = {(t, seq) for t, seq in self.store._all(  # noqa: SLF001
            "SELECT t.terminal_id, r.seq "
            "FROM records r JOIN sources s ON s.id = r.source JOIN terminals t ON t.id = s.terminal "
            "WHERE r.reconciled != 0")}
        keys = [(t, seq, state) for t, seq, state, _ in stored]
        assert len(keys) == len(set(keys))
        journals = {(s.name, r.seq): r.hash for s in self.stations for r in s.journal.records()}
        for terminal_id, seq, state, digest in stored:
            assert journals[(terminal_id, seq)] == digest
        states_here = {(s.name, r.seq): r.write_state.value
                       for s in self.stations for r in s.journal.records()}
        for terminal_id, seq, state, _ in stored:
            if state == "committed":  # as sent, or proved from the card's history
                assert states_here[(terminal_id, seq)] == "committed" or (
                    (terminal_id, seq) in reconciled
                    and states_here[(terminal_id, seq)] in ("intent", "unresolved")), (
                    terminal_id, seq)

    @invariant()
    def the_kept_summaries_agree_with_the_records(self):
        """The day totals, per-source counts, last sequences and gaps the store keeps inside
        each ingest say what a scan of the records says."""
        if not hasattr(self, "stations"):
            return
        from farebox.clearing.report import gaps

        truth = self.store._all(  # noqa: SLF001 - the test reads the store's table directly
            "SELECT state, type, count(*), sum(amount_cents) FROM records "
            "GROUP BY state, type ORDER BY state, type")
        assert self.store.totals() == truth
        sequences = {}
        for terminal_id, incarnation, seq in self.store._all(  # noqa: SLF001
                "SELECT DISTINCT t.terminal_id, s.incarnation, r.seq FROM records r "
                "JOIN sources s ON s.id = r.source JOIN terminals t ON t.id = s.terminal "
                "ORDER BY 1, 2, 3"):
            sequences.setdefault((terminal_id, incarnation), []).append(seq)
        assert self.store.sources() == [
            (t, i, len(seqs), seqs[-1], gaps(seqs)) for (t, i), seqs in sorted(sequences.items())]

    @invariant()
    def aavs_at_most_once_a_hong_kong_day(self):
        if not hasattr(self, "stations"):
            return
        # one physical change per card counter (no card image is restored in this model): a
        # write committed at two terminals (in doubt at one, seen there later) is one reload
        changes = {(r.card_number, r.counter_after): hk_date(parse_utc(r.at_utc))
                   for s in self.stations for r in s.committed()
                   if r.type.value == "auto_add_value"}
        reloads = Counter((card, day) for (card, _), day in changes.items())
        assert all(count == 1 for count in reloads.values()), reloads

    def books_balance(self):
        moved = Counter()
        for card, kind, amount in self.store._all(  # noqa: SLF001
                "SELECT card_number, type, amount_cents FROM records WHERE state = 'committed'"):
            moved[card] += SIGN.get(kind, 0) * amount
        for number, card in zip(CARDS, self.cards):
            assert self._balance(card) == self.initial[number] + moved[number], number


Settling.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestSettling = Settling.TestCase
