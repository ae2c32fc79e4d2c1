"""Card image: schemas round-trip, MACs catch every bit flip, torn slots fall back, random bytes
decode or raise our error."""

from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farebox.cardimage import schemas
from farebox.cardimage.errors import CardImageError, IntegrityError, InvalidCard
from farebox.cardimage.image import (
    change_blocks, decode_identity, decode_image, decode_purse, encode_identity, encode_log_entry,
    encode_purse, new_card_blocks,
)
from farebox.cardimage.layout import (
    BLOCK_SIZE, IDENTITY_BLOCKS, LOG_BLOCKS, PURSE_SLOT_BLOCKS, USER_BLOCKS, log_block_for,
)
from farebox.cardimage.mac import area_mac, diversify_key
from farebox.cardimage.model import (
    AAVS_RELOAD_CENTS, COUNTER_MAX, Category, Concession, Identity, Kind, LogEntry, LogType, Purse,
    ServiceOp, Status,
)
from farebox.cardimage.money import format_cents, format_whole, parse_amount

MASTER = bytes(range(16))
IDM = bytes.fromhex("012e4cd1a2b3c4d5")
CARD_KEY = diversify_key(MASTER, IDM, 0x88B4)
VERSION = 7
IDENTITY = Identity(12345678, Kind.ON_LOAN, Category.PERSONALISED, date(2020, 2, 29), 5000, VERSION)
PURSE = Purse(1, 13000, date(2020, 2, 29), concession=Concession.STUDENT,
              concession_expiry=date(2027, 8, 31))


def key_for(version):
    if version != VERSION:
        raise KeyError(version)
    return CARD_KEY


def fresh_blocks():
    entry = LogEntry(1, LogType.ISSUE, IDENTITY.issued, PURSE.balance_cents)
    return dict(enumerate(new_card_blocks(IDENTITY, PURSE, entry, IDM, CARD_KEY)))


def apply(blocks, writes):
    blocks = dict(blocks)
    blocks.update(writes)
    return blocks


def pay(blocks, cents, day=date(2026, 11, 22)):
    image = decode_image(blocks, IDM, key_for)
    purse = Purse(**{**image.purse.__dict__, "counter": image.purse.counter + 1,
                     "balance_cents": image.purse.balance_cents - cents, "last_payment": day})
    entry = LogEntry(purse.counter, LogType.PAYMENT, day, cents)
    return apply(blocks, change_blocks(image, purse, entry, CARD_KEY))


# ---- strategies ---------------------------------------------------------------------------

days_ = st.dates(date(1990, 1, 2), date(2100, 12, 31))
identities = st.builds(
    Identity, card_number=st.integers(0, 99_999_999), kind=st.sampled_from(Kind),
    category=st.sampled_from(Category), issued=days_, deposit_cents=st.integers(0, 2**32 - 1),
    key_version=st.integers(0, 255), birth_date=st.none() | st.dates())
purses = st.builds(
    Purse, counter=st.integers(1, COUNTER_MAX), balance_cents=st.integers(-(2**31), 2**31 - 1),
    last_add_value=days_, last_auto_reload=st.none() | days_, last_payment=st.none() | days_,
    aavs_reload_cents=st.sampled_from((0,) + AAVS_RELOAD_CENTS), status=st.sampled_from(Status),
    payment_count=st.integers(0, 0xFFFF), concession=st.sampled_from(Concession),
    concession_expiry=st.none() | days_, svl_upgraded=st.booleans(),
    aavs_ever_enabled=st.booleans(), aavs_released=st.integers(0, 255))


@st.composite
def log_entries(draw):
    kind = draw(st.sampled_from(LogType))
    return LogEntry(
        counter=draw(st.integers(1, 2**32 - 1)), type=kind, day=draw(days_),
        amount_cents=draw(st.integers(-(2**23), 2**23 - 1)),
        aavs_reload_cents=draw(st.sampled_from((0,) + AAVS_RELOAD_CENTS)) if kind is LogType.PAYMENT else 0,
        new_status=draw(st.sampled_from(Status)) if kind is LogType.STATUS else None,
        operation=draw(st.sampled_from(ServiceOp)) if kind is LogType.SERVICE else None)


# ---- round trips --------------------------------------------------------------------------

@given(identities)
def test_identity_round_trips(identity):
    blocks = encode_identity(identity, IDM, CARD_KEY)
    assert sorted(blocks) == list(IDENTITY_BLOCKS)
    assert all(len(b) == BLOCK_SIZE for b in blocks.values())
    assert decode_identity(blocks, IDM, lambda v: CARD_KEY) == (identity, CARD_KEY)


