"""``farebox service``: the customer service centre's operations (docs/rules.md §6, §8).

Each command parses, calls one function of the service desk (``terminal/card/desk.py``: the
request's checks, the pure rules in ``service.py``, the card write in ``tap.Terminal.service``)
and prints. A CARD is a simulated card file; ``--reader SPEC`` takes the card presented to a
reader instead (``udp:HOST:PORT``, ``usb``, ``pcsc``...).
"""

from __future__ import annotations

from pathlib import Path

import click

from farebox.cardimage.model import AAVS_RELOAD_CENTS, Category, Concession, Kind
from farebox.cardimage.money import format_cents as fmt
from farebox.terminal.card.desk import (
    PartlyReturned, change_card, check_card_files, inactivity_fee as inactivity_fee_due,
    issue_cards, issue_on_reader, return_cards,
)
from farebox.terminal.card.issue import IssueRequest
from farebox.terminal.card.tap import TapResult
from farebox.terminal.core.cardnumber import format_number
from farebox.terminal.core.clock import hk_date, now_utc, utc_iso
from farebox.terminal.core.rules import RecordType, is_inactive
from farebox.terminal.core.service import (
    ServiceRefused, decide_aavs, decide_reactivate, decide_renew_student, decide_upgrade_limit,
)
from farebox.terminal.runtime import card_readers, load_keys

from farebox.tools import output
from farebox.tools.common import (
    InputError, config_option, json_option, settings, state_notice, state_option,
    terminal, verbose_option,
)
from farebox.tools.params import AMOUNT, DATE, POSITIVE_AMOUNT, TIME
from farebox.tools.tap_cmd import _faults, hotlist_option, leave_after_option, torn_write_option

