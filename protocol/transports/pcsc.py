"""A PC/SC reader through pyscard: finds FeliCa cards by ATR and carries raw FeliCa frames.

Spec ``pcsc`` takes the first reader pcscd lists, ``pcsc:NAME`` the first whose name contains NAME
(case-insensitive). A card counts when its ATR is a FeliCa ATR (:data:`FELICA_ATR_PATTERNS`); any
other card in the field is ignored.

Raw frames travel inside a pseudo-APDU; two kinds are supported (:class:`ExchangeMode`):

* ``DIRECT_TRANSMIT`` (ACR122U, a PN532 behind a PC/SC front): ``FF 00 00 00 Lc D4 42 <frame>``
  (InCommunicateThru), answer ``D5 43 <status> <frame> 90 00``, status 00 ok, 01 timeout. The
  PN532 applies its own RF timeout; ``timeout_s`` cannot be passed down and is only logged.
* ``TRANSPARENT`` (PC/SC 2.02 Part 3): start a transparent session ``FF C2 00 00 02 81 00``, switch
  the protocol to FeliCa ``FF C2 00 02 04 8F 02 03 00``, exchange with
  ``FF C2 00 01 Lc 5F 46 04 <timeout µs LE> 95 <len> <frame>``; the card's frame comes back in a
  ``97`` data object next to a ``C0`` generic error status (``XX SW1 SW2``, 64 01 = no answer from
  the card); the session ends with ``FF C2 00 00 02 82 00``.

The mode follows the reader: ACR122 in its name, or an ATR with ACS's FeliCa card names (their
PN532-based readers report them), means direct transmit; anything else gets the transparent
exchange. The constructor's ``mode`` overrides that.

``wait_for_card`` waits with ``SCardGetStatusChange`` in the calling thread (no monitor thread,
so nothing to hand over through a queue and the timeout is exact), connects, reads the IDm with
``FF CA 00 00 00`` and then sends a Polling command for the system code through the raw exchange.
That poll is the tap's Polling command: it yields the PMm the session needs, and the caller must
not poll again. Card removal is a state change seen by pcscd: with vpcd (a TCP connection per
card) pcscd checks presence every 0.4 s.

Failures map onto the FeliCa layer's errors: no answer in time is TransportTimeout; a card that
left, a reader that is gone and a pcscd that is gone are TransportError. Every APDU and frame is
logged at DEBUG, in hex, on the ``farebox.protocol.pcsc`` LOG.

A PcscReader is used from one thread.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from farebox.protocol.errors import TransportError, TransportTimeout
from farebox.protocol.frames import Polling, PollingResponse

LOG = logging.getLogger("farebox.protocol.pcsc")

SPEC_PREFIX = "pcsc"

GET_IDM_APDU = bytes.fromhex("FFCA000000")
START_TRANSPARENT_SESSION_APDU = bytes.fromhex("FFC20000028100")
SWITCH_PROTOCOL_FELICA_APDU = bytes.fromhex("FFC20002048F020300")
END_TRANSPARENT_SESSION_APDU = bytes.fromhex("FFC20000028200")

SW_SUCCESS = b"\x90\x00"

# Direct transmit (ACR122U): pseudo-APDU header, PN532 InCommunicateThru and its answer.
DIRECT_TRANSMIT_HEADER = bytes.fromhex("FF000000")
PN532_IN_COMMUNICATE_THRU = bytes.fromhex("D442")
PN532_IN_COMMUNICATE_THRU_ANSWER = bytes.fromhex("D543")
PN532_STATUS_OK = 0x00
PN532_STATUS_TIMEOUT = 0x01
_PN532_ERROR_MASK = 0x3F  # bit 6 = NAD present, bit 7 = more information; the rest is the error

# Transparent exchange (PC/SC 2.02 Part 3) data objects.
TRANSPARENT_EXCHANGE_HEADER = bytes.fromhex("FFC20001")
TAG_TIMER = 0x5F46
TAG_TRANSCEIVE = 0x95
TAG_RESPONSE_DATA = 0x97
TAG_GENERIC_ERROR_STATUS = 0xC0
STATUS_NO_ERROR = b"\x90\x00"
STATUS_NO_ANSWER_FROM_CARD = b"\x64\x01"  # "execution error, no response from ICC": the timeout

_MAX_SHORT_LC = 0xFF
_MAX_TIMER_US = 0xFFFFFFFF


class ExchangeMode(enum.Enum):
    """How a raw FeliCa frame reaches the card."""

    DIRECT_TRANSMIT = "acr122u"
    TRANSPARENT = "part3"


@dataclass(frozen=True)
class AtrPattern:
    """An ATR with wildcards, written as hex byte pairs where ``..`` matches any byte."""

    description: str
    pattern: str

    def matches(self, atr: bytes) -> bool:
        expected = self.pattern.split()
        return len(atr) == len(expected) and all(
            want == ".." or int(want, 16) == have for want, have in zip(expected, atr)
        )


# PC/SC Part 3 contactless ATR: 3B 8F 80 01 80 4F 0C <RID A0 00 00 03 06> <SS> <NN NN> 00 00 00 00
# <TCK>, SS the standard (11 = FeliCa), NN NN the card name (00 3B = FeliCa). ACS readers report
# SS = 03 with their own card names F0 11 (FeliCa 212 kbps) and F0 12 (424 kbps).
_PART3 = "3B 8F 80 01 80 4F 0C A0 00 00 03 06"  # up to and including the RID
FELICA_ATR_PATTERNS: tuple[AtrPattern, ...] = (
    AtrPattern("PC/SC Part 3, standard FeliCa", f"{_PART3} 11 .. .. 00 00 00 00 .."),
    AtrPattern("PC/SC Part 3, card name FeliCa", f"{_PART3} .. 00 3B 00 00 00 00 .."),
    AtrPattern("ACS, FeliCa 212 kbps", f"{_PART3} .. F0 11 00 00 00 00 .."),
    AtrPattern("ACS, FeliCa 424 kbps", f"{_PART3} .. F0 12 00 00 00 00 .."),
)
_ACS_FELICA_PATTERNS = FELICA_ATR_PATTERNS[2:]
_DIRECT_TRANSMIT_READER_NAMES = ("ACR122",)


def is_felica_atr(atr: bytes) -> bool:
    """True when ``atr`` matches one of :data:`FELICA_ATR_PATTERNS`."""
    return any(pattern.matches(bytes(atr)) for pattern in FELICA_ATR_PATTERNS)


def choose_mode(reader_name: str, atr: bytes) -> ExchangeMode:
    """The exchange mode a reader probably speaks, from its name and the card's ATR."""
    if any(name in reader_name.upper() for name in _DIRECT_TRANSMIT_READER_NAMES):
        return ExchangeMode.DIRECT_TRANSMIT
    if any(pattern.matches(bytes(atr)) for pattern in _ACS_FELICA_PATTERNS):
        return ExchangeMode.DIRECT_TRANSMIT
    return ExchangeMode.TRANSPARENT


