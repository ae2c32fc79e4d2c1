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

from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.protocol.settlement import (
    ActionEntry, Ack, SignedAck, SignedActionList, Upload, WireError,
    public_key_bytes,
)
from farebox.clearing.errors import Refused  # defined there (validate.py raises it too)
from farebox.clearing.validate import validate_batch

from farebox.clearing.store import (  # noqa: F401 - FORK_REASON: said here too
    AS_SENT, FORK_REASON, Conflict, Row, Store, canonical_time,
)




class Receiver:
    """Batches into a :class:`Store`, the action list it publishes and the acks it answers
    with, both signed with the receiver's own key (kept in the store's meta table, made at
    first use). Thread-safe and stateless apart from caches of what never changes (enrolled
    keys): as many receivers, threads and processes as the database takes; the store
    serialises per terminal and per card inside the database."""

    def __init__(self, store: Store) -> None:
        self.store = store
        fresh = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        raw = store.set_meta_if_absent("list_signing_key", fresh.hex())
        self._key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw))
        self._terminals: dict[str, tuple[int, bytes]] = {}  # enrolment never changes

    @property
    def public_key(self) -> bytes:
        return public_key_bytes(self._key)

    def sign_ack(self, ack: Ack) -> SignedAck:
        """``ack`` signed with the receiver's key, as it is sent."""
        return ack.sign(self._key)

    def action_list(self, now: datetime) -> dict:
        """The current action list, signed, valid for a day from ``now``."""
        serial, rows = self.store.action_details()
        entries = [ActionEntry(f"{card:08d}", reason, at, *_suspension(reason, owed, number))
                   for card, reason, at, owed, number in rows]
        return SignedActionList.publish(entries, serial, now, self._key).to_json()

    def add_action(self, card_number: int, reason: str, at_utc: str, added_utc: str,
                   then=None) -> int:
        """Put a card on the list: the next serial. ``then(db, serial)`` runs in the same
        transaction (the console's audit row)."""
        return self.store.set_action(card_number, reason, at_utc, added_utc, then)

    def remove_action(self, card_number: int, then=None) -> int | None:
        """Take a card off the list: the next serial, None if it was not listed."""
        return self.store.remove_action(card_number, then)

    def _terminal(self, terminal_id: str) -> tuple[int, bytes] | None:
        found = self._terminals.get(terminal_id)
        if found is None:
            found = self.store.terminal(terminal_id)
            if found is not None and len(self._terminals) < 100_000:
                self._terminals[terminal_id] = found
        return found

    def ingest(self, upload: object, received_utc: str) -> Ack:
        try:
            sent = Upload.from_json(upload)
        except WireError as error:
            raise Refused(400, str(error)) from None
        terminal_id, incarnation, number = sent.terminal_id, sent.incarnation, sent.number
        terminal = self._terminal(terminal_id)
        if terminal is None:
            raise Refused(403, f"terminal {terminal_id!r} is not enrolled")
        try:
            body = sent.batch.verify(terminal[1])
        except WireError as rejected:
            raise Refused(422, f"batch {number} refused: {rejected}") from None
        if (body.terminal_id, body.incarnation, body.number) != (
                terminal_id, incarnation, number):
            raise Refused(422, f"batch {number} refused: its body names another batch")
        validate_batch(body)  # every record sane (422 naming it) before anything is stored
        rows = [Row(0, item.record.seq, item.state, number, item.record.card_number,
                    item.record.counter_before, item.record.counter_after, item.record.type,
                    item.record.amount_cents, item.record.balance_before_cents,
                    item.record.balance_after_cents, canonical_time(item.record.at_utc),
                    item.record.hash, int(item.observed), AS_SENT, int(item.not_shown))
                for item in body.items]
        try:
            stored = self.store.ingest(terminal[0], incarnation, number, sent.hash,
                                       body.prev_hash, rows, received_utc)
        except Conflict as conflict:
            raise Refused(422 if conflict.kind == "record" else 409, str(conflict)) from None
        return Ack(sent.name, len(rows), stored.duplicates, stored.again)


#: what a terminal takes on an AAVS suspension (terminal/link/actionlist.py): an amount owed
#: of 1 cent to HK$1,000,000 and a number 1-255, both or neither
OUTSTANDING_RANGE = (1, 100_000_000)
SUSPENSION_RANGE = (1, 255)


def _suspension(reason: str, owed: int | None,
                number: int | None) -> tuple[int | None, int | None]:
    """An entry's amount and number as published: both when a terminal takes them, else
    neither (the entry then applies as one put on the list by hand): one entry a terminal
    refused would make it refuse the whole list, and every later one."""
    if (reason == "aavs_suspended" and owed is not None and number is not None
            and OUTSTANDING_RANGE[0] <= owed <= OUTSTANDING_RANGE[1]
            and SUSPENSION_RANGE[0] <= number <= SUSPENSION_RANGE[1]):
        return owed, number
    return None, None