@given(purses, st.sampled_from((0, 1)))
def test_purse_round_trips(purse, slot):
    blocks = encode_purse(purse, slot, IDM, CARD_KEY, VERSION)
    assert sorted(blocks) == list(PURSE_SLOT_BLOCKS[slot])
    assert decode_purse(blocks, slot, IDM, CARD_KEY, VERSION) == purse


@given(log_entries())
def test_log_entry_round_trips(entry):
    from farebox.cardimage.image import decode_log
    blocks = encode_log_entry(entry, IDM, CARD_KEY, VERSION)
    assert list(blocks) == [log_block_for(entry.counter)]
    log, unreadable = decode_log(blocks, IDM, CARD_KEY, VERSION, entry.counter)
    assert (log, unreadable) == ((entry,), 0)


def test_new_card_decodes_to_what_was_issued():
    image = decode_image(fresh_blocks(), IDM, key_for)
    assert image.identity == IDENTITY and image.purse == PURSE
    assert image.purse_slot == 0 and image.previous is None
    assert [e.type for e in image.log] == [LogType.ISSUE]
    assert image.unreadable_log_blocks == 0


@pytest.mark.parametrize("schema", [schemas.Identity, schemas.Purse, schemas.LogEntry],
                         ids=lambda s: s.name or "area")
def test_each_schema_fills_its_area_exactly(schema):
    assert schema.sizeof() in (24, 8)


def test_out_of_range_values_are_refused_when_encoding():
    with pytest.raises(CardImageError):
        encode_purse(Purse(1, 2**31, date(2020, 1, 1)), 0, IDM, CARD_KEY, VERSION)
    with pytest.raises(CardImageError):
        encode_purse(Purse(1, 0, date(2020, 1, 1), aavs_reload_cents=12300), 0, IDM, CARD_KEY, VERSION)
    with pytest.raises(CardImageError):
        encode_identity(Identity(100_000_000, Kind.SOLD, Category.ADULT, date(2020, 1, 1), 0, 1),
                        IDM, CARD_KEY)
    with pytest.raises(CardImageError):  # before the day epoch
        encode_purse(Purse(1, 0, date(1989, 12, 31)), 0, IDM, CARD_KEY, VERSION)


# ---- the identity's format versions: the birth date ----------------------------------------

def _sealed_identity(data: bytes) -> dict[int, bytes]:
    """24 identity bytes made by hand, sealed with a good MAC (what some writer put there)."""
    from farebox.cardimage.layout import AREA_IDENTITY
    mac = area_mac(CARD_KEY, AREA_IDENTITY, data[1], IDM, IDENTITY_BLOCKS, data)
    raw = data + mac
    return {IDENTITY_BLOCKS[0]: raw[:16], IDENTITY_BLOCKS[1]: raw[16:]}


# version, key version, card number, kind, category, issue day (2020-02-29 = 11016), deposit
_HEAD = bytes.fromhex("07") + (12345678).to_bytes(4, "big") + bytes([1, 4]) + \
    (11016).to_bytes(2, "big") + (5000).to_bytes(4, "big")


def test_a_version_1_identity_written_before_birth_dates_existed_still_reads():
    identity, _ = decode_identity(_sealed_identity(b"\x01" + _HEAD + bytes(10)), IDM, key_for)
    assert identity == IDENTITY and identity.birth_date is None
    assert identity.format_version == 1
    assert encode_identity(IDENTITY, IDM, CARD_KEY) == _sealed_identity(b"\x01" + _HEAD
                                                                        + bytes(10))


def test_a_birth_date_is_written_as_version_2_year_month_day_and_only_then():
    born = Identity(**{**IDENTITY.__dict__, "birth_date": date(1958, 2, 28)})
    assert born.format_version == 2
    data = b"\x02" + _HEAD + bytes.fromhex("07a6021c") + bytes(6)  # 1958 = 0x07a6
    assert encode_identity(born, IDM, CARD_KEY) == _sealed_identity(data)
    assert decode_identity(_sealed_identity(data), IDM, key_for)[0] == born


@pytest.mark.parametrize("data, message", [
    (b"\x03" + _HEAD + bytes(10), "unknown image format version 3"),
    (b"\x00" + _HEAD + bytes(10), "unknown image format version 0"),
    (b"\x01" + _HEAD + bytes.fromhex("07a6021c") + bytes(6), "reserved bytes are not zero"),
    (b"\x02" + _HEAD + bytes(10), "no birth date 00000000"),
    (b"\x02" + _HEAD + bytes.fromhex("07a6021e") + bytes(6), "no birth date 07a6021e"),  # 30 Feb
    (b"\x02" + _HEAD + bytes.fromhex("07a6021c") + bytes(5) + b"\x01", "malformed"),
])
def test_identities_no_version_describes_are_refused(data, message):
    with pytest.raises(CardImageError, match=message):
        decode_identity(_sealed_identity(data), IDM, key_for)


