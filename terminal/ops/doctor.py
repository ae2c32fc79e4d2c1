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
from datetime import datetime, timedelta
from pathlib import Path

from farebox.protocol.errors import FelicaError
from farebox.protocol.frames import SYSTEM_CODE_WILDCARD

from farebox.terminal.config import (
    FILE_KEYS, ConfigError, TerminalConfig, is_loopback_listen, load_config,
)
from farebox.terminal.store.identity import IDENTITY_FILE, IdentityError, load_identity
from farebox.terminal.store.journal import Journal, JournalBroken, JournalError, JournalRecord
from farebox.cardimage.money import format_cents
from farebox.terminal.core.cardnumber import format_number
from farebox.terminal.core.clock import utc_iso
from farebox.terminal.core.rules import RecordType
from farebox.terminal.card.keys import (
    KeyFileError, KeyFileSource, PublishedKeySource, open_key_store, parse_key_source,
)
from farebox.terminal.ops.readers import KERNEL_DRIVERS, PcscStatus, Roots, pcsc_readers, pcscd_holds, usb_readers
from farebox.terminal.link.actionlist import ActionListError, load_action_list
from farebox.terminal.link.signedlist import span
from farebox.terminal.runtime import (
    JOURNAL_FILE, RuntimeSetupError, ReaderSpec, fetched_action_list, open_transport, state_dir,
)
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
    from_file = sorted(FILE_KEYS.get(name, name) for name, source in config.sources.items()
                       if source == "file")
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
    polkit = _pcscd_polkit(roots, options.reader)
    if polkit is not None:
        findings.append(polkit)
    findings.append(_state_dir(options.config))
    findings.append(_journal(options.config))
    findings.append(_clock(options.config, roots, now))
    findings += _keys(options.config)
    findings.append(_action_list(options.config, now))
    if options.config.action_list is not None:
        findings.append(_hotlist(options.config.action_list))
    if options.config.clearing_url is not None:
        findings.append(_clearing(options.config))
    if options.config.metrics_listen is not None:
        findings.append(_metrics(options.config))
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


#: pcsc-lite's polkit policy (installed when pcscd asks polkit) and the rule hw/install.sh puts
PCSC_POLKIT_POLICY = "share/polkit-1/actions/org.debian.pcsc-lite.policy"
FAREBOX_POLKIT_RULE = "polkit-1/rules.d/60-farebox-pcscd.rules"


def _pcscd_polkit(roots: Roots, reader: str | None) -> Finding | None:
    """pcsc-lite built with polkit (2.x on Debian trixie / Raspberry Pi OS) refuses a client
    without an active login session, such as the farebox service user, unless a rule allows
    it. None when this pcscd does not ask polkit."""
    if not (roots.usr / PCSC_POLKIT_POLICY).is_file():
        return None
    rule = roots.etc / FAREBOX_POLKIT_RULE
    if rule.is_file():
        return Finding("pcscd polkit", OK, f"pcscd asks polkit; {rule} allows the farebox user")
    wants_pcsc = reader is not None and reader.startswith("pcsc")
    return Finding("pcscd polkit", FAIL if wants_pcsc else WARN,
                   "pcscd asks polkit, and no rule allows the farebox user: the service is "
                   "refused by pcscd (SCardEstablishContext: access denied)",
                   f"sudo install -m 644 hw/polkit/60-farebox-pcscd.rules {rule} "
                   "(or run sudo hw/install.sh)")


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


