"""``farebox readers``: every nfcpy USB reader and PC/SC reader found, and whether it is usable."""

from __future__ import annotations

import click

from farebox.tools import output
from farebox.tools.common import json_option, verbose_option


@click.command()
@click.option("--no-card-check", "skip_cards", is_flag=True,
              help="do not connect to PC/SC readers to see whether a card is present")
@verbose_option
@json_option
def readers(skip_cards: bool, as_json: bool) -> None:
    """List nfcpy USB readers (by vendor/product id in sysfs), the serial ports an nfcpy tty
    reader may be on (not probed) and PC/SC readers (through pcscd; PCSCLITE_CSOCK_NAME is
    honoured), each with the --reader spec to use and whether it is usable. pcscd not running
    is reported, not an error."""
    from farebox.terminal.ops.readers import pcsc_readers, pcscd_holds, tty_devices, usb_readers

    usb = usb_readers()
    pcsc = pcsc_readers(probe_cards=not skip_cards)
    entries = []
    for device in usb:
        problems = device.problems
        held = pcscd_holds(device, pcsc)
        if held:
            problems.append(f"pcscd holds it as {held!r}")
        entries.append({
            "kind": "nfcpy", "spec": device.id_path, "path": device.path,
            "name": device.product or device.driver, "driver": device.driver,
            "device": str(device.devnode), "usable": not problems, "problems": problems,
            "card_present": None,
        })
    for tty in tty_devices():
        entries.append({
            "kind": "tty", "spec": tty.path, "path": tty.path, "name": tty.device.name,
            "driver": "pn532 or arygon (not probed)", "device": str(tty.device),
            "usable": tty.accessible,
            "problems": [] if tty.accessible else [f"no read/write permission on {tty.device}"],
            "card_present": None,
        })
    for reader in pcsc.readers:
        entries.append({
            "kind": "pcsc", "spec": reader.path, "path": reader.path, "name": reader.name,
            "driver": "pcscd", "device": pcsc.socket, "usable": reader.problem is None,
            "problems": [] if reader.problem is None else [reader.problem],
            "card_present": reader.card_present,
        })
    obj = {"readers": entries,
           "pcscd": {"running": pcsc.available, "socket": pcsc.socket, "problem": pcsc.problem}}
    output.emit(obj, as_json, "" if as_json else _human(obj))


def _human(obj: dict) -> str:
    from farebox.tools.render import render, table

    rows = [(r["kind"], r["spec"], r["name"], "yes" if r["usable"] else "NO",
             {True: "yes", False: "no", None: ""}[r["card_present"]], "; ".join(r["problems"]))
            for r in obj["readers"]]
    items = [table("Readers", ("kind", "--reader", "name", "usable", "card", "problems"), rows)
             if rows else "No readers found."]
    pcscd = obj["pcscd"]
    items.append(f"pcscd: running on {pcscd['socket']}" if pcscd["running"]
                 else f"pcscd: {pcscd['problem']}")
    return render(*items)
