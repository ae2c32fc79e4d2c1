"""End to end through a real pcscd with vsmartcard's vpcd driver, from the shell, exactly as the
README does it: ``farebox sim pcscd`` runs a pcscd of our own (foreground, its own config dir
holding only the vpcd entry, its own socket, a free port), ``farebox sim serve --via vpcd:...``
presents a card file to it, ``farebox run --reader pcsc`` is the terminal daemon.

In CI or as root these tests must run; elsewhere they skip with the reason (pcscd needs root to
write /run/pcscd).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from farebox.protocol.sim.vpcd_card import find_pcscd, find_vpcd_driver

from .conftest import CONSOLE_SCRIPT

FAREBOX = str(CONSOLE_SCRIPT)
INSTALL = "apt-get install pcscd vsmartcard-vpcd libpcsclite-dev"


def _cannot_run(reason: str) -> None:
    message = f"pcscd + vpcd end-to-end tests NOT RUN: {reason}"
    if os.geteuid() == 0 or os.environ.get("CI"):
        pytest.fail(f"{message}; as root or in CI they must run ({INSTALL})")
    pytest.skip(message)


class Pcscd:
    """``farebox sim pcscd --dir DIR [--port P]`` in the background."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        argv = [FAREBOX, "sim", "pcscd", "--dir", str(directory)]
        if port is not None:
            argv += ["--port", str(port)]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()
        if not line:
            _, err = self.process.communicate(timeout=10)
            _cannot_run(f"farebox sim pcscd did not start: {err.strip()}")
        self.info = json.loads(line)
        self.env = {**os.environ, "PCSCLITE_CSOCK_NAME": self.info["socket"]}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.communicate()
        return self.process.returncode


@pytest.fixture
def pcscd():
    if find_pcscd() is None or find_vpcd_driver() is None:
        _cannot_run(f"pcscd or vpcd is not installed ({INSTALL})")
    pytest.importorskip("smartcard", reason="pyscard is not installed")
    # a short directory: the socket path must fit a sockaddr_un
    directory = Path(tempfile.mkdtemp(prefix="fb-pcscd-"))
    daemons: list[Pcscd] = []

    def start(port: int | None = None) -> Pcscd:
        daemons.append(Pcscd(directory, port))
        return daemons[-1]

    yield start
    for daemon in daemons:
        daemon.stop()
    subprocess.run(["rm", "-rf", str(directory)], check=False)


