"""The receiver's resources under hostile clients, for real: ``farebox clearing serve`` as a
process on loopback, raw sockets that send unfinished bodies or no request at all, the server's
memory read from /proc, and a terminal's real batch uploaded meanwhile. Also ``--workers``."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from farebox.protocol.session import LiteSSession
from farebox.protocol.settlement import verify_ack
from farebox.protocol.sim.card import SimulatedLiteS
from farebox.protocol.sim.inprocess import InProcessTransport
from farebox.terminal.card.issue import IssueRequest, issue, new_idm
from farebox.terminal.card.keys import published_test_keys
from farebox.terminal.card.tap import Terminal
from farebox.terminal.core.rules import Tariff
from farebox.terminal.link.upload import upload_payload
from farebox.terminal.store.identity import init_identity
from farebox.terminal.store.journal import Journal
from farebox.terminal.store.settlement import Settlement

CONSOLE_SCRIPT = Path(sys.executable).parent / "farebox"
MIB = 1024 * 1024
NOW = datetime(2026, 11, 22, 16, 0, tzinfo=timezone.utc)
AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone(timedelta(hours=8)))
RSS_LIMIT = 250 * 1000 * 1000
HOSTILE_BODIES = 60
SLOW_CONNECTIONS = 1000
WAIT_S = 120  # a bound for things that must happen, never a timed assertion


def batches(folder: Path, count: int) -> tuple[str, list[dict]]:
    """A terminal (its public key in hex) and ``count`` real uploads of its batches."""
    identity = init_identity(folder / "t", "T-0001", NOW)
    idm = new_idm()
    _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=12345678,
                                      balance_cents=50_000), published_test_keys(), idm)
    card = SimulatedLiteS(idm, blocks=blocks)
    uploads = []
    with Journal(folder / "t" / "journal.sqlite3", terminal_id="T-0001") as journal:
        terminal = Terminal(journal, published_test_keys())
        settlement = Settlement(journal, identity)
        for number in range(count):
            for minute in range(3):
                paid = terminal.pay(LiteSSession(InProcessTransport(card)), Tariff.flat(580),
                                    AT + timedelta(minutes=10 * number + minute))
                assert paid.approved
            uploads.append(upload_payload(settlement, settlement.close_batch(NOW)))
    return identity.public_key.hex(), uploads


@contextlib.contextmanager
def receiver(db: Path | str, *options: str):
    """``farebox clearing serve --db DB --port 0 OPTIONS``; yields the process and its URL.
    Stopped with SIGTERM at the end."""
    process = subprocess.Popen([str(CONSOLE_SCRIPT), "clearing", "serve", "--db", str(db),
                                "--port", "0", *options], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line, process.communicate(timeout=WAIT_S)
        yield process, json.loads(line)["url"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def farebox(*argv: object) -> dict:
    done = subprocess.run([str(CONSOLE_SCRIPT), *map(str, argv), "--json"], capture_output=True,
                          text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def enrolled(db: Path | str, public_key: str) -> tuple[Path | str, bytes]:
    """``db`` with the terminal enrolled; the receiver's public key (its acks are signed)."""
    farebox("clearing", "enroll", "--db", db, "--terminal", "T-0001", "--pubkey", public_key)
    return db, bytes.fromhex(farebox("clearing", "key", "--db", db)["public_key"])


