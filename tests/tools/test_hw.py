"""hw/: the systemd unit checked by ``systemd-analyze verify`` (and its hardening by
``systemd-analyze security --offline``), the udev rules and module blacklist by their tools where
this machine has them (skipped with the reason where not) and always by a parser and a small
evaluator here, the example terminal.toml by the real config loader, and ``hw/install.sh`` run
twice into a fresh directory standing for a Pi's root: the second run changes nothing, and the
farebox it installed, started the way the unit starts it, takes a tap on the UDP simulated reader
and tells a real NOTIFY_SOCKET it is ready."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from farebox.terminal.config import TerminalConfig, load_config
from farebox.terminal.runtime import ReaderSpec

from .conftest import CONSOLE_SCRIPT
from .test_daemon_ops import NotifySocket
from .test_e2e_udp import Served

HW = Path(__file__).resolve().parents[2] / "hw"
UNIT = HW / "farebox.service"
RULES = HW / "udev" / "60-farebox-readers.rules"
BLACKLIST = HW / "modprobe.d" / "farebox-blacklist.conf"
EXAMPLE = HW / "terminal.toml"
INSTALL = HW / "install.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed here")


# ---- the systemd unit ---------------------------------------------------------------------------

def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key more than once."""
    entries, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(entries, section: str, key: str) -> list[str]:
    return [v for s, k, v in entries if (s, k) == (section, key)]


def verify_text(text: str, directory: Path) -> subprocess.CompletedProcess:
    copy = directory / "farebox.service"
    copy.write_text(text.replace("/opt/farebox/bin/farebox", str(CONSOLE_SCRIPT)))
    return subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True,
                          text=True, timeout=60)


def clean(done: subprocess.CompletedProcess) -> bool:
    """Verified with no complaint about the unit (an unknown key is only a warning there)."""
    return done.returncode == 0 and "farebox.service" not in done.stderr


@needs_systemd_analyze
def test_the_unit_verifies_and_a_broken_one_does_not(tmp_path):
    text = UNIT.read_text()
    good = verify_text(text, tmp_path)
    assert clean(good), good.stderr
    for broken in (text.replace("WatchdogSec=30", "WatchdogSecs=30"),  # a typo in a key
                   text.replace("Type=notify", "Type=notified"),
                   text.replace("/opt/farebox/bin/farebox", "/nonexistent/farebox")):
        done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(_write(tmp_path, broken))],
                              capture_output=True, text=True, timeout=60)
        assert not clean(done), broken


def _write(directory: Path, text: str) -> Path:
    path = directory / "broken" / "farebox.service"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text.replace("ExecStart=/opt/farebox/bin/farebox",
                                 f"ExecStart={CONSOLE_SCRIPT}"))
    return path


@needs_systemd_analyze
def test_the_units_hardening_scores_as_well_exposed_as_at_most_2_5(tmp_path):
    copy = tmp_path / "farebox.service"
    copy.write_text(UNIT.read_text().replace("/opt/farebox/bin/farebox", str(CONSOLE_SCRIPT)))
    done = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(copy)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for farebox\.service: ([0-9.]+)", done.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {done.stderr[:200]}")
    assert float(found.group(1)) <= 2.5, done.stdout


def test_the_unit_is_a_notify_service_with_watchdog_user_and_closed_devices():
    entries = unit_entries(UNIT.read_text())
    service = {k: v for s, k, v in entries if s == "Service"}
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure" and float(service["RestartSec"]) >= 1
    assert int(service["WatchdogSec"]) >= 10  # the daemon pings every loop pass (< 2 s)
    assert service["User"] == service["Group"] == "farebox"
    assert service["StateDirectory"] == "farebox"
    assert service["DevicePolicy"] == "closed"
    assert "char-usb_device rw" in unit_value(entries, "Service", "DeviceAllow")
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["MemoryDenyWriteExecute"] == "yes"  # checked below under PR_SET_MDWE
    assert set(service["RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert unit_value(entries, "Unit", "StartLimitBurst") and unit_value(
        entries, "Unit", "StartLimitIntervalSec")
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == ["/opt/farebox/bin/farebox", "run"]
    assert argv[argv.index("--config") + 1] == "/etc/farebox/terminal.toml"
    assert argv[argv.index("--log-format") + 1] == "json"
    # the options exist in this farebox (click rejects an unknown one before --help)
    done = subprocess.run([str(CONSOLE_SCRIPT), *argv[1:], "--help"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# ---- udev rules ---------------------------------------------------------------------------------

RULE_TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]+)\})?\s*(==|!=|\+=|:=|=)\s*"([^"]*)"\s*(?:,|$)')
MATCH_KEYS = {"ACTION", "SUBSYSTEM", "ENV", "ATTRS", "ATTR", "KERNEL", "DRIVER"}
ASSIGN_KEYS = {"GROUP", "MODE", "GOTO", "LABEL", "TAG", "ENV", "OWNER"}