def parse_spec(spec: str) -> str | None:
    """The reader name fragment of ``pcsc:NAME``, or None for ``pcsc``; ValueError otherwise."""
    if spec == SPEC_PREFIX:
        return None
    prefix, colon, name = spec.partition(":")
    if prefix != SPEC_PREFIX or not colon or not name:
        raise ValueError(f"a PC/SC reader spec is 'pcsc' or 'pcsc:NAME', got {spec!r}")
    return name


# --- BER-TLV, as Part 3 data objects use it -------------------------------------------------


def encode_tlv(tag: int, value: bytes) -> bytes:
    """One data object: a 1- or 2-byte tag, a BER length (short, 81 xx or 82 xx xx), the value."""
    tag_bytes = tag.to_bytes(2 if tag > 0xFF else 1, "big")
    size = len(value)
    if size < 0x80:
        length = bytes([size])
    elif size <= 0xFF:
        length = bytes([0x81, size])
    elif size <= 0xFFFF:
        length = b"\x82" + size.to_bytes(2, "big")
    else:
        raise ValueError(f"data object of {size} bytes is too long")
    return tag_bytes + length + bytes(value)


def parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """The data objects in ``data``, in order; TransportError for truncated or bad encodings."""
    data = bytes(data)
    objects: list[tuple[int, bytes]] = []
    position = 0
    while position < len(data):
        tag = data[position]
        position += 1
        if tag & 0x1F == 0x1F:  # multi-byte tag: more bytes while bit 8 is set
            while True:
                if position >= len(data):
                    raise TransportError(f"truncated data object tag in {data.hex(' ')}")
                tag = tag << 8 | data[position]
                position += 1
                if not data[position - 1] & 0x80:
                    break
        if position >= len(data):
            raise TransportError(f"data object {tag:X} without a length in {data.hex(' ')}")
        size = data[position]
        position += 1
        if size & 0x80:
            count = size & 0x7F
            if not 1 <= count <= 2 or position + count > len(data):
                raise TransportError(f"bad length of data object {tag:X} in {data.hex(' ')}")
            size = int.from_bytes(data[position : position + count], "big")
            position += count
        if position + size > len(data):
            raise TransportError(f"data object {tag:X} truncated in {data.hex(' ')}")
        objects.append((tag, data[position : position + size]))
        position += size
    return objects


