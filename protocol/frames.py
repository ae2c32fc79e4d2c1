"""FeliCa commands and responses as data: frozen dataclasses that build and parse frames.

A frame is ``LEN | code | ...`` where LEN counts itself; a response's code is its command's
code + 1 (docs/readers.md, "FeliCa frames"). Constructors raise ValueError for values that
cannot be encoded; ``from_frame`` raises ProtocolError for anything malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from farebox.protocol.errors import ProtocolError

SYSTEM_CODE_LITE_S = 0x88B4
SERVICE_LITE_S_RW = 0x0009
SERVICE_LITE_S_RO = 0x000B
MAX_READ_BLOCKS_LITE_S = 4  # per Read Without Encryption; a Lite-S writes 1 block per command

IDM_SIZE = 8
PMM_SIZE = 8
BLOCK_SIZE = 16
MAX_FRAME_SIZE = 0xFF

REQUEST_CODE_NONE = 0x00
REQUEST_CODE_SYSTEM_CODE = 0x01

# Status flag 1: 00 success, FF an error not tied to one block list element; otherwise
# the bit of the failing element (01 = first, 02 = second, ... as nfcpy's FeliCa Lite
# error table shows).
SF1_SUCCESS = 0x00
SF1_NOT_BLOCK_SPECIFIC = 0xFF
# Status flag 2 error codes (FeliCa card user's manual; the subset a Lite-S reports).
SF2_SUCCESS = 0x00
SF2_ILLEGAL_NUMBER_OF_SERVICE = 0xA1
SF2_ILLEGAL_NUMBER_OF_BLOCK = 0xA2
SF2_ILLEGAL_BLOCK_LIST_SERVICE_ORDER = 0xA3
SF2_ILLEGAL_SERVICE_CODE = 0xA6  # unknown service, or a read-only service written to
SF2_ILLEGAL_BLOCK_LIST_ACCESS_MODE = 0xA7
SF2_ILLEGAL_BLOCK_NUMBER = 0xA8


def sf1_for_element(index: int) -> int:
    """Status flag 1 naming the block list element at ``index`` (0-based, at most 7)."""
    _check_int("index", index, 7)
    return 1 << index


def _check_int(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in 0..0x{maximum:X}, got {value!r}")


def _freeze_bytes(obj: object, name: str, size: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {value!r}")
    object.__setattr__(obj, name, bytes(value))


def _freeze_blocks(obj: object) -> None:
    blocks = tuple(getattr(obj, "block_data"))
    for block in blocks:
        if not isinstance(block, (bytes, bytearray)) or len(block) != BLOCK_SIZE:
            raise ValueError(f"each block must be {BLOCK_SIZE} bytes, got {block!r}")
    object.__setattr__(obj, "block_data", tuple(bytes(block) for block in blocks))


def _build(code: int, body: bytes) -> bytes:
    length = 2 + len(body)
    if length > MAX_FRAME_SIZE:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME_SIZE}")
    return bytes([length, code]) + body


class _Reader:
    """Walks a frame body; running short is a ProtocolError, and so is anything left over."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def take(self, size: int, what: str) -> bytes:
        end = self._position + size
        if end > len(self._data):
            raise ProtocolError(f"frame truncated in {what}")
        chunk = self._data[self._position:end]
        self._position = end
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def at_end(self) -> bool:
        return self._position == len(self._data)

    def finish(self) -> None:
        if not self.at_end():
            leftover = len(self._data) - self._position
            raise ProtocolError(f"{leftover} trailing bytes after the frame")


def _open(frame: bytes, code: int) -> _Reader:
    """Check LEN and the code; return a reader over the rest."""
    frame = bytes(frame)
    if len(frame) < 2:
        raise ProtocolError(f"frame of {len(frame)} bytes is too short")
    if frame[0] != len(frame):
        raise ProtocolError(f"length byte says {frame[0]} but the frame has {len(frame)} bytes")
    if frame[1] != code:
        raise ProtocolError(f"expected code 0x{code:02X}, got 0x{frame[1]:02X}")
    return _Reader(frame[2:])


