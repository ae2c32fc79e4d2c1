"""What the operator commands look at: a scheme card block by block (both purse slots, their
MACs, which one is current and why, the log ring), the differences between two card images, and
the journal's records with their settlement batch and upload state. Read-only throughout."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from farebox.cardimage.errors import CardImageError, InvalidCard
from farebox.cardimage.image import decode_identity, decode_image, decode_purse
from farebox.cardimage.layout import (
    AREA_LOG, BLOCK_SIZE, IDENTITY_BLOCKS, JOURNEY_BLOCKS, LOG_BLOCKS, MAC_SIZE, PURSE_SLOT_BLOCKS,
    USER_BLOCKS,
)
from farebox.cardimage.mac import verify_area_mac
from farebox.cardimage.model import CardImage, Purse
from farebox.protocol.session import LiteSSession

from farebox.terminal.store.journal import Journal, JournalRecord
from farebox.terminal.card.keys import SoftwareKeyStore

MAC_OK = "ok"
MAC_FAILS = "fails"
EMPTY = "empty"

BLOCK_AREAS = {
    **{n: "identity" for n in IDENTITY_BLOCKS},
    **{n: "purse slot 0" for n in PURSE_SLOT_BLOCKS[0]},
    **{n: "purse slot 1" for n in PURSE_SLOT_BLOCKS[1]},
    **{n: f"log {i}" for i, n in enumerate(LOG_BLOCKS)},
    **{n: "in-journey (reserved)" for n in JOURNEY_BLOCKS},
}


def read_card_blocks(session: LiteSSession) -> list[bytes]:
    """The 14 user blocks of the card ``session`` is on (terminal/card/present.py finds it).
    Raises FelicaError when the card does not answer as a Lite-S should."""
    return session.read_blocks(list(range(USER_BLOCKS)))


@dataclass(frozen=True)
class SlotReport:
    slot: int
    blocks: tuple[int, ...]
    state: str  # ok | fails | empty | invalid (MAC verifies, contents do not)
    purse: Purse | None
    problem: str | None = None


@dataclass(frozen=True)
class LogBlockReport:
    block: int
    state: str  # ok | fails | empty


@dataclass
class CardReport:
    """A scheme card examined block by block. ``image`` is None when it does not decode (then
    ``problem`` says why); the slot and log reports are there whenever the identity verifies."""

    idm: bytes
    blocks: list[bytes]
    image: CardImage | None
    problem: str | None
    identity_state: str
    slots: list[SlotReport] = field(default_factory=list)
    current_slot: int | None = None
    current_slot_reason: str | None = None
    log_blocks: list[LogBlockReport] = field(default_factory=list)


def examine(idm: bytes, blocks: list[bytes], keys: SoftwareKeyStore) -> CardReport:
    raw = dict(enumerate(blocks))

    def key_for(version: int) -> bytes:
        return keys.card_key(version, idm)

    try:
        image = decode_image(raw, idm, key_for)
        problem = None
    except (InvalidCard, CardImageError) as error:
        image, problem = None, str(error)
    report = CardReport(idm, blocks, image, problem, MAC_FAILS)
    try:
        identity, card_key = decode_identity(raw, idm, key_for)
    except (InvalidCard, CardImageError) as error:
        report.identity_state = EMPTY if all(raw[n] == bytes(BLOCK_SIZE)
                                             for n in IDENTITY_BLOCKS) else MAC_FAILS
        report.problem = report.problem or str(error)
        return report
    report.identity_state = MAC_OK
    for slot, numbers in enumerate(PURSE_SLOT_BLOCKS):
        if all(raw[n] == bytes(BLOCK_SIZE) for n in numbers):
            report.slots.append(SlotReport(slot, numbers, EMPTY, None))
            continue
        try:
            purse = decode_purse(raw, slot, idm, card_key, identity.key_version)
            report.slots.append(SlotReport(slot, numbers, MAC_OK, purse))
        except CardImageError as error:
            state = MAC_FAILS if "MAC" in str(error) else "invalid"
            report.slots.append(SlotReport(slot, numbers, state, None, str(error)))
    valid = [s for s in report.slots if s.purse is not None]
    if image is not None:
        report.current_slot = image.purse_slot
        if len(valid) == 1:
            other = report.slots[1 - image.purse_slot]
            report.current_slot_reason = (f"the only slot that verifies (slot {other.slot} is "
                                          f"{other.state})")
        else:
            low = min(valid, key=lambda s: s.purse.counter)
            report.current_slot_reason = (f"higher counter ({image.purse.counter} > "
                                          f"{low.purse.counter} in slot {low.slot}); both verify")
    for number in LOG_BLOCKS:
        if raw[number] == bytes(BLOCK_SIZE):
            report.log_blocks.append(LogBlockReport(number, EMPTY))
            continue
        data, mac = raw[number][:-MAC_SIZE], raw[number][-MAC_SIZE:]
        ok = verify_area_mac(card_key, AREA_LOG, identity.key_version, idm, (number,), data, mac)
        report.log_blocks.append(LogBlockReport(number, MAC_OK if ok else MAC_FAILS))
    return report


# ---- differences between two card images ---------------------------------------------------

@dataclass(frozen=True)
class BlockDiff:
    block: int
    area: str
    a: bytes
    b: bytes

    @property
    def changed_bytes(self) -> list[int]:
        return [i for i in range(BLOCK_SIZE) if self.a[i] != self.b[i]]


@dataclass(frozen=True)
class FieldDiff:
    field: str
    a: object
    b: object


def block_diffs(a: list[bytes], b: list[bytes]) -> list[BlockDiff]:
    return [BlockDiff(n, BLOCK_AREAS.get(n, "?"), a[n], b[n])
            for n in range(min(len(a), len(b))) if a[n] != b[n]]


_LIST_KEYS = ("slot", "block", "counter")  # what identifies an item of a list in a card report


def _keyed(items: list) -> dict | None:
    """A list of objects as {key: item} by the first field every item has (history entries by
    counter, slots by slot, log blocks by block), or None."""
    for key in _LIST_KEYS:
        if items and all(isinstance(i, dict) and key in i for i in items):
            return {f"{key} {i[key]}": i for i in items}
    return None


def field_diffs(a: object, b: object, prefix: str = "") -> list[FieldDiff]:
    """Leaf-by-leaf differences between two decoded cards (``card show --json`` objects):
    nested objects by key, lists of entries by their counter/slot/block (``history[counter
    3].amount``)."""
    if isinstance(a, list) and isinstance(b, list):
        keyed_a, keyed_b = _keyed(a), _keyed(b)
        if keyed_a is not None and keyed_b is not None:
            a, b = keyed_a, keyed_b
            return _dict_diffs(a, b, prefix, lambda key: f"{prefix.rstrip('.')}[{key}].")
    if isinstance(a, dict) and isinstance(b, dict):
        return _dict_diffs(a, b, prefix, lambda key: f"{prefix}{key}.")
    return [] if a == b else [FieldDiff(prefix.rstrip("."), a, b)]


def _dict_diffs(a: dict, b: dict, prefix: str, child) -> list[FieldDiff]:
    diffs: list[FieldDiff] = []
    for key in list(a) + [k for k in b if k not in a]:
        left, right = a.get(key), b.get(key)
        if left is None or right is None or type(left) is not type(right) \
                or not isinstance(left, (dict, list)):
            if left != right:
                diffs.append(FieldDiff(child(key).rstrip("."), left, right))
        else:
            diffs += field_diffs(left, right, child(key))
    return diffs


# ---- the journal with its batches ----------------------------------------------------------

@dataclass(frozen=True)
class BatchMembership:
    batch: int
    state: str  # the write state the batch settled the record in
    closed_utc: str
    acked_utc: str | None


def batch_memberships(journal: Journal) -> dict[int, list[BatchMembership]]:
    """seq -> the batches that carry the record (a record settled as ``unresolved`` and later
    ``committed`` is in two, one sent ``in_doubt`` and later resolved too). Empty when the
    terminal has never closed a batch."""
    db = journal.connection
    items = ("SELECT i.seq, i.batch, i.state, b.closed_utc, b.acked_utc FROM batch_items i "
             "JOIN batches b ON b.number = i.batch")
    in_doubt = ("SELECT d.seq, d.batch, 'in_doubt', b.closed_utc, b.acked_utc "
                "FROM batch_in_doubt d JOIN batches b ON b.number = d.batch")
    rows = None
    for query in (f"{items} UNION ALL {in_doubt}", items):  # batch_in_doubt: since issue 17
        try:
            rows = db.execute(f"SELECT * FROM ({query}) ORDER BY 1, 2").fetchall()
            break
        except sqlite3.OperationalError:  # no settlement tables (of that version) yet
            continue
    if rows is None:
        return {}
    out: dict[int, list[BatchMembership]] = {}
    for seq, batch, state, closed, acked in rows:
        out.setdefault(seq, []).append(BatchMembership(batch, state, closed, acked))
    return out


def upload_state(memberships: list[BatchMembership]) -> str:
    """``not batched``, ``batched`` (closed, not acknowledged) or ``acknowledged``; a record
    whose latest batch is not acknowledged yet counts as batched."""
    if not memberships:
        return "not batched"
    return "acknowledged" if memberships[-1].acked_utc is not None else "batched"


def find_record(records: list[JournalRecord], key: str) -> JournalRecord | None:
    """A record by its sequence number or tap id."""
    if key.isdigit():
        return next((r for r in records if r.seq == int(key)), None)
    return next((r for r in records if r.tap_id == key), None)


__all__ = ["BLOCK_AREAS", "BatchMembership", "BlockDiff", "CardReport", "FieldDiff",
           "batch_memberships", "block_diffs", "examine", "field_diffs", "find_record",
           "read_card_blocks", "upload_state"]
