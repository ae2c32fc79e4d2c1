"""``farebox demo``: a scripted day at a simulated terminal, through the same code as ``tap``.

It issues a test-key card into ``<state>/demo/``, then pays, auto-reloads, goes negative, adds
value, meets an older copy of itself and finally a lost-card list entry, printing each result.
"""

from __future__ import annotations

import json
from datetime import datetime, time, timedelta
from pathlib import Path

import click

from farebox.protocol.simcard import SimulatedLiteS, save_card
from farebox.terminal.clock import HONG_KONG, hk_date, now_utc
from farebox.terminal.issue import IssueRequest, issue, new_idm
from farebox.terminal.keys import published_test_keys
from farebox.terminal.rules import FareClass, ListEntry, ListReason, Tariff
from farebox.terminal.tap import Terminal

from . import output
from .common import json_option, open_card, open_journal, session_for, state_option

BUS = Tariff({FareClass.ADULT: 580, FareClass.CHILD: 290, FareClass.ELDER: 200,
              FareClass.STUDENT: 290, FareClass.DISABILITY: 200})


@click.command()
@state_option
@json_option
def demo(state_dir: Path | None, as_json: bool) -> None:
    """Run a scripted day on a simulated card (test keys) against the terminal state."""
    with open_journal(state_dir) as journal:
        folder = journal.path.parent / "demo"
        folder.mkdir(exist_ok=True)
        today = hk_date(now_utc())
        morning = datetime.combine(today, time(8, 0), HONG_KONG)
        keys = published_test_keys()
        idm = new_idm()
        identity, _, blocks = issue(IssueRequest(issued=today - timedelta(days=400), balance_cents=1_200,
                                          aavs_reload_cents=25_000), keys, idm)
        card_path = folder / f"card-{idm.hex()}.json"
        save_card(SimulatedLiteS(idm, blocks=blocks), card_path)
        card = open_card(card_path)
        terminal = Terminal(journal, keys)

        def step(caption: str, run, what: str = "fare") -> None:
            result = run()
            if as_json:
                click.echo(json.dumps({"step": caption, **output.tap_json(result, with_fare_class=True)}))
            else:
                click.echo(f"{caption}\n    {output.tap_human(result, what)}")

        if not as_json:
            click.echo(f"Card file {card_path} (TEST KEY), state {journal.path.parent}")
        step("08:00 bus fare 5.80 on 12.00", lambda: terminal.pay(session_for(card), BUS, morning))
        step("08:30 fare 6.20 would reach zero: AAVS reloads 250.00 in the same tap",
             lambda: terminal.pay(session_for(card), Tariff.flat(620), morning + timedelta(minutes=30)))
        copy_path = folder / f"card-{idm.hex()}-copy.json"
        save_card(card, copy_path)
        step("12:00 retail 280.00: one payment into negative value (AAVS already used today)",
             lambda: terminal.pay(session_for(card), Tariff.flat(28_000), morning + timedelta(hours=4)))
        step("12:05 bus fare on a negative balance: declined",
             lambda: terminal.pay(session_for(card), BUS, morning + timedelta(hours=4, minutes=5)))
        step("12:10 cash add value 100.00 pays off the negative value",
             lambda: terminal.add_value(session_for(card), 10_000, morning + timedelta(hours=4, minutes=10)),
             "add value")
        copy = open_card(copy_path)
        step("12:15 an older copy of the card (saved at 08:30): declined as rollback",
             lambda: terminal.pay(session_for(copy), BUS, morning + timedelta(hours=4, minutes=15)))
        lost = ListEntry(identity.card_number, ListReason.LOST, morning + timedelta(hours=5))
        terminal = Terminal(journal, keys, [lost])
        step("15:00 card reported lost at 13:00 (protected from 16:00): still works",
             lambda: terminal.pay(session_for(card), BUS, morning + timedelta(hours=7)))
        step("16:00 three hours after the report: declined, and the card is marked blocked",
             lambda: terminal.pay(session_for(card), BUS, morning + timedelta(hours=8)))
        if not as_json:
            click.echo(f"\nInspect it: farebox card show {card_path}")