def status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def open_files_for(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.fail(f"this test needs {count} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].rsplit(":", 1)
    return host, int(port)


def upload(url: str, payload: dict, receiver_key: bytes) -> dict:
    answer = httpx.post(f"{url}/v1/batches", json=payload, timeout=WAIT_S)
    assert answer.status_code == 200, (answer.status_code, answer.text)
    ack = verify_ack(answer.json(), receiver_key)
    assert (ack.terminal_id, ack.number, ack.hash) == (payload["terminal_id"],
                                                       payload["number"], payload["hash"])
    return answer.json()


def hostile_body(where: tuple[str, int], body: bytes, held: list, done: list) -> None:
    """Headers declaring 16 MiB, then ``body`` (less), then nothing: the socket is kept."""
    sock = socket.create_connection(where, timeout=WAIT_S)
    held.append(sock)
    try:
        sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n" % (16 * MIB))
        sock.sendall(body)
        done.append("sent")
    except OSError:
        done.append("refused")  # answered 503 and closed before all of it was read


def test_unfinished_bodies_and_slow_connections_keep_the_receiver_small_and_serving(tmp_path):
    open_files_for(HOSTILE_BODIES + SLOW_CONNECTIONS + 512)
    public_key, uploads = batches(tmp_path, 2)
    db, receiver_key = enrolled(tmp_path / "clearing.sqlite3", public_key)
    held: list[socket.socket] = []
    with receiver(db) as (process, url):  # the default limits
        where = address(url)
        upload(url, uploads[0], receiver_key)
        body = b"[" + b"1," * (15 * MIB // 2 - 1)
        done: list[str] = []
        threads = [threading.Thread(target=hostile_body, args=(where, body, held, done))
                   for _ in range(HOSTILE_BODIES)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_S)
            assert len(done) == HOSTILE_BODIES
            assert 0 < done.count("sent") < HOSTILE_BODIES, done  # some held, most refused
            for _ in range(SLOW_CONNECTIONS):  # a request begun, its headers never finished
                sock = socket.create_connection(where, timeout=WAIT_S)
                held.append(sock)
                sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\n")
            # meanwhile a terminal's next batch goes through
            answer = upload(url, uploads[1], receiver_key)
            assert answer["records"] == 3 and not answer["again"]
            assert status(process.pid, "VmHWM") <= RSS_LIMIT, status(process.pid, "VmHWM")
            assert status(process.pid, "VmRSS") <= RSS_LIMIT
        finally:
            for sock in held:
                sock.close()


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed(tmp_path):
    db = tmp_path / "clearing.sqlite3"
    with receiver(db, "--body-timeout", "0.5") as (process, url):
        with socket.create_connection(address(url), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                         b'{"terminal_id": ')
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in answer.lower() and b"did not arrive" in answer


def test_a_connection_without_a_whole_request_is_closed_and_an_idle_one_too(tmp_path):
    db = tmp_path / "clearing.sqlite3"
    with receiver(db, "--header-timeout", "0.5", "--keep-alive-timeout", "0.5") as (_, url):
        with socket.create_connection(address(url), timeout=WAIT_S) as silent, \
                socket.create_connection(address(url), timeout=WAIT_S) as trickling:
            trickling.sendall(b"GET /v1/health HTTP/1.1\r\nHo")
            assert read_until_closed(silent).startswith(b"HTTP/1.1 408 ")
            assert read_until_closed(trickling).startswith(b"HTTP/1.1 408 ")
        with socket.create_connection(address(url), timeout=WAIT_S) as idle:
            idle.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_until_closed(idle)  # answered, then closed once idle
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"ok":true}')


def test_past_the_uploads_at_once_a_request_is_503_with_retry_after_before_its_body(tmp_path):
    db = tmp_path / "clearing.sqlite3"
    with receiver(db, "--max-uploads", "1") as (_, url):
        with socket.create_connection(address(url), timeout=WAIT_S) as first:
            first.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                          b"{")
            # the first is admitted (its body awaited): the next is turned away at once
            for _ in range(WAIT_S * 10):
                answer = httpx.post(f"{url}/v1/batches", content=b"{}", timeout=WAIT_S)
                if answer.status_code == 503:
                    break
                time.sleep(0.1)  # the first's headers not yet read by the server
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "1"
            assert answer.headers["connection"] == "close"
        # the first gone, uploads are taken again (this one is no JSON object: 400)
        for _ in range(WAIT_S * 10):
            answer = httpx.post(f"{url}/v1/batches", content=b"[", timeout=WAIT_S)
            if answer.status_code != 503:
                break
            time.sleep(0.1)
        assert answer.status_code == 400


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def workers_of(pid: int) -> set[int]:
    """The worker processes ``pid`` spawned (multiprocessing's, by their command line)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if (int(stat.rsplit(")", 1)[1].split()[1]) == pid
                        and b"spawn_main" in (entry / "cmdline").read_bytes()):
                    found.add(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A clearing database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "clearing.sqlite3"
    return request.getfixturevalue("pg_url")


def test_two_workers_serve_uploads_and_stop_on_sigterm(tmp_path, database):
    public_key, uploads = batches(tmp_path, 4)
    db, receiver_key = enrolled(database, public_key)
    with receiver(db, "--workers", "2") as (process, url):
        workers = workers_of(process.pid)
        assert len(workers) == 2
        for payload in uploads:
            assert upload(url, payload, receiver_key)["records"] == 3
        again = upload(url, uploads[1], receiver_key)
        assert again["again"] and again["duplicates"] == 0
        with httpx.Client(timeout=WAIT_S) as client:  # new connections: either worker answers
            assert all(client.get(f"{url}/v1/health", headers={"Connection": "close"}
                                  ).json() == {"ok": True} for _ in range(10))
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=WAIT_S)
        assert process.returncode == 0, err
        assert "Traceback" not in err
    assert not [pid for pid in workers if running(pid)]
    with receiver(db) as (_, url):  # every batch was stored, once, by whichever worker
        for payload in uploads:
            answer = upload(url, payload, receiver_key)
            assert answer["again"] and answer["duplicates"] == 0
