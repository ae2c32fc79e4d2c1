"""The hot path's decoder (``schemas.unpack``: one ``struct.unpack`` per area, derived from the
construct declarations) is construct's parse: the same fields and values for every input, or the
same error with the same message. construct stays the one declaration of the layout."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farebox.cardimage import schemas
from farebox.cardimage.errors import CardImageError

SCHEMAS = [schemas.Identity, schemas.Purse, schemas.LogEntry]


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
    areas = {schemas.Identity: (blocks[0] + blocks[1])[:24],
             schemas.Purse: (blocks[2] + blocks[3])[:24], schemas.LogEntry: blocks[7][:8]}
    for schema, data in areas.items():
        left = outcome(schemas.unpack, schema, data)
        assert left[0] == "fields" and left == outcome(schemas.parse, schema, data)


def test_a_field_without_a_struct_layout_is_refused():
    import construct as c

    with pytest.raises(TypeError):
        schemas._Layout(c.Struct("text" / c.CString("utf8")))
