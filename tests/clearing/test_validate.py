"""The receiver refuses absurd records from an enrolled terminal: batches signed with a real
terminal's key (its identity signs them as it signs its own), each refused 422 naming the record
and the field, with nothing stored; and every record a real terminal writes passes."""

from __future__ import annotations

import copy
import json
import subprocess
import signal
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from farebox.cardimage.model import Category, Kind, Status
from farebox.clearing.service import Receiver, Refused
from farebox.clearing.store import Store
from farebox.clearing.validate import (
    AMOUNT_MAX_CENTS, BALANCE_MAX_CENTS, BALANCE_MIN_CENTS, RECORD_TYPES, validate_batch,
)
from farebox.protocol.session import LiteSSession
from farebox.protocol.settlement import BatchBody, canonical, record_hash, sha256_hex
from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.card.tap import Terminal
from farebox.terminal.core import rules, service
from farebox.terminal.core.rules import RecordType, Tariff
from farebox.terminal.link.upload import upload_payload
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.store.settlement import Settlement

KEYS = published_test_keys()
HK = timezone(timedelta(hours=8))
AT = datetime(2026, 11, 22, 8, 0, tzinfo=HK)
NOW = datetime(2026, 11, 22, 16, 0, tzinfo=timezone.utc)
RECEIVED = "2026-11-22T16:00:00Z"
CONSOLE_SCRIPT = Path(sys.executable).parent / "farebox"


def new_card(number=12345678, **fields) -> SimulatedLiteS:
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=number, **fields), KEYS,
                         idm)
    return SimulatedLiteS(idm, blocks=blocks)


def tap(terminal, card, at, fare=580):
    return terminal.pay(LiteSSession(InProcessTransport(card)), Tariff.flat(fare), at)


