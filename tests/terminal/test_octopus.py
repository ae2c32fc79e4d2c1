"""The Octopus balance against the public decoders' published test vectors, the offset rule at
its edges, and the same reading through every path: dumps in each format (written here the way
those tools write them) and the reader path over the in-process simulated card.

Published vectors (balance block 0 of service 0x0117 in system 0x8008, scan time, balance):

- Metrodroid ``src/commonTest/kotlin/au/id/micolous/metrodroid/test/OctopusTest.kt``
  (metrodroid/metrodroid): ``test2018Card`` and ``test2016Card``;
- FareBot's Kotlin port of the same test (``OctopusTransitTest``, codebutler/farebot), which
  carries the identical two vectors with the arithmetic spelled out (356 - 500, 338 - 350).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from farebox.protocol.sim.card import SimulatedFelicaStandard, SimulatedSystem
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.ops import octopus
from farebox.terminal.core.clock import HONG_KONG
from farebox.terminal.ops.dumps import load_dump

UTC = timezone.utc
SWITCH = datetime(2017, 10, 1, 0, 0, tzinfo=HONG_KONG)

#: (source, block 0 hex, scanned at, expected balance in cents)
PUBLISHED_VECTORS = [
    ("Metrodroid OctopusTest.test2018Card", "00000164000000000000000000000021",
     datetime(2017, 10, 2, 0, 0, tzinfo=UTC), -1440),
    ("Metrodroid OctopusTest.test2016Card", "000001520000000000000000000086B1",
     datetime(2016, 1, 1, 0, 0, tzinfo=UTC), -120),
    ("FareBot OctopusTransitTest.test2018Card", "00000164000000000000000000000021",
     datetime(2017, 10, 2, 0, 0, tzinfo=UTC), -1440),
    ("FareBot OctopusTransitTest.test2016Card", "000001520000000000000000000086B1",
     datetime(2016, 1, 1, 0, 0, tzinfo=UTC), -120),
]
IDS = [v[0] for v in PUBLISHED_VECTORS]


@pytest.mark.parametrize(("source", "block_hex", "scanned_at", "cents"), PUBLISHED_VECTORS,
                         ids=IDS)
def test_published_vectors(source, block_hex, scanned_at, cents):
    result = octopus.reading(bytes.fromhex(block_hex), scanned_at, octopus.SCAN_TIME_FROM_DUMP)
    assert result.balance_cents == cents, source
    assert result.other is None  # neither vector is near the switch


@pytest.mark.parametrize(("at", "offset"), [
    (SWITCH - timedelta(microseconds=1), 350),
    (SWITCH, 350),  # the decoders switch strictly after the instant (scanTime > start)
    (SWITCH + timedelta(microseconds=1), 500),
    (datetime(1997, 9, 1, tzinfo=HONG_KONG), 350),
    (datetime(2026, 11, 22, tzinfo=HONG_KONG), 500),
])
def test_offset_rule_at_its_edges(at, offset):
    assert octopus.offset_at(at) == offset


def test_offset_needs_an_aware_time():
    with pytest.raises(ValueError):
        octopus.offset_at(datetime(2017, 10, 2))


def test_a_scan_near_the_switch_gives_the_other_reading():
    block = bytes.fromhex("000001f4" + "00" * 12)  # raw 500
    near = octopus.reading(block, SWITCH + timedelta(hours=3), octopus.SCAN_TIME_FROM_DUMP)
    assert (near.offset, near.balance_cents) == (500, 0)
    assert near.other == octopus.OtherReading(350, 1500)
    assert "offset change" in near.ambiguous_because
    before = octopus.reading(block, SWITCH - timedelta(hours=3), octopus.SCAN_TIME_FROM_DUMP)
    assert (before.offset, before.balance_cents, before.other.offset) == (350, 1500, 500)
    far = octopus.reading(block, SWITCH + timedelta(days=2), octopus.SCAN_TIME_FROM_DUMP)
    assert far.other is None and far.ambiguous_because is None


def test_an_unknown_scan_time_is_ambiguous_and_a_forced_offset_is_not():
    block = bytes.fromhex("00000164" + "00" * 12)
    now = datetime(2026, 11, 22, tzinfo=UTC)
    assumed = octopus.reading(block, now, octopus.SCAN_TIME_ASSUMED_NOW)
    assert assumed.balance_cents == -1440 and assumed.other.balance_cents == 60
    forced = octopus.reading(block, now, octopus.SCAN_TIME_ASSUMED_NOW, forced_offset=350)
    assert (forced.offset, forced.balance_cents, forced.other) == (350, 60, None)


def test_a_block_of_the_wrong_size_is_refused():
    with pytest.raises(octopus.OctopusError):
        octopus.reading(b"\x00" * 15, SWITCH, octopus.SCAN_TIME_FROM_DUMP)


# ---- the vectors through each dump format --------------------------------------------------

IDM = bytes.fromhex("0110f3c2a5b6c7d8")
PMM = bytes.fromhex("100b4b428485d0ff")


def _millis(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def write_metrodroid(path: Path, block_hex: str, scanned_at: datetime) -> Path:
    """Metrodroid's JSON as it writes it: bare integer map keys, hex data."""
    text = ('{"tagId": "%s", "scannedAt": {"timeInMillis": %d, "tz": "Asia/Hong_Kong"}, '
            '"felica": {"pMm": "%s", "systems": {32776: {"services": {279: {"blocks": '
            '[{"data": "%s"}]}, 4107: {"blocks": [{"data": "%s"}]}}}}}}'
            % (IDM.hex(), _millis(scanned_at), PMM.hex(), block_hex.lower(), "00" * 16))
    path.write_text(text, encoding="utf-8")
    return path


