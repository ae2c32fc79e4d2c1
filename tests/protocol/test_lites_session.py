"""The Lite-S session over the in-process transport and small scripted fakes."""

import pytest

from farebox.protocol.errors import CardStatusError, FelicaError, ProtocolError, TransportTimeout
from farebox.protocol.frames import (
    SERVICE_LITE_S_RO,
    SERVICE_LITE_S_RW,
    BlockListElement,
    PollingResponse,
    ReadWithoutEncryption,
    ReadWithoutEncryptionResponse,
    WriteWithoutEncryption,
)
from farebox.protocol.session import LiteSSession, response_timeout_s
from farebox.protocol.sim.card import DEFAULT_PMM, Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport

IDM = bytes.fromhex("0102030405060708")
OTHER_IDM = bytes.fromhex("0102030405060709")


class RecordingTransport(InProcessTransport):
    """The in-process transport, keeping each (frame, timeout_s) it carried."""

    def __init__(self, card):
        super().__init__(card)
        self.sent = []

    def exchange(self, frame, timeout_s):
        self.sent.append((frame, timeout_s))
        return super().exchange(frame, timeout_s)


class ScriptedTransport:
    """Answers the poll, then plays back the given frames."""

    def __init__(self, *answers):
        self.answers = [PollingResponse(IDM, DEFAULT_PMM).to_frame(), *answers]

    def exchange(self, frame, timeout_s):
        return self.answers.pop(0)


def make_card(**kwargs):
    return SimulatedLiteS(IDM, blocks=[bytes([number]) * 16 for number in range(14)], **kwargs)


def polled_session(card):
    session = LiteSSession(RecordingTransport(card))
    session.poll()
    return session


@pytest.mark.parametrize(
    ("pmm_byte", "blocks", "expected_s"),
    [
        (0x01, 4, 302.1e-6 * (1 * 4 + 2)),  # E=0 B=0 A=1: default Lite-S read, 4 blocks
        (0x43, 1, 302.1e-6 * (1 * 1 + 4) * 4),  # E=1 B=0 A=3: default Lite-S write
        (0x0A, 2, 302.1e-6 * (2 * 2 + 3)),  # E=0 B=1 A=2
        (0xFF, 1, 302.1e-6 * (8 * 1 + 8) * 64),  # E=3 B=7 A=7
        (0x00, 0, 302.1e-6),
    ],
)
def test_response_timeout_golden(pmm_byte, blocks, expected_s):
    assert response_timeout_s(pmm_byte, blocks) == pytest.approx(expected_s)


def test_response_timeout_known_values():
    assert response_timeout_s(0x01, 4) == pytest.approx(1.8126e-3)
    assert response_timeout_s(0x43, 1) == pytest.approx(6.042e-3)


@pytest.mark.parametrize(("pmm_byte", "blocks"), [(0x100, 1), (-1, 1), (0x01, -1)])
def test_response_timeout_refuses_nonsense(pmm_byte, blocks):
    with pytest.raises(ValueError):
        response_timeout_s(pmm_byte, blocks)


def test_poll_remembers_the_card():
    session = LiteSSession(InProcessTransport(make_card()))
    assert session.poll() == PollingResponse(IDM, DEFAULT_PMM)
    assert (session.idm, session.pmm, session.commands) == (IDM, DEFAULT_PMM, 1)


def test_failed_poll_forgets_the_previous_card():
    card = make_card()
    session = polled_session(card)
    card.in_field = False
    with pytest.raises(TransportTimeout):
        session.poll()
    assert session.idm is None
    assert session.commands == 2
    with pytest.raises(RuntimeError):
        session.read_blocks([0])


