"""A simulated FeliCa Lite-S card: memory, IDm/PMm, command handling, status errors, faults.

The card answers Polling, Read Without Encryption (1 service, 1-4 blocks: user blocks
0x00-0x0D and the ID and SYS_C registers) and Write Without Encryption (1 service, 1 user
block, read/write service only). It stays silent when out of the field, for malformed frames,
for another card's IDm and for polls of another system code. A card file is JSON:
``{"idm", "pmm", "system_code", "blocks"}``, all hex.

:class:`SimulatedFelicaStandard` is a read-only FeliCa Standard card (systems, key-less services
and their blocks: what a dump of a real card such as an Octopus card holds); its card file has
``systems`` instead of ``blocks``: ``{"idm", "pmm", "system_code", "systems": {"8008": {"idm",
"services": {"0117": [blocks]}}}}``. :func:`card_from_json` picks the model by those keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from farebox.protocol.errors import ProtocolError
from farebox.protocol.frames import (
    BLOCK_SIZE,
    IDM_SIZE,
    MAX_READ_BLOCKS_LITE_S,
    PMM_SIZE,
    REQUEST_CODE_SYSTEM_CODE,
    SERVICE_LITE_S_RO,
    SERVICE_LITE_S_RW,
    SF1_NOT_BLOCK_SPECIFIC,
    SF1_SUCCESS,
    SF2_ILLEGAL_BLOCK_LIST_ACCESS_MODE,
    SF2_ILLEGAL_BLOCK_LIST_SERVICE_ORDER,
    SF2_ILLEGAL_BLOCK_NUMBER,
    SF2_ILLEGAL_NUMBER_OF_BLOCK,
    SF2_ILLEGAL_NUMBER_OF_SERVICE,
    SF2_ILLEGAL_SERVICE_CODE,
    SF2_SUCCESS,
    SYSTEM_CODE_LITE_S,
    Polling,
    PollingResponse,
    ReadWithoutEncryption,
    ReadWithoutEncryptionResponse,
    WriteWithoutEncryption,
    WriteWithoutEncryptionResponse,
    parse_command,
    sf1_for_element,
)

USER_BLOCKS = 14
DEFAULT_PMM = bytes.fromhex("00F1000000014300")  # IC type F1 = Lite-S; PMm[5] read, PMm[6] write
BLOCK_ID = 0x82  # ID register: IDm (as IDd), then DFC and free bytes, here zero
BLOCK_SYS_C = 0x85  # SYS_C register: system code big-endian, then zero
_READABLE_BLOCKS = frozenset(range(USER_BLOCKS)) | {BLOCK_ID, BLOCK_SYS_C}
_WRITABLE_BLOCKS = frozenset(range(USER_BLOCKS))
_SF1_SERVICE_CODE_ERROR = 0x01  # a Lite reports a bad service code as 01 A6 (nfcpy's table)
_WILDCARD = 0xFF

Status = tuple[int, int]


@dataclass(frozen=True)
class Faults:
    """Faults to inject, counted from the moment they are given to the card; each fires once."""

    leave_after_commands: int | None = None
    """Answer this many more commands, then leave the field (no answer to anything after)."""
    tear_write_number: int | None = None
    """The Nth write command from now (1-based) lands torn, and the card leaves unanswered."""
    tear_bytes: int = 8
    """How many leading bytes of the torn block take the new data; the rest keep the old."""
    latency_s: float = 0.0
    """Answer time a transport should simulate."""

    def __post_init__(self) -> None:
        if self.leave_after_commands is not None and self.leave_after_commands < 0:
            raise ValueError(f"leave_after_commands must be >= 0, got {self.leave_after_commands}")
        if self.tear_write_number is not None and self.tear_write_number < 1:
            raise ValueError(f"tear_write_number must be >= 1, got {self.tear_write_number}")
        if not 0 <= self.tear_bytes <= BLOCK_SIZE:
            raise ValueError(f"tear_bytes must be in 0..{BLOCK_SIZE}, got {self.tear_bytes}")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")


class CardFileError(Exception):
    """A card file or card JSON that cannot be used; the message is one line."""


class SimulatedLiteS:
    """A FeliCa Lite-S device model; ``respond`` is the card's side of one exchange."""

    def __init__(
        self,
        idm: bytes,
        pmm: bytes = DEFAULT_PMM,
        blocks: list[bytes] | None = None,
        system_code: int = SYSTEM_CODE_LITE_S,
        faults: Faults | None = None,
        on_write: Callable[[SimulatedLiteS], None] | None = None,
    ) -> None:
        if blocks is None:
            blocks = [bytes(BLOCK_SIZE)] * USER_BLOCKS
        _check_size("idm", idm, IDM_SIZE)
        _check_size("pmm", pmm, PMM_SIZE)
        if len(blocks) != USER_BLOCKS:
            raise ValueError(f"expected {USER_BLOCKS} blocks, got {len(blocks)}")
        for number, block in enumerate(blocks):
            _check_size(f"block {number}", block, BLOCK_SIZE)
        if not 0 <= system_code <= 0xFFFF:
            raise ValueError(f"system_code must be in 0..0xFFFF, got {system_code!r}")
        self.idm = bytes(idm)
        self.pmm = bytes(pmm)
        self.system_code = system_code
        self.blocks = [bytes(block) for block in blocks]
        self.on_write = on_write
        self.in_field = True
        self.commands_handled = 0  # frames received while in the field, answered or not
        self.faults = faults or Faults()

    def __repr__(self) -> str:
        return (
            f"SimulatedLiteS(idm={self.idm.hex()}, system_code={self.system_code:04x}, "
            f"in_field={self.in_field}, commands_handled={self.commands_handled})"
        )

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        """Arm ``faults``, counting from now."""
        self._faults = faults
        self._answers_left = faults.leave_after_commands
        self._writes_until_tear = faults.tear_write_number
        if self._answers_left == 0:
            self.in_field = False

    def respond(self, frame: bytes) -> bytes | None:
        """The card's answer to ``frame``, or None when it gives none."""
        if not self.in_field:
            return None
        self.commands_handled += 1
        try:
            command = parse_command(frame)
        except ProtocolError:
            return None
        if isinstance(command, Polling):
            answer = self._poll(command)
        elif command.idm != self.idm:
            answer = None
        elif isinstance(command, ReadWithoutEncryption):
            answer = self._read(command).to_frame()
        else:
            answer = self._write(command)
        if answer is not None and self._answers_left is not None:
            self._answers_left -= 1
            if self._answers_left == 0:
                self.in_field = False
        return answer

    def _poll(self, command: Polling) -> bytes | None:
        requested = command.system_code.to_bytes(2, "big")
        own = self.system_code.to_bytes(2, "big")
        if any(want not in (_WILDCARD, have) for want, have in zip(requested, own)):
            return None
        request_data = own if command.request_code == REQUEST_CODE_SYSTEM_CODE else b""
        return PollingResponse(self.idm, self.pmm, request_data).to_frame()

    def _read(self, command: ReadWithoutEncryption) -> ReadWithoutEncryptionResponse:
        status = _check_access(
            command,
            max_blocks=MAX_READ_BLOCKS_LITE_S,
            services=(SERVICE_LITE_S_RW, SERVICE_LITE_S_RO),
            blocks=_READABLE_BLOCKS,
        )
        if status is not None:
            return ReadWithoutEncryptionResponse(self.idm, *status)
        block_data = tuple(self._read_block(element.block_number) for element in command.block_list)
        return ReadWithoutEncryptionResponse(self.idm, SF1_SUCCESS, SF2_SUCCESS, block_data)

    def _read_block(self, number: int) -> bytes:
        if number == BLOCK_ID:
            return self.idm + bytes(BLOCK_SIZE - IDM_SIZE)
        if number == BLOCK_SYS_C:
            return self.system_code.to_bytes(2, "big") + bytes(BLOCK_SIZE - 2)
        return self.blocks[number]

    def _write(self, command: WriteWithoutEncryption) -> bytes | None:
        torn = False
        if self._writes_until_tear is not None:
            self._writes_until_tear -= 1
            torn = self._writes_until_tear == 0
        status = _check_access(
            command, max_blocks=1, services=(SERVICE_LITE_S_RW,), blocks=_WRITABLE_BLOCKS
        )
        if status is None:
            number = command.block_list[0].block_number
            data = command.block_data[0]
            if torn:
                cut = self.faults.tear_bytes
                data = data[:cut] + self.blocks[number][cut:]
            self.blocks[number] = data
            if self.on_write is not None:
                self.on_write(self)
        if torn:
            self.in_field = False
            return None
        status = status or (SF1_SUCCESS, SF2_SUCCESS)
        return WriteWithoutEncryptionResponse(self.idm, *status).to_frame()

    def to_json(self) -> dict[str, object]:
        """The card file contents: lowercase hex."""
        return {
            "idm": self.idm.hex(),
            "pmm": self.pmm.hex(),
            "system_code": f"{self.system_code:04x}",
            "blocks": [block.hex() for block in self.blocks],
        }

    @classmethod
    def from_json(cls, obj: object) -> SimulatedLiteS:
        """A card from card-file JSON (hex in any case; other keys ignored); else CardFileError."""
        if not isinstance(obj, dict):
            raise CardFileError(f"expected a JSON object, got {type(obj).__name__}")
        idm = _hex_field(obj, "idm", IDM_SIZE)
        pmm = _hex_field(obj, "pmm", PMM_SIZE)
        system_code = int.from_bytes(_hex_field(obj, "system_code", 2), "big")
        blocks = obj.get("blocks")
        if not isinstance(blocks, list) or len(blocks) != USER_BLOCKS:
            raise CardFileError(f"'blocks' must be a list of {USER_BLOCKS} hex strings")
        block_data = [
            _parse_hex(f"blocks[{number}]", block, BLOCK_SIZE)
            for number, block in enumerate(blocks)
        ]
        return cls(idm, pmm, block_data, system_code)


