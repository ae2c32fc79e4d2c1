"""``farebox failpoints``: the named places ``FAREBOX_FAILPOINT`` can make the process die."""

from __future__ import annotations

import click

from farebox.terminal.failpoints import ENV, FAILPOINT_EXIT, FAILPOINTS

from farebox.tools import output
from farebox.tools.common import json_option


@click.command()
@json_option
def failpoints(as_json) -> None:
    """List the failpoints in the order a tap and a batch close reach them."""
    obj = {"env": ENV, "exit_status": FAILPOINT_EXIT,
           "failpoints": [{"name": name, "where": where} for name, where in FAILPOINTS.items()]}
    lines = [f"{ENV}=NAME makes the process die there (exit {FAILPOINT_EXIT}):"]
    lines += [f"  {name:<22} {where}" for name, where in FAILPOINTS.items()]
    output.emit(obj, as_json, "\n".join(lines))
