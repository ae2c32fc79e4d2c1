"""Card keys through the CLI (issue 17 item 6).

- The published test keys move money only where allowed: with no configuration file (the built-in
  demo set-up: the README's walk-through on simulated cards) or with ``allow_test_keys = true``.
  A configuration file that names them without allowing them, or names no keys at all, makes
  every command that moves money (tap, add-value, service ...) and the daemon exit 2 before
  anything is touched.
- A key file (and a PKCS#11 PIN file) others may read is refused, naming it.
- The state directory is made 0700 and the journal 0600 whatever the umask.
- ``keys = "pkcs11:..."``: master keys in a SoftHSM2 token (no skip); cards issued under the key
  file are approved under the token and the other way round, the same as under the file, by
  ``tap``, ``service issue`` and the daemon; no key ever shows.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from farebox.terminal.card.keys import SoftwareKeyStore
from farebox.terminal.store.journal import Journal

from ..terminal.test_keys_pkcs11 import SoftHsm
from .test_e2e_udp import Served, run_daemon

T0 = "2026-11-22T07:00:00+08:00"
AT = "2026-11-22T08:00:00+08:00"
LATER = "2026-11-22T09:00:00+08:00"
MASTER = bytes.fromhex("8a3f17c2e1d4b5a6978877665544332f")
REFUSED = "the published test keys are refused"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- the published test keys -------------------------------------------------------------------

def money_commands(farebox) -> dict[str, list]:
    card = farebox.card(balance="10.00")
    return {
        "tap": ["tap", card, "--fare", "1.00"],
        "add-value": ["add-value", card, "--amount", "50"],
        "service issue": ["service", "issue", farebox.path("new.json"), "--category", "adult"],
        "service return": ["service", "return", card],
        "service aavs": ["service", "aavs", card, "--amount", "250"],
    }


REFUSING_CONFIGS = {
    "names test keys": '[terminal]\nkeys = "test"\n[fares]\nadult = "1.00"\n',
    "says no": '[terminal]\nkeys = "test"\nallow_test_keys = false\n[fares]\nadult = "1.00"\n',
    "names no keys": '[terminal]\nretap_window_s = 30\n[fares]\nadult = "1.00"\n',
}


@pytest.mark.parametrize("how", ["--config", "FAREBOX_CONFIG"])
@pytest.mark.parametrize("text", REFUSING_CONFIGS.values(), ids=REFUSING_CONFIGS.keys())
def test_a_config_file_that_does_not_allow_the_test_keys_moves_no_money(farebox, monkeypatch,
                                                                        text, how):
    config = farebox.path("terminal.toml")
    config.write_text(text)
    given = ["--config", config] if how == "--config" else []
    if how == "FAREBOX_CONFIG":
        monkeypatch.setenv("FAREBOX_CONFIG", str(config))
    for name, argv in money_commands(farebox).items():
        card = argv[1] if argv[0] != "service" else argv[2]
        before = card.read_bytes() if card.exists() else None
        run = farebox(*argv, "--at", AT, "--state", farebox.state, *given)
        run.assert_bad_input()
        assert REFUSED in run.err and "allow_test_keys = true" in run.err, (name, run.err)
        assert (card.read_bytes() if card.exists() else None) == before, name
        assert not farebox.state.exists(), name  # nothing was opened, let alone journalled


def test_the_daemon_refuses_the_test_keys_at_start(farebox):
    """Before the reader: udp:127.0.0.1:9 never answers, so a daemon that got that far would
    wait for it for ever (the timeout fails the test)."""
    config = farebox.path("terminal.toml")
    config.write_text(REFUSING_CONFIGS["names test keys"])
    started = time.monotonic()
    run = farebox.script("run", "--config", config, "--reader", "udp:127.0.0.1:9",
                         "--state", farebox.state, "--metrics", "127.0.0.1:0", timeout=60)
    run.assert_bad_input()
    assert REFUSED in run.err
    assert time.monotonic() - started < 60 and not farebox.state.exists()


def test_the_test_keys_work_where_allowed_and_without_a_config_file(farebox):
    card = farebox.card(balance="10.00")
    # the README's walk-through: no configuration file, a simulated card, the test keys
    assert farebox.tap(card, "--fare", "1.00", at=AT).json()["outcome"] == "approved"
    config = farebox.path("demo.toml")
    config.write_text('[terminal]\nkeys = "test"\nallow_test_keys = true\n'
                      '[fares]\nadult = "1.00"\n')
    run = farebox("tap", card, "--config", config, "--at", LATER, "--state", farebox.state,
                  "--json").json()
    assert run["outcome"] == "approved" and run["balance_after"] == "8.00"
    server = Served(card, "--taps", 1)
    try:
        done, events = run_daemon(server.address, farebox.state, "--config", config,
                                  "--max-taps", 1)
        assert done.returncode == 0, done.stderr
        server.finish()
    finally:
        server.kill()
    assert [e["outcome"] for e in events] == ["approved"]


def test_doctor_fails_refused_test_keys_and_warns_about_allowed_ones(farebox):
    config = farebox.path("terminal.toml")
    for text, status in ((REFUSING_CONFIGS["names test keys"], "fail"),
                         ('[terminal]\nallow_test_keys = true\n', "warn")):
        config.write_text(text)
        run = farebox("doctor", "--config", config, "--state", farebox.state, "--json")
        checks = {c["check"]: c for c in json.loads(run.out)["checks"]}
        assert checks["card keys"]["status"] == status, checks["card keys"]
        assert (run.code == 3) == (status == "fail")


def test_looking_at_a_card_is_not_moving_money(farebox):
    config = farebox.path("terminal.toml")
    config.write_text(REFUSING_CONFIGS["names test keys"])
    card = farebox.card(balance="10.00")
    shown = farebox("card", "show", card, "--config", config, "--json").json()
    assert shown["balance"] == "10.00" and shown["test_key"] is True


def test_allow_test_keys_must_be_a_boolean(farebox):
    config = farebox.path("terminal.toml")
    config.write_text('[terminal]\nallow_test_keys = "yes"\n')
    run = farebox("tap", farebox.card(), "--fare", "1.00", "--config", config, "--at", AT,
                  "--state", farebox.state)
    run.assert_bad_input()
    assert "terminal.allow_test_keys: expected true or false" in run.err


# ---- key files -------------------------------------------------------------------------------

def key_file(path: Path, file_mode: int = 0o600) -> Path:
    path.write_text(f'issue_version = 1\n[master_keys]\n1 = "{MASTER.hex()}"\n')
    path.chmod(file_mode)
    return path


def file_config(farebox, keys: Path, name: str = "file.toml") -> Path:
    config = farebox.path(name)
    config.write_text(f'[terminal]\nkeys = "file:{keys}"\n[fares]\nadult = "5.80"\n')
    return config


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o601], ids=oct)
def test_a_key_file_others_may_read_is_refused_naming_it(farebox, file_mode):
    keys = key_file(farebox.path("keys.toml"), file_mode)
    config = file_config(farebox, keys)
    card = farebox.card(balance="10.00")
    for argv in (["tap", card], ["service", "issue", farebox.path("n.json"), "--category",
                                 "adult"]):
        run = farebox(*argv, "--config", config, "--at", AT, "--state", farebox.state)
        run.assert_bad_input()
        assert f"key file {keys}: mode {file_mode:04o}" in run.err and "chmod 600" in run.err
        assert MASTER.hex() not in run.err
    run = farebox.script("run", "--config", config, "--reader", "udp:127.0.0.1:9",
                         "--state", farebox.state, timeout=60)
    assert run.code == 2 and str(keys) in run.err
    doctor = farebox("doctor", "--config", config, "--state", farebox.state, "--json")
    checks = {c["check"]: c for c in json.loads(doctor.out)["checks"]}
    assert checks["card keys"]["status"] == "fail" and str(keys) in checks["card keys"]["found"]


@pytest.mark.parametrize("file_mode", [0o600, 0o400], ids=oct)
def test_a_key_file_only_its_owner_may_read_issues_and_approves(farebox, file_mode):
    config = file_config(farebox, key_file(farebox.path("keys.toml"), file_mode))
    issued = farebox("service", "issue", farebox.path("a.json"), "--category", "adult",
                     "--config", config, "--at", T0, "--state", farebox.state, "--json").json()
    assert issued["collected"] == "200.00"
    run = farebox("tap", farebox.path("a.json"), "--config", config, "--at", AT, "--state",
                  farebox.state, "--json").json()
    assert run["outcome"] == "approved" and run["amount"] == "5.80"


# ---- the state directory and the journal -------------------------------------------------------

@pytest.fixture
def umask():
    def set_umask(value: int) -> None:
        os.umask(value)

    previous = os.umask(0o022)
    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("loose", [0o000, 0o022, 0o002], ids=oct)
def test_the_state_directory_is_0700_and_the_journal_0600_whatever_the_umask(farebox, umask,
                                                                           loose):
    umask(loose)
    card = farebox.card(balance="10.00")
    state = farebox.path("deep") / "state"
    assert farebox.tap(card, "--fare", "1.00", at=AT, state=state).json()["outcome"] == "approved"
    assert mode(state) == 0o700
    assert mode(state / "journal.sqlite3") == 0o600
    for companion in state.glob("journal.sqlite3-*"):
        assert mode(companion) == 0o600, companion
    assert farebox("terminal", "init", "--state", farebox.path("fresh"), "--id", "BUS-7").code == 0
    assert mode(farebox.path("fresh")) == 0o700
    assert mode(farebox.path("fresh") / "journal.sqlite3") == 0o600
    # the -wal and -shm files while the journal is open (they go when the last user closes it)
    journal = Journal(farebox.path("open") / "journal.sqlite3")
    try:
        journal.terminal_id  # noqa: B018 - opened, WAL mode on
        companions = list(farebox.path("open").glob("journal.sqlite3-*"))
        assert {p.name for p in companions} >= {"journal.sqlite3-wal", "journal.sqlite3-shm"}
        assert all(mode(p) == 0o600 for p in companions), [oct(mode(p)) for p in companions]
    finally:
        journal.close()


def test_a_journal_others_could_read_is_made_private_and_a_chosen_directory_kept(farebox, umask):
    umask(0o000)
    state = farebox.path("state")
    state.mkdir(mode=0o750)
    Journal(state / "journal.sqlite3").close()
    (state / "journal.sqlite3").chmod(0o644)  # as an older farebox left it
    card = farebox.card(balance="10.00")
    assert farebox.tap(card, "--fare", "1.00", at=AT).json()["outcome"] == "approved"
    assert mode(state / "journal.sqlite3") == 0o600
    assert mode(state) == 0o750  # an existing directory is the owner's choice


# ---- PKCS#11: master keys in a SoftHSM2 token ------------------------------------------------

@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    token = SoftHsm(tmp_path_factory.mktemp("softhsm-cli")).init()
    token.import_key("farebox-master-1", MASTER)
    return token


def pkcs11_config(farebox, hsm: SoftHsm, pin_file: Path | None = None,
                  name: str = "pkcs11.toml") -> Path:
    config = farebox.path(name)
    config.write_text(f'[terminal]\nkeys = "{hsm.spec(pin_file)}"\n[fares]\nadult = "5.80"\n')
    return config


def outcome(run) -> tuple:
    result = run.json()
    return result["outcome"], result["reason"], result["amount"], result["balance_after"]


def test_cards_issued_under_the_key_file_are_approved_under_the_token_and_back(farebox, hsm):
    file_keys = file_config(farebox, key_file(farebox.path("keys.toml")))
    token_keys = pkcs11_config(farebox, hsm)
    env = hsm.env
    outputs = []

    def token(*argv):
        run = farebox.script(*argv, env=env, timeout=60)
        outputs.append(run.out + run.err)
        return run

    # issued by the file store, paid under each store: the same result
    farebox("service", "issue", farebox.path("a.json"), farebox.path("b.json"), "--category",
            "adult", "--config", file_keys, "--at", T0, "--state", farebox.path("desk"),
            "--json").json()
    by_token = outcome(token("tap", farebox.path("a.json"), "--config", token_keys, "--at", AT,
                             "--state", farebox.path("pk"), "--json"))
    by_file = outcome(farebox("tap", farebox.path("b.json"), "--config", file_keys, "--at", AT,
                              "--state", farebox.path("fk"), "--json"))
    assert by_token == by_file == ("approved", None, "5.80", "144.20")
    # issued inside the token, paid under the file store
    issued = token("service", "issue", farebox.path("c.json"), "--category", "adult", "--config",
                   token_keys, "--at", T0, "--state", farebox.path("pk-desk"), "--json").json()
    assert issued["collected"] == "200.00"
    assert outcome(farebox("tap", farebox.path("c.json"), "--config", file_keys, "--at", AT,
                           "--state", farebox.path("fk"), "--json")) == by_file
    shown = token("card", "show", farebox.path("c.json"), "--config", token_keys, "--json").json()
    assert shown["balance"] == "144.20" and shown["test_key"] is False
    # a card under the published test keys is no card of either store
    test_card = farebox.card("test.json", balance="10.00")
    assert outcome(token("tap", test_card, "--config", token_keys, "--at", AT, "--state",
                         farebox.path("pk"), "--json"))[:2] == ("declined", "invalid_card")
    assert outcome(farebox("tap", test_card, "--config", file_keys, "--at", AT, "--state",
                           farebox.path("fk"), "--json"))[:2] == ("declined", "invalid_card")
    doctor = token("doctor", "--config", token_keys, "--state", farebox.path("pk"), "--json")
    checks = {c["check"]: c for c in json.loads(doctor.out)["checks"]}
    assert checks["card keys"]["status"] == "ok", checks["card keys"]
    assert "key versions 1, issue version 1" in checks["card keys"]["found"]
    # no master key, no card key, in anything printed or journalled
    idms = [bytes.fromhex(json.loads(farebox.path(n).read_text())["idm"])
            for n in ("a.json", "c.json")]
    card_keys = [SoftwareKeyStore({1: MASTER}, 1).card_key(1, idm) for idm in idms]
    journals = b"".join(p.read_bytes() for p in farebox.tmp.rglob("journal.sqlite3*"))
    for secret in (MASTER, *card_keys):
        assert all(secret.hex() not in text.lower() for text in outputs)
        assert secret not in journals and secret.hex().encode() not in journals.lower()


def test_the_daemon_takes_taps_with_the_keys_in_the_token(farebox, hsm):
    file_keys = file_config(farebox, key_file(farebox.path("keys.toml")))
    farebox("service", "issue", farebox.path("a.json"), "--category", "adult", "--config",
            file_keys, "--at", T0, "--state", farebox.path("desk"), "--json").json()
    server = Served(farebox.path("a.json"), "--taps", 2)
    try:
        done = farebox.script("run", "--config", pkcs11_config(farebox, hsm), "--reader",
                              server.address, "--state", farebox.state, "--max-taps", 2,
                              "--json", env=hsm.env, timeout=120)
        assert done.code == 0, done.err
        server.finish()
    finally:
        server.kill()
    taps = [json.loads(line) for line in done.out.splitlines()]
    assert [(t["outcome"], t["balance_after"]) for t in taps] == [("approved", "144.20"),
                                                                  ("approved", "138.40")]


@pytest.mark.parametrize("problem", ["wrong pin", "readable pin file", "no such token",
                                     "missing pin file"])
def test_a_token_that_cannot_be_used_is_exit_2_naming_what(farebox, hsm, problem):
    pin_file = {"wrong pin": lambda: hsm.pin_file("0000-1111", name="pin-wrong"),
                "readable pin file": lambda: hsm.pin_file(mode=0o644, name="pin-loose"),
                "no such token": hsm.pin_file,
                "missing pin file": lambda: farebox.path("no-pin")}[problem]()
    config = pkcs11_config(farebox, hsm, pin_file)
    if problem == "no such token":
        config.write_text(config.read_text().replace("token=farebox", "token=elsewhere"))
    card = farebox.card(balance="10.00")
    before = card.read_bytes()
    run = farebox.script("tap", card, "--config", config, "--at", AT, "--state",
                         farebox.state, env=hsm.env)
    run.assert_bad_input()
    named = {"wrong pin": f"the PIN in {pin_file} is refused",
             "readable pin file": f"PIN file {pin_file}: mode 0644",
             "no such token": "pkcs11 token 'elsewhere': not found",
             "missing pin file": f"PIN file {pin_file}: no such file"}[problem]
    assert named in run.err and hsm.pin not in run.err and "0000-1111" not in run.err
    assert card.read_bytes() == before and not farebox.state.exists()


def test_a_bad_pkcs11_key_source_is_exit_2_naming_the_key(farebox):
    config = farebox.path("terminal.toml")
    config.write_text('[terminal]\nkeys = "pkcs11:module=/usr/lib/x.so;token=t"\n')
    run = farebox("tap", farebox.card(), "--fare", "1.00", "--config", config, "--at", AT,
                  "--state", farebox.state)
    run.assert_bad_input()
    assert f"{config}: terminal.keys: pkcs11: pin-file= is required" in run.err
