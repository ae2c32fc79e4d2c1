"""Issue 17 item 3: an acknowledgement counts only when the clearing house signed it, and the
terminal is told which clearing house that is.

A server that echoes the batch's name (``{terminal_id, incarnation, number, hash}``) as an ack
stores nothing: the batch must stay pending. A real receiver (``farebox clearing serve``) signs
every ack with the key ``farebox clearing key`` prints; a terminal configured with that key
(``clearing_public_key``) takes its acks, one configured with another key refuses them, one
without a key does not upload at all. Plain ``http://`` goes to loopback only unless
``clearing_insecure_http = true``; ``https://`` is tested against a receiver that terminates TLS
itself with a certificate from a private CA made here (``clearing_ca_bundle``)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from farebox.protocol.settlement import public_key_bytes

from .conftest import CONSOLE_SCRIPT
from .test_clearing_http import start_receiver, terminal_with_batches

OTHER_KEY = public_key_bytes(Ed25519PrivateKey.generate()).hex()


class Echo(BaseHTTPRequestHandler):
    """Answers every upload with an ack that names exactly the batch sent, and keeps nothing."""

    calls: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - http.server's name
        upload = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        type(self).calls.append(upload["number"])
        body = json.dumps({"ack": {k: upload[k] for k in ("terminal_id", "incarnation",
                                                           "number", "hash")},
                           "records": 1, "duplicates": 0, "again": False}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Echo.calls = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def config_file(farebox, name="terminal.toml", **keys) -> Path:
    path = farebox.path(name)
    keys = {"allow_test_keys": True, **keys}  # the cards are `card new` cards (test keys)
    lines = ["[terminal]"] + [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def listing(farebox) -> dict:
    return farebox("batch", "list", "--state", farebox.state, "--json").json()


def enrolled(farebox, db, made) -> str:
    """Enroll the terminal at the receiver over ``db``; the receiver's public key."""
    farebox("clearing", "enroll", "--db", db, "--terminal", made["terminal_id"], "--pubkey",
            made["public_key"], "--json").json()
    return farebox("clearing", "key", "--db", db, "--json").json()["public_key"]


# -- a forged acknowledgement ------------------------------------------------------------------


def test_an_echoed_ack_leaves_the_batch_pending(farebox, echo):
    terminal_with_batches(farebox)
    before = listing(farebox)
    config = config_file(farebox, clearing_public_key=OTHER_KEY)
    run = farebox("upload", "--state", farebox.state, "--config", config, "--url", echo,
                  "--attempts", "2", "--json")
    assert run.code != 0, run
    result = json.loads(run.out)
    assert result["acknowledged"] == [] and result["stopped_at"] == 1
    assert "signed" in result["reason"] and "clearing_public_key" in result["reason"]
    assert Echo.calls[0] == 1 and set(Echo.calls) == {1}  # never past the first batch
    assert listing(farebox) == before


def test_an_echoed_ack_is_said_in_one_clear_line(farebox, echo):
    terminal_with_batches(farebox)
    config = config_file(farebox, clearing_public_key=OTHER_KEY)
    run = farebox("upload", "--state", farebox.state, "--config", config, "--url", echo)
    assert run.code == 3 and run.out.count("\n") == 1
    assert run.out == ("uploaded 0 batches; stopped at batch 1: batch 1 not acknowledged: the "
                       "answer names it but the ack is not signed; only an ack signed with "
                       "clearing_public_key counts, so it stays pending\n")
    assert Echo.calls == [1]  # a forged ack is not worth asking again
    assert not any(b["acked"] for b in listing(farebox)["batches"])


# -- the real receiver: the right key, another key, no key ----------------------------------


def test_the_receivers_signed_acks_are_taken_with_its_key(farebox, tmp_path):
    made, _ = terminal_with_batches(farebox)
    db = tmp_path / "clearing.sqlite3"
    with start_receiver(db) as url:
        key = enrolled(farebox, db, made)
        config = config_file(farebox, clearing_url=url, clearing_public_key=key)
        sent = farebox("upload", "--state", farebox.state, "--config", config, "--json").json()
    assert sent == {"acknowledged": [1, 2], "pending": 0, "stopped_at": None, "reason": None}
    assert all(b["acked"] for b in listing(farebox)["batches"])


