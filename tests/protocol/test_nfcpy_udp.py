"""NfcpyReader and UdpCardServer through nfcpy's real udp driver on both sides, on 127.0.0.1.

Each test gets its own card server on a port the kernel picks (``udp:127.0.0.1:0``), serving on a
background thread; the fixtures stop and join it and close both frontends. Presentations are
handed over through a queue, so a test reads the card only once the server is done with it.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time

import nfc.clf
import pytest

from farebox.protocol.errors import TransportError, TransportTimeout
from farebox.protocol.frames import (
    SERVICE_LITE_S_RO,
    SERVICE_LITE_S_RW,
    BlockListElement,
    Polling,
    PollingResponse,
    ReadWithoutEncryption,
    WriteWithoutEncryption,
)
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.nfcpy_card import (
    Presentation,
    PresentationEnd,
    UdpCardServer,
    pmm_response_s,
)
from farebox.protocol.transports.nfcpy_reader import NfcpyReader

IDM = bytes.fromhex("01 2E 4C 0A 11 22 33 44")
PMM = bytes.fromhex("00 F1 00 00 00 01 43 00")
SYSTEM_CODE = 0x88B4
LOOPBACK = "127.0.0.1"
WAIT_S = 5.0  # generous upper bound for anything that should happen at once


def blocks_with_numbers() -> list[bytes]:
    return [bytes([number]) * 16 for number in range(14)]


def activated_session(reader: NfcpyReader, polling: PollingResponse) -> LiteSSession:
    """A session that starts from the reader's poll."""
    session = LiteSSession(reader)
    session.activate(polling)
    return session


class CardRig:
    """A card server on a fresh loopback port, serving in the background, and its readers."""

    def __init__(self, card: SimulatedLiteS, **server_options) -> None:
        self.card = card
        self.server = UdpCardServer(card, f"udp:{LOOPBACK}:0", **server_options)
        self.presented: queue.Queue[Presentation] = queue.Queue()
        self.readers: list[NfcpyReader] = []
        self.thread: threading.Thread | None = None

    def serve(self, presentations=None, faults=()) -> None:
        self.thread = self.server.serve_in_background(
            presentations, faults=faults, on_presentation=self.presented.put
        )

    def reader(self, **options) -> NfcpyReader:
        reader = NfcpyReader(self.server.path, **options)
        self.readers.append(reader)
        return reader

    def next_presentation(self) -> Presentation:
        return self.presented.get(timeout=WAIT_S)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.server.close()
        assert self.thread is None or not self.thread.is_alive()


@pytest.fixture
def card():
    return SimulatedLiteS(IDM, PMM, blocks_with_numbers())


@pytest.fixture
def rig(card):
    rig = CardRig(card, idle_timeout_s=WAIT_S)
    yield rig
    rig.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# ---- finding the card ----------------------------------------------------------------------


def test_poll_finds_the_card_with_its_idm_and_pmm(rig):
    rig.serve()
    reader = rig.reader()
    polling = reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    assert polling == PollingResponse(IDM, PMM)
    assert reader.card == polling


def test_the_activating_poll_is_answered_by_nfcpy_and_shown_to_the_card_model(rig):
    """nfcpy's listen answers the Polling from sensf_res; the model still counts it, so a card
    that leaves after one answer is found and then gone."""
    rig.serve(faults=[Faults(leave_after_commands=1)])
    reader = rig.reader()
    polling = reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    session = activated_session(reader, polling)
    with pytest.raises(TransportTimeout):
        session.read_blocks([0])
    presentation = rig.next_presentation()
    assert presentation.commands == 1
    assert presentation.ended_by is PresentationEnd.CARD_LEFT
    assert rig.card.commands_handled == 1


def test_no_card_within_the_timeout_is_none(card):
    """Nothing listens on the port: nfcpy's udp sense waits its fixed 1 s once, then None."""
    reader = NfcpyReader(f"udp:{LOOPBACK}:{free_udp_port()}")
    try:
        started = time.monotonic()
        assert reader.wait_for_card(SYSTEM_CODE, 0.1) is None
        assert time.monotonic() - started < 1.0 + WAIT_S / 5
        assert reader.card is None
    finally:
        reader.close()


