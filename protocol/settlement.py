"""The settlement wire format: what a terminal and a clearing house send each other, defined
once and imported by both ends (as ``frames.py`` defines the card's frames).

Every value is frozen. ``to_json()`` gives the JSON-ready object sent today; ``from_json()``
reads one from untrusted input: it checks every type and bound and raises :class:`WireError`
with a one-line message, never anything else.

* A **record** (:class:`SettlementRecord`) is one journal record's hashed fields and its hash:
  SHA-256 of the canonical JSON of the fields in :data:`HASHED_FIELDS` (a record made on an
  untrusted clock adds ``"clock_untrusted": true``). Records chain by ``prev_hash`` from
  :data:`GENESIS_HASH`.
* A **batch body** (:class:`BatchBody`) is canonical JSON: format, terminal id, incarnation,
  batch number, close time, the previous batch's hash, the items (a record and the state of its
  card write: committed, void, unresolved; ``"observed": true`` on a write committed because
  its bytes were seen on the card later; ``in_doubt`` for a write still unknown to the terminal
  a batch period after it was made, ``"not_shown": true`` when its tap was cut off before any
  result was shown) and the totals by state and record type. The state rides in the item, not
  under the record's hash: a record's hash is fixed when it is made, and a record in doubt rides
  again once its write is resolved.
* A **signed batch** (:class:`SignedBatch`) is the body's text, its SHA-256 and the terminal's
  Ed25519 signature of the text; :func:`verify_batch` checks all of it.
* The **upload** (:class:`Upload`) is ``POST /v1/batches`` with ``{terminal_id, incarnation,
  number, body, hash, signature}``; the **ack** (:class:`Ack`) answers it naming exactly the
  batch taken, and the **signed ack** (:class:`SignedAck`) is that answer with ``"signature":
  HEX`` added: the clearing house's Ed25519 signature (its action-list key) of
  :data:`ACK_DOMAIN` followed by the ack's canonical JSON. A terminal counts a batch as delivered
  only on an ack that :func:`verify_ack` takes.
* The **action list** (:class:`SignedActionList`) is ``{"list": TEXT, "signature": HEX}``: TEXT
  canonical JSON ``{format, serial, issued_utc, expires_utc, entries: [{card, reason, at}]}``
  signed by the clearing house.

Times are UTC text (:func:`utc_iso`: ``2026-11-22T00:00:00Z``, microseconds when there are any).
Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS_HASH = "0" * 64
BATCH_FORMAT = 1
LIST_FORMAT = 1
LIST_VALIDITY = timedelta(hours=24)
#: what a signed ack's signed bytes start with: no action list (JSON text, "{" first) and no
#: batch body can ever be taken for an ack signed by the same key, nor an ack for them
ACK_DOMAIN = b"farebox settlement ack 1\n"
SETTLED_STATES = ("committed", "void", "unresolved")
#: a write the terminal has not resolved a batch period after it was made (a power cut lost its
#: commit mark, or the card has not come back): it rides again once resolved
IN_DOUBT = "in_doubt"
ITEM_STATES = SETTLED_STATES + (IN_DOUBT,)
#: the record fields under its hash (``clock_trusted`` enters as ``clock_untrusted``)
HASHED_FIELDS = ("seq", "terminal_id", "tap_id", "card_number", "counter_before",
                 "counter_after", "type", "amount_cents", "balance_before_cents",
                 "balance_after_cents", "at_utc", "prev_hash")

_INT64 = (-(2 ** 63), 2 ** 63 - 1)  # what the clearing house's columns hold
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_TEXT = 256  # ids, types, times: nothing on the wire is longer


class WireError(ValueError):
    """A settlement message that is malformed or does not verify; the message is one line."""


# -- time, canonical JSON, hashes, signatures ------------------------------------------------


def utc_iso(at: datetime) -> str:
    """``2026-11-22T00:00:00Z``: how records, batches and lists carry time."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("time must carry a UTC offset")
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_utc(text: str) -> datetime:
    """The inverse of :func:`utc_iso` (it also reads the journal's fixed-width times)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def canonical(obj: object) -> str:
    """Sorted keys, no spaces: the text that is hashed and signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``data`` by ``public_key`` (raw 32)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_key_bytes(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private_key`` (what is enrolled and configured)."""
    return private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)


def record_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a record's :data:`HASHED_FIELDS`; a record made on an
    untrusted clock (``clock_trusted`` false) carries ``"clock_untrusted": true`` in the hashed
    text (absent otherwise)."""
    hashed = {k: fields[k] for k in HASHED_FIELDS}
    if not fields.get("clock_trusted", True):
        hashed["clock_untrusted"] = True
    return sha256_hex(canonical(hashed))


# -- reading untrusted JSON -------------------------------------------------------------------


def parse_json_text(text: str, what: str) -> object:
    """``text`` parsed; WireError naming ``what`` when it is not JSON (or nests too deep)."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise WireError(f"{what} is not JSON") from None


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{what} is not a JSON object")
    return value


def _int(obj: Mapping[str, Any], key: str, what: str, low: int = _INT64[0]) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _INT64[1]:
        raise WireError(f"{what}: {key!r} missing or not an integer from {low}")
    return value


def _text(obj: Mapping[str, Any], key: str, what: str, max_length: int = _MAX_TEXT) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise WireError(f"{what}: {key!r} missing or not a string")
    return value


def _bool(obj: Mapping[str, Any], key: str, what: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise WireError(f"{what}: {key!r} missing or not true/false")
    return value


def _hash(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise WireError(f"{what}: {key!r} missing or not a SHA-256 in hex")
    return value


def _time(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = _text(obj, key, what, 64)
    try:
        at = parse_utc(value)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise WireError(f"{what}: {key!r} is not a UTC time")
    return value


# -- records and batches ----------------------------------------------------------------------


@dataclass(frozen=True)
class SettlementRecord:
    """One journal record as it rides in a batch: its hashed fields and its hash."""

    seq: int
    terminal_id: str
    tap_id: str
    card_number: int
    counter_before: int
    counter_after: int
    type: str
    amount_cents: int
    balance_before_cents: int
    balance_after_cents: int
    at_utc: str
    prev_hash: str
    clock_trusted: bool
    hash: str

    def to_json(self) -> dict:
        return {"seq": self.seq, "terminal_id": self.terminal_id, "tap_id": self.tap_id,
                "card_number": self.card_number, "counter_before": self.counter_before,
                "counter_after": self.counter_after, "type": self.type,
                "amount_cents": self.amount_cents,
                "balance_before_cents": self.balance_before_cents,
                "balance_after_cents": self.balance_after_cents, "at_utc": self.at_utc,
                "prev_hash": self.prev_hash, "hash": self.hash,
                "clock_trusted": self.clock_trusted}

    def computed_hash(self) -> str:
        """What :attr:`hash` must be."""
        return record_hash(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> SettlementRecord:
        what = "a record"
        record = _object(obj, what)
        seq = _int(record, "seq", what, 1)
        what = f"record {seq}"
        return cls(seq, _text(record, "terminal_id", what), _text(record, "tap_id", what),
                   _int(record, "card_number", what, 0), _int(record, "counter_before", what, 0),
                   _int(record, "counter_after", what, 0), _text(record, "type", what),
                   _int(record, "amount_cents", what),
                   _int(record, "balance_before_cents", what),
                   _int(record, "balance_after_cents", what), _time(record, "at_utc", what),
                   _hash(record, "prev_hash", what), _bool(record, "clock_trusted", what),
                   _hash(record, "hash", what))


@dataclass(frozen=True)
class BatchItem:
    """A record and the state of its card write when the batch closed. ``observed`` and
    ``not_shown`` are on the wire only when true."""

    state: str  # one of ITEM_STATES
    record: SettlementRecord
    observed: bool = False  # committed because its bytes were seen on the card later
    #: in_doubt only: the tap was cut off (the card left mid-write) before any result was shown,
    #: so a void of it is no counter fork; false when a result may have been shown
    not_shown: bool = False

    def __post_init__(self) -> None:
        if self.not_shown and self.state != IN_DOUBT:
            raise ValueError("only an item in doubt is marked not_shown")

    def to_json(self) -> dict:
        item: dict = {"state": self.state, "record": self.record.to_json()}
        if self.observed:
            item["observed"] = True
        if self.not_shown:
            item["not_shown"] = True
        return item

    @classmethod
    def from_json(cls, obj: object) -> BatchItem:
        item = _object(obj, "a batch item")
        record = SettlementRecord.from_json(item.get("record"))
        state = item.get("state")
        if state not in ITEM_STATES:
            raise WireError(f"record {record.seq} has state {state!r}")
        flags = {}
        for flag in ("observed", "not_shown"):
            flags[flag] = item.get(flag, False)
            if not isinstance(flags[flag], bool):
                raise WireError(f"record {record.seq}: {flag!r} is not true/false")
            if flag in item and not flags[flag]:  # the canonical form leaves a false flag out
                raise WireError(f"record {record.seq}: {flag!r} is on the wire only when true")
        if flags["not_shown"] and state != IN_DOUBT:
            raise WireError(f"record {record.seq}: 'not_shown' on a {state} item")
        return cls(state, record, **flags)


@dataclass(frozen=True)
class Total:
    count: int
    amount_cents: int


@dataclass(frozen=True)
class Totals:
    """Count and amount by write state and record type: ``{state: {type: {count,
    amount_cents}}}``."""

    by_state: tuple[tuple[str, tuple[tuple[str, Total], ...]], ...] = ()

    @classmethod
    def of(cls, items: tuple[BatchItem, ...] | list[BatchItem]) -> Totals:
        sums: dict[str, dict[str, list[int]]] = {}
        for item in items:
            bucket = sums.setdefault(item.state, {}).setdefault(item.record.type, [0, 0])
            bucket[0] += 1
            bucket[1] += item.record.amount_cents
        return cls(tuple((state, tuple((kind, Total(*sums[state][kind]))
                                       for kind in sorted(sums[state])))
                         for state in sorted(sums)))

    def to_json(self) -> dict:
        return {state: {kind: {"count": t.count, "amount_cents": t.amount_cents}
                        for kind, t in kinds} for state, kinds in self.by_state}

    def text(self) -> str:
        return canonical(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> Totals:
        by_state = []
        for state, kinds in sorted(_object(obj, "the totals").items()):
            totals = []
            for kind, total in sorted(_object(kinds, "the totals").items()):
                total = _object(total, "the totals")
                totals.append((kind, Total(_int(total, "count", "the totals", 0),
                                           _int(total, "amount_cents", "the totals"))))
            by_state.append((state, tuple(totals)))
        return cls(tuple(by_state))


@dataclass(frozen=True)
class BatchBody:
    """What a terminal signs: one batch of its records."""

    terminal_id: str
    incarnation: str
    number: int  # "batch" on the wire: gapless from 1
    closed_utc: str
    prev_hash: str  # the batch before's hash, GENESIS_HASH for batch 1
    items: tuple[BatchItem, ...]
    totals: Totals
    format: int = BATCH_FORMAT

    @classmethod
    def close(cls, terminal_id: str, incarnation: str, number: int, closed: datetime,
              prev_hash: str, items: tuple[BatchItem, ...] | list[BatchItem]) -> BatchBody:
        """A new body over ``items``, its totals added up."""
        items = tuple(items)
        return cls(terminal_id, incarnation, number, utc_iso(closed), prev_hash, items,
                   Totals.of(items))

    def to_json(self) -> dict:
        return {"format": self.format, "terminal_id": self.terminal_id,
                "incarnation": self.incarnation, "batch": self.number,
                "closed_utc": self.closed_utc, "prev_hash": self.prev_hash,
                "items": [item.to_json() for item in self.items],
                "totals": self.totals.to_json()}

    def text(self) -> str:
        """The canonical text that is hashed and signed."""
        return canonical(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> BatchBody:
        what = "the batch"
        body = _object(obj, what)
        if body.get("format") != BATCH_FORMAT or isinstance(body.get("format"), bool):
            raise WireError("its header is not a batch of this format")
        items = body.get("items")
        if not isinstance(items, list):
            raise WireError("its items are not a list")
        return cls(_text(body, "terminal_id", what), _text(body, "incarnation", what),
                   _int(body, "batch", what, 1), _time(body, "closed_utc", what),
                   _hash(body, "prev_hash", what),
                   tuple(BatchItem.from_json(item) for item in items),
                   Totals.from_json(body.get("totals")))

    @classmethod
    def parse(cls, text: str) -> BatchBody:
        return cls.from_json(parse_json_text(text, "its body"))


@dataclass(frozen=True)
class SignedBatch:
    """A batch as it is kept and sent: the body's text exactly as signed, its SHA-256 in hex and
    the terminal's Ed25519 signature of the text in hex."""

    body: str
    hash: str
    signature: str

    @classmethod
    def sign(cls, body: BatchBody, sign: Callable[[bytes], bytes]) -> SignedBatch:
        text = body.text()
        return cls(text, sha256_hex(text), sign(text.encode()).hex())

    def verify(self, public_key: bytes) -> BatchBody:
        return verify_batch(self.body, self.hash, self.signature, public_key)


def verify_batch(body: str, digest: str, signature_hex: str, public_key: bytes) -> BatchBody:
    """The body of a batch whose hash, signature, header, totals and record hashes all verify;
    WireError otherwise. The chain (``prev_hash``) is the caller's to check."""
    if not isinstance(body, str) or sha256_hex(body) != digest:
        raise WireError("its body does not match its hash")
    try:
        signature = bytes.fromhex(signature_hex)
    except (ValueError, TypeError):
        raise WireError("its signature is not hex") from None
    if not verify_signature(public_key, signature, body.encode()):
        raise WireError("its signature does not verify with the terminal's key")
    parsed = BatchBody.parse(body)
    if parsed.totals != Totals.of(parsed.items):
        raise WireError("its totals do not add up")
    seen = set()
    for item in parsed.items:
        record = item.record
        key = (record.seq, item.state)
        if key in seen:
            raise WireError(f"record {key[0]} is in the batch twice as {key[1]}")
        seen.add(key)
        if record.terminal_id != parsed.terminal_id:
            raise WireError(f"record {record.seq} names another terminal")
        if record.computed_hash() != record.hash:
            raise WireError(f"record {record.seq} does not match its hash")
    return parsed


# -- upload and acknowledgement ---------------------------------------------------------------


@dataclass(frozen=True)
class BatchName:
    """What names one batch exactly: an ack must name the batch sent."""

    terminal_id: str
    incarnation: str
    number: int
    hash: str

    def to_json(self) -> dict:
        return {"terminal_id": self.terminal_id, "incarnation": self.incarnation,
                "number": self.number, "hash": self.hash}

    @classmethod
    def from_json(cls, obj: object) -> BatchName:
        what = "the ack"
        name = _object(obj, what)
        if set(name) != {"terminal_id", "incarnation", "number", "hash"}:
            raise WireError("the ack does not name a batch")
        return cls(_text(name, "terminal_id", what), _text(name, "incarnation", what),
                   _int(name, "number", what, 1), _hash(name, "hash", what))


#: an upload's fields and their JSON types, in the order they are sent
UPLOAD_FIELDS = {"terminal_id": str, "incarnation": str, "number": int, "body": str,
                 "hash": str, "signature": str}


@dataclass(frozen=True)
class Upload:
    """``POST /v1/batches``: one signed batch and the terminal it comes from."""

    terminal_id: str
    incarnation: str
    number: int
    body: str
    hash: str
    signature: str

    @classmethod
    def of(cls, terminal_id: str, incarnation: str, number: int, batch: SignedBatch) -> Upload:
        return cls(terminal_id, incarnation, number, batch.body, batch.hash, batch.signature)

    @property
    def batch(self) -> SignedBatch:
        return SignedBatch(self.body, self.hash, self.signature)

    @property
    def name(self) -> BatchName:
        return BatchName(self.terminal_id, self.incarnation, self.number, self.hash)

    def to_json(self) -> dict:
        return {key: getattr(self, key) for key in UPLOAD_FIELDS}

    @classmethod
    def from_json(cls, obj: object) -> Upload:
        if not isinstance(obj, dict):
            raise WireError("an upload is a JSON object")
        for key, kind in UPLOAD_FIELDS.items():
            if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
                raise WireError(f"upload field {key!r} missing or not a {kind.__name__}")
        return cls(*(obj[key] for key in UPLOAD_FIELDS))


@dataclass(frozen=True)
class Ack:
    """The clearing house's answer to an upload it took: the batch, named exactly, how many
    records it held, how many of them were stored before, and whether the batch itself was
    received before."""

    batch: BatchName
    records: int
    duplicates: int
    again: bool

    @property
    def terminal_id(self) -> str:
        return self.batch.terminal_id

    @property
    def incarnation(self) -> str:
        return self.batch.incarnation

    @property
    def number(self) -> int:
        return self.batch.number

    @property
    def hash(self) -> str:
        return self.batch.hash

    def to_json(self) -> dict:
        return {"ack": self.batch.to_json(), "records": self.records,
                "duplicates": self.duplicates, "again": self.again}

    @classmethod
    def from_json(cls, obj: object) -> Ack:
        answer = _object(obj, "the answer")
        return cls(BatchName.from_json(answer.get("ack")),
                   _int(answer, "records", "the ack", 0), _int(answer, "duplicates", "the ack", 0),
                   _bool(answer, "again", "the ack"))

    def signed_bytes(self) -> bytes:
        """What the clearing house signs: :data:`ACK_DOMAIN` and the canonical JSON of
        :meth:`to_json`."""
        return ACK_DOMAIN + canonical(self.to_json()).encode()

    def sign(self, private_key: Ed25519PrivateKey) -> SignedAck:
        return SignedAck(self, private_key.sign(self.signed_bytes()).hex())


_HEX_SIGNATURE = re.compile(r"[0-9a-f]{128}")


@dataclass(frozen=True)
class SignedAck:
    """An :class:`Ack` as the clearing house sends it: the ack's fields as before and
    ``"signature"``, the hex Ed25519 signature of :meth:`Ack.signed_bytes`."""

    ack: Ack
    signature: str

    def to_json(self) -> dict:
        return {**self.ack.to_json(), "signature": self.signature}

    @classmethod
    def from_json(cls, obj: object) -> SignedAck:
        ack = Ack.from_json(obj)
        signature = obj.get("signature")  # an object: Ack.from_json checked it
        if signature is None:
            raise WireError("the ack is not signed")
        if not isinstance(signature, str) or not _HEX_SIGNATURE.fullmatch(signature):
            raise WireError("the ack's signature is not 128 hex digits")
        return cls(ack, signature)

    def verify(self, public_key: bytes) -> Ack:
        """The ack, if its signature verifies with the clearing house's key; WireError
        otherwise."""
        if not verify_signature(public_key, bytes.fromhex(self.signature),
                                self.ack.signed_bytes()):
            raise WireError("the ack's signature does not verify with the clearing house's key")
        return self.ack


def verify_ack(answer: object, public_key: bytes) -> Ack:
    """The ack in a clearing house's ``answer`` if it is signed by ``public_key``; WireError
    (one line) otherwise. Whether it names the batch sent is the caller's to check."""
    return SignedAck.from_json(answer).verify(public_key)


# -- the action list --------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionEntry:
    """One card on the action list, as published: its number (8 digits), why, and when it was
    reported (ISO 8601 with offset); an AAVS suspension may carry the amount outstanding
    (cents) and the card's suspension number. Their meaning is the terminal's to check."""

    card: str
    reason: str
    at: str
    outstanding_cents: int | None = None
    suspension: int | None = None

    def to_json(self) -> dict:
        out = {"card": self.card, "reason": self.reason, "at": self.at}
        if self.outstanding_cents is not None:
            out["outstanding_cents"] = self.outstanding_cents
        if self.suspension is not None:
            out["suspension"] = self.suspension
        return out

    @classmethod
    def from_json(cls, obj: object, where: str = "an entry") -> ActionEntry:
        if not isinstance(obj, dict):
            raise WireError(f"its entries: {where}: expected an object")
        for key in ("card", "reason", "at"):
            if not isinstance(obj.get(key), str) or len(obj[key]) > _MAX_TEXT:
                raise WireError(f'its entries: {where}: "{key}" must be a string')
        extra = {}
        for key in ("outstanding_cents", "suspension"):
            if key in obj:
                extra[key] = _int(obj, key, f"its entries: {where}", 0)
        return cls(obj["card"], obj["reason"], obj["at"], **extra)


@dataclass(frozen=True)
class ActionList:
    serial: int
    issued_utc: str
    expires_utc: str
    entries: tuple[ActionEntry, ...]

    def to_json(self) -> dict:
        return {"format": LIST_FORMAT, "serial": self.serial, "issued_utc": self.issued_utc,
                "expires_utc": self.expires_utc,
                "entries": [entry.to_json() for entry in self.entries]}

    @classmethod
    def from_json(cls, obj: object) -> ActionList:
        what = "the action list"
        body = _object(obj, what)
        if body.get("format") != LIST_FORMAT or isinstance(body.get("format"), bool):
            raise WireError("not an action list of this format")
        entries = body.get("entries")
        if not isinstance(entries, list):
            raise WireError("not an action list of this format")
        return cls(_int(body, "serial", what), _time(body, "issued_utc", what),
                   _time(body, "expires_utc", what),
                   tuple(ActionEntry.from_json(entry, f"entries[{index}]")
                         for index, entry in enumerate(entries)))

    @property
    def issued(self) -> datetime:
        return parse_utc(self.issued_utc)

    @property
    def expires(self) -> datetime:
        return parse_utc(self.expires_utc)


@dataclass(frozen=True)
class SignedActionList:
    """``{"list": TEXT, "signature": HEX}``: the list's canonical text and the clearing house's
    Ed25519 signature of it."""

    text: str
    signature: str

    @classmethod
    def publish(cls, entries: list[ActionEntry] | tuple[ActionEntry, ...], serial: int,
                issued: datetime, private_key: Ed25519PrivateKey) -> SignedActionList:
        """The list of ``entries`` as serial ``serial``, valid for :data:`LIST_VALIDITY`."""
        body = ActionList(serial, utc_iso(issued), utc_iso(issued + LIST_VALIDITY),
                          tuple(entries))
        text = canonical(body.to_json())
        return cls(text, private_key.sign(text.encode()).hex())

    def to_json(self) -> dict:
        return {"list": self.text, "signature": self.signature}

    @classmethod
    def from_json(cls, obj: object) -> SignedActionList:
        if not isinstance(obj, dict) or not isinstance(obj.get("list"), str) \
                or not isinstance(obj.get("signature"), str):
            raise WireError('expected {"list": TEXT, "signature": HEX}')
        return cls(obj["list"], obj["signature"])

    def verify(self, public_key: bytes) -> ActionList:
        """The list, if the signature verifies with the clearing house's key; WireError
        otherwise. Expiry and serial are the holder's to judge."""
        try:
            signature = bytes.fromhex(self.signature)
        except ValueError:
            raise WireError("the signature is not hex") from None
        if not verify_signature(public_key, signature, self.text.encode()):
            raise WireError("the signature does not verify with the clearing house's key")
        return ActionList.from_json(parse_json_text(self.text, "the list"))