# --- Pseudo-APDUs: build and parse -----------------------------------------------------------


def _short_apdu(header: bytes, data: bytes) -> bytes:
    if len(data) > _MAX_SHORT_LC:
        raise ValueError(f"APDU data of {len(data)} bytes does not fit a short APDU")
    return header + bytes([len(data)]) + data


def direct_transmit_apdu(frame: bytes) -> bytes:
    """``FF 00 00 00 Lc D4 42 <frame>``."""
    return _short_apdu(DIRECT_TRANSMIT_HEADER, PN532_IN_COMMUNICATE_THRU + bytes(frame))


def parse_direct_transmit_response(response: bytes) -> bytes:
    """The card's frame from ``D5 43 <status> <frame> 90 00``; status 01 is TransportTimeout."""
    response = bytes(response)
    body, status_word = response[:-2], response[-2:]
    if len(response) < 2 or status_word != SW_SUCCESS:
        raise TransportError(f"direct transmit failed: {response.hex(' ') or 'no answer'}")
    if len(body) < 3 or body[:2] != PN532_IN_COMMUNICATE_THRU_ANSWER:
        raise TransportError(f"unexpected direct transmit answer {response.hex(' ')}")
    error = body[2] & _PN532_ERROR_MASK
    if error == PN532_STATUS_TIMEOUT:
        raise TransportTimeout("no answer from the card (reader timeout)")
    if error != PN532_STATUS_OK:
        raise TransportError(f"reader error status 0x{error:02X} from InCommunicateThru")
    if len(body) == 3:
        raise TransportTimeout("reader reported success but carried no frame")
    return body[3:]


def transparent_exchange_apdu(frame: bytes, timeout_s: float) -> bytes:
    """``FF C2 00 01 Lc 5F 46 04 <timeout µs, LE> 95 <len> <frame>``."""
    timeout_us = min(max(round(timeout_s * 1e6), 0), _MAX_TIMER_US)
    data = encode_tlv(TAG_TIMER, timeout_us.to_bytes(4, "little"))
    data += encode_tlv(TAG_TRANSCEIVE, bytes(frame))
    return _short_apdu(TRANSPARENT_EXCHANGE_HEADER, data)