def test_a_card_of_another_system_code_stays_silent():
    rig = CardRig(SimulatedLiteS(IDM, PMM, system_code=0x8008))
    try:
        rig.serve()
        assert rig.reader().wait_for_card(SYSTEM_CODE, 0.1) is None
        assert rig.presented.empty()
        assert rig.card.commands_handled == 0
    finally:
        rig.close()


# ---- reads and writes through the session --------------------------------------------------


def test_session_reads_and_writes_change_the_card(rig):
    rig.serve(presentations=1)
    reader = rig.reader()
    session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))

    assert session.read_blocks([0, 1, 2, 3, 4, 5]) == blocks_with_numbers()[:6]
    for number in (4, 5, 6):
        session.write_block(number, bytes([0xA0 + number]) * 16)
    assert session.read_blocks([4, 5, 6]) == [bytes([0xA0 + n]) * 16 for n in (4, 5, 6)]
    reader.close()  # RFOFF: the presentation ends

    presentation = rig.next_presentation()
    assert presentation.ended_by is PresentationEnd.READER_OFF
    assert presentation.commands == 1 + 2 + 3 + 1
    assert presentation.reader_address[0] == LOOPBACK
    assert rig.card.blocks[4:7] == [bytes([0xA0 + n]) * 16 for n in (4, 5, 6)]
    assert rig.card.blocks[7] == bytes([7]) * 16


def test_pmm_timing_is_the_response_time_the_pmm_declares():
    """Read: PMm[5] = 0x01 (A=1, B=0, E=0): 302.1 µs x (n + 2); write: PMm[6] = 0x43 (A=3,
    E=1): 302.1 µs x (n + 4) x 4; anything else: none declared here."""
    unit = 302.1e-6
    read = ReadWithoutEncryption(IDM, (SERVICE_LITE_S_RO,),
                                 tuple(BlockListElement(n) for n in range(4))).to_frame()
    write = WriteWithoutEncryption(IDM, (SERVICE_LITE_S_RW,), (BlockListElement(6),),
                                   (bytes(16),)).to_frame()
    assert pmm_response_s(PMM, read) == pytest.approx(unit * 6)
    assert pmm_response_s(PMM, write) == pytest.approx(unit * 5 * 4)
    assert pmm_response_s(PMM, Polling(SYSTEM_CODE).to_frame()) == 0
    assert pmm_response_s(PMM, read[:8]) == 0  # too short to say: no delay, no crash


def test_a_card_with_pmm_timing_serves_a_whole_session(card):
    rig = CardRig(card, idle_timeout_s=WAIT_S, pmm_timing=True)
    try:
        rig.serve(presentations=1)
        reader = rig.reader()
        session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))
        assert session.read_blocks([0, 1, 2, 3, 4, 5]) == blocks_with_numbers()[:6]
        session.write_block(6, bytes([0xA6]) * 16)
        reader.close()
        assert rig.next_presentation().commands == 1 + 2 + 1
        assert rig.card.blocks[6] == bytes([0xA6]) * 16
    finally:
        rig.close()


def test_a_card_status_error_comes_back_through_the_link(rig):
    rig.serve()
    reader = rig.reader()
    polling = reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    write = WriteWithoutEncryption(
        polling.idm, (SERVICE_LITE_S_RW,), (BlockListElement(0x20),), (bytes(16),)
    ).to_frame()
    answer = reader.exchange(write, 0.1)
    assert answer[10:12] == bytes([0x01, 0xA8])  # SF1 names the element, SF2 illegal block


# ---- the card leaving ----------------------------------------------------------------------