@dataclass(frozen=True)
class BlockListElement:
    """One block list entry: a block number reached through ``service_codes[service_index]``."""

    block_number: int
    service_index: int = 0
    access_mode: int = 0

    def __post_init__(self) -> None:
        _check_int("block_number", self.block_number, 0xFFFF)
        _check_int("service_index", self.service_index, 0x0F)
        _check_int("access_mode", self.access_mode, 0x07)

    def to_bytes(self) -> bytes:
        """2-byte form for blocks below 256, else the 3-byte form (block number little-endian)."""
        head = self.access_mode << 4 | self.service_index
        if self.block_number < 0x100:
            return bytes([0x80 | head, self.block_number])
        return bytes([head]) + self.block_number.to_bytes(2, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockListElement:
        """Parse exactly one element in either form."""
        reader = _Reader(bytes(data))
        element = cls._read(reader)
        reader.finish()
        return element

    @classmethod
    def _read(cls, reader: _Reader) -> BlockListElement:
        head = reader.byte("block list element")
        if head & 0x80:
            block_number = reader.byte("block list element")
        else:
            block_number = int.from_bytes(reader.take(2, "block list element"), "little")
        return cls(block_number, head & 0x0F, head >> 4 & 0x07)


def _freeze_targets(command: ReadWithoutEncryption | WriteWithoutEncryption) -> None:
    _freeze_bytes(command, "idm", IDM_SIZE)
    service_codes = tuple(command.service_codes)
    for service_code in service_codes:
        _check_int("service code", service_code, 0xFFFF)
    block_list = tuple(command.block_list)
    for element in block_list:
        if not isinstance(element, BlockListElement):
            raise ValueError(f"block list entries must be BlockListElement, got {element!r}")
    object.__setattr__(command, "service_codes", service_codes)
    object.__setattr__(command, "block_list", block_list)


def _encode_targets(command: ReadWithoutEncryption | WriteWithoutEncryption) -> bytes:
    """IDm, service code list (little-endian) and block list, each list with its count."""
    if len(command.service_codes) > 0xFF or len(command.block_list) > 0xFF:
        raise ValueError("more than 255 service codes or blocks")
    return b"".join(
        [
            command.idm,
            bytes([len(command.service_codes)]),
            *(code.to_bytes(2, "little") for code in command.service_codes),
            bytes([len(command.block_list)]),
            *(element.to_bytes() for element in command.block_list),
        ]
    )


def _read_targets(reader: _Reader) -> tuple[bytes, tuple[int, ...], tuple[BlockListElement, ...]]:
    idm = reader.take(IDM_SIZE, "IDm")
    service_count = reader.byte("number of services")
    service_codes = tuple(
        int.from_bytes(reader.take(2, "service code list"), "little") for _ in range(service_count)
    )
    block_count = reader.byte("number of blocks")
    block_list = tuple(BlockListElement._read(reader) for _ in range(block_count))
    return idm, service_codes, block_list


@dataclass(frozen=True)
class Polling:
    """Polling: ``06 00 SC_hi SC_lo RC TSN``."""

    CODE: ClassVar[int] = 0x00

    system_code: int
    request_code: int = REQUEST_CODE_NONE
    time_slots: int = 0

    def __post_init__(self) -> None:
        _check_int("system_code", self.system_code, 0xFFFF)
        _check_int("request_code", self.request_code, 0xFF)
        _check_int("time_slots", self.time_slots, 0xFF)

    def to_frame(self) -> bytes:
        return _build(
            self.CODE,
            self.system_code.to_bytes(2, "big") + bytes([self.request_code, self.time_slots]),
        )

    @classmethod
    def from_frame(cls, frame: bytes) -> Polling:
        reader = _open(frame, cls.CODE)
        system_code = int.from_bytes(reader.take(2, "system code"), "big")
        request_code = reader.byte("request code")
        time_slots = reader.byte("time slots")
        reader.finish()
        return cls(system_code, request_code, time_slots)


@dataclass(frozen=True)
class PollingResponse:
    """Polling response: ``12 01 IDm PMm``, or ``14 01 IDm PMm RD`` with 2 bytes of request data."""

    CODE: ClassVar[int] = 0x01

    idm: bytes
    pmm: bytes
    request_data: bytes = b""

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        _freeze_bytes(self, "pmm", PMM_SIZE)
        _freeze_bytes(self, "request_data", 2 if self.request_data else 0)

    def to_frame(self) -> bytes:
        return _build(self.CODE, self.idm + self.pmm + self.request_data)

    @classmethod
    def from_frame(cls, frame: bytes) -> PollingResponse:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        pmm = reader.take(PMM_SIZE, "PMm")
        request_data = b"" if reader.at_end() else reader.take(2, "request data")
        reader.finish()
        return cls(idm, pmm, request_data)


@dataclass(frozen=True)
class ReadWithoutEncryption:
    """Read Without Encryption: ``LEN 06 IDm m SC(2m, LE) n block_list``."""

    CODE: ClassVar[int] = 0x06

    idm: bytes
    service_codes: tuple[int, ...]
    block_list: tuple[BlockListElement, ...]

    def __post_init__(self) -> None:
        _freeze_targets(self)
        self.to_frame()  # refuses a frame longer than 255 bytes

    def to_frame(self) -> bytes:
        return _build(self.CODE, _encode_targets(self))

    @classmethod
    def from_frame(cls, frame: bytes) -> ReadWithoutEncryption:
        reader = _open(frame, cls.CODE)
        idm, service_codes, block_list = _read_targets(reader)
        reader.finish()
        return cls(idm, service_codes, block_list)


@dataclass(frozen=True)
class ReadWithoutEncryptionResponse:
    """``LEN 07 IDm SF1 SF2``, followed by ``n data(16n)`` when status flag 1 is 00."""

    CODE: ClassVar[int] = 0x07

    idm: bytes
    status_flag1: int
    status_flag2: int
    block_data: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        _check_int("status_flag1", self.status_flag1, 0xFF)
        _check_int("status_flag2", self.status_flag2, 0xFF)
        _freeze_blocks(self)
        if self.status_flag1 != SF1_SUCCESS and self.block_data:
            raise ValueError("block data is only sent with status flag 1 = 00")
        self.to_frame()  # refuses a frame longer than 255 bytes

    def to_frame(self) -> bytes:
        body = self.idm + bytes([self.status_flag1, self.status_flag2])
        if self.status_flag1 == SF1_SUCCESS:
            body += bytes([len(self.block_data)]) + b"".join(self.block_data)
        return _build(self.CODE, body)

    @classmethod
    def from_frame(cls, frame: bytes) -> ReadWithoutEncryptionResponse:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        status_flag1 = reader.byte("status flag 1")
        status_flag2 = reader.byte("status flag 2")
        block_data: tuple[bytes, ...] = ()
        if status_flag1 == SF1_SUCCESS:
            block_count = reader.byte("number of blocks")
            block_data = tuple(reader.take(BLOCK_SIZE, "block data") for _ in range(block_count))
        reader.finish()
        return cls(idm, status_flag1, status_flag2, block_data)


@dataclass(frozen=True)
class WriteWithoutEncryption:
    """Write Without Encryption: ``LEN 08 IDm m SC(2m, LE) n block_list data(16n)``."""

    CODE: ClassVar[int] = 0x08

    idm: bytes
    service_codes: tuple[int, ...]
    block_list: tuple[BlockListElement, ...]
    block_data: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _freeze_targets(self)
        _freeze_blocks(self)
        if len(self.block_data) != len(self.block_list):
            raise ValueError(
                f"{len(self.block_list)} block list elements "
                f"but {len(self.block_data)} blocks of data"
            )
        self.to_frame()  # refuses a frame longer than 255 bytes

    def to_frame(self) -> bytes:
        return _build(self.CODE, _encode_targets(self) + b"".join(self.block_data))

    @classmethod
    def from_frame(cls, frame: bytes) -> WriteWithoutEncryption:
        reader = _open(frame, cls.CODE)
        idm, service_codes, block_list = _read_targets(reader)
        block_data = tuple(reader.take(BLOCK_SIZE, "block data") for _ in block_list)
        reader.finish()
        return cls(idm, service_codes, block_list, block_data)


@dataclass(frozen=True)
class WriteWithoutEncryptionResponse:
    """``0C 09 IDm SF1 SF2``."""

    CODE: ClassVar[int] = 0x09

    idm: bytes
    status_flag1: int
    status_flag2: int

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        _check_int("status_flag1", self.status_flag1, 0xFF)
        _check_int("status_flag2", self.status_flag2, 0xFF)

    def to_frame(self) -> bytes:
        return _build(self.CODE, self.idm + bytes([self.status_flag1, self.status_flag2]))

    @classmethod
    def from_frame(cls, frame: bytes) -> WriteWithoutEncryptionResponse:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        status_flag1 = reader.byte("status flag 1")
        status_flag2 = reader.byte("status flag 2")
        reader.finish()
        return cls(idm, status_flag1, status_flag2)


Command = Polling | ReadWithoutEncryption | WriteWithoutEncryption

_COMMANDS: dict[int, type[Command]] = {
    command.CODE: command for command in (Polling, ReadWithoutEncryption, WriteWithoutEncryption)
}


def parse_command(frame: bytes) -> Command:
    """Parse a command frame a card receives; ProtocolError for unknown codes and bad frames."""
    if len(frame) < 2:
        raise ProtocolError(f"frame of {len(frame)} bytes is too short")
    command = _COMMANDS.get(frame[1])
    if command is None:
        raise ProtocolError(f"unknown command code 0x{frame[1]:02X}")
    return command.from_frame(frame)


# ---- FeliCa Standard commands an operator tool needs (not used by the Lite-S tap) ------------

SYSTEM_CODE_WILDCARD = 0xFFFF
SYSTEM_CODE_OCTOPUS = 0x8008
SERVICE_OCTOPUS_BALANCE = 0x0117
SYSTEM_CODE_SHENZHEN_TONG = 0x8005
SERVICE_SHENZHEN_TONG_BALANCE = 0x0118
KEY_VERSION_ABSENT = 0xFFFF  # Request Service's answer for a node the card does not have
SEARCH_END = 0xFFFF  # Search Service Code's answer past the last node


def service_readable_without_key(service_code: int) -> bool:
    """A service whose attribute (low 6 bits) has bit 0 set needs no authentication
    (FeliCa's odd attributes: 0x09, 0x0B, 0x0D, 0x0F, 0x11, 0x13, 0x15, 0x17)."""
    attribute = service_code & 0x3F
    return attribute & 0x01 == 1 and attribute >= 0x08


def node_is_area(code: int) -> bool:
    """Area codes carry attribute 0x00 (may have children) or 0x01 (may not)."""
    return code & 0x3F in (0x00, 0x01)


@dataclass(frozen=True)
class RequestService:
    """Request Service: ``LEN 02 IDm n node_codes(2n, LE)``."""

    CODE: ClassVar[int] = 0x02

    idm: bytes
    node_codes: tuple[int, ...]

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        codes = tuple(self.node_codes)
        if not 1 <= len(codes) <= 32:
            raise ValueError(f"1 to 32 node codes, got {len(codes)}")
        for code in codes:
            _check_int("node code", code, 0xFFFF)
        object.__setattr__(self, "node_codes", codes)

    def to_frame(self) -> bytes:
        return _build(self.CODE, self.idm + bytes([len(self.node_codes)])
                      + b"".join(code.to_bytes(2, "little") for code in self.node_codes))

    @classmethod
    def from_frame(cls, frame: bytes) -> RequestService:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        count = reader.byte("number of nodes")
        codes = tuple(int.from_bytes(reader.take(2, "node code list"), "little")
                      for _ in range(count))
        reader.finish()
        try:
            return cls(idm, codes)
        except ValueError as error:
            raise ProtocolError(str(error)) from None


@dataclass(frozen=True)
class RequestServiceResponse:
    """``LEN 03 IDm n key_versions(2n, LE)``; FFFF for a node the card does not have."""

    CODE: ClassVar[int] = 0x03

    idm: bytes
    key_versions: tuple[int, ...]

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        versions = tuple(self.key_versions)
        for version in versions:
            _check_int("key version", version, 0xFFFF)
        object.__setattr__(self, "key_versions", versions)

    def to_frame(self) -> bytes:
        return _build(self.CODE, self.idm + bytes([len(self.key_versions)])
                      + b"".join(v.to_bytes(2, "little") for v in self.key_versions))

    @classmethod
    def from_frame(cls, frame: bytes) -> RequestServiceResponse:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        count = reader.byte("number of nodes")
        versions = tuple(int.from_bytes(reader.take(2, "key version list"), "little")
                         for _ in range(count))
        reader.finish()
        return cls(idm, versions)


@dataclass(frozen=True)
class RequestSystemCode:
    """Request System Code: ``0A 0C IDm``."""

    CODE: ClassVar[int] = 0x0C

    idm: bytes

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)

    def to_frame(self) -> bytes:
        return _build(self.CODE, self.idm)

    @classmethod
    def from_frame(cls, frame: bytes) -> RequestSystemCode:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        reader.finish()
        return cls(idm)


