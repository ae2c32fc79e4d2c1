"""The card side of nfcpy's udp link: a :class:`SimulatedLiteS` that a reader on ``udp:HOST:PORT``
can tap, through nfcpy's own udp driver in card-emulation (listen) mode.

How nfcpy's udp driver links the two sides (``nfc/clf/udp.py``, nfcpy 1.0.4):

- Each datagram is ASCII ``b"212F <hex of the frame, LEN included>"``, or ``b"RFOFF"``
  (``_send_data``, ``_recv_data``). Receiving ``RFOFF`` raises ``nfc.clf.BrokenLinkError``.
- The card side binds the path's port; the reader side sends from a fresh ephemeral socket per
  ``sense`` (``ContactlessFrontend.sense`` calls ``device.mute()`` first, which closes the old
  socket). The card answers the address of the datagram that activated it (``target._addr``),
  but receives from anyone.
- ``mute()`` sends ``RFOFF`` only from a socket whose port is not the path's port and that has
  received something: only the *reader* ever sends it, when it senses again or closes. The card
  side never tells the reader it left; it just goes quiet and the reader times out.
- ``listen_ttf`` answers a Polling (``06 00 SC RC TSN``, system code or FF wildcards) itself from
  ``LocalTarget.sensf_res`` and returns only at the first command carrying the card's IDm, as
  ``tt3_cmd`` *without* its LEN byte, with the Polling in ``sensf_req`` (also without LEN). A
  Polling sent after that (a presence check) comes through ``exchange`` like any command. So
  a reader that only polls never activates the card, and listen does not check that the
  command comes from the socket that polled.
- The listening socket is bound to ``0.0.0.0`` (``_bind_socket``; a port in use makes
  ``listen`` return None silently), closed by every ``listen`` and ``close`` (``mute``), and
  each ``listen`` waits at least 0.5 s per datagram.

This module changes four things on its own subclass of that driver, for this process only:
the socket is bound once, to the path's host, which must be a loopback address; ``mute`` keeps
it open, so a reader's Polling that arrives between two presentations waits in the socket
instead of being dropped; ``close`` closes it; and receiving stops as soon as :meth:`stop` is
called. Polling answers, framing and ``RFOFF`` handling are nfcpy's.

A *presentation* is the card entering the field until it leaves. It starts at the reader's
first command after a Polling: nfcpy answers the Polling, the card model is then shown it too
(so it counts toward ``Faults.leave_after_commands``), and that command and every later frame
go to ``SimulatedLiteS.respond`` (None: stay silent; ``Faults.latency_s`` delays each answer
but not nfcpy's answer to the activating Polling). It ends when the card
model leaves the field (``Faults.leave_after_commands``, a torn write), the reader turns its
field off (``RFOFF``), a frame comes from another reader socket (the old reader is gone), the
reader stays silent for ``idle_timeout_s``, or :meth:`UdpCardServer.stop`. With ``dwell_s``
(a hand holding the card) the presentation lasts exactly that long from the activation: a
reader turning its field off or polling from a new socket within it activates the card again
(the same presentation, its commands counted) instead of ending it. A card that left
stays away: with ``away_s``, exactly that long whatever the readers do, as a hand would;
without, ignoring its old reader until that reader turns its field off or a new reader socket
polls. Either way a presence check sees it gone.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import nfc
import nfc.clf
import nfc.clf.udp

from farebox.protocol.errors import TransportError
from farebox.protocol.frames import ReadWithoutEncryption, WriteWithoutEncryption
from farebox.protocol.session import PMM_READ_INDEX, PMM_WRITE_INDEX, response_timeout_s
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.cardserver import CardServer, FaultPlan

LOG = logging.getLogger("farebox.protocol.nfcpy.card")

BRTY_FELICA_212 = "212F"
_FOREVER_S = 3600.0  # one listen or receive call while waiting without a deadline; stop() wakes it
_WAKE_DATAGRAM = b"WAKE"  # not "212F <hex>": nfcpy's receiver drops it as a TransmissionError


class PresentationEnd(enum.Enum):
    """Why a presentation ended."""

    CARD_LEFT = "card_left"
    """The card model left the field (leave_after_commands, a torn write)."""
    READER_OFF = "reader_off"
    """The reader turned its field off (RFOFF: it sensed again or closed)."""
    READER_CHANGED = "reader_changed"
    """A frame came from another reader socket: the old reader is gone. That frame is dropped."""
    READER_IDLE = "reader_idle"
    """The reader sent nothing for ``idle_timeout_s``."""
    STOPPED = "stopped"
    """:meth:`UdpCardServer.stop` was called."""


_READER_WENT = (PresentationEnd.READER_OFF, PresentationEnd.READER_CHANGED)


@dataclass(frozen=True)
class Presentation:
    """One presentation of the card, as the server saw it."""

    number: int
    """1-based, counted over the server's life."""
    faults: Faults
    commands: int
    """Frames the card model received, the activating Polling included."""
    ended_by: PresentationEnd
    reader_address: tuple[str, int] | None
    """The reader socket that activated the card (None when the card never entered)."""
    duration_s: float


