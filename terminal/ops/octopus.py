"""The read-only balance of a real Octopus card (docs/readers.md, "Real Octopus cards").

System 0x8008, service 0x0117 (readable without a key), block 0: bytes 0-3 big-endian in units
of HK$0.10, stored with an offset; balance = (value - offset) x 10 cents. The offset is 350 for
cards scanned up to 2017-10-01 00:00 Hong Kong time and 500 after it (the negative value limit
changed that day). The public decoders (Metrodroid ``OctopusData.getOctopusOffset``, FareBot's
port of it) key the offset on the *scan* time, strictly after the switch instant; so does this.
Real cards disagree (a card not used since the switch may still carry the old offset), so the
offset can be forced, and a reading whose scan time is unknown or within a day of the switch
also gives the reading under the other offset.

Shenzhen Tong dual cards: system 0x8005, service 0x0118, always offset 350 (as the decoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from farebox.protocol.errors import FelicaError
from farebox.protocol.frames import (
    SERVICE_OCTOPUS_BALANCE, SERVICE_SHENZHEN_TONG_BALANCE, SYSTEM_CODE_OCTOPUS,
    SYSTEM_CODE_SHENZHEN_TONG,
)
from farebox.protocol.reader import Reader
from farebox.protocol.session import FelicaSession

from farebox.terminal.card.present import wait_for_card
from farebox.terminal.core.clock import HONG_KONG, require_aware
from farebox.terminal.errors import BadInput

ORIGINAL_OFFSET = 350
#: (instant, offset in force for scans strictly after it)
OFFSET_CHANGES: tuple[tuple[datetime, int], ...] = (
    (datetime(2017, 10, 1, 0, 0, tzinfo=HONG_KONG), 500),
)
SHENZHEN_TONG_OFFSET = 350
#: a scan this close to an offset change is ambiguous (a dump's clock or time zone may be off)
AMBIGUITY_WINDOW = timedelta(days=1)

#: how the scan time was known
SCAN_TIME_FROM_DUMP = "dump"
SCAN_TIME_FROM_FLAG = "--at"
SCAN_TIME_READ_NOW = "read now"
SCAN_TIME_ASSUMED_NOW = "assumed now (the dump has no scan time)"


class OctopusError(BadInput, ValueError):
    """No Octopus purse where one should be; the message is one line."""


def offset_at(scanned_at: datetime) -> int:
    """The decoders' offset for a card scanned at ``scanned_at``."""
    require_aware(scanned_at)
    offset = ORIGINAL_OFFSET
    for start, value in OFFSET_CHANGES:
        if scanned_at > start:
            offset = value
    return offset


def raw_value(block: bytes) -> int:
    if len(block) != 16:
        raise OctopusError(f"the balance block must be 16 bytes, got {len(block)}")
    return int.from_bytes(block[0:4], "big")


def balance_cents(raw: int, offset: int) -> int:
    return (raw - offset) * 10


@dataclass(frozen=True)
class OtherReading:
    offset: int
    balance_cents: int


@dataclass(frozen=True)
class OctopusReading:
    raw: int
    offset: int
    balance_cents: int
    scanned_at: datetime
    scan_time_source: str
    offset_rule: str
    other: OtherReading | None  # the reading under the other offset when the date is ambiguous
    ambiguous_because: str | None
    idm: bytes | None = None
    shenzhen_tong_cents: int | None = None


def _ambiguity(scanned_at: datetime, source: str) -> str | None:
    if source == SCAN_TIME_ASSUMED_NOW:
        return "the dump does not say when it was scanned (give --at)"
    for start, _ in OFFSET_CHANGES:
        if abs(scanned_at - start) < AMBIGUITY_WINDOW:
            return f"scanned within {AMBIGUITY_WINDOW.days} day of the offset change at " \
                   f"{start.isoformat()}"
    return None


def reading(block: bytes, scanned_at: datetime, source: str, *, forced_offset: int | None = None,
            idm: bytes | None = None, shenzhen_block: bytes | None = None) -> OctopusReading:
    """Decode the balance block read (or dumped) at ``scanned_at``."""
    require_aware(scanned_at)
    raw = raw_value(block)
    decoders_offset = offset_at(scanned_at)
    if forced_offset is not None:
        offset, rule = forced_offset, f"offset {forced_offset} forced (--offset)"
    else:
        offset = decoders_offset
        rule = (f"offset {offset}: scanned {'after' if offset != ORIGINAL_OFFSET else 'up to'} "
                f"{OFFSET_CHANGES[0][0].strftime('%Y-%m-%d %H:%M')} Hong Kong time "
                "(Metrodroid/FareBot rule)")
    because = _ambiguity(scanned_at, source) if forced_offset is None else None
    other = None
    if because is not None:
        other_offset = ORIGINAL_OFFSET if offset != ORIGINAL_OFFSET else OFFSET_CHANGES[-1][1]
        other = OtherReading(other_offset, balance_cents(raw, other_offset))
    shenzhen = None
    if shenzhen_block is not None:
        shenzhen = balance_cents(raw_value(shenzhen_block), SHENZHEN_TONG_OFFSET)
    return OctopusReading(raw, offset, balance_cents(raw, offset), scanned_at, source, rule,
                          other, because, idm, shenzhen)


def read_from_reader(reader: Reader, now: datetime, *, timeout_s: float,
                     forced_offset: int | None = None,
                     source: str = SCAN_TIME_READ_NOW) -> OctopusReading:
    """Poll system 0x8008 directly (older cards may not answer Request System Code) and read
    service 0x0117 block 0 with Read Without Encryption. Raises OctopusError when no Octopus
    card answers, FelicaError when it stops answering."""
    found = wait_for_card(reader, SYSTEM_CODE_OCTOPUS, timeout_s)
    if found is None:
        raise OctopusError(f"no Octopus card (system {SYSTEM_CODE_OCTOPUS:04X}) answered on "
                           f"{reader.name} within {timeout_s:g} s")
    session = FelicaSession(reader)
    session.activate(found)
    block = session.read(SERVICE_OCTOPUS_BALANCE, [0])[0]
    shenzhen = None
    try:  # a dual card's other purse: through the same activated card, a Polling for 0x8005
        session.poll(SYSTEM_CODE_SHENZHEN_TONG)
        shenzhen = session.read(SERVICE_SHENZHEN_TONG_BALANCE, [0])[0]
    except FelicaError:
        pass
    return reading(block, now, source, forced_offset=forced_offset, idm=found.idm,
                   shenzhen_block=shenzhen)
