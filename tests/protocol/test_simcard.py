"""The simulated FeliCa Lite-S: commands, status errors, faults, card files."""

import json

import pytest

from farebox.protocol.frames import (
    SERVICE_LITE_S_RO,
    SERVICE_LITE_S_RW,
    BlockListElement,
    Polling,
    PollingResponse,
    ReadWithoutEncryption,
    ReadWithoutEncryptionResponse,
    WriteWithoutEncryption,
    WriteWithoutEncryptionResponse,
)
from farebox.protocol.sim.card import (
    DEFAULT_PMM,
    CardFileError,
    Faults,
    SimulatedLiteS,
)

IDM = bytes.fromhex("0102030405060708")
OTHER_IDM = bytes.fromhex("0102030405060709")
NEW = bytes([0xEE]) * 16


def make_card(**kwargs):
    return SimulatedLiteS(IDM, blocks=[bytes([number]) * 16 for number in range(14)], **kwargs)


def read(card, *block_numbers, service_codes=(SERVICE_LITE_S_RO,), idm=IDM):
    frame = ReadWithoutEncryption(
        idm, service_codes, tuple(BlockListElement(number) for number in block_numbers)
    ).to_frame()
    answer = card.respond(frame)
    return None if answer is None else ReadWithoutEncryptionResponse.from_frame(answer)


def write(card, block_number, data=NEW, service_code=SERVICE_LITE_S_RW, idm=IDM):
    frame = WriteWithoutEncryption(
        idm, (service_code,), (BlockListElement(block_number),), (data,)
    ).to_frame()
    answer = card.respond(frame)
    return None if answer is None else WriteWithoutEncryptionResponse.from_frame(answer)


def poll(card, system_code=0x88B4, request_code=0):
    return card.respond(Polling(system_code, request_code).to_frame())


# Polling


def test_poll_answers_with_idm_and_pmm():
    assert poll(make_card()) == PollingResponse(IDM, DEFAULT_PMM).to_frame()


def test_poll_with_system_code_request_returns_the_system_code():
    answer = PollingResponse.from_frame(poll(make_card(), request_code=1))
    assert answer.request_data == bytes.fromhex("88b4")


@pytest.mark.parametrize("system_code", [0xFFFF, 0x88FF, 0xFFB4])
def test_poll_wildcards_are_answered(system_code):
    assert poll(make_card(), system_code) is not None


@pytest.mark.parametrize("system_code", [0x8008, 0x12FC, 0x88B5])
def test_poll_for_another_system_code_gets_no_answer(system_code):
    assert poll(make_card(), system_code) is None


# Read


def test_read_user_blocks_in_the_order_asked():
    response = read(make_card(), 3, 0, 13, 7)
    assert (response.status_flag1, response.status_flag2) == (0x00, 0x00)
    assert response.block_data == (b"\x03" * 16, b"\x00" * 16, b"\x0d" * 16, b"\x07" * 16)


def test_read_through_the_read_write_service():
    assert read(make_card(), 1, service_codes=(SERVICE_LITE_S_RW,)).block_data == (b"\x01" * 16,)


def test_read_id_and_system_code_registers():
    response = read(make_card(), 0x82, 0x85)
    assert response.block_data == (IDM + bytes(8), bytes.fromhex("88b4") + bytes(14))


@pytest.mark.parametrize(
    ("block_numbers", "service_codes", "status"),
    [
        ((0, 1, 2, 3, 4), (SERVICE_LITE_S_RO,), (0xFF, 0xA2)),
        ((), (SERVICE_LITE_S_RO,), (0xFF, 0xA2)),
        ((0,), (SERVICE_LITE_S_RO, SERVICE_LITE_S_RW), (0xFF, 0xA1)),
        ((0,), (0x1009,), (0x01, 0xA6)),
        ((0x0E,), (SERVICE_LITE_S_RO,), (0x01, 0xA8)),
        ((0, 1, 2, 0x80), (SERVICE_LITE_S_RO,), (0x08, 0xA8)),
        ((0, 0x100), (SERVICE_LITE_S_RO,), (0x02, 0xA8)),
    ],
)
def test_read_errors_are_status_answers(block_numbers, service_codes, status):
    response = read(make_card(), *block_numbers, service_codes=service_codes)
    assert (response.status_flag1, response.status_flag2) == status
    assert response.block_data == ()


@pytest.mark.parametrize(
    ("element", "status"),
    [
        (BlockListElement(0, service_index=1), (0x01, 0xA3)),
        (BlockListElement(0, access_mode=1), (0x01, 0xA7)),
    ],
)
def test_read_with_bad_block_list_element(element, status):
    frame = ReadWithoutEncryption(IDM, (SERVICE_LITE_S_RO,), (element,)).to_frame()
    response = ReadWithoutEncryptionResponse.from_frame(make_card().respond(frame))
    assert (response.status_flag1, response.status_flag2) == status


# Write


def test_write_lands_and_calls_on_write():
    seen = []
    card = make_card(on_write=lambda card: seen.append(card.blocks[5]))
    response = write(card, 5)
    assert (response.status_flag1, response.status_flag2) == (0x00, 0x00)
    assert card.blocks[5] == NEW
    assert seen == [NEW]
    assert read(card, 5).block_data == (NEW,)


