"""Action lists held in the state, through the CLI and a real receiver over HTTP (issue 17 item 7).

A list ``farebox actions fetch`` took is applied by every later tap and by ``run`` with or
without ``--config`` (it is kept with the key it was verified with); a list on disk that no
longer verifies leaves the last good list in force and raises an alarm (log, metric, doctor);
a list issued in the future or whose serial jumps too far is refused at fetch; ``doctor``
says the list's age and fails past its expiry.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.protocol.settlement import ActionEntry, SignedActionList

from .conftest import CONSOLE_SCRIPT
from .test_clearing_http import start_receiver

CARD = "12345678"
REPORTED = "2026-11-22T05:00:00+08:00"
AFTER = "2026-11-22T09:00:00+08:00"  # past the report + 3 h: a lost card is refused


class House:
    """A real receiver (``farebox clearing serve``) and a terminal configuration trusting it."""

    def __init__(self, farebox, url: str, db) -> None:
        self.farebox, self.url, self.db = farebox, url, db
        self.public_key = farebox("clearing", "key", "--db", db, "--json").json()["public_key"]
        self.config = farebox.path("trust.toml")
        self.config.write_text(f'[terminal]\nclearing_url = "{url}"\n'
                               f'clearing_public_key = "{self.public_key}"\n'
                               'allow_test_keys = true\n')  # the cards are `card new` cards

    def list_card(self, card: str = CARD, reason: str = "lost") -> int:
        return self.farebox("clearing", "action", "--db", self.db, "--card", card, "--reason",
                            reason, "--at", REPORTED, "--json").json()["serial"]

    def fetch(self, url: str | None = None, config=None):
        return self.farebox("actions", "fetch", "--state", self.farebox.state, "--config",
                            config or self.config, "--json", *(["--url", url] if url else []))

    def signing_key(self) -> Ed25519PrivateKey:
        with sqlite3.connect(self.db) as store:
            raw = store.execute("SELECT value FROM meta WHERE name = 'list_signing_key'"
                                ).fetchone()[0]
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw))

    def signed(self, serial: int, issued: datetime, cards=(CARD,)) -> dict:
        """A list signed with the house's real key (what a house with a wrong clock, or a
        replayed or mis-numbered list, would send)."""
        entries = [ActionEntry(card, "lost", REPORTED) for card in cards]
        return SignedActionList.publish(entries, serial, issued, self.signing_key()).to_json()


@pytest.fixture
def house(farebox, tmp_path):
    db = tmp_path / "clearing.sqlite3"
    with start_receiver(db) as url:
        yield House(farebox, url, str(db))


class Serving:
    """A loopback HTTP server answering ``GET /v1/actions`` with one fixed document."""

    def __init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.document: object = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serving():
    server = Serving()
    yield server
    server.close()


def tap(farebox, card, at=AFTER, *config):
    """``farebox tap`` WITHOUT ``--config`` unless one is given."""
    return farebox("tap", card, "--fare", "1.00", "--at", at, "--state", farebox.state,
                   *(["--config", config[0]] if config else []), "--json")


def doctor_check(farebox, name="action list", *extra) -> tuple[int, dict]:
    run = farebox("doctor", "--state", farebox.state, *extra, "--json")
    checks = {c["check"]: c for c in json.loads(run.out)["checks"]}
    return run.code, checks[name]


def tamper(farebox) -> None:
    """Change one card number inside the held list's signed text (the signature then fails)."""
    path = farebox.state / "actions.json"
    document = json.loads(path.read_text())
    assert CARD in document["list"]
    document["list"] = document["list"].replace(CARD, "87654321")
    path.write_text(json.dumps(document))


# -- a fetched list is always applied ------------------------------------------------------------


def test_a_fetched_list_blocks_the_card_at_a_tap_without_config(farebox, house):
    """The reproduction: a card reported lost, the list fetched, then ``farebox tap`` without
    ``--config`` approved it (the held list was read only when clearing_public_key was
    configured)."""
    card = farebox.card(number=CARD, balance="10.00")
    assert house.list_card() == 1
    assert house.fetch().json()["serial"] == 1
    refused = tap(farebox, card).json()
    assert (refused["outcome"], refused["reason"]) == ("declined", "blocked")
    assert farebox.show(card)["balance"] == "10.00"
    with_config = tap(farebox, card, AFTER, house.config).json()  # the same with --config
    assert (with_config["outcome"], with_config["reason"]) == ("declined", "blocked")