def test_card_that_leaves_after_n_commands_times_out_and_is_seen_gone(rig):
    rig.serve(faults=[Faults(leave_after_commands=3)])
    reader = rig.reader()
    session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))
    session.read_blocks([0])
    session.write_block(1, b"\x11" * 16)
    with pytest.raises(TransportTimeout):
        session.read_blocks([1])

    started = time.monotonic()
    assert reader.wait_for_removal(WAIT_S) is True
    assert time.monotonic() - started < 1.0
    assert reader.card is None
    presentation = rig.next_presentation()
    assert (presentation.commands, presentation.ended_by) == (3, PresentationEnd.CARD_LEFT)
    assert rig.card.blocks[1] == b"\x11" * 16
    with pytest.raises(TransportError):
        reader.exchange(ReadWithoutEncryption(IDM, (9,), (BlockListElement(0),)).to_frame(), 0.1)


def test_wait_for_removal_is_false_while_the_card_stays(rig):
    rig.serve()
    reader = rig.reader(presence_interval_s=0.02, presence_timeout_s=0.5)  # no false removal
    activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S)).read_blocks([0])
    started = time.monotonic()
    assert reader.wait_for_removal(0.1) is False
    assert 0.1 <= time.monotonic() - started < 1.0
    assert reader.card is not None
    # Once a command has activated the card, presence polls reach the model (before that,
    # nfcpy's listen answers every Polling itself).
    assert rig.card.commands_handled >= 1 + 1 + 2


def test_a_torn_write_lands_half_and_the_card_is_gone(rig):
    rig.serve(faults=lambda number: Faults(tear_write_number=1, tear_bytes=4))
    reader = rig.reader()
    session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))
    with pytest.raises(TransportTimeout):
        session.write_block(2, b"\xEE" * 16)
    assert reader.wait_for_removal(WAIT_S) is True
    assert rig.next_presentation().ended_by is PresentationEnd.CARD_LEFT
    assert rig.card.blocks[2] == b"\xEE" * 4 + bytes([2]) * 12


def test_several_presentations_in_a_row(rig):
    """Taps 1 and 3 end with the card leaving, tap 2 with the reader polling again."""
    plan = [Faults(leave_after_commands=2), Faults(), Faults(leave_after_commands=2)]
    rig.serve(presentations=3, faults=plan)
    reader = rig.reader()
    for number in range(3):
        session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))
        session.write_block(number, bytes([0xB0 + number]) * 16)
        if number != 1:
            assert reader.wait_for_removal(WAIT_S) is True
    reader.close()

    presentations = [rig.next_presentation() for _ in range(3)]
    assert [p.number for p in presentations] == [1, 2, 3]
    assert [p.ended_by for p in presentations] == [
        PresentationEnd.CARD_LEFT,
        PresentationEnd.READER_OFF,
        PresentationEnd.CARD_LEFT,
    ]
    assert [p.faults for p in presentations] == plan
    assert rig.card.blocks[:3] == [bytes([0xB0 + n]) * 16 for n in range(3)]
    rig.thread.join(WAIT_S)
    assert not rig.thread.is_alive()  # serve returned after three


def test_a_card_that_left_ignores_its_reader_until_the_reader_polls_again(card):
    """No away_s: only the reader's RFOFF (its next sense) brings the card back."""
    rig = CardRig(card, idle_timeout_s=WAIT_S, away_s=None)
    try:
        rig.serve(faults=[Faults(leave_after_commands=1)])
        reader = rig.reader()
        session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))
        with pytest.raises(TransportTimeout):
            session.read_blocks([0])
        assert rig.next_presentation().ended_by is PresentationEnd.CARD_LEFT
        assert reader.wait_for_removal(WAIT_S) is True
        time.sleep(0.05)
        assert rig.card.commands_handled == 1  # the presence polls never reached the model
        assert reader.wait_for_card(SYSTEM_CODE, WAIT_S) is not None  # at once, not after 1 s
    finally:
        rig.close()


# ---- latency, idle readers, other readers ----------------------------------------------------


def test_latency_within_the_timeout_is_only_slower(rig):
    rig.serve(faults=[Faults(latency_s=0.02)])
    reader = rig.reader()
    session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))
    session.margin_s = 0.5
    started = time.monotonic()
    session.write_block(3, b"\x33" * 16)
    assert time.monotonic() - started >= 0.02
    assert rig.card.blocks[3] == b"\x33" * 16


