"""A simulated Lite-S presented to a real pcscd through vsmartcard's vpcd reader driver.

vpcd (``libifdvpcd.so``, from the vsmartcard-vpcd package) is a pcscd reader driver that listens
on TCP ``PORT`` (all interfaces) for a "virtual ICC". This module is our own client for it (the
vsmartcard Python package is GPL-3 and is not used): :class:`VpcdCard` connects to
``127.0.0.1:PORT`` and plays both the contactless reader and the card, answering the pseudo-APDUs
that :class:`~farebox.protocol.transports.pcsc.PcscReader` sends in either exchange mode and
handing the FeliCa frames inside them to ``SimulatedLiteS.respond``.

Wire protocol: every message either way is a 2-byte big-endian length and a payload; vpcd speaks
first. One-byte messages are control: 00 power off, 01 power on, 02 reset (no reply), 04 get ATR
(reply: the ATR). Longer messages are APDUs; the reply is the response APDU with SW1 SW2.

A presentation is one TCP connection: opening it puts the card in the field, closing it takes the
card away; a presentation's duration counts from the first APDU a program sends the card, so a
card no one reads yet waits in the field. pcscd checks presence every 0.4 s (vpcd asks for the ATR, and accepts a waiting
connection when it has none), so it sees a card arrive or leave within 0.4 s. vpcd also notices a
closed connection when an APDU fails on it, and then takes the next waiting connection at the
next check without pcscd ever reporting a removal: hence the pause between presentations
(``away_s``). :class:`Faults` given per presentation are armed on the card: after
``leave_after_commands`` answers the connection closes (the card leaves), a torn write answers
with the reader's timeout status and then leaves, and ``latency_s`` delays each answer (an answer
later than the command's timeout becomes the timeout status, but the card still acted).

:class:`EmulatedReader` is the pure part (messages in, replies out); :class:`VpcdCard` is the
socket shell; :class:`PrivatePcscd` runs a pcscd of our own for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.cardserver import CardServer, FaultPlan
from farebox.protocol.transports.pcsc import (
    DIRECT_TRANSMIT_HEADER,
    PN532_IN_COMMUNICATE_THRU,
    PN532_IN_COMMUNICATE_THRU_ANSWER,
    PN532_STATUS_OK,
    PN532_STATUS_TIMEOUT,
    STATUS_NO_ANSWER_FROM_CARD,
    STATUS_NO_ERROR,
    SW_SUCCESS,
    TAG_GENERIC_ERROR_STATUS,
    TAG_RESPONSE_DATA,
    TAG_TIMER,
    TAG_TRANSCEIVE,
    encode_tlv,
    parse_tlvs,
)

LOG = logging.getLogger("farebox.protocol.vpcd")
_POLL_S = 0.02  # how often a presentation looks at remove() / stop() while vpcd is quiet

#: PC/SC Part 3 ATR of a FeliCa card (standard 11 = FeliCa, card name 00 3B).
FELICA_ATR = bytes.fromhex("3B8F8001804F0CA0000003061100 3B0000000042")
#: The ATR ACS's PN532-based readers (ACR122U) report for FeliCa 212 kbps.
ACS_FELICA_ATR = bytes.fromhex("3B8F8001804F0CA00000030603F011000000008A")

VPCD_POWER_OFF = 0x00
VPCD_POWER_ON = 0x01
VPCD_RESET = 0x02
VPCD_GET_ATR = 0x04

# Status words and Part 3 error statuses the emulated reader answers with.
SW_WRONG_LENGTH = b"\x67\x00"
SW_INS_NOT_SUPPORTED = b"\x6D\x00"
SW_CLA_NOT_SUPPORTED = b"\x6E\x00"
SW_WRONG_P1_P2 = b"\x6A\x86"
SW_FUNCTION_NOT_SUPPORTED = b"\x6A\x81"
SW_OPERATION_FAILED = b"\x63\x00"
STATUS_OBJECT_NOT_SUPPORTED = b"\x6A\x81"
STATUS_OBJECT_BAD_VALUE = b"\x6A\x80"
# Our choice (Part 3 names none for it): an exchange without a session or without FeliCa chosen.
STATUS_COMMAND_NOT_ALLOWED = b"\x69\x86"  # ISO 7816-4 "command not allowed"

_INS_GET_DATA = 0xCA
_INS_DIRECT_TRANSMIT = 0x00
_INS_ENVELOPE = 0xC2
_P2_MANAGE_SESSION = 0x00
_P2_TRANSPARENT_EXCHANGE = 0x01
_P2_SWITCH_PROTOCOL = 0x02
_TAG_START_SESSION = 0x81
_TAG_END_SESSION = 0x82
_TAG_RF_OFF = 0x83
_TAG_RF_ON = 0x84
_TAG_SWITCH_PROTOCOL = 0x8F
_TAG_TRANSMISSION_FLAGS = 0x90  # accepted and ignored: FeliCa framing is the reader's business
_TAG_BIT_FRAMING = 0x91
_STANDARD_FELICA = 0x03
# Further response objects after C0, all-zero (ACS's transparent exchange answers carry a 92 and
# a 96 object): sent so that the host's parser has to skip objects it does not use.
_EXTRA_STATUS_OBJECTS = bytes.fromhex("920100 96020000")


@dataclass(frozen=True)
class Reply:
    """What to do with one message: wait ``delay_s``, send ``data`` (None: nothing), maybe leave."""

    data: bytes | None
    delay_s: float = 0.0
    card_left: bool = False


class EmulatedReader:
    """A contactless reader holding ``card``: vpcd messages in, :class:`Reply` out. No I/O.

    ``reader_timeout_s`` is the RF timeout used when a command carries none (direct transmit never
    does; a transparent exchange may leave out its timer object).
    """

    def __init__(
        self, card: SimulatedLiteS, atr: bytes = FELICA_ATR, reader_timeout_s: float = 0.1
    ) -> None:
        self.card = card
        self.atr = bytes(atr)
        self.reader_timeout_s = reader_timeout_s
        self.session_open = False
        self.felica_selected = False
        self.frames_handled = 0

    def power_cycle(self) -> None:
        """RF off and on: any transparent session ends."""
        self.session_open = False
        self.felica_selected = False

    def handle(self, message: bytes) -> Reply:
        message = bytes(message)
        if len(message) == 1:
            return self._control(message[0])
        return self._apdu(message)

    def _control(self, code: int) -> Reply:
        if code == VPCD_GET_ATR:
            return Reply(self.atr)
        if code in (VPCD_POWER_OFF, VPCD_POWER_ON, VPCD_RESET):
            self.power_cycle()
        else:
            LOG.warning("unknown vpcd control message 0x%02X", code)
        return Reply(None)

    def _apdu(self, apdu: bytes) -> Reply:
        if len(apdu) < 4:
            return Reply(SW_WRONG_LENGTH)
        cla, ins, p1, p2 = apdu[:4]
        if len(apdu) <= 5:
            data = b""  # header only, or header and Le
        else:
            lc = apdu[4]
            data = apdu[5 : 5 + lc]
            if len(data) != lc or len(apdu) - 5 - lc > 1:
                return Reply(SW_WRONG_LENGTH)
        if cla != 0xFF:
            return Reply(SW_CLA_NOT_SUPPORTED)
        if ins == _INS_GET_DATA:
            if p1 != 0x00 or p2 != 0x00:
                return Reply(SW_FUNCTION_NOT_SUPPORTED)
            return Reply(self.card.idm + SW_SUCCESS)
        if ins == _INS_DIRECT_TRANSMIT and apdu[:4] == DIRECT_TRANSMIT_HEADER:
            return self._direct_transmit(data)
        if ins == _INS_ENVELOPE and p1 == 0x00:
            if p2 == _P2_MANAGE_SESSION:
                return self._manage_session(data)
            if p2 == _P2_SWITCH_PROTOCOL:
                return self._switch_protocol(data)
            if p2 == _P2_TRANSPARENT_EXCHANGE:
                return self._transparent_exchange(data)
            return Reply(SW_WRONG_P1_P2)
        return Reply(SW_INS_NOT_SUPPORTED)

    # -- the card behind the RF link --

    def _card_answer(self, frame: bytes, timeout_s: float) -> tuple[bytes | None, float, bool]:
        """``(answer or None, delay_s, card_left)`` for one frame given the reader's timeout."""
        self.frames_handled += 1
        answer = self.card.respond(frame)
        latency_s = self.card.faults.latency_s
        card_left = not self.card.in_field
        if answer is None or latency_s > timeout_s:
            return None, timeout_s, card_left
        return answer, latency_s, card_left

    # -- ACR122U direct transmit --

    def _direct_transmit(self, data: bytes) -> Reply:
        if data[:2] != PN532_IN_COMMUNICATE_THRU:
            return Reply(SW_OPERATION_FAILED)  # other PN532 commands are not emulated
        answer, delay_s, card_left = self._card_answer(data[2:], self.reader_timeout_s)
        head = PN532_IN_COMMUNICATE_THRU_ANSWER
        if answer is None:
            return Reply(head + bytes([PN532_STATUS_TIMEOUT]) + SW_SUCCESS, delay_s, card_left)
        return Reply(head + bytes([PN532_STATUS_OK]) + answer + SW_SUCCESS, delay_s, card_left)

    # -- PC/SC 2.02 Part 3 --

    @staticmethod
    def _status(index: int, status: bytes) -> bytes:
        return encode_tlv(TAG_GENERIC_ERROR_STATUS, bytes([index]) + status)

    def _objects(self, data: bytes) -> list[tuple[int, bytes]] | None:
        try:
            return parse_tlvs(data)
        except Exception:  # noqa: BLE001 - any bad encoding is the same error to the host
            return None

    def _manage_session(self, data: bytes) -> Reply:
        objects = self._objects(data)
        if objects is None:
            return Reply(SW_WRONG_LENGTH)
        for index, (tag, _) in enumerate(objects, start=1):
            if tag == _TAG_START_SESSION:
                self.session_open = True
                self.felica_selected = False
            elif tag == _TAG_END_SESSION:
                self.session_open = False
                self.felica_selected = False
            elif tag not in (_TAG_RF_OFF, _TAG_RF_ON):
                return Reply(self._status(index, STATUS_OBJECT_NOT_SUPPORTED) + SW_SUCCESS)
        return Reply(self._status(0, STATUS_NO_ERROR) + SW_SUCCESS)

    def _switch_protocol(self, data: bytes) -> Reply:
        objects = self._objects(data)
        if objects is None:
            return Reply(SW_WRONG_LENGTH)
        if not self.session_open:
            return Reply(self._status(0, STATUS_COMMAND_NOT_ALLOWED) + SW_SUCCESS)
        for index, (tag, value) in enumerate(objects, start=1):
            if tag != _TAG_SWITCH_PROTOCOL:
                return Reply(self._status(index, STATUS_OBJECT_NOT_SUPPORTED) + SW_SUCCESS)
            if len(value) != 2 or value[0] != _STANDARD_FELICA:
                return Reply(self._status(index, STATUS_OBJECT_BAD_VALUE) + SW_SUCCESS)
            self.felica_selected = True
        return Reply(self._status(0, STATUS_NO_ERROR) + SW_SUCCESS)

    def _transparent_exchange(self, data: bytes) -> Reply:
        objects = self._objects(data)
        if objects is None:
            return Reply(SW_WRONG_LENGTH)
        if not (self.session_open and self.felica_selected):
            return Reply(self._status(0, STATUS_COMMAND_NOT_ALLOWED) + SW_SUCCESS)
        timeout_s = self.reader_timeout_s
        reply = b""
        delay_s = 0.0
        card_left = False
        for index, (tag, value) in enumerate(objects, start=1):
            if tag == TAG_TIMER:
                if len(value) != 4:
                    return Reply(self._status(index, STATUS_OBJECT_BAD_VALUE) + SW_SUCCESS)
                timeout_s = int.from_bytes(value, "little") / 1e6
            elif tag == TAG_TRANSCEIVE:
                answer, delay_s, card_left = self._card_answer(value, timeout_s)
                if answer is None:
                    status = self._status(index, STATUS_NO_ANSWER_FROM_CARD)
                    return Reply(status + SW_SUCCESS, delay_s, card_left)
                reply = encode_tlv(TAG_RESPONSE_DATA, answer)
            elif tag not in (_TAG_TRANSMISSION_FLAGS, _TAG_BIT_FRAMING):
                return Reply(self._status(index, STATUS_OBJECT_NOT_SUPPORTED) + SW_SUCCESS)
        head = self._status(0, STATUS_NO_ERROR) + _EXTRA_STATUS_OBJECTS
        return Reply(head + reply + SW_SUCCESS, delay_s, card_left)


