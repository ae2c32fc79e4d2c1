"""construct schemas of the scheme's card areas (field bytes only; MACs are handled in image.py).

Each schema is exactly the data part of its area; sizes are asserted against the block layout.
Adapters are pure and two-way: day numbers <-> dates, small ints <-> enums, AAVS codes <-> cents.
"""

import struct
from datetime import date
from enum import IntEnum

import construct as c

from farebox.cardimage import days
from farebox.cardimage.errors import CardImageError
from farebox.cardimage.layout import BLOCK_SIZE, MAC_SIZE
from farebox.cardimage.model import (
    AAVS_BY_CODE, AAVS_CODE_BY_CENTS, FORMAT_VERSION_BIRTH_DATE, Category, Concession, Kind,
    LogType, Status,
)


class DayAdapter(c.Adapter):
    """u16 days since 1990-01-01; 0 means none."""

    def _decode(self, obj, context, path):
        return days.from_day(obj)

    def _encode(self, obj, context, path):
        try:
            return days.to_day(obj)
        except ValueError as error:
            raise c.ExplicitError(str(error), path=path) from None


class EnumAdapter(c.Adapter):
    def __init__(self, subcon, enum: type[IntEnum]):
        super().__init__(subcon)
        self.enum = enum

    def _decode(self, obj, context, path):
        try:
            return self.enum(obj)
        except ValueError:
            raise c.MappingError(f"no {self.enum.__name__} with value {obj}", path=path) from None

    def _encode(self, obj, context, path):
        return int(self.enum(obj))


class AavsAdapter(c.Adapter):
    """AAVS reload amount: 4-bit code on the card, cents in the model (0 = no AAVS)."""

    def _decode(self, obj, context, path):
        try:
            return AAVS_BY_CODE[obj]
        except KeyError:
            raise c.MappingError(f"no AAVS reload amount with code {obj}", path=path) from None

    def _encode(self, obj, context, path):
        try:
            return AAVS_CODE_BY_CENTS[obj]
        except KeyError:
            raise c.MappingError(f"{obj} cents is not an AAVS reload amount", path=path) from None


class BirthDateAdapter(c.Adapter):
    """The holder's birth date as year (u16), month (u8), day (u8): a birth date may be long
    before the day numbers' 1990 epoch. Only a version 2 identity carries it (always a date
    there); in version 1 the same four bytes are reserved zeros, read as None."""

    def _decode(self, obj, context, path):
        if context.format_version != FORMAT_VERSION_BIRTH_DATE:
            if obj:
                raise c.MappingError("reserved bytes are not zero", path=path)
            return None
        try:
            return date(obj >> 16, (obj >> 8) & 0xFF, obj & 0xFF)
        except ValueError:
            raise c.MappingError(f"no birth date {obj:08x}", path=path) from None

    def _encode(self, obj, context, path):
        if context.format_version != FORMAT_VERSION_BIRTH_DATE:
            if obj is not None:
                raise c.MappingError("a birth date needs format version 2", path=path)
            return 0
        if not isinstance(obj, date):
            raise c.MappingError("format version 2 needs a birth date", path=path)
        return obj.year << 16 | obj.month << 8 | obj.day


class StrictFlag(c.Adapter):
    """A byte that is exactly 0 or 1 (construct's Flag reads any non-zero byte as true)."""

    def _decode(self, obj, context, path):
        if obj not in (0, 1):
            raise c.MappingError(f"flag byte must be 0 or 1, not {obj}", path=path)
        return bool(obj)

    def _encode(self, obj, context, path):
        return int(bool(obj))


AREA_DATA_2_BLOCKS = 2 * BLOCK_SIZE - MAC_SIZE  # 24
AREA_DATA_1_BLOCK = BLOCK_SIZE - MAC_SIZE  # 8

Identity = c.Struct(
    "format_version" / c.Int8ub,
    "key_version" / c.Int8ub,  # offset 1: read before verification to pick the key
    "card_number" / c.Int32ub,
    "kind" / EnumAdapter(c.Int8ub, Kind),
    "category" / EnumAdapter(c.Int8ub, Category),
    "issued" / DayAdapter(c.Int16ub),
    "deposit_cents" / c.Int32ub,
    # format version 2 only; in version 1 four more reserved zero bytes, so cards made before
    # the field existed read as "no birth date"
    "birth_date" / BirthDateAdapter(c.Int32ub),
    "reserved" / c.Const(bytes(6)),
)
IDENTITY_KEY_VERSION_OFFSET = 1

Purse = c.Struct(
    "counter" / c.Int32ub,
    "balance_cents" / c.Int32sb,
    "last_add_value" / DayAdapter(c.Int16ub),
    "last_auto_reload" / DayAdapter(c.Int16ub),
    "last_payment" / DayAdapter(c.Int16ub),
    "aavs_reload_cents" / AavsAdapter(c.Int8ub),
    "status" / EnumAdapter(c.Int8ub, Status),
    "payment_count" / c.Int16ub,
    "concession" / EnumAdapter(c.Int8ub, Concession),
    "concession_expiry" / DayAdapter(c.Int16ub),
    "svl_upgraded" / StrictFlag(c.Int8ub),
    "aavs_ever_enabled" / StrictFlag(c.Int8ub),  # was a reserved zero byte: old cards read False
    "reserved" / c.Const(bytes(1)),
)

LogEntry = c.Struct(
    "counter_low" / c.Int8ub,  # the purse counter this entry belongs to, modulo 256
    "type" / EnumAdapter(c.Int8ub, LogType),
    "detail" / c.Int8ub,  # PAYMENT: AAVS code of a same-tap reload; STATUS: new status; SERVICE: op
    "amount_cents" / c.Int24sb,
    "day" / DayAdapter(c.Int16ub),
)

assert Identity.sizeof() == AREA_DATA_2_BLOCKS
assert Purse.sizeof() == AREA_DATA_2_BLOCKS
assert LogEntry.sizeof() == AREA_DATA_1_BLOCK


# Compiled once at import (construct generates Python for the fixed-size parts): the same
# declarations, about twice as fast to parse and a third faster to build (the golden-byte tests
# pin the compiled output to the declarations').
_COMPILED = {id(schema): schema.compile() for schema in (Identity, Purse, LogEntry)}
_SIZES = {id(schema): schema.sizeof() for schema in (Identity, Purse, LogEntry)}


def parse(schema: c.Construct, data: bytes) -> c.Container:
    """Parse exactly ``schema.sizeof()`` bytes; any failure is a CardImageError."""
    size = _SIZES.get(id(schema)) or schema.sizeof()
    if len(data) != size:
        raise CardImageError(f"expected {size} bytes, got {len(data)}")
    try:
        return _COMPILED.get(id(schema), schema).parse(data)
    except c.ConstructError as error:
        raise CardImageError(f"malformed area: {error}") from None


def build(schema: c.Construct, values: dict) -> bytes:
    try:
        return _COMPILED.get(id(schema), schema).build(values)
    except (c.ConstructError, struct.error, OverflowError) as error:  # compiled code packs directly
        raise CardImageError(f"cannot encode area: {error}") from None