class Served:
    def __init__(self, card: Path, port: int, env: dict, *options: object) -> None:
        self.process = subprocess.Popen(
            [FAREBOX, "sim", "serve", str(card), "--via", f"vpcd:127.0.0.1:{port}",
             *map(str, options)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)

    def finish(self, timeout: float = 30) -> list[dict]:
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def next_event(process: subprocess.Popen, timeout: float = 20) -> dict:
    """The daemon's next JSON line; fails (instead of hanging) when none comes in time."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"no tap reported within {timeout} s; daemon stderr: {err[-2000:]}")
    return json.loads(process.stdout.readline())


def run_daemon(env: dict, state: Path, *options: object, timeout: float = 60):
    done = subprocess.run([FAREBOX, "run", "--reader", "pcsc", "--state", str(state), "--json",
                           *map(str, options)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    return done, [json.loads(line) for line in done.stdout.splitlines()]


def test_three_taps_over_pcscd_and_vpcd(farebox, pcscd):
    daemon = pcscd()
    card = farebox.card(balance="10.00")
    server = Served(card, daemon.info["port"], daemon.env, "--taps", 3)
    try:
        done, events = run_daemon(daemon.env, farebox.state, "--fare", "1.50", "--max-taps", 3)
        assert done.returncode == 0, done.stderr
        presentations = server.finish()
    finally:
        server.kill()
    assert [e["balance_after"] for e in events] == ["8.50", "7.00", "5.50"]
    assert all(e["outcome"] == "approved" and e["card_commands"] == 6 for e in events)
    assert all(e["reader"] == daemon.info["reader"] and e["tap_ms"] > 0 for e in events)
    assert [p["number"] for p in presentations] == [1, 2, 3]
    assert all(p["commands"] == 6 for p in presentations)
    shown = farebox.show(card)  # the card file is what the card said
    assert shown["balance"] == "5.50" and shown["counter"] == 4
    assert events[0]["idm"] == shown["idm"]
    assert [h["amount"] for h in shown["history"][:3]] == ["1.50", "1.50", "1.50"]


@pytest.mark.parametrize("fault", [("--leave-after", 3), ("--leave-after", 5),
                                   ("--torn-write", 2), ("--torn-write", 3)])
def test_a_card_pulled_away_mid_tap_never_costs_unrecorded_value(farebox, pcscd, fault):
    daemon = pcscd()
    card = farebox.card(balance="10.00")
    server = Served(card, daemon.info["port"], daemon.env, "--taps", 2, *fault)
    try:
        done, events = run_daemon(daemon.env, farebox.state, "--fare", "1.00", "--max-taps", 2)
        assert done.returncode == 0, done.stderr
        server.finish()
    finally:
        server.kill()
    shown = farebox.show(card)
    listing = farebox("journal", "list", "--state", farebox.state, "--json").json()
    assert listing["in_doubt"] == 0
    paid = sum(float(r["amount"]) for r in listing["records"] if r["write_state"] == "committed")
    assert float(shown["balance"]) == pytest.approx(10.00 - paid)
    assert events[-1]["outcome"] == "approved"
    assert events[-1]["balance_after"] == shown["balance"]
    assert paid in (1.0, 2.0)


def test_the_daemon_survives_pcscd_going_away_and_coming_back(farebox, pcscd):
    first = pcscd()
    port = first.info["port"]
    card = farebox.card(balance="10.00")
    run = subprocess.Popen([FAREBOX, "run", "--reader", "pcsc", "--fare", "1.00", "--state",
                            str(farebox.state), "--json", "--max-taps", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=first.env)
    try:
        Served(card, port, first.env, "--taps", 1).finish()
        first_tap = next_event(run)
        assert first_tap["balance_after"] == "9.00"
        first.stop()  # the reader (all of pcscd) vanishes
        time.sleep(1.0)
        assert run.poll() is None, run.stderr.read()
        second = pcscd(port)  # and comes back on the same socket and port
        Served(card, port, second.env, "--taps", 1).finish()
        second_tap = next_event(run)
        assert second_tap["outcome"] == "approved" and second_tap["balance_after"] == "8.00"
        run.wait(10)
        assert run.returncode == 0
        said = run.stderr.read().splitlines()
        # the outage is said when it starts (again only if its cause changes) and when it ends,
        # not once per retry
        assert any("pcscd" in line for line in said) and "works again" in said[-1]
        assert len(said) <= 4, said
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert farebox.show(card)["balance"] == "8.00"


def test_sigterm_stops_the_daemon_on_pcsc_and_pcscd_itself(farebox, pcscd):
    daemon = pcscd()
    run = subprocess.Popen([FAREBOX, "run", "--reader", "pcsc", "--fare", "1.00", "--state",
                            str(farebox.state), "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=daemon.env)
    try:
        time.sleep(1.5)
        assert run.poll() is None
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        run.wait(5)
        assert time.monotonic() - started < 2.0
        assert run.returncode == 0, run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5.0
    assert not Path(daemon.info["socket"]).exists()


def test_sim_serve_without_a_vpcd_listening_is_one_line(farebox):
    card = farebox.card(balance="10.00")
    # nothing listens on the discard port; the connect is retried for 10 s, then exit 2
    done = subprocess.run([FAREBOX, "sim", "serve", str(card), "--via", "vpcd:127.0.0.1:9",
                           "--taps", "1"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    # the status line '{"serving": ...}' comes first (vpcd is dialled per presentation), then
    # exactly one error line
    errors = [line for line in done.stderr.splitlines() if not line.startswith('{"serving"')]
    assert len(errors) == 1 and errors[0].startswith("farebox: error:") and "vpcd" in errors[0]
    assert "Traceback" not in done.stderr
