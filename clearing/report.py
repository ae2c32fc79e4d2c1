"""``clearing report``: what the receiver holds, as one JSON-ready dict."""

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


def build(store: Store) -> dict:
    totals: dict = {}
    for state, kind, count, amount in store.totals_by_type():
        totals.setdefault(state, {})[kind] = {"count": count, "amount": format_cents(amount)}
    terminals = []
    for terminal_id, incarnation, count, _, last in store.terminal_sequences():
        terminals.append({"terminal_id": terminal_id, "incarnation": incarnation,
                          "records": count, "last_seq": last,
                          "gaps": gaps(store.sequences(terminal_id, incarnation))})
    return {
        "totals": totals,
        "terminals": terminals,
        "duplicates_ignored": store.duplicates_ignored(),
        "open": [{"terminal_id": t, "incarnation": i, "seq": seq, "state": state,
                  "card": card, "amount": format_cents(amount)}
                 for t, i, seq, state, card, amount in store.open_unresolved()],
        "counter_forks": [{"card": card, "counter": counter, "writes": writes}
                          for card, counter, writes in store.counter_forks()],
    }