def parse_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    """Each rule line as its (key, attribute, operator, value) tokens; AssertionError on a line
    udev would not read the way it is meant."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert not line.endswith("\\"), f"line {number}: no continuation lines here"
        tokens, position = [], 0
        while position < len(line):
            match = RULE_TOKEN.match(line, position)
            assert match, f"line {number}: cannot read {line[position:]!r}"
            key, attribute, operator, value = match.groups()
            if operator in ("==", "!="):
                assert key in MATCH_KEYS, f"line {number}: {key} is not a match key"
            else:
                assert key in ASSIGN_KEYS, f"line {number}: {key} is not an assignment key"
            tokens.append(match.groups())
            position = match.end()
        rules.append(tokens)
    return rules


def evaluate(rules, device: dict[str, str]) -> dict[str, str]:
    """What our rules assign for a device event (the subset of udev's language they use)."""
    labels = {tokens[0][3]: index for index, tokens in enumerate(rules)
              if tokens[0][0] == "LABEL"}
    assigned: dict[str, str] = {}
    index = 0
    while index < len(rules):
        tokens = rules[index]
        index += 1
        matched = True
        for key, attribute, operator, value in tokens:
            if operator in ("==", "!="):
                actual = device.get(f"{key}{{{attribute}}}" if attribute else key, "")
                hit = any(fnmatch.fnmatchcase(actual, alt) for alt in value.split("|"))
                if hit != (operator == "=="):
                    matched = False
                    break
        if not matched:
            continue
        for key, attribute, operator, value in tokens:
            if key == "GOTO":
                index = labels[value]
            elif operator in ("=", ":=") and key != "LABEL":
                assigned[key] = value
    return assigned


def usb_event(vendor: str, product: str, action: str = "add",
              devtype: str = "usb_device") -> dict[str, str]:
    return {"ACTION": action, "SUBSYSTEM": "usb", "ENV{DEVTYPE}": devtype,
            "ATTRS{idVendor}": vendor, "ATTRS{idProduct}": product}


def test_the_udev_rules_read_and_give_every_nfcpy_reader_to_the_farebox_group():
    from nfc.clf.device import usb_device_map

    rules = parse_rules(RULES.read_text())
    gotos = {t[3] for tokens in rules for t in tokens if t[0] == "GOTO"}
    labels = {t[3] for tokens in rules for t in tokens if t[0] == "LABEL"}
    assert gotos <= labels
    readers = {(vendor, product) for vendor, product in usb_device_map}
    assert {(0x054c, 0x06c1), (0x054c, 0x06c3), (0x04cc, 0x2533), (0x04e6, 0x5591),
            (0x072f, 0x2200)} <= readers
    for vendor, product in readers:
        for action in ("add", "change"):
            got = evaluate(rules, usb_event(f"{vendor:04x}", f"{product:04x}", action))
            assert got == {"GROUP": "farebox", "MODE": "0660"}, (hex(vendor), hex(product))
    # nothing else: another device, the reader's interfaces, its removal, a tty
    assert evaluate(rules, usb_event("046d", "c52b")) == {}
    assert evaluate(rules, usb_event("054c", "06c3", devtype="usb_interface")) == {}
    assert evaluate(rules, usb_event("054c", "06c3", action="remove")) == {}
    assert evaluate(rules, {**usb_event("054c", "06c3"), "SUBSYSTEM": "tty"}) == {}


def test_udevadm_verifies_the_rules():
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        pytest.skip("udevadm is not installed here (the parser test above always runs)")
    help_text = subprocess.run([udevadm, "--help"], capture_output=True, text=True).stdout
    if "verify" not in help_text:
        pytest.skip("this udevadm has no `verify` (systemd < 254)")
    done = subprocess.run([udevadm, "verify", "--resolve-names=never", str(RULES)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- module blacklist ---------------------------------------------------------------------------

def test_the_blacklist_keeps_port100_and_pn533_usb_away():
    directives = [line.split() for line in BLACKLIST.read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    assert all(d[0] in ("blacklist", "install") for d in directives), directives
    assert all(len(d) == 2 for d in directives if d[0] == "blacklist")
    assert all(d[2:] == ["/bin/false"] for d in directives if d[0] == "install")
    blacklisted = {d[1] for d in directives if d[0] == "blacklist"}
    assert {"port100", "pn533_usb"} <= blacklisted
    assert {d[1] for d in directives if d[0] == "install"} == {"port100", "pn533_usb"}
    modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/sbin:/usr/sbin")
    if modprobe is None:
        pytest.skip("modprobe is not installed here (the file was parsed above)")
    shown = subprocess.run([modprobe, "-C", str(BLACKLIST), "--showconfig"],
                           capture_output=True, text=True, timeout=30).stdout
    assert "blacklist port100" in shown and "blacklist pn533_usb" in shown


# ---- the example configuration ------------------------------------------------------------------

def test_the_example_config_loads_and_names_every_key(tmp_path):
    config = load_config(EXAMPLE, env={})
    assert config.terminal_id and config.tariff is not None and config.log_format == "json"
    ReaderSpec.parse(config.reader)
    # the shipped config names real keys, never the published test ones, and does not allow them
    assert config.keys.startswith("file:") and config.allow_test_keys is False
    assert not re.search(r'^\s*keys\s*=\s*"test"', EXAMPLE.read_text(), flags=re.MULTILINE)
    # with the commented-out keys switched on, every setting comes from the file
    text = re.sub(r"^# (\w+ = )", r"\1", EXAMPLE.read_text(), flags=re.MULTILINE)
    (tmp_path / "all.toml").write_text(text)
    (tmp_path / "hotlist.json").write_text('{"entries": []}')
    every = load_config(tmp_path / "all.toml", env={})
    settings = {f.name for f in fields(TerminalConfig)} - {"sources"}
    assert set(every.sources) == settings
    assert set(tomllib.loads(text)) == {"terminal", "fares"}


# ---- install.sh into a fresh root ---------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, owner, size, content hash and mtime."""
    import hashlib

    seen = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        if path.is_symlink():
            detail = os.readlink(path)
        elif path.is_file():
            detail = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            detail = None
        seen[str(path.relative_to(root))] = (stat.st_mode, stat.st_uid, stat.st_gid,
                                             stat.st_size, stat.st_mtime_ns, detail)
    return seen


def install(root: Path, *options: str) -> subprocess.CompletedProcess:
    """Non-interactive (no terminal on stdin: install.sh never asks, it says what to give)."""
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), *options],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


MASTER = bytes.fromhex("5a17c3e2d1b0a99887766554433221f0")
KEY_FILE = "/etc/farebox/keys.toml"
FILE_KEYS = f"file:{KEY_FILE}"


def put_key_file(root: Path, mode: int = 0o644) -> Path:
    """The scheme's key file where the operator puts it before installing (left group and world
    readable here: install.sh makes it 0600 and the farebox user's)."""
    path = root / KEY_FILE.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'issue_version = 1\n[master_keys]\n1 = "{MASTER.hex()}"\n')
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """hw/install.sh --root into a fresh directory, once for this module (a pip install)."""
    if os.geteuid() != 0:
        pytest.skip("install.sh creates a user and owns files for it: run as root")
    root = tmp_path_factory.mktemp("pi") / "root"
    put_key_file(root)
    first = install(root, "--terminal-id", "BUS-0042", "--keys", FILE_KEYS)
    assert first.returncode == 0, first.stdout + first.stderr
    return root, first


def mapped_config(root: Path, directory: Path) -> Path:
    """The installed config with its /etc/farebox/ paths (the key or PIN file) inside the root,
    as the unit's own arguments are mapped below."""
    text = (root / "etc/farebox/terminal.toml").read_text()
    copy = directory / "terminal.toml"
    copy.write_text(text.replace("/etc/farebox/", f"{root}/etc/farebox/"))
    return copy


def test_install_sh_lays_out_a_pi_and_a_second_run_changes_nothing(installed):
    root, first = installed
    for path in ("etc/systemd/system/farebox.service", "etc/udev/rules.d/60-farebox-readers.rules",
                 "etc/modprobe.d/farebox-blacklist.conf", "etc/sysusers.d/farebox.conf",
                 "etc/farebox/terminal.toml", "opt/farebox/bin/farebox",
                 "var/lib/farebox/identity.json", "var/lib/farebox/journal.sqlite3"):
        assert (root / path).exists(), path
    assert (root / "etc/systemd/system/farebox.service").read_bytes() == UNIT.read_bytes()
    assert os.readlink(root / "usr/local/bin/farebox") == "/opt/farebox/bin/farebox"
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("farebox:"))
    uid, gid = int(user[2]), int(user[3])
    state = root / "var/lib/farebox"
    assert all(p.stat().st_uid == uid for p in [state, *state.iterdir()])
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert oct((state / "journal.sqlite3").stat().st_mode & 0o777) == "0o600"
    config = root / "etc/farebox/terminal.toml"
    assert config.stat().st_gid == gid and oct(config.stat().st_mode & 0o777) == "0o640"
    assert load_config(config, env={}).terminal_id == "BUS-0042"
    # the key source given, the key file made the farebox user's alone
    assert load_config(config, env={}).keys == FILE_KEYS
    assert load_config(config, env={}).allow_test_keys is False
    key_file = root / KEY_FILE.lstrip("/")
    assert (key_file.stat().st_uid, key_file.stat().st_mode & 0o777) == (uid, 0o600)
    assert f"made {KEY_FILE} mode 0600" in first.stdout
    assert json.loads((state / "identity.json").read_text())["terminal_id"] == "BUS-0042"
    assert "terminal BUS-0042 initialised" in first.stdout

    before = snapshot(root)
    again = install(root, "--terminal-id", "BUS-0042")
    assert again.returncode == 0, again.stderr
    assert snapshot(root) == before
    assert not re.search(r"installed|created|initialised|linked", again.stdout), again.stdout