class UdpCardServer(CardServer[Presentation]):
    """Presents one :class:`SimulatedLiteS` to readers on ``udp:HOST:PORT`` (loopback only).

    The socket is bound in the constructor, so a reader may poll before :meth:`serve` runs.
    Run :meth:`serve` (or :meth:`present`) on one thread; :meth:`stop` and :meth:`close` may be
    called from any thread.
    """

    def __init__(
        self,
        card: SimulatedLiteS,
        path: str = "udp:127.0.0.1:54321",
        *,
        idle_timeout_s: float | None = 10.0,
        away_s: float | None = None,
        dwell_s: float | None = None,
        pmm_timing: bool = False,
    ) -> None:
        """``dwell_s``: the card leaves the field that long after a reader activated it, as a
        hand holding a card over a reader would (None: it stays until something else ends the
        presentation). ``pmm_timing``: each Read and Write is answered after the response time
        the card's PMm declares for it (:func:`pmm_response_s`, the maximum a real Lite-S may
        take) rather than as soon as it is done."""
        super().__init__()
        self.card = card
        self.pmm_timing = pmm_timing
        self.idle_timeout_s = idle_timeout_s
        self.away_s = away_s
        self.dwell_s = dwell_s
        self._left_reader: tuple[str, int] | None = None
        self._clf, self._device = _open_card_frontend(path, self._stopping)
        self.address: tuple[str, int] = self._device.socket.getsockname()
        self.path = f"udp:{self.address[0]}:{self.address[1]}"

    def __repr__(self) -> str:
        return (
            f"UdpCardServer({self.path!r}, card={self.card.idm.hex()}, "
            f"presentations={self.presentation_count}, stopping={self._stopping.is_set()})"
        )

    def __enter__(self) -> UdpCardServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def present(
        self, faults: Faults | None = None, timeout_s: float | None = None
    ) -> Presentation | None:
        """Arm ``faults``, wait for a reader to activate the card (at most ``timeout_s``, None:
        until :meth:`stop`) and serve it until the presentation ends. None if no reader came.

        A ``timeout_s`` that expires between a reader's Polling and its first command loses that
        command (nfcpy's listen returns without it); :meth:`serve` waits without a timeout.
        """
        faults = faults or Faults()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._left_reader is not None:
            if not self._stay_away(self._left_reader, deadline):
                return None
            self._left_reader = None
        card = self.card
        card.in_field = True
        card.faults = faults
        number = self.presentation_count + 1
        if not card.in_field:  # leave_after_commands=0: the card never enters
            self.presentation_count = number
            return Presentation(number, faults, 0, PresentationEnd.CARD_LEFT, None, 0.0)
        target = self._listen(deadline)
        if target is None:
            card.in_field = False
            return None
        started = time.monotonic()
        commands_before = card.commands_handled
        reader = target._addr
        leaves_at = None if self.dwell_s is None else started + self.dwell_s
        while True:
            ended_by = self._serve(target, reader, leaves_at)
            if ended_by not in _READER_WENT or leaves_at is None or self.stopping:
                break
            # The reader turned its field off (or polls from a new socket) while the hand
            # still holds the card: the card stays, activated again by the reader's next poll,
            # and leaves when the hand does.
            target = self._listen(leaves_at if deadline is None else min(leaves_at, deadline))
            if target is None:
                ended_by = PresentationEnd.STOPPED if self.stopping else PresentationEnd.CARD_LEFT
                break
            reader = target._addr
        if ended_by is PresentationEnd.CARD_LEFT:
            self._left_reader = reader
        card.in_field = False
        self.presentation_count = number
        presentation = Presentation(
            number,
            faults,
            card.commands_handled - commands_before,
            ended_by,
            reader,
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
    ) -> int:
        """Serve ``presentations`` presentations (None: until :meth:`stop`); return how many.

        ``on_presentation`` runs on this thread after each one, with the card at rest (save
        the card file there); an exception from it ends :meth:`serve`.
        """
        return self.serve_presentations(self.present, presentations, faults, on_presentation)

    def serve_in_background(
        self,
        presentations: int | None = None,
        *,
        faults: FaultPlan = (),
        on_presentation: Callable[[Presentation], None] | None = None,
    ) -> threading.Thread:
        """Run :meth:`serve` on a daemon thread; :meth:`close` stops and joins it and re-raises
        what it raised."""
        return self.start_background(
            lambda: self.serve(presentations, faults=faults, on_presentation=on_presentation),
            f"udp-card {self.path}",
        )

    def stop(self) -> None:
        """Make :meth:`serve` / :meth:`present` return soon (the current presentation ends as
        STOPPED). Thread-safe, idempotent; the server cannot serve again afterwards."""
        self._stopping.set()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.bind((self.address[0], 0))
            waker.sendto(_WAKE_DATAGRAM, self.address)

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Stop, join the background thread, release the socket. Idempotent. Raises
        RuntimeError if the background thread failed or did not stop."""
        if self._clf is None:
            return
        self.stop()
        self.join_background(join_timeout_s, release=self._release)

    def _release(self) -> None:
        clf, self._clf = self._clf, None
        if clf is not None:
            clf.close()

    def _local_target(self) -> nfc.clf.LocalTarget:
        card = self.card
        sensf_res = b"\x01" + card.idm + card.pmm + card.system_code.to_bytes(2, "big")
        return nfc.clf.LocalTarget(BRTY_FELICA_212, sensf_res=bytearray(sensf_res))

    def _listen(self, deadline: float | None) -> nfc.clf.LocalTarget | None:
        """nfcpy's listen until a reader sends the card a command (its Polling answered)."""
        clf = self._open_clf()
        local_target = self._local_target()
        while not self.stopping:
            wait_s = _FOREVER_S if deadline is None else deadline - time.monotonic()
            if wait_s <= 0:
                return None
            try:
                target = clf.listen(local_target, wait_s)
            except nfc.clf.CommunicationError as error:  # a send failed
                LOG.debug("listen: %r", error)
                continue
            if target is not None and target.tt3_cmd is not None and not self.stopping:
                LOG.debug(
                    "activated by %s:%d with polling %s", *target._addr, target.sensf_req.hex()
                )
                return target
        return None

    def _serve(
        self, target: nfc.clf.LocalTarget, reader: tuple[str, int], leaves_at: float | None
    ) -> PresentationEnd:
        card, clf, device = self.card, self._open_clf(), self._device
        card.respond(_with_length(target.sensf_req))  # the Polling nfcpy answered for us
        command: bytes | None = _with_length(target.tt3_cmd)
        heard_s = time.monotonic()
        while True:
            answer = None if command is None else self._answer(command)
            if self.stopping:
                return PresentationEnd.STOPPED
            if leaves_at is not None and time.monotonic() >= leaves_at:
                card.in_field = False  # the hand moves on: this answer is not sent
                return PresentationEnd.CARD_LEFT
            if not card.in_field:
                if answer is not None:
                    clf.exchange(bytearray(answer), 0)  # send only: the card is gone after this
                return PresentationEnd.CARD_LEFT
            if self.idle_timeout_s is None:
                wait_s = _FOREVER_S
            else:
                wait_s = heard_s + self.idle_timeout_s - time.monotonic()
                if wait_s <= 0:
                    if answer is not None:
                        clf.exchange(bytearray(answer), 0)
                    return PresentationEnd.READER_IDLE
            if leaves_at is not None:
                wait_s = max(min(wait_s, leaves_at - time.monotonic()), 0.001)
            command = None
            try:
                # Send the answer (None: stay silent), then wait for the next frame.
                received = clf.exchange(None if answer is None else bytearray(answer), wait_s)
            except nfc.clf.BrokenLinkError:
                return PresentationEnd.READER_OFF
            except nfc.clf.TimeoutError:
                if self.stopping:
                    return PresentationEnd.STOPPED
                continue  # the idle check above ends the presentation when it is due
            except nfc.clf.CommunicationError as error:  # a malformed datagram
                LOG.debug("card side: %r", error)
                continue
            if self.stopping:
                return PresentationEnd.STOPPED
            if device.last_sender != reader:
                return PresentationEnd.READER_CHANGED
            heard_s = time.monotonic()
            command = bytes(received)

    def _answer(self, command: bytes) -> bytes | None:
        answer = self.card.respond(command)
        latency_s = self.card.faults.latency_s
        if answer is not None and self.pmm_timing:
            latency_s += pmm_response_s(self.card.pmm, command)
        if answer is not None and latency_s > 0:
            self._stopping.wait(latency_s)
        return answer

    def _stay_away(self, reader: tuple[str, int], deadline: float | None) -> bool:
        """The card left: it stays out of the field for ``away_s``, whatever the readers do, as
        a hand would (a reader polling again does not bring a card back). Without ``away_s`` it
        comes back once ``reader`` turns its field off or a new reader socket sends something.
        True: the card may come back; False: the deadline passed or stop."""
        clf, device = self._open_clf(), self._device
        away_until = None if self.away_s is None else time.monotonic() + self.away_s
        while not self.stopping:
            now = time.monotonic()
            if away_until is not None and now >= away_until:
                return True
            if deadline is not None and now >= deadline:
                return False
            ends = [end for end in (away_until, deadline) if end is not None]
            wait_s = min(ends) - now if ends else _FOREVER_S
            try:
                clf.exchange(None, wait_s)
            except nfc.clf.BrokenLinkError:
                if away_until is None:
                    return True
                continue
            except nfc.clf.CommunicationError:
                continue
            if away_until is None and device.last_sender != reader:
                return True
        return False

    def _open_clf(self) -> nfc.ContactlessFrontend:
        if self._clf is None:
            raise TransportError(f"card server {self.path} is closed")
        return self._clf


