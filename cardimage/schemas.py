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
    # the number of the last AAVS suspension the card was reactivated from (an action list
    # entry's ``suspension``; docs/rules.md §7): was the last reserved zero byte, old cards read 0
    "aavs_released" / c.Int8ub,
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
    """Parse exactly ``schema.sizeof()`` bytes; any failure is a CardImageError. The reference
    parse (construct's own); the tap's hot path uses :func:`unpack`, derived from the same
    declaration and proved equal to this by tests/cardimage/test_unpack.py."""
    size = _SIZES.get(id(schema)) or schema.sizeof()
    if len(data) != size:
        raise CardImageError(f"expected {size} bytes, got {len(data)}")
    try:
        return _COMPILED.get(id(schema), schema).parse(data)
    except c.ConstructError as error:
        raise CardImageError(f"malformed area: {error}") from None


def build(schema: c.Construct, values: dict) -> bytes:
    """The area's bytes; any failure is a CardImageError. Through the struct layout derived
    from the declaration (:func:`unpack`'s); a value it cannot pack is built again by
    construct, whose error is the one raised (tests/cardimage/test_unpack.py: the same bytes,
    the same errors)."""
    layout = _LAYOUTS.get(id(schema))
    if layout is not None:
        try:
            return layout.pack(values)
        except Exception:  # noqa: BLE001 - construct says what is wrong, below
            pass
    return build_reference(schema, values)


def build_reference(schema: c.Construct, values: dict) -> bytes:
    """construct's own build of the area (the reference :func:`build` is proved equal to)."""
    try:
        return _COMPILED.get(id(schema), schema).build(values)
    except (c.ConstructError, struct.error, OverflowError) as error:  # compiled code packs directly
        raise CardImageError(f"cannot encode area: {error}") from None


# ---- the hot path: one struct.unpack per area, derived from the declarations above ---------

class _Layout:
    """A construct ``Struct`` of fixed-size fields turned into one :class:`struct.Struct` and,
    per field, the adapters construct would apply (innermost first) or the constant it checks.
    Derived from the declaration, so that the declaration stays the one statement of the
    layout; a field of another kind is refused when the layout is made (at import)."""

    def __init__(self, schema: c.Struct) -> None:
        formats, fields, self.consts, self.packing = [">"], [], [], []
        for sub in schema.subcons:
            if not isinstance(sub, c.Renamed) or not sub.name:
                raise TypeError(f"{sub!r}: only named fields have a struct layout")
            con, adapters = sub.subcon, []
            while isinstance(con, c.Adapter):
                adapters.insert(0, con)
                con = con.subcon
            const = None
            if isinstance(con, c.Const) and isinstance(con.subcon, c.Bytes) and not adapters:
                const, con = con.value, con.subcon
            if isinstance(con, c.FormatField) and con.fmtstr[0] == ">":
                formats.append(con.fmtstr[1:])
                signed = None
            elif (isinstance(con, c.BytesInteger) and not con.swapped
                  and isinstance(con.length, int)):
                formats.append(f"{con.length}s")
                signed = con.signed
            elif isinstance(con, c.Bytes) and isinstance(con.length, int):
                formats.append(f"{con.length}s")
                signed = None
            else:
                raise TypeError(f"{sub.name}: {con!r} has no struct layout")
            if const is not None:
                self.consts.append((len(formats) - 2, const))
            else:
                fields.append((len(formats) - 2, sub.name, _converter(signed, adapters)))
            self.packing.append((sub.name, const, _encoder(signed, getattr(con, "length", 0),
                                                           adapters)))
        self.struct = struct.Struct("".join(formats))
        if self.struct.size != schema.sizeof():
            raise TypeError(f"struct layout of {self.struct.size} bytes for {schema.sizeof()}")
        self.plain = tuple((index, name) for index, name, convert in fields if convert is None)
        self.converted = tuple(field for field in fields if field[2] is not None)

        if self.consts and self.converted and self.consts[0][0] < self.converted[-1][0]:
            raise TypeError("a constant before a decoded field (errors would come in another "
                            "order than construct's)")

    def unpack(self, data: bytes) -> dict:
        values = self.struct.unpack(data)
        out = {name: values[index] for index, name in self.plain}
        for index, name, convert in self.converted:  # in declaration order, as construct
            out[name] = convert(values[index])
        for index, const in self.consts:
            if values[index] != const:
                raise c.ConstError()  # as construct's compiled parser says it
        return out


    def pack(self, values: dict) -> bytes:
        """The bytes construct builds from ``values`` (constants as declared)."""
        packed = []
        for name, const, encode in self.packing:
            if const is not None:
                if values.get(name) not in (None, const):
                    raise ValueError(f"{name}: not the constant")  # construct says it
                packed.append(const)
            else:
                packed.append(encode(values[name]) if encode else values[name])
        return self.struct.pack(*packed)


def _encoder(signed: bool | None, length: int, adapters: list[c.Adapter]):
    """What construct does to a field's value when it builds: each adapter's encode (outermost
    first), then a BytesInteger's int to bytes; None when the value is packed as given."""
    encoders = tuple(adapter._encode for adapter in reversed(adapters))
    if signed is None and not encoders:
        return None

    def encode(value):
        for step in encoders:
            value = step(value, None, "(???)")
        if signed is not None:
            value = value.to_bytes(length, "big", signed=signed)
        return value
    return encode


def _converter(signed: bool | None, adapters: list[c.Adapter]):
    """What construct does to a field's raw value: a BytesInteger's bytes to int, then each
    adapter's decode (innermost first); None when the value is used as unpacked. The adapters
    are pure, so what they decode is remembered by raw value (a field of at most 16 bits:
    at most 65,536 values; a wider one is decoded each time); a value they refuse is refused
    again each time, with their error."""
    decoders = tuple(adapter._decode for adapter in adapters)
    if signed is None and not decoders:
        return None

    def decode(value):
        if signed is not None:
            value = int.from_bytes(value, "big", signed=signed)
        for step in decoders:
            value = step(value, None, "(???)")
        return value

    if signed is not None or not all(isinstance(_innermost(a), c.FormatField)
                                     and _innermost(a).length <= 2 for a in adapters):
        return decode
    seen: dict = {}

    def remembered(value):
        try:
            return seen[value]
        except KeyError:
            decoded = seen[value] = decode(value)
            return decoded
    return remembered


def _innermost(con: c.Construct) -> c.Construct:
    while isinstance(con, c.Subconstruct):
        con = con.subcon
    return con


# The identity is not among them: its birth date's meaning hangs on its format version (an
# adapter that reads the context), which a flat struct layout has no context for; construct's
# compiled parser reads it (once a tap).
_LAYOUTS = {id(schema): _Layout(schema) for schema in (Purse, LogEntry)}


def unpack(schema: c.Struct, data: bytes) -> dict:
    """The fields :func:`parse` gives (constants left out: they are checked), as a dict, through
    one ``struct.unpack``: the same values and the same errors (CardImageError, with construct's
    message)."""
    layout = _LAYOUTS[id(schema)]
    if len(data) != layout.struct.size:
        raise CardImageError(f"expected {layout.struct.size} bytes, got {len(data)}")
    try:
        return layout.unpack(data)
    except c.ConstructError as error:
        raise CardImageError(f"malformed area: {error}") from None
