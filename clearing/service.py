"""What the clearing receiver does with an uploaded batch, apart from HTTP: check it, store it
once, and say exactly what it acknowledges.

An upload is a JSON object ``{terminal_id, incarnation, number, body, hash, signature}``; ``body``
is the batch's canonical JSON text as the terminal signed it. A batch is accepted when its
terminal is enrolled, its hash and signature verify with that terminal's key, its header agrees
with the upload, and it links to the batch before it (number 1 to the genesis hash). The same
batch sent again is acknowledged again and changes nothing; another batch under a number already
taken, a batch out of order and anything that does not verify are refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.terminal.store.journal import GENESIS_HASH
from farebox.terminal.store.settlement import BatchRejected, check_batch
from farebox.terminal.link.signedlist import publish
from farebox.clearing.errors import ClearingError
from farebox.clearing.store import Store, StoredBatch

UPLOAD_KEYS = {"terminal_id": str, "incarnation": str, "number": int, "body": str, "hash": str,
               "signature": str}


class Refused(ClearingError):
    """An upload the receiver will not take: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Ack:
    terminal_id: str
    incarnation: str
    number: int
    hash: str
    records: int
    duplicates: int
    again: bool  # the batch had been received before

    def to_json(self) -> dict:
        return {"ack": {"terminal_id": self.terminal_id, "incarnation": self.incarnation,
                        "number": self.number, "hash": self.hash}, "records": self.records,
                "duplicates": self.duplicates, "again": self.again}


#: What a card whose counter was spent twice (a restored image used again) is listed as.
FORK_REASON = "cancelled"


class Receiver:
    """Batches into a :class:`Store`, one at a time (the store is single-writer anyway), and the
    action list it publishes, signed with the receiver's own key (kept in the store's meta
    table, made at first use)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        fresh = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        raw = store.set_meta_if_absent("list_signing_key", fresh.hex())
        self._key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw))

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)

    def action_list(self, now: datetime) -> dict:
        """The current action list, signed, valid for a day from ``now``."""
        with self._lock:
            serial, rows = self.store.actions()
        entries = [{"card": f"{card:08d}", "reason": reason, "at": at}
                   for card, reason, at in rows]
        return publish(entries, serial, now, self._key)

    def add_action(self, card_number: int, reason: str, at_utc: str, added_utc: str) -> int:
        with self._lock:
            return self.store.set_action(card_number, reason, at_utc, added_utc)

    def ingest(self, upload: object, received_utc: str) -> Ack:
        if not isinstance(upload, dict):
            raise Refused(400, "an upload is a JSON object")
        for key, kind in UPLOAD_KEYS.items():
            if not isinstance(upload.get(key), kind) or isinstance(upload.get(key), bool):
                raise Refused(400, f"upload field {key!r} missing or not a {kind.__name__}")
        terminal_id, incarnation, number = (upload["terminal_id"], upload["incarnation"],
                                            upload["number"])
        with self._lock:
            key = self.store.public_key(terminal_id)
            if key is None:
                raise Refused(403, f"terminal {terminal_id!r} is not enrolled")
            try:
                body = check_batch(upload["body"], upload["hash"], upload["signature"], key)
            except BatchRejected as rejected:
                raise Refused(422, f"batch {number} refused: {rejected}") from None
            if (body["terminal_id"], body["incarnation"], body["batch"]) != (
                    terminal_id, incarnation, number):
                raise Refused(422, f"batch {number} refused: its body names another batch")
            with self.store.transaction():
                known = self.store.batch(terminal_id, incarnation, number)
                if known is not None:
                    if known.hash != upload["hash"]:
                        raise Refused(409, f"batch {number} was received before with another "
                                      "hash")
                    return Ack(terminal_id, incarnation, number, known.hash,
                               len(body["items"]), 0, True)
                if number == 1:
                    expected = GENESIS_HASH
                else:
                    previous = self.store.batch(terminal_id, incarnation, number - 1)
                    if previous is None:
                        raise Refused(409, f"batch {number} is out of order: batch {number - 1} "
                                      "has not been received")
                    expected = previous.hash
                if body["prev_hash"] != expected:
                    raise Refused(409, f"batch {number} does not link to batch {number - 1}")
                records = [{**item["record"], "state": item["state"], "incarnation": incarnation,
                            "batch_number": number, "observed": int(item.get("observed") is True)}
                           for item in body["items"]]
                duplicates = self.store.store_batch(
                    StoredBatch(terminal_id, incarnation, number, upload["hash"],
                                body["prev_hash"]), records, received_utc)
                self.store.reconcile([r["card_number"] for r in records])
                forks = self.store.forked_cards([r["card_number"] for r in records])
                self.store.add_actions_if_absent(
                    [(card, FORK_REASON, received_utc) for card in forks], received_utc)
        return Ack(terminal_id, incarnation, number, upload["hash"], len(records), duplicates,
                   False)