def pmm_response_s(pmm: bytes, command: bytes) -> float:
    """The response time ``pmm`` declares for the command frame ``command`` (length byte first):
    PMm[5] for a Read Without Encryption, PMm[6] for a Write Without Encryption, by the number of
    blocks in it; 0 for any other command (or a frame too short to say)."""
    code = command[1] if len(command) > 1 else None
    if code == ReadWithoutEncryption.CODE:
        index = PMM_READ_INDEX
    elif code == WriteWithoutEncryption.CODE:
        index = PMM_WRITE_INDEX
    else:
        return 0.0
    services_at = 10  # length, code, IDm (8)
    if len(command) <= services_at:
        return 0.0
    blocks_at = services_at + 1 + 2 * command[services_at]
    if len(command) <= blocks_at:
        return 0.0
    return response_timeout_s(pmm[index], command[blocks_at])


def _with_length(frame_without_length: bytes | bytearray) -> bytes:
    """nfcpy hands listen's frames over without their LEN byte."""
    return bytes([len(frame_without_length) + 1]) + bytes(frame_without_length)


class _CardSideUdpDevice(nfc.clf.udp.Device):
    """nfcpy's udp driver, card side: one socket bound to a loopback address for its life.

    See the module docstring for why ``_bind_socket``, ``mute``, ``close`` and ``_recv_data``
    differ from nfcpy's.
    """

    stopping: threading.Event
    last_sender: tuple[str, int] | None

    def _bind_socket(self, time_to_return: float) -> bool:
        if self.socket.getsockname()[1] == 0:
            self.socket.bind(self.addr)
        return True

    def mute(self) -> None:
        pass

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def _recv_data(self, timeout: float | None, *brty_list: str) -> tuple[str, bytearray, tuple]:
        if self.stopping.is_set():
            raise nfc.clf.TimeoutError("card server stopping")
        brty, data, addr = super()._recv_data(timeout, *brty_list)
        self.last_sender = addr
        return brty, data, addr


def _open_card_frontend(
    path: str, stopping: threading.Event
) -> tuple[nfc.ContactlessFrontend, _CardSideUdpDevice]:
    if not path.startswith("udp:"):
        raise ValueError(f"a simulated card needs a udp:HOST:PORT path, got {path!r}")
    clf = nfc.ContactlessFrontend()
    try:
        opened = clf.open(path)
    except OSError as error:  # host name that does not resolve
        raise TransportError(f"cannot open {path}: {error}") from error
    if not opened:
        raise TransportError(f"cannot open {path}")
    device = clf.device
    if type(device) is not nfc.clf.udp.Device:
        clf.close()
        raise ValueError(f"{path} did not open nfcpy's udp driver")
    host, port = device.addr
    if not ipaddress.ip_address(host).is_loopback:
        clf.close()
        raise ValueError(f"a simulated card listens on loopback only, not {host}")
    device.__class__ = _CardSideUdpDevice
    device.stopping = stopping
    device.last_sender = None
    device._create_socket()
    try:
        device._bind_socket(time.time())
    except OSError as error:
        clf.close()
        raise TransportError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    LOG.debug("card side listening on %s:%d", *device.socket.getsockname())
    return clf, device