def test_run_without_config_applies_the_fetched_list(farebox, house):
    from .test_e2e_udp import Served

    card = farebox.card(number=CARD, balance="10.00")
    house.list_card()
    house.fetch().json()
    served = Served(card, "--taps", 1)
    try:
        done = subprocess.run([str(CONSOLE_SCRIPT), "run", "--reader", served.address, "--fare",
                               "1.00", "--state", str(farebox.state), "--json", "--max-taps",
                               "1"], capture_output=True, text=True, timeout=60)
    finally:
        served.kill()
    assert done.returncode == 0, done.stderr
    event = json.loads(done.stdout.splitlines()[0])
    assert (event["outcome"], event["reason"]) == ("declined", "blocked")


# -- a tampered list: the last good list stays in force, and an alarm ----------------------------


def test_a_tampered_list_leaves_the_last_good_list_in_force_and_raises_the_alarm(farebox, house):
    card = farebox.card(number=CARD, balance="10.00")
    house.list_card()
    house.fetch().json()
    code, check = doctor_check(farebox)
    assert check["status"] == "ok" and "serial 1" in check["found"], check
    tamper(farebox)
    configured = tap(farebox, card, AFTER, house.config)  # was exit 2: every tap refused
    assert configured.code == 0, configured.err
    assert configured.json()["reason"] == "blocked"  # the last good list is applied
    refused = tap(farebox, card).json()  # the same without --config
    assert (refused["outcome"], refused["reason"]) == ("declined", "blocked")
    other = farebox.card("other.json", number="87654321", balance="10.00")
    assert tap(farebox, other).json()["outcome"] == "approved"  # the forged entry is not
    # the log line (the installed command, so the real logging set-up)
    script = farebox.script("tap", card, "--fare", "1.00", "--at", AFTER, "--state",
                            farebox.state, "--json")
    assert script.code == 0 and json.loads(script.out)["reason"] == "blocked"
    assert "actions.json" in script.err and "does not verify" in script.err
    assert "last good list (serial 1)" in script.err
    # doctor
    code, check = doctor_check(farebox)
    assert code == 3 and check["status"] == "fail", check
    assert "does not verify" in check["found"] and "serial 1" in check["found"]
    assert "farebox actions fetch" in check["fix"]
    # a fresh fetch replaces the tampered file and clears the alarm
    house.fetch().json()
    code, check = doctor_check(farebox)
    assert check["status"] == "ok", check


def test_the_daemon_metric_raises_the_alarm_for_a_tampered_list(farebox, house):
    from .test_daemon_ops import Daemon, wait_for_scrape

    house.list_card()
    house.fetch().json()
    tamper(farebox)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a port no card is on
        probe.bind(("127.0.0.1", 0))
        idle_port = probe.getsockname()[1]
    daemon = Daemon("--reader", f"udp:127.0.0.1:{idle_port}", "--fare", "1.00", "--state",
                    farebox.state, "--metrics", "127.0.0.1:0")
    try:
        url = daemon.read_until(lambda e: e["event"] == "start")["metrics"]
        warned = [e for e in daemon.events if e["level"] == "warning"
                  and "does not verify" in e["message"]]
        assert warned and "last good list (serial 1)" in warned[0]["message"], daemon.events
        samples = wait_for_scrape(url, lambda s: s.get(("farebox_action_list_alarm", ())) == 1)
        assert samples[("farebox_action_list_alarm", ())] == 1
        assert samples[("farebox_action_list_serial", ())] == 1  # the good list in force
        # the house's list fetched again (as the daemon's uploader would): the alarm clears
        house.fetch().json()
        samples = wait_for_scrape(url, lambda s: s.get(("farebox_action_list_alarm", ())) == 0)
        assert samples[("farebox_action_list_alarm", ())] == 0
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        daemon.kill()


