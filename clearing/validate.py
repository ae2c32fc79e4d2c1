"""What the clearing receiver checks of a batch once its signature verifies, before anything is
stored: that every record is one a terminal could have written. A signed batch from an enrolled
terminal is still untrusted input (a leaked key, a bug, a terminal of another build): nothing
absurd is stored or counted.

The wire format (``farebox.protocol.settlement``) has already checked each field's JSON type and
that integers fit the store's 64-bit columns; :func:`validate_batch` checks what the values mean
and refuses the batch with :class:`Refused` 422 naming the record and the field:

* the type is one the terminal writes (:data:`RECORD_TYPES`, the terminal's ``RecordType``;
  ``tests/clearing/test_validate.py`` holds the two lists together);
* every amount is an integer from 0 to :data:`AMOUNT_MAX_CENTS`, every balance within the
  widest range a card may hold under the rules (:data:`BALANCE_MIN_CENTS` ..
  :data:`BALANCE_MAX_CENTS`), and the amount agrees with the balance change as the record's
  kind says (:data:`RECORD_TYPES`): a debit takes it off the balance, a credit adds it, money
  that moved beside the card (a deposit, a fee, a waived amount) leaves the balance as it was,
  a refund pays the balance out to 0, and a status change moves nothing;
* a card write advances the card's counter by one (``counter_after = counter_before + 1``); the
  card number is eight digits (0 .. 99,999,999); a ``clock_reset`` involves no card: card 0,
  counters 0, balances 0, amount 0;
* the records of one card write (one ``tap_id``: a card return is several records) come
  together, share their card, counters, time and clock trust, and chain their balances (each
  one's balance before is the one before's balance after);
* sequence numbers rise within the batch. They are not contiguous: a record whose write was in
  doubt rides in a later batch than the records after it, and a write voided then found on the
  card rides again as committed;
* times are UTC text ending in ``Z`` (``2026-11-22T00:00:00Z``, microseconds when there are
  any); the tap id is at most :data:`MAX_ID_LENGTH` letters, digits, ``_ . -``.

Pure: no I/O, nothing of the store.
"""

from __future__ import annotations

import re
from datetime import datetime

from farebox.cardimage.model import CARD_NUMBER_MAX, COUNTER_MAX
from farebox.protocol.settlement import BatchBody, SettlementRecord

from farebox.clearing.errors import ClearingError, Refused

#: the amount's relation to the balance, by kind of record
DEBIT = "debit"  # balance_after = balance_before - amount
CREDIT = "credit"  # balance_after = balance_before + amount
BESIDE = "beside"  # money beside the card (cash, a fee, the bank): the balance unchanged
PAYOUT = "payout"  # a refund: the balance (>= 0) paid out, down to 0; the amount is the cash
STATUS = "status"  # amount 0, the balance unchanged
CLOCK = "clock"  # no card: card 0, counters 0, balances 0, amount 0

#: Every record type a terminal writes (terminal/core/rules.py ``RecordType``) and its kind.
RECORD_TYPES: dict[str, str] = {
    "payment": DEBIT,
    "auto_add_value": CREDIT,
    "add_value": CREDIT,
    "block": STATUS,
    "suspend": STATUS,
    "cancel": STATUS,
    "deposit": BESIDE,
    "initial_value": CREDIT,
    "admin_fee": BESIDE,
    "deposit_refund": BESIDE,
    "handling_fee": BESIDE,
    "damage_fee": BESIDE,
    "personalisation_fee": BESIDE,
    "negative_offset": CREDIT,  # a negative balance set off against the deposit, up to 0
    "refund": PAYOUT,
    "waived": BESIDE,
    "inactivity_fee": DEBIT,
    "aavs_reactivation_fee": BESIDE,  # charged to the bank account
    "aavs_outstanding_paid": BESIDE,  # cash collected for returned AAVS debits (001)
    "reactivate": STATUS,
    "aavs_enable": STATUS,
    "aavs_cancel": STATUS,
    "student_renewal": STATUS,
    "limit_upgrade": STATUS,
    "card_date_ahead": STATUS,
    "clock_reset": CLOCK,
}

#: The widest balance range a card holds under the rules: minus the larger negative limit to
#: the higher stored value limit (terminal/core/rules.py; the tests pin both).
BALANCE_MIN_CENTS = -5_000
BALANCE_MAX_CENTS = 300_000
#: The largest amount of one record: the card's widest money field (its deposit, 32 bits
#: unsigned). Value records are held tighter by their balances.
AMOUNT_MAX_CENTS = 2 ** 32 - 1
MAX_ID_LENGTH = 64

_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?Z")
_ID = re.compile(r"[A-Za-z0-9_.-]{1,%d}" % MAX_ID_LENGTH)


