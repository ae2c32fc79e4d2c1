"""FeliCa frames: golden bytes, round trips, and parsers fed malformed input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farebox.protocol.errors import ProtocolError
from farebox.protocol.frames import (
    BlockListElement,
    Polling,
    PollingResponse,
    ReadWithoutEncryption,
    ReadWithoutEncryptionResponse,
    WriteWithoutEncryption,
    WriteWithoutEncryptionResponse,
    parse_command,
    sf1_for_element,
)

IDM = bytes.fromhex("0102030405060708")
PMM = bytes.fromhex("00f1000000014300")
BLOCK_A = bytes([0xAA]) * 16
BLOCK_B = bytes([0x55]) * 16

# (message, its frame written out by hand from the docs/readers.md table)
GOLDEN = [
    (Polling(0x88B4, 1, 0), "06 00 88b4 01 00"),
    (Polling(0xFFFF), "06 00 ffff 00 00"),
    (Polling(0x12FC, 0, 0x0F), "06 00 12fc 00 0f"),
    (PollingResponse(IDM, PMM), "12 01 0102030405060708 00f1000000014300"),
    (PollingResponse(IDM, PMM, b"\x88\xb4"), "14 01 0102030405060708 00f1000000014300 88b4"),
    (
        ReadWithoutEncryption(IDM, (0x000B,), (BlockListElement(0), BlockListElement(1))),
        "12 06 0102030405060708 01 0b00 02 8000 8001",
    ),
    (
        ReadWithoutEncryption(IDM, (0x0009, 0x000B), (BlockListElement(0x0102, 1),)),
        "13 06 0102030405060708 02 0900 0b00 01 010201",
    ),
    (
        ReadWithoutEncryptionResponse(IDM, 0x00, 0x00, (BLOCK_A, BLOCK_B)),
        "2d 07 0102030405060708 00 00 02" + "aa" * 16 + "55" * 16,
    ),
    (ReadWithoutEncryptionResponse(IDM, 0x00, 0x00), "0d 07 0102030405060708 00 00 00"),
    (ReadWithoutEncryptionResponse(IDM, 0x01, 0xA8), "0c 07 0102030405060708 01 a8"),
    (
        WriteWithoutEncryption(IDM, (0x0009,), (BlockListElement(3),), (bytes(range(16)),)),
        "20 08 0102030405060708 01 0900 01 8003 000102030405060708090a0b0c0d0e0f",
    ),
    (WriteWithoutEncryptionResponse(IDM, 0x00, 0x00), "0c 09 0102030405060708 00 00"),
    (WriteWithoutEncryptionResponse(IDM, 0x01, 0xA6), "0c 09 0102030405060708 01 a6"),
]
GOLDEN_IDS = [f"{type(message).__name__}-{index}" for index, (message, _) in enumerate(GOLDEN)]


@pytest.mark.parametrize(("message", "frame_hex"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_frame(message, frame_hex):
    frame = bytes.fromhex(frame_hex)
    assert message.to_frame() == frame
    assert type(message).from_frame(frame) == message


@pytest.mark.parametrize(
    ("element", "wire_hex"),
    [
        (BlockListElement(5), "8005"),
        (BlockListElement(5, service_index=2, access_mode=1), "9205"),
        (BlockListElement(0xFF), "80ff"),
        (BlockListElement(0x100), "000001"),
        (BlockListElement(0x1234, service_index=3), "033412"),
    ],
)
def test_block_list_element_golden(element, wire_hex):
    assert element.to_bytes() == bytes.fromhex(wire_hex)
    assert BlockListElement.from_bytes(bytes.fromhex(wire_hex)) == element


def test_block_list_element_parses_three_byte_form_of_a_small_block():
    assert BlockListElement.from_bytes(bytes.fromhex("100500")) == BlockListElement(5, 0, 1)


@pytest.mark.parametrize("wire_hex", ["", "80", "00", "0001", "800500", "00010000"])
def test_block_list_element_rejects_wrong_length(wire_hex):
    with pytest.raises(ProtocolError):
        BlockListElement.from_bytes(bytes.fromhex(wire_hex))


def test_parse_command_dispatches_on_code():
    for message, frame_hex in GOLDEN:
        if isinstance(message, (Polling, ReadWithoutEncryption, WriteWithoutEncryption)):
            assert parse_command(bytes.fromhex(frame_hex)) == message


@pytest.mark.parametrize(
    "frame_hex",
    [
        "",
        "01",
        "0a 02 0102030405060708",  # Request Service: not a command this layer knows
        "0c 09 0102030405060708 00 00",  # a response is not a command
    ],
)
def test_parse_command_rejects(frame_hex):
    with pytest.raises(ProtocolError):
        parse_command(bytes.fromhex(frame_hex))


@pytest.mark.parametrize(("message", "frame_hex"), GOLDEN, ids=GOLDEN_IDS)
def test_every_truncation_is_rejected(message, frame_hex):
    frame = bytes.fromhex(frame_hex)
    for cut in range(len(frame)):
        with pytest.raises(ProtocolError):
            type(message).from_frame(frame[:cut])


@pytest.mark.parametrize(("message", "frame_hex"), GOLDEN, ids=GOLDEN_IDS)
def test_every_truncation_with_matching_length_byte_is_rejected(message, frame_hex):
    """The body itself must be whole, not just agree with LEN."""
    frame = bytes.fromhex(frame_hex)
    for cut in range(1, len(frame)):
        if isinstance(message, PollingResponse) and cut == 0x12:
            continue  # a polling response without request data: valid, tested below
        with pytest.raises(ProtocolError):
            type(message).from_frame(bytes([cut]) + frame[1:cut])


def test_polling_response_without_request_data_is_a_valid_prefix():
    frame = PollingResponse(IDM, PMM, b"\x88\xb4").to_frame()
    assert PollingResponse.from_frame(b"\x12" + frame[1:0x12]) == PollingResponse(IDM, PMM)


@pytest.mark.parametrize(("message", "frame_hex"), GOLDEN, ids=GOLDEN_IDS)
def test_trailing_junk_is_rejected(message, frame_hex):
    frame = bytes.fromhex(frame_hex)
    with pytest.raises(ProtocolError):
        type(message).from_frame(frame + b"\x00")
    with pytest.raises(ProtocolError):
        type(message).from_frame(bytes([frame[0] + 1]) + frame[1:] + b"\x00")


@pytest.mark.parametrize(("message", "frame_hex"), GOLDEN, ids=GOLDEN_IDS)
def test_wrong_code_is_rejected(message, frame_hex):
    frame = bytearray(bytes.fromhex(frame_hex))
    frame[1] ^= 0x01
    with pytest.raises(ProtocolError):
        type(message).from_frame(bytes(frame))


@pytest.mark.parametrize(
    ("parser", "frame_hex"),
    [
        # number of blocks says 2, one element follows
        (ReadWithoutEncryption.from_frame, "10 06 0102030405060708 01 0b00 02 8000"),
        # number of services says 2, one code and the number of blocks follow
        (ReadWithoutEncryption.from_frame, "0e 06 0102030405060708 02 0b00 00"),
        # number of blocks says 2, one block of data follows
        (ReadWithoutEncryptionResponse.from_frame, "1d 07 0102030405060708 00 00 02" + "aa" * 16),
        # block data of 15 bytes
        (WriteWithoutEncryption.from_frame, "1f 08 0102030405060708 01 0900 01 8003" + "00" * 15),
        # block data where an error status allows none
        (ReadWithoutEncryptionResponse.from_frame, "1d 07 0102030405060708 01 a8 01" + "aa" * 16),
    ],
)
def test_counts_disagreeing_with_the_body_are_rejected(parser, frame_hex):
    with pytest.raises(ProtocolError):
        parser(bytes.fromhex(frame_hex))


@pytest.mark.parametrize(
    "build",
    [
        lambda: PollingResponse(IDM[:7], PMM),
        lambda: PollingResponse(IDM, PMM, b"\x88"),
        lambda: Polling(0x10000),
        lambda: Polling(0x88B4, request_code=256),
        lambda: BlockListElement(0x10000),
        lambda: BlockListElement(0, service_index=16),
        lambda: BlockListElement(0, access_mode=8),
        lambda: BlockListElement(-1),
        lambda: ReadWithoutEncryption(IDM, (0x10000,), (BlockListElement(0),)),
        lambda: ReadWithoutEncryption(IDM, (0x000B,), (0,)),
        lambda: ReadWithoutEncryptionResponse(IDM, 0x01, 0xA8, (BLOCK_A,)),
        lambda: ReadWithoutEncryptionResponse(IDM, 0x00, 0x00, (BLOCK_A[:15],)),
        lambda: ReadWithoutEncryptionResponse(IDM, 0x100, 0x00),
        lambda: WriteWithoutEncryption(IDM, (9,), (BlockListElement(0),), (BLOCK_A[:15],)),
        lambda: WriteWithoutEncryption(IDM, (9,), (BlockListElement(0),), ()),
        lambda: WriteWithoutEncryption(  # 14 blocks do not fit in a 255-byte frame
            IDM, (9,), tuple(BlockListElement(n) for n in range(14)), (BLOCK_A,) * 14
        ),
        lambda: WriteWithoutEncryptionResponse(IDM + b"\x00", 0, 0),
    ],
)
def test_constructors_refuse_unencodable_values(build):
    with pytest.raises(ValueError):
        build()


def test_sequences_are_stored_as_tuples():
    command = WriteWithoutEncryption(IDM, [9], [BlockListElement(1)], [bytearray(BLOCK_A)])
    assert command == WriteWithoutEncryption(IDM, (9,), (BlockListElement(1),), (BLOCK_A,))
    hash(command)


def test_sf1_for_element_is_the_element_bit():
    assert [sf1_for_element(index) for index in range(4)] == [0x01, 0x02, 0x04, 0x08]


# Property tests

idms = st.binary(min_size=8, max_size=8)
blocks = st.binary(min_size=16, max_size=16)
bytes_ = st.integers(0, 0xFF)
service_codes = st.lists(st.integers(0, 0xFFFF), max_size=6).map(tuple)
elements = st.builds(
    BlockListElement, st.integers(0, 0xFFFF), st.integers(0, 0x0F), st.integers(0, 0x07)
)
element_lists = st.lists(elements, max_size=6).map(tuple)


@st.composite
def writes(draw):
    pairs = draw(st.lists(st.tuples(elements, blocks), max_size=5))
    return WriteWithoutEncryption(
        draw(idms),
        draw(service_codes),
        tuple(element for element, _ in pairs),
        tuple(block for _, block in pairs),
    )


messages = st.one_of(
    st.builds(Polling, st.integers(0, 0xFFFF), bytes_, bytes_),
    st.builds(PollingResponse, idms, idms, st.just(b"") | st.binary(min_size=2, max_size=2)),
    st.builds(ReadWithoutEncryption, idms, service_codes, element_lists),
    st.builds(
        ReadWithoutEncryptionResponse,
        idms,
        st.just(0),
        bytes_,
        st.lists(blocks, max_size=15).map(tuple),
    ),
    st.builds(ReadWithoutEncryptionResponse, idms, st.integers(1, 0xFF), bytes_),
    writes(),
    st.builds(WriteWithoutEncryptionResponse, idms, bytes_, bytes_),
)

PARSERS = [
    Polling.from_frame,
    PollingResponse.from_frame,
    ReadWithoutEncryption.from_frame,
    ReadWithoutEncryptionResponse.from_frame,
    WriteWithoutEncryption.from_frame,
    WriteWithoutEncryptionResponse.from_frame,
    parse_command,
    BlockListElement.from_bytes,
]


@given(messages)
def test_parse_of_build_is_identity(message):
    frame = message.to_frame()
    assert frame[0] == len(frame)
    assert type(message).from_frame(frame) == message


@given(messages)
def test_parse_command_accepts_exactly_the_commands(message):
    frame = message.to_frame()
    if isinstance(message, (Polling, ReadWithoutEncryption, WriteWithoutEncryption)):
        assert parse_command(frame) == message
    else:
        with pytest.raises(ProtocolError):
            parse_command(frame)


@given(elements)
def test_block_list_element_round_trip(element):
    assert BlockListElement.from_bytes(element.to_bytes()) == element


def _parse_or_protocol_error(parser, data):
    try:
        parsed = parser(data)
    except ProtocolError:
        return
    rebuilt = parsed.to_bytes() if isinstance(parsed, BlockListElement) else parsed.to_frame()
    assert parser(rebuilt) == parsed


@given(st.sampled_from(PARSERS), st.binary(max_size=300))
def test_random_bytes_parse_or_raise_protocol_error(parser, data):
    _parse_or_protocol_error(parser, data)


@given(st.sampled_from(PARSERS), st.sampled_from(range(10)), st.binary(max_size=253))
def test_random_bodies_with_valid_length_parse_or_raise_protocol_error(parser, code, body):
    _parse_or_protocol_error(parser, bytes([len(body) + 2, code]) + body)