_KINDS = {k.label: k for k in Kind}
_CATEGORIES = {c.label: c for c in Category}
_CONCESSIONS = {c.label: c for c in Concession}
_AAVS_CHOICES = [str(c // 100) for c in AAVS_RELOAD_CENTS]
DEFAULT_WAIT_S = 10.0

cards_argument = click.argument("card_files", metavar="CARD...", nargs=-1,
                                type=click.Path(dir_okay=False, path_type=Path))
card_argument = click.argument("card_file", metavar="[CARD]", required=False,
                               type=click.Path(dir_okay=False, path_type=Path))
at_option = click.option("--at", type=TIME, help="time of the operation, ISO 8601 with offset "
                         "[default: now]")
_reader = click.option("--reader", "reader_spec", metavar="SPEC",
                       help="the card presented to this reader (udp:HOST:PORT, usb, pcsc...) "
                            "instead of a CARD file")


def reader_option(command):
    """``--reader SPEC``, with ``-v``/``-vv`` (every frame) for debugging that reader."""
    return _reader(verbose_option(command))
wait_option = click.option("--wait", "wait_s", type=click.FloatRange(min=0.1, max=600),
                           default=DEFAULT_WAIT_S, show_default=True,
                           help="with --reader: seconds to wait for the card")


@click.group()
def service() -> None:
    """Service centre: issue, return, reactivate, AAVS, student status, limits, inactivity fee."""


# ---- issue ----------------------------------------------------------------------------------

@service.command("issue")
@cards_argument
@click.option("--category", type=click.Choice(list(_CATEGORIES)), required=True)
@click.option("--kind", type=click.Choice(list(_KINDS)), default="on-loan", show_default=True)
@click.option("--concession", type=click.Choice(list(_CONCESSIONS)), default="none",
              show_default=True, help="Personalised cards only")
@click.option("--concession-expiry", type=DATE, help="last day a student concession is valid")
@click.option("--birth-date", type=DATE,
              help="the holder's date of birth (Personalised cards only): age rules follow it")
@click.option("--aavs", type=POSITIVE_AMOUNT, help="AAVS reload amount: 150, 250, 500 or 1000")
@reader_option
@wait_option
@at_option
@state_option
@config_option
@json_option
def issue(card_files, category, kind, concession, concession_expiry, birth_date, aavs,
          reader_spec, wait_s, at, state_dir, config_file, as_json) -> None:
    """Issue new cards into the files CARD... (at most five), or the blank card held to
    --reader: deposit, initial value and, for a Personalised card, the HK$20 administrative fee
    are collected and journalled. Run again after a crash, a card this terminal already issued
    (and nothing has changed since) is reported with what its issue collected, not redone."""
    if reader_spec is not None and card_files:
        raise click.UsageError("give CARD files or --reader, not both")
    if reader_spec is None and not card_files:
        raise click.UsageError("give CARD files or --reader SPEC (a blank card held to it)")
    at = at or now_utc()
    config = settings(config_file, state_dir=state_dir)
    request = IssueRequest(issued=hk_date(at), kind=_KINDS[kind], category=_CATEGORIES[category],
                           concession=_CONCESSIONS[concession],
                           concession_expiry=concession_expiry, aavs_reload_cents=aavs or 0,
                           birth_date=birth_date)
    cards = card_readers(wait_s=wait_s, again="present")
    with terminal(config) as term:
        try:
            if reader_spec is None:
                issued = issue_cards(term.journal, term.keys, list(card_files), request, at)
            else:
                issued = [issue_on_reader(term, cards, reader_spec, request, at)]
        except OSError as error:
            raise click.ClickException(str(error)) from None
        term.idle()
    issued_cards = [{
        "card": format_number(card.identity.card_number),
        "file": None if card.path is None else str(card.path),
        "reader": reader_spec if card.path is None else None,
        "completed_from": card.completed_from,
        "completed_at": card.completed_at and utc_iso(card.completed_at),
        "kind": card.identity.kind.label, "category": card.identity.category.label,
        "issued": card.identity.issued.isoformat(),
        "birth_date": card.identity.birth_date and card.identity.birth_date.isoformat(),
        "deposit": fmt(card.charges.deposit_cents),
        "initial_value": fmt(card.charges.initial_value_cents),
        "fee": fmt(card.charges.fee_cents), "collected": fmt(card.charges.collected_cents),
        "aavs": fmt(card.aavs_reload_cents) if card.aavs_reload_cents else None,
    } for card in issued]
    total = sum(card.charges.collected_cents for card in issued)
    human = "\n".join(f"ISSUED card {c['card']} ({c['kind']} {c['category']}) -> "
                      f"{c['file'] or c['reader']}  "
                      f"deposit {c['deposit']} + value {c['initial_value']} + fee {c['fee']} "
                      f"= {c['collected']}"
                      + (f"  (completes issue {c['completed_from']}: nothing more was done)"
                         if c["completed_from"] else "") for c in issued_cards)
    output.emit({"cards": issued_cards, "collected": fmt(total)}, as_json,
                f"{human}\ncollect {fmt(total)}" + _once("issue", issued_cards, "collected",
                                                         "collect it once"))
    state_notice(config)


# ---- return ---------------------------------------------------------------------------------

@service.command("return")
@cards_argument
@click.option("--damaged", is_flag=True, help="the cards are returned damaged (HK$30 each)")
@reader_option
@wait_option
@at_option
@state_option
@config_option
@hotlist_option
@leave_after_option
@torn_write_option
@json_option
def return_(card_files, damaged, reader_spec, wait_s, at, state_dir, config_file, hotlist,
            leave_after, torn_write, as_json) -> None:
    """Return On-Loan cards (at most five): refund the deposit and the value less the fees; each
    card is cancelled. Every card is checked before any is changed. A card whose last change is
    this terminal's return (the command run again after a crash, however long after) is
    reported with that return's refund (completed_from), never refunded twice."""
    specs = _specs(card_files, reader_spec, leave_after, torn_write, many=True)
    config = settings(config_file, state_dir=state_dir, action_list=hotlist)
    cards = card_readers(faults=_faults(leave_after, torn_write), wait_s=wait_s, again="present")
    with terminal(config) as term:
        try:
            results = return_cards(term, cards, specs, at or now_utc(), damaged=damaged)
        except PartlyReturned as error:  # say which cards were returned, then exit 1
            _emit_returns([_return_json(r) for r in error.results], as_json)
            raise click.ClickException(str(error)) from None
    _emit_returns([_return_json(r) for r in results], as_json)
    state_notice(config)


def _emit_returns(results: list[dict], as_json: bool) -> None:
    total = sum(r["_refund_cents"] for r in results)
    results = [{k: v for k, v in r.items() if k != "_refund_cents"} for r in results]
    human = "\n".join(
        f"RETURNED card {r['card']}  deposit {r['deposit']} + value {r['remaining_value']} "
        + (f"- inactivity {r['inactivity_fee']} " if r["inactivity_fee"] != "0.00" else "")
        + f"- handling {r['handling_fee']} - damage {r['damage_fee']} - personalisation "
        f"{r['personalisation_fee']} = refund {r['refund']}"
        + (f" (waived {r['waived']})" if r["waived"] != "0.00" else "")
        + (f"  (completes return {r['completed_from']}: nothing more was done)"
           if r["completed_from"] else "")
        for r in results)
    output.emit({"cards": results, "refund": fmt(total)}, as_json,
                f"{human}\npay out {fmt(total)}" + _once("return", results, "refund",
                                                         "pay it once"))


def _once(what: str, cards: list[dict], amount: str, advice: str) -> str:
    """The total's note when it holds changes booked before this run (reported, not made
    again): which ones, when they were booked, and that their money changes hands once."""
    earlier = [c for c in cards if c["completed_from"]]
    if not earlier:
        return ""
    if len(cards) == 1:
        only = earlier[0]
        noun = "the refund of " if what == "return" else ""
        return f" ({noun}{what} {only['completed_from']}, booked {only['completed_at']}: {advice})"
    named = "; ".join(f"{what} {c['completed_from']} {c[amount]}, booked {c['completed_at']}"
                      for c in earlier)
    return f" (includes {named}: each once)"


def _return_json(result: TapResult) -> dict:
    amounts = _by_type(result)
    refund = amounts.get(RecordType.REFUND, 0)
    return {
        "card": format_number(result.card_number),
        "refund": fmt(refund),
        "deposit": fmt(amounts.get(RecordType.DEPOSIT_REFUND, 0)),
        "remaining_value": fmt(result.balance_before_cents),
        "inactivity_fee": fmt(amounts.get(RecordType.INACTIVITY_FEE, 0)),
        "handling_fee": fmt(amounts.get(RecordType.HANDLING_FEE, 0)),
        "damage_fee": fmt(amounts.get(RecordType.DAMAGE_FEE, 0)),
        "personalisation_fee": fmt(amounts.get(RecordType.PERSONALISATION_FEE, 0)),
        "negative_offset": fmt(amounts.get(RecordType.NEGATIVE_OFFSET, 0)),
        "waived": fmt(amounts.get(RecordType.WAIVED, 0)),
        "status": "cancelled",
        **_common(result),
        "completed_at": result.completed_at and utc_iso(result.completed_at),
        "_refund_cents": refund,
    }


# ---- reactivate, aavs, renew-student, upgrade-limit -----------------------------------------

def _single_card_command(name: str, help_text: str):
    """The options every one-card service change takes."""
    def wrap(function):
        for option in reversed((card_argument, reader_option, wait_option, at_option,
                                state_option, config_option, hotlist_option,
                                leave_after_option, torn_write_option, json_option)):
            function = option(function)
        return service.command(name, help=help_text)(function)
    return wrap


@_single_card_command("reactivate", "Reactivate an inactive card (free, less any inactivity "
                      "fees due) or an AAVS-suspended one once the amount the action list says "
                      "it owes is paid (--paid; HK$20 to the bank account).")
@click.option("--paid", "paid_cents", type=AMOUNT, default=0,
              help="what the customer paid of the AAVS amount outstanding (HK$, e.g. 150.00): "
                   "exactly the amount the action list names")
def reactivate(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist,
               leave_after, torn_write, as_json, paid_cents) -> None:
    at = at or now_utc()
    def decide_with(term):
        def decide(card, day):
            return decide_reactivate(card.identity, card.purse, day,
                                     suspension=term.suspension(card, at),
                                     paid_cents=paid_cents, list_held=term.list_held,
                                     list_fresh=term.list_fresh(at))[0]
        return decide

    def shape(result: TapResult) -> dict:
        amounts = _by_type(result)
        return {"inactivity_fee": fmt(amounts.get(RecordType.INACTIVITY_FEE, 0)),
                "waived": fmt(amounts.get(RecordType.WAIVED, 0)),
                "outstanding_paid": fmt(amounts.get(RecordType.AAVS_OUTSTANDING_PAID, 0)),
                "reactivation_fee": fmt(amounts.get(RecordType.AAVS_REACTIVATION_FEE, 0)),
                "status": "active"}

    _one(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist, leave_after,
         torn_write, as_json, "reactivate", decide_with, shape, "REACTIVATED", factory=True)


@_single_card_command("aavs", "Enable, change (--amount) or cancel (--cancel) the card's "
                      "Automatic Add Value Service. Enabling it again after a cancellation "
                      "costs HK$20, charged to the bank account.")
@click.option("--amount", type=click.Choice(_AAVS_CHOICES), help="reload amount (HK$)")
@click.option("--cancel", is_flag=True, help="cancel AAVS (the card stays usable)")
def aavs(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist, leave_after,
         torn_write, as_json, amount, cancel) -> None:
    if (amount is None) == (not cancel):
        raise click.UsageError("give exactly one of --amount and --cancel")
    cents = None if cancel else int(amount) * 100

    def decide(card, day):
        return decide_aavs(card.identity, card.purse, day, cents)[0]

    def shape(result: TapResult) -> dict:
        amounts = _by_type(result)
        return {"action": "cancel" if cancel else "set",
                "aavs": None if cancel else fmt(cents),
                "fee": fmt(amounts.get(RecordType.AAVS_REACTIVATION_FEE, 0)),
                "fee_charged_to": "bank_account"}

    # the kind names the amount: a retry completes an interrupted change only if it is the same
    kind = "aavs_cancel" if cancel else f"aavs_{amount}"
    _one(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist, leave_after,
         torn_write, as_json, kind, decide, shape, "AAVS CANCELLED" if cancel else "AAVS SET")


@_single_card_command("renew-student", "Activate (a Personalised card without a status) or "
                      "renew a Personalised card's Student status until --expiry (inclusive).")
@click.option("--expiry", type=DATE, required=True, help="last day the status is valid")
def renew_student(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist,
                  leave_after, torn_write, as_json, expiry) -> None:
    seen = {}

    def decide(card, day):
        seen["action"] = "renew" if card.purse.concession is Concession.STUDENT else "activate"
        return decide_renew_student(card.identity, card.purse, day, expiry)

    _one(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist, leave_after,
         torn_write, as_json, "renew_student", decide,
         lambda result: {"action": seen.get("action"), "concession": "student",
                         "concession_expiry": expiry.isoformat()},
         lambda obj: ("STUDENT STATUS ACTIVATED" if obj["action"] == "activate"
                      else "STUDENT STATUS RENEWED"))


@_single_card_command("upgrade-limit", "Move a card issued before 2019-12-01 to the HK$3,000 "
                      "stored value limit.")
def upgrade_limit(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist,
                  leave_after, torn_write, as_json) -> None:
    def decide(card, day):
        return decide_upgrade_limit(card.identity, card.purse, day)

    _one(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist, leave_after,
         torn_write, as_json, "upgrade_limit", decide,
         lambda result: {"stored_value_limit": "3000.00"}, "LIMIT UPGRADED")


# ---- inactivity fee (looks only) ------------------------------------------------------------

@service.command("inactivity-fee")
@card_argument
@reader_option
@wait_option
@at_option
@config_option
@json_option
def inactivity_fee(card_file, reader_spec, wait_s, at, config_file, as_json) -> None:
    """The Inactive Octopus Administrative Fee the card owes at --at (docs/rules.md §6): each
    period's start and fee, or why it owes none. Reads the card; changes nothing."""
    spec = _specs((card_file,) if card_file else (), reader_spec, many=False)[0]
    at = at or now_utc()
    config = settings(config_file)
    image, fees = inactivity_fee_due(card_readers(wait_s=wait_s), spec, load_keys(config), at)
    today = hk_date(at)
    obj = {
        "card": format_number(image.identity.card_number),
        "date": today.isoformat(),
        "exempt": fees.exempt,
        "first_period": fees.first_period and fees.first_period.isoformat(),
        "periods": [{"start": p.start.isoformat(), "fee": fmt(p.fee_cents)} for p in fees.periods],
        "due": fmt(fees.due_cents),
        "balance": fmt(image.purse.balance_cents),
        "inactive": is_inactive(image.purse, today),
    }
    if fees.exempt:
        human = f"card {obj['card']}: no inactivity fee ({fees.exempt})"
    else:
        lines = [f"  period from {p['start']}: {p['fee']}" for p in obj["periods"]]
        human = "\n".join([f"card {obj['card']} on {obj['date']}: due {obj['due']} "
                           f"(first period {obj['first_period']})", *lines])
    output.emit(obj, as_json, human)


# ---- plumbing -------------------------------------------------------------------------------

def _specs(card_files, reader_spec: str | None, leave_after: int | None = None,
           torn_write: int | None = None, *, many: bool) -> list[str]:
    if reader_spec is not None and card_files:
        raise click.UsageError("give CARD files or --reader, not both")
    if reader_spec is not None:
        if leave_after is not None or torn_write is not None:
            raise InputError("--leave-after and --torn-write need a CARD file")
        return [reader_spec]
    if not card_files:
        raise click.UsageError("give a CARD file or --reader SPEC")
    if many:
        try:
            check_card_files(card_files)
        except ServiceRefused as error:
            raise InputError(str(error)) from None
    return [f"sim:{path}" for path in card_files]


def _one(card_file, reader_spec, wait_s, at, state_dir, config_file, hotlist, leave_after,
         torn_write, as_json, kind, decide, shape, head, *, factory: bool = False) -> None:
    """One change to one card. ``factory``: ``decide`` takes the open terminal and returns
    the decision function (a change that reads the terminal's action list)."""
    spec = _specs((card_file,) if card_file else (), reader_spec, leave_after, torn_write,
                  many=False)[0]
    at = at or now_utc()
    config = settings(config_file, state_dir=state_dir, action_list=hotlist)
    cards = card_readers(faults=_faults(leave_after, torn_write), wait_s=wait_s, again="present")
    with terminal(config) as term:
        result = change_card(term, cards, spec, at, kind, decide(term) if factory else decide)
        obj = {"card": format_number(result.card_number), **shape(result),
               "balance_before": fmt(result.balance_before_cents),
               "balance_after": fmt(result.balance_after_cents), **_common(result)}
        term.idle()
    extra = "  ".join(f"{k} {v}" for k, v in obj.items()
                      if k not in ("card", "records", "counter", "completed_from",
                                   "clock_trusted") and v is not None)
    if result.completed_from:  # a change cut off earlier, completed now: reported, not redone
        extra += f"  (completes {kind.replace('_', ' ')} {result.completed_from}: nothing more " \
                 "was done)"
    head = head(obj) if callable(head) else head
    output.emit(obj, as_json, f"{head}  card {obj['card']}  {extra}")
    state_notice(config)


def _by_type(result: TapResult) -> dict[RecordType, int]:
    amounts: dict[RecordType, int] = {}
    for record in result.records:
        amounts[record.type] = amounts.get(record.type, 0) + record.amount_cents
    return amounts


def _common(result: TapResult) -> dict:
    return {
        "records": [{"type": r.type.value, "amount": fmt(r.amount_cents),
                     "balance_after": fmt(r.balance_after_cents)} for r in result.records],
        "counter": result.counter,
        "completed_from": result.completed_from,
    }