def write_farebot(path: Path, block_hex: str, scanned_at: datetime) -> Path:
    """FareBot's export: a ``cards`` list, base64 data, numeric codes."""
    card = {"cardType": "FeliCa", "tagId": base64.b64encode(IDM).decode(),
            "scannedAt": _millis(scanned_at),
            "pmm": {"icCode": [0x10, 0x0B], "maximumResponseTime": [0x4B, 0x42, 0x84, 0x85,
                                                                    -48, -1]},
            "systems": [{"code": 0x8008, "services": [
                {"serviceCode": 0x0117, "blocks": [
                    {"address": 0, "data": base64.b64encode(bytes.fromhex(block_hex)).decode()}]}
            ]}]}
    path.write_text(json.dumps({"versionName": "3.0", "cards": [card]}), encoding="utf-8")
    return path


def write_flipper(path: Path, block_hex: str) -> Path:
    """Flipper Zero's FeliCa Standard layout (data format 4)."""
    spaced = " ".join(f"{b:02X}" for b in bytes.fromhex(block_hex))
    idm = " ".join(f"{b:02X}" for b in IDM)
    pmm = " ".join(f"{b:02X}" for b in PMM)
    path.write_text("\n".join([
        "Filetype: Flipper NFC device", "Version: 4",
        "# Device type can be ISO14443-3A, ISO14443-3B, ISO14443-4A, ISO15693-3, FeliCa, ...",
        "Device type: FeliCa", "# UID is common for all formats", f"UID: {idm}",
        "# FeliCa specific data", "Data format version: 4", f"Manufacture id: {idm}",
        f"Manufacture parameter: {pmm}", "IC Type: FeliCa Standard RC-S9X4, Japan Transit IC",
        "", "# Felica Standard specific data", "System found: 1", "", "",
        "System 00: 8008 | Key version 0000 |", "", "Area found: 1",
        "Area 000: | Code 0000 | End FFFE | Services #000-#001 | Key version 0000 |", "",
        "Service found: 2",
        "Service 000: | Code 0117 | Attrib. 17 | Public  | Purse | Read Only  | Key version 0000 |",
        "Service 001: | Code 100B | Attrib. 0B | Public  | Random | Read Only  | Key version 0000 |",
        "", "Directory Tree: ", "+++ ... are public services", "||| ... are private services",
        "- AREA_0000/", "+- serv_0117", "+- serv_100B",
        "Public blocks read: 2",
        f"Block 0000: | Service code 0117 | Block index 00 | Data: {spaced} |",
        "Block 0001: | Service code 100B | Block index 00 | Data: " + "00 " * 16 + "|", ""]),
        encoding="utf-8")
    return path


