"""``farebox upload``: send the terminal's unacknowledged batches to the clearing house."""

from __future__ import annotations

import sys

import click

from farebox.terminal.core.clock import now_utc
from farebox.terminal.runtime import clearing_house_for, open_settlement

from farebox.tools import output
from farebox.tools.common import config_option, json_option, settings, state_option

#: exit status when some batch could not be delivered (0: all acknowledged; 2: bad input)
EXIT_INCOMPLETE = 3


@click.command()
@state_option
@config_option
@click.option("--url", help="the clearing house, e.g. https://clearing.example "
              "[default: clearing_url in --config]")
@click.option("--attempts", type=click.IntRange(1, 20), default=5, show_default=True,
              help="tries per batch (backoff with jitter between them)")
@json_option
def upload(state_dir, config_file, url, attempts, as_json) -> None:
    """Upload every unacknowledged batch, oldest first; a batch counts as delivered only on an
    ack signed with clearing_public_key (exit 3 if one could not be delivered)."""
    from farebox.terminal.link.upload import upload as send

    if url is not None and not url.startswith(("http://", "https://")):
        raise click.BadParameter("expected http://... or https://...", param_hint="--url")
    config = settings(config_file, state_dir=state_dir)
    house = clearing_house_for(config, url)
    with open_settlement(config) as settlement:
        total = len(settlement.unacknowledged())
        show = total > 0 and not as_json and sys.stderr.isatty()
        with click.progressbar(length=total, label="uploading batches", file=sys.stderr,
                               hidden=not show) as bar:
            result = send(settlement, house, now_utc, attempts=attempts,
                          on_batch=lambda batch, acked: bar.update(1))
    obj = {"acknowledged": result.acknowledged, "pending": result.pending,
           "stopped_at": result.stopped_at, "reason": result.reason}
    if result.complete:
        human = f"uploaded {len(result.acknowledged)} batches; {result.pending} pending"
    else:
        human = (f"uploaded {len(result.acknowledged)} batches; stopped at batch "
                 f"{result.stopped_at}: {result.reason}")
    output.emit(obj, as_json, human)
    if not result.complete:
        raise click.exceptions.Exit(EXIT_INCOMPLETE)