def test_acks_signed_by_another_key_are_refused_and_the_batch_stays_pending(farebox, tmp_path):
    """The right server, the wrong key configured: what the receiver stored is there, but the
    terminal cannot tell its acks from a forger's, so nothing is marked acknowledged."""
    made, _ = terminal_with_batches(farebox)
    db = tmp_path / "clearing.sqlite3"
    with start_receiver(db) as url:
        enrolled(farebox, db, made)
        config = config_file(farebox, clearing_url=url, clearing_public_key=OTHER_KEY)
        run = farebox("upload", "--state", farebox.state, "--config", config, "--json")
        assert run.code == 3, run
        result = json.loads(run.out)
        assert result["acknowledged"] == [] and result["stopped_at"] == 1
        assert "signature does not verify with the clearing house's key" in result["reason"]
        assert not any(b["acked"] for b in listing(farebox)["batches"])
        # the right key: the same batches again, acknowledged (stored once)
        key = farebox("clearing", "key", "--db", db, "--json").json()["public_key"]
        config = config_file(farebox, clearing_url=url, clearing_public_key=key)
        sent = farebox("upload", "--state", farebox.state, "--config", config, "--json").json()
        assert sent["acknowledged"] == [1, 2]
    report = farebox("clearing", "report", "--db", db, "--json").json()
    assert report["duplicates_ignored"] == 0


def test_no_clearing_public_key_no_upload(farebox, echo):
    terminal_with_batches(farebox)
    before = listing(farebox)
    for argv in ([], ["--config", config_file(farebox, clearing_url=echo)]):
        run = farebox("upload", "--state", farebox.state, "--url", echo, *argv)
        run.assert_bad_input()
        assert "clearing_public_key is not configured" in run.err
    assert Echo.calls == []  # nothing was sent
    assert listing(farebox) == before


# -- the transport: http only to loopback, https with a private CA -----------------------------


@pytest.mark.parametrize("url", ["http://clearing.invalid", "http://192.0.2.10:8080",
                                 "http://[2001:db8::1]:8080/", "http://10.0.0.1",
                                 "http://127.0.0.1.nip.io"])
def test_plain_http_off_loopback_is_refused_unless_configured(farebox, url):
    """Refused before any connection is tried (none is: these tests make no connection off
    this machine; a connection tried would be exit 3 after retries, not exit 2)."""
    terminal_with_batches(farebox)
    before = listing(farebox)
    config = config_file(farebox, clearing_url=url, clearing_public_key=OTHER_KEY)
    for argv in (["--url", url], []):  # given, or clearing_url
        run = farebox("upload", "--state", farebox.state, "--config", config, *argv)
        run.assert_bad_input()
        assert "plain http://" in run.err and "clearing_insecure_http = true" in run.err
    assert listing(farebox) == before
    doctor = farebox("doctor", "--state", farebox.state, "--config", config, "--json")
    clearing = next(c for c in json.loads(doctor.out)["checks"] if c["check"] == "clearing")
    assert clearing["status"] == "fail" and "plain http://" in clearing["found"]
    # said to be meant, the same setup passes the check (doctor connects nowhere)
    config = config_file(farebox, clearing_url=url, clearing_public_key=OTHER_KEY,
                         clearing_insecure_http=True)
    doctor = farebox("doctor", "--state", farebox.state, "--config", config, "--json")
    clearing = next(c for c in json.loads(doctor.out)["checks"] if c["check"] == "clearing")
    assert clearing["status"] == "ok"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "[::1]", "localhost", "LOCALHOST"])
