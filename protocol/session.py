"""A FeliCa Lite-S session over a transport: poll, read blocks, write a block."""

from __future__ import annotations

from collections.abc import Sequence

from farebox.protocol.errors import CardStatusError, ProtocolError
from farebox.protocol.frames import (
    MAX_READ_BLOCKS_LITE_S,
    SERVICE_LITE_S_RO,
    SERVICE_LITE_S_RW,
    SF1_SUCCESS,
    SYSTEM_CODE_LITE_S,
    BlockListElement,
    Command,
    Polling,
    PollingResponse,
    ReadWithoutEncryption,
    ReadWithoutEncryptionResponse,
    WriteWithoutEncryption,
    WriteWithoutEncryptionResponse,
)
from farebox.protocol.transport import Transport

PMM_READ_INDEX = 5
PMM_WRITE_INDEX = 6
_TIME_UNIT_S = 302.1e-6


def response_timeout_s(pmm_byte: int, blocks: int) -> float:
    """Maximum response time a card announces in one PMm byte, for a command on ``blocks`` blocks.

    ``T = 302.1 µs × ((B + 1)·n + (A + 1)) × 4^E``, E = bits 7-6, B = bits 5-3, A = bits 2-0.
    """
    if not 0 <= pmm_byte <= 0xFF:
        raise ValueError(f"pmm_byte must be in 0..0xFF, got {pmm_byte}")
    if blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    exponent, per_block, fixed = pmm_byte >> 6, pmm_byte >> 3 & 0x07, pmm_byte & 0x07
    return _TIME_UNIT_S * ((per_block + 1) * blocks + (fixed + 1)) * 4.0**exponent


class LiteSSession:
    """Talks to one FeliCa Lite-S card: ``poll`` first, then read and write its blocks.

    Each command waits the card's PMm response time plus ``margin_s`` for the transport.
    """

    def __init__(self, transport: Transport, margin_s: float = 0.05) -> None:
        self.transport = transport
        self.margin_s = margin_s
        self.idm: bytes | None = None
        self.pmm: bytes | None = None
        self.commands = 0

    def __repr__(self) -> str:
        idm = self.idm.hex() if self.idm else None
        return f"LiteSSession(idm={idm}, commands={self.commands})"

    def poll(
        self, system_code: int = SYSTEM_CODE_LITE_S, timeout_s: float = 0.02
    ) -> PollingResponse:
        """Find a card answering ``system_code``; remember its IDm and PMm."""
        self.idm = self.pmm = None
        response = PollingResponse.from_frame(self._exchange(Polling(system_code), timeout_s))
        self.idm, self.pmm = response.idm, response.pmm
        return response

    def activate(self, response: PollingResponse) -> None:
        """Start from the Polling response a reader already got while finding the card (see
        ``Reader.wait_for_card``): that was this session's poll command."""
        self.idm, self.pmm = response.idm, response.pmm
        self.commands += 1

    def read_blocks(
        self, block_numbers: Sequence[int], service_code: int = SERVICE_LITE_S_RO
    ) -> list[bytes]:
        """The blocks' data in the order asked, read at most 4 blocks per command."""
        idm, pmm = self._card()
        data: list[bytes] = []
        for start in range(0, len(block_numbers), MAX_READ_BLOCKS_LITE_S):
            chunk = block_numbers[start : start + MAX_READ_BLOCKS_LITE_S]
            command = ReadWithoutEncryption(
                idm, (service_code,), tuple(BlockListElement(number) for number in chunk)
            )
            timeout_s = response_timeout_s(pmm[PMM_READ_INDEX], len(chunk)) + self.margin_s
            response = ReadWithoutEncryptionResponse.from_frame(self._exchange(command, timeout_s))
            _check(idm, response)
            if len(response.block_data) != len(chunk):
                raise ProtocolError(
                    f"asked for {len(chunk)} blocks, card sent {len(response.block_data)}"
                )
            data.extend(response.block_data)
        return data

    def write_block(
        self, block_number: int, data: bytes, service_code: int = SERVICE_LITE_S_RW
    ) -> None:
        """Write one block with one command."""
        idm, pmm = self._card()
        command = WriteWithoutEncryption(
            idm, (service_code,), (BlockListElement(block_number),), (data,)
        )
        timeout_s = response_timeout_s(pmm[PMM_WRITE_INDEX], 1) + self.margin_s
        response = WriteWithoutEncryptionResponse.from_frame(self._exchange(command, timeout_s))
        _check(idm, response)

    def _card(self) -> tuple[bytes, bytes]:
        if self.idm is None or self.pmm is None:
            raise RuntimeError("no card: call poll() first")
        return self.idm, self.pmm

    def _exchange(self, command: Command, timeout_s: float) -> bytes:
        self.commands += 1
        return self.transport.exchange(command.to_frame(), timeout_s)