def test_six_blocks_take_two_reads_in_the_callers_order():
    session = polled_session(make_card())
    data = session.read_blocks([5, 0, 13, 2, 7, 1])
    assert data == [bytes([number]) * 16 for number in (5, 0, 13, 2, 7, 1)]
    assert session.commands == 3
    reads = [ReadWithoutEncryption.from_frame(frame) for frame, _ in session.transport.sent[1:]]
    assert [[element.block_number for element in read.block_list] for read in reads] == [
        [5, 0, 13, 2],
        [7, 1],
    ]
    assert all(read.service_codes == (SERVICE_LITE_S_RO,) for read in reads)
    assert [timeout_s for _, timeout_s in session.transport.sent[1:]] == [
        pytest.approx(response_timeout_s(0x01, 4) + 0.05),
        pytest.approx(response_timeout_s(0x01, 2) + 0.05),
    ]


def test_four_blocks_take_one_read():
    session = polled_session(make_card())
    session.read_blocks(range(4))
    assert session.commands == 2


def test_write_block_is_one_command_with_the_write_timeout():
    card = make_card()
    session = LiteSSession(RecordingTransport(card), margin_s=0.01)
    session.poll()
    session.write_block(9, b"\x99" * 16)
    assert card.blocks[9] == b"\x99" * 16
    frame, timeout_s = session.transport.sent[-1]
    assert WriteWithoutEncryption.from_frame(frame) == WriteWithoutEncryption(
        IDM, (SERVICE_LITE_S_RW,), (BlockListElement(9),), (b"\x99" * 16,)
    )
    assert timeout_s == pytest.approx(response_timeout_s(0x43, 1) + 0.01)
    assert session.commands == 2
    assert session.read_blocks([9]) == [b"\x99" * 16]


@pytest.mark.parametrize("action", ["read", "write"])
def test_read_or_write_before_poll_is_a_programming_error(action):
    session = LiteSSession(InProcessTransport(make_card()))
    with pytest.raises(RuntimeError) as raised:
        if action == "read":
            session.read_blocks([0])
        else:
            session.write_block(0, bytes(16))
    assert not isinstance(raised.value, FelicaError)
    assert session.commands == 0


def test_status_error_raises_card_status_error():
    session = polled_session(make_card())
    with pytest.raises(CardStatusError) as raised:
        session.read_blocks([0x0E])
    assert (raised.value.status_flag1, raised.value.status_flag2) == (0x01, 0xA8)
    assert "0x01" in str(raised.value) and "0xA8" in str(raised.value)


def test_write_to_the_read_only_service_raises_card_status_error():
    card = make_card()
    session = polled_session(card)
    with pytest.raises(CardStatusError):
        session.write_block(0, b"\x55" * 16, service_code=SERVICE_LITE_S_RO)
    assert card.blocks[0] == bytes(16)


@pytest.mark.parametrize(
    "answer",
    [
        ReadWithoutEncryptionResponse(OTHER_IDM, 0, 0, (bytes(16),)).to_frame(),  # wrong IDm
        ReadWithoutEncryptionResponse(IDM, 0, 0, (bytes(16),) * 2).to_frame(),  # wrong count
        ReadWithoutEncryptionResponse(IDM, 0, 0, (bytes(16),)).to_frame() + b"\x00",  # junk
        PollingResponse(IDM, DEFAULT_PMM).to_frame(),  # wrong response code
    ],
)
def test_bad_read_answers_raise_protocol_error(answer):
    session = LiteSSession(ScriptedTransport(answer))
    session.poll()
    with pytest.raises(ProtocolError):
        session.read_blocks([0])


def test_torn_write_times_out_and_leaves_the_block_torn():
    card = make_card(faults=Faults(tear_write_number=1, tear_bytes=4))
    session = polled_session(card)
    with pytest.raises(TransportTimeout):
        session.write_block(3, b"\xff" * 16)
    assert card.blocks[3] == b"\xff" * 4 + b"\x03" * 12
    with pytest.raises(TransportTimeout):
        session.poll()


def test_session_can_be_printed():
    session = polled_session(make_card())
    assert repr(session) == "LiteSSession(idm=0102030405060708, commands=1)"
