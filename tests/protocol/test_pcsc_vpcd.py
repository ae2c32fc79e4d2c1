"""PcscReader and VpcdCard: the pseudo-APDU codecs alone, then through a real pcscd + vpcd.

The second half starts ``pcscd --foreground`` once for the module (:class:`PrivatePcscd`): its own
config directory with only a vpcd reader on a free port pair, its own socket handed over by
socket activation and found by libpcsclite through ``PCSCLITE_CSOCK_NAME``, so a system pcscd is
neither needed nor disturbed. A :class:`VpcdCard` presents a ``SimulatedLiteS`` on a background
thread; the test drives :class:`PcscReader` on its own thread.

Where pcscd or vpcd is missing, or pcscd cannot start, these tests skip with the reason, unless
they run as root or with ``CI`` set: then they fail (CI must run them).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farebox.protocol.errors import TransportError, TransportTimeout
from farebox.protocol.frames import Polling, PollingResponse
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.transports.pcsc import (
    END_TRANSPARENT_SESSION_APDU,
    FELICA_ATR_PATTERNS,
    GET_IDM_APDU,
    START_TRANSPARENT_SESSION_APDU,
    SWITCH_PROTOCOL_FELICA_APDU,
    ExchangeMode,
    choose_mode,
    direct_transmit_apdu,
    encode_tlv,
    is_felica_atr,
    parse_direct_transmit_response,
    parse_spec,
    parse_tlvs,
    parse_transparent_response,
    transparent_exchange_apdu,
)
from farebox.protocol.sim.vpcd_card import (
    ACS_FELICA_ATR,
    FELICA_ATR,
    EmulatedReader,
    PcscdError,
    Presentation,
    PresentationEnd,
    PrivatePcscd,
    VpcdCard,
    find_pcscd,
    find_vpcd_driver,
)

IDM = bytes.fromhex("01 2E 4C 0A 11 22 33 44")
PMM = bytes.fromhex("00 F1 00 00 00 01 43 00")
SYSTEM_CODE = 0x88B4
POLL = Polling(SYSTEM_CODE).to_frame()
POLL_ANSWER = PollingResponse(IDM, PMM).to_frame()
MIFARE_CLASSIC_ATR = bytes.fromhex("3B8F8001804F0CA000000306 030001 00000000 6A")
WAIT_S = 5.0  # upper bound for anything pcscd should notice (it polls vpcd every 0.4 s)


def blocks_with_numbers() -> list[bytes]:
    return [bytes([number]) * 16 for number in range(14)]


def make_card(**kwargs) -> SimulatedLiteS:
    return SimulatedLiteS(IDM, PMM, blocks_with_numbers(), **kwargs)


# ==== the codecs, without pcscd ================================================================


@pytest.mark.parametrize(
    ("atr", "felica"),
    [
        (FELICA_ATR, True),
        (ACS_FELICA_ATR, True),
        (bytes.fromhex("3B8F8001804F0CA00000030603F0120000000089"), True),  # ACS, 424 kbps
        (MIFARE_CLASSIC_ATR, False),
        (bytes.fromhex("3B8F8001804F0CA0000003060300030000000068"), False),  # MIFARE Ultralight
        (bytes.fromhex("3BFE1800008031FE454573744549442076657220312E30A8"), False),  # contact
        (FELICA_ATR[:-1], False),
        (FELICA_ATR + b"\x00", False),
        (b"", False),
    ],
)
def test_felica_atrs_are_recognised_and_others_are_not(atr, felica):
    assert is_felica_atr(atr) is felica


def test_every_atr_pattern_has_twenty_bytes():
    assert all(len(pattern.pattern.split()) == 20 for pattern in FELICA_ATR_PATTERNS)


@pytest.mark.parametrize(
    ("reader_name", "atr", "mode"),
    [
        ("ACS ACR122U PICC Interface 00 00", FELICA_ATR, ExchangeMode.DIRECT_TRANSMIT),
        ("acs acr122 00 00", FELICA_ATR, ExchangeMode.DIRECT_TRANSMIT),
        ("Virtual PCD 00 00", ACS_FELICA_ATR, ExchangeMode.DIRECT_TRANSMIT),
        ("Virtual PCD 00 00", FELICA_ATR, ExchangeMode.TRANSPARENT),
        ("Sony FeliCa Port/PaSoRi 4.0 00 00", FELICA_ATR, ExchangeMode.TRANSPARENT),
    ],
)
def test_the_mode_follows_the_reader_name_and_the_atr(reader_name, atr, mode):
    assert choose_mode(reader_name, atr) is mode


@pytest.mark.parametrize(
    ("spec", "name"),
    [("pcsc", None), ("pcsc:ACR122", "ACR122"), ("pcsc:Virtual PCD 00 01", "Virtual PCD 00 01")],
)
def test_specs_name_a_reader_fragment(spec, name):
    assert parse_spec(spec) == name


@pytest.mark.parametrize("spec", ["", "pcsc:", "usb", "pcscd", "udp:127.0.0.1:54321", "PCSC"])
def test_other_specs_are_refused(spec):
    with pytest.raises(ValueError, match="pcsc"):
        parse_spec(spec)


def test_session_apdus_are_the_pcsc_part3_ones():
    assert GET_IDM_APDU == bytes.fromhex("FF CA 00 00 00")
    assert START_TRANSPARENT_SESSION_APDU == bytes.fromhex("FF C2 00 00 02 81 00")
    assert SWITCH_PROTOCOL_FELICA_APDU == bytes.fromhex("FF C2 00 02 04 8F 02 03 00")
    assert END_TRANSPARENT_SESSION_APDU == bytes.fromhex("FF C2 00 00 02 82 00")


def test_direct_transmit_wraps_the_frame_in_in_communicate_thru():
    assert direct_transmit_apdu(POLL) == bytes.fromhex("FF 00 00 00 08 D4 42 06 00 88 B4 00 00")


def test_transparent_exchange_carries_the_timeout_in_microseconds_little_endian():
    assert transparent_exchange_apdu(POLL, 0.02) == bytes.fromhex(
        "FF C2 00 01 0F  5F 46 04 20 4E 00 00  95 06 06 00 88 B4 00 00"
    )


def test_direct_transmit_answers():
    answer = bytes.fromhex("D5 43 00") + POLL_ANSWER + b"\x90\x00"
    assert parse_direct_transmit_response(answer) == POLL_ANSWER
    with pytest.raises(TransportTimeout):
        parse_direct_transmit_response(bytes.fromhex("D5 43 01 90 00"))
    with pytest.raises(TransportTimeout):  # NAD bit set, still the timeout error code
        parse_direct_transmit_response(bytes.fromhex("D5 43 41 90 00"))


@pytest.mark.parametrize(
    "answer",
    [
        "D5 43 02 90 00",  # CRC error from the PN532
        "63 00",  # the ACR122U's "operation failed"
        "D5 43 00 12 01 63 00",  # right data, wrong status word
        "D5 41 00 12 01 90 00",  # InDataExchange's answer code, not InCommunicateThru's
        "",
        "90",
    ],
)
def test_failed_direct_transmits_are_transport_errors_but_not_timeouts(answer):
    with pytest.raises(TransportError) as caught:
        parse_direct_transmit_response(bytes.fromhex(answer))
    assert not isinstance(caught.value, TransportTimeout)


def test_transparent_answers_skip_the_objects_they_do_not_use():
    answer = bytes.fromhex("C0 03 00 90 00 92 01 00 96 02 00 00") + encode_tlv(0x97, POLL_ANSWER)
    assert parse_transparent_response(answer + b"\x90\x00") == POLL_ANSWER


def test_a_transparent_answer_without_data_or_with_64_01_is_a_timeout():
    with pytest.raises(TransportTimeout):
        parse_transparent_response(bytes.fromhex("C0 03 01 64 01 90 00"))
    with pytest.raises(TransportTimeout):
        parse_transparent_response(bytes.fromhex("C0 03 00 90 00 90 00"))


@pytest.mark.parametrize(
    "answer",
    [
        "C0 03 01 6A 81 90 00",  # data object not supported
        "C0 03 00 64 00 90 00",  # no answer from the reader itself
        "C0 02 00 90 90 00",  # malformed error status
        "C0 03 00 90 00 97 12 12 01 90 00",  # 97 claims more bytes than there are
        "C0 03 00 90 00 97 02 12 01 6A 81",  # data, but a failing status word
        "C0 03 00 90 00 97 02 12 01 05 90 00",  # trailing junk: a tag without a length
        "",
    ],
)
def test_failed_transparent_exchanges_are_transport_errors_but_not_timeouts(answer):
    with pytest.raises(TransportError) as caught:
        parse_transparent_response(bytes.fromhex(answer))
    assert not isinstance(caught.value, TransportTimeout)


def test_long_data_objects_use_the_two_byte_length_form():
    value = bytes(range(200))
    encoded = encode_tlv(0x97, value)
    assert encoded[:3] == bytes.fromhex("97 81 C8")
    assert parse_tlvs(encoded) == [(0x97, value)]
    assert encode_tlv(0x5F46, b"\x01\x02\x03\x04") == bytes.fromhex("5F 46 04 01 02 03 04")


tags = st.sampled_from([0x5F46, 0x90, 0x92, 0x95, 0x96, 0x97, 0xC0, 0x81, 0x8F])


@given(st.lists(st.tuples(tags, st.binary(max_size=300)), max_size=5))
def test_data_objects_round_trip(objects):
    data = b"".join(encode_tlv(tag, value) for tag, value in objects)
    assert parse_tlvs(data) == objects


@given(st.binary(max_size=64))
def test_random_bytes_parse_or_raise_our_error(data):
    try:
        parse_tlvs(data)
    except TransportError:
        pass
    try:
        parse_transparent_response(data)
    except TransportError:
        pass


# ---- the emulated reader: golden transcripts --------------------------------------------------


def transcript(reader: EmulatedReader, *exchanges: tuple[str, str | None]) -> None:
    for message, expected in exchanges:
        reply = reader.handle(bytes.fromhex(message))
        assert reply.data == (None if expected is None else bytes.fromhex(expected)), message


def test_vpcd_control_messages():
    reader = EmulatedReader(make_card(), FELICA_ATR)
    transcript(reader, ("04", FELICA_ATR.hex()), ("01", None), ("02", None), ("00", None))


def test_get_data_answers_the_idm():
    transcript(
        EmulatedReader(make_card()),
        ("FF CA 00 00 00", IDM.hex() + "9000"),
        ("FF CA 01 00 00", "6A81"),  # P1 01 (historical bytes): not for FeliCa
    )


def test_direct_transmit_transcript():
    reader = EmulatedReader(make_card(), reader_timeout_s=0.1)
    transcript(
        reader,
        ("FF 00 00 00 08 D4 42 06 00 88 B4 00 00", "D5 43 00" + POLL_ANSWER.hex() + "90 00"),
        ("FF 00 00 00 08 D4 42 06 00 80 08 00 00", "D5 43 01 90 00"),  # another system code
        ("FF 00 00 00 03 D4 4A 01", "63 00"),  # PN532 commands other than InCommunicateThru
    )
    silent = reader.handle(bytes.fromhex("FF 00 00 00 08 D4 42 06 00 80 08 00 00"))
    assert silent.delay_s == 0.1  # a silent card costs the reader's whole timeout


def test_transparent_exchange_transcript():
    reader = EmulatedReader(make_card())
    exchange = "FF C2 00 01 0F 5F 46 04 20 4E 00 00 95 06 06 00 88 B4 00 00"
    transcript(
        reader,
        (exchange, "C0 03 00 69 86 90 00"),  # no session yet
        ("FF C2 00 00 02 81 00", "C0 03 00 90 00 90 00"),
        (exchange, "C0 03 00 69 86 90 00"),  # FeliCa not chosen yet
        ("FF C2 00 02 04 8F 02 00 03", "C0 03 01 6A 80 90 00"),  # ISO 14443-A: not this card
        ("FF C2 00 02 04 8F 02 03 00", "C0 03 00 90 00 90 00"),
        (exchange, "C0 03 00 90 00 92 01 00 96 02 00 00 97 12" + POLL_ANSWER.hex() + "90 00"),
        ("FF C2 00 01 0F 5F 46 04 20 4E 00 00 95 06 06 00 80 08 00 00", "C0 03 02 64 01 90 00"),
        ("FF C2 00 01 04 A5 02 00 00", "C0 03 01 6A 81 90 00"),  # unknown data object
        ("FF C2 00 00 02 82 00", "C0 03 00 90 00 90 00"),
        (exchange, "C0 03 00 69 86 90 00"),  # session over
    )


def test_power_off_ends_the_transparent_session():
    reader = EmulatedReader(make_card())
    transcript(
        reader,
        ("FF C2 00 00 02 81 00", "C0 03 00 90 00 90 00"),
        ("FF C2 00 02 04 8F 02 03 00", "C0 03 00 90 00 90 00"),
        ("00", None),
        ("FF C2 00 01 08 95 06 06 00 88 B4 00 00", "C0 03 00 69 86 90 00"),
    )


@pytest.mark.parametrize(
    ("apdu", "status"),
    [
        ("00 A4 04 00 00", "6E 00"),
        ("FF CA 00", "67 00"),
        ("FF 00 00 00 09 D4 42 06", "67 00"),
        ("FF B0 00 00 10", "6D 00"),
    ],
)
def test_apdus_the_reader_does_not_know(apdu, status):
    assert EmulatedReader(make_card()).handle(bytes.fromhex(apdu)).data == bytes.fromhex(status)


def test_a_slow_card_times_out_but_acts_and_a_card_that_leaves_says_so():
    card = make_card(faults=Faults(latency_s=0.05, leave_after_commands=2))
    reader = EmulatedReader(card)
    transcript(
        reader,
        ("FF C2 00 00 02 81 00", "C0 03 00 90 00 90 00"),
        ("FF C2 00 02 04 8F 02 03 00", "C0 03 00 90 00 90 00"),
    )
    fast = reader.handle(transparent_exchange_apdu(POLL, 0.02))
    assert fast.data == bytes.fromhex("C0 03 02 64 01 90 00") and fast.delay_s == 0.02
    assert not fast.card_left
    slow_enough = reader.handle(transparent_exchange_apdu(POLL, 0.1))
    assert slow_enough.delay_s == 0.05 and slow_enough.card_left  # the second answer, then gone
    assert parse_transparent_response(slow_enough.data) == POLL_ANSWER


# ==== through pcscd + vpcd ====================================================================


INSTALL = "apt-get install pcscd vsmartcard-vpcd"


def _must_run() -> bool:
    return os.geteuid() == 0 or bool(os.environ.get("CI"))


def _cannot_run(reason: str) -> None:
    message = f"pcscd + vpcd end-to-end tests NOT RUN: {reason}"
    if _must_run():
        pytest.fail(f"{message}; as root or in CI they must run: {INSTALL}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def pcscd():
    if find_pcscd() is None:
        _cannot_run("pcscd is not installed (apt-get install pcscd)")
    if find_vpcd_driver() is None:
        _cannot_run("vpcd is not installed (apt-get install vsmartcard-vpcd)")
    pytest.importorskip("smartcard", reason="pyscard is not installed")
    # libpcsclite reads PCSCLITE_CSOCK_NAME once per process; a short path (sun_path < 108).
    directory = Path(tempfile.mkdtemp(prefix="farebox-pcscd-"))
    daemon = PrivatePcscd(directory)
    previous = os.environ.get("PCSCLITE_CSOCK_NAME")
    os.environ.update(daemon.client_env())
    try:
        try:
            daemon.start()
        except PcscdError as error:
            _cannot_run(str(error))
        yield daemon
    finally:
        daemon.stop()
        if previous is None:
            os.environ.pop("PCSCLITE_CSOCK_NAME", None)
        else:
            os.environ["PCSCLITE_CSOCK_NAME"] = previous
        shutil.rmtree(directory, ignore_errors=True)


class Rig:
    """A VpcdCard serving in the background and the PcscReaders a test opens."""

    def __init__(self, pcscd: PrivatePcscd, card: SimulatedLiteS, **card_options) -> None:
        from farebox.protocol.transports.pcsc import PcscReader

        self.pcscd = pcscd
        self.card = card
        self.vpcd = VpcdCard(card, pcscd.port, **card_options)
        self.presented: queue.Queue[Presentation] = queue.Queue()
        self.readers: list[PcscReader] = []
        self._reader_class = PcscReader

    def serve(self, presentations=None, faults=()) -> None:
        self.vpcd.serve_in_background(
            presentations, faults=faults, on_presentation=self.presented.put
        )

    def reader(self, mode=None, spec=None):
        reader = self._reader_class(spec or f"pcsc:{self.pcscd.reader_name}", mode)
        self.readers.append(reader)
        return reader

    def next_presentation(self) -> Presentation:
        return self.presented.get(timeout=WAIT_S)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.vpcd.close()
        if self.pcscd.running:
            wait_until_slot_empty(self.pcscd.reader_name)


def wait_until_slot_empty(reader_name: str, timeout_s: float = WAIT_S) -> None:
    """Wait until pcscd has seen the card leave, so the next test's card is a new insertion.

    Otherwise an APDU of the next test could find the old connection closed, vpcd would take the
    new one at its next presence check, and pcscd would keep the old card's state and ATR.
    """
    _wait_for_slot_state(reader_name, "EMPTY", timeout_s)


def wait_until_slot_holds_a_card(reader_name: str, timeout_s: float = WAIT_S) -> None:
    """Wait until pcscd has seen a card arrive (it asked vpcd for the ATR; no APDU sent)."""
    _wait_for_slot_state(reader_name, "PRESENT", timeout_s)


def _wait_for_slot_state(reader_name: str, wanted: str, timeout_s: float) -> None:
    from smartcard import scard

    flag = getattr(scard, f"SCARD_STATE_{wanted}")

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hresult == scard.SCARD_S_SUCCESS
    try:
        state = scard.SCARD_STATE_UNAWARE
        deadline = time.monotonic() + timeout_s
        while True:
            wait_ms = 0 if state == scard.SCARD_STATE_UNAWARE else 100
            hresult, states = scard.SCardGetStatusChange(context, wait_ms, [(reader_name, state)])
            if hresult == scard.SCARD_S_SUCCESS:
                state = states[0][1] & ~scard.SCARD_STATE_CHANGED
                if state & flag:
                    return
            assert time.monotonic() < deadline, f"{reader_name}: not {wanted} in {timeout_s} s"
    finally:
        scard.SCardReleaseContext(context)


@pytest.fixture
def card():
    return make_card()


@pytest.fixture
def rig(pcscd, card):
    rig = Rig(pcscd, card)
    yield rig
    rig.close()


def tap(reader, timeout_s: float = WAIT_S) -> LiteSSession:
    polling = reader.wait_for_card(SYSTEM_CODE, timeout_s)
    assert polling is not None, "no card found"
    session = LiteSSession(reader)
    session.activate(polling)
    return session


MODES = [ExchangeMode.TRANSPARENT, ExchangeMode.DIRECT_TRANSMIT]


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
def test_the_poll_finds_the_card_and_is_the_only_poll(rig, card, mode):
    rig.serve()
    reader = rig.reader(mode)
    polling = reader.wait_for_card(SYSTEM_CODE, WAIT_S)
    assert polling == PollingResponse(IDM, PMM)
    assert reader.card == polling
    assert reader.idm == IDM  # GET DATA
    assert reader.mode is mode
    assert reader.name == rig.pcscd.reader_name
    assert card.commands_handled == 1


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
def test_reads_and_writes_through_a_session_land_in_the_card(rig, card, mode):
    rig.serve()
    reader = rig.reader(mode)
    session = tap(reader)
    assert session.read_blocks(list(range(6))) == blocks_with_numbers()[:6]  # 4 + 2 blocks
    for number in (2, 7, 13):
        session.write_block(number, bytes([0xA0 + number]) * 16)
    assert [card.blocks[number] for number in (2, 7, 13)] == [
        bytes([0xA0 + number]) * 16 for number in (2, 7, 13)
    ]
    assert session.read_blocks([2, 7, 13]) == [card.blocks[number] for number in (2, 7, 13)]
    assert card.commands_handled == 7  # poll, 2 reads, 3 writes, 1 read


def test_an_acs_atr_selects_direct_transmit_by_itself(pcscd, card):
    rig = Rig(pcscd, card, atr=ACS_FELICA_ATR)
    try:
        rig.serve()
        reader = rig.reader()
        session = tap(reader)
        assert reader.mode is ExchangeMode.DIRECT_TRANSMIT
        assert reader.atr == ACS_FELICA_ATR
        assert session.read_blocks([0]) == [blocks_with_numbers()[0]]
    finally:
        rig.close()


def test_a_card_that_is_not_felica_is_ignored(pcscd, card):
    rig = Rig(pcscd, card, atr=MIFARE_CLASSIC_ATR)
    try:
        rig.serve()
        reader = rig.reader()
        started = time.monotonic()
        assert reader.wait_for_card(SYSTEM_CODE, 1.0) is None
        assert 1.0 <= time.monotonic() - started < 1.5
        assert rig.vpcd.in_field.is_set()  # it was there all along
        rig.vpcd.stop()
        assert rig.next_presentation().apdus == 0  # not even GET DATA
    finally:
        rig.close()


def test_a_felica_card_of_another_system_is_polled_until_the_timeout(pcscd):
    card = SimulatedLiteS(IDM, PMM, system_code=0x8008)
    rig = Rig(pcscd, card)
    try:
        rig.serve()
        reader = rig.reader()
        started = time.monotonic()
        assert reader.wait_for_card(SYSTEM_CODE, 1.0) is None
        assert time.monotonic() - started < 1.5
        assert card.commands_handled >= 2  # the poll was retried while the card stayed
        assert reader.card is None
    finally:
        rig.close()


def test_no_card_means_none_after_the_timeout(rig):
    reader = rig.reader()
    started = time.monotonic()
    assert reader.wait_for_card(SYSTEM_CODE, 0.3) is None
    assert 0.3 <= time.monotonic() - started < 0.6


def test_exchange_without_a_card_is_a_transport_error(rig):
    with pytest.raises(TransportError, match="no card"):
        rig.reader().exchange(POLL, 0.02)


def test_a_reader_that_is_not_there_is_a_transport_error(rig):
    with pytest.raises(TransportError, match="no PC/SC reader matching"):
        rig.reader(spec="pcsc:no such reader").wait_for_card(SYSTEM_CODE, 0.1)


def test_plain_pcsc_takes_the_first_reader(rig):
    reader = rig.reader(spec="pcsc")
    assert reader.wait_for_card(SYSTEM_CODE, 0.05) is None
    assert reader.name == rig.pcscd.reader_name  # "... 00 00" comes before "... 00 01"


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
def test_a_card_leaving_mid_session_fails_the_exchange_and_is_seen_gone(rig, card, mode):
    rig.serve(1, faults=[Faults(leave_after_commands=3)])  # poll and two reads
    reader = rig.reader(mode)
    session = tap(reader)
    session.read_blocks(list(range(6)))
    with pytest.raises(TransportError):
        session.write_block(0, b"\xEE" * 16)
    assert card.blocks[0] == blocks_with_numbers()[0]
    started = time.monotonic()
    assert reader.wait_for_removal(WAIT_S) is True
    assert time.monotonic() - started < 1.0  # pcscd looks every 0.4 s
    assert reader.card is None
    presentation = rig.next_presentation()
    assert presentation.ended_by is PresentationEnd.CARD_LEFT
    assert presentation.commands == 3


def test_a_torn_write_times_out_and_the_card_is_gone(rig, card):
    rig.serve(1, faults=[Faults(tear_write_number=1, tear_bytes=4)])
    reader = rig.reader()
    session = tap(reader)
    with pytest.raises(TransportTimeout):
        session.write_block(3, b"\xEE" * 16)
    assert card.blocks[3] == b"\xEE" * 4 + blocks_with_numbers()[3][4:]
    assert reader.wait_for_removal(WAIT_S) is True


def test_a_card_slower_than_the_timer_times_out_but_its_write_lands(rig, card):
    rig.serve(1)
    reader = rig.reader(ExchangeMode.TRANSPARENT)
    session = tap(reader)
    card.faults = Faults(latency_s=0.3)  # from now on; the emulator reads it per command
    started = time.monotonic()
    with pytest.raises(TransportTimeout):
        session.write_block(5, b"\x55" * 16)
    elapsed_s = time.monotonic() - started
    assert 0.05 <= elapsed_s < 0.2  # the reader's timer (PMm write time + margin), not 0.3 s
    assert card.blocks[5] == b"\x55" * 16


def test_latency_within_the_timer_is_waited_and_beyond_it_is_a_timeout(rig, card):
    rig.serve(1, faults=[Faults(latency_s=0.01)])
    reader = rig.reader(ExchangeMode.TRANSPARENT)
    session = tap(reader)  # the 0.02 s poll sees the 0.01 s card
    started = time.monotonic()
    assert session.read_blocks([1]) == [blocks_with_numbers()[1]]
    assert time.monotonic() - started >= 0.01
    with pytest.raises(TransportTimeout):
        reader.exchange(POLL, 0.005)


def test_a_card_too_slow_for_the_poll_is_not_found(rig, card):
    rig.serve(1, faults=[Faults(latency_s=0.05)])
    reader = rig.reader(ExchangeMode.TRANSPARENT)
    started = time.monotonic()
    assert reader.wait_for_card(SYSTEM_CODE, 1.0) is None
    assert time.monotonic() - started < 1.5


def test_several_presentations_each_found_and_saved(rig, card):
    saved: list[dict] = []

    def on_presentation(presentation: Presentation) -> None:
        saved.append(card.to_json())
        rig.presented.put(presentation)

    rig.vpcd.serve_in_background(3, on_presentation=on_presentation)
    reader = rig.reader()
    for number in range(1, 4):
        session = tap(reader)
        session.write_block(0, bytes([number]) * 16)
        rig.vpcd.remove()
        assert reader.wait_for_removal(WAIT_S) is True
        presentation = rig.next_presentation()
        assert (presentation.number, presentation.ended_by) == (number, PresentationEnd.REMOVED)
        assert saved[-1]["blocks"][0] == (bytes([number]) * 16).hex()
    assert len(saved) == 3
    assert reader.wait_for_card(SYSTEM_CODE, 0.5) is None  # three presentations, then none


def test_the_dwell_starts_at_the_first_apdu_so_a_reader_started_late_misses_no_card(rig, card):
    """A card held to a reader nobody reads yet waits there: ``duration_s`` counts from the first
    APDU, as a presentation on nfcpy's udp link starts when a reader activates the card. It
    counted from the connection: ``sim serve --via vpcd:`` started before ``farebox run`` used up
    its first presentation unread, and ``run --max-taps 3`` waited for a third tap forever."""
    rig.vpcd.serve_in_background(1, on_presentation=rig.presented.put, duration_s=1.0)
    wait_until_slot_holds_a_card(rig.pcscd.reader_name)
    time.sleep(1.5)  # longer than the dwell, with pcscd checking the card but nobody reading
    assert rig.presented.empty(), "the card left before any reader read it"
    session = tap(rig.reader())
    assert session.read_blocks([1]) == [blocks_with_numbers()[1]]
    presentation = rig.next_presentation()
    assert presentation.ended_by is PresentationEnd.DURATION
    assert presentation.commands == 2  # the poll and the read
    assert presentation.duration_s >= 2.5  # in the field from the connection


def test_wait_for_removal_is_false_while_the_card_stays(rig):
    rig.serve(1)
    reader = rig.reader()
    tap(reader)
    started = time.monotonic()
    assert reader.wait_for_removal(0.5) is False
    assert 0.5 <= time.monotonic() - started < 0.8
    rig.vpcd.remove()
    assert reader.wait_for_removal(WAIT_S) is True
    assert reader.wait_for_removal(0.0) is True  # and stays gone


def test_frames_and_apdus_are_logged_in_hex_at_debug(rig, caplog):
    caplog.set_level(logging.DEBUG, logger="farebox.protocol.pcsc")
    rig.serve(1)
    tap(rig.reader())
    logged = [
        record.getMessage() for record in caplog.records if record.name == "farebox.protocol.pcsc"
    ]
    assert "apdu > ff ca 00 00 00" in logged
    assert any(line.startswith("frame > 06 00 88 b4 00 00") for line in logged)
    assert any(line.startswith("frame < 12 01 " + IDM.hex(" ")) for line in logged)


def test_pcscd_going_away_is_a_transport_error_and_a_new_one_is_picked_up(pcscd, card):
    first = Rig(pcscd, card)
    try:
        first.serve(1)
        reader = first.reader()
        session = tap(reader)
        pcscd.stop()
        with pytest.raises(TransportError):
            session.read_blocks([0])
        with pytest.raises(TransportError, match="pcscd"):
            reader.wait_for_removal(0.1)  # unknown, not "gone"
        with pytest.raises(TransportError, match="pcscd"):
            reader.wait_for_card(SYSTEM_CODE, 0.1)
        assert first.next_presentation().ended_by is PresentationEnd.READER_CLOSED
    finally:
        first.vpcd.close()
        if not pcscd.running:
            pcscd.start()  # for the tests after this one (a new port)
    second = Rig(pcscd, card)
    second.readers.append(reader)
    try:
        second.serve(1)
        # The same PcscReader object finds its way to the new pcscd.
        assert reader.wait_for_card(SYSTEM_CODE, WAIT_S) == PollingResponse(IDM, PMM)
    finally:
        second.close()