def test_a_late_answer_times_out_the_card_acts_and_the_answer_is_dropped(rig):
    rig.serve(faults=[Faults(latency_s=0.15)])
    reader = rig.reader()
    polling = reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    with pytest.raises(TransportTimeout):
        activated_session(reader, polling).write_block(3, b"\x44" * 16)
    assert rig.card.blocks[3] == b"\x44" * 16
    # Wait for the late write answer to reach the reader's socket; the next exchange drops it.
    reader_socket = reader.frontend.device.socket
    assert select.select([reader_socket], [], [], WAIT_S)[0]
    slow_session = LiteSSession(reader, margin_s=1.0)
    slow_session.idm, slow_session.pmm = polling.idm, polling.pmm
    assert slow_session.read_blocks([3]) == [b"\x44" * 16]


def test_an_idle_reader_loses_the_card(card):
    rig = CardRig(card, idle_timeout_s=0.05)
    try:
        rig.serve()
        reader = rig.reader()
        session = activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S))
        session.read_blocks([0])
        assert rig.next_presentation().ended_by is PresentationEnd.READER_IDLE
        with pytest.raises(TransportTimeout):  # listening again: commands without a poll are lost
            session.read_blocks([0])
    finally:
        rig.close()


def test_a_second_reader_takes_the_card_from_one_that_went_quiet(rig):
    rig.serve()
    first, second = rig.reader(), rig.reader()
    activated_session(first, first.wait_for_card(SYSTEM_CODE, WAIT_S)).read_blocks([0])
    # The second reader's first poll ends the first presentation (and is lost); it polls again.
    polling = second.wait_for_card(SYSTEM_CODE, WAIT_S)
    assert polling == PollingResponse(IDM, PMM)
    assert activated_session(second, polling).read_blocks([5]) == [bytes([5]) * 16]
    first_presentation = rig.next_presentation()
    assert first_presentation.ended_by is PresentationEnd.READER_CHANGED
    second.close()
    second_presentation = rig.next_presentation()
    assert second_presentation.ended_by is PresentationEnd.READER_OFF
    assert second_presentation.reader_address != first_presentation.reader_address


# ---- error mapping -------------------------------------------------------------------------