@pytest.mark.parametrize(("source", "block_hex", "scanned_at", "cents"), PUBLISHED_VECTORS[:2],
                         ids=IDS[:2])
@pytest.mark.parametrize("writer", [write_metrodroid, write_farebot])
def test_vectors_through_json_dumps(tmp_path, writer, source, block_hex, scanned_at, cents):
    dumped = load_dump(writer(tmp_path / "dump.json", block_hex, scanned_at))
    assert dumped.idm == IDM and dumped.pmm == PMM and dumped.scanned_at == scanned_at
    block = dumped.block(octopus.SYSTEM_CODE_OCTOPUS, octopus.SERVICE_OCTOPUS_BALANCE, 0)
    result = octopus.reading(block, dumped.scanned_at, octopus.SCAN_TIME_FROM_DUMP)
    assert result.balance_cents == cents


def test_a_flipper_dump_has_no_scan_time(tmp_path):
    dumped = load_dump(write_flipper(tmp_path / "card.nfc", "00000164" + "00" * 12))
    assert dumped.scanned_at is None and dumped.pmm == PMM
    block = dumped.block(octopus.SYSTEM_CODE_OCTOPUS, octopus.SERVICE_OCTOPUS_BALANCE, 0)
    at = datetime(2017, 10, 2, tzinfo=UTC)
    assert octopus.reading(block, at, octopus.SCAN_TIME_FROM_FLAG).balance_cents == -1440


# ---- the reader path, in process -----------------------------------------------------------

def octopus_card(block_hex: str, *, dual: bool = False) -> SimulatedFelicaStandard:
    systems = [SimulatedSystem(0x8008, IDM, {0x0117: (bytes.fromhex(block_hex),),
                                             0x100B: (bytes(16),)})]
    if dual:
        systems.append(SimulatedSystem(0x8005, bytes([0x10 | IDM[0] & 0x0F]) + IDM[1:],
                                       {0x0118: (bytes.fromhex("0000015e" + "00" * 12),)}))
    return SimulatedFelicaStandard(systems, PMM)


@pytest.mark.parametrize(("source", "block_hex", "scanned_at", "cents"), PUBLISHED_VECTORS[:2],
                         ids=IDS[:2])
def test_vectors_read_from_a_simulated_card(source, block_hex, scanned_at, cents):
    transport = InProcessTransport(octopus_card(block_hex))
    result = octopus.read_from_reader(transport, scanned_at, timeout_s=0.1)
    assert result.balance_cents == cents and result.idm == IDM
    assert result.scan_time_source == octopus.SCAN_TIME_READ_NOW
    assert result.shenzhen_tong_cents is None


def test_an_older_card_that_ignores_request_system_code_is_read():
    card = octopus_card("00000152" + "00" * 12)
    card.answers_discovery = False  # polled for 0x8008 directly, as the decoders advise
    result = octopus.read_from_reader(InProcessTransport(card),
                                      datetime(2016, 1, 1, tzinfo=UTC), timeout_s=0.1)
    assert result.balance_cents == -120


def test_a_dual_card_also_gives_its_shenzhen_tong_purse():
    transport = InProcessTransport(octopus_card("00000164" + "00" * 12, dual=True))
    result = octopus.read_from_reader(transport, datetime(2026, 1, 1, tzinfo=UTC), timeout_s=0.1)
    assert result.balance_cents == -1440
    assert result.shenzhen_tong_cents == (0x15E - 350) * 10


def test_no_octopus_card_on_the_reader():
    other = SimulatedFelicaStandard([SimulatedSystem(0x0003, IDM, {0x090F: (bytes(16),)})], PMM)
    with pytest.raises(octopus.OctopusError, match="no Octopus card"):
        octopus.read_from_reader(InProcessTransport(other), SWITCH, timeout_s=0.1)