@dataclass(frozen=True)
class RequestSystemCodeResponse:
    """``LEN 0D IDm n system_codes(2n, big-endian)``."""

    CODE: ClassVar[int] = 0x0D

    idm: bytes
    system_codes: tuple[int, ...]

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        codes = tuple(self.system_codes)
        for code in codes:
            _check_int("system code", code, 0xFFFF)
        object.__setattr__(self, "system_codes", codes)

    def to_frame(self) -> bytes:
        return _build(self.CODE, self.idm + bytes([len(self.system_codes)])
                      + b"".join(code.to_bytes(2, "big") for code in self.system_codes))

    @classmethod
    def from_frame(cls, frame: bytes) -> RequestSystemCodeResponse:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        count = reader.byte("number of system codes")
        codes = tuple(int.from_bytes(reader.take(2, "system code list"), "big")
                      for _ in range(count))
        reader.finish()
        return cls(idm, codes)


@dataclass(frozen=True)
class SearchServiceCode:
    """Search Service Code: ``0C 0A IDm index(2, LE)``: the index-th node of the system."""

    CODE: ClassVar[int] = 0x0A

    idm: bytes
    index: int

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        _check_int("index", self.index, 0xFFFF)

    def to_frame(self) -> bytes:
        return _build(self.CODE, self.idm + self.index.to_bytes(2, "little"))

    @classmethod
    def from_frame(cls, frame: bytes) -> SearchServiceCode:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        index = int.from_bytes(reader.take(2, "index"), "little")
        reader.finish()
        return cls(idm, index)