def test_install_sh_keeps_an_edited_config_and_refuses_another_id(installed):
    root, _ = installed
    config = root / "etc/farebox/terminal.toml"
    original = config.read_text()
    try:
        config.write_text(original.replace('reader = "usb:054c:06c3"', 'reader = "pcsc"'))
        edited = config.read_bytes()
        kept = install(root)
        assert kept.returncode == 0 and "kept your /etc/farebox/terminal.toml" in kept.stdout
        assert config.read_bytes() == edited
        before = snapshot(root)
        other = install(root, "--terminal-id", "BUS-9999")
        assert other.returncode == 2 and "BUS-0042" in other.stderr
        assert snapshot(root) == before
    finally:
        config.write_text(original)


def test_install_sh_options(tmp_path):
    done = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--root DIR" in done.stdout and "set -e" not in done.stdout
    assert "--keys SOURCE" in done.stdout
    bad_id = install(tmp_path / "root", "--terminal-id", "BUS/42")
    assert bad_id.returncode == 2 and "--terminal-id" in bad_id.stderr
    assert not (tmp_path / "root").exists()
    bad = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--frobnicate" in bad.stderr


@needs_systemd_analyze
def test_the_installed_unit_verifies_against_the_installed_farebox(installed, tmp_path):
    root, _ = installed
    unit = root / "etc/systemd/system/farebox.service"
    copy = tmp_path / "farebox.service"
    copy.write_text(unit.read_text().replace("/opt/farebox/", f"{root}/opt/farebox/"))
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True,
                          text=True, timeout=60)
    assert clean(done), done.stderr


