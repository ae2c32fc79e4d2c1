"""A :class:`~farebox.protocol.reader.Reader` over nfcpy's ``ContactlessFrontend``.

Paths are nfcpy's: ``usb`` / ``usb:VID:PID`` (RC-S380 is ``usb:054c:06c3``), ``tty:PORT:DRIVER``
and ``udp:HOST:PORT``, nfcpy's simulated RF link to a card on another socket (see
``nfcpy_card.py`` for the card side). The frontend is opened once and kept open for the
object's life: reopening it per tap is a known crash source.

How each Reader call maps onto nfcpy:

- ``wait_for_card`` is ``clf.sense(RemoteTarget("212F", sensf_req=<Polling without LEN>))``,
  repeated until the timeout. The sense *is* the tap's Polling command: its ``sensf_res`` becomes
  the :class:`PollingResponse`, so nobody polls a second time. Each sense first turns the field
  off (``device.mute()``; over udp that sends ``RFOFF`` to the card side).
- ``exchange`` is ``clf.exchange(frame, timeout)`` to the target the sense found.
- ``wait_for_removal`` is nfcpy's presence check (``Type3Tag._is_present``): a Polling for the
  same system code sent through ``exchange``; the card is gone once it stops answering with its
  IDm (``presence_attempts`` tries in a row, like nfcpy's three retries), every
  ``presence_interval_s`` (50 ms), each try waiting ``presence_timeout_s`` (10 ms: a one-slot
  Polling answers within 3.625 ms, the timeout nfcpy itself uses). A card that leaves is seen
  gone within interval + attempts x timeout = 80 ms.

nfcpy's errors become ours: ``nfc.clf.TimeoutError`` and ``BrokenLinkError`` (the peer turned the
link off) are :class:`TransportTimeout`; ``TransmissionError``, other nfcpy errors, ``OSError``
(a reader that vanished: ENODEV, EIO) and malformed udp datagrams are :class:`TransportError`.

udp specifics: a sense with no answer waits nfcpy's fixed 1.0 s (``nfc/clf/udp.py``
``sense_ttf``), so ``wait_for_card`` has a 1 s granularity there; the card side never sends
``RFOFF`` (only a reader does), so a card leaving shows as timeouts; when the card is on a loopback
address the reader's sockets are bound to that address (nfcpy leaves them to bind 0.0.0.0 at the
first ``sendto``); and datagrams that arrive after an exchange timed out are dropped before the
next command, as a real reader that is not receiving would never see them.

Every frame is logged at DEBUG on the ``farebox.protocol.nfcpy`` logger, as hex with timings.
nfcpy's own "no reader available" error, said at every failed open, is kept out of the log
unless nfcpy's debug output is on: the daemon reports an outage once as it starts and once as it
ends.
"""

from __future__ import annotations

import binascii
import ipaddress
import logging
import select
import time
from types import TracebackType

import nfc
import nfc.clf
import nfc.clf.udp

from farebox.protocol.errors import ProtocolError, TransportError, TransportTimeout
from farebox.protocol.frames import IDM_SIZE, PMM_SIZE, Polling, PollingResponse

LOG = logging.getLogger("farebox.protocol.nfcpy")