class _Bad(ClearingError):
    """One field refused: ``field`` and what is wrong with it (inside this module only: it
    becomes a :class:`Refused` naming the record)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _utc(value: str, field: str) -> None:
    if not _UTC.fullmatch(value):
        raise _Bad(field, f"{value[:40]!r} is not a UTC time ending in Z")
    try:
        datetime.fromisoformat(value[:-1] + "+00:00")
    except ValueError:
        raise _Bad(field, f"{value!r} is not a UTC time") from None


def _check_record(r: SettlementRecord) -> None:
    kind = RECORD_TYPES.get(r.type)
    if kind is None:
        raise _Bad("type", f"{r.type[:40]!r} is not a record type")
    if not _ID.fullmatch(r.tap_id):
        raise _Bad("tap_id", f"is not 1 to {MAX_ID_LENGTH} letters, digits, '_', '.', '-'")
    _utc(r.at_utc, "at_utc")
    if not 0 <= r.amount_cents <= AMOUNT_MAX_CENTS:
        raise _Bad("amount_cents", f"{r.amount_cents} is not from 0 to {AMOUNT_MAX_CENTS}")
    if kind == CLOCK:
        for field in ("card_number", "counter_before", "counter_after", "amount_cents",
                      "balance_before_cents", "balance_after_cents"):
            if getattr(r, field) != 0:
                raise _Bad(field, f"is {getattr(r, field)}: a clock reset carries 0")
        return
    if not 0 <= r.card_number <= CARD_NUMBER_MAX:
        raise _Bad("card_number", f"{r.card_number} is not an 8-digit card number")
    if not 0 <= r.counter_before < COUNTER_MAX:
        raise _Bad("counter_before", f"{r.counter_before} is not a counter a card can advance "
                   f"(0 to {COUNTER_MAX - 1})")
    if r.counter_after != r.counter_before + 1:
        raise _Bad("counter_after", f"{r.counter_after} is not counter_before + 1 "
                   f"({r.counter_before + 1})")
    for field in ("balance_before_cents", "balance_after_cents"):
        if not BALANCE_MIN_CENTS <= getattr(r, field) <= BALANCE_MAX_CENTS:
            raise _Bad(field, f"{getattr(r, field)} is outside a card's range "
                       f"({BALANCE_MIN_CENTS} to {BALANCE_MAX_CENTS})")
    before, after, amount = r.balance_before_cents, r.balance_after_cents, r.amount_cents
    if kind == DEBIT and after != before - amount:
        raise _Bad("amount_cents", f"{r.type} of {amount} from a balance of {before} does not "
                   f"leave {after}")
    if kind == CREDIT and after != before + amount:
        raise _Bad("amount_cents", f"{r.type} of {amount} onto a balance of {before} does not "
                   f"make {after}")
    if kind in (BESIDE, STATUS) and after != before:
        raise _Bad("balance_after_cents", f"a {r.type} leaves the balance as it was ({before}), "
                   f"not {after}")
    if kind == STATUS and amount != 0:
        raise _Bad("amount_cents", f"a {r.type} moves no money, not {amount}")
    if kind == PAYOUT and (before < 0 or after != 0):
        raise _Bad("balance_after_cents", f"a refund pays a balance of 0 or more out to 0, not "
                   f"{before} to {after}")


#: what the records of one card write share
_SAME_WRITE = ("card_number", "counter_before", "counter_after", "at_utc", "clock_trusted")


def _check_order(r: SettlementRecord, previous: SettlementRecord | None,
                 taps_seen: set[str]) -> None:
    if previous is not None and r.seq <= previous.seq:
        raise _Bad("seq", f"comes after record {previous.seq}: sequence numbers rise within a "
                   "batch")
    same_write = previous is not None and previous.tap_id == r.tap_id
    if not same_write and r.tap_id in taps_seen:
        raise _Bad("tap_id", "its write's records are not together in the batch")
    if same_write:
        for field in _SAME_WRITE:
            if getattr(r, field) != getattr(previous, field):
                raise _Bad(field, f"differs from record {previous.seq} of the same card write")
        if r.seq == previous.seq + 1 and r.balance_before_cents != previous.balance_after_cents:
            raise _Bad("balance_before_cents", f"{r.balance_before_cents} is not record "
                       f"{previous.seq}'s balance after ({previous.balance_after_cents})")


def validate_batch(body: BatchBody) -> None:
    """Refuse (:class:`Refused` 422, naming the record and its field) a verified batch holding
    a record no terminal could have written; None when every record is sane."""
    try:
        _utc(body.closed_utc, "closed_utc")
        if not _ID.fullmatch(body.incarnation):
            raise _Bad("incarnation", f"is not 1 to {MAX_ID_LENGTH} letters, digits, '_', '.', "
                       "'-'")
    except _Bad as bad:
        raise Refused(422, f"batch {body.number} refused: its {bad.field!r} {bad.problem}"
                      ) from None
    previous: SettlementRecord | None = None
    taps_seen: set[str] = set()
    for item in body.items:
        record = item.record
        try:
            _check_record(record)
            _check_order(record, previous, taps_seen)
        except _Bad as bad:
            raise Refused(422, f"batch {body.number} refused: record {record.seq}: "
                          f"{bad.field!r} {bad.problem}") from None
        taps_seen.add(record.tap_id)
        previous = record


__all__ = ["AMOUNT_MAX_CENTS", "BALANCE_MAX_CENTS", "BALANCE_MIN_CENTS", "RECORD_TYPES",
           "validate_batch"]