def test_the_installed_farebox_started_as_the_unit_does_reaches_a_tap(installed, farebox,
                                                                       tmp_path):
    """The unit's ExecStart, paths mapped into the root, on the UDP simulated reader (the Pi's
    USB reader is the one thing this machine lacks), with the installed config and state and a
    real NOTIFY_SOCKET."""
    root, _ = installed
    service = {k: v for s, k, v in unit_entries(
        (root / "etc/systemd/system/farebox.service").read_text()) if s == "Service"}
    argv = [arg.replace("/opt/farebox/", f"{root}/opt/farebox/")
               .replace("/etc/farebox/", f"{root}/etc/farebox/")
            for arg in shlex.split(service["ExecStart"])]
    environment = dict(pair.split("=", 1) for pair in shlex.split(service["Environment"]))
    config = mapped_config(root, tmp_path)
    argv[argv.index("--config") + 1] = str(config)
    # a card of this scheme: issued under the installed key file (a test-key card is no card)
    card = farebox.path("card.json")
    farebox("service", "issue", card, "--category", "adult", "--config", config, "--at",
            "2026-11-22T07:00:00+08:00", "--state", tmp_path / "desk", "--json").json()
    server = Served(card, "--taps", 1)
    notify = NotifySocket(tmp_path / "notify")
    state = root / "var/lib/farebox"
    # ProtectSystem=strict: nothing but the StateDirectory may change (no bytecode in /opt...)
    outside = {path: seen for path, seen in snapshot(root).items()
               if not path.startswith("var/lib/farebox")}
    try:
        done = subprocess.run(
            [*argv, "--reader", server.address, "--state", str(state),
             "--metrics", "127.0.0.1:0", "--max-taps", "1"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, **environment, "NOTIFY_SOCKET": notify.path,
                 "WATCHDOG_USEC": "30000000"})
        assert done.returncode == 0, done.stderr
        server.finish()
    finally:
        server.kill()
    events = [json.loads(line) for line in done.stdout.splitlines()]
    taps = [e for e in events if e["event"] == "tap"]
    assert len(taps) == 1 and taps[0]["outcome"] == "approved"
    assert taps[0]["amount"] == "5.80" and taps[0]["balance_after"] == "144.20"  # example fares
    start = next(e for e in events if e["event"] == "start")
    assert start["terminal_id"] == "BUS-0042"
    assert notify.receive_until(lambda m: m.get("READY") == "1")
    notify.close()
    shown = farebox("card", "show", card, "--config", config, "--json").json()
    assert shown["balance"] == "144.20"
    assert {path: seen for path, seen in snapshot(root).items()
            if not path.startswith("var/lib/farebox")} == outside


