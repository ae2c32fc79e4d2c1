"""The card's contents as plain values (what the schemas decode to and encode from)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from enum import Enum, IntEnum


class Kind(IntEnum):
    ON_LOAN = 1
    SOLD = 2
    MOBILE = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Category(IntEnum):
    ADULT = 1
    CHILD = 2
    ELDER = 3
    PERSONALISED = 4

    @property
    def label(self) -> str:
        return self.name.lower()


class Concession(IntEnum):
    NONE = 0
    STUDENT = 1
    DISABILITY = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Status(IntEnum):
    """Ordered by severity: a list can move a card up this order, never down."""

    ACTIVE = 0
    SUSPENDED = 1
    BLOCKED = 2
    CANCELLED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class LogType(IntEnum):
    ISSUE = 1
    PAYMENT = 2
    ADD_VALUE = 3
    STATUS = 4
    SERVICE = 5  # a service terminal's change; amount: the balance change (signed)

    @property
    def label(self) -> str:
        return self.name.lower()


class ServiceOp(IntEnum):
    """What a service terminal did (the detail byte of a SERVICE log entry)."""

    RETURN = 1
    REACTIVATE = 2
    AAVS = 3
    RENEW_STUDENT = 4
    UPGRADE_LIMIT = 5

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class AavsAmount(Enum):
    """The reload amounts a card can carry (cents), with their 4-bit code on the card."""

    NONE = (0, 0)
    HKD_150 = (1, 15000)
    HKD_250 = (2, 25000)
    HKD_500 = (3, 50000)
    HKD_1000 = (4, 100000)

    def __init__(self, code: int, cents: int) -> None:
        self.code = code
        self.cents = cents


AAVS_RELOAD_CENTS = tuple(a.cents for a in AavsAmount if a.cents)
AAVS_BY_CODE = {a.code: a.cents for a in AavsAmount}
AAVS_CODE_BY_CENTS = {a.cents: a.code for a in AavsAmount}

CARD_NUMBER_MAX = 99_999_999
#: The highest purse counter a card may carry. 0xFFFFFFFF is refused (a counter there could never
#: advance), so a card at COUNTER_MAX is worn out: it verifies, but no terminal can write it.
COUNTER_MAX = 0xFFFFFFFE
#: The identity's layout version (its first byte). Version 1 holds no birth date (its last ten
#: bytes are zero); version 2 holds the holder's birth date in the first four of them. A card is
#: written in the lowest version that holds it, so a card without a birth date stays readable by
#: terminals that know only version 1 (docs/readers.md).
FORMAT_VERSION = 1
FORMAT_VERSION_BIRTH_DATE = 2
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_BIRTH_DATE)


@dataclass(frozen=True)
class Identity:
    """Written once at issue; never changes afterwards."""

    card_number: int
    kind: Kind
    category: Category
    issued: date
    deposit_cents: int
    key_version: int
    #: The holder's date of birth (a Personalised card issued with one; docs/rules.md §2), or
    #: None: the card knows no age.
    birth_date: date | None = None

    @property
    def format_version(self) -> int:
        """The layout the identity is written in: the lowest that holds it."""
        return FORMAT_VERSION if self.birth_date is None else FORMAT_VERSION_BIRTH_DATE


@dataclass(frozen=True)
class Purse:
    """One purse slot: everything about the card that changes."""

    counter: int
    balance_cents: int
    last_add_value: date
    last_auto_reload: date | None = None
    last_payment: date | None = None
    aavs_reload_cents: int = 0  # 0: no AAVS on this card
    status: Status = Status.ACTIVE
    payment_count: int = 0
    concession: Concession = Concession.NONE
    concession_expiry: date | None = None
    svl_upgraded: bool = False
    #: AAVS was enabled on this card at some time (re-enabling it costs a fee, docs/rules.md §8).
    aavs_ever_enabled: bool = False
    #: The number of the last AAVS suspension (an action list entry's ``suspension``, 1-255) the
    #: card was reactivated from at a service terminal, 0 none: that entry no longer applies to
    #: it, on a terminal whose list is older than the reactivation (docs/rules.md §7).
    aavs_released: int = 0

    @property
    def aavs_enabled(self) -> bool:
        return self.aavs_reload_cents != 0


@dataclass(frozen=True)
class LogEntry:
    """One transaction log record. ``counter`` is the purse counter the transaction produced."""

    counter: int
    type: LogType
    day: date
    amount_cents: int = 0
    aavs_reload_cents: int = 0  # PAYMENT: the auto add value made in the same tap
    new_status: Status | None = None  # STATUS: the status written
    operation: ServiceOp | None = None  # SERVICE: what the service terminal did


@dataclass(frozen=True)
class CardImage:
    """A verified, decoded card. ``purse`` is the current slot; ``previous`` the other valid one."""

    idm: bytes
    identity: Identity
    purse: Purse
    purse_slot: int
    previous: Purse | None = None
    log: tuple[LogEntry, ...] = field(default=())  # newest first; only entries that verify
    unreadable_log_blocks: int = 0