def _check(
    idm: bytes, response: ReadWithoutEncryptionResponse | WriteWithoutEncryptionResponse
) -> None:
    """The answer must come from the polled card and carry a success status."""
    if response.idm != idm:
        raise ProtocolError(f"answer from IDm {response.idm.hex()}, expected {idm.hex()}")
    if response.status_flag1 != SF1_SUCCESS:
        raise CardStatusError(response.status_flag1, response.status_flag2)


PMM_REQUEST_SERVICE_INDEX = 2
PMM_FIXED_INDEX = 3  # Request System Code, Search Service Code: "fixed response time" commands


class FelicaSession:
    """Talks to any FeliCa card (Standard or Lite-S) to look at it: poll a system, ask which
    systems and services it has, read key-less blocks. Nothing here writes."""

    def __init__(self, transport: Transport, margin_s: float = 0.05) -> None:
        self.transport = transport
        self.margin_s = margin_s
        self.idm: bytes | None = None
        self.pmm: bytes | None = None
        self.commands = 0

    def __repr__(self) -> str:
        idm = self.idm.hex() if self.idm else None
        return f"FelicaSession(idm={idm}, commands={self.commands})"

    def poll(self, system_code: int, timeout_s: float = 0.02,
             request_code: int = 0) -> PollingResponse:
        """The card's answer for ``system_code`` (each system answers with its own IDm)."""
        self.idm = self.pmm = None
        response = PollingResponse.from_frame(
            self._exchange(Polling(system_code, request_code), timeout_s))
        self.idm, self.pmm = response.idm, response.pmm
        return response

    def activate(self, response: PollingResponse) -> None:
        self.idm, self.pmm = response.idm, response.pmm
        self.commands += 1

    def request_system_codes(self) -> tuple[int, ...]:
        from farebox.protocol.frames import RequestSystemCode, RequestSystemCodeResponse

        idm, pmm = self._card()
        answer = RequestSystemCodeResponse.from_frame(
            self._exchange(RequestSystemCode(idm), self._timeout(pmm, PMM_FIXED_INDEX, 0)))
        _same_card(idm, answer.idm)
        return answer.system_codes

    def search_service_code(self, index: int) -> tuple[int, int | None]:
        """The index-th node of the polled system: ``(code, area_end)`` (area_end None for a
        service; code FFFF past the last node)."""
        from farebox.protocol.frames import SearchServiceCode, SearchServiceCodeResponse

        idm, pmm = self._card()
        answer = SearchServiceCodeResponse.from_frame(
            self._exchange(SearchServiceCode(idm, index), self._timeout(pmm, PMM_FIXED_INDEX, 0)))
        _same_card(idm, answer.idm)
        return answer.code, answer.area_end

    def request_service(self, node_codes: Sequence[int]) -> tuple[int, ...]:
        """Key versions of the nodes (FFFF: the card does not have it)."""
        from farebox.protocol.frames import RequestService, RequestServiceResponse

        idm, pmm = self._card()
        answer = RequestServiceResponse.from_frame(self._exchange(
            RequestService(idm, tuple(node_codes)),
            self._timeout(pmm, PMM_REQUEST_SERVICE_INDEX, len(node_codes))))
        _same_card(idm, answer.idm)
        if len(answer.key_versions) != len(node_codes):
            raise ProtocolError(f"asked about {len(node_codes)} nodes, card answered "
                                f"{len(answer.key_versions)}")
        return answer.key_versions

    def read(self, service_code: int, block_numbers: Sequence[int]) -> list[bytes]:
        """Blocks of one key-less service, in one Read Without Encryption command."""
        idm, pmm = self._card()
        command = ReadWithoutEncryption(
            idm, (service_code,), tuple(BlockListElement(number) for number in block_numbers))
        response = ReadWithoutEncryptionResponse.from_frame(
            self._exchange(command, self._timeout(pmm, PMM_READ_INDEX, len(block_numbers))))
        _check(idm, response)
        if len(response.block_data) != len(block_numbers):
            raise ProtocolError(f"asked for {len(block_numbers)} blocks, card sent "
                                f"{len(response.block_data)}")
        return list(response.block_data)

    def _timeout(self, pmm: bytes, index: int, blocks: int) -> float:
        return response_timeout_s(pmm[index], blocks) + self.margin_s

    def _card(self) -> tuple[bytes, bytes]:
        if self.idm is None or self.pmm is None:
            raise RuntimeError("no card: call poll() first")
        return self.idm, self.pmm

    def _exchange(self, command, timeout_s: float) -> bytes:
        self.commands += 1
        return self.transport.exchange(command.to_frame(), timeout_s)


def _same_card(idm: bytes, answered: bytes) -> None:
    if answered != idm:
        raise ProtocolError(f"answer from IDm {answered.hex()}, expected {idm.hex()}")
