"""FeliCa dumps: read from a card on a reader, or from the files people share (docs/readers.md,
"Dump formats"), and turned into our simulated-card file so ``farebox sim serve`` can present
them.

Formats read (every one parsed defensively: size cap, types checked, hex checked; any problem is
a :class:`DumpError` with one line):

- our card file (``idm``, ``pmm``, ``system_code`` and ``blocks`` or ``systems``);
- Flipper Zero ``.nfc`` with ``Device type: FeliCa``: data format 2-4 (FeliCa Standard: ``System
  NN``, ``Service NNN``, ``Block NNNN: | Service code XXXX | Block index NN | Data: ... |``) and
  the Lite layout (format 1, or a Lite IC: ``Block N:`` = status flags + 16 bytes, index 0-13 the
  user blocks); Flipper files carry no scan time;
- Metrodroid JSON (``felica.systems[code].services[code].blocks[{address?, data}]``, hex,
  ``scannedAt`` in ms or ``{"timeInMillis": ms}``; Metrodroid writes bare integer keys, which
  are accepted);
- FareBot JSON (``systems[{code, services[{serviceCode, blocks[{address, data}]}]}]``, base64,
  ``scannedAt`` ms, ``tagId`` base64), alone or in an export's ``cards`` list (the first FeliCa).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from farebox.terminal.errors import BadInput
from farebox.cardimage.layout import USER_BLOCKS
from farebox.protocol.errors import CardStatusError, TransportTimeout
from farebox.protocol.frames import (
    BLOCK_SIZE, IDM_SIZE, PMM_SIZE, SEARCH_END, SERVICE_LITE_S_RO, SERVICE_LITE_S_RW,
    SYSTEM_CODE_LITE_S, SYSTEM_CODE_WILDCARD, node_is_area, service_readable_without_key,
)
from farebox.protocol.reader import Reader
from farebox.protocol.session import FelicaSession
from farebox.protocol.sim.card import (
    MAX_BLOCKS_PER_SERVICE, MAX_SERVICES, MAX_SYSTEMS, CardFileError, SimulatedFelicaStandard,
    SimulatedLiteS, SimulatedSystem, card_from_json,
)
from farebox.protocol.files import UntrustedFileError, parse_json, read_limited

from farebox.terminal.card.present import wait_for_card

MAX_DUMP_BYTES = 4 << 20  # a Flipper dump of a large FeliCa Standard card is a few hundred KiB
MAX_NODES_SEARCHED = 1024
#: probed with Request Service when a card does not answer Search Service Code
WELL_KNOWN_SERVICES = (0x0117, 0x0118, 0x100B, 0x008B, 0x090F, 0x000B, 0x0009)
#: polled one by one when a card does not answer Request System Code (older Octopus cards):
#: Octopus, Shenzhen Tong, the common area (Suica etc.), FeliCa Networks' common system
WELL_KNOWN_SYSTEMS = (0x8008, 0x8005, 0x0003, 0xFE00)

FORMAT_CARD_FILE = "farebox card file"
FORMAT_FLIPPER = "Flipper Zero .nfc"
FORMAT_METRODROID = "Metrodroid JSON"
FORMAT_FAREBOT = "FareBot JSON"
FORMAT_READER = "reader"


class DumpError(BadInput, ValueError):
    """A dump that cannot be used; the message is one line naming the file."""


@dataclass
class DumpSystem:
    system_code: int
    idm: bytes | None = None  # the IDm this system answers a Polling with (None: not known)
    services: dict[int, dict[int, bytes]] = field(default_factory=dict)  # service -> block -> data


@dataclass
class FelicaDump:
    idm: bytes
    pmm: bytes
    systems: list[DumpSystem]
    scanned_at: datetime | None
    source_format: str
    notes: list[str] = field(default_factory=list)

    def system(self, code: int) -> DumpSystem | None:
        return next((s for s in self.systems if s.system_code == code), None)

    def block(self, system_code: int, service_code: int, number: int) -> bytes | None:
        system = self.system(system_code)
        if system is None:
            return None
        return system.services.get(service_code, {}).get(number)

    def lite_s_blocks(self) -> list[bytes] | None:
        """The 14 user blocks when this is a FeliCa Lite-S dump holding all of them."""
        system = self.system(SYSTEM_CODE_LITE_S)
        if system is None:
            return None
        merged: dict[int, bytes] = {}
        for service in (SERVICE_LITE_S_RW, SERVICE_LITE_S_RO):
            merged.update(system.services.get(service, {}))
        if all(n in merged for n in range(USER_BLOCKS)):
            return [merged[n] for n in range(USER_BLOCKS)]
        return None


# ---- to and from our card file --------------------------------------------------------------

def system_idm(idm: bytes, index: int) -> bytes:
    """The IDm a card's index-th system answers with: FeliCa puts the system number in the
    upper 4 bits of the first IDm byte."""
    return bytes([(idm[0] & 0x0F) | (index & 0x0F) << 4]) + idm[1:]


def to_card_json(dump: FelicaDump) -> dict:
    """Our simulated-card file for the dump: a Lite-S card (``blocks``) when the dump has all 14
    user blocks of system 88B4, else a read-only FeliCa Standard card (``systems``) with every
    service's blocks from block 0 up to the first one missing (later ones cannot be served and
    are listed in ``notes``). ``scanned_at`` and ``source`` are kept for ``octopus balance``."""
    extra: dict[str, object] = {"source": dump.source_format}
    if dump.scanned_at is not None:
        extra["scanned_at"] = dump.scanned_at.astimezone(timezone.utc).isoformat()
    lite = dump.lite_s_blocks()
    if lite is not None:
        system = dump.system(SYSTEM_CODE_LITE_S)
        idm = system.idm if system and system.idm else dump.idm
        card = SimulatedLiteS(idm, dump.pmm, lite)
        return {**card.to_json(), **extra}
    if not dump.systems:
        raise DumpError("the dump holds no FeliCa system")
    systems = []
    for index, system in enumerate(dump.systems[:MAX_SYSTEMS]):
        services = {}
        for code, blocks in sorted(system.services.items()):
            run = []
            while len(run) in blocks:
                run.append(blocks[len(run)])
            if len(run) < len(blocks):
                dump.notes.append(f"system {system.system_code:04X} service {code:04X}: "
                                  f"{len(blocks) - len(run)} block(s) after a gap not served")
            services[code] = tuple(run)
        systems.append(SimulatedSystem(system.system_code, system.idm or system_idm(dump.idm, index),
                                       services))
    try:
        card = SimulatedFelicaStandard(systems, dump.pmm)
    except ValueError as error:
        raise DumpError(f"cannot make a card of the dump: {error}") from None
    return {**card.to_json(), **extra}


def from_card_json(obj: dict, path: Path) -> FelicaDump:
    try:
        card = card_from_json(obj)
    except CardFileError as error:
        raise DumpError(f"{path}: {error}") from None
    scanned_at = _iso_time(obj.get("scanned_at"), path)
    if isinstance(card, SimulatedLiteS):
        services = {SERVICE_LITE_S_RO: dict(enumerate(card.blocks))}
        systems = [DumpSystem(card.system_code, card.idm, services)]
    else:
        systems = [DumpSystem(s.system_code, s.idm, {code: dict(enumerate(blocks))
                                                       for code, blocks in s.services.items()})
                   for s in card.systems]
    return FelicaDump(card.idm, card.pmm, systems, scanned_at, FORMAT_CARD_FILE)


def _iso_time(value: object, path: Path) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DumpError(f"{path}: 'scanned_at' must be an ISO 8601 time")
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DumpError(f"{path}: 'scanned_at' is not an ISO 8601 time: {value[:40]!r}") from None
    if at.tzinfo is None:
        raise DumpError(f"{path}: 'scanned_at' needs a UTC offset")
    return at


# ---- reading a file -------------------------------------------------------------------------

def load_dump(path: str | Path) -> FelicaDump:
    """Any supported dump file (format found by its content)."""
    path = Path(path)
    try:
        data = read_limited(path, MAX_DUMP_BYTES)
    except UntrustedFileError as error:
        raise DumpError(str(error)) from None
    if data.lstrip().startswith(b"Filetype:"):
        return parse_flipper(data, path)
    obj = _lenient_json(data, path)
    if not isinstance(obj, dict):
        raise DumpError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    if "felica" in obj:
        return parse_metrodroid(obj, path)
    if "cards" in obj or obj.get("cardType") == "FeliCa":
        return parse_farebot(obj, path)
    if "idm" in obj and ("blocks" in obj or "systems" in obj):
        return from_card_json(obj, path)
    raise DumpError(f"{path}: not a dump this tool reads (a Flipper .nfc, Metrodroid or FareBot "
                    "JSON, or a farebox card file)")


_BARE_INT_KEY = re.compile(rb'([{,]\s*)(-?\d+)(\s*:)')


def _lenient_json(data: bytes, path: Path) -> object:
    try:
        return parse_json(data, path)
    except UntrustedFileError as error:
        # Metrodroid writes maps with integer keys unquoted ({3: {...}}): quote them and retry.
        if _BARE_INT_KEY.search(data):
            try:
                return parse_json(_BARE_INT_KEY.sub(rb'\1"\2"\3', data), path)
            except UntrustedFileError:
                pass
        raise DumpError(str(error)) from None


def _hex(value: object, what: str, path: Path, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise DumpError(f"{path}: {what} must be a hex string")
    text = value.replace(" ", "").replace(":", "")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise DumpError(f"{path}: {what} is not hex: {value[:40]!r}") from None
    if size is not None and len(data) != size:
        raise DumpError(f"{path}: {what} must be {size} bytes, got {len(data)}")
    return data


def _b64(value: object, what: str, path: Path, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise DumpError(f"{path}: {what} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DumpError(f"{path}: {what} is not base64: {value[:40]!r}") from None
    if size is not None and len(data) != size:
        raise DumpError(f"{path}: {what} must be {size} bytes, got {len(data)}")
    return data


def _code(value: object, what: str, path: Path) -> int:
    if isinstance(value, bool):
        raise DumpError(f"{path}: {what} must be a number")
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,6}", value):
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise DumpError(f"{path}: {what} must be a number 0..65535, got {str(value)[:20]!r}")
    return value


def _millis(value: object, path: Path) -> datetime | None:
    if isinstance(value, dict):
        value = value.get("timeInMillis")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**14:
        raise DumpError(f"{path}: scannedAt must be milliseconds since 1970")
    return datetime.fromtimestamp(value / 1000, timezone.utc)


def _bounded(items, limit: int, what: str, path: Path):
    if len(items) > limit:
        raise DumpError(f"{path}: more than {limit} {what}")
    return items


def parse_metrodroid(obj: dict, path: Path) -> FelicaDump:
    felica = obj["felica"]
    if not isinstance(felica, dict):
        raise DumpError(f"{path}: 'felica' must be an object")
    idm = _hex(obj.get("tagId", felica.get("iDm")), "tagId", path, IDM_SIZE)
    pmm_value = felica.get("pMm")
    pmm = _hex(pmm_value, "felica.pMm", path, PMM_SIZE) if pmm_value is not None else bytes(8)
    raw_systems = felica.get("systems", {})
    if not isinstance(raw_systems, dict):
        raise DumpError(f"{path}: felica.systems must be an object")
    systems = []
    for key, raw in _bounded(list(raw_systems.items()), MAX_SYSTEMS, "systems", path):
        code = _code(key, f"system code {key!r}", path)
        if not isinstance(raw, dict):
            raise DumpError(f"{path}: system {key} must be an object")
        system = DumpSystem(code)
        services = raw.get("services", {})
        if not isinstance(services, dict):
            raise DumpError(f"{path}: system {key}: services must be an object")
        for service_key, service in _bounded(list(services.items()), MAX_SERVICES, "services",
                                             path):
            service_code = _code(service_key, f"service code {service_key!r}", path)
            if not isinstance(service, dict):
                raise DumpError(f"{path}: service {service_key} must be an object")
            blocks = service.get("blocks", [])
            if not isinstance(blocks, list):
                raise DumpError(f"{path}: service {service_key}: blocks must be a list")
            if service.get("skipped") and not blocks:
                continue
            system.services[service_code] = _blocks(blocks, path, f"service {service_key}", _hex)
        systems.append(system)
    return FelicaDump(idm, pmm, systems, _millis(obj.get("scannedAt"), path), FORMAT_METRODROID)


def _blocks(blocks: list, path: Path, where: str, decode) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for position, block in enumerate(_bounded(blocks, MAX_BLOCKS_PER_SERVICE, "blocks", path)):
        if not isinstance(block, dict):
            raise DumpError(f"{path}: {where} block {position} must be an object")
        address = block.get("address", position)
        number = _code(address, f"{where} block address", path)
        out[number] = decode(block.get("data"), f"{where} block {number} data", path, BLOCK_SIZE)
    return out


def parse_farebot(obj: dict, path: Path) -> FelicaDump:
    card = obj
    if "cards" in obj:
        cards = obj["cards"]
        if not isinstance(cards, list):
            raise DumpError(f"{path}: 'cards' must be a list")
        card = next((c for c in cards if isinstance(c, dict) and c.get("cardType") == "FeliCa"),
                    None)
        if card is None:
            raise DumpError(f"{path}: the export holds no FeliCa card")
    idm = _b64(card.get("tagId"), "tagId", path, IDM_SIZE)
    pmm = bytes(8)
    pmm_obj = card.get("pmm")
    if isinstance(pmm_obj, dict):
        parts = [pmm_obj.get("icCode"), pmm_obj.get("maximumResponseTime")]
        if all(isinstance(p, list) and all(isinstance(b, int) and -128 <= b <= 255 for b in p)
               for p in parts) and sum(len(p) for p in parts) == PMM_SIZE:
            pmm = bytes(b & 0xFF for p in parts for b in p)
    raw_systems = card.get("systems", [])
    if not isinstance(raw_systems, list):
        raise DumpError(f"{path}: systems must be a list")
    systems = []
    for raw in _bounded(raw_systems, MAX_SYSTEMS, "systems", path):
        if not isinstance(raw, dict):
            raise DumpError(f"{path}: a system must be an object")
        system = DumpSystem(_code(raw.get("code"), "system code", path))
        services = raw.get("services", [])
        if not isinstance(services, list):
            raise DumpError(f"{path}: services must be a list")
        for service in _bounded(services, MAX_SERVICES, "services", path):
            if not isinstance(service, dict):
                raise DumpError(f"{path}: a service must be an object")
            code = _code(service.get("serviceCode"), "serviceCode", path)
            blocks = service.get("blocks", [])
            if not isinstance(blocks, list):
                raise DumpError(f"{path}: service {code}: blocks must be a list")
            system.services[code] = _blocks(blocks, path, f"service {code}", _b64)
        systems.append(system)
    return FelicaDump(idm, pmm, systems, _millis(card.get("scannedAt"), path), FORMAT_FAREBOT)


_FLIPPER_BLOCK = re.compile(
    r"\|\s*Service code ([0-9A-Fa-f]{4})\s*\|\s*Block index ([0-9A-Fa-f]{2})\s*\|\s*"
    r"Data:\s*((?:[0-9A-Fa-f]{2}\s*){16})\|?")


def parse_flipper(data: bytes, path: Path) -> FelicaDump:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DumpError(f"{path}: not a Flipper .nfc file (not UTF-8 text)") from None
    entries: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        entries.append((key.strip(), value.strip()))
    header = dict(entries[:8])
    if header.get("Filetype") != "Flipper NFC device":
        raise DumpError(f"{path}: not a Flipper NFC device file")
    values = {}
    for key, value in entries:
        values.setdefault(key, value)
    if values.get("Device type") != "FeliCa":
        raise DumpError(f"{path}: a Flipper {values.get('Device type', '?')} dump, not FeliCa")
    idm = _hex(values.get("Manufacture id", values.get("UID")), "Manufacture id", path, IDM_SIZE)
    pmm_text = values.get("Manufacture parameter")
    pmm = _hex(pmm_text, "Manufacture parameter", path, PMM_SIZE) if pmm_text else bytes(8)
    try:
        version = int(values.get("Data format version", "1"))
    except ValueError:
        raise DumpError(f"{path}: Data format version is not a number") from None
    systems: list[DumpSystem] = []
    if "System found" in values:  # FeliCa Standard (format 2 and later)
        current: DumpSystem | None = None
        for key, value in entries:
            if re.fullmatch(r"System [0-9A-Fa-f]{2}", key):
                code = int(_hex(value.split("|")[0].strip(), f"{key}", path, 2).hex(), 16)
                current = DumpSystem(code)
                if len(systems) >= MAX_SYSTEMS:
                    raise DumpError(f"{path}: more than {MAX_SYSTEMS} systems")
                systems.append(current)
            elif re.fullmatch(r"Block [0-9A-Fa-f]{4}", key):
                if current is None:
                    raise DumpError(f"{path}: {key} before any System line")
                match = _FLIPPER_BLOCK.search(value)
                if match is None:
                    raise DumpError(f"{path}: {key}: expected '| Service code XXXX | Block index "
                                    "NN | Data: 16 bytes |'")
                service, index, hex_data = (int(match[1], 16), int(match[2], 16),
                                            _hex(match[3], f"{key} data", path, BLOCK_SIZE))
                blocks = current.services.setdefault(service, {})
                _bounded(blocks, MAX_BLOCKS_PER_SERVICE, "blocks", path)[index] = hex_data
    else:  # the Lite layout: Block N = SF1 SF2 + 16 bytes; 0..13 are the user blocks
        blocks = {}
        for key, value in entries:
            match = re.fullmatch(r"Block (\d{1,3})", key)
            if match is None:
                continue
            number = int(match[1])
            raw = _hex(value, key, path, 2 + BLOCK_SIZE)
            if number < USER_BLOCKS and raw[0] == 0:
                blocks[number] = raw[2:]
        systems = [DumpSystem(SYSTEM_CODE_LITE_S, idm, {SERVICE_LITE_S_RO: blocks})]
    dump = FelicaDump(idm, pmm, systems, None, FORMAT_FLIPPER)
    dump.notes.append(f"Flipper data format {version}: the file has no scan time")
    return dump


# ---- reading a card on a reader -------------------------------------------------------------

def dump_from_reader(reader: Reader, now: datetime, *, timeout_s: float) -> FelicaDump:
    """Read the card presented to ``reader``: a Lite-S (system 88B4 answers) gives its 14 user
    blocks; any other FeliCa card its system codes, each system's services (Search Service
    Code, or Request Service over a few well-known codes when the card does not answer it) and
    every block of each key-less service that reads."""
    found = wait_for_card(reader, SYSTEM_CODE_WILDCARD, timeout_s)
    if found is None:
        raise DumpError(f"no card answered on {reader.name} within {timeout_s:g} s")
    session = FelicaSession(reader)
    session.activate(found)
    dump = FelicaDump(found.idm, found.pmm, [], now, FORMAT_READER)
    try:
        system_codes = session.request_system_codes()
    except (TransportTimeout, CardStatusError):
        system_codes = ()
        dump.notes.append("the card does not answer Request System Code")
    if not system_codes or SYSTEM_CODE_LITE_S in system_codes:
        try:
            lite = session.poll(SYSTEM_CODE_LITE_S)
        except TransportTimeout:
            lite = None
        if lite is not None:
            blocks = []
            for start in range(0, USER_BLOCKS, 4):
                blocks += session.read(SERVICE_LITE_S_RO, list(range(start, min(start + 4,
                                                                                 USER_BLOCKS))))
            dump.idm, dump.pmm = lite.idm, lite.pmm
            dump.systems.append(DumpSystem(SYSTEM_CODE_LITE_S, lite.idm,
                                           {SERVICE_LITE_S_RO: dict(enumerate(blocks))}))
            return dump
        if not system_codes:
            system_codes = tuple(code for code in WELL_KNOWN_SYSTEMS if _answers(session, code))
            if not system_codes:
                raise DumpError("the card answers neither Request System Code nor a Polling "
                                "for a Lite-S or a well-known system: nothing to dump")
            dump.notes.append("systems found by polling well-known system codes: "
                              + ", ".join(f"{code:04X}" for code in system_codes))
    for code in system_codes[:MAX_SYSTEMS]:
        answer = session.poll(code)
        system = DumpSystem(code, answer.idm)
        for service in _services(session, dump):
            if service_readable_without_key(service):
                blocks = _read_service(session, service)
                if blocks:
                    system.services[service] = blocks
        dump.systems.append(system)
    return dump


def _answers(session: FelicaSession, system_code: int) -> bool:
    try:
        session.poll(system_code)
    except TransportTimeout:
        return False
    return True


def _services(session: FelicaSession, dump: FelicaDump) -> list[int]:
    services = []
    try:
        for index in range(MAX_NODES_SEARCHED):
            code, area_end = session.search_service_code(index)
            if code == SEARCH_END:
                return services
            if area_end is None and not node_is_area(code):
                services.append(code)
        return services
    except (TransportTimeout, CardStatusError):
        dump.notes.append("the card does not answer Search Service Code: probed well-known "
                          "services only")
    versions = session.request_service(WELL_KNOWN_SERVICES)
    return [code for code, version in zip(WELL_KNOWN_SERVICES, versions) if version != 0xFFFF]


def _read_service(session: FelicaSession, service: int) -> dict[int, bytes]:
    """Every block from 0 until the card says there is no such block."""
    blocks: dict[int, bytes] = {}
    for number in range(MAX_BLOCKS_PER_SERVICE):
        try:
            blocks[number] = session.read(service, [number])[0]
        except CardStatusError:
            break
    return blocks


def dump_json(dump: FelicaDump) -> dict:
    """A summary for ``--json``: systems, services, blocks read."""
    return {
        "idm": dump.idm.hex(), "pmm": dump.pmm.hex(), "format": dump.source_format,
        "scanned_at": None if dump.scanned_at is None else
        dump.scanned_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
        "systems": [{"system_code": f"{s.system_code:04x}",
                     "idm": None if s.idm is None else s.idm.hex(),
                     "services": {f"{code:04x}": len(blocks)
                                  for code, blocks in sorted(s.services.items())}}
                    for s in dump.systems],
        "notes": list(dump.notes),
    }


__all__ = ["DumpError", "DumpSystem", "FelicaDump", "dump_from_reader", "dump_json",
           "from_card_json", "load_dump", "save_card_json", "to_card_json"]


def save_card_json(obj: dict, path: str | Path, *, force: bool = False) -> None:
    """Write a card file (atomically); an existing file is replaced only with ``force``."""
    from farebox.terminal.store.identity import write_atomically

    path = Path(path)
    if path.exists() and not force:
        raise DumpError(f"{path} exists (give --force to replace it)")
    if not path.parent.is_dir():
        raise DumpError(f"{path.parent}: no such directory")
    try:
        card_from_json(obj)  # what we write must load back
        write_atomically(path, json.dumps(obj, indent=2) + "\n")
    except CardFileError as error:
        raise DumpError(f"cannot make a card file: {error}") from None
    except OSError as error:
        raise DumpError(f"{path}: cannot write ({error.strerror})") from None