def test_a_tampered_list_and_no_good_list_refuses_every_tap(farebox, house):
    """Nothing verified to fall back on: the terminal cannot know which cards are lost, so it
    takes no money (docs/cli.md "Action lists")."""
    card = farebox.card(number=CARD, balance="10.00")
    house.list_card()
    house.fetch().json()
    tamper(farebox)
    (farebox.state / "actions.good.json").unlink()
    refused = tap(farebox, card)
    refused.assert_bad_input()
    assert "no verified action list" in refused.err and "farebox actions fetch" in refused.err
    assert farebox.show(card)["balance"] == "10.00"
    code, check = doctor_check(farebox)
    assert code == 3 and check["status"] == "fail"
    house.fetch().json()  # the way out
    assert tap(farebox, card).json()["reason"] == "blocked"


def test_an_older_list_put_back_on_disk_does_not_replace_the_good_one(farebox, house):
    """A validly signed but older list copied over the held one (a card's entry dropped by
    going back to a list from before its report) is a rollback: the good list stays."""
    card = farebox.card(number=CARD, balance="10.00")
    house.fetch().json()  # serial 0, empty
    older = (farebox.state / "actions.json").read_bytes()
    house.list_card()
    house.fetch().json()
    (farebox.state / "actions.json").write_bytes(older)
    assert tap(farebox, card).json()["reason"] == "blocked"
    code, check = doctor_check(farebox)
    assert check["status"] == "fail" and "older than" in check["found"]


# -- refused at fetch: issued in the future, a serial jump ---------------------------------------


def test_a_list_issued_in_the_future_is_refused_at_fetch(farebox, house, serving):
    house.list_card()
    house.fetch().json()
    held = (farebox.state / "actions.json").read_bytes()
    now = datetime.now(timezone.utc)
    serving.document = house.signed(2, now + timedelta(hours=1), cards=())
    refused = house.fetch(serving.url)
    refused.assert_bad_input()
    assert "in the future" in refused.err and "serial 2" in refused.err
    assert (farebox.state / "actions.json").read_bytes() == held
    card = farebox.card(number=CARD, balance="10.00")
    assert tap(farebox, card).json()["reason"] == "blocked"  # the held list is still in force
    # within the skew bound (a minute ahead) it is taken
    serving.document = house.signed(2, now + timedelta(seconds=60))
    assert house.fetch(serving.url).json()["serial"] == 2


def test_a_serial_jump_beyond_the_bound_is_refused_at_fetch(farebox, house, serving):
    house.list_card()
    house.fetch().json()
    held = (farebox.state / "actions.json").read_bytes()
    now = datetime.now(timezone.utc)
    serving.document = house.signed(2 ** 40, now, cards=())  # would shut out every later list
    refused = house.fetch(serving.url)
    refused.assert_bad_input()
    assert "serial" in refused.err and "action_list_max_serial_jump" in refused.err
    assert (farebox.state / "actions.json").read_bytes() == held
    bounded = farebox.path("bounded.toml")
    bounded.write_text(house.config.read_text() + "action_list_max_serial_jump = 10\n")
    serving.document = house.signed(12, now)
    house.fetch(serving.url, bounded).assert_bad_input()
    serving.document = house.signed(11, now)
    assert house.fetch(serving.url, bounded).json()["serial"] == 11


def test_a_future_list_put_on_disk_is_refused_at_load(farebox, house):
    card = farebox.card(number=CARD, balance="10.00")
    house.list_card()
    house.fetch().json()
    path = farebox.state / "actions.json"
    kept = json.loads(path.read_text())
    future = house.signed(2, datetime.now(timezone.utc) + timedelta(days=3), cards=())
    path.write_text(json.dumps({**kept, **future}))  # signed by the house, with its key
    assert tap(farebox, card).json()["reason"] == "blocked"  # the good list (serial 1)
    code, check = doctor_check(farebox)
    assert check["status"] == "fail" and "in the future" in check["found"]


# -- doctor: age and expiry ----------------------------------------------------------------------


def test_doctor_reports_the_list_age_and_fails_past_expiry(farebox, house):
    code, check = doctor_check(farebox)
    assert check["status"] == "ok" and "no action list" in check["found"]
    code, check = doctor_check(farebox, "action list", "--config", house.config)
    assert check["status"] == "warn" and "farebox actions fetch" in check["fix"]
    house.list_card()
    house.fetch().json()
    code, check = doctor_check(farebox)
    assert code == 0 and check["status"] == "ok", check
    assert "serial 1, 1 entries" in check["found"] and "old" in check["found"]
    assert "valid until" in check["found"]
    # a list that ran out: signed by the house two days ago, held as fetched then
    card = farebox.card(number=CARD, balance="10.00")
    stale = house.signed(3, datetime.now(timezone.utc) - timedelta(days=2))
    for name in ("actions.json", "actions.good.json"):
        path = farebox.state / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **stale}))
    code, check = doctor_check(farebox)
    assert code == 3 and check["status"] == "fail", check
    assert "expired" in check["found"] and "2 days" in check["found"]
    assert tap(farebox, card).json()["reason"] == "blocked"  # its entries still apply


