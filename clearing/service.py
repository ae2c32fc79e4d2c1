"""What the clearing receiver does with an uploaded batch, apart from HTTP: check it, store it
once, and say exactly what it acknowledges.

An upload is a JSON object ``{terminal_id, incarnation, number, body, hash, signature}``; ``body``
is the batch's canonical JSON text as the terminal signed it. The settlement wire format
(``farebox.protocol.settlement``) defines the upload, the batch, its checks and the ack. A batch
is accepted when its terminal is enrolled, its hash and signature verify with that terminal's
key, its header agrees with the upload, and it links to the batch before it (number 1 to the
genesis hash). The same batch sent again is acknowledged again and changes nothing; another batch
under a number already taken, a batch out of order and anything that does not verify are
refused. Every ack goes out signed (:meth:`Receiver.sign_ack`) with the receiver's key, the one
that signs its action lists: a terminal counts nothing else as delivered.
"""

from __future__ import annotations

import threading
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.protocol.settlement import (
    GENESIS_HASH, ActionEntry, Ack, BatchName, SignedAck, SignedActionList, Upload, WireError,
    public_key_bytes,
)
from farebox.clearing.errors import Refused  # defined there (validate.py raises it too)
from farebox.clearing.validate import validate_batch

from farebox.clearing.store import Store, StoredBatch


#: What a card whose counter was spent twice (a restored image used again, or a write sent in
#: doubt whose result may have been shown, then another change from the same counter) is
#: listed as.
FORK_REASON = "cancelled"


class Receiver:
    """Batches into a :class:`Store`, one at a time (the store is single-writer anyway), the
    action list it publishes and the acks it answers with, both signed with the receiver's own
    key (kept in the store's meta table, made at first use)."""

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
        return public_key_bytes(self._key)

    def sign_ack(self, ack: Ack) -> SignedAck:
        """``ack`` signed with the receiver's key, as it is sent."""
        return ack.sign(self._key)

    def action_list(self, now: datetime) -> dict:
        """The current action list, signed, valid for a day from ``now``."""
        with self._lock:
            serial, rows = self.store.actions()
        entries = [ActionEntry(f"{card:08d}", reason, at) for card, reason, at in rows]
        return SignedActionList.publish(entries, serial, now, self._key).to_json()

    def add_action(self, card_number: int, reason: str, at_utc: str, added_utc: str) -> int:
        with self._lock:
            return self.store.set_action(card_number, reason, at_utc, added_utc)

    def ingest(self, upload: object, received_utc: str) -> Ack:
        try:
            sent = Upload.from_json(upload)
        except WireError as error:
            raise Refused(400, str(error)) from None
        terminal_id, incarnation, number = sent.terminal_id, sent.incarnation, sent.number
        with self._lock:
            key = self.store.public_key(terminal_id)
            if key is None:
                raise Refused(403, f"terminal {terminal_id!r} is not enrolled")
            try:
                body = sent.batch.verify(key)
            except WireError as rejected:
                raise Refused(422, f"batch {number} refused: {rejected}") from None
            if (body.terminal_id, body.incarnation, body.number) != (
                    terminal_id, incarnation, number):
                raise Refused(422, f"batch {number} refused: its body names another batch")
            validate_batch(body)  # every record sane (422 naming it) before anything is stored
            with self.store.transaction():
                known = self.store.batch(terminal_id, incarnation, number)
                if known is not None:
                    if known.hash != sent.hash:
                        raise Refused(409, f"batch {number} was received before with another "
                                      "hash")
                    return Ack(BatchName(terminal_id, incarnation, number, known.hash),
                               len(body.items), 0, True)
                if number == 1:
                    expected = GENESIS_HASH
                else:
                    previous = self.store.batch(terminal_id, incarnation, number - 1)
                    if previous is None:
                        raise Refused(409, f"batch {number} is out of order: batch {number - 1} "
                                      "has not been received")
                    expected = previous.hash
                if body.prev_hash != expected:
                    raise Refused(409, f"batch {number} does not link to batch {number - 1}")
                records = [{**item.record.to_json(), "state": item.state,
                            "incarnation": incarnation, "batch_number": number,
                            "observed": int(item.observed), "not_shown": int(item.not_shown)}
                           for item in body.items]
                duplicates = self.store.store_batch(
                    StoredBatch(terminal_id, incarnation, number, sent.hash, body.prev_hash),
                    records, received_utc)
                self.store.reconcile([r["card_number"] for r in records])
                forks = self.store.forked_cards([r["card_number"] for r in records])
                self.store.add_actions_if_absent(
                    [(card, FORK_REASON, received_utc) for card in forks], received_utc)
        return Ack(sent.name, len(records), duplicates, False)