def _transparent_objects(response: bytes, what: str) -> list[tuple[int, bytes]]:
    """Data objects of a Part 3 answer after checking SW and every C0 generic error status."""
    response = bytes(response)
    if len(response) < 2:
        raise TransportError(f"{what}: answer too short: {response.hex(' ') or 'nothing'}")
    objects = parse_tlvs(response[:-2])
    for tag, value in objects:
        if tag != TAG_GENERIC_ERROR_STATUS:
            continue
        if len(value) != 3:
            raise TransportError(f"{what}: bad error status object {value.hex(' ')}")
        if value[1:] == STATUS_NO_ANSWER_FROM_CARD:
            raise TransportTimeout(f"{what}: no answer from the card (reader timeout)")
        if value[1:] != STATUS_NO_ERROR:
            raise TransportError(
                f"{what}: reader error status {value[1:].hex(' ')} (data object {value[0]})"
            )
    if response[-2:] != SW_SUCCESS:
        raise TransportError(f"{what}: status word {response[-2:].hex(' ')}")
    return objects


def check_transparent_response(response: bytes, what: str) -> None:
    """Check the answer to a session or protocol command; TransportError when it failed."""
    _transparent_objects(response, what)


def parse_transparent_response(response: bytes) -> bytes:
    """The card's frame from a transparent exchange answer (the ``97`` data object)."""
    objects = _transparent_objects(response, "transparent exchange")
    frames = [value for tag, value in objects if tag == TAG_RESPONSE_DATA]
    if not frames or not frames[0]:
        raise TransportTimeout("transparent exchange: no response data from the card")
    return frames[0]


def parse_get_idm_response(response: bytes) -> bytes:
    """The IDm from the answer to ``FF CA 00 00 00``."""
    response = bytes(response)
    if len(response) != 10 or response[-2:] != SW_SUCCESS:
        raise TransportError(f"GET DATA (IDm) failed: {response.hex(' ') or 'no answer'}")
    return response[:-2]


# --- The reader ------------------------------------------------------------------------------


class _CardGone(TransportError):
    """The card left (or pcscd reports it as removed, reset or mute)."""


def _hex(data: bytes) -> str:
    return bytes(data).hex(" ")