class _OnlyWhenTracing(logging.Filter):
    """nfcpy says "no reader available on path ..." at ERROR on every failed open: once a second
    while a USB reader is unplugged and the daemon retries. The outage is ours to report (once
    when it starts, once when it ends: the daemon's reader_down / reader_up events); nfcpy's line
    goes through only when nfcpy's own debug output is on (``-vv``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (not str(record.msg).startswith("no reader available")
                or logging.getLogger("nfc").isEnabledFor(logging.DEBUG))


logging.getLogger("nfc.clf").addFilter(_OnlyWhenTracing())

#: nfcpy's bitrate/technology string for FeliCa at 212 kbps.
BRTY_FELICA_212 = "212F"
_UDP_DATAGRAM_MAX = 1024  # what nfcpy's udp driver reads per datagram (udp.py _recv_data)


class NfcpyReader:
    """A FeliCa reader through nfcpy: ``wait_for_card``, ``exchange``, ``wait_for_removal``."""

    def __init__(
        self,
        path: str,
        *,
        poll_interval_s: float = 0.05,
        presence_interval_s: float = 0.05,
        presence_timeout_s: float = 0.01,
        presence_attempts: int = 3,
        frontend: nfc.ContactlessFrontend | None = None,
    ) -> None:
        """Open the nfcpy frontend on ``path`` (or adopt ``frontend``, already opened on it).

        Raises TransportError when no reader is found there or it cannot be opened (permissions,
        busy, a kernel module holding it).
        """
        if presence_attempts < 1:
            raise ValueError(f"presence_attempts must be >= 1, got {presence_attempts}")
        if not presence_timeout_s > 0:
            raise ValueError(f"presence_timeout_s must be > 0, got {presence_timeout_s}")
        self.name = path
        self.poll_interval_s = poll_interval_s
        self.presence_interval_s = presence_interval_s
        self.presence_timeout_s = presence_timeout_s
        self.presence_attempts = presence_attempts
        self._clf = frontend if frontend is not None else _open_frontend(path)
        self._card: PollingResponse | None = None
        self._system_code: int | None = None
        self._late_answers_possible = False
        _keep_udp_on_loopback(self._clf)

    def __repr__(self) -> str:
        card = self._card.idm.hex() if self._card else None
        return f"NfcpyReader({self.name!r}, card={card}, open={self._clf is not None})"

    def __enter__(self) -> NfcpyReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def frontend(self) -> nfc.ContactlessFrontend:
        """The open nfcpy frontend (for tools and benchmarks); TransportError once closed."""
        return self._open_clf()

    @property
    def card(self) -> PollingResponse | None:
        """The Polling response of the card found last, until it is seen to leave."""
        return self._card

    def wait_for_card(self, system_code: int, timeout_s: float) -> PollingResponse | None:
        clf = self._open_clf()
        self._card = self._system_code = None
        self._late_answers_possible = False
        sensf_req = bytearray(Polling(system_code).to_frame()[1:])  # nfcpy adds LEN itself
        target = nfc.clf.RemoteTarget(BRTY_FELICA_212, sensf_req=sensf_req)
        deadline = time.monotonic() + timeout_s
        while True:
            started = time.perf_counter()
            try:
                found = clf.sense(target, iterations=1)
            except _NFCPY_ERRORS as error:
                raise _transport_error(f"sense on {self.name}", error) from error
            elapsed_ms = (time.perf_counter() - started) * 1e3
            response = _polling_response(found)
            if response is not None:
                LOG.debug(
                    "sense %s -> %s (%.3f ms)",
                    sensf_req.hex(),
                    response.to_frame().hex(),
                    elapsed_ms,
                )
                self._card, self._system_code = response, system_code
                return response
            LOG.debug("sense %s -> no card (%.3f ms)", sensf_req.hex(), elapsed_ms)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.poll_interval_s, remaining))

    def exchange(self, frame: bytes, timeout_s: float) -> bytes:
        clf = self._open_clf()
        if self._card is None:
            raise TransportError("no card: wait_for_card() first")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if self._late_answers_possible:
            self._discard_late_answers(clf)
        debug = LOG.isEnabledFor(logging.DEBUG)
        if debug:
            LOG.debug(">>> %s timeout=%.4fs", bytes(frame).hex(), timeout_s)
        started = time.perf_counter()
        try:
            answer = clf.exchange(bytearray(frame), timeout_s)
        except _NFCPY_ERRORS as error:
            # An answer may still come; it must not pass for the answer to the next command.
            self._late_answers_possible = True
            transport_error = _transport_error("exchange", error)
            if debug:
                elapsed_ms = (time.perf_counter() - started) * 1e3
                LOG.debug("<<< %s (%.3f ms)", transport_error, elapsed_ms)
            raise transport_error from error
        if debug:
            elapsed_ms = (time.perf_counter() - started) * 1e3
            LOG.debug("<<< %s %.3f ms", None if answer is None else bytes(answer).hex(), elapsed_ms)
        if answer is None:
            raise TransportError("nfcpy returned no frame (no activated target)")
        return bytes(answer)

    def wait_for_removal(self, timeout_s: float) -> bool:
        if self._card is None:
            return True
        self._open_clf()
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._is_present():
                LOG.debug("card %s left the field", self._card.idm.hex())
                self._card = None
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(self.presence_interval_s, remaining))

    def close(self) -> None:
        """Close the frontend (over udp this sends RFOFF to the card side). Idempotent."""
        clf, self._clf = self._clf, None
        self._card = None
        if clf is not None:
            clf.close()

    def _is_present(self) -> bool:
        """nfcpy's Type 3 presence check: a Polling for the system code, answered by our IDm."""
        assert self._card is not None and self._system_code is not None
        poll = Polling(self._system_code).to_frame()
        for _ in range(self.presence_attempts):
            try:
                answer = self.exchange(poll, self.presence_timeout_s)
                return PollingResponse.from_frame(answer).idm == self._card.idm
            except ProtocolError:
                continue
            except TransportError as error:
                if not isinstance(error.__cause__, _LINK_ERRORS):
                    raise  # the reader failed (or was closed), not the card
                continue
        return False

    def _open_clf(self) -> nfc.ContactlessFrontend:
        if self._clf is None:
            raise TransportError(f"reader {self.name} is closed")
        return self._clf

    def _discard_late_answers(self, clf: nfc.ContactlessFrontend) -> None:
        """udp only: drop datagrams that arrived while nobody waited for them."""
        self._late_answers_possible = False
        device = clf.device
        sock = getattr(device, "socket", None) if isinstance(device, nfc.clf.udp.Device) else None
        if sock is None:
            return
        try:
            while select.select([sock], [], [], 0)[0]:
                data = sock.recv(_UDP_DATAGRAM_MAX)
                LOG.debug("dropped a late datagram: %r", data)
        except (OSError, ValueError):  # a closed socket: the exchange reports it
            return


