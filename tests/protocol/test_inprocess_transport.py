"""The in-process transport: answers, silence and latency as timeouts."""

import pytest

from farebox.protocol.errors import TransportTimeout
from farebox.protocol.frames import (
    SERVICE_LITE_S_RW,
    BlockListElement,
    Polling,
    PollingResponse,
    WriteWithoutEncryption,
)
from farebox.protocol.sim.card import DEFAULT_PMM, Faults, SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport

IDM = bytes.fromhex("0102030405060708")
POLL = Polling(0x88B4).to_frame()


def test_exchange_returns_the_card_answer_and_counts():
    transport = InProcessTransport(SimulatedLiteS(IDM))
    assert transport.exchange(POLL, 0.02) == PollingResponse(IDM, DEFAULT_PMM).to_frame()
    assert transport.exchanges == 1


def test_no_answer_is_a_timeout_after_the_whole_timeout():
    slept = []
    transport = InProcessTransport(SimulatedLiteS(IDM, system_code=0x8008), sleep=slept.append)
    with pytest.raises(TransportTimeout):
        transport.exchange(POLL, 0.02)
    assert slept == [0.02]
    assert transport.exchanges == 1


def test_latency_within_the_timeout_is_slept():
    slept = []
    card = SimulatedLiteS(IDM, faults=Faults(latency_s=0.01))
    transport = InProcessTransport(card, sleep=slept.append)
    transport.exchange(POLL, 0.02)
    assert slept == [0.01]


def test_latency_beyond_the_timeout_is_a_timeout_but_the_card_acted():
    slept = []
    card = SimulatedLiteS(IDM, faults=Faults(latency_s=0.05))
    transport = InProcessTransport(card, sleep=slept.append)
    write = WriteWithoutEncryption(
        IDM, (SERVICE_LITE_S_RW,), (BlockListElement(2),), (b"\x11" * 16,)
    ).to_frame()
    with pytest.raises(TransportTimeout):
        transport.exchange(write, 0.02)
    assert slept == [0.02]
    assert card.blocks[2] == b"\x11" * 16


def test_without_sleep_a_slow_card_times_out_without_waiting():
    card = SimulatedLiteS(IDM, faults=Faults(latency_s=3600.0))
    with pytest.raises(TransportTimeout):
        InProcessTransport(card).exchange(POLL, 0.02)