class PcscReader:
    """A :class:`~farebox.protocol.reader.Reader` on a PC/SC reader through pyscard."""

    def __init__(
        self,
        spec: str = SPEC_PREFIX,
        mode: ExchangeMode | str | None = None,
        *,
        poll_timeout_s: float = 0.02,
        poll_retry_s: float = 0.05,
    ) -> None:
        self.reader_filter = parse_spec(spec)
        self.forced_mode = ExchangeMode(mode) if mode is not None else None
        self.poll_timeout_s = poll_timeout_s
        self.poll_retry_s = poll_retry_s
        try:
            from smartcard import scard
        except ImportError:
            raise TransportError(
                "pyscard is not installed: pip install 'farebox[pcsc]'"
            ) from None
        self._scard: Any = scard
        self._card_gone_codes = frozenset(
            getattr(scard, name)
            for name in (
                "SCARD_W_REMOVED_CARD",
                "SCARD_E_NO_SMARTCARD",
                "SCARD_W_RESET_CARD",
                "SCARD_W_UNPOWERED_CARD",
                "SCARD_W_UNRESPONSIVE_CARD",
                "SCARD_E_NOT_TRANSACTED",
                "SCARD_E_INVALID_HANDLE",
            )
        )
        self._service_gone_codes = frozenset(
            (scard.SCARD_E_NO_SERVICE, scard.SCARD_E_SERVICE_STOPPED, scard.SCARD_F_COMM_ERROR)
        )
        self._reader_gone_codes = frozenset(
            (scard.SCARD_E_READER_UNAVAILABLE, scard.SCARD_E_UNKNOWN_READER)
        )
        #: The PC/SC reader name once resolved; the spec until then.
        self.name = spec
        self.mode: ExchangeMode | None = None
        self.atr: bytes | None = None
        self.idm: bytes | None = None
        self._polling: PollingResponse | None = None
        self._context: Any = None
        self._reader: str | None = None
        self._card: Any = None
        self._protocol = 0
        self._session_open = False
        self._card_events = -1  # pcscd's event counter for the reader when the card was found

    def __repr__(self) -> str:
        idm = self.idm.hex() if self.idm else None
        mode = self.mode.value if self.mode else None
        return f"PcscReader(name={self.name!r}, mode={mode}, idm={idm})"

    def __enter__(self) -> PcscReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def card(self) -> PollingResponse | None:
        """The Polling response of the card found last, until it is seen to leave."""
        return self._polling

    # -- Reader protocol --

    def wait_for_card(self, system_code: int, timeout_s: float) -> PollingResponse | None:
        """Wait for a FeliCa card, connect, read its IDm (GET DATA) and poll ``system_code``.

        The Polling command sent here is the tap's poll (the session adopts its answer with
        ``LiteSSession.activate``): a card that does not answer it is polled again every
        ``poll_retry_s`` while it stays, until ``timeout_s``. Any card found before is let go
        first (its transparent session ended, the handle disconnected).
        """
        deadline = time.monotonic() + timeout_s
        self._drop_card()
        reader = self._resolve_reader()
        known_state = self._scard.SCARD_STATE_UNAWARE
        ignored_atr = b""
        while True:
            if known_state == self._scard.SCARD_STATE_UNAWARE:
                wait_ms = 0  # learn the current state first
            else:
                wait_ms = max(0, round((deadline - time.monotonic()) * 1000))
            event_state, atr = self._status_change(reader, known_state, wait_ms)
            if event_state is None:
                return None
            known_state = event_state & ~self._scard.SCARD_STATE_CHANGED
            present = event_state & self._scard.SCARD_STATE_PRESENT
            mute = event_state & self._scard.SCARD_STATE_MUTE
            if present and not mute:
                if is_felica_atr(atr):
                    events = event_state >> 16
                    response = self._take_card(reader, atr, events, system_code, deadline)
                    if response is not None:
                        return response
                    # It left while starting, or pcscd's state was stale (vpcd: a card that
                    # left and came back between two presence checks): look again shortly
                    # instead of waiting for a state change that may never come.
                    known_state = self._scard.SCARD_STATE_UNAWARE
                    if time.monotonic() + self.poll_retry_s < deadline:
                        time.sleep(self.poll_retry_s)
                elif atr != ignored_atr:
                    LOG.info("ignoring a card that is not FeliCa, ATR %s", _hex(atr))
                    ignored_atr = atr
            if time.monotonic() >= deadline:
                return None

    def exchange(self, frame: bytes, timeout_s: float) -> bytes:
        """One raw frame to the card and its answer, in the mode chosen for the card.

        ``timeout_s`` goes to the reader in the transparent exchange's timer object; the
        ACR122U's direct transmit has no such field (the PN532's own RF timeout applies).
        """
        if self._card is None or self.mode is None:
            raise TransportError("no card: wait_for_card first")
        debug = LOG.isEnabledFor(logging.DEBUG)
        if debug:
            LOG.debug("frame > %s (timeout %.3f s)", _hex(frame), timeout_s)
        if self.mode is ExchangeMode.DIRECT_TRANSMIT:
            answer = parse_direct_transmit_response(self._transmit(direct_transmit_apdu(frame)))
        else:
            apdu = transparent_exchange_apdu(frame, timeout_s)
            answer = parse_transparent_response(self._transmit(apdu))
        if debug:
            LOG.debug("frame < %s", _hex(answer))
        return answer

    def wait_for_removal(self, timeout_s: float) -> bool:
        """True once pcscd reports the reader empty, or another card (its event count moved)."""
        if self._reader is None or self._card_events < 0:
            return True
        deadline = time.monotonic() + timeout_s
        known_state = self._scard.SCARD_STATE_UNAWARE
        while True:
            if known_state == self._scard.SCARD_STATE_UNAWARE:
                wait_ms = 0
            else:
                wait_ms = max(0, round((deadline - time.monotonic()) * 1000))
            event_state, _ = self._status_change(self._reader, known_state, wait_ms)
            if event_state is None:
                return False
            known_state = event_state & ~self._scard.SCARD_STATE_CHANGED
            if not event_state & self._scard.SCARD_STATE_PRESENT or (
                event_state >> 16 != self._card_events
            ):
                LOG.debug("card left %s", self._reader)
                self._session_open = False  # nothing to end: the card is gone
                self._drop_card()
                return True
            if time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        """Let the card go and release the PC/SC context; idempotent (a later call reopens)."""
        self._drop_card()
        self._release_context()

    # -- internals --

    def _fail(self, hresult: int, what: str) -> TransportError:
        """The TransportError for a failed PC/SC call; forgets the context if pcscd is gone."""
        reason = self._scard.SCardGetErrorMessage(hresult)
        message = f"{what}: {reason} (0x{hresult & 0xFFFFFFFF:08X})"
        if hresult in self._service_gone_codes:
            self._forget_context()
            return TransportError(f"{message}; is pcscd running?")
        if hresult in self._reader_gone_codes:
            return TransportError(f"{message}; reader {self._reader!r} is gone")
        if hresult in self._card_gone_codes:
            return _CardGone(f"{message}; the card left")
        return TransportError(message)

    def _forget_context(self) -> None:
        """pcscd is gone, and every handle with it; the next call establishes a new context.

        The card's event count stays, so that ``wait_for_removal`` asks the next pcscd (or
        raises TransportError while there is none) instead of reporting a removal.
        """
        card_events = self._card_events
        self._forget_card()
        self._card_events = card_events
        self._release_context()

    def _release_context(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            try:
                self._scard.SCardReleaseContext(context)
            except Exception:  # noqa: BLE001 - pyscard on a dead pcscd; the context is gone anyway
                pass

    def _forget_card(self) -> None:
        self._card = None
        self._session_open = False
        self._card_events = -1
        self._polling = None
        self.mode = None

    def _ensure_context(self) -> Any:
        if self._context is not None:
            if self._scard.SCardIsValidContext(self._context) == self._scard.SCARD_S_SUCCESS:
                return self._context
            self._forget_context()
        hresult, context = self._scard.SCardEstablishContext(self._scard.SCARD_SCOPE_USER)
        if hresult != self._scard.SCARD_S_SUCCESS:
            raise TransportError(
                f"cannot reach pcscd: {self._scard.SCardGetErrorMessage(hresult)}; "
                "is pcscd running?"
            )
        self._context = context
        return context

    def _resolve_reader(self) -> str:
        context = self._ensure_context()
        try:
            hresult, readers = self._scard.SCardListReaders(context, [])
        except SystemError:  # pyscard raises this when pcscd vanished under the context
            self._forget_context()
            raise TransportError("cannot list readers: pcscd is gone") from None
        if hresult == self._scard.SCARD_E_NO_READERS_AVAILABLE:
            readers = []
        elif hresult != self._scard.SCARD_S_SUCCESS:
            raise self._fail(hresult, "cannot list readers")
        wanted = self.reader_filter
        matching = [
            name for name in readers if wanted is None or wanted.casefold() in name.casefold()
        ]
        if not matching:
            what = "no PC/SC reader" if wanted is None else f"no PC/SC reader matching {wanted!r}"
            raise TransportError(f"{what} (pcscd lists {readers or 'none'})")
        if matching[0] != self._reader:
            LOG.info("using PC/SC reader %r", matching[0])
        self._reader = self.name = matching[0]
        return matching[0]

    def _status_change(
        self, reader: str, known_state: int, wait_ms: int
    ) -> tuple[int | None, bytes]:
        """``(event_state, atr)`` for ``reader``, or ``(None, b"")`` when ``wait_ms`` passed."""
        context = self._ensure_context()
        try:
            hresult, states = self._scard.SCardGetStatusChange(
                context, wait_ms, [(reader, known_state)]
            )
        except SystemError:
            self._forget_context()
            raise TransportError("waiting for a card: pcscd is gone") from None
        if hresult == self._scard.SCARD_E_TIMEOUT:
            return None, b""
        if hresult != self._scard.SCARD_S_SUCCESS:
            raise self._fail(hresult, f"waiting for a card on {reader!r}")
        _, event_state, atr = states[0]
        if event_state & (self._scard.SCARD_STATE_UNKNOWN | self._scard.SCARD_STATE_UNAVAILABLE):
            raise TransportError(f"reader {reader!r} is gone")
        return event_state, bytes(atr)

    def _take_card(
        self, reader: str, atr: bytes, events: int, system_code: int, deadline: float
    ) -> PollingResponse | None:
        """Connect to the FeliCa card just seen and poll it; None if it leaves or stays silent."""
        scard = self._scard
        hresult, card, protocol = scard.SCardConnect(
            self._context, reader, scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        if hresult != scard.SCARD_S_SUCCESS:
            error = self._fail(hresult, f"cannot connect to the card in {reader!r}")
            if isinstance(error, _CardGone):
                LOG.debug("card left before connecting: %s", error)
                return None
            raise error
        self._card, self._protocol = card, protocol
        self.atr, self._card_events = atr, events
        self.mode = self.forced_mode or choose_mode(reader, atr)
        LOG.debug("card in %s, ATR %s, mode %s", reader, _hex(atr), self.mode.value)
        try:
            self.idm = parse_get_idm_response(self._transmit(GET_IDM_APDU))
            if self.mode is ExchangeMode.TRANSPARENT:
                check_transparent_response(
                    self._transmit(START_TRANSPARENT_SESSION_APDU), "start transparent session"
                )
                self._session_open = True
                check_transparent_response(
                    self._transmit(SWITCH_PROTOCOL_FELICA_APDU), "switch protocol to FeliCa"
                )
            poll = Polling(system_code).to_frame()
            while True:
                try:
                    answer = self.exchange(poll, self.poll_timeout_s)
                    break
                except _CardGone:
                    raise
                except TransportTimeout:
                    if time.monotonic() + self.poll_retry_s >= deadline:
                        LOG.debug(
                            "card %s does not answer system code %04X", self.idm.hex(), system_code
                        )
                        self._drop_card()
                        return None
                    time.sleep(self.poll_retry_s)
        except _CardGone as error:
            LOG.debug("card left while starting: %s", error)
            self._drop_card()
            return None
        except BaseException:
            self._drop_card()
            raise
        response = PollingResponse.from_frame(answer)
        if response.idm != self.idm:
            LOG.warning(
                "Polling answered with IDm %s, GET DATA gave %s", response.idm.hex(), self.idm.hex()
            )
        LOG.info("card %s (PMm %s) in %s", response.idm.hex(), response.pmm.hex(), reader)
        self._polling = response
        return response

    def _transmit(self, apdu: bytes) -> bytes:
        debug = LOG.isEnabledFor(logging.DEBUG)
        if debug:
            LOG.debug("apdu > %s", _hex(apdu))
        pci = self._scard.SCARD_PCI_T1 if self._protocol == self._scard.SCARD_PROTOCOL_T1 else (
            self._scard.SCARD_PCI_T0
        )
        try:
            hresult, response = self._scard.SCardTransmit(self._card, pci, list(apdu))
        except SystemError:
            self._forget_context()
            raise TransportError("transmit: pcscd is gone") from None
        if hresult != self._scard.SCARD_S_SUCCESS:
            raise self._fail(hresult, "transmit")
        response = bytes(response)
        if debug:
            LOG.debug("apdu < %s", _hex(response))
        return response

    def _drop_card(self) -> None:
        """End the transparent session if one is open and disconnect, ignoring failures."""
        if self._card is None:
            self._forget_card()
            return
        if self._session_open:
            self._session_open = False
            try:
                self._transmit(END_TRANSPARENT_SESSION_APDU)
            except TransportError as error:
                LOG.debug("ending the transparent session: %s", error)
        card = self._card
        self._forget_card()
        if card is not None:  # None when pcscd vanished while ending the session
            try:
                self._scard.SCardDisconnect(card, self._scard.SCARD_LEAVE_CARD)
            except (SystemError, TypeError):
                pass
