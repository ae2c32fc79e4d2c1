"""The operator tools' logic below the CLI: dump files parsed defensively and turned into card
files, a card examined slot by slot, and the reader listing and doctor checks over fake
``/sys``, ``/dev`` and ``/run`` trees.

The fake trees are a mock of the hardware: there is no USB reader (nor kernel module, nor
systemd) on the machines these tests run on, so the sysfs entries nfcpy's probe and the checks
read are built here, as the kernel lays them out."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from farebox.protocol.sim.card import SimulatedFelicaStandard, SimulatedLiteS, card_from_json
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.ops import doctor
from farebox.terminal.config import TerminalConfig
from farebox.terminal.ops.dumps import DumpError, dump_from_reader, load_dump, to_card_json
from farebox.terminal.card.issue import IssueRequest, issue_card_file
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.ops.examine import block_diffs, examine, field_diffs
from farebox.terminal.ops.readers import PcscReader, PcscStatus, Roots, tty_devices, usb_readers

from .test_octopus import IDM, PMM, octopus_card, write_flipper, write_metrodroid

UTC = timezone.utc
NOW = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)


# ---- dumps ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "content", "message"), [
    ("a.json", b"[1, 2]", "expected a JSON object"),
    ("b.json", b'{"felica": 3, "tagId": "0102030405060708"}', "'felica' must be an object"),
    ("c.json", b'{"felica": {"systems": {}}, "tagId": "zz"}', "not hex"),
    ("d.json", b'{"felica": {"systems": {"x": {}}}, "tagId": "0102030405060708"}',
     "must be a number"),
    ("e.json", b'{"felica": {"systems": {"32776": {"services": {"279": {"blocks": '
               b'[{"data": "0011"}]}}}}}, "tagId": "0102030405060708"}', "must be 16 bytes"),
    ("f.json", b'{"cards": [{"cardType": "FeliCa", "tagId": "***"}]}', "not base64"),
    ("g.json", b'{"cards": []}', "no FeliCa card"),
    ("h.json", b"[" * 100_000, "nested too deeply"),
    ("i.json", b'{"hello": 1}', "not a dump this tool reads"),
    ("j.json", b'{"felica": {}, "tagId": "01", "scannedAt": "yesterday"}', "8 bytes"),
    ("k.nfc", b"Filetype: Flipper NFC device\nDevice type: NTAG215\nUID: 04 A2\n", "not FeliCa"),
    ("l.nfc", b"Filetype: Flipper NFC device\nDevice type: FeliCa\nManufacture id: 01 02\n",
     "must be 8 bytes"),
    ("m.nfc", b"Filetype: Flipper NFC device\nDevice type: FeliCa\nManufacture id: "
              b"01 02 03 04 05 06 07 08\nSystem found: 1\nSystem 00: 8008\n"
              b"Block 0000: | Service code 0117 | Block index 00 | Data: 00 |\n",
     "Block 0000"),
    ("n.nfc", b"Filetype: Flipper NFC device\xff\n", "not UTF-8"),
])
def test_bad_dumps_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DumpError) as error:
        load_dump(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_huge_or_special_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (5 << 20))
    with pytest.raises(DumpError, match="larger than"):
        load_dump(big)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DumpError, match="not a regular file"):
        load_dump(tmp_path / "fifo")


def test_an_octopus_dump_becomes_a_servable_read_only_card(tmp_path):
    dumped = load_dump(write_metrodroid(tmp_path / "m.json", "00000164" + "00" * 12,
                                        datetime(2017, 10, 2, tzinfo=UTC)))
    obj = to_card_json(dumped)
    assert obj["systems"]["8008"]["services"]["0117"] == ["00000164" + "00" * 12]
    assert obj["scanned_at"] == "2017-10-02T00:00:00+00:00"
    card = card_from_json(json.loads(json.dumps(obj)))
    assert isinstance(card, SimulatedFelicaStandard) and card.pmm == PMM
    again = dump_from_reader(InProcessTransport(card), NOW, timeout_s=0.1)
    assert again.block(0x8008, 0x0117, 0) == bytes.fromhex("00000164" + "00" * 12)
    assert again.block(0x8008, 0x100B, 0) == bytes(16)


def test_an_older_card_without_discovery_commands_is_still_dumped():
    """Older Octopus cards answer neither Request System Code nor Search Service Code: the
    dump polls well-known system codes and probes well-known services with Request Service."""
    card = octopus_card("00000164" + "00" * 12)
    card.answers_discovery = False
    dumped = dump_from_reader(InProcessTransport(card), NOW, timeout_s=0.1)
    assert [s.system_code for s in dumped.systems] == [0x8008]
    assert dumped.block(0x8008, 0x0117, 0) == bytes.fromhex("00000164" + "00" * 12)
    assert dumped.block(0x8008, 0x100B, 0) == bytes(16)
    assert any("polling well-known system codes" in note for note in dumped.notes)
    assert any("Search Service Code" in note for note in dumped.notes)


def test_a_gap_in_a_services_blocks_is_noted(tmp_path):
    path = tmp_path / "gap.json"
    path.write_text('{"tagId": "%s", "felica": {"systems": {"32776": {"services": {"279": '
                    '{"blocks": [{"address": 0, "data": "%s"}, {"address": 2, "data": "%s"}]}}}}}}'
                    % (IDM.hex(), "11" * 16, "22" * 16))
    dumped = load_dump(path)
    obj = to_card_json(dumped)
    assert obj["systems"]["8008"]["services"]["0117"] == ["11" * 16]
    assert any("1 block(s) after a gap" in note for note in dumped.notes)


def test_flipper_standard_and_lite_layouts(tmp_path):
    standard = load_dump(write_flipper(tmp_path / "s.nfc", "00000152" + "00" * 12))
    assert [s.system_code for s in standard.systems] == [0x8008]
    assert sorted(standard.systems[0].services) == [0x0117, 0x100B]
    card = SimulatedLiteS(IDM, blocks=[bytes([n]) * 16 for n in range(14)])
    lines = ["Filetype: Flipper NFC device", "Version: 4", "Device type: FeliCa",
             "UID: " + " ".join(f"{b:02X}" for b in IDM), "Data format version: 1",
             "Manufacture id: " + " ".join(f"{b:02X}" for b in IDM),
             "Manufacture parameter: 00 F1 00 00 00 01 43 00", "Blocks total: 28",
             "Blocks read: 28"]
    for number in range(28):
        data = card.blocks[number] if number < 14 else bytes(16)
        lines.append(f"Block {number}: 00 00 " + " ".join(f"{b:02X}" for b in data))
    (tmp_path / "l.nfc").write_text("\n".join(lines) + "\n")
    lite = load_dump(tmp_path / "l.nfc")
    obj = to_card_json(lite)
    assert obj["blocks"] == [block.hex() for block in card.blocks]
    assert obj["system_code"] == "88b4"


# ---- a scheme card examined ----------------------------------------------------------------

def _issue(tmp_path: Path) -> SimulatedLiteS:
    path = tmp_path / "card.json"
    issue_card_file(path, IssueRequest(issued=datetime(2026, 1, 15).date(), number=12345678,
                                       balance_cents=10_000), published_test_keys())
    return card_from_json(json.loads(path.read_text()))


def test_slots_their_macs_and_why_one_is_current(tmp_path):
    keys = published_test_keys()
    card = _issue(tmp_path)
    report = examine(card.idm, card.blocks, keys)
    assert [s.state for s in report.slots] == ["ok", "empty"]
    assert report.current_slot == 0 and "only slot" in report.current_slot_reason
    # slot 1 with a higher counter: make it by hand from the image codec
    from farebox.cardimage.image import encode_purse
    from dataclasses import replace
    image = report.image
    newer = replace(image.purse, counter=2, balance_cents=9_000)
    card_key = keys.card_key(image.identity.key_version, card.idm)
    blocks = list(card.blocks)
    for number, data in encode_purse(newer, 1, card.idm, card_key,
                                     image.identity.key_version).items():
        blocks[number] = data
    both = examine(card.idm, blocks, keys)
    assert both.current_slot == 1 and "higher counter (2 > 1 in slot 0)" in both.current_slot_reason
    torn = list(blocks)
    torn[5] = bytes([torn[5][0] ^ 1]) + torn[5][1:]  # slot 1's MAC no longer verifies
    report = examine(card.idm, torn, keys)
    assert [s.state for s in report.slots] == ["ok", "fails"]
    assert report.current_slot == 0 and report.image.purse.balance_cents == 10_000
    diffs = block_diffs(card.blocks, torn)
    assert [(d.block, d.area) for d in diffs] == [(4, "purse slot 1"), (5, "purse slot 1")]
    diffs = block_diffs(blocks, torn)
    assert [(d.block, d.changed_bytes) for d in diffs] == [(5, [0])]


def test_field_diffs_walk_nested_objects():
    a = {"balance": "1.00", "aavs": {"enabled": False, "amount": None}, "x": [1]}
    b = {"balance": "2.00", "aavs": {"enabled": True, "amount": None}, "y": 3}
    assert [(d.field, d.a, d.b) for d in field_diffs(a, b)] == [
        ("balance", "1.00", "2.00"), ("aavs.enabled", False, True), ("x", [1], None),
        ("y", None, 3)]
    history_a = {"history": [{"counter": 2, "amount": "1.00"}, {"counter": 1, "amount": "5.00"}],
                 "slots": [{"slot": 0, "counter": 1}, {"slot": 1, "counter": 2}]}
    history_b = {"history": [{"counter": 3, "amount": "2.00"}, {"counter": 2, "amount": "1.00"},
                             {"counter": 1, "amount": "5.00"}],
                 "slots": [{"slot": 0, "counter": 3}, {"slot": 1, "counter": 2}]}
    assert [(d.field, d.a, d.b) for d in field_diffs(history_a, history_b)] == [
        ("history[counter 3]", None, {"counter": 3, "amount": "2.00"}),
        ("slots[slot 0].counter", 1, 3)]


# ---- readers and doctor over fake trees (a mock of the hardware, see the module doc) -------

def fake_usb(root: Path, name: str, vid: str, pid: str, bus: int, dev: int, *,
             driver: str | None = None, mode: int = 0o666) -> Path:
    device = root / "sys" / "bus" / "usb" / "devices" / name
    device.mkdir(parents=True)
    for key, value in (("idVendor", vid), ("idProduct", pid), ("busnum", str(bus)),
                       ("devnum", str(dev)), ("product", "test reader")):
        (device / key).write_text(value + "\n")
    interface = device.parent / f"{name}:1.0"
    interface.mkdir()
    if driver is not None:
        target = root / "sys" / "bus" / "usb" / "drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (interface / "driver").symlink_to(target)
    node = root / "dev" / "bus" / "usb" / f"{bus:03d}" / f"{dev:03d}"
    node.parent.mkdir(parents=True, exist_ok=True)
    node.write_bytes(b"")
    node.chmod(mode)
    return node


def roots(tmp_path: Path) -> Roots:
    return Roots(sys=tmp_path / "sys", dev=tmp_path / "dev", run=tmp_path / "run",
                 etc=tmp_path / "etc", usr=tmp_path / "usr")


def test_usb_readers_found_by_id_with_their_problems(tmp_path):
    fake_usb(tmp_path, "1-1", "054c", "06c3", 1, 4, driver="port100")
    fake_usb(tmp_path, "1-2", "072f", "2200", 1, 5)
    fake_usb(tmp_path, "1-3", "046d", "c52b", 1, 6)  # a mouse: not a reader
    found = usb_readers(roots(tmp_path))
    assert [(r.id_path, r.path, r.driver) for r in found] == [
        ("usb:054c:06c3", "usb:001:004", "rcs380"), ("usb:072f:2200", "usb:001:005", "acr122")]
    assert found[0].kernel_driver == "port100" and "kernel module port100" in found[0].problems[0]
    assert found[1].kernel_driver is None and found[1].accessible  # mode 0666
    assert found[1].problems == []


def test_serial_ports_a_tty_reader_may_use(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("ttyUSB0", "ttyAMA0", "ttyS0", "tty1", "null"):
        (dev / name).write_bytes(b"")
    (dev / "serial0").symlink_to(dev / "ttyS0")  # a Pi's configured UART
    found = tty_devices(roots(tmp_path))
    assert [(t.device.name, t.path) for t in found] == [
        ("ttyUSB0", "tty:USB0:pn532"), ("ttyAMA0", "tty:AMA0:pn532"), ("ttyS0", "tty:S0:pn532")]


def _config(tmp_path: Path, **values) -> TerminalConfig:
    return TerminalConfig(state_dir=tmp_path / "state", **values)


def _by_check(findings) -> dict:
    return {f.check: f for f in findings}


def no_pcscd() -> PcscStatus:
    return PcscStatus(False, "/run/pcscd/pcscd.comm", problem="pcscd does not answer")


def test_doctor_all_well_on_a_synchronized_systemd_host(tmp_path):
    (tmp_path / "run" / "systemd" / "system").mkdir(parents=True)
    (tmp_path / "run" / "systemd" / "timesync").mkdir(parents=True)
    (tmp_path / "run" / "systemd" / "timesync" / "synchronized").write_text("")
    (tmp_path / "sys").mkdir()
    options = doctor.DoctorOptions(_config(tmp_path), roots=roots(tmp_path), user="pi")
    findings = _by_check(doctor.run_checks(options, NOW, pcsc=no_pcscd))
    assert findings["clock"].status == "ok"
    assert findings["state dir"].status == "ok"
    assert findings["kernel modules"].status == "ok"
    assert findings["pcscd"].status == "warn"  # not needed without a pcsc reader
    assert findings["card keys"].status == "warn"  # the test keys
    assert findings["terminal identity"].fix.startswith("farebox terminal init")


def _as_plain_user(run):
    """``run()`` as this user, or (under root, which may open any file) in a forked child that
    dropped to ``nobody``; its findings come back as (check, status, found, fix) tuples."""
    if os.geteuid() != 0:
        return [(f.check, f.status, f.found, f.fix) for f in run()]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            data = json.dumps([(f.check, f.status, f.found, f.fix) for f in run()]).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return [tuple(item) for item in json.loads(data)]


def test_doctor_finds_each_usual_failure_with_its_fix():
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="fb-doctor-"))
    try:
        base.chmod(0o755)  # an unprivileged user must reach the fake trees
        fake_usb(base, "1-1", "054c", "06c3", 1, 4, mode=0o600)
        (base / "sys" / "module" / "port100").mkdir(parents=True)
        (base / "run" / "systemd" / "system").mkdir(parents=True)
        state = base / "state"
        state.mkdir()
        state.chmod(0o555)
        config = TerminalConfig(state_dir=state, keys="file:/nonexistent/keys.toml")
        options = doctor.DoctorOptions(config, roots=roots(base), user="pi")
        findings = {check: (status, found, fix) for check, status, found, fix in
                    _as_plain_user(lambda: doctor.run_checks(options, NOW, pcsc=no_pcscd))}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert findings["usb permission"][0] == "fail"
    assert "usermod -aG farebox pi" in findings["usb permission"][2]
    assert findings["kernel modules"][0] == "fail"
    assert "modprobe -r port100" in findings["kernel modules"][2]
    assert findings["state dir"][0] == "fail" and "not writable" in findings["state dir"][1]
    assert findings["clock"][0] == "warn" and "set-ntp" in findings["clock"][2]
    assert findings["card keys"][0] == "fail"


def test_doctor_kernel_module_and_pcscd_holding_a_reader(tmp_path):
    fake_usb(tmp_path, "1-1", "072f", "2200", 1, 5)
    (tmp_path / "sys" / "module" / "pn533_usb").mkdir(parents=True)
    held = PcscStatus(True, "/run/pcscd/pcscd.comm",
                      [PcscReader("ACS ACR122U PICC Interface 00 00", False)])
    options = doctor.DoctorOptions(_config(tmp_path), reader="usb:072f:2200",
                                   roots=roots(tmp_path), card_timeout_s=0)
    findings = doctor.run_checks(options, NOW, pcsc=lambda: held)
    by_check = _by_check(findings)
    assert by_check["kernel modules"].status == "fail" and "pn533_usb" in by_check[
        "kernel modules"].found
    assert by_check["pcscd holds reader"].status == "fail"
    assert "pcsc:ACS ACR122U PICC Interface 00 00" in by_check["pcscd holds reader"].fix
    assert by_check["reader"].status == "fail"  # there is no real USB reader to open


def test_doctor_with_a_card_on_a_simulated_reader(tmp_path):
    card_path = tmp_path / "octopus.json"
    card_path.write_text(json.dumps(octopus_card("00000164" + "00" * 12).to_json()))
    (tmp_path / "sys").mkdir()
    options = doctor.DoctorOptions(_config(tmp_path), reader=f"sim:{card_path}",
                                   roots=roots(tmp_path), card_timeout_s=0.1)
    found = _by_check(doctor.run_checks(options, NOW, pcsc=no_pcscd))["card in field"]
    assert found.status == "ok" and IDM.hex() in found.found
    options = doctor.DoctorOptions(_config(tmp_path), reader=f"sim:{tmp_path / 'none.json'}",
                                   roots=roots(tmp_path), card_timeout_s=0.1)
    missing = _by_check(doctor.run_checks(options, NOW, pcsc=no_pcscd))["reader"]
    assert missing.status == "fail" and "no such card file" in missing.found


# ---- untrusted dumps: anything parses or is a DumpError ----------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=40)
    | st.sampled_from(["0117", "8008", IDM.hex(), "00" * 16, "AAAAAAAAAAAAAAAAAAAAAA=="]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["felica", "systems", "services", "blocks", "data", "address", "code",
                         "serviceCode", "tagId", "pMm", "scannedAt", "skipped", "cards",
                         "cardType", "32776", "279", "idm", "pmm", "system_code"]) | st.text(
            max_size=5), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_json, wrapper=st.sampled_from(["metrodroid", "farebot", "cards", "card", "raw"]))
def test_any_json_dump_loads_or_is_a_dump_error(tmp_path, body, wrapper):
    obj = {"metrodroid": {"tagId": IDM.hex(), "felica": body},
           "farebot": {"cardType": "FeliCa", "tagId": "AQIDBAUGBwg=", "systems": body},
           "cards": {"cards": [body]},
           "card": {"idm": IDM.hex(), "pmm": PMM.hex(), "system_code": "8008", "systems": body},
           "raw": body}[wrapper]
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(obj))
    try:
        dumped = load_dump(path)
    except DumpError as error:
        assert "\n" not in str(error)
        return
    try:
        to_card_json(dumped)
    except DumpError:
        pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from([
    "Device type: FeliCa", "Manufacture id: 01 02 03 04 05 06 07 08", "System found: 1",
    "System 00: 8008", "System 01: zz", "Manufacture parameter: 00 F1", "Data format version: x",
    "Block 0000: | Service code 0117 | Block index 00 | Data: " + "00 " * 16 + "|",
    "Block 0001: | Service code 0117 | Block index 01 | Data: 00 |", "Block 3: 00 00 " + "11 " * 16,
    "Block 4: 00", "Blocks total: 28", ":", "::::", "Block 0002:"]) | st.text(max_size=30),
    max_size=12))
def test_any_flipper_text_loads_or_is_a_dump_error(tmp_path, lines):
    path = tmp_path / "dump.nfc"
    path.write_text("Filetype: Flipper NFC device\n" + "\n".join(lines) + "\n")
    try:
        dumped = load_dump(path)
    except DumpError as error:
        assert "\n" not in str(error)
        return
    try:
        to_card_json(dumped)
    except DumpError:
        pass


@pytest.mark.parametrize("policy, rule, reader, status", [
    (False, False, None, None),  # this pcscd does not ask polkit: nothing to say
    (True, False, None, "warn"),
    (True, False, "pcsc", "fail"),  # the configured reader cannot be used by the service
    (True, True, "pcsc", "ok"),
])
def test_doctor_pcscd_polkit_rule_for_the_service_user(tmp_path, policy, rule, reader, status):
    """pcsc-lite 2.x (Debian trixie, Raspberry Pi OS) asks polkit, which refuses a service
    user without a login session unless a rule (hw/polkit/) allows it."""
    base = roots(tmp_path)
    if policy:
        (base.usr / doctor.PCSC_POLKIT_POLICY).parent.mkdir(parents=True)
        (base.usr / doctor.PCSC_POLKIT_POLICY).write_text("<policyconfig/>")
    if rule:
        (base.etc / doctor.FAREBOX_POLKIT_RULE).parent.mkdir(parents=True)
        shutil.copy(Path(__file__).parents[2] / "hw" / "polkit" / "60-farebox-pcscd.rules",
                    base.etc / doctor.FAREBOX_POLKIT_RULE)
    found = doctor._pcscd_polkit(base, reader)
    assert (found and found.status) == status
    if status in ("warn", "fail"):
        assert "60-farebox-pcscd.rules" in found.fix


@pytest.mark.skipif(shutil.which("node") is None, reason="no JavaScript engine (node) to run it")
@pytest.mark.parametrize("action, user, allowed", [
    ("org.debian.pcsc-lite.access_pcsc", "farebox", True),
    ("org.debian.pcsc-lite.access_card", "farebox", True),
    ("org.debian.pcsc-lite.access_pcsc", "pi", False),
    ("org.freedesktop.login1.reboot", "farebox", False),
])
def test_the_polkit_rule_allows_the_farebox_user_pcscd_and_nothing_else(action, user, allowed):
    """The rule run as polkitd runs it (JavaScript, polkit.addRule), with node standing in for
    polkitd's engine."""
    import json as _json
    import subprocess

    rule = (Path(__file__).parents[2] / "hw" / "polkit" / "60-farebox-pcscd.rules").read_text()
    script = ("const rules = []; const polkit = {Result: {YES: 'yes'}, "
              "addRule: (f) => rules.push(f)};\n" + rule +
              f"\nconst answers = rules.map((f) => f({{id: {_json.dumps(action)}}}, "
              f"{{user: {_json.dumps(user)}}}));\n"
              "console.log(JSON.stringify(answers.filter((a) => a !== undefined)));\n")
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert _json.loads(done.stdout) == (["yes"] if allowed else [])
