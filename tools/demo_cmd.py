"""``farebox demo``: a scripted day at a simulated terminal, through the same code as ``tap``.

It issues a test-key card into ``<state>/cards/``, then pays, auto-reloads, goes negative, adds
value, meets an older copy of itself and finally a lost-card list entry, printing each result.
Its state is its own (``<data dir>/demo`` unless ``--state`` is given), never the terminal's.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, time, timedelta
from pathlib import Path

import click

from farebox.terminal.core.clock import HONG_KONG, hk_date, now_utc
from farebox.terminal.card.issue import IssueRequest, issue_card_file, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.core.rules import FareClass, ListEntry, ListReason, Tariff
from farebox.terminal.runtime import card_readers, default_state_dir

from farebox.tools import output
from farebox.tools.common import json_option, settings, state_option, terminal

BUS = Tariff({FareClass.ADULT: 580, FareClass.CHILD: 290, FareClass.ELDER: 200,
              FareClass.STUDENT: 290, FareClass.DISABILITY: 200})


@click.command()
@state_option
@json_option
def demo(state_dir: Path | None, as_json: bool) -> None:
    """Run a scripted day on a simulated card (test keys), with its own state."""
    config = settings(None, state_dir=state_dir or default_state_dir() / "demo", makes_state=True)
    folder = config.state_dir / "cards"
    folder.mkdir(parents=True, exist_ok=True)
    with terminal(config) as term:
        # The demo's day is today, or the day after the last one its state has seen: a terminal
        # distrusts a clock that runs behind its own history.
        today = hk_date(now_utc())
        seen = term.journal.time_high_water()
        if seen is not None and hk_date(seen) >= today:
            today = hk_date(seen) + timedelta(days=1)
        morning = datetime.combine(today, time(8, 0), HONG_KONG)
        card_path = folder / f"card-{new_idm().hex()}.json"
        identity = issue_card_file(card_path, IssueRequest(
            issued=today - timedelta(days=400), balance_cents=1_200, aavs_reload_cents=25_000),
            published_test_keys())
        copy_path = card_path.with_name(card_path.stem + "-copy.json")

        cards = card_readers()

        def step(caption: str, card: Path, run, what: str = "fare") -> None:
            with cards.session(f"sim:{card}") as session:
                result = run(session)
            term.idle()
            if as_json:
                click.echo(json.dumps({"step": caption,
                                       **output.tap_json(result, with_fare_class=True)}))
            else:
                click.echo(f"{caption}\n    {output.tap_human(result, what)}")

        if not as_json:
            click.echo(f"Card file {card_path} (TEST KEY), state {config.state_dir}")
        step("08:00 bus fare 5.80 on 12.00", card_path,
             lambda s: term.pay(s, BUS, morning))
        step("08:30 fare 6.20 would reach zero: AAVS reloads 250.00 in the same tap", card_path,
             lambda s: term.pay(s, Tariff.flat(620), morning + timedelta(minutes=30)))
        shutil.copyfile(card_path, copy_path)
        step("12:00 retail 280.00: one payment into negative value (AAVS already used today)",
             card_path, lambda s: term.pay(s, Tariff.flat(28_000), morning + timedelta(hours=4)))
        step("12:05 bus fare on a negative balance: declined", card_path,
             lambda s: term.pay(s, BUS, morning + timedelta(hours=4, minutes=5)))
        step("12:10 cash add value 100.00 pays off the negative value", card_path,
             lambda s: term.add_value(s, 10_000, morning + timedelta(hours=4, minutes=10)),
             "add value")
        step("12:15 an older copy of the card (saved at 08:30): declined as rollback", copy_path,
             lambda s: term.pay(s, BUS, morning + timedelta(hours=4, minutes=15)))
        lost = ListEntry(identity.card_number, ListReason.LOST, morning + timedelta(hours=5))
        term.action_list = (lost,)
        step("15:00 card reported lost at 13:00 (protected from 16:00): still works", card_path,
             lambda s: term.pay(s, BUS, morning + timedelta(hours=7)))
        step("16:00 three hours after the report: declined, and the card is marked blocked",
             card_path, lambda s: term.pay(s, BUS, morning + timedelta(hours=8)))
    if not as_json:
        click.echo(f"\nInspect it: farebox card show {card_path}")