def _journal(config: TerminalConfig) -> Finding:
    """The daemon's start-up check of the journal (its chains from the last checkpoint, its
    tables against them), run without moving the checkpoint: the daemon refuses what fails."""
    directory = state_dir(config)
    journal_path = directory / JOURNAL_FILE
    fix = f"farebox journal verify --state {directory} (says where; restore the journal " \
          "from a backup, the clearing house holds what was uploaded)"
    if not journal_path.exists():
        return Finding("journal", OK, f"no journal yet at {journal_path} (the first tap makes it)")
    try:
        journal = Journal(journal_path)
        try:
            check = journal.verify_since_checkpoint(save=False)
        finally:
            journal.close()
    except JournalBroken as error:
        return Finding("journal", FAIL, str(error), fix)
    except JournalError as error:
        return Finding("journal", FAIL, f"journal {journal_path} cannot be opened: {error}",
                       f"farebox journal verify --state {directory}")
    if not check:
        return Finding("journal", FAIL, f"{journal_path}: journal chain BROKEN at {check.where}: "
                       f"{check.problem}; the daemon will not start on it", fix)
    return Finding("journal", OK, f"{journal_path}: chains whole ({check.records} records, "
                   f"{check.marks} chain entries), tables agree with them")


def _clock(config: TerminalConfig, roots: Roots, now: datetime) -> Finding:
    directory = state_dir(config)
    journal_path = directory / JOURNAL_FILE
    if journal_path.exists():
        try:
            journal = Journal(journal_path)
            try:
                high_water = journal.time_high_water()
                setter = (journal.time_high_water_record()
                          if high_water is not None and high_water > now else None)
            finally:
                journal.close()
        except JournalError as error:
            return Finding("clock", FAIL, f"journal {journal_path} cannot be opened: {error}",
                           f"farebox journal verify --state {directory}")
        if high_water is not None and high_water > now:
            return _clock_behind_mark(directory, now, high_water, setter)
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


def _clock_behind_mark(directory: Path, now: datetime, mark: datetime,
                       setter: JournalRecord | None) -> Finding:
    """The clock is behind the terminal's time high-water mark: say which tap put the mark
    there (a tap given a time in the future, e.g. a debugging ``--at``, moves it as surely as a
    clock that went back), and both fixes."""
    mark_text = utc_iso(mark)
    if setter is None:
        by = ("set by a tap that made no journal record (a declined tap) at that time; the "
              "journal's newest trusted record is older")
    elif setter.type is RecordType.CLOCK_RESET:
        by = f"set by `farebox terminal clock reset` (record #{setter.seq}, tap id {setter.tap_id})"
    else:
        by = (f"set by tap {setter.tap_id} (record #{setter.seq}, {setter.type.value} of "
              f"{format_cents(setter.amount_cents)} on card {format_number(setter.card_number)}, "
              f"at {setter.at_utc})")
    return Finding(
        "clock", FAIL,
        f"now ({utc_iso(now)}) is before the terminal's time mark ({mark_text}, the latest tap "
        f"time it trusted), {by}: either that time was in the future (a tap given a wrong "
        f"time, such as a debugging --at) or this clock went back; until the clock passes "
        f"{mark_text} every tap is flagged clock_trusted false",
        f"if that tap's time was wrong: farebox terminal clock reset --reason 'WHY' --state "
        f"{directory}; if this clock is wrong: sudo timedatectl set-ntp true && "
        "timedatectl timesync-status")


def _keys(config: TerminalConfig) -> list[Finding]:
    out = []
    try:
        source = parse_key_source(config.keys)
    except ValueError as error:
        source = None
        out.append(Finding("card keys", FAIL, f"keys: {error}", "fix keys in terminal.toml"))
    if isinstance(source, PublishedKeySource) and config.allow_test_keys:
        out.append(Finding("card keys", WARN, "the published test keys (demo cards only)",
                           "keys = \"file:/etc/farebox/keys.toml\" in terminal.toml"))
    elif isinstance(source, PublishedKeySource):
        out.append(Finding("card keys", FAIL, "the published test keys, which this "
                           "configuration does not allow: taps and the daemon refuse them",
                           "keys = \"file:/etc/farebox/keys.toml\" (or \"pkcs11:...\") in "
                           "terminal.toml; allow_test_keys = true only for a demo"))
    elif source is not None:
        try:
            store = open_key_store(source)
        except KeyFileError as error:
            fix = (f"install the scheme's key file at {source.path} (mode 0600, owned by the "
                   "terminal's user)" if isinstance(source, KeyFileSource) else
                   "check the module, token label, PIN file (mode 0600) and the key labels")
            out.append(Finding("card keys", FAIL, f"{error}", fix))
        else:
            versions = ", ".join(str(v) for v in store.versions)
            store.close()
            out.append(Finding("card keys", OK, f"{source} loads: key versions {versions}, "
                               f"issue version {store.issue_version}"))
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


