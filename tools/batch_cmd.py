"""``farebox batch close|list|verify``: the terminal's signed settlement batches."""

from __future__ import annotations

import click

from farebox.cardimage.money import format_cents as fmt
from farebox.terminal.core.clock import now_utc
from farebox.terminal.runtime import batch_policy, open_settlement
from farebox.terminal.store.settlement import DEFAULT_MAX_ITEMS, Batch

from farebox.tools import output
from farebox.tools.common import config_option, json_option, settings, state_option

#: exit status of ``batch verify`` when a batch does not verify (0: all verify; 2: bad input)
EXIT_VERIFY_FAILED = 3


@click.group()
def batch() -> None:
    """The terminal's settlement batches."""


@batch.command("close")
@state_option
@config_option
@click.option("--max-records", type=click.IntRange(min=1), default=DEFAULT_MAX_ITEMS,
              show_default=True, help="records per batch at most")
@json_option
def close(state_dir, config_file, max_records, as_json) -> None:
    """Close every record ready for settlement into signed batches (records whose card write is
    still in doubt wait for a later batch; one still in doubt a batch period after it was made
    rides as in doubt)."""
    config = settings(config_file, state_dir=state_dir)
    policy = batch_policy(config)
    closed = []
    with open_settlement(config) as settlement:
        while (made := settlement.close_batch(now_utc(), max_records,
                                              policy.in_doubt_after)) is not None:
            closed.append(made)
        held_back, in_doubt = settlement.held_back(), settlement.sent_in_doubt()
        pruned = settlement.prune(now_utc(), policy.retention)
    obj = {"closed": [_batch_json(b) for b in closed], "held_back": held_back,
           "in_doubt": in_doubt, "pruned": pruned}
    lines = [f"closed batch {b.number}: {b.items} records (#{b.first_seq}-#{b.last_seq})"
             for b in closed] or ["nothing to close"]
    if held_back:
        lines.append(f"{held_back} records wait for their card write to be resolved")
    if in_doubt:
        lines.append(f"{in_doubt} records were sent in doubt; they ride again once resolved")
    if pruned:
        lines.append(f"dropped the bodies of {pruned} batches acknowledged over "
                     f"{config.batch_retention_days} days ago")
    output.emit(obj, as_json, "\n".join(lines))


@batch.command("list")
@state_option
@config_option
@json_option
def list_batches(state_dir, config_file, as_json) -> None:
    """Every batch, with its totals and whether the clearing house has acknowledged it."""
    config = settings(config_file, state_dir=state_dir)
    with open_settlement(config) as settlement:
        batches = settlement.batches()
        pending = settlement.pending_items(now_utc(), batch_policy(config).in_doubt_after)
        held_back, in_doubt = settlement.held_back(), settlement.sent_in_doubt()
        terminal_id = settlement.identity.terminal_id
    obj = {"terminal_id": terminal_id, "batches": [_batch_json(b) for b in batches],
           "ready": pending, "held_back": held_back, "in_doubt": in_doubt}
    lines = [f"Terminal {terminal_id}: {len(batches)} batches, {pending} records ready, "
             f"{held_back + in_doubt} in doubt ({in_doubt} of them sent in doubt)"]
    for b in obj["batches"]:
        paid = b["totals"].get("committed", {})
        summary = ", ".join(f"{kind} {t['count']} = {t['amount']}" for kind, t in paid.items())
        lines.append(f"  batch {b['number']:<5} {b['closed']}  {b['records']:>5} records  "
                     f"{'acked' if b['acked'] else 'not acked'}  {summary}")
    output.emit(obj, as_json, "\n".join(lines))


@batch.command("verify")
@click.option("--deep", is_flag=True,
              help="also parse and hash every record again and add the totals up again")
@state_option
@config_option
@json_option
def verify(deep, state_dir, config_file, as_json) -> None:
    """Check every batch's hash, chain, signature and record hashes (exit 3 if one fails)."""
    config = settings(config_file, state_dir=state_dir)
    with open_settlement(config) as settlement:
        check = settlement.verify(deep=deep)
    obj = {"ok": check.ok, "batches": check.batches, "bad_batch": check.bad_batch,
           "problem": check.problem}
    human = (f"batches verify: {check.batches}" if check.ok else
             f"batch {check.bad_batch} does NOT verify: {check.problem}")
    output.emit(obj, as_json, human)
    if not check.ok:
        raise click.exceptions.Exit(EXIT_VERIFY_FAILED)


def _batch_json(batch: Batch) -> dict:
    return {
        "number": batch.number, "closed": batch.closed_utc, "records": batch.items,
        "first_seq": batch.first_seq, "last_seq": batch.last_seq, "hash": batch.hash,
        "acked": batch.acked_utc is not None, "pruned": batch.pruned,
        "totals": {state: {kind: {"count": t["count"], "amount": fmt(t["amount_cents"])}
                           for kind, t in by_type.items()}
                   for state, by_type in batch.totals.items()},
    }