# ---- MACs and bit flips --------------------------------------------------------------------

def test_every_single_bit_flip_in_identity_or_a_lone_purse_makes_the_card_invalid():
    blocks = fresh_blocks()
    for block in IDENTITY_BLOCKS + PURSE_SLOT_BLOCKS[0]:
        for bit in range(BLOCK_SIZE * 8):
            flipped = bytearray(blocks[block])
            flipped[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(InvalidCard):
                decode_image(apply(blocks, {block: bytes(flipped)}), IDM, key_for)


def test_a_flip_in_the_newest_slot_exposes_the_previous_one_and_nothing_else():
    blocks = pay(pay(fresh_blocks(), 100), 250)
    current = decode_image(blocks, IDM, key_for)
    assert current.purse.counter == 3 and current.previous.counter == 2
    for block in PURSE_SLOT_BLOCKS[current.purse_slot]:
        for bit in range(BLOCK_SIZE * 8):
            flipped = bytearray(blocks[block])
            flipped[bit // 8] ^= 1 << (bit % 8)
            image = decode_image(apply(blocks, {block: bytes(flipped)}), IDM, key_for)
            assert image.purse == current.previous and image.previous is None


def test_a_flip_in_a_log_block_only_loses_that_entry():
    blocks = pay(fresh_blocks(), 100)
    block = log_block_for(2)
    flipped = bytearray(blocks[block])
    flipped[3] ^= 0x10
    image = decode_image(apply(blocks, {block: bytes(flipped)}), IDM, key_for)
    assert image.purse.counter == 2 and image.purse.balance_cents == 12900
    assert [e.counter for e in image.log] == [1] and image.unreadable_log_blocks == 1


def test_mac_binds_idm_key_version_block_numbers_and_area():
    data = bytes(24)
    base = area_mac(CARD_KEY, 2, VERSION, IDM, (2, 3), data)
    assert base != area_mac(CARD_KEY, 2, VERSION, bytes(8), (2, 3), data)
    assert base != area_mac(CARD_KEY, 2, VERSION + 1, IDM, (2, 3), data)
    assert base != area_mac(CARD_KEY, 2, VERSION, IDM, (4, 5), data)
    assert base != area_mac(CARD_KEY, 1, VERSION, IDM, (2, 3), data)


def test_a_slot_copied_into_the_other_position_does_not_verify():
    blocks = fresh_blocks()
    moved = apply(blocks, {4: blocks[2], 5: blocks[3]})
    with pytest.raises(IntegrityError):
        decode_purse(moved, 1, IDM, CARD_KEY, VERSION)


def test_an_image_copied_to_another_card_is_invalid():
    with pytest.raises(InvalidCard):
        decode_image(fresh_blocks(), bytes.fromhex("012e000000000001"), key_for)


def test_unknown_key_version_is_an_invalid_card():
    with pytest.raises(InvalidCard, match="no key"):
        decode_image(fresh_blocks(), IDM, lambda v: (_ for _ in ()).throw(KeyError(v)))


def test_key_diversification_depends_on_idm_and_master():
    assert diversify_key(MASTER, IDM, 0x88B4) != diversify_key(MASTER, bytes(8), 0x88B4)
    assert diversify_key(MASTER, IDM, 0x88B4) != diversify_key(bytes(16), IDM, 0x88B4)
    assert len(CARD_KEY) == 16


# ---- torn writes ---------------------------------------------------------------------------

@pytest.mark.parametrize("landed", range(0, 3), ids=["nothing", "first purse block", "both purse blocks"])
@pytest.mark.parametrize("torn_bytes", [0, 1, 8, 15])
def test_a_torn_change_reads_as_the_old_or_the_new_state(landed, torn_bytes):
    before = pay(fresh_blocks(), 100)
    old = decode_image(before, IDM, key_for)
    after = pay(before, 500)
    new = decode_image(after, IDM, key_for)
    writes = [n for n in sorted(set(after) ) if after[n] != before[n]]
    purse_blocks = [n for n in writes if n not in LOG_BLOCKS]
    log_block = [n for n in writes if n in LOG_BLOCKS]
    order = purse_blocks + log_block
    blocks = dict(before)
    for n in order[:landed]:
        blocks[n] = after[n]
    if landed < len(order):  # the next block lands torn
        n = order[landed]
        blocks[n] = after[n][:torn_bytes] + before[n][torn_bytes:]
    image = decode_image(blocks, IDM, key_for)
    assert image.purse in (old.purse, new.purse)
    assert image.purse == (new.purse if landed >= 2 else old.purse)


def test_both_slots_with_the_same_counter_is_invalid():
    blocks = fresh_blocks()
    blocks.update(encode_purse(PURSE, 1, IDM, CARD_KEY, VERSION))
    with pytest.raises(InvalidCard, match="both purse slots"):
        decode_image(blocks, IDM, key_for)


def test_stale_log_entries_from_six_taps_ago_are_dropped():
    blocks = fresh_blocks()
    for _ in range(6):
        blocks = pay(blocks, 10)
    image = decode_image(blocks, IDM, key_for)
    assert [e.counter for e in image.log] == [7, 6, 5, 4, 3, 2]
    # counter 8 would go to the block holding counter 2: a purse-only change leaves it stale
    current = image.purse
    purse8 = Purse(**{**current.__dict__, "counter": 8})
    blocks.update(encode_purse(purse8, 1 - image.purse_slot, IDM, CARD_KEY, VERSION))
    image = decode_image(blocks, IDM, key_for)
    assert [e.counter for e in image.log] == [7, 6, 5, 4, 3]


# ---- untrusted bytes -----------------------------------------------------------------------

@settings(max_examples=300)
@given(st.lists(st.binary(min_size=16, max_size=16), min_size=USER_BLOCKS, max_size=USER_BLOCKS),
       st.binary(min_size=8, max_size=8))
def test_random_images_decode_or_raise_our_error(blocks, idm):
    try:
        decode_image(dict(enumerate(blocks)), idm, lambda v: diversify_key(MASTER, idm, 0x88B4))
    except CardImageError:
        pass


@settings(max_examples=500)
@given(st.sampled_from([schemas.Identity, schemas.Purse, schemas.LogEntry]), st.binary(max_size=30))
def test_random_bytes_parse_or_raise_our_error(schema, data):
    try:
        schemas.parse(schema, data)
    except CardImageError:
        pass


def test_missing_blocks_are_our_error():
    blocks = fresh_blocks()
    del blocks[3]
    with pytest.raises(InvalidCard):
        decode_image(blocks, IDM, key_for)


# ---- money ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cents", [("5.80", 580), ("0", 0), ("0.01", 1), ("3000", 300000),
                                        ("12.5", 1250), ("007.00", 700)])