def _action_list(config: TerminalConfig, now: datetime) -> Finding:
    """The fetched action list in force: which, how old, until when; an alarm (the list
    fetched last cannot be used) and a list past its expiry fail."""
    check = "action list"
    directory = state_dir(config)
    trust = "" if config.clearing_public_key is not None else " --config F"
    fetch = f"farebox actions fetch --state {directory}{trust}"
    held = fetched_action_list(config, now)
    if held.refused:
        return Finding(check, FAIL, f"{held.alarm}: every tap is refused",
                       f"{fetch} (and find out what changed the file)")
    listed = held.in_force
    if listed is None:
        if config.clearing_url is None and config.clearing_public_key is None:
            return Finding(check, OK, "no action list fetched (no clearing house configured)")
        return Finding(check, WARN, "no action list fetched yet: lost cards are not refused",
                       fetch)
    key = listed.public_key.hex()[:16]
    age = (f"{span(now - listed.issued)} old" if listed.issued <= now else
           f"{span(listed.issued - now)} in the future for this clock")
    found = (f"serial {listed.serial}, {len(listed.entries)} entries, issued "
             f"{listed.issued_utc} ({age}), verified with key {key}...")
    if held.alarm is not None:
        return Finding(check, FAIL, f"{held.alarm}; in force: {found}",
                       f"{fetch} (and find out what changed the file)")
    if listed.expires <= now:
        return Finding(check, FAIL, f"{found}; expired at {listed.expires_utc} "
                       f"({span(now - listed.expires)} ago): cards listed since are not refused",
                       f"{fetch} (the daemon fetches from clearing_url every "
                       "upload_interval_s: can it reach the clearing house?)")
    if listed.issued > now + timedelta(seconds=config.action_list_max_skew_s):
        return Finding(check, WARN, f"{found}: this clock is behind the clearing house's "
                       "(a later list would be refused as issued in the future)",
                       "sudo timedatectl set-ntp true && timedatectl timesync-status")
    return Finding(check, OK, f"{found}; valid until {listed.expires_utc}")


def _hotlist(path: Path) -> Finding:
    """The configured ``action_list`` file (``--hotlist``): every tap reads it, so one that is
    missing or does not parse stops every tap (exit 2)."""
    try:
        entries = load_action_list(path)
    except ActionListError as error:
        return Finding("hotlist", FAIL, f"action_list: {error}: every tap is refused",
                       f"fix or replace {path}, or remove action_list from the configuration")
    return Finding("hotlist", OK, f"action_list {path}: {len(entries)} entries")


def _metrics(config: TerminalConfig) -> Finding:
    """Where the daemon's Prometheus endpoint listens; beyond this host (allowed by
    ``metrics_allow_remote = true``) a warning: the endpoint has no authentication."""
    listen = config.metrics_listen
    if is_loopback_listen(listen):
        return Finding("metrics", OK, f"metrics_listen {listen}: loopback only "
                       "(metrics_allow_remote = " f"{str(config.metrics_allow_remote).lower()})")
    return Finding("metrics", WARN, f"metrics_listen {listen}: served beyond this host "
                   "(metrics_allow_remote = true) without authentication",
                   "let only the Prometheus server reach that port (a firewall rule), or "
                   'metrics_listen = "127.0.0.1:9108" and scrape through a tunnel')


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