def _open_frontend(path: str) -> nfc.ContactlessFrontend:
    clf = nfc.ContactlessFrontend()
    try:
        opened = clf.open(path)
    except Exception as error:  # nfcpy raises IOError, ValueError, even TypeError for bad paths
        raise TransportError(
            f"cannot open reader {path}: {type(error).__name__}: {error}"
        ) from error
    if not opened:
        raise TransportError(f"no reader found at {path}")
    LOG.debug("opened %s", clf)
    return clf


# What nfcpy raises: its own errors, OSError for a device that went away (ENODEV, EIO) or a
# closed socket, and binascii.Error for a udp datagram whose hex does not decode.
_NFCPY_ERRORS = (nfc.clf.Error, OSError, binascii.Error)
# The ones that say "no (usable) answer from the card" rather than "the reader failed".
_LINK_ERRORS = (nfc.clf.CommunicationError, binascii.Error)


def _transport_error(what: str, error: BaseException) -> TransportError:
    """Our exception for one of nfcpy's."""
    if isinstance(error, nfc.clf.TimeoutError):
        return TransportTimeout(f"{what}: no answer in time")
    if isinstance(error, nfc.clf.BrokenLinkError):
        return TransportTimeout(f"{what}: the card turned the link off ({error})")
    if isinstance(error, OSError):
        return TransportError(f"{what}: reader failed: {error}")
    return TransportError(f"{what}: {type(error).__name__}: {error}".rstrip(": "))


def _polling_response(found: nfc.clf.RemoteTarget | None) -> PollingResponse | None:
    """The PollingResponse in a sense result (``sensf_res`` is the frame without LEN), or None."""
    sensf_res = None if found is None else found.sensf_res
    if sensf_res is None or len(sensf_res) < 1 + IDM_SIZE + PMM_SIZE:
        return None
    try:
        return PollingResponse.from_frame(bytes([len(sensf_res) + 1]) + bytes(sensf_res))
    except ProtocolError as error:
        LOG.debug("ignored a malformed polling response %s: %s", bytes(sensf_res).hex(), error)
        return None


class _LoopbackUdpReaderDevice(nfc.clf.udp.Device):
    """nfcpy's udp driver, reader side, with each socket bound to the card's loopback address.

    nfcpy creates a fresh unbound socket per sense (``mute`` closes the old one) and lets the
    first ``sendto`` bind it to 0.0.0.0; here it is bound to the loopback address first.
    """

    def _create_socket(self) -> None:
        super()._create_socket()
        if self.socket.getsockname()[1] == 0:
            self.socket.bind((self.addr[0], 0))


def _keep_udp_on_loopback(clf: nfc.ContactlessFrontend) -> None:
    device = clf.device
    if type(device) is nfc.clf.udp.Device and ipaddress.ip_address(device.addr[0]).is_loopback:
        device.__class__ = _LoopbackUdpReaderDevice
        device._create_socket()  # binds the socket nfcpy's constructor made