# -- the key kept with the list ------------------------------------------------------------------


def test_a_list_fetched_before_keys_were_kept_gets_its_key_at_the_next_configured_tap(farebox,
                                                                                      house):
    card = farebox.card(number=CARD, balance="10.00")
    house.list_card()
    house.fetch().json()
    path = farebox.state / "actions.json"
    old_format = {k: v for k, v in json.loads(path.read_text()).items() if k != "public_key"}
    path.write_text(json.dumps(old_format))
    (farebox.state / "actions.good.json").unlink()
    refused = tap(farebox, card)  # no key configured, none kept: nothing verifies it
    refused.assert_bad_input()
    assert "no clearing house key is kept with it" in refused.err
    assert tap(farebox, card, AFTER, house.config).json()["reason"] == "blocked"
    for name in ("actions.json", "actions.good.json"):
        kept = json.loads((farebox.state / name).read_text())
        assert kept == {**old_format, "public_key": house.public_key}
    assert tap(farebox, card).json()["reason"] == "blocked"
    assert doctor_check(farebox)[1]["status"] == "ok"


def test_the_configured_key_wins_over_a_key_put_beside_a_forged_list(farebox, house):
    """Whoever can write the state can put a list and a key of their own there: with
    clearing_public_key configured, that list is an alarm and the good list stays."""
    card = farebox.card(number=CARD, balance="10.00")
    house.list_card()
    house.fetch().json()
    forger = Ed25519PrivateKey.generate()
    forged = SignedActionList.publish([], 5, datetime.now(timezone.utc), forger).to_json()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = forger.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    (farebox.state / "actions.json").write_text(json.dumps({**forged, "public_key": key}))
    blocked = tap(farebox, card, AFTER, house.config).json()
    assert blocked["reason"] == "blocked"  # the good list, verified with the configured key
    code, check = doctor_check(farebox, "action list", "--config", house.config)
    assert code == 3 and "does not verify" in check["found"]


def test_a_clock_that_went_back_after_the_fetch_keeps_the_list_in_force(farebox, house):
    """A Pi without a battery clock boots hours behind: the list it fetched then says it was
    issued in the future. It was judged at its fetch; it stays in force, and doctor warns."""
    card = farebox.card(number=CARD, balance="10.00")
    house.list_card()
    house.fetch().json()
    ahead = house.signed(1, datetime.now(timezone.utc) + timedelta(hours=6))
    for name in ("actions.json", "actions.good.json"):  # as that fetch left them
        path = farebox.state / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **ahead}))
    assert tap(farebox, card).json()["reason"] == "blocked"
    code, check = doctor_check(farebox)
    assert code == 0 and check["status"] == "warn" and "behind" in check["found"], check


def test_a_loss_report_reaches_a_service_terminal_at_once_and_stops_a_return(farebox, house):
    """``clearing lost report`` lists the card at once: fetched, the list stops the card's
    return at a service terminal inside the three hours (the card is not marked, it still
    works), and every terminal blocks it after them (issue 19 item 1)."""
    card = farebox.card(number=CARD, issued="2026-01-15")
    reported = farebox("clearing", "lost", "report", "--db", house.db, "--card", CARD,
                       "--kind", "on-loan", "--at", REPORTED, "--json").json()
    assert reported["blocked_utc"] == "2026-11-22T00:00:00Z" and reported["serial"] == 1
    assert house.fetch().json()["serial"] == 1
    before = card.read_bytes()
    refused = farebox("service", "return", card, "--at", "2026-11-22T06:00:00+08:00",
                      "--state", farebox.state, "--config", house.config, "--json")
    refused.assert_bad_input()
    assert "reported lost" in refused.err and card.read_bytes() == before
    assert tap(farebox, card, "2026-11-22T07:00:00+08:00").json()["outcome"] == "approved"
    assert tap(farebox, card).json()["reason"] == "blocked"  # 09:00: past the three hours


