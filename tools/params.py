"""Parsing of command-line values. Every failure is a click.BadParameter (exit 2, one line)."""

from __future__ import annotations

import re
from datetime import date, datetime

import click

from farebox.cardimage import days
from farebox.cardimage.money import parse_amount
from farebox.terminal.link.actionlist import parse_time
from farebox.terminal.core.cardnumber import parse_number
from farebox.terminal.core.clock import hk_date
from farebox.terminal.core.rules import FareClass, Tariff

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class Amount(click.ParamType):
    """A decimal amount with at most two places, as cents."""

    name = "AMOUNT"

    def __init__(self, *, allow_negative: bool = False, allow_zero: bool = True) -> None:
        self.allow_negative = allow_negative
        self.allow_zero = allow_zero

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            cents = parse_amount(value, allow_negative=self.allow_negative)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        if cents == 0 and not self.allow_zero:
            self.fail(f"amount must be more than zero: {value!r}", param, ctx)
        return cents


class Date(click.ParamType):
    name = "DATE"

    def convert(self, value, param, ctx) -> date:
        if isinstance(value, date):
            return value
        try:
            if not _DATE.fullmatch(value):
                raise ValueError
            return date.fromisoformat(value)
        except ValueError:
            self.fail(f"not a date (YYYY-MM-DD): {value!r}", param, ctx)


class Time(click.ParamType):
    name = "TIME"

    def __init__(self, *, card_range: bool = True) -> None:
        self.card_range = card_range

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            at = parse_time(value)
            if self.card_range:
                days.to_day(hk_date(at))  # the card can only record dates in its range
        except ValueError as error:
            self.fail(str(error), param, ctx)
        return at


class CardNumber(click.ParamType):
    name = "8DIGITS"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_number(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class Fares(click.ParamType):
    """``adult=A,child=C,elder=E,student=S,disability=D``; adult is required, a class left out
    pays the adult fare."""

    name = "FARES"

    def convert(self, value, param, ctx) -> Tariff:
        if isinstance(value, Tariff):
            return value
        fares: dict[FareClass, int] = {}
        for part in value.split(","):
            name, sep, amount = part.partition("=")
            try:
                fare_class = FareClass(name)
            except ValueError:
                classes = ", ".join(c.value for c in FareClass)
                self.fail(f"unknown fare class {name!r} (one of {classes})", param, ctx)
            if not sep or fare_class in fares:
                self.fail(f"expected each class once as CLASS=AMOUNT: {part!r}", param, ctx)
            fares[fare_class] = Amount(allow_zero=False).convert(amount, param, ctx)
        if FareClass.ADULT not in fares:
            self.fail("an adult fare is required", param, ctx)
        return Tariff(fares)


AMOUNT = Amount()
POSITIVE_AMOUNT = Amount(allow_zero=False)
SIGNED_AMOUNT = Amount(allow_negative=True)
DATE = Date()
TIME = Time()
ANY_TIME = Time(card_range=False)  # a time outside our cards' date range (an old Octopus scan)
CARD_NUMBER = CardNumber()
FARES = Fares()
