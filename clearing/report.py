"""``clearing report``: what the receiver holds, as one JSON-ready dict, read from the summaries
the store keeps inside every ingest (day totals, per-terminal sequences and gaps, forks found):
no scan of the records, whatever their number."""

from __future__ import annotations

from farebox.cardimage.money import format_cents

from farebox.clearing.store import Store


def gaps(sequences: list[int]) -> list[list[int]]:
    """The missing runs ``[first, last]`` in ``sequences`` (sorted, from 1)."""
    missing, expected = [], 1
    for seq in sequences:
        if seq > expected:
            missing.append([expected, seq - 1])
        expected = seq + 1
    return missing


def build(store: Store, first_day: str | None = None, last_day: str | None = None) -> dict:
    """The report; totals for the UTC days ``first_day`` to ``last_day`` (``YYYY-MM-DD``, either
    left out: open on that side) of the records' own times."""
    totals: dict = {}
    for state, kind, count, amount in store.totals(first_day, last_day):
        totals.setdefault(state, {})[kind] = {"count": count, "amount": format_cents(amount)}
    terminals = [{"terminal_id": terminal_id, "incarnation": incarnation, "records": count,
                  "last_seq": last, "gaps": missing}
                 for terminal_id, incarnation, count, last, missing in store.sources()]
    report = {
        "totals": totals,
        "terminals": terminals,
        "duplicates_ignored": store.duplicates_ignored(),
        "open": [{"terminal_id": t, "incarnation": i, "seq": seq, "state": state,
                  "card": card, "amount": format_cents(amount)}
                 for t, i, seq, state, card, amount in store.open_unresolved()],
        "counter_forks": [{"card": card, "counter": counter, "writes": writes}
                          for card, counter, writes in store.counter_forks()],
    }
    if first_day is not None or last_day is not None:
        report["days"] = {"from": first_day, "to": last_day}
    return report