class RogueCard:
    """A raw loopback socket playing the card: answers the first poll, then sends ``reply``."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((LOOPBACK, 0))
        self.path = f"udp:{LOOPBACK}:{self.socket.getsockname()[1]}"
        self.reader_address = None

    def answer_poll(self) -> None:
        self.socket.settimeout(WAIT_S)
        datagram, self.reader_address = self.socket.recvfrom(1024)
        assert datagram == b"212F 060088b40000"
        self.socket.sendto(b"212F " + PollingResponse(IDM, PMM).to_frame().hex().encode(),
                           self.reader_address)

    def reply(self, datagram: bytes) -> None:
        self.socket.recvfrom(1024)
        self.socket.sendto(datagram, self.reader_address)

    def close(self) -> None:
        self.socket.close()


@pytest.mark.parametrize(
    ("datagram", "error"),
    [
        (b"RFOFF", TransportTimeout),  # nfcpy BrokenLinkError: the link is gone
        (b"garbage", TransportError),  # nfcpy TransmissionError
        (b"212F 0g", TransportError),  # binascii.Error inside nfcpy's udp driver
    ],
)
def test_nfcpy_link_errors_map_to_ours(datagram, error):
    rogue = RogueCard()
    reader = NfcpyReader(rogue.path)
    try:
        poller = threading.Thread(target=rogue.answer_poll)
        poller.start()
        assert reader.wait_for_card(SYSTEM_CODE, WAIT_S) == PollingResponse(IDM, PMM)
        poller.join()
        replier = threading.Thread(target=rogue.reply, args=(datagram,))
        replier.start()
        with pytest.raises(error) as raised:
            reader.exchange(bytes.fromhex("0A04") + IDM, WAIT_S)
        replier.join()
        assert raised.type is error
        assert isinstance(raised.value.__cause__, (nfc.clf.Error, ValueError))
    finally:
        reader.close()
        rogue.close()


def test_a_vanished_device_is_a_transport_error_not_a_removal(rig):
    rig.serve()
    reader = rig.reader()
    reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    reader.frontend.device.socket.close()  # what a reader pulled from USB looks like: OSError
    with pytest.raises(TransportError) as raised:
        reader.exchange(bytes.fromhex("0A04") + IDM, 0.1)
    assert not isinstance(raised.value, TransportTimeout)
    assert isinstance(raised.value.__cause__, OSError)
    with pytest.raises(TransportError):
        reader.wait_for_removal(0.1)


def test_exchange_without_a_card_and_after_close_are_transport_errors(rig):
    reader = rig.reader()
    with pytest.raises(TransportError) as raised:
        reader.exchange(bytes.fromhex("0A04") + IDM, 0.1)
    assert not isinstance(raised.value, TransportTimeout)
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(TransportError):
        reader.wait_for_card(SYSTEM_CODE, 0.1)
    with pytest.raises(TransportError):
        reader.exchange(bytes.fromhex("0A04") + IDM, 0.1)


def test_opening_a_missing_reader_is_a_transport_error():
    with pytest.raises(TransportError, match="no reader found at tty:nosuchport:pn532"):
        NfcpyReader("tty:nosuchport:pn532")


# ---- sockets stay on loopback; the server's life cycle ---------------------------------------


def test_both_sides_bind_loopback_only(rig):
    assert rig.server.address[0] == LOOPBACK
    rig.serve()
    reader = rig.reader()
    reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    assert reader.frontend.device.socket.getsockname()[0] == LOOPBACK


def test_the_card_server_refuses_non_loopback_and_non_udp_paths(card):
    with pytest.raises(ValueError, match="loopback"):
        UdpCardServer(card, "udp:0.0.0.0:0")
    with pytest.raises(ValueError, match="udp"):
        UdpCardServer(card, "usb:054c:06c3")


def test_a_busy_port_is_a_transport_error(rig, card):
    with pytest.raises(TransportError, match="cannot listen"):
        UdpCardServer(card, rig.server.path)


def test_present_without_a_reader_returns_none_after_its_timeout(card):
    with UdpCardServer(card, f"udp:{LOOPBACK}:0") as server:
        started = time.monotonic()
        assert server.present(Faults(), timeout_s=0.1) is None
        assert time.monotonic() - started < 0.5 + WAIT_S / 5  # nfcpy's listen waits >= 0.5 s
        assert server.presentation_count == 0


def test_close_stops_a_waiting_server_at_once(card):
    server = UdpCardServer(card, f"udp:{LOOPBACK}:0")
    thread = server.serve_in_background()
    time.sleep(0.05)  # let it block in nfcpy's listen
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 0.5
    assert not thread.is_alive()
    server.close()  # idempotent


def test_close_reports_a_failing_callback(card):
    def fail(presentation):
        raise RuntimeError("cannot save the card file")

    server = UdpCardServer(card, f"udp:{LOOPBACK}:0")
    server.serve_in_background(on_presentation=fail)
    reader = NfcpyReader(server.path)
    activated_session(reader, reader.wait_for_card(SYSTEM_CODE, WAIT_S)).read_blocks([0])
    reader.close()
    with pytest.raises(RuntimeError, match="thread failed") as raised:
        server.close()
    assert "cannot save" in str(raised.value.__cause__)


# ---- logging --------------------------------------------------------------------------------


def test_frames_are_logged_in_hex_at_debug(rig, caplog):
    rig.serve()
    reader = rig.reader()
    caplog.set_level(logging.DEBUG, logger="farebox.protocol.nfcpy")
    polling = reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    read = ReadWithoutEncryption(IDM, (0x0B,), (BlockListElement(0),)).to_frame()
    answer = reader.exchange(read, 0.1)
    messages = [r.getMessage() for r in caplog.records if r.name == "farebox.protocol.nfcpy"]
    assert any(polling.idm.hex() in m and "sense 0088b40000" in m for m in messages)
    assert any(m.startswith(f">>> {read.hex()} timeout=") for m in messages)
    assert any(m.startswith(f"<<< {answer.hex()} ") and m.endswith(" ms") for m in messages)
