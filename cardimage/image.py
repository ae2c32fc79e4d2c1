"""Encode and decode the whole card image. MACs are verified over raw bytes before any field is
parsed; the current purse is the valid slot with the higher counter."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from farebox.cardimage import schemas
from farebox.cardimage.errors import CardImageError, IntegrityError, InvalidCard
from farebox.cardimage.layout import (
    AREA_IDENTITY, AREA_LOG, AREA_PURSE, BLOCK_SIZE, IDENTITY_BLOCKS, LOG_BLOCKS, LOG_ENTRIES,
    MAC_SIZE, PURSE_SLOT_BLOCKS, USER_BLOCKS, log_block_for,
)
from farebox.cardimage.mac import area_mac, verify_area_mac
from farebox.cardimage.model import (
    AAVS_BY_CODE, AAVS_CODE_BY_CENTS, CARD_NUMBER_MAX, COUNTER_MAX, FORMAT_VERSION_BIRTH_DATE,
    FORMAT_VERSIONS, CardImage, Identity,
    LogEntry, LogType, Purse, ServiceOp, Status,
)

#: key version -> this card's diversified key; raises KeyError for a version the terminal lacks.
CardKeyFor = Callable[[int], bytes]
Blocks = Mapping[int, bytes]


def _join(blocks: Blocks, numbers: tuple[int, ...]) -> bytes:
    try:
        raw = b"".join(blocks[n] for n in numbers)
    except KeyError as missing:
        raise CardImageError(f"block {missing} was not read") from None
    if len(raw) != BLOCK_SIZE * len(numbers):
        raise CardImageError(f"blocks {numbers} are not {BLOCK_SIZE} bytes each")
    return raw


def _split(raw: bytes, numbers: tuple[int, ...]) -> dict[int, bytes]:
    return {n: raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i, n in enumerate(numbers)}


def _seal(card_key: bytes, area: int, key_version: int, idm: bytes, numbers: tuple[int, ...],
          data: bytes) -> dict[int, bytes]:
    mac = area_mac(card_key, area, key_version, idm, numbers, data)
    return _split(data + mac, numbers)


def _open(blocks: Blocks, card_key: bytes, area: int, key_version: int, idm: bytes,
          numbers: tuple[int, ...]) -> bytes:
    raw = _join(blocks, numbers)
    data, mac = raw[:-MAC_SIZE], raw[-MAC_SIZE:]
    if not verify_area_mac(card_key, area, key_version, idm, numbers, data, mac):
        raise IntegrityError(f"MAC of blocks {numbers} does not verify")
    return data


# ---- identity -------------------------------------------------------------------------------

def encode_identity(identity: Identity, idm: bytes, card_key: bytes) -> dict[int, bytes]:
    _check_identity(identity)
    data = schemas.build(schemas.Identity, {**identity.__dict__, "reserved": None,
                                            "format_version": identity.format_version})
    return _seal(card_key, AREA_IDENTITY, identity.key_version, idm, IDENTITY_BLOCKS, data)


def decode_identity(blocks: Blocks, idm: bytes, card_key_for: CardKeyFor) -> tuple[Identity, bytes]:
    """The verified identity and the card key that verified it."""
    raw = _join(blocks, IDENTITY_BLOCKS)
    key_version = raw[schemas.IDENTITY_KEY_VERSION_OFFSET]
    try:
        card_key = card_key_for(key_version)
    except KeyError:
        raise InvalidCard(f"no key for key version {key_version}") from None
    data = _open(blocks, card_key, AREA_IDENTITY, key_version, idm, IDENTITY_BLOCKS)
    if data[0] not in FORMAT_VERSIONS:  # before the version-dependent fields are parsed
        raise CardImageError(f"unknown image format version {data[0]}")
    fields = schemas.parse(schemas.Identity, data)
    identity = Identity(
        card_number=fields.card_number, kind=fields.kind, category=fields.category,
        issued=fields.issued, deposit_cents=fields.deposit_cents, key_version=fields.key_version,
        birth_date=fields.birth_date if fields.format_version == FORMAT_VERSION_BIRTH_DATE
        else None,
    )
    _check_identity(identity)
    return identity, card_key


def _check_identity(identity: Identity) -> None:
    if not 0 <= identity.card_number <= CARD_NUMBER_MAX:
        raise CardImageError(f"card number {identity.card_number} has more than 8 digits")
    if identity.issued is None:
        raise CardImageError("identity has no issue date")


# ---- purse ----------------------------------------------------------------------------------

def encode_purse(purse: Purse, slot: int, idm: bytes, card_key: bytes,
                 key_version: int) -> dict[int, bytes]:
    _check_purse(purse)
    data = schemas.build(schemas.Purse, purse.__dict__)
    return _seal(card_key, AREA_PURSE, key_version, idm, PURSE_SLOT_BLOCKS[slot], data)


def decode_purse(blocks: Blocks, slot: int, idm: bytes, card_key: bytes, key_version: int) -> Purse:
    data = _open(blocks, card_key, AREA_PURSE, key_version, idm, PURSE_SLOT_BLOCKS[slot])
    purse = Purse(**schemas.unpack(schemas.Purse, data))
    _check_purse(purse)
    return purse


def _check_purse(purse: Purse) -> None:
    if not 1 <= purse.counter <= COUNTER_MAX:
        raise CardImageError(f"purse counter {purse.counter} is outside 1..{COUNTER_MAX}")
    if purse.last_add_value is None:
        raise CardImageError("purse has no last add value date")


# ---- log ------------------------------------------------------------------------------------

def encode_log_entry(entry: LogEntry, idm: bytes, card_key: bytes, key_version: int) -> dict[int, bytes]:
    if entry.type is LogType.PAYMENT:
        detail = AAVS_CODE_BY_CENTS.get(entry.aavs_reload_cents)
        if detail is None:
            raise CardImageError(f"{entry.aavs_reload_cents} cents is not an AAVS reload amount")
    elif entry.type is LogType.STATUS:
        detail = int(entry.new_status)
    elif entry.type is LogType.SERVICE:
        if entry.operation is None:
            raise CardImageError("a service log entry needs its operation")
        detail = int(entry.operation)
    else:
        detail = 0
    data = schemas.build(schemas.LogEntry, {
        "counter_low": entry.counter & 0xFF, "type": entry.type, "detail": detail,
        "amount_cents": entry.amount_cents, "day": entry.day,
    })
    block = log_block_for(entry.counter)
    return _seal(card_key, AREA_LOG, key_version, idm, (block,), data)


def _expected_counter(block: int, current_counter: int) -> int:
    """The newest counter <= current whose log entry lives in ``block``."""
    return current_counter - (current_counter - block) % LOG_ENTRIES


def decode_log(blocks: Blocks, idm: bytes, card_key: bytes, key_version: int,
               current_counter: int) -> tuple[tuple[LogEntry, ...], int]:
    """Entries that verify and belong to the last six counters (newest first), and the number of
    non-empty blocks that did not verify. Entries left over from before a torn write are dropped."""
    entries: list[LogEntry] = []
    unreadable = 0
    for block in LOG_BLOCKS:
        if block not in blocks or blocks[block] == bytes(BLOCK_SIZE):
            continue
        try:
            data = _open(blocks, card_key, AREA_LOG, key_version, idm, (block,))
            fields = schemas.unpack(schemas.LogEntry, data)
            entry = _log_entry(fields, _expected_counter(block, current_counter))
        except CardImageError:
            unreadable += 1
            continue
        if entry is not None:
            entries.append(entry)
    entries.sort(key=lambda e: e.counter, reverse=True)
    return tuple(entries), unreadable


def _log_entry(fields, counter: int) -> LogEntry | None:
    if counter < 1 or fields["counter_low"] != counter & 0xFF:
        return None  # stale: the write for ``counter`` never reached this block
    if fields["day"] is None:
        raise CardImageError("log entry has no date")
    aavs = 0
    status = operation = None
    kind, detail = fields["type"], fields["detail"]
    if kind is LogType.PAYMENT:
        if detail not in AAVS_BY_CODE:
            raise CardImageError(f"no AAVS reload amount with code {detail}")
        aavs = AAVS_BY_CODE[detail]
    elif kind is LogType.STATUS:
        try:
            status = Status(detail)
        except ValueError:
            raise CardImageError(f"no status {detail}") from None
    elif kind is LogType.SERVICE:
        try:
            operation = ServiceOp(detail)
        except ValueError:
            raise CardImageError(f"no service operation {detail}") from None
    return LogEntry(counter=counter, type=kind, day=fields["day"],
                    amount_cents=fields["amount_cents"], aavs_reload_cents=aavs,
                    new_status=status, operation=operation)


# ---- whole image ----------------------------------------------------------------------------

def decode_image(blocks: Blocks, idm: bytes, card_key_for: CardKeyFor) -> CardImage:
    """Verify and decode what was read. Raises InvalidCard unless the identity and at least one
    purse slot verify. The log is decoded from whichever log blocks are present."""
    try:
        identity, card_key = decode_identity(blocks, idm, card_key_for)
    except InvalidCard:
        raise
    except CardImageError as error:
        raise InvalidCard(f"identity: {error}") from None
    slots: list[tuple[Purse, int]] = []
    problems = []
    for slot in (0, 1):
        try:
            slots.append((decode_purse(blocks, slot, idm, card_key, identity.key_version), slot))
        except CardImageError as error:
            problems.append(f"slot {slot}: {error}")
    if not slots:
        raise InvalidCard("no valid purse (" + "; ".join(problems) + ")")
    slots.sort(key=lambda item: item[0].counter, reverse=True)
    (purse, slot), previous = slots[0], (slots[1][0] if len(slots) > 1 else None)
    if previous is not None and previous.counter == purse.counter:
        raise InvalidCard(f"both purse slots carry counter {purse.counter}")
    log, unreadable = decode_log(blocks, idm, card_key, identity.key_version, purse.counter)
    return CardImage(idm=idm, identity=identity, purse=purse, purse_slot=slot, previous=previous,
                     log=log, unreadable_log_blocks=unreadable)


def change_blocks(image: CardImage, new_purse: Purse, entry: LogEntry,
                  card_key: bytes) -> list[tuple[int, bytes]]:
    """The block writes, in order, that move ``image`` to ``new_purse``: the other purse slot,
    then the log entry. Until the second purse block lands the old slot stays current."""
    if new_purse.counter != image.purse.counter + 1 or entry.counter != new_purse.counter:
        raise ValueError("a change must advance the counter by exactly one")
    version = image.identity.key_version
    slot = 1 - image.purse_slot
    writes = encode_purse(new_purse, slot, image.idm, card_key, version)
    writes.update(encode_log_entry(entry, image.idm, card_key, version))
    return list(writes.items())


def new_card_blocks(identity: Identity, purse: Purse, entry: LogEntry, idm: bytes,
                    card_key: bytes) -> list[bytes]:
    """All 14 user blocks of a freshly issued card: purse in slot 0, slot 1 empty."""
    if purse.counter != 1 or entry.counter != 1:
        raise ValueError("a new card starts at counter 1")
    blocks = {n: bytes(BLOCK_SIZE) for n in range(USER_BLOCKS)}
    blocks.update(encode_identity(identity, idm, card_key))
    blocks.update(encode_purse(purse, 0, idm, card_key, identity.key_version))
    blocks.update(encode_log_entry(entry, idm, card_key, identity.key_version))
    return [blocks[n] for n in range(USER_BLOCKS)]