def _check_size(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {value!r}")


def _check_access(
    command: ReadWithoutEncryption | WriteWithoutEncryption,
    max_blocks: int,
    services: tuple[int, ...],
    blocks: frozenset[int],
) -> Status | None:
    """The Lite-S error status for ``command``, or None when it may proceed."""
    if len(command.service_codes) != 1:
        return SF1_NOT_BLOCK_SPECIFIC, SF2_ILLEGAL_NUMBER_OF_SERVICE
    if not 1 <= len(command.block_list) <= max_blocks:
        return SF1_NOT_BLOCK_SPECIFIC, SF2_ILLEGAL_NUMBER_OF_BLOCK
    if command.service_codes[0] not in services:
        return _SF1_SERVICE_CODE_ERROR, SF2_ILLEGAL_SERVICE_CODE
    for index, element in enumerate(command.block_list):
        if element.service_index != 0:
            return sf1_for_element(index), SF2_ILLEGAL_BLOCK_LIST_SERVICE_ORDER
        if element.access_mode != 0:
            return sf1_for_element(index), SF2_ILLEGAL_BLOCK_LIST_ACCESS_MODE
        if element.block_number not in blocks:
            return sf1_for_element(index), SF2_ILLEGAL_BLOCK_NUMBER
    return None


def _hex_field(obj: dict[str, object], key: str, size: int) -> bytes:
    if key not in obj:
        raise CardFileError(f"missing key '{key}'")
    return _parse_hex(key, obj[key], size)


def _parse_hex(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, str):
        raise CardFileError(f"'{name}' must be a hex string, got {type(value).__name__}")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise CardFileError(f"'{name}' is not hex: {value!r}") from None
    if len(data) != size:
        raise CardFileError(
            f"'{name}' must be {size} bytes ({2 * size} hex digits), got {len(data)}"
        )
    return data


# ---- a read-only FeliCa Standard card (e.g. an Octopus card's public data) -------------------

MAX_READ_BLOCKS_STANDARD = 15  # block list elements a Standard card takes per Read (PMm-bound)
MAX_SYSTEMS = 16
MAX_SERVICES = 256
MAX_BLOCKS_PER_SERVICE = 256
ROOT_AREA_END = 0xFFFE


@dataclass(frozen=True)
class SimulatedSystem:
    """One system of a FeliCa Standard card: its code, the IDm it answers a Polling with, and
    the blocks of each service readable without a key (service code -> blocks in order)."""

    system_code: int
    idm: bytes
    services: dict[int, tuple[bytes, ...]]


class SimulatedFelicaStandard:
    """A FeliCa Standard card with only its key-less data: what a dump of a real card (an
    Octopus card, a transit card) can hold. It answers Polling (each system with its own IDm,
    FF wildcards), Request Service, Request System Code, Search Service Code and Read Without
    Encryption of the services it holds; it refuses every write (01 A6: no writable service),
    as a real card refuses writes without mutual authentication. Services needing a key are not
    modelled: a dump cannot hold their data. Same interface as :class:`SimulatedLiteS` for the
    transports (``idm``, ``pmm``, ``system_code``, ``respond``, ``in_field``, ``faults``)."""

    def __init__(self, systems: list[SimulatedSystem], pmm: bytes = DEFAULT_PMM,
                 faults: Faults | None = None, *, answers_discovery: bool = True) -> None:
        """``answers_discovery=False``: an older card that stays silent to Request System Code
        and Search Service Code (it must be polled by system code, its services known)."""
        if not 1 <= len(systems) <= MAX_SYSTEMS:
            raise ValueError(f"1 to {MAX_SYSTEMS} systems, got {len(systems)}")
        _check_size("pmm", pmm, PMM_SIZE)
        codes = [system.system_code for system in systems]
        if len(set(codes)) != len(codes):
            raise ValueError("a system code appears twice")
        for system in systems:
            _check_size(f"idm of system {system.system_code:04x}", system.idm, IDM_SIZE)
            if not 0 <= system.system_code <= 0xFFFE:
                raise ValueError(f"system code {system.system_code!r} out of range")
            if len(system.services) > MAX_SERVICES:
                raise ValueError(f"more than {MAX_SERVICES} services")
            for code, blocks in system.services.items():
                if not 0 <= code <= 0xFFFE:
                    raise ValueError(f"service code {code!r} out of range")
                if len(blocks) > MAX_BLOCKS_PER_SERVICE:
                    raise ValueError(f"more than {MAX_BLOCKS_PER_SERVICE} blocks in a service")
                for block in blocks:
                    _check_size(f"a block of service {code:04x}", block, BLOCK_SIZE)
        self.systems = list(systems)
        self.pmm = bytes(pmm)
        self.answers_discovery = answers_discovery
        self.in_field = True
        self.commands_handled = 0
        self.on_write = None  # never called: nothing is ever written
        self.faults = faults or Faults()
        #: where the card's data came from (kept through saves): ``source``, ``scanned_at``
        self.metadata: dict[str, str] = {}

    # The primary system: what the udp link's own Polling answer and the card file show first.
    @property
    def idm(self) -> bytes:
        return self.systems[0].idm

    @property
    def system_code(self) -> int:
        return self.systems[0].system_code

    def __repr__(self) -> str:
        codes = ",".join(f"{s.system_code:04x}" for s in self.systems)
        return f"SimulatedFelicaStandard(idm={self.idm.hex()}, systems={codes}, in_field={self.in_field})"

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        self._answers_left = faults.leave_after_commands
        if self._answers_left == 0:
            self.in_field = False

    def respond(self, frame: bytes) -> bytes | None:
        from farebox.protocol.frames import (
            RequestService, RequestServiceResponse, RequestSystemCode, RequestSystemCodeResponse,
            SearchServiceCode, parse_standard_command,
        )

        if not self.in_field:
            return None
        self.commands_handled += 1
        try:
            command = parse_standard_command(frame)
        except ProtocolError:
            return None
        if isinstance(command, Polling):
            answer = self._poll(command)
        else:
            system = self._system_of(command.idm)
            if system is None:
                answer = None
            elif isinstance(command, ReadWithoutEncryption):
                answer = self._read(system, command).to_frame()
            elif isinstance(command, WriteWithoutEncryption):
                answer = WriteWithoutEncryptionResponse(
                    command.idm, _SF1_SERVICE_CODE_ERROR, SF2_ILLEGAL_SERVICE_CODE).to_frame()
            elif isinstance(command, RequestService):
                versions = tuple(0 if self._has_node(system, code) else 0xFFFF
                                 for code in command.node_codes)
                answer = RequestServiceResponse(command.idm, versions).to_frame()
            elif isinstance(command, (RequestSystemCode, SearchServiceCode)) \
                    and not self.answers_discovery:
                answer = None
            elif isinstance(command, RequestSystemCode):
                answer = RequestSystemCodeResponse(
                    command.idm, tuple(s.system_code for s in self.systems)).to_frame()
            elif isinstance(command, SearchServiceCode):
                answer = self._search(system, command.index).to_frame()
            else:  # pragma: no cover - parse_standard_command knows no other command
                answer = None
        if answer is not None and self._answers_left is not None:
            self._answers_left -= 1
            if self._answers_left == 0:
                self.in_field = False
        return answer

    def _system_of(self, idm: bytes) -> SimulatedSystem | None:
        return next((s for s in self.systems if s.idm == idm), None)

    @staticmethod
    def _has_node(system: SimulatedSystem, code: int) -> bool:
        return code == 0x0000 or code in system.services

    def _poll(self, command: Polling) -> bytes | None:
        requested = command.system_code.to_bytes(2, "big")
        for system in self.systems:
            own = system.system_code.to_bytes(2, "big")
            if all(want in (_WILDCARD, have) for want, have in zip(requested, own)):
                request_data = own if command.request_code == REQUEST_CODE_SYSTEM_CODE else b""
                return PollingResponse(system.idm, self.pmm, request_data).to_frame()
        return None

    def _read(self, system: SimulatedSystem,
              command: ReadWithoutEncryption) -> ReadWithoutEncryptionResponse:
        if not 1 <= len(command.service_codes) <= 16:
            return ReadWithoutEncryptionResponse(command.idm, SF1_NOT_BLOCK_SPECIFIC,
                                                 SF2_ILLEGAL_NUMBER_OF_SERVICE)
        if not 1 <= len(command.block_list) <= MAX_READ_BLOCKS_STANDARD:
            return ReadWithoutEncryptionResponse(command.idm, SF1_NOT_BLOCK_SPECIFIC,
                                                 SF2_ILLEGAL_NUMBER_OF_BLOCK)
        for code in command.service_codes:
            if code not in system.services:
                return ReadWithoutEncryptionResponse(command.idm, _SF1_SERVICE_CODE_ERROR,
                                                     SF2_ILLEGAL_SERVICE_CODE)
        data = []
        for index, element in enumerate(command.block_list):
            if element.service_index >= len(command.service_codes):
                return ReadWithoutEncryptionResponse(command.idm, sf1_for_element(min(index, 7)),
                                                     SF2_ILLEGAL_BLOCK_LIST_SERVICE_ORDER)
            if element.access_mode != 0:
                return ReadWithoutEncryptionResponse(command.idm, sf1_for_element(min(index, 7)),
                                                     SF2_ILLEGAL_BLOCK_LIST_ACCESS_MODE)
            blocks = system.services[command.service_codes[element.service_index]]
            if element.block_number >= len(blocks):
                return ReadWithoutEncryptionResponse(command.idm, sf1_for_element(min(index, 7)),
                                                     SF2_ILLEGAL_BLOCK_NUMBER)
            data.append(blocks[element.block_number])
        return ReadWithoutEncryptionResponse(command.idm, SF1_SUCCESS, SF2_SUCCESS, tuple(data))

    def _search(self, system: SimulatedSystem, index: int):
        from farebox.protocol.frames import SEARCH_END, SearchServiceCodeResponse

        if index == 0:  # the root area comes first
            return SearchServiceCodeResponse(system.idm, 0x0000, ROOT_AREA_END)
        services = sorted(system.services)
        if index - 1 < len(services):
            return SearchServiceCodeResponse(system.idm, services[index - 1])
        return SearchServiceCodeResponse(system.idm, SEARCH_END)

    def to_json(self) -> dict[str, object]:
        first = self.systems[0]
        return {
            "idm": first.idm.hex(),
            "pmm": self.pmm.hex(),
            "system_code": f"{first.system_code:04x}",
            "systems": {
                f"{system.system_code:04x}": {
                    "idm": system.idm.hex(),
                    "services": {f"{code:04x}": [block.hex() for block in blocks]
                                 for code, blocks in sorted(system.services.items())},
                } for system in self.systems
            },
            **self.metadata,
        }

    @classmethod
    def from_json(cls, obj: object) -> SimulatedFelicaStandard:
        if not isinstance(obj, dict):
            raise CardFileError(f"expected a JSON object, got {type(obj).__name__}")
        pmm = _hex_field(obj, "pmm", PMM_SIZE)
        primary = int.from_bytes(_hex_field(obj, "system_code", 2), "big")
        raw_systems = obj.get("systems")
        if not isinstance(raw_systems, dict) or not 1 <= len(raw_systems) <= MAX_SYSTEMS:
            raise CardFileError(f"'systems' must be an object of 1 to {MAX_SYSTEMS} systems")
        systems = []
        for key, raw in raw_systems.items():
            code = int.from_bytes(_parse_hex(f"systems key {key!r}", key, 2), "big")
            if not isinstance(raw, dict):
                raise CardFileError(f"systems[{key}] must be an object")
            idm = _hex_field(raw, "idm", IDM_SIZE)
            services_raw = raw.get("services", {})
            if not isinstance(services_raw, dict) or len(services_raw) > MAX_SERVICES:
                raise CardFileError(f"systems[{key}].services must be an object of at most "
                                    f"{MAX_SERVICES} services")
            services = {}
            for service_key, blocks in services_raw.items():
                service = int.from_bytes(
                    _parse_hex(f"systems[{key}] service {service_key!r}", service_key, 2), "big")
                if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS_PER_SERVICE:
                    raise CardFileError(f"systems[{key}].services[{service_key}] must be a list "
                                        f"of at most {MAX_BLOCKS_PER_SERVICE} hex blocks")
                services[service] = tuple(
                    _parse_hex(f"systems[{key}].services[{service_key}][{n}]", block, BLOCK_SIZE)
                    for n, block in enumerate(blocks))
            systems.append(SimulatedSystem(code, idm, services))
        systems.sort(key=lambda s: s.system_code != primary)  # the primary system first
        if systems[0].system_code != primary:
            raise CardFileError(f"system_code {primary:04x} is not among 'systems'")
        try:
            card = cls(systems, pmm)
        except ValueError as error:
            raise CardFileError(str(error)) from None
        card.metadata = {key: obj[key] for key in _METADATA_KEYS
                         if isinstance(obj.get(key), str) and len(obj[key]) <= 200}
        return card


_METADATA_KEYS = ("source", "scanned_at")

SimulatedCard = SimulatedLiteS | SimulatedFelicaStandard


def card_from_json(obj: object) -> SimulatedCard:
    """A card from card-file JSON: a FeliCa Standard card when it has ``systems``, else a
    Lite-S (``blocks``)."""
    if isinstance(obj, dict) and "systems" in obj:
        return SimulatedFelicaStandard.from_json(obj)
    return SimulatedLiteS.from_json(obj)