@pytest.mark.parametrize(
    ("block_number", "service_code", "status"),
    [
        (5, SERVICE_LITE_S_RO, (0x01, 0xA6)),
        (0x0E, SERVICE_LITE_S_RW, (0x01, 0xA8)),
        (0x82, SERVICE_LITE_S_RW, (0x01, 0xA8)),
    ],
)
def test_write_errors_are_status_answers_and_change_nothing(block_number, service_code, status):
    seen = []
    card = make_card(on_write=seen.append)
    before = list(card.blocks)
    response = write(card, block_number, service_code=service_code)
    assert (response.status_flag1, response.status_flag2) == status
    assert card.blocks == before
    assert seen == []


def test_write_of_two_blocks_is_refused():
    card = make_card()
    frame = WriteWithoutEncryption(
        IDM, (SERVICE_LITE_S_RW,), (BlockListElement(1), BlockListElement(2)), (NEW, NEW)
    ).to_frame()
    response = WriteWithoutEncryptionResponse.from_frame(card.respond(frame))
    assert (response.status_flag1, response.status_flag2) == (0xFF, 0xA2)
    assert card.blocks[1] == b"\x01" * 16


# Silence


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        bytes.fromhex("0600 88b4 0000 00"),  # trailing junk
        bytes.fromhex("0a 02 0102030405060708"),  # Request Service: not modelled
        ReadWithoutEncryptionResponse(IDM, 0, 0).to_frame(),  # a response, not a command
    ],
)
def test_malformed_or_unknown_frames_get_no_answer(frame):
    card = make_card()
    assert card.respond(frame) is None
    assert card.commands_handled == 1


def test_commands_for_another_idm_get_no_answer():
    card = make_card()
    assert read(card, 0, idm=OTHER_IDM) is None
    assert write(card, 0, idm=OTHER_IDM) is None
    assert card.blocks[0] == b"\x00" * 16


# Faults


def test_leave_after_commands_answers_that_many_then_nothing():
    card = make_card(faults=Faults(leave_after_commands=2))
    assert poll(card, 0x8008) is None  # unanswered commands do not count
    assert poll(card) is not None
    assert card.in_field
    assert read(card, 0) is not None
    assert not card.in_field
    assert poll(card) is None
    assert write(card, 0) is None
    assert card.blocks[0] == b"\x00" * 16
    assert card.commands_handled == 3


def test_leave_after_zero_commands_is_out_of_the_field_at_once():
    card = make_card(faults=Faults(leave_after_commands=0))
    assert not card.in_field
    assert poll(card) is None


def test_faults_count_from_when_they_are_set():
    card = make_card()
    for _ in range(3):
        assert poll(card) is not None
    card.faults = Faults(leave_after_commands=1)
    assert poll(card) is not None
    assert poll(card) is None


def test_a_card_put_back_in_the_field_answers_again():
    card = make_card(faults=Faults(leave_after_commands=1))
    poll(card)
    assert poll(card) is None
    card.in_field = True
    assert poll(card) is not None
    assert poll(card) is not None


def test_torn_write_keeps_tear_bytes_new_and_the_rest_old_then_silence():
    seen = []
    card = make_card(faults=Faults(tear_write_number=2, tear_bytes=5), on_write=seen.append)
    assert write(card, 1).status_flag1 == 0x00
    assert write(card, 2) is None
    assert card.blocks[1] == NEW
    assert card.blocks[2] == NEW[:5] + b"\x02" * 11
    assert not card.in_field
    assert seen == [card, card]
    assert poll(card) is None


@pytest.mark.parametrize(("tear_bytes", "expected"), [(0, b"\x04" * 16), (16, NEW)])
def test_torn_write_extremes(tear_bytes, expected):
    card = make_card(faults=Faults(tear_write_number=1, tear_bytes=tear_bytes))
    assert write(card, 4) is None
    assert card.blocks[4] == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"leave_after_commands": -1},
        {"tear_write_number": 0},
        {"tear_bytes": 17},
        {"tear_bytes": -1},
        {"latency_s": -0.1},
    ],
)
def test_faults_refuse_nonsense(kwargs):
    with pytest.raises(ValueError):
        Faults(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"idm": IDM[:7]},
        {"pmm": DEFAULT_PMM + b"\x00"},
        {"blocks": [bytes(16)] * 13},
        {"blocks": [bytes(16)] * 13 + [bytes(15)]},
        {"system_code": 0x10000},
    ],
)
def test_card_refuses_bad_construction(kwargs):
    with pytest.raises(ValueError):
        SimulatedLiteS(**{"idm": IDM, **kwargs})


# Card files


def test_to_json_is_exactly_the_card_file_format():
    card = SimulatedLiteS(IDM, system_code=0x88B4, blocks=[bytes([n]) * 16 for n in range(14)])
    assert card.to_json() == {
        "idm": "0102030405060708",
        "pmm": "00f1000000014300",
        "system_code": "88b4",
        "blocks": [f"{n:02x}" * 16 for n in range(14)],
    }


def test_from_json_accepts_any_case_and_ignores_extra_keys():
    obj = make_card().to_json()
    obj = {key: value.upper() if isinstance(value, str) else value for key, value in obj.items()}
    obj["comment"] = "not authoritative"
    card = SimulatedLiteS.from_json(obj)
    assert card.to_json() == make_card().to_json()