class Made:
    """A terminal (identity, journal) with one closed batch: payments, an automatic add value
    and its payment (one write, two records), an add value and a clock reset."""

    def __init__(self, folder: Path) -> None:
        self.identity = init_identity(folder / "t", "T-0001", NOW)
        with Journal(folder / "t" / "journal.sqlite3", terminal_id="T-0001") as journal:
            terminal = Terminal(journal, KEYS)
            card = new_card(balance_cents=300, aavs_reload_cents=25_000)
            assert len(tap(terminal, card, AT).records) == 2  # auto add value + payment
            for minute in (1, 2):
                assert tap(terminal, card, AT + timedelta(minutes=minute)).approved
            other = new_card(number=87654321, balance_cents=1_000)
            added = terminal.add_value(LiteSSession(InProcessTransport(other)), 10_000,
                                       AT + timedelta(minutes=3))
            assert added.approved
            journal.reset_clock(AT + timedelta(minutes=4), "RTC lost")
            settlement = Settlement(journal, self.identity)
            batch = settlement.close_batch(NOW)
            self.upload = upload_payload(settlement, batch)
        self.body = json.loads(self.upload["body"])
        self.types = [item["record"]["type"] for item in self.body["items"]]
        assert self.types == ["auto_add_value", "payment", "payment", "payment", "add_value",
                              "clock_reset"]

    def resigned(self, mutate) -> dict:
        """The upload with its body changed by ``mutate(body)``, every record's hash and the
        totals made to match, signed by the terminal's own key."""
        body = copy.deepcopy(self.body)
        mutate(body)
        for item in body["items"]:
            try:
                item["record"]["hash"] = record_hash(item["record"])
            except (KeyError, TypeError):
                pass  # a field removed: the wire format refuses it before any hash
        try:
            totals: dict = {}
            for item in body["items"]:
                if not isinstance(item["record"]["type"], str):
                    raise TypeError  # refused before the totals are checked
                total = totals.setdefault(item["state"], {}).setdefault(
                    item["record"]["type"], {"count": 0, "amount_cents": 0})
                total["count"] += 1
                total["amount_cents"] += item["record"]["amount_cents"]
            body["totals"] = totals
        except (KeyError, TypeError):
            pass  # an amount that is no number: refused before the totals are checked
        text = canonical(body)
        return {**self.upload, "body": text, "hash": sha256_hex(text),
                "signature": self.identity.sign(text.encode()).hex()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return Made(tmp_path_factory.mktemp("terminal"))


def receiver_for(made: Made, folder: Path | str) -> tuple[Receiver, Store]:
    """A receiver over a fresh store (a SQLite file in ``folder``, or a postgresql:// URL) with
    the terminal enrolled."""
    db = folder if isinstance(folder, str) else str(folder / "clearing.sqlite3")
    store = Store(db)
    store.enroll("T-0001", made.identity.public_key.hex(), "2026-11-22T00:00:00Z")
    return Receiver(store), store


def assert_nothing_stored(made: Made, receiver: Receiver) -> None:
    """The real batch, sent now, is new and none of its records was stored before."""
    ack = receiver.ingest(made.upload, RECEIVED)
    assert not ack.again and ack.duplicates == 0 and ack.records == len(made.types)


def record(body, index):
    return body["items"][index]["record"]


def setter(index, **fields):
    def mutate(body):
        record(body, index).update(fields)
    return mutate


def swap(first, second):
    def mutate(body):
        items = body["items"]
        items[first], items[second] = items[second], items[first]
    return mutate


# (what, mutation, the record named, the field named)
HOSTILE = [
    ("a negative payment", setter(2, amount_cents=-499_597, balance_after_cents=499_597 + 0),
     3, "amount_cents"),
    ("type mint", setter(2, type="mint"), 3, "type"),
    ("a float amount", setter(2, amount_cents=5.8), 3, "amount_cents"),
    ("an amount of 2^63", setter(2, amount_cents=2 ** 63), 3, "amount_cents"),
    ("an amount of 2^64 + 1", setter(2, amount_cents=2 ** 64 + 1), 3, "amount_cents"),
    ("an amount over the card's widest field", setter(4, amount_cents=AMOUNT_MAX_CENTS + 1),
     5, "amount_cents"),
    ("a payment that takes off more than it says", setter(2, amount_cents=1), 3,
     "amount_cents"),
    ("an add value that adds more than it says", setter(4, balance_after_cents=20_000), 5,
     "amount_cents"),
    ("a balance past the stored value limit",
     setter(4, amount_cents=1_000_000, balance_after_cents=1_011_000), 5, "balance_after_cents"),
    ("a balance below the negative limit",
     setter(2, amount_cents=100_000, balance_after_cents=-90_000), 3, "balance_after_cents"),
    ("a counter going backwards", setter(2, counter_after=1), 3, "counter_after"),
    ("a counter that skips", setter(2, counter_after=9), 3, "counter_after"),
    ("a counter no card can advance", setter(2, counter_before=0xFFFFFFFE,
                                             counter_after=0xFFFFFFFF), 3, "counter_before"),
    ("at_utc that is not a time", setter(2, at_utc="yesterday"), 3, "at_utc"),
    ("at_utc on another offset", setter(2, at_utc="2026-11-22T08:01:00+08:00"), 3, "at_utc"),
    ("at_utc without a zone", setter(2, at_utc="2026-11-22T00:01:00"), 3, "at_utc"),
    ("at_utc in month 13", setter(2, at_utc="2026-13-22T00:01:00Z"), 3, "at_utc"),
    ("a card number that is not numeric", setter(4, card_number="8765432x"), 5, "card_number"),
    ("a 9-digit card number", setter(4, card_number=123_456_789), 5, "card_number"),
    ("a negative card number", setter(4, card_number=-1), 5, "card_number"),
    ("a clock reset naming a card", setter(5, card_number=12345678), 6, "card_number"),
    ("a clock reset moving money", setter(5, amount_cents=100), 6, "amount_cents"),
    ("a clock reset with counters", setter(5, counter_before=1, counter_after=2), 6,
     "counter_before"),
    ("a sequence number 0", setter(0, seq=0), 0, "seq"),
    ("sequence numbers going back", swap(2, 3), 3, "seq"),
    ("one sequence number twice", setter(3, seq=3), 3, None),
    ("a tap id of 300 characters", setter(4, tap_id="a" * 300), 5, "tap_id"),
    ("a tap id of 100 characters", setter(4, tap_id="a" * 100), 5, "tap_id"),
    ("a tap id with a space", setter(4, tap_id="a b"), 5, "tap_id"),
    ("a type of 10,000 characters", setter(4, type="x" * 10_000), 5, "type"),
    ("a write's records apart", setter(3, tap_id=None), 4, "tap_id"),
    ("a write's records on two counters", setter(1, counter_before=5, counter_after=6), 2,
     "counter_before"),
    ("a write's records not chaining their balances",
     setter(1, balance_before_cents=4_000, balance_after_cents=3_420), 2,
     "balance_before_cents"),
]


def _fix_apart(body):  # "a write's records apart": record 4 takes record 1's tap id
    record(body, 3)["tap_id"] = record(body, 0)["tap_id"]


HOSTILE = [(what, _fix_apart if what == "a write's records apart" else mutate, seq, field)
           for what, mutate, seq, field in HOSTILE]


@pytest.mark.parametrize("what, mutate, seq, field", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_validly_signed_absurd_batch_is_refused_422_naming_the_record_and_field(
        made, tmp_path, what, mutate, seq, field):
    receiver, store = receiver_for(made, tmp_path)
    with store:
        with pytest.raises(Refused) as refused:
            receiver.ingest(made.resigned(mutate), RECEIVED)
        assert refused.value.status == 422, refused.value.reason
        named = f"record {seq}" if seq else "a record"
        assert named in refused.value.reason, refused.value.reason
        assert field is None or repr(field) in refused.value.reason, refused.value.reason
        assert "\n" not in refused.value.reason and len(refused.value.reason) < 400
        assert_nothing_stored(made, receiver)


def test_on_postgresql_every_absurd_batch_is_refused_and_nothing_stored(made, pg_url):
    receiver, store = receiver_for(made, pg_url)
    with store:
        for what, mutate, seq, field in HOSTILE:
            with pytest.raises(Refused) as refused:
                receiver.ingest(made.resigned(mutate), RECEIVED)
            assert refused.value.status == 422, (what, refused.value.reason)
            assert field is None or repr(field) in refused.value.reason, refused.value.reason
        assert_nothing_stored(made, receiver)


@pytest.mark.parametrize("what, text", [
    ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000),
    ("a 5,000-digit number", '{"format": 1, "batch": ' + "9" * 5_000 + "}"),
    ("a 2 MiB string", json.dumps({"format": 1, "terminal_id": "x" * (2 << 20)})),
])
def test_a_signed_body_that_is_deep_or_huge_json_is_refused_422(made, tmp_path, what, text):
    receiver, store = receiver_for(made, tmp_path)
    with store:
        upload = {**made.upload, "body": text, "hash": sha256_hex(text),
                  "signature": made.identity.sign(text.encode()).hex()}
        with pytest.raises(Refused) as refused:
            receiver.ingest(upload, RECEIVED)
        assert refused.value.status == 422
        assert_nothing_stored(made, receiver)


def test_a_batch_closed_on_another_offset_is_refused(made, tmp_path):
    receiver, store = receiver_for(made, tmp_path)
    with store:
        upload = made.resigned(lambda body: body.update(closed_utc="2026-11-23T00:00:00+08:00"))
        with pytest.raises(Refused) as refused:
            receiver.ingest(upload, RECEIVED)
        assert refused.value.status == 422 and "'closed_utc'" in refused.value.reason


def test_the_real_batch_passes(made):
    validate_batch(BatchBody.parse(made.upload["body"]))


# ---- hypothesis: any field of any record changed ---------------------------------------------

FIELDS = ("seq", "tap_id", "card_number", "counter_before", "counter_after", "type",
          "amount_cents", "balance_before_cents", "balance_after_cents", "at_utc",
          "clock_trusted")
VALUES = st.one_of(
    st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, -(2 ** 63), 99_999_999,
                     100_000_000, BALANCE_MAX_CENTS + 1, BALANCE_MIN_CENTS - 1]),
    st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=40),
    st.sampled_from(sorted(RECORD_TYPES) + ["2026-11-22T00:00:00Z", "2026-11-22T00:00:00+08:00",
                                            "9999-12-31T23:59:59.999999Z"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2))


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(FIELDS), VALUES),
                        min_size=1, max_size=3))