@dataclass(frozen=True)
class SearchServiceCodeResponse:
    """``LEN 0B IDm code(2, LE) [end(2, LE)]``: a service code, or an area code with its end
    code; ``code`` FFFF past the last node."""

    CODE: ClassVar[int] = 0x0B

    idm: bytes
    code: int
    area_end: int | None = None

    def __post_init__(self) -> None:
        _freeze_bytes(self, "idm", IDM_SIZE)
        _check_int("code", self.code, 0xFFFF)
        if self.area_end is not None:
            _check_int("area end", self.area_end, 0xFFFF)

    def to_frame(self) -> bytes:
        body = self.idm + self.code.to_bytes(2, "little")
        if self.area_end is not None:
            body += self.area_end.to_bytes(2, "little")
        return _build(self.CODE, body)

    @classmethod
    def from_frame(cls, frame: bytes) -> SearchServiceCodeResponse:
        reader = _open(frame, cls.CODE)
        idm = reader.take(IDM_SIZE, "IDm")
        code = int.from_bytes(reader.take(2, "node code"), "little")
        area_end = None
        if not reader.at_end():
            area_end = int.from_bytes(reader.take(2, "area end code"), "little")
        reader.finish()
        return cls(idm, code, area_end)


StandardCommand = Command | RequestService | RequestSystemCode | SearchServiceCode

_STANDARD_COMMANDS: dict[int, type[StandardCommand]] = {
    **_COMMANDS,
    **{command.CODE: command for command in (RequestService, RequestSystemCode,
                                             SearchServiceCode)},
}


def parse_standard_command(frame: bytes) -> StandardCommand:
    """Like :func:`parse_command`, also knowing the FeliCa Standard discovery commands
    (Request Service, Request System Code, Search Service Code)."""
    if len(frame) < 2:
        raise ProtocolError(f"frame of {len(frame)} bytes is too short")
    command = _STANDARD_COMMANDS.get(frame[1])
    if command is None:
        raise ProtocolError(f"unknown command code 0x{frame[1]:02X}")
    return command.from_frame(frame)
