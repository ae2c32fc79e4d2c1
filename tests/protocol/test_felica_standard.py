"""The FeliCa Standard discovery commands as bytes (golden frames, round trips, truncations) and
the read-only FeliCa Standard simulated card behind a :class:`FelicaSession`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farebox.protocol.errors import CardStatusError, ProtocolError, TransportTimeout
from farebox.protocol.frames import (
    BlockListElement, Polling, ReadWithoutEncryption, ReadWithoutEncryptionResponse,
    RequestService, RequestServiceResponse, RequestSystemCode, RequestSystemCodeResponse,
    SearchServiceCode, SearchServiceCodeResponse, WriteWithoutEncryption,
    WriteWithoutEncryptionResponse, node_is_area, parse_command, parse_standard_command,
    service_readable_without_key,
)
from farebox.protocol.session import FelicaSession
from farebox.protocol.sim.card import (
    CardFileError, SimulatedFelicaStandard, SimulatedLiteS, SimulatedSystem, card_from_json,
)
from farebox.protocol.sim.inprocess import InProcessTransport

IDM = bytes.fromhex("0102030405060708")
IDM2 = bytes.fromhex("1102030405060708")

GOLDEN = [
    (RequestService(IDM, (0x0117, 0x100B)), "0f 02 0102030405060708 02 1701 0b10"),
    (RequestServiceResponse(IDM, (0x0000, 0xFFFF)), "0f 03 0102030405060708 02 0000 ffff"),
    (RequestSystemCode(IDM), "0a 0c 0102030405060708"),
    (RequestSystemCodeResponse(IDM, (0x8008, 0x8005)), "0f 0d 0102030405060708 02 8008 8005"),
    (SearchServiceCode(IDM, 1), "0c 0a 0102030405060708 0100"),
    (SearchServiceCodeResponse(IDM, 0x0117), "0c 0b 0102030405060708 1701"),
    (SearchServiceCodeResponse(IDM, 0x0000, 0xFFFE), "0e 0b 0102030405060708 0000 feff"),
]


@pytest.mark.parametrize(("message", "frame_hex"), GOLDEN)
def test_golden_frames(message, frame_hex):
    frame = bytes.fromhex(frame_hex)
    assert message.to_frame() == frame
    assert type(message).from_frame(frame) == message


@pytest.mark.parametrize(("message", "frame_hex"), GOLDEN)
def test_every_truncation_and_trailing_junk_is_refused(message, frame_hex):
    frame = bytes.fromhex(frame_hex)
    for cut in range(len(frame)):
        short = bytes([cut]) + frame[1:cut] if cut else b""
        if isinstance(message, SearchServiceCodeResponse) and message.area_end is not None \
                and cut == 12:  # an area's answer cut after its code is a service's answer
            assert type(message).from_frame(short).area_end is None
            continue
        with pytest.raises(ProtocolError):
            type(message).from_frame(short)
    with pytest.raises(ProtocolError):
        type(message).from_frame(bytes([len(frame) + 1]) + frame[1:] + b"\x00")


def test_the_lite_s_parser_still_knows_only_its_three_commands():
    for message, frame_hex in GOLDEN:
        frame = bytes.fromhex(frame_hex)
        with pytest.raises(ProtocolError):
            parse_command(frame)
        if message.CODE % 2 == 0:
            assert parse_standard_command(frame) == message


@given(st.binary(max_size=40))
def test_random_bytes_parse_or_raise_our_error(data):
    try:
        parse_standard_command(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize(("code", "readable"), [
    (0x0117, True), (0x100B, True), (0x0009, True), (0x000B, True), (0x090F, True),
    (0x1808, False), (0x0116, False), (0x000A, False), (0x0000, False), (0x0001, False),
])
def test_key_less_services(code, readable):
    assert service_readable_without_key(code) is readable


def test_areas_are_told_from_services():
    assert node_is_area(0x0000) and node_is_area(0x1001) and not node_is_area(0x0117)


def card() -> SimulatedFelicaStandard:
    return SimulatedFelicaStandard([
        SimulatedSystem(0x8008, IDM, {0x0117: (b"\x01" * 16,), 0x100B: (b"\x02" * 16,
                                                                         b"\x03" * 16)}),
        SimulatedSystem(0x8005, IDM2, {0x0118: (b"\x04" * 16,)}),
    ], bytes.fromhex("100b4b428485d0ff"))


def session_on(model) -> tuple[FelicaSession, InProcessTransport]:
    transport = InProcessTransport(model)
    return FelicaSession(transport), transport


def test_each_system_answers_its_own_polling_with_its_own_idm():
    session, _ = session_on(card())
    assert session.poll(0x8008).idm == IDM
    assert session.poll(0x8005).idm == IDM2
    assert session.poll(0xFFFF).idm == IDM  # the wildcard: the first system
    assert session.poll(0x80FF).idm == IDM
    response = session.poll(0x8005, request_code=1)
    assert response.request_data == bytes.fromhex("8005")
    with pytest.raises(TransportTimeout):
        session.poll(0x88B4)


def test_discovery_and_reads():
    session, _ = session_on(card())
    session.poll(0x8008)
    assert session.request_system_codes() == (0x8008, 0x8005)
    nodes = []
    for index in range(10):
        code, end = session.search_service_code(index)
        if code == 0xFFFF:
            break
        nodes.append((code, end))
    assert nodes == [(0x0000, 0xFFFE), (0x0117, None), (0x100B, None)]
    assert session.request_service([0x0117, 0x0118, 0x0000]) == (0, 0xFFFF, 0)
    assert session.read(0x100B, [1, 0]) == [b"\x03" * 16, b"\x02" * 16]
    with pytest.raises(CardStatusError) as error:
        session.read(0x100B, [2])
    assert (error.value.status_flag1, error.value.status_flag2) == (0x01, 0xA8)
    with pytest.raises(CardStatusError) as error:
        session.read(0x0118, [0])  # another system's service
    assert error.value.status_flag2 == 0xA6


def test_the_card_refuses_writes_and_ignores_other_idms():
    model = card()
    write = WriteWithoutEncryption(IDM, (0x0117,), (BlockListElement(0),), (bytes(16),))
    answer = WriteWithoutEncryptionResponse.from_frame(model.respond(write.to_frame()))
    assert (answer.status_flag1, answer.status_flag2) == (0x01, 0xA6)
    assert model.systems[0].services[0x0117] == (b"\x01" * 16,)
    stranger = ReadWithoutEncryption(bytes(8), (0x0117,), (BlockListElement(0),))
    assert model.respond(stranger.to_frame()) is None
    too_many = ReadWithoutEncryption(IDM, (0x100B,), tuple(BlockListElement(0)
                                                           for _ in range(16)))
    answer = ReadWithoutEncryptionResponse.from_frame(model.respond(too_many.to_frame()))
    assert (answer.status_flag1, answer.status_flag2) == (0xFF, 0xA2)
    assert model.respond(Polling(0x8008).to_frame()) is not None


def test_the_card_file_round_trips_and_keeps_where_it_came_from():
    model = card()
    model.metadata = {"source": "Metrodroid JSON", "scanned_at": "2017-10-02T00:00:00+00:00"}
    obj = model.to_json()
    assert obj["system_code"] == "8008" and "blocks" not in obj
    again = card_from_json(obj)
    assert isinstance(again, SimulatedFelicaStandard)
    assert again.to_json() == obj
    assert isinstance(card_from_json(SimulatedLiteS(IDM).to_json()), SimulatedLiteS)


@pytest.mark.parametrize("change", [
    lambda o: o.update(systems=[]),
    lambda o: o.update(systems={}),
    lambda o: o["systems"]["8008"].update(idm="zz"),
    lambda o: o["systems"]["8008"]["services"].update({"0117": "00"}),
    lambda o: o["systems"]["8008"]["services"].update({"0117": ["00" * 15]}),
    lambda o: o["systems"]["8008"]["services"].update({"xyz": []}),
    lambda o: o.update(system_code="1234"),
    lambda o: o["systems"].update({"8005": "nope"}),
])
def test_bad_card_files_are_one_line_errors(change):
    obj = card().to_json()
    change(obj)
    with pytest.raises(CardFileError) as error:
        card_from_json(obj)
    assert "\n" not in str(error.value)