def test_any_mutated_field_is_taken_or_refused_422_never_anything_else(made, tmp_path_factory,
                                                                         changes):
    def mutate(body):
        for index, field, value in changes:
            record(body, index)[field] = value

    folder = tmp_path_factory.mktemp("mutated")
    receiver, store = receiver_for(made, folder)
    with store:
        try:
            ack = receiver.ingest(made.resigned(mutate), RECEIVED)
        except Refused as refused:
            assert refused.status == 422, refused.reason
            assert "record" in refused.reason, refused.reason
            assert_nothing_stored(made, receiver)
        else:  # taken: then it is sane by the rules written out here, independently
            body = copy.deepcopy(made.body)
            mutate(body)
            for item in body["items"]:
                assert_sane(item["record"])
            assert ack.records == len(made.types)


def assert_sane(r: dict) -> None:
    kind = RECORD_TYPES[r["type"]]
    for field in ("seq", "card_number", "counter_before", "counter_after", "amount_cents",
                  "balance_before_cents", "balance_after_cents"):
        assert type(r[field]) is int
    assert 0 <= r["amount_cents"] <= AMOUNT_MAX_CENTS and r["seq"] >= 1
    assert r["at_utc"].endswith("Z")
    if kind == "clock":
        assert r["card_number"] == r["amount_cents"] == r["counter_after"] == 0
        return
    assert 0 <= r["card_number"] <= 99_999_999
    assert r["counter_after"] == r["counter_before"] + 1
    change = r["balance_after_cents"] - r["balance_before_cents"]
    assert change == {"debit": -r["amount_cents"], "credit": r["amount_cents"]}.get(kind, change)