# ---- install.sh and the card keys (issue 17 item 6) ----------------------------------------------

def test_install_sh_needs_a_key_source_and_never_takes_the_test_keys(tmp_path):
    """Refused before anything is installed: the root stays empty."""
    root = tmp_path / "root"
    test_keys = install(root, "--terminal-id", "BUS-1", "--keys", "test")
    assert test_keys.returncode == 2 and "published test keys protect nothing" in test_keys.stderr
    assert not root.exists()
    other = install(root, "--terminal-id", "BUS-1", "--keys", "vault:x")
    assert other.returncode == 2 and "expected file:PATH or pkcs11:" in other.stderr
    none = install(root, "--terminal-id", "BUS-1")
    assert none.returncode == 2 and "give --keys file:PATH" in none.stderr
    missing = install(root, "--terminal-id", "BUS-1", "--keys", FILE_KEYS)
    assert missing.returncode == 2 and f"no key file at {KEY_FILE}" in missing.stderr
    token = install(root, "--terminal-id", "BUS-1", "--keys",
                    "pkcs11:module=/nonexistent/lib.so;token=t;pin-file=/etc/farebox/pin")
    assert token.returncode == 2 and "/nonexistent/lib.so is missing" in token.stderr
    assert list(root.rglob("*")) == []
    for done in (test_keys, other, none, missing, token):
        assert done.stderr.count("\n") == 1, done.stderr


def test_install_sh_on_a_config_with_the_test_keys(installed):
    root, _ = installed
    config = root / "etc/farebox/terminal.toml"
    key_file = root / KEY_FILE.lstrip("/")
    original = config.read_text()
    try:
        config.write_text(original.replace(f'\nkeys = "{FILE_KEYS}"\n', '\nkeys = "test"\n')
                          .replace('reader = "usb:054c:06c3"', 'reader = "pcsc"'))
        before = snapshot(root)
        refused = install(root)
        assert refused.returncode == 2 and "uses the published test keys" in refused.stderr
        assert "give --keys" in refused.stderr and snapshot(root) == before
        # a demo terminal that says so is left alone
        config.write_text(config.read_text().replace("# allow_test_keys = false",
                                                     "allow_test_keys = true"))
        demo = install(root)
        assert demo.returncode == 0 and "allows the published test keys" in demo.stdout
        # --keys puts the key source in, and changes nothing else of the operator's file
        edited = config.read_text()
        fixed = install(root, "--keys", FILE_KEYS)
        assert fixed.returncode == 0 and "set keys in /etc/farebox/terminal.toml" in fixed.stdout
        assert config.read_text() == edited.replace('\nkeys = "test"\n',
                                                    f'\nkeys = "{FILE_KEYS}"\n')
        assert load_config(config, env={}).reader == "pcsc"
        # an upgrade from an install that left the key file 0640 root:farebox
        key_file.chmod(0o640)
        os.chown(key_file, 0, config.stat().st_gid)
        upgraded = install(root)
        assert upgraded.returncode == 0, upgraded.stderr
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.stat().st_uid == (root / "var/lib/farebox").stat().st_uid
        # a key file that does not load stops it, naming the file
        key_file.write_text('issue_version = 1\n[master_keys]\n1 = "00"\n')
        broken = install(root)
        assert broken.returncode == 2 and str(key_file) in broken.stderr
    finally:
        config.write_text(original)
        put_key_file(root, 0o600)


