"""Issuing a card image: the checks `card new` makes and the 14 blocks it writes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from farebox.cardimage import days
from farebox.cardimage.image import new_card_blocks
from farebox.cardimage.money import format_cents as fmt
from farebox.cardimage.model import (
    AAVS_RELOAD_CENTS, Category, Concession, Identity, Kind, LogEntry, LogType, Purse,
)

from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.cardfile import save_card

from farebox.terminal.card.keys import SoftwareKeyStore
from farebox.terminal.core.rules import (
    DEPOSIT_CENTS, INITIAL_VALUE_CENTS, negative_limit_cents, stored_value_limit_cents,
)
from farebox.terminal.core.service import aavs_age_refusal, student_age_refusal
from farebox.terminal.errors import BadInput

#: A birth date before this is refused as a typing error (docs/rules.md §2).
BIRTH_DATE_EARLIEST = date(1900, 1, 1)

#: FeliCa IDm: 2-byte manufacturer code, then the card's own 6 bytes.
IDM_PREFIX = bytes.fromhex("012e")


class IssueError(BadInput, ValueError):
    """The requested card cannot exist under the rules; the message says why."""


@dataclass(frozen=True)
class IssueRequest:
    issued: date
    number: int | None = None
    kind: Kind = Kind.ON_LOAN
    category: Category = Category.ADULT
    concession: Concession = Concession.NONE
    concession_expiry: date | None = None
    balance_cents: int | None = None  # None: the rules' initial value
    aavs_reload_cents: int = 0
    last_add_value: date | None = None  # None: the issue date
    birth_date: date | None = None  # the holder's (Personalised cards only)


def issue_card_file(path: Path, request: IssueRequest, keys: SoftwareKeyStore, *,
                    force: bool = False) -> Identity:
    """Issue a simulated card into the card file ``path`` (refusing to overwrite one unless
    ``force``)."""
    path = Path(path)
    if path.exists() and not force:
        raise IssueError(f"{path}: already exists (use --force to overwrite a card)")
    if not path.parent.is_dir():
        raise IssueError(f"{path.parent}: no such directory")
    idm = new_idm()
    identity, _, blocks = issue(request, keys, idm)
    try:
        save_card(SimulatedLiteS(idm, blocks=blocks), path)
    except OSError as error:
        raise IssueError(f"{path}: cannot write the card file ({error.strerror})") from None
    return identity


def blank_card_file(path: Path, *, force: bool = False) -> bytes:
    """A blank FeliCa Lite-S card (a new IDm, every user block zero), as a card out of the box
    for ``farebox service issue --reader``; returns its IDm."""
    path = Path(path)
    if path.exists() and not force:
        raise IssueError(f"{path}: already exists (use --force to overwrite a card)")
    if not path.parent.is_dir():
        raise IssueError(f"{path.parent}: no such directory")
    idm = new_idm()
    try:
        save_card(SimulatedLiteS(idm), path)
    except OSError as error:
        raise IssueError(f"{path}: cannot write the card file ({error.strerror})") from None
    return idm


def new_idm() -> bytes:
    return IDM_PREFIX + secrets.token_bytes(6)


def issue(request: IssueRequest, keys: SoftwareKeyStore,
          idm: bytes) -> tuple[Identity, Purse, list[bytes]]:
    """Check the request against the rules and build the card's blocks."""
    number = request.number if request.number is not None else secrets.randbelow(10**8)
    for label, value in (("issue date", request.issued),
                         ("concession expiry", request.concession_expiry),
                         ("last add value date", request.last_add_value)):
        try:
            days.to_day(value)
        except ValueError as error:
            raise IssueError(f"{label}: {error}") from None
    if request.concession is not Concession.NONE and request.category is not Category.PERSONALISED:
        raise IssueError("only a personalised card can carry a concession")
    if request.concession is Concession.STUDENT and request.concession_expiry is None:
        raise IssueError("a student concession needs an expiry date")
    if request.concession is not Concession.STUDENT and request.concession_expiry is not None:
        raise IssueError("only a student concession has an expiry date")
    if request.aavs_reload_cents and request.aavs_reload_cents not in AAVS_RELOAD_CENTS:
        allowed = ", ".join(fmt(c) for c in AAVS_RELOAD_CENTS)
        raise IssueError(f"AAVS reload amount must be one of {allowed}")
    last_add_value = request.last_add_value or request.issued
    if last_add_value < request.issued:
        raise IssueError("last add value date is before the issue date")
    if request.birth_date is not None:
        if request.category is not Category.PERSONALISED:
            raise IssueError("only a personalised card carries the holder's birth date")
        if not BIRTH_DATE_EARLIEST <= request.birth_date <= request.issued:
            raise IssueError(f"birth date {request.birth_date.isoformat()} is not between "
                             f"{BIRTH_DATE_EARLIEST.isoformat()} and the issue date "
                             f"({request.issued.isoformat()})")

    identity = Identity(
        card_number=number, kind=request.kind, category=request.category, issued=request.issued,
        deposit_cents=DEPOSIT_CENTS[request.kind], key_version=keys.issue_version,
        birth_date=request.birth_date,
    )
    refusal = None
    if request.aavs_reload_cents:
        refusal = aavs_age_refusal(identity, request.issued)
    if refusal is None and request.concession is Concession.STUDENT:
        refusal = student_age_refusal(identity, request.issued)
    if refusal is not None:
        raise IssueError(refusal)
    balance = request.balance_cents
    if balance is None:
        balance = INITIAL_VALUE_CENTS[request.category] if request.kind is Kind.ON_LOAN else 0
    purse = Purse(
        counter=1, balance_cents=balance, last_add_value=last_add_value,
        aavs_reload_cents=request.aavs_reload_cents,
        aavs_ever_enabled=bool(request.aavs_reload_cents), concession=request.concession,
        concession_expiry=request.concession_expiry,
    )
    negative, limit = negative_limit_cents(identity), stored_value_limit_cents(identity, purse)
    if not -negative <= balance <= limit:
        raise IssueError(f"balance {fmt(balance)} is outside this card's range "
                         f"{fmt(-negative)} .. {fmt(limit)}")
    entry = LogEntry(1, LogType.ISSUE, request.issued, balance)
    blocks = new_card_blocks(identity, purse, entry, idm, keys.card_key(identity.key_version, idm))
    return identity, purse, blocks