# --- the socket shell -------------------------------------------------------------------------


class PresentationEnd(enum.Enum):
    """Why a presentation ended."""

    CARD_LEFT = "card_left"
    """The card model left the field (leave_after_commands, a torn write)."""
    REMOVED = "removed"
    """:meth:`VpcdCard.remove` was called."""
    DURATION = "duration"
    """``duration_s`` passed."""
    READER_CLOSED = "reader_closed"
    """vpcd closed the connection (pcscd stopped or dropped the card)."""
    STOPPED = "stopped"
    """:meth:`VpcdCard.stop` was called."""


@dataclass(frozen=True)
class Presentation:
    """One presentation of the card, as the emulated reader saw it."""

    number: int
    """1-based, counted over the VpcdCard's life."""
    faults: Faults
    commands: int
    """FeliCa frames the card model received."""
    apdus: int
    """APDUs vpcd sent (control messages not counted)."""
    ended_by: PresentationEnd
    duration_s: float


class VpcdCard(CardServer[Presentation]):
    """Presents ``card`` to pcscd's vpcd driver on ``host:port``, one TCP connection per tap.

    Run :meth:`serve` (or :meth:`present`) on one thread; :meth:`remove`, :meth:`stop` and
    :meth:`close` may be called from any thread.
    """

    kind = "vpcd card"

    def __init__(
        self,
        card: SimulatedLiteS,
        port: int,
        host: str = "127.0.0.1",
        *,
        atr: bytes = FELICA_ATR,
        reader_timeout_s: float = 0.1,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__()
        self.card = card
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.reader = EmulatedReader(card, atr, reader_timeout_s)
        #: Set while a presentation's connection is open.
        self.in_field = threading.Event()
        self._remove = threading.Event()

    def __repr__(self) -> str:
        return (
            f"VpcdCard({self.host}:{self.port}, card={self.card.idm.hex()}, "
            f"presentations={self.presentation_count}, stopping={self._stopping.is_set()})"
        )

    def __enter__(self) -> VpcdCard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def remove(self) -> None:
        """Take the card out of the field now: the presentation in progress ends as REMOVED."""
        self._remove.set()

    def present(
        self, faults: Faults | None = None, *, duration_s: float | None = None
    ) -> Presentation | None:
        """Arm ``faults``, connect (the card enters the field) and answer vpcd until the
        presentation ends; None if stopped before the connection was made.

        ``duration_s`` counts from the first APDU, not from the connection: until a program
        sends the card an APDU (pcscd alone only asks for its ATR) the card waits in the field,
        as a card on nfcpy's udp link waits for a reader to activate it. A reader started after
        the card (``sim serve`` before ``farebox run``) so misses no presentation."""
        faults = faults or Faults()
        card = self.card
        self._remove.clear()
        card.in_field = True
        card.faults = faults
        self.reader.power_cycle()
        number = self.presentation_count + 1
        if not card.in_field:  # leave_after_commands=0: the card never enters
            self.presentation_count = number
            return Presentation(number, faults, 0, 0, PresentationEnd.CARD_LEFT, 0.0)
        sock = self._connect()
        if sock is None:
            card.in_field = False
            return None
        started = time.monotonic()
        commands_before = card.commands_handled
        self.in_field.set()
        LOG.debug("card %s enters the field (presentation %d)", card.idm.hex(), number)
        try:
            apdus, ended_by = self._serve(sock, duration_s)
        finally:
            self.in_field.clear()
            card.in_field = False
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.presentation_count = number
        presentation = Presentation(
            number,
            faults,
            card.commands_handled - commands_before,
            apdus,
            ended_by,
            time.monotonic() - started,
        )
        LOG.debug("%s", presentation)
        return presentation

    def serve(
        self,
        presentations: int | None = None,
        *,
        faults: FaultPlan = (),
        on_presentation: Callable[[Presentation], None] | None = None,
        duration_s: float | None = None,
        away_s: float = 0.5,
    ) -> int:
        """Serve ``presentations`` presentations (None: until :meth:`stop`); return how many.

        ``on_presentation`` runs on this thread after each one, with the card out of the field
        (save the card file there); an exception from it ends :meth:`serve`. The card then stays
        away ``away_s`` before the next presentation. Keep that above pcscd's 0.4 s presence
        check: when an APDU, not a presence check, finds the old connection closed, vpcd takes
        the next connection at the following check and pcscd never reports the removal.
        """
        return self.serve_presentations(
            lambda faults: self.present(faults, duration_s=duration_s),
            presentations, faults, on_presentation, away_s,
        )

    def serve_in_background(
        self,
        presentations: int | None = None,
        *,
        faults: FaultPlan = (),
        on_presentation: Callable[[Presentation], None] | None = None,
        duration_s: float | None = None,
        away_s: float = 0.5,
    ) -> threading.Thread:
        """Run :meth:`serve` on a daemon thread; :meth:`close` stops and joins it and re-raises
        what it raised."""
        return self.start_background(
            lambda: self.serve(presentations, faults=faults, on_presentation=on_presentation,
                               duration_s=duration_s, away_s=away_s),
            f"vpcd-card {self.port}",
        )

    def stop(self) -> None:
        """Make :meth:`serve` / :meth:`present` return soon (the current presentation ends as
        STOPPED). Thread-safe, idempotent."""
        self._stopping.set()

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Stop and join the background thread. Idempotent. Raises RuntimeError if the thread
        failed or did not stop."""
        self.stop()
        self.join_background(join_timeout_s)

    def _serve(
        self, sock: socket.socket, duration_s: float | None
    ) -> tuple[int, PresentationEnd]:
        """Answer vpcd's messages until the presentation ends; ``(apdus, why it ended)``. The
        ``duration_s`` clock starts at the first APDU (see :meth:`present`)."""
        apdus = 0
        ends_at = None
        debug = LOG.isEnabledFor(logging.DEBUG)
        while True:
            if not self.card.in_field:
                return apdus, PresentationEnd.CARD_LEFT
            if self._remove.is_set():
                return apdus, PresentationEnd.REMOVED
            if self._stopping.is_set():
                return apdus, PresentationEnd.STOPPED
            if ends_at is not None and time.monotonic() >= ends_at:
                return apdus, PresentationEnd.DURATION
            readable, _, _ = select.select([sock], [], [], _POLL_S)
            if not readable:
                continue
            try:
                message = _receive(sock)
            except OSError:
                message = None
            if message is None:
                return apdus, PresentationEnd.READER_CLOSED
            is_apdu = len(message) > 1
            if is_apdu:
                apdus += 1
                if apdus == 1 and duration_s is not None:
                    ends_at = time.monotonic() + duration_s
                if debug:
                    LOG.debug("vpcd apdu > %s", message.hex(" "))
            reply = self.reader.handle(message)
            if reply.delay_s > 0:
                time.sleep(reply.delay_s)
            if reply.data is not None:
                if is_apdu and debug:
                    LOG.debug("vpcd apdu < %s", reply.data.hex(" "))
                try:
                    sock.sendall(len(reply.data).to_bytes(2, "big") + reply.data)
                except OSError:
                    return apdus, PresentationEnd.READER_CLOSED
            if reply.card_left:
                return apdus, PresentationEnd.CARD_LEFT

    def _connect(self) -> socket.socket | None:
        deadline = time.monotonic() + self.connect_timeout_s
        while not self.stopping:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError as error:
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"vpcd does not listen on {self.host}:{self.port}: {error}"
                    ) from None
                self._stopping.wait(0.05)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return None


_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _receive(sock: socket.socket) -> bytes | None:
    """One vpcd message, or None when the connection closed.

    vpcd 0.8 (vsmartcard 3.3, Debian 12) sends the length and the payload with two ``send``
    calls and leaves Nagle's algorithm on, so the payload waits for our ACK of the length; a
    delayed ACK would add 40 ms to every message. TCP_QUICKACK after the length sends the ACK now.
    """
    header = _receive_exactly(sock, 2)
    if header is None:
        return None
    if _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    size = int.from_bytes(header, "big")
    return _receive_exactly(sock, size) if size else b""


# --- a pcscd of our own -----------------------------------------------------------------------

PCSCD_RUN_DIR = Path("/run/pcscd")  # compiled into pcscd 1.9: its pid file lives here
VPCD_DRIVER_PATHS = (
    Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so"),
    Path("/usr/local/lib/pcsc/drivers/serial/libifdvpcd.so"),
)
VPCD_SLOTS = 2  # Debian's vpcd opens PORT and PORT + 1 ("... 00 00" and "... 00 01")

# Runs in the child: put the listening socket on fd 3 and exec pcscd as a systemd-activated
# daemon (LISTEN_FDS=1, LISTEN_PID = its own pid), so that it uses our socket, not
# /run/pcscd/pcscd.comm, and skips its "another pcscd is running" check.
#: It also asks the kernel to send pcscd SIGTERM when the thread that started it dies, so that
#: a crashed test run leaves no pcscd behind (start it from a long-lived thread).
_SOCKET_ACTIVATION = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.set_inheritable(3, True)\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.environ.pop('LISTEN_FDNAMES', None)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class PcscdError(RuntimeError):
    """Our pcscd did not start; the message ends with the tail of its log."""


def find_pcscd() -> str | None:
    """The pcscd executable, also when /usr/sbin is not on PATH."""
    return shutil.which("pcscd") or next(
        (str(path) for path in (Path("/usr/sbin/pcscd"), Path("/sbin/pcscd")) if path.exists()),
        None,
    )


def find_vpcd_driver() -> Path | None:
    """vpcd's ``libifdvpcd.so``: the LIBPATH of /etc/reader.conf.d/vpcd, else the usual places."""
    config = Path("/etc/reader.conf.d/vpcd")
    with contextlib.suppress(OSError):
        for line in config.read_text().splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "LIBPATH" and Path(value.strip()).exists():
                return Path(value.strip())
    return next((path for path in VPCD_DRIVER_PATHS if path.exists()), None)


def vpcd_reader_conf(port: int, driver: Path, friendly_name: str = "Virtual PCD") -> str:
    """A reader.conf entry for vpcd listening on ``port`` (DEVICENAME ``/dev/null:PORT`` means
    "listen"; a host name there would make vpcd connect out instead)."""
    return (
        f'FRIENDLYNAME "{friendly_name}"\n'
        f"DEVICENAME   /dev/null:{port}\n"
        f"LIBPATH      {driver}\n"
        f"CHANNELID    {port}\n"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))  # vpcd binds every interface
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A TCP port PORT such that PORT and PORT + 1 are free on every interface."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        if port + VPCD_SLOTS - 1 <= 0xFFFF and all(
            _port_free(port + slot) for slot in range(VPCD_SLOTS)
        ):
            return port
    raise OSError("no pair of free TCP ports found")