def test_install_sh_with_the_master_keys_in_a_pkcs11_token(installed, farebox, tmp_path):
    """The last test on the installed root: it leaves it on the token's keys. The installed
    farebox (its venv now with python-pkcs11) takes a tap with the key in SoftHSM2 on a card
    issued under the key file holding the same master key."""
    from ..terminal.test_keys_pkcs11 import MODULE, SoftHsm

    root, _ = installed
    hsm = SoftHsm(tmp_path / "softhsm").init()
    hsm.import_key("farebox-master-1", MASTER)
    module = root / str(MODULE).lstrip("/")
    module.parent.mkdir(parents=True, exist_ok=True)
    if not module.is_symlink():
        module.symlink_to(MODULE)  # the image's own softhsm2 package
    pin = root / "etc/farebox/pin"
    pin.write_text(hsm.pin + "\n")
    pin.chmod(0o644)
    spec = f"pkcs11:module={MODULE};token={hsm.token};pin-file=/etc/farebox/pin"
    done = install(root, "--keys", spec)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "farebox[nfc,pcsc,pkcs11]" in done.stdout
    assert pin.stat().st_mode & 0o777 == 0o600
    config = root / "etc/farebox/terminal.toml"
    assert load_config(config, env={}).keys == spec
    before = snapshot(root)
    again = install(root)
    assert again.returncode == 0 and snapshot(root) == before, again.stdout

    card = farebox.path("card.json")
    file_keys = tmp_path / "file-keys.toml"
    file_keys.write_text(f'[terminal]\nkeys = "file:{root / KEY_FILE.lstrip("/")}"\n')
    farebox("service", "issue", card, "--category", "adult", "--config", file_keys, "--at",
            "2026-11-22T07:00:00+08:00", "--state", tmp_path / "desk", "--json").json()
    tap = subprocess.run(
        [str(root / "opt/farebox/bin/farebox"), "tap", str(card), "--config",
         str(mapped_config(root, tmp_path)), "--at", "2026-11-22T08:00:00+08:00", "--state",
         str(tmp_path / "state"), "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **hsm.env})
    assert tap.returncode == 0, tap.stderr
    result = json.loads(tap.stdout)
    assert (result["outcome"], result["balance_after"]) == ("approved", "144.20")
    assert MASTER.hex() not in tap.stdout + tap.stderr + done.stdout + done.stderr


# ---- MemoryDenyWriteExecute=yes, checked with the kernel's own equivalent ------------------------

#: exec the rest of argv with PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN) set: no mapping may be made
#: both writable and executable, as systemd's MemoryDenyWriteExecute (inherited across exec)
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""

#: what the daemon may need that could want writable+executable memory
MDWE_PROBE = """
import ctypes, mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("a writable+executable mapping was allowed: MDWE is not in force")
except PermissionError:
    pass
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x * 2)
assert callback(21) == 42
import usb1
with usb1.USBContext() as context:
    context.getDeviceList(skip_on_error=True)
import nfc, smartcard.System
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC
assert len(Ed25519PrivateKey.generate().sign(b"batch")) == 64
mac = CMAC(algorithms.AES(bytes(16)))
mac.update(b"block")
mac.finalize()
print("ok")
"""


def under_mdwe(*argv: str, **options) -> subprocess.CompletedProcess:
    import sys

    done = subprocess.run([sys.executable, "-c", MDWE_EXEC, *argv], capture_output=True,
                          text=True, **options)
    if done.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    return done


def test_libusb_ctypes_pyscard_and_cryptography_work_without_writable_executable_memory():
    import sys

    done = under_mdwe(sys.executable, "-c", MDWE_PROBE, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_the_daemon_takes_taps_without_writable_executable_memory(farebox, tmp_path):
    card = farebox.card(balance="10.00")
    server = Served(card, "--taps", 2)
    try:
        done = under_mdwe(str(CONSOLE_SCRIPT), "run", "--reader", server.address, "--fare",
                          "1.00", "--state", str(farebox.state), "--max-taps", "2",
                          "--log-format", "json", "--metrics", "127.0.0.1:0", timeout=120)
        assert done.returncode == 0, done.stderr
        server.finish()
    finally:
        server.kill()
    taps = [e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "tap"]
    assert [t["balance_after"] for t in taps] == ["9.00", "8.00"]
