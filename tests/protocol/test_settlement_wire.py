"""The settlement wire format: golden bytes and hashes, and untrusted input refused in one line.

The literals below were produced by the code of commit 2ae4660, before the format moved here
(``journal._record_hash``, ``settlement.canonical``/``totals``/``check_batch``,
``clearing.service.Ack``, ``signedlist.publish``), from the inputs written next to them and the
Ed25519 key whose seed is bytes 0..31. They must never change: terminals in the field and the
clearing house's stored hashes depend on every byte. The signed ack's literals (``ACK_SIGNED_BYTES``,
``ACK_SIGNATURE``) were made when acks were first signed (issue 17), by the same key.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from farebox.protocol.settlement import (
    ACK_DOMAIN, GENESIS_HASH, ActionEntry, ActionList, Ack, BatchBody, BatchItem, BatchName,
    SettlementRecord, SignedAck, SignedActionList, SignedBatch, Totals, Upload, WireError,
    canonical, parse_utc, public_key_bytes, record_hash, utc_iso, verify_ack, verify_batch,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
FIXTURE_JOURNAL = Path(__file__).resolve().parents[1] / "fixtures" / "settlement_v1" / \
    "journal.sqlite3"

R1 = {"seq": 1, "terminal_id": "T-0001", "tap_id": "00112233aabbccdd", "card_number": 12345678,
      "counter_before": 4, "counter_after": 5, "type": "payment", "amount_cents": 580,
      "balance_before_cents": 10000, "balance_after_cents": 9420,
      "at_utc": "2026-11-22T00:00:00Z", "prev_hash": GENESIS_HASH, "clock_trusted": True}
H1 = "bdeacd2aec98270e49e0b4fe0fec79f7d8d8d0bfbc57f21288c0a8cfc1e0f766"
R2 = {"seq": 2, "terminal_id": "T-0001", "tap_id": "8899aabbccddeeff", "card_number": 12345678,
      "counter_before": 5, "counter_after": 6, "type": "add_value", "amount_cents": 5000,
      "balance_before_cents": 9420, "balance_after_cents": 14420,
      "at_utc": "2026-11-21T23:59:59.5Z", "prev_hash": H1, "clock_trusted": False}
H2 = "688dff72a1340234003f90b9517f1e6025cab965763accf456babc7053ecaf48"
R3 = {"seq": 3, "terminal_id": "T-0001", "tap_id": "0000ffff0000ffff", "card_number": 5424040,
      "counter_before": 1, "counter_after": 2, "type": "payment", "amount_cents": 100,
      "balance_before_cents": 1000, "balance_after_cents": 900,
      "at_utc": "2026-11-22T00:05:00Z", "prev_hash": H2, "clock_trusted": True}
H3 = "fd799b822a1cbe0069ce5077d8db937eec0f251d8301abfa32f44691a0f0eeb8"

BODY = (
    '{"batch":1,"closed_utc":"2026-11-22T08:00:00Z","format":1,"incarnation":"0123456789abcdef",'
    '"items":[{"record":{"amount_cents":580,"at_utc":"2026-11-22T00:00:00Z",'
    '"balance_after_cents":9420,"balance_before_cents":10000,"card_number":12345678,'
    '"clock_trusted":true,"counter_after":5,"counter_before":4,'
    '"hash":"bdeacd2aec98270e49e0b4fe0fec79f7d8d8d0bfbc57f21288c0a8cfc1e0f766",'
    '"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","seq":1,'
    '"tap_id":"00112233aabbccdd","terminal_id":"T-0001","type":"payment"},'
    '"state":"committed"},{"record":{"amount_cents":5000,"at_utc":"2026-11-21T23:59:59.5Z",'
    '"balance_after_cents":14420,"balance_before_cents":9420,"card_number":12345678,'
    '"clock_trusted":false,"counter_after":6,"counter_before":5,'
    '"hash":"688dff72a1340234003f90b9517f1e6025cab965763accf456babc7053ecaf48",'
    '"prev_hash":"bdeacd2aec98270e49e0b4fe0fec79f7d8d8d0bfbc57f21288c0a8cfc1e0f766","seq":2,'
    '"tap_id":"8899aabbccddeeff","terminal_id":"T-0001","type":"add_value"},"state":"void"},'
    '{"observed":true,"record":{"amount_cents":100,"at_utc":"2026-11-22T00:05:00Z",'
    '"balance_after_cents":900,"balance_before_cents":1000,"card_number":5424040,'
    '"clock_trusted":true,"counter_after":2,"counter_before":1,'
    '"hash":"fd799b822a1cbe0069ce5077d8db937eec0f251d8301abfa32f44691a0f0eeb8",'
    '"prev_hash":"688dff72a1340234003f90b9517f1e6025cab965763accf456babc7053ecaf48","seq":3,'
    '"tap_id":"0000ffff0000ffff","terminal_id":"T-0001","type":"payment"},'
    '"state":"committed"}],'
    '"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000",'
    '"terminal_id":"T-0001","totals":{"committed":{"payment":{"amount_cents":680,"count":2}},'
    '"void":{"add_value":{"amount_cents":5000,"count":1}}}}'
)
BODY_HASH = "a1a413d14155f0d4e42c14974dcbef0116cd2b98fba276f6fcfdf5834e9d2a94"
BODY_SIGNATURE = ("d3352c0a86a6df7aaed8b4d0e68432f0359d373a0bebd56f2906f20473aae46f"
                  "450c7f79d4cd1ba39f2797b991667178576ea2d03d6931215e485f5f48d6fe0b")
ACK = {"ack": {"terminal_id": "T-0001", "incarnation": "0123456789abcdef", "number": 1,
               "hash": BODY_HASH}, "records": 3, "duplicates": 1, "again": False}
ACK_SIGNED_BYTES = (
    b'farebox settlement ack 1\n{"ack":{"hash":'
    b'"a1a413d14155f0d4e42c14974dcbef0116cd2b98fba276f6fcfdf5834e9d2a94",'
    b'"incarnation":"0123456789abcdef","number":1,"terminal_id":"T-0001"},"again":false,'
    b'"duplicates":1,"records":3}')
ACK_SIGNATURE = ("73aa8d448626022baa67735cfba48e2778071aef313f882109f9979b3553cee9"
                 "e039fb2795a87552ebe1afb60babe39958e0be030383fcfe6e6d2cfe5ce8390a")
LIST_TEXT = ('{"entries":[{"at":"2026-11-21T10:00:00Z","card":"12345678","reason":"lost"}],'
             '"expires_utc":"2026-11-23T00:00:00.250000Z","format":1,'
             '"issued_utc":"2026-11-22T00:00:00.250000Z","serial":7}')
LIST_SIGNATURE = ("b78195afbdc36362dc3991f71ffb32d8ef61ab2752b2b64bf7b1c15228280adb"
                  "6aa7df008f1189d4f1ac4c1e1d3c2bc4c1d02a2ef84ced745d3b811985632406")
HKT = timezone(timedelta(hours=8))


def record(fields: dict, digest: str) -> SettlementRecord:
    return SettlementRecord.from_json({**fields, "hash": digest})


def body() -> BatchBody:
    items = [BatchItem("committed", record(R1, H1)), BatchItem("void", record(R2, H2)),
             BatchItem("committed", record(R3, H3), observed=True)]
    return BatchBody.close("T-0001", "0123456789abcdef", 1,
                           datetime(2026, 11, 22, 16, 0, tzinfo=HKT), GENESIS_HASH, items)


# -- golden bytes ------------------------------------------------------------------------------


def test_record_hashes_are_todays():
    assert public_key_bytes(KEY) == PUBLIC
    assert [record_hash(R1), record_hash(R2), record_hash(R3)] == [H1, H2, H3]
    assert record(R2, H2).computed_hash() == H2  # the untrusted clock is under the hash
    assert record_hash({**R2, "clock_trusted": True}) != H2


def test_a_batch_body_is_todays_text_hash_and_signature():
    made = body()
    assert made.text() == BODY
    signed = SignedBatch.sign(made, KEY.sign)
    assert signed == SignedBatch(BODY, BODY_HASH, BODY_SIGNATURE)
    assert hashlib.sha256(BODY.encode()).hexdigest() == BODY_HASH
    assert signed.verify(PUBLIC) == made
    assert BatchBody.parse(BODY) == made and BatchBody.parse(BODY).text() == BODY
    assert made.totals.text() == ('{"committed":{"payment":{"amount_cents":680,"count":2}},'
                                  '"void":{"add_value":{"amount_cents":5000,"count":1}}}')


def test_an_upload_and_its_ack_are_todays_json():
    upload = Upload.of("T-0001", "0123456789abcdef", 1, SignedBatch(BODY, BODY_HASH,
                                                                    BODY_SIGNATURE))
    sent = upload.to_json()
    assert list(sent) == ["terminal_id", "incarnation", "number", "body", "hash", "signature"]
    assert sent == {"terminal_id": "T-0001", "incarnation": "0123456789abcdef", "number": 1,
                    "body": BODY, "hash": BODY_HASH, "signature": BODY_SIGNATURE}
    assert Upload.from_json(json.loads(json.dumps(sent))) == upload
    ack = Ack(upload.name, 3, 1, False)
    assert ack.to_json() == ACK
    assert json.dumps(ack.to_json()) == json.dumps(ACK)  # key order too
    assert Ack.from_json(json.loads(json.dumps(ACK))) == ack


def test_a_signed_ack_is_todays_bytes_and_signature_and_keeps_the_ack_fields():
    ack = Ack(BatchName("T-0001", "0123456789abcdef", 1, BODY_HASH), 3, 1, False)
    assert ack.signed_bytes() == ACK_SIGNED_BYTES and ACK_SIGNED_BYTES.startswith(ACK_DOMAIN)
    signed = ack.sign(KEY)
    assert signed == SignedAck(ack, ACK_SIGNATURE)
    sent = signed.to_json()
    assert list(sent) == ["ack", "records", "duplicates", "again", "signature"]
    assert sent == {**ACK, "signature": ACK_SIGNATURE}  # the old fields, as they were
    assert Ack.from_json(json.loads(json.dumps(sent))) == ack  # what an old reader takes
    assert verify_ack(json.loads(json.dumps(sent)), PUBLIC) == ack


def test_acks_that_are_not_signed_by_the_key_are_refused_each_in_one_line():
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    signed = {**ACK, "signature": ACK_SIGNATURE}
    lied = {**ACK, "records": 4}
    cases = {
        "is not signed": ACK,  # an echo of the batch's name, as a forger sends it
        "not 128 hex digits": {**ACK, "signature": "zz"},
        "not 128 hex digits ": {**ACK, "signature": ACK_SIGNATURE.upper()},
        "does not verify": {**ACK, "signature": "00" * 64},
        "does not verify ": {**lied, "signature": ACK_SIGNATURE},  # a field changed
        "does not verify  ": Ack.from_json(ACK).sign(other).to_json(),  # another key
        # the same key's signature of an action list, or of the ack's JSON without the domain
        "does not verify   ": {**ACK, "signature": KEY.sign(
            ACK_SIGNED_BYTES.removeprefix(ACK_DOMAIN)).hex()},
    }
    for problem, answer in cases.items():
        with pytest.raises(WireError) as refused:
            verify_ack(answer, PUBLIC)
        assert problem.strip() in str(refused.value) and "\n" not in str(refused.value)
    assert verify_ack(signed, PUBLIC).records == 3
    for answer in (None, [], {"signature": ACK_SIGNATURE}, {**signed, "signature": 5}):
        with pytest.raises(WireError):
            verify_ack(answer, PUBLIC)
    # an action list signed by the same key is never an ack, nor an ack a list
    published = SignedActionList.publish([], 1, datetime(2026, 11, 22, tzinfo=HKT), KEY)
    with pytest.raises(WireError):
        verify_ack({**ACK, "signature": published.signature}, PUBLIC)
    with pytest.raises(WireError):
        SignedActionList(ACK_SIGNED_BYTES.decode(), ACK_SIGNATURE).verify(PUBLIC)


def test_a_signed_action_list_is_todays_text_and_signature():
    published = SignedActionList.publish(
        [ActionEntry("12345678", "lost", "2026-11-21T10:00:00Z")], 7,
        datetime(2026, 11, 22, 8, 0, 0, 250000, tzinfo=HKT), KEY)
    assert published.to_json() == {"list": LIST_TEXT, "signature": LIST_SIGNATURE}
    taken = SignedActionList.from_json(published.to_json()).verify(PUBLIC)
    assert (taken.serial, taken.issued_utc, taken.expires_utc) == (
        7, "2026-11-22T00:00:00.250000Z", "2026-11-23T00:00:00.250000Z")
    assert taken.entries == (ActionEntry("12345678", "lost", "2026-11-21T10:00:00Z"),)


def test_utc_text_is_todays():
    assert utc_iso(datetime(2026, 11, 22, 8, 0, tzinfo=HKT)) == "2026-11-22T00:00:00Z"
    assert utc_iso(datetime(2026, 11, 22, 8, 0, 0, 5, tzinfo=HKT)) == \
        "2026-11-22T00:00:00.000005Z"
    assert parse_utc("2026-11-22T00:00:00.000005Z") == datetime(2026, 11, 22, 8, 0, 0, 5,
                                                                tzinfo=HKT)
    with pytest.raises(ValueError):
        utc_iso(datetime(2026, 11, 22))


def test_batches_closed_before_parse_and_encode_to_the_same_bytes():
    """Every batch of the golden fixture (see tests/tools/test_settlement_golden.py), read back
    and written again, is the very text that was signed."""
    with sqlite3.connect(f"file:{FIXTURE_JOURNAL}?immutable=1", uri=True) as db:
        rows = db.execute("SELECT body, hash, signature, totals FROM batches ORDER BY number"
                          ).fetchall()
        public = bytes.fromhex("439038a7025a920b89ce7255bc7a0b349701600e1bd4bc590f235a6086c03353")
    assert len(rows) == 3
    for text, digest, signature, totals in rows:
        parsed = verify_batch(text, digest, signature, public)
        assert parsed.text() == text and parsed.totals.text() == totals
        assert all(item.record.computed_hash() == item.record.hash for item in parsed.items)


# -- what does not verify ----------------------------------------------------------------------


def resign(obj: dict) -> SignedBatch:
    text = canonical(obj)
    return SignedBatch(text, hashlib.sha256(text.encode()).hexdigest(),
                       KEY.sign(text.encode()).hex())


def test_tampering_is_refused_each_in_one_line():
    good = json.loads(BODY)
    cases = {
        "its body does not match its hash": SignedBatch(BODY.replace("580", "581"), BODY_HASH,
                                                        BODY_SIGNATURE),
        "its signature is not hex": SignedBatch(BODY, BODY_HASH, "zz"),
        "does not verify with the terminal's key": SignedBatch(BODY, BODY_HASH, "00" * 64),
        "its totals do not add up": resign({**good, "totals": {}}),
        "record 1 does not match its hash": resign(
            {**good, "items": [{**good["items"][0], "record": {
                **good["items"][0]["record"], "amount_cents": 1}}], "totals": {
                "committed": {"payment": {"amount_cents": 1, "count": 1}}}}),
        "record 1 names another terminal": resign({**good, "terminal_id": "T-0002"}),
        "record 1 is in the batch twice as committed": resign(
            {**good, "items": [good["items"][0]] * 2, "totals": {
                "committed": {"payment": {"amount_cents": 1160, "count": 2}}}}),
        "record 1 has state 'intent'": resign(
            {**good, "items": [{**good["items"][0], "state": "intent"}]}),
        "its header is not a batch of this format": resign({**good, "format": 2}),
        "its body is not JSON": SignedBatch("{", hashlib.sha256(b"{").hexdigest(),
                                            KEY.sign(b"{").hex()),
    }
    for problem, batch in cases.items():
        with pytest.raises(WireError) as refused:
            batch.verify(PUBLIC)
        assert problem in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("change", [
    {"seq": 0}, {"seq": True}, {"seq": "1"}, {"seq": 2 ** 63}, {"card_number": -1},
    {"amount_cents": 5.8}, {"amount_cents": None}, {"clock_trusted": 1}, {"at_utc": "yesterday"},
    {"at_utc": "2026-11-22T00:00:00"}, {"prev_hash": "0" * 63}, {"hash": "A" * 64},
    {"terminal_id": ""}, {"tap_id": ["x"]}, {"type": "x" * 300},
])
def test_records_of_the_wrong_shape_are_refused(change):
    with pytest.raises(WireError) as refused:
        SettlementRecord.from_json({**R1, "hash": H1, **change})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("value", [
    None, [], "x", {"ack": None}, {"ack": {}}, {**ACK, "records": -1}, {**ACK, "again": 0},
    {**ACK, "ack": {**ACK["ack"], "number": True}},
    {**ACK, "ack": {**ACK["ack"], "extra": 1}},
])
def test_answers_that_are_not_an_ack_are_refused(value):
    with pytest.raises(WireError):
        Ack.from_json(value)


@pytest.mark.parametrize("value", [None, [], {}, {"terminal_id": "T", "incarnation": "i"},
                                   {**Upload.of("T", "i", 1, SignedBatch("b", "h", "s"))
                                    .to_json(), "number": "1"},
                                   {**Upload.of("T", "i", 1, SignedBatch("b", "h", "s"))
                                    .to_json(), "number": False}])
def test_uploads_of_the_wrong_shape_are_refused(value):
    with pytest.raises(WireError, match="upload"):
        Upload.from_json(value)


def test_action_lists_that_do_not_verify_or_parse_are_refused():
    published = SignedActionList.publish([], 1, datetime(2026, 11, 22, tzinfo=HKT), KEY)
    with pytest.raises(WireError, match="does not verify"):
        replace(published, text=published.text.replace('"serial":1', '"serial":9')
                ).verify(PUBLIC)
    with pytest.raises(WireError, match="not hex"):
        replace(published, signature="xyz").verify(PUBLIC)
    for document in (None, {"list": 5}, {"list": "x"}):
        with pytest.raises(WireError, match="expected"):
            SignedActionList.from_json(document)
    for text in ('{"format":2}', '{"format":1,"serial":1,"issued_utc":"x",'
                 '"expires_utc":"x","entries":[]}', '[]', '{',
                 '{"format":1,"serial":1,"issued_utc":"2026-11-22T00:00:00Z",'
                 '"expires_utc":"2026-11-23T00:00:00Z","entries":[5]}'):
        bad = SignedActionList(text, KEY.sign(text.encode()).hex())
        with pytest.raises(WireError):
            bad.verify(PUBLIC)


def test_totals_add_up_by_state_and_type():
    assert Totals.of([]).to_json() == {}
    assert Totals.from_json(body().totals.to_json()) == body().totals
    with pytest.raises(WireError):
        Totals.from_json({"committed": {"payment": {"count": "1", "amount_cents": 1}}})


def test_a_batch_name_must_name_exactly_one_batch():
    name = BatchName("T-0001", "0123456789abcdef", 1, BODY_HASH)
    assert BatchName.from_json(name.to_json()) == name
    with pytest.raises(WireError):
        BatchName.from_json({**name.to_json(), "number": 0})


# -- untrusted input, generated ----------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


def paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            found += paths(value, prefix + (index,))
    return found


def put(obj: object, path: tuple, value: object) -> object:
    if not path:
        return value
    copy = json.loads(json.dumps(obj))
    node = copy
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return copy


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_damaged_signed_batch_is_refused_with_one_line_or_verifies_as_signed(data):
    """Any part of a batch replaced by any JSON, then signed with the right key: verify_batch
    either refuses it with a WireError of one line or returns exactly what was signed."""
    good = json.loads(BODY)
    damaged = put(good, data.draw(st.sampled_from(paths(good))), data.draw(JSON_VALUES))
    batch = resign(damaged)
    try:
        parsed = batch.verify(PUBLIC)
    except WireError as refused:
        assert str(refused) and "\n" not in str(refused)
    else:
        assert parsed.text() == batch.body


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_any_json_is_read_or_refused_with_a_wire_error(value):
    for read in (SettlementRecord.from_json, BatchItem.from_json, BatchBody.from_json,
                 Totals.from_json, Upload.from_json, Ack.from_json, BatchName.from_json,
                 SignedActionList.from_json, ActionList.from_json, SignedAck.from_json,
                 lambda v: verify_ack(v, PUBLIC)):
        try:
            read(value)
        except WireError as refused:
            assert "\n" not in str(refused)


RECORDS = st.builds(
    lambda seq, card, counter, kind, amount, balance, at, trusted: {
        "seq": seq, "terminal_id": "T-0001", "tap_id": f"{seq:016x}", "card_number": card,
        "counter_before": counter, "counter_after": counter + 1, "type": kind,
        "amount_cents": amount, "balance_before_cents": balance,
        "balance_after_cents": balance - amount, "at_utc": utc_iso(at), "prev_hash": H1,
        "clock_trusted": trusted},
    st.integers(1, 2 ** 40), st.integers(0, 99_999_999), st.integers(0, 65_534),
    st.sampled_from(["payment", "add_value", "aavs_reload"]), st.integers(0, 100_000),
    st.integers(-3_500, 1_000_000),
    st.datetimes(datetime(2000, 1, 1), datetime(2099, 1, 1), timezones=st.just(timezone.utc)),
    st.booleans())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(RECORDS, st.sampled_from(["committed", "void", "unresolved"]),
                          st.booleans()), max_size=6, unique_by=lambda t: t[0]["seq"]))
def test_closed_bodies_verify_and_read_back_to_the_same_bytes(rows):
    items = [BatchItem(state, SettlementRecord.from_json({**fields, "hash": record_hash(fields)}),
                       observed=observed and state == "committed")
             for fields, state, observed in rows]
    made = BatchBody.close("T-0001", "0123456789abcdef", 7,
                           datetime(2026, 11, 22, tzinfo=timezone.utc), H1, items)
    signed = SignedBatch.sign(made, KEY.sign)
    assert signed.verify(PUBLIC) == made and BatchBody.parse(signed.body).text() == signed.body
    assert json.loads(signed.body) == made.to_json()