class PrivatePcscd:
    """pcscd in the foreground, reading only a vpcd reader.conf, answering on its own socket.

    ``directory`` holds the config directory, the socket (``pcscd.comm``) and the log. Clients
    find the socket through ``PCSCLITE_CSOCK_NAME`` (see :meth:`client_env`), which libpcsclite
    reads once per process, at its first call: set it before the first pyscard call and keep
    the same ``socket_path`` for every pcscd started in that process.

    pcscd 1.9 has no option for its socket path, so the socket is handed over the systemd way
    (socket activation), which also keeps it from refusing to start next to a system pcscd. It
    still creates /run/pcscd if missing (root only) and writes and then deletes
    /run/pcscd/pcscd.pid; a pid file that was there before is put back on stop. A system pcscd
    is not touched otherwise, but our pcscd also scans for USB readers (pcscd has no switch to
    stop that) and may hold one while it runs.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        socket_path: str | os.PathLike[str] | None = None,
        port: int | None = None,
        friendly_name: str = "Virtual PCD",
        log_apdus: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.socket_path = Path(socket_path) if socket_path else self.directory / "pcscd.comm"
        self.config_dir = self.directory / "reader.conf.d"
        self.log_path = self.directory / "pcscd.log"
        self.requested_port = port
        self.port = port or 0
        self.friendly_name = friendly_name
        self.log_apdus = log_apdus
        self.process: subprocess.Popen[bytes] | None = None
        self._saved_pid_file: bytes | None = None

    @property
    def reader_name(self) -> str:
        """The PC/SC name of the slot on ``port``."""
        return f"{self.friendly_name} 00 00"

    def client_env(self) -> dict[str, str]:
        """Environment for a client process: ``PCSCLITE_CSOCK_NAME``."""
        return {"PCSCLITE_CSOCK_NAME": str(self.socket_path)}

    def __enter__(self) -> PrivatePcscd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 5.0, attempts: int = 3) -> None:
        """Start pcscd and wait until vpcd listens; PcscdError with its log if it does not."""
        pcscd = find_pcscd()
        driver = find_vpcd_driver()
        if pcscd is None:
            raise PcscdError("pcscd is not installed (apt-get install pcscd)")
        if driver is None:
            raise PcscdError("vpcd is not installed (apt-get install vsmartcard-vpcd)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.port = self.requested_port or free_port_pair()
            (self.config_dir / "vpcd").write_text(
                vpcd_reader_conf(self.port, driver, self.friendly_name)
            )
            self._spawn(pcscd)
            try:
                self._wait_ready(timeout_s)
                return
            except PcscdError:
                self.stop()
                if attempt == attempts or self.requested_port:
                    raise
                LOG.info("pcscd attempt %d failed, trying another port", attempt)

    def _spawn(self, pcscd: str) -> None:
        with contextlib.suppress(OSError):
            self._saved_pid_file = (PCSCD_RUN_DIR / "pcscd.pid").read_bytes()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o666)
            listener.listen(64)
            fd = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
            arguments = [pcscd, "--foreground", "--info", "--config", str(self.config_dir)]
            if self.log_apdus:
                arguments += ["--debug", "--apdu"]
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", _SOCKET_ACTIVATION, str(fd), *arguments],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            os.close(fd)
        finally:
            listener.close()
        LOG.debug(
            "pcscd pid %d, vpcd port %d, socket %s", self.process.pid, self.port, self.socket_path
        )

    def _log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PcscdError(
                    f"pcscd exited with status {self.process.returncode}:\n{self._log_tail()}"
                )
            with contextlib.suppress(OSError):
                ready = b"daemon ready" in self.log_path.read_bytes()
                if ready and not any(_port_free(self.port + s) for s in range(VPCD_SLOTS)):
                    return
                if ready:
                    raise PcscdError(
                        f"pcscd is up but vpcd does not listen on port {self.port}:\n"
                        f"{self._log_tail()}"
                    )
            time.sleep(0.01)
        raise PcscdError(f"pcscd not ready after {timeout_s} s:\n{self._log_tail()}")

    def stop(self, timeout_s: float = 3.0) -> int | None:
        """Terminate pcscd (then kill it if it lingers); return its exit status."""
        status = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout_s)
            status = self.process.returncode
            self.process = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self._saved_pid_file is not None:
            with contextlib.suppress(OSError):
                (PCSCD_RUN_DIR / "pcscd.pid").write_bytes(self._saved_pid_file)
            self._saved_pid_file = None
        return status
