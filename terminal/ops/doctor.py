"""``farebox doctor``: the usual reasons a terminal does not work, each checked, with what was
found and the exact command that fixes it.

Every check gives ``ok``, ``warn`` (works, but not as it should in service) or ``fail`` (will not
work). The filesystem roots (``/sys``, ``/dev``, ``/run``) are parameters so tests build fake
trees; pcscd is asked through pyscard; the reader (``--reader``) is opened as the daemon would.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from farebox.protocol.errors import FelicaError
from farebox.protocol.frames import SYSTEM_CODE_WILDCARD

from farebox.terminal.config import ConfigError, TerminalConfig, load_config
from farebox.terminal.store.identity import IDENTITY_FILE, IdentityError, load_identity
from farebox.terminal.store.journal import Journal, JournalError
from farebox.terminal.card.keys import KeyFileError, load_key_file
from farebox.terminal.ops.readers import KERNEL_DRIVERS, PcscStatus, Roots, pcsc_readers, pcscd_holds, usb_readers
from farebox.terminal.runtime import JOURNAL_FILE, RuntimeSetupError, ReaderSpec, open_transport, state_dir
from farebox.terminal.runtime import clearing_house_for
from farebox.terminal.errors import BadInput

OK, WARN, FAIL = "ok", "warn", "fail"
READER_GROUP = "farebox"  # the group hw/'s udev rule gives the readers to


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | warn | fail
    found: str
    fix: str | None = None


#: how long the card check waits for a card on the reader
DEFAULT_CARD_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DoctorOptions:
    config: TerminalConfig
    reader: str | None = None
    roots: Roots = Roots()
    card_timeout_s: float = DEFAULT_CARD_TIMEOUT_S
    user: str | None = None  # for the fixes' text (default: $USER)


def load_checked_config(config_file: Path | None, **flags) -> tuple[TerminalConfig, Finding]:
    """The configuration, and a finding about it: a configuration that does not load is a
    failed check (the other checks then run on the defaults and the flags)."""
    try:
        config = load_config(config_file).with_flags(**flags)
    except ConfigError as error:
        given = {name: value for name, value in flags.items() if value is not None}
        return (TerminalConfig(**given),
                Finding("config", FAIL, str(error), "fix the key named above "
                        "(the README's Configuration section lists them)"))
    from_file = sorted(name for name, source in config.sources.items() if source == "file")
    where = (f"{len(from_file)} settings from the file ({', '.join(from_file)})" if from_file
             else "no configuration file (defaults and flags)")
    return config, Finding("config", OK, where)


def run_checks(options: DoctorOptions, now: datetime,
               pcsc: Callable[[], PcscStatus] = lambda: pcsc_readers(probe_cards=False)
               ) -> list[Finding]:
    findings: list[Finding] = []
    user = options.user or os.environ.get("USER") or "$USER"
    roots = options.roots
    usb = usb_readers(roots)
    status = pcsc()
    findings += _usb_checks(usb, user)
    findings.append(_kernel_modules(roots))
    findings += _pcscd(status, usb, options.reader)
    findings.append(_state_dir(options.config))
    findings.append(_clock(options.config, roots, now))
    findings += _keys(options.config)
    if options.config.clearing_url is not None:
        findings.append(_clearing(options.config))
    if options.reader is not None:
        findings.append(_card_in_field(options))
    return findings


def _usb_checks(usb, user: str) -> list[Finding]:
    if not usb:
        return [Finding("usb reader", OK, "no nfcpy USB reader plugged in (a PC/SC or udp reader "
                        "may still be used)")]
    out = []
    for reader in usb:
        name = f"{reader.driver} {reader.id_path} at {reader.path}"
        if reader.accessible:
            out.append(Finding("usb permission", OK, f"{name}: {reader.devnode} is readable and "
                               "writable"))
        else:
            out.append(Finding(
                "usb permission", FAIL,
                f"{name}: no read/write permission on {reader.devnode} for {user}",
                f"sudo hw/install.sh && sudo usermod -aG {READER_GROUP} {user} "
                "(then log in again and replug the reader)"))
    return out


def _kernel_modules(roots: Roots) -> Finding:
    loaded = [name for name in KERNEL_DRIVERS if (roots.sys / "module" / name).exists()]
    if not loaded:
        return Finding("kernel modules", OK, "neither port100 nor pn533_usb is loaded")
    names = " ".join(loaded)
    return Finding("kernel modules", FAIL,
                   f"{names} loaded: the kernel claims RC-S380/PN533 readers before nfcpy can",
                   f"sudo modprobe -r {names} && sudo hw/install.sh (installs the blacklist "
                   "that keeps them unloaded)")


def _pcscd(status: PcscStatus, usb, reader: str | None) -> list[Finding]:
    wants_pcsc = reader is not None and reader.startswith("pcsc")
    out = []
    if status.available:
        names = ", ".join(r.name for r in status.readers) or "no readers"
        out.append(Finding("pcscd", OK, f"pcscd answers on {status.socket}: {names}"))
    else:
        out.append(Finding(
            "pcscd", FAIL if wants_pcsc else WARN,
            f"{status.problem}" + ("" if wants_pcsc else " (only PC/SC readers need it)"),
            "sudo systemctl enable --now pcscd.socket" if wants_pcsc else None))
    for device in usb:
        held = pcscd_holds(device, status)
        if held is not None:
            out.append(Finding(
                "pcscd holds reader", FAIL if reader and reader.startswith("usb") else WARN,
                f"pcscd holds {device.id_path} as {held!r}: nfcpy cannot open it",
                f"use --reader 'pcsc:{held}' or free it for nfcpy: "
                "sudo systemctl disable --now pcscd.socket pcscd.service"))
    return out


def _state_dir(config: TerminalConfig) -> Finding:
    directory = state_dir(config)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return Finding("state dir", FAIL, f"{probe} is not a directory",
                       f"give a directory: --state DIR (not {probe})")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".farebox-doctor-")
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        return Finding("state dir", FAIL,
                       f"{probe} is not writable for this user ({error.strerror})",
                       f"sudo install -d -o $(id -un) -g $(id -gn) -m 0750 {directory}")
    where = "exists" if probe == directory else f"will be created (in {probe})"
    return Finding("state dir", OK, f"{directory} {where} and is writable")


def _clock(config: TerminalConfig, roots: Roots, now: datetime) -> Finding:
    directory = state_dir(config)
    journal_path = directory / JOURNAL_FILE
    if journal_path.exists():
        try:
            journal = Journal(journal_path)
            try:
                high_water = journal.time_high_water()
            finally:
                journal.close()
        except JournalError as error:
            return Finding("clock", FAIL, f"journal {journal_path} cannot be opened: {error}",
                           f"farebox journal verify --state {directory}")
        if high_water is not None and high_water > now:
            return Finding("clock", FAIL,
                           f"now ({now.isoformat()}) is before the latest trusted tap time in "
                           f"the journal ({high_water.isoformat()}): the clock went back",
                           "sudo timedatectl set-ntp true && timedatectl timesync-status")
    systemd = (roots.run / "systemd" / "system").is_dir()
    synchronized = (roots.run / "systemd" / "timesync" / "synchronized").exists()
    if synchronized:
        return Finding("clock", OK, "systemd-timesyncd has synchronized the clock")
    if systemd:
        return Finding("clock", WARN,
                       f"no {roots.run}/systemd/timesync/synchronized: the clock has not been "
                       "synchronized since boot (a Pi has no battery clock)",
                       "sudo timedatectl set-ntp true && timedatectl timesync-status")
    return Finding("clock", WARN, "not a systemd host: cannot tell whether the clock is "
                   "synchronized", "check with your NTP client (chronyc tracking, ntpq -p)")


def _keys(config: TerminalConfig) -> list[Finding]:
    out = []
    if config.keys == "test":
        out.append(Finding("card keys", WARN, "the published test keys (demo cards only)",
                           "keys = \"file:/etc/farebox/keys.toml\" in terminal.toml"))
    else:
        path = Path(config.keys.removeprefix("file:"))
        try:
            load_key_file(path)
            out.append(Finding("card keys", OK, f"key file {path} loads"))
        except KeyFileError as error:
            out.append(Finding("card keys", FAIL, f"{error}",
                               f"install the scheme's key file at {path} (mode 0600, owned by "
                               "the terminal's user)"))
    directory = state_dir(config)
    try:
        identity = load_identity(directory)
        out.append(Finding("terminal identity", OK,
                           f"{directory / IDENTITY_FILE}: terminal {identity.terminal_id}"))
    except IdentityError as error:
        missing = not (directory / IDENTITY_FILE).exists()
        out.append(Finding(
            "terminal identity", WARN if missing else FAIL, str(error),
            f"farebox terminal init --id TERMINAL_ID --state {directory}" if missing else
            f"restore {directory / IDENTITY_FILE} from backup (a new identity needs enrolling)"))
    return out


def _clearing(config: TerminalConfig) -> Finding:
    """Whether the daemon can upload to ``clearing_url`` (it logs the reason and uploads
    nothing when it cannot)."""
    try:
        house = clearing_house_for(config)
    except BadInput as error:
        fix = ('clearing_public_key = "HEX" in terminal.toml (`farebox clearing key` prints '
               "it at the clearing house)" if config.clearing_public_key is None else
               "change the setting named above in terminal.toml")
        return Finding("clearing", FAIL, f"batches are not uploaded: {error}", fix)
    return Finding("clearing", OK, f"uploads to {house.url}; acks verified with "
                   f"clearing_public_key {house.public_key.hex()[:16]}...")


def _card_in_field(options: DoctorOptions) -> Finding:
    try:
        spec = ReaderSpec.parse(options.reader)
        reader = open_transport(spec, writable=False, pcsc_mode=options.config.pcsc_mode)
    except RuntimeSetupError as error:
        return Finding("reader", FAIL, str(error), "farebox readers (lists what is usable)")
    try:
        found = reader.wait_for_card(SYSTEM_CODE_WILDCARD, options.card_timeout_s)
    except FelicaError as error:
        return Finding("reader", FAIL, f"{options.reader}: {error}", "farebox readers")
    finally:
        reader.close()
    if found is None:
        return Finding("card in field", WARN,
                       f"{options.reader} works but no card answered within "
                       f"{options.card_timeout_s:g} s", "put a card on the reader and run again")
    return Finding("card in field", OK, f"{options.reader}: card IDm {found.idm.hex()} "
                   f"(PMm {found.pmm.hex()})")


def worst(findings: list[Finding]) -> str:
    statuses = {f.status for f in findings}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else OK
