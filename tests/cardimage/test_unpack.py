"""The hot path's decoder (``schemas.unpack``: one ``struct.unpack`` per area, derived from the
construct declarations) is construct's parse: the same fields and values for every input, or the
same error with the same message. construct stays the one declaration of the layout."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farebox.cardimage import schemas
from farebox.cardimage.errors import CardImageError

#: the areas read through the struct layout (the identity is read by construct: its birth date's
#: meaning hangs on its format version, which a flat layout has no context for)
SCHEMAS = [schemas.Purse, schemas.LogEntry]


def outcome(decode, schema, data):
    try:
        fields = decode(schema, data)
    except CardImageError as error:
        return "error", str(error)
    return "fields", {k: v for k, v in fields.items() if k not in ("_io", "reserved")}


def nearly_valid(schema):
    """Bytes whose enum and day fields are mostly in range: small values byte by byte, so that
    most areas parse and the values themselves are compared, not only the errors."""
    size = schema.sizeof()
    return st.lists(st.one_of(st.integers(0, 3), st.integers(0, 255)), min_size=size,
                    max_size=size).map(bytes)


@settings(max_examples=1500)
@given(st.sampled_from(SCHEMAS).flatmap(
    lambda schema: st.tuples(st.just(schema), st.one_of(nearly_valid(schema),
                                                        st.binary(max_size=30)))))
def test_unpack_is_constructs_parse(case):
    schema, data = case
    assert outcome(schemas.unpack, schema, data) == outcome(schemas.parse, schema, data)


@pytest.mark.parametrize("category", ["adult", "child", "elder"])
def test_an_issued_cards_areas_unpack_as_they_parse(category):
    from datetime import date

    from farebox.cardimage.model import Category
    from farebox.terminal.card.issue import IssueRequest, issue, new_idm
    from farebox.terminal.card.keys import published_test_keys

    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), balance_cents=12_345,
                                      category=Category[category.upper()]),
                         published_test_keys(), new_idm())
    areas = {schemas.Purse: (blocks[2] + blocks[3])[:24], schemas.LogEntry: blocks[7][:8]}
    for schema, data in areas.items():
        left = outcome(schemas.unpack, schema, data)
        assert left[0] == "fields" and left == outcome(schemas.parse, schema, data)


def test_a_field_without_a_struct_layout_is_refused():
    import construct as c

    with pytest.raises(TypeError):
        schemas._Layout(c.Struct("text" / c.CString("utf8")))


# ---- building: the same bytes, the same errors ----------------------------------------------

def _field_values(sub):
    """Values a field takes (valid ones, mostly), from its declaration."""
    import construct as c

    from farebox.cardimage.model import AAVS_CODE_BY_CENTS

    con, adapters = sub.subcon, []
    while isinstance(con, c.Adapter):
        adapters.append(type(con))
        con = con.subcon
    if isinstance(con, c.Const):
        return st.sampled_from([None, None, None, con.value, b"\x01" * len(con.value)])
    if schemas.DayAdapter in adapters:
        return st.one_of(st.none(), st.dates(min_value=date(1989, 1, 1),
                                            max_value=date(2190, 12, 31)))
    if schemas.AavsAdapter in adapters:
        return st.one_of(st.sampled_from(sorted(AAVS_CODE_BY_CENTS)), st.integers(-5, 2000))
    if schemas.StrictFlag in adapters:
        return st.one_of(st.booleans(), st.integers(-1, 2))
    if schemas.EnumAdapter in adapters:
        enum = sub.subcon.enum
        return st.one_of(st.sampled_from(list(enum)), st.integers(-1, 12))
    bits = 8 * (con.length if isinstance(con.length, int) else 4)
    signed = getattr(con, "signed", None)
    if signed is None:
        signed = con.fmtstr[1:].islower()
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return st.one_of(st.integers(low, high), st.integers(low - 3, high + 3))


def _values(schema):
    return st.fixed_dictionaries({sub.name: _field_values(sub) for sub in schema.subcons})


def built(build, schema, values):
    try:
        return "bytes", build(schema, values)
    except Exception as error:  # noqa: BLE001 - whatever the reference raises, the same
        return type(error).__name__, str(error)


@settings(max_examples=1500)
@given(st.sampled_from(SCHEMAS).flatmap(lambda schema: st.tuples(st.just(schema),
                                                                 _values(schema))))
def test_build_is_constructs_build(case):
    schema, values = case
    assert built(schemas.build, schema, values) == built(schemas.build_reference, schema,
                                                         values)


def test_the_fast_build_packs_without_construct():
    """An issued card's purse packs through the struct layout itself (not the fallback)."""
    from farebox.cardimage.model import Status

    values = {"counter": 7, "balance_cents": -1234, "last_add_value": date(2026, 1, 15),
              "last_auto_reload": None, "last_payment": date(2026, 11, 22),
              "aavs_reload_cents": 0, "status": Status.ACTIVE, "payment_count": 3,
              "concession": 0, "concession_expiry": None, "svl_upgraded": False,
              "aavs_ever_enabled": True, "aavs_released": 3}
    layout = schemas._LAYOUTS[id(schemas.Purse)]
    assert layout.pack(values) == schemas.build_reference(schemas.Purse, values)
    assert schemas.unpack(schemas.Purse, layout.pack(values)) == values