def test_a_dishonoured_aavs_debit_is_paid_at_a_service_terminal_and_released(farebox, house,
                                                                            tmp_path):
    """Issue 19 item 2, end to end through a real receiver: a settled AAVS reload becomes a
    debit; its return suspends the card with the amount owed on the signed list; the service
    terminal collects exactly that amount before it reactivates the card, which keeps the
    suspension's number, so the list it still holds does not suspend it again; uploaded, the
    collection clears the amount at the house, takes the card off the list and is on the
    provider statement as cash the terminal took."""
    made = farebox("terminal", "init", "--state", farebox.state, "--id", "BUS-1",
                   "--json").json()
    farebox("clearing", "enroll", "--db", house.db, "--terminal", "BUS-1", "--pubkey",
            made["public_key"], "--json").json()
    card = farebox.card(number=CARD, balance="1.00", aavs="250")
    reload = tap(farebox, card, "2026-11-22T08:00:00+08:00", house.config).json()
    assert reload["outcome"] == "approved" and reload["balance_after"] == "250.00"
    farebox("batch", "close", "--state", farebox.state, "--json").json()
    farebox("upload", "--state", farebox.state, "--config", house.config, "--json").json()
    db = ["--db", house.db]
    farebox("clearing", "aavs", "link", *db, "--card", CARD, "--institution", "HSBC",
            "--account", "004-1", "--json").json()
    made = farebox("clearing", "aavs", "debits", *db, "--day", "2026-11-22", "--out",
                   tmp_path / "debits", "--json").json()
    [debit] = [line for line in (tmp_path / "debits" / "aavs-debits-2026-11-22-HSBC.txt")
               .read_text().splitlines() if line.startswith("D,")]
    assert made["files"][0]["amount"] == "250.00"
    (tmp_path / "returned.txt").write_text(f"R,{debit.split(',')[1]},insufficient funds\n")
    returned = farebox("clearing", "aavs", "dishonour", *db, tmp_path / "returned.txt", "--at",
                       "2026-11-23T01:00:00Z", "--json").json()
    assert returned["suspended"] == [CARD]
    fetched = house.fetch().json()
    assert fetched["entries"] == 1
    held = json.loads(json.loads((farebox.state / "actions.json").read_text())["list"])
    assert held["entries"] == [{"card": CARD, "reason": "aavs_suspended",
                                "at": "2026-11-23T01:00:00Z", "outstanding_cents": 25_000,
                                "suspension": 1}]

    assert tap(farebox, card, "2026-11-23T10:00:00+08:00", house.config).json()[
        "reason"] == "suspended"
    before = card.read_bytes()
    short = farebox("service", "reactivate", card, "--at", "2026-11-23T10:05:00+08:00",
                    "--paid", "200.00", "--state", farebox.state, "--config", house.config)
    short.assert_bad_input()
    assert "owes 250.00" in short.err and card.read_bytes() == before
    done = farebox("service", "reactivate", card, "--at", "2026-11-23T10:05:00+08:00",
                   "--paid", "250.00", "--state", farebox.state, "--config", house.config,
                   "--json").json()
    assert (done["outstanding_paid"], done["reactivation_fee"]) == ("250.00", "20.00")
    # the list held still names suspension 1: the card was released from it
    assert tap(farebox, card, "2026-11-23T10:10:00+08:00", house.config).json()[
        "outcome"] == "approved"

    farebox("batch", "close", "--state", farebox.state, "--json").json()
    farebox("upload", "--state", farebox.state, "--config", house.config, "--json").json()
    owing = farebox("clearing", "aavs", "list", *db, "--json").json()["outstanding"]
    assert [(o["card"], o["outstanding"], o["paid"], o["suspensions"]) for o in owing] == [
        (CARD, "0.00", "250.00", 1)]
    refetched = house.fetch().json()
    assert refetched["entries"] == 0 and refetched["serial"] == fetched["serial"] + 1
    statement = farebox("clearing", "statement", *db, "--day", "2026-11-23", "--json").json()
    assert statement["total"]["aavs_collected"] == {"count": 1, "amount": "250.00"}
    assert statement["total"]["net"] == "-249.00"  # the 1.00 fare owed to it, 250.00 by it
