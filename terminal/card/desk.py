"""The service desk's shell: a request's checks, then its cards changed one by one.

Issuing: check every card of a request, then for each one journal the money collected
(deposit, initial value, fee), write the card, and commit.

The journal's intent comes before the card file exists: a card written but never committed
(the process died in between) is an ``intent`` this terminal resolves when it next sees the card
(its purse slot is the one the intent expects), like an interrupted tap; a card file that could
not be written voids its intent, so nothing is settled for it. An intent whose card file never
came to be (the process died before writing it) stays in doubt (`journal list` shows it) and
its records are never settled.

A request made again after a crash (issue 17 item 1) is told what the card already got: a card
file (or a card on a reader) whose last change is this terminal's issue is that issue, completed
(committed as seen on the card) if it was in doubt, and reported with what to collect
(``completed_from``) however long ago it was made; nothing is written or collected twice. A card
changed since (used anywhere) is not reported: its file exists, the request is refused.

The other changes (return, reactivate, AAVS, student status, limit upgrade) go through the
terminal's transaction (:meth:`Terminal.service`): :func:`change_card`. A return of several
cards is all or nothing as far as checks go: every card file is checked before the first card
is changed (:func:`return_cards`). A card whose last change is this terminal's return is
reported (its refund, ``completed_from``), not refused: the return run again after a crash.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path

from farebox.cardimage.errors import InvalidCard
from farebox.cardimage.image import decode_image
from farebox.cardimage.layout import (
    FULL_READ_BLOCKS, IDENTITY_BLOCKS, JOURNEY_BLOCKS, LOG_BLOCKS, PURSE_SLOT_BLOCKS, USER_BLOCKS,
    log_block_for,
)
from farebox.cardimage.model import CardImage, Identity, Status
from farebox.protocol.errors import FelicaError
from farebox.protocol.session import LiteSSession
from farebox.protocol.sim.card import CardFileError, SimulatedLiteS
from farebox.protocol.sim.cardfile import load_card, save_card

from farebox.terminal import failpoints
from farebox.terminal.core.clock import hk_date, require_aware
from farebox.terminal.card.issue import IssueError, IssueRequest, issue, new_idm
from farebox.terminal.errors import Interrupted, TerminalError
from farebox.terminal.store.journal import CardWrite, Journal
from farebox.terminal.card.keys import SoftwareKeyStore
from farebox.terminal.card.present import CardReaders, CardUnusable, is_card_file, label
from farebox.terminal.card.tap import RequestRefused, TapResult, Terminal, untrusted_clock
from farebox.terminal.core.rules import Decision, Reason, Record, RecordType
from farebox.terminal.core.service import (
    InactivityFees, IssueCharges, ServiceRefused, check_issued_by, check_request_size,
    decide_return, inactivity_fees, issue_charges, refund_breakdown,
)
from farebox.terminal.core.writecycle import (
    IssueStep, WriteState, has_in_doubt, issue_on_card_step,
)

ISSUE = "issue"


def _records(charges: IssueCharges, aavs_reload_cents: int) -> tuple[Record, ...]:
    """The money collected, and AAVS when the card is issued with it (the first enablement:
    free)."""
    records = charges.records()
    if aavs_reload_cents:
        records += (Record(RecordType.AAVS_ENABLE, 0, charges.initial_value_cents),)
    return records


@dataclass(frozen=True)
class IssuedCard:
    path: Path | None  # None: the card held to a reader
    identity: Identity
    charges: IssueCharges
    aavs_reload_cents: int
    tap_id: str
    #: an earlier issue of this terminal's that this card is (cut off, now completed, or made
    #: before and reported again): nothing was collected this time beyond what it booked
    completed_from: str | None = None
    completed_at: datetime | None = None  # when that issue was made


class IssueInterrupted(Interrupted):
    """The card left the reader while it was being issued: the journal holds the issue in doubt.
    Present the same card again to ``issue_on_card`` (with the same request): the issue is
    completed if it landed, or made again over what the cut-off write left."""

    def __init__(self, tap_id: str, cause: Exception) -> None:
        super().__init__(f"card write interrupted ({cause}); present the card again to issue it")
        self.tap_id = tap_id
        self.cause = cause


def issue_cards(journal: Journal, keys: SoftwareKeyStore, paths: list[Path],
                request: IssueRequest, at: datetime) -> list[IssuedCard]:
    """Issue one card per path (at most five, none may exist yet), each with ``request``'s kind,
    category, concession and AAVS, issued on the Hong Kong date of ``at``. Raises
    ServiceRefused before anything is written if any card cannot be issued."""
    require_aware(at)
    check_card_files(paths)
    if request.number is not None and len(paths) > 1:
        raise ServiceRefused("a card number can only be given for a single card")
    high_water = journal.time_high_water()
    if high_water is not None and at < high_water:
        raise ServiceRefused(f"{at.isoformat()} is behind this terminal's latest transaction "
                             f"({high_water.isoformat()}): check the clock "
                             "(`farebox terminal clock reset` if that time is wrong)")
    request = replace(request, issued=hk_date(at), balance_cents=None, last_add_value=None)
    prepared: list[tuple[Path, tuple | _EarlierIssue]] = []
    for path in paths:
        path = Path(path)
        if path.exists():
            earlier = _issued_here(journal, keys, path)
            if earlier is None:
                raise ServiceRefused(f"{path}: already exists (a new card needs a new file)")
            prepared.append((path, earlier))  # this request made again: reported, not redone
            continue
        if not path.parent.is_dir():
            raise ServiceRefused(f"{path.parent}: no such directory")
        idm = new_idm()
        number = request.number if request.number is not None else secrets.randbelow(10**8)
        try:
            identity, purse, blocks = issue(replace(request, number=number), keys, idm)
        except IssueError as error:
            raise ServiceRefused(str(error)) from None
        charges = issue_charges(identity.kind, identity.category)
        if purse.balance_cents != charges.initial_value_cents:
            raise AssertionError("issue() and issue_charges() disagree on the initial value")
        prepared.append((path, (idm, identity, purse, blocks, charges)))

    issued = []
    for path, item in prepared:
        if isinstance(item, _EarlierIssue):
            issued.append(_completed_issue(journal, path, item, at))
            continue
        idm, identity, purse, blocks, charges = item
        write = _record_intent(journal, idm, identity, purse, blocks, charges, at)
        try:
            save_card(SimulatedLiteS(idm, blocks=blocks), path)
        except OSError as error:
            journal.resolve_write(write, WriteState.VOID, at)
            raise OSError(f"{path}: cannot write the card file ({error.strerror}); "
                          f"{len(issued)} card(s) issued before it") from None
        failpoints.hit("after-purse-write")
        journal.resolve_write(write, WriteState.COMMITTED, at, log_confirmed=True)
        issued.append(IssuedCard(path, identity, charges, purse.aavs_reload_cents,
                                 write.tap_id))
    return issued


def issue_on_card(journal: Journal, keys: SoftwareKeyStore, session: LiteSSession,
                  request: IssueRequest, at: datetime) -> IssuedCard:
    """Issue the blank FeliCa Lite-S card held to a reader (``session`` activated on it).

    The card must be blank (every user block zero), or hold what an issue of this terminal that
    was cut off left on it. Its blocks are written identity first and the purse slot last, so a
    card that leaves mid-way never verifies (no valid purse: a payment terminal declines it
    ``invalid_card``) until the issue is made again. A cut-off issue whose purse landed is
    completed (committed, nothing collected twice); one that did not land is voided and the
    card issued afresh."""
    require_aware(at)
    idm = session.idm
    if idm is None:
        raise ValueError("the session has no card: activate it first")
    high_water = journal.time_high_water()
    if high_water is not None and at < high_water:
        raise ServiceRefused(f"{at.isoformat()} is behind this terminal's latest transaction "
                             f"({high_water.isoformat()}): check the clock "
                             "(`farebox terminal clock reset` if that time is wrong)")
    current = dict(zip(range(USER_BLOCKS), session.read_blocks(tuple(range(USER_BLOCKS)))))
    earlier = journal.open_writes_for_idm(idm, ISSUE)
    slot = b"".join(current[b] for b in PURSE_SLOT_BLOCKS[0])
    card = _decoded(current, idm, keys)
    plan = issue_on_card_step(earlier, card is not None, slot,
                              all(data == bytes(len(data)) for data in current.values()))
    if plan.step is IssueStep.COMPLETE:  # that issue landed: complete it, collect nothing
        return _completed_issue(journal, None, _EarlierIssue(plan.writes[0], card), at)
    if plan.step is IssueStep.ALREADY_ISSUED:
        earlier = _earlier_issue(journal, card, current)
        if earlier is not None:  # still as this terminal issued it: the request made again
            return _completed_issue(journal, None, earlier, at)
        raise ServiceRefused(f"the card is already issued (card "
                             f"{card.identity.card_number:08d}): only a blank card is issued")
    if plan.step is IssueStep.NOT_BLANK:
        raise ServiceRefused("the card is not blank (it holds data this terminal did not write): "
                             "only a blank FeliCa Lite-S card is issued")
    for write in plan.writes:  # REDO: none of them landed; the card holds what they left
        journal.resolve_write(write, WriteState.VOID, at)
    request = replace(request, issued=hk_date(at), balance_cents=None, last_add_value=None)
    if request.number is None:
        request = replace(request, number=secrets.randbelow(10**8))
    try:
        identity, purse, blocks = issue(request, keys, idm)
    except IssueError as error:
        raise ServiceRefused(str(error)) from None
    charges = issue_charges(identity.kind, identity.category)
    write = _record_intent(journal, idm, identity, purse, blocks, charges, at)
    # identity and log first, the other (empty) slot and the journey area only where they are
    # not already what the new image holds, the purse slot last: it makes the card valid
    order = (IDENTITY_BLOCKS + LOG_BLOCKS + PURSE_SLOT_BLOCKS[1] + JOURNEY_BLOCKS
             + PURSE_SLOT_BLOCKS[0])
    try:
        for block in order:
            if current[block] != blocks[block] or block in PURSE_SLOT_BLOCKS[0]:
                session.write_block(block, blocks[block])
    except FelicaError as error:
        raise IssueInterrupted(write.tap_id, error) from error
    failpoints.hit("after-purse-write")
    journal.resolve_write(write, WriteState.COMMITTED, at, log_confirmed=True)
    return IssuedCard(None, identity, charges, purse.aavs_reload_cents, write.tap_id)


def _record_intent(journal: Journal, idm: bytes, identity: Identity, purse, blocks: list[bytes],
                   charges: IssueCharges, at: datetime):
    """The issue's durable intent (counter 0 -> 1: the money collected, the purse slot 0 the
    card will show), made before the card (file or card on a reader) is written."""
    log_block = log_block_for(1)
    write = journal.record_intent(
        tap_id=secrets.token_hex(8), card_number=identity.card_number, idm=idm, kind=ISSUE,
        counter_before=0, slot_before=b"", counter_after=1,
        expected_slot=b"".join(blocks[b] for b in PURSE_SLOT_BLOCKS[0]),
        log_block=log_block, log_data=blocks[log_block], balance_before_cents=0,
        records=_records(charges, purse.aavs_reload_cents), outcome=None, at=at,
        remember_before=False)
    failpoints.hit("after-intent")
    return write


@dataclass(frozen=True)
class _EarlierIssue:
    """A card this terminal issued and nothing has changed since: the write that issued it (in
    doubt, or committed) and the card."""

    write: CardWrite
    card: CardImage


def _issued_here(journal: Journal, keys: SoftwareKeyStore, path: Path) -> _EarlierIssue | None:
    """The card file ``path`` as this terminal issued it, or None (not a card of ours, not as
    issued any more, not readable: the file is someone else's or the card has moved on)."""
    try:
        card_file = load_card(path)
    except (CardFileError, OSError):
        return None
    if not isinstance(card_file, SimulatedLiteS):
        return None
    blocks = dict(enumerate(card_file.blocks))
    return _earlier_issue(journal, _decoded(blocks, card_file.idm, keys), blocks)


def _earlier_issue(journal: Journal, card: CardImage | None,
                   blocks: dict[int, bytes]) -> _EarlierIssue | None:
    """The issue of this terminal's that ``card`` (its ``blocks``) still is: its last change is
    that issue's write, in doubt (its purse slot landed) or committed. None for a card changed
    since (anywhere), or another terminal's."""
    if card is None or card.purse.counter != 1:
        return None
    slot = b"".join(blocks[b] for b in PURSE_SLOT_BLOCKS[card.purse_slot])
    plan = issue_on_card_step(journal.open_writes_for_idm(card.idm, ISSUE), True, slot, False)
    if plan.step is IssueStep.COMPLETE:
        return _EarlierIssue(plan.writes[0], card)
    done = journal.last_change(card.identity.card_number, 1, slot)
    if done is not None and done.kind == ISSUE and done.idm == card.idm:
        return _EarlierIssue(done, card)
    return None


def _completed_issue(journal: Journal, path: Path | None, earlier: _EarlierIssue,
                     at: datetime) -> IssuedCard:
    """An earlier issue reported: committed first if it was in doubt (the card shows its purse:
    seen, ``observed``); what it collected, nothing more."""
    write = earlier.write
    if write.state is WriteState.INTENT:
        write = journal.resolve_write(write, WriteState.COMMITTED, at, log_confirmed=True,
                                      observed=True)
    card = earlier.card
    charges = issue_charges(card.identity.kind, card.identity.category)
    return IssuedCard(path, card.identity, charges, card.purse.aavs_reload_cents, write.tap_id,
                      completed_from=write.tap_id, completed_at=write.created)


def _decoded(blocks: dict[int, bytes], idm: bytes, keys: SoftwareKeyStore):
    """The card image if the blocks verify with this terminal's keys, else None."""
    try:
        return decode_image(blocks, idm, lambda version: keys.card_key(version, idm))
    except (InvalidCard, KeyError):
        return None


# ---- a request's checks ---------------------------------------------------------------------

def check_card_files(paths: Sequence[str | Path]) -> None:
    """A request names one to five cards, each once (ServiceRefused otherwise)."""
    check_request_size(len(paths))
    if len({Path(p).absolute() for p in paths}) != len(paths):
        raise ServiceRefused("the same card file is named twice")


class CardDeclined(RequestRefused):
    """The card was declined (an older copy, an invalid card...): nothing was done, or only the
    status the action list orders was written to it, as a payment terminal would."""


class PartlyReturned(TerminalError):
    """A return stopped at one of its cards after the ones before it were returned: those are
    in ``results`` (their refunds are due); ``cause`` is why it stopped."""

    def __init__(self, results: list[TapResult], number: int, total: int,
                 cause: Exception) -> None:
        super().__init__(f"card {number} of {total}: {cause} (the {len(results)} card(s) "
                         "before it were returned)")
        self.results = results
        self.cause = cause


# ---- the changes ----------------------------------------------------------------------------

def change_card(terminal: Terminal, cards: CardReaders, spec: str, at: datetime, kind: str,
                decide: Callable[[CardImage, date], Decision], *,
                inject_faults: bool = True, repeats: bool = False) -> TapResult:
    """One service change to the card ``spec`` names, through the terminal's transaction. A
    refusal names the card (RequestRefused); a card declined is CardDeclined; a write cut off
    is TapInterrupted; the card errors are those of :meth:`CardReaders.session`. ``repeats``:
    see :meth:`Terminal.service` (a change the card can have only once, reported again)."""
    with cards.session(spec, inject_faults=inject_faults) as session:
        try:
            result = terminal.service(session, at, kind, decide, repeats=repeats)
        except RequestRefused as error:
            raise RequestRefused(f"{label(spec)}: {error}; nothing was done") from None
    if not result.approved:
        reason = result.reason.value if result.reason else "declined"
        if result.records:  # the action list's status, written to the card as a payment would
            raise CardDeclined(f"{label(spec)}: card refused: the action list orders it "
                               f"{reason}; that status was written to the card, nothing else "
                               "was done")
        hint = " (an older copy of the card)" if result.reason is Reason.ROLLBACK else ""
        raise CardDeclined(f"{label(spec)}: card refused: {reason}{hint}; nothing was done")
    return result


RETURN = "return"


def return_cards(terminal: Terminal, cards: CardReaders, specs: Sequence[str], at: datetime, *,
                 damaged: bool = False) -> list[TapResult]:
    """Return On-Loan cards (at most five): each refunded and cancelled. Every card file is
    checked first (:func:`check_return`), so a refusal changes no card; a card held to a reader
    is checked by its change (it is presented once). A card that fails after others were
    returned raises PartlyReturned with those (their refunds are due). A card whose last change
    is this terminal's return (cut off by a crash, or made before) is that return, reported
    (``completed_from``, its refund) whatever the time: it is never refunded twice."""
    check_request_size(len(specs))

    def decide(card: CardImage, day: date) -> Decision:
        reported = terminal.reported_lost(card, at)  # a card held to a reader is checked here
        if reported is not None:
            raise ServiceRefused(f"the card was reported lost at {reported.isoformat()}: a lost "
                                 "card is refunded by the central office only")
        return decide_return(card.identity, card.purse, day, damaged=damaged)[0]

    check_return(terminal, cards, specs, at, decide, damaged=damaged)
    results: list[TapResult] = []
    for number, spec in enumerate(specs, 1):
        try:
            result = change_card(terminal, cards, spec, at, RETURN, decide, repeats=True)
        except Exception as error:
            if not results:
                raise
            raise PartlyReturned(results, number, len(specs), error) from error
        results.append(result)
        terminal.idle()
    return results


def check_return(terminal: Terminal, cards: CardReaders, specs: Sequence[str], at: datetime,
                 decide: Callable[[CardImage, date], Decision], *, damaged: bool) -> None:
    """The return's all-or-nothing checks, on every card file before any card is changed: the
    clock, the refund's own checks (issue date, kind, status). A card with a return in doubt is
    left to its change (which completes or voids it); a card the action list orders blocked,
    suspended or cancelled (at the later of the rules' time and ``at``,
    :meth:`Terminal.list_status`) is marked as a payment terminal would, and the request stops
    (CardDeclined), even when the clock is not trusted: a doubtful clock never spares it. A card
    reported lost whose three hours are not up yet is not marked (it still works) but is not
    returned either (:meth:`Terminal.reported_lost`): the central office refunds it."""
    today = hk_date(at)
    for spec in filter(is_card_file, specs):
        image, slot = _look(cards, spec, terminal.keys)
        if has_in_doubt(terminal.journal.unresolved_writes(image.identity.card_number), RETURN):
            continue  # an interrupted return: its change completes or voids it
        if image.purse.status is Status.CANCELLED and _returned_here(terminal.journal, image,
                                                                     slot):
            continue  # this terminal's return, made again: its change reports it
        listed = terminal.list_status(image, at) > image.purse.status
        reported = None if listed else terminal.reported_lost(image, at)
        if reported is not None:  # inside the Notification Period: not blocked yet, not refunded
            raise RequestRefused(f"{label(spec)}: the card was reported lost at "
                                 f"{reported.isoformat()}: a lost card is refunded by the central "
                                 "office only; nothing was done")
        if terminal.clock_trusted(image, at):
            try:
                refund_breakdown(image.identity, image.purse, today, damaged=damaged)
            except ServiceRefused as error:
                raise RequestRefused(f"{label(spec)}: {error}; nothing was done") from None
        elif not listed:  # a doubtful clock never spares a listed card: it is marked below
            raise RequestRefused(f"{label(spec)}: {untrusted_clock(at)}; nothing was done")
        if listed:  # marks the card (as a payment would) and stops
            change_card(terminal, cards, spec, at, RETURN, decide, inject_faults=False)
            raise AssertionError("the action list's decline was not made")


def _look(cards: CardReaders, spec: str, keys: SoftwareKeyStore) -> tuple[CardImage, bytes]:
    """The card ``spec`` names, read and verified (:meth:`CardReaders.look`), and the bytes of
    its current purse slot (what a write of this terminal's would have left there)."""
    with cards.session(spec, look=True) as session:
        if session.idm is None:
            session.poll()
        idm = session.idm
        raw = dict(zip(FULL_READ_BLOCKS, session.read_blocks(FULL_READ_BLOCKS)))
    try:
        image = decode_image(raw, idm, lambda version: keys.card_key(version, idm))
    except InvalidCard as error:
        raise CardUnusable(f"{label(spec)}: invalid card: {error}") from None
    return image, b"".join(raw[b] for b in PURSE_SLOT_BLOCKS[image.purse_slot])


def _returned_here(journal: Journal, image: CardImage, slot: bytes) -> bool:
    """Whether the card's last change is this terminal's return (its purse slot holds exactly
    the bytes that return wrote)."""
    done = journal.last_change(image.identity.card_number, image.purse.counter, slot)
    return done is not None and done.kind == RETURN


def issue_on_reader(terminal: Terminal, cards: CardReaders, spec: str, request: IssueRequest,
                    at: datetime) -> IssuedCard:
    """Issue the blank card held to the reader ``spec`` (:func:`issue_on_card`; a cut-off issue
    is IssueInterrupted: present the card again and the same request completes it)."""
    with cards.session(spec) as session:
        return issue_on_card(terminal.journal, terminal.keys, session, request, at)


def inactivity_fee(cards: CardReaders, spec: str, keys: SoftwareKeyStore,
                   at: datetime) -> tuple[CardImage, InactivityFees]:
    """The card ``spec`` names and the inactivity fees it owes at ``at`` (read only)."""
    image = cards.look(spec, keys)
    today = hk_date(at)
    check_issued_by(image.identity, today)
    return image, inactivity_fees(image.identity, image.purse, today)