# ---- the lists held together -------------------------------------------------------------------

def test_the_record_types_are_the_terminals():
    assert set(RECORD_TYPES) == {t.value for t in RecordType}


def test_the_balance_range_is_the_widest_the_rules_allow():
    assert BALANCE_MIN_CENTS == -max(rules.NEGATIVE_LIMIT_NEW_CENTS,
                                     rules.NEGATIVE_LIMIT_OLD_CENTS)
    assert BALANCE_MAX_CENTS == max(rules.STORED_VALUE_LIMIT_NEW_CENTS,
                                    rules.STORED_VALUE_LIMIT_OLD_CENTS)


# ---- every decision the terminal's rules make, journaled, passes ----------------------------

DAY = date(2026, 11, 22)
WHEN = datetime(2026, 11, 22, 9, 0, tzinfo=HK)


def _decisions(identity, purse):
    """What the rules decide for this card, each operation that does not refuse."""
    yield rules.decide_payment(identity, purse, Tariff.flat(580), WHEN)
    yield rules.decide_add_value(identity, purse, 10_000, WHEN)
    ordered = rules.list_ordered_change(identity, purse, WHEN, [rules.ListEntry(
        identity.card_number, rules.ListReason.AAVS_SUSPENDED, WHEN - timedelta(days=1))])
    if ordered is not None:
        yield ordered
    for decide in (lambda: service.decide_return(identity, purse, DAY)[0],
                   lambda: service.decide_return(identity, purse, DAY, damaged=True)[0],
                   lambda: service.decide_reactivate(identity, purse, DAY)[0],
                   lambda: service.decide_aavs(identity, purse, DAY, 25_000)[0],
                   lambda: service.decide_aavs(identity, purse, DAY, None)[0],
                   lambda: service.decide_upgrade_limit(identity, purse, DAY)):
        try:
            yield decide()
        except service.ServiceRefused:
            pass


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(list(Kind)), category=st.sampled_from(list(Category)),
       issued=st.dates(date(2010, 1, 1), date(2026, 11, 1)),
       last_add=st.dates(date(2019, 1, 1), date(2026, 11, 22)),
       balance=st.integers(-3_500, 100_000), aavs=st.sampled_from([0, 15_000, 50_000]),
       status=st.sampled_from([Status.ACTIVE, Status.SUSPENDED]),
       counter=st.integers(1, 1_000_000))