def test_plain_http_to_loopback_needs_no_setting(farebox, echo, host):
    terminal_with_batches(farebox)
    url = echo.replace("127.0.0.1", host)
    if host == "[::1]" or host.startswith("127.8"):  # nothing listens there: it is tried
        run = farebox("upload", "--state", farebox.state, "--url", url, "--attempts", "1",
                      "--config", config_file(farebox, clearing_public_key=OTHER_KEY),
                      "--json")
        assert run.code == 3 and "ConnectError" in json.loads(run.out)["reason"], run
        return
    run = farebox("upload", "--state", farebox.state, "--url", url, "--attempts", "1",
                  "--config", config_file(farebox, clearing_public_key=OTHER_KEY), "--json")
    assert run.code == 3 and "not signed" in json.loads(run.out)["reason"], run
    assert Echo.calls == [1]


@pytest.mark.parametrize("setting", [{"clearing_insecure_http": "yes"},
                                     {"clearing_ca_bundle": ""}, {"clearing_ca_bundle": 5}])
def test_the_transport_settings_are_checked(farebox, setting):
    config = config_file(farebox, **setting)
    run = farebox("upload", "--state", farebox.state, "--config", config, "--url",
                  "http://127.0.0.1:9")
    run.assert_bad_input()
    assert f"terminal.{next(iter(setting))}" in run.err


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def private_ca(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost, as PEM files."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("farebox test CA"))
          .issuer_name(_name("farebox test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder().subject_name(_name("127.0.0.1"))
              .issuer_name(ca.subject).public_key(key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([
                  x509.IPAddress(ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                  critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.pem", "cert": directory / "server.pem",
             "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    files["key"].chmod(0o600)
    return files


@pytest.fixture
def pki(tmp_path):
    return private_ca(tmp_path)


def test_https_with_a_private_ca_bundle_uploads_and_without_it_fails_verification(
        farebox, tmp_path, pki):
    made, _ = terminal_with_batches(farebox)
    db = tmp_path / "clearing.sqlite3"
    with start_receiver(db, tls=(pki["cert"], pki["key"])) as url:
        assert url.startswith("https://127.0.0.1:")
        key = enrolled(farebox, db, made)
        # the system's CAs do not know the private CA: the certificate does not verify
        config = config_file(farebox, clearing_url=url, clearing_public_key=key)
        run = farebox("upload", "--state", farebox.state, "--config", config, "--attempts", "1",
                      "--json")
        assert run.code == 3, run
        assert "CERTIFICATE_VERIFY_FAILED" in json.loads(run.out)["reason"]
        assert not any(b["acked"] for b in listing(farebox)["batches"])
        # the same over localhost (the certificate names it too), trusting the private CA
        config = config_file(farebox, clearing_url=url.replace("127.0.0.1", "localhost"),
                             clearing_public_key=key, clearing_ca_bundle=str(pki["ca"]))
        sent = farebox("upload", "--state", farebox.state, "--config", config, "--json").json()
        assert sent["acknowledged"] == [1, 2] and sent["pending"] == 0
        # the action list comes over the same https with the same CA bundle
        fetched = farebox("actions", "fetch", "--state", farebox.state, "--config", config,
                          "--json").json()
        assert fetched["serial"] == 0
    stored = farebox("clearing", "report", "--db", db, "--json").json()["terminals"][0]
    assert stored["records"] == sum(b["records"] for b in listing(farebox)["batches"]) == 4


def test_a_ca_bundle_that_is_not_one_is_bad_input(farebox, tmp_path, pki):
    terminal_with_batches(farebox)
    for bundle in (tmp_path / "missing.pem", pki["key"]):  # none there; a key, no certificate
        config = config_file(farebox, clearing_public_key=OTHER_KEY,
                             clearing_ca_bundle=str(bundle))
        run = farebox("upload", "--state", farebox.state, "--config", config, "--url",
                      "https://127.0.0.1:9")
        run.assert_bad_input()
        assert f"clearing_ca_bundle {bundle}" in run.err


def test_clearing_serve_tls_options_go_together_and_must_be_usable(farebox, tmp_path, pki):
    db = tmp_path / "clearing.sqlite3"
    farebox("clearing", "serve", "--db", db, "--port", "0", "--tls-cert", pki["cert"]
            ).assert_bad_input()
    run = farebox.script("clearing", "serve", "--db", db, "--port", "0", "--tls-cert",
                         pki["ca"], "--tls-key", pki["key"])  # the key is not the CA's
    run.assert_bad_input()
    assert "cannot serve TLS" in run.err


# -- the daemon: the same check, logged and reported, never a crash ---------------------------


class Daemon:
    """``farebox run --log-format json`` on a UDP port no card is on; its events as they come."""

    def __init__(self, farebox, config: Path) -> None:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            idle_port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "run", "--reader", f"udp:127.0.0.1:{idle_port}", "--fare",
             "1.00", "--state", str(farebox.state), "--config", str(config), "--log-format",
             "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read_until(self, predicate, give_up_s: float = 60) -> dict:
        """The first event ``predicate`` takes; fails (never hangs) when none comes."""
        while True:
            try:
                line = self._lines.get(timeout=give_up_s)
            except queue.Empty:
                raise AssertionError(f"no such event; the events: {self.events}") from None
            if line is None:
                raise AssertionError(f"the daemon ended first: {self.events}")
            self.events.append(json.loads(line))
            if predicate(self.events[-1]):
                return self.events[-1]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)
        assert self.process.returncode == 0, self.process.stderr.read()  # it did not crash
        while (line := self._lines.get(timeout=10)) is not None:
            self.events.append(json.loads(line))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def test_the_daemon_without_a_key_uploads_nothing_says_why_and_doctor_fails(farebox, echo):
    terminal_with_batches(farebox)
    config = config_file(farebox, clearing_url=echo, upload_interval_s=1)
    daemon = Daemon(farebox, config)
    try:
        # the reader answers from inside the loop, after SIGTERM is the loop's to handle
        daemon.read_until(lambda e: e["event"] == "reader_up")
        daemon.stop()
    finally:
        daemon.kill()
    said = [e["message"] for e in daemon.events if e["event"] == "log"]
    assert any("batches are not uploaded" in m and "clearing_public_key is not configured" in m
               for m in said), said
    assert Echo.calls == []
    assert not any(b["acked"] for b in listing(farebox)["batches"])
    doctor = farebox("doctor", "--state", farebox.state, "--config", config, "--json")
    checks = {c["check"]: c for c in json.loads(doctor.out)["checks"]}
    assert checks["clearing"]["status"] == "fail" and doctor.code == 3
    assert "clearing_public_key is not configured" in checks["clearing"]["found"]
    assert "farebox clearing key" in checks["clearing"]["fix"]
    config = config_file(farebox, clearing_url=echo, clearing_public_key=OTHER_KEY)
    doctor = farebox("doctor", "--state", farebox.state, "--config", config, "--json")
    checks = {c["check"]: c for c in json.loads(doctor.out)["checks"]}
    assert checks["clearing"]["status"] == "ok"


def test_the_daemon_keeps_an_echoed_batch_pending_and_logs_it(farebox, echo):
    terminal_with_batches(farebox)
    config = config_file(farebox, clearing_url=echo, clearing_public_key=OTHER_KEY,
                         upload_interval_s=1)
    daemon = Daemon(farebox, config)
    try:
        def warned(event):
            return event["event"] == "log" and event["level"] == "warning" \
                and "upload stopped" in event["message"]

        daemon.read_until(lambda e: e["event"] == "reader_up")  # SIGTERM is the loop's now
        stopped = next((e for e in daemon.events if warned(e)), None) \
            or daemon.read_until(warned)
        daemon.stop()
    finally:
        daemon.kill()
    assert "batch 1 not acknowledged" in stopped["message"]
    assert "clearing_public_key" in stopped["message"]
    assert set(Echo.calls) == {1}
    assert not any(b["acked"] for b in listing(farebox)["batches"])