def test_amounts_parse_to_cents(text, cents):
    assert parse_amount(text) == cents


@pytest.mark.parametrize("text", ["5.801", "-1", "1e3", "5.", ".5", " 5", "5 ", "", "abc", "5,00",
                                  "+5", "5.8.0", "nan", "inf", "１"])
def test_bad_amounts_are_refused(text):
    with pytest.raises(ValueError):
        parse_amount(text)


def test_negative_amounts_only_when_allowed():
    assert parse_amount("-35.00", allow_negative=True) == -3500


@given(st.integers(-(10**9), 10**9))
def test_format_and_parse_are_inverse(cents):
    assert parse_amount(format_cents(cents), allow_negative=True) == cents


def test_format_refuses_floats():
    with pytest.raises(TypeError):
        format_cents(5.8)
    with pytest.raises(TypeError):
        parse_amount(5.8)


@given(st.integers(-(10**7), 10**7))
def test_whole_amounts_format_without_cents_and_parse_back(units):
    assert format_whole(units * 100) == str(units)
    assert parse_amount(format_whole(units * 100), allow_negative=True) == units * 100


@pytest.mark.parametrize("cents", [1, 250_01, -150])
def test_format_whole_refuses_an_amount_with_cents(cents):
    with pytest.raises(ValueError, match="not a whole amount"):
        format_whole(cents)


def test_format_whole_refuses_floats_and_bools():
    for value in (250.0, True):
        with pytest.raises(TypeError):
            format_whole(value)


def test_a_counter_that_could_never_advance_is_refused_both_ways():
    purse = Purse(counter=COUNTER_MAX, balance_cents=0, last_add_value=date(2026, 1, 1))
    blocks = encode_purse(purse, 0, IDM, CARD_KEY, VERSION)
    assert decode_purse(blocks, 0, IDM, CARD_KEY, VERSION).counter == COUNTER_MAX
    with pytest.raises(CardImageError, match="outside"):
        encode_purse(Purse(**{**purse.__dict__, "counter": COUNTER_MAX + 1}), 0, IDM, CARD_KEY,
                     VERSION)