def test_every_decision_of_the_rules_journaled_and_batched_passes(
        tmp_path_factory, kind, category, issued, last_add, balance, aavs, status, counter):
    from dataclasses import replace

    from farebox.cardimage.model import Identity, Purse

    identity = Identity(12345678, kind, category, issued, rules.DEPOSIT_CENTS[kind], 1)
    purse = Purse(counter, balance, last_add, aavs_reload_cents=aavs, status=status)
    folder = tmp_path_factory.mktemp("rules")
    terminal_identity = init_identity(folder, "T-0001", NOW)
    with Journal(folder / "journal.sqlite3", terminal_id="T-0001") as journal:
        journaled = 0
        for decision in [*_decisions(identity, purse),
                         *[replace(d, records=d.records + (rules.Record(
                             RecordType.CARD_DATE_AHEAD, 0, d.records[-1].balance_after_cents
                             if d.records else purse.balance_cents),))
                           for d in _decisions(identity, purse) if d.new_purse is not None]]:
            if decision.new_purse is None:
                continue
            journal.record_intent(
                tap_id=f"t{journaled}", card_number=12345678, idm=bytes(8), kind="x",
                counter_before=purse.counter, slot_before=b"", counter_after=purse.counter + 1,
                expected_slot=bytes(32), log_block=6, log_data=bytes(16),
                balance_before_cents=decision.balance_before_cents, records=decision.records,
                outcome={}, at=WHEN, remember_before=False)
            journaled += 1
        if journaled:
            batch = Settlement(journal, terminal_identity).close_batch(
                NOW, in_doubt_after=timedelta(0))  # every write rides, in doubt
            validate_batch(BatchBody.parse(batch.body))


# ---- over HTTP ---------------------------------------------------------------------------------

def test_over_http_an_absurd_batch_is_422_naming_the_field_and_the_real_one_then_200(
        made, tmp_path):
    import httpx

    db = tmp_path / "clearing.sqlite3"
    with Store(str(db)) as store:
        store.enroll("T-0001", made.identity.public_key.hex(), "2026-11-22T00:00:00Z")
    process = subprocess.Popen([str(CONSOLE_SCRIPT), "clearing", "serve", "--db", str(db),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = json.loads(process.stdout.readline())["url"]
        absurd = made.resigned(setter(2, amount_cents=2 ** 63 + 7))
        answer = httpx.post(f"{url}/v1/batches", json=absurd, timeout=30)
        assert answer.status_code == 422, answer.text
        assert "record 3" in answer.json()["error"] and "'amount_cents'" in answer.json()["error"]
        negative = made.resigned(setter(2, amount_cents=-499_597))
        answer = httpx.post(f"{url}/v1/batches", json=negative, timeout=30)
        assert answer.status_code == 422 and "'amount_cents'" in answer.json()["error"]
        for hostile in (b"[" * 200_000, b'{"number": ' + b"9" * 100_000 + b"}"):
            answer = httpx.post(f"{url}/v1/batches", content=hostile, timeout=30)
            assert answer.status_code == 400 and "error" in answer.json()  # no upload, no 500
        answer = httpx.post(f"{url}/v1/batches", json=made.upload, timeout=30)
        assert answer.status_code == 200 and answer.json()["records"] == len(made.types)
        assert answer.json()["duplicates"] == 0 and not answer.json()["again"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert "Traceback" not in err
