"""``farebox doctor``: what is wrong and the exact command that fixes it."""

from __future__ import annotations

import click

from farebox.terminal.core.clock import now_utc
from farebox.terminal.ops.doctor import DEFAULT_CARD_TIMEOUT_S

from farebox.tools import output
from farebox.tools.common import config_option, json_option, state_option, verbose_option

#: exit status when a check fails (0: none fails, warnings allowed; 2: bad input)
EXIT_CHECK_FAILED = 3


@click.command()
@click.option("--reader", metavar="SPEC", help="also open this reader and look for a card")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, max=60),
              default=DEFAULT_CARD_TIMEOUT_S,
              show_default=True, help="seconds to wait for a card on --reader")
@verbose_option
@state_option
@config_option
@json_option
def doctor(reader, timeout_s, state_dir, config_file, as_json) -> None:
    """Check the configuration, USB permissions, kernel modules holding the reader, pcscd, the
    state directory, the clock, the keys and (with --reader, or the configured reader) a card
    in the field. Each check says ok, warn or
    fail, what it found and the fix to type. Exit 3 when a check fails, else 0."""
    from farebox.terminal.ops.doctor import (
        FAIL, DoctorOptions, load_checked_config, run_checks, worst,
    )

    config, config_finding = load_checked_config(config_file, state_dir=state_dir, reader=reader)
    findings = [config_finding] + run_checks(
        DoctorOptions(config, reader=config.reader, card_timeout_s=timeout_s), now_utc())
    overall = worst(findings)
    obj = {"status": overall,
           "checks": [{"check": f.check, "status": f.status, "found": f.found, "fix": f.fix}
                      for f in findings]}
    output.emit(obj, as_json, "" if as_json else _human(obj))
    if overall == FAIL:
        raise click.exceptions.Exit(EXIT_CHECK_FAILED)


def _human(obj: dict) -> str:
    from farebox.tools.render import render, table

    rows = [(c["status"].upper(), c["check"], c["found"], c["fix"] or "")
            for c in obj["checks"]]
    return render(table(None, ("", "check", "found", "fix"), rows),
                  f"overall: {obj['status']}")
