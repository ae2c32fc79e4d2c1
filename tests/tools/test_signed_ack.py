"""Issue 17 item 3: an acknowledgement counts only when the clearing house signed it.

A server that echoes the batch's name (``{terminal_id, incarnation, number, hash}``) as an ack
stores nothing; the terminal must keep the batch pending."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.protocol.settlement import public_key_bytes

from .test_clearing_http import terminal_with_batches

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


def config_file(farebox, name="terminal.toml", **keys) -> object:
    path = farebox.path(name)
    lines = ["[terminal]"] + [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_echoed_ack_leaves_the_batch_pending(farebox, echo):
    terminal_with_batches(farebox)
    before = farebox("batch", "list", "--state", farebox.state, "--json").json()
    config = config_file(farebox, clearing_public_key=OTHER_KEY)
    run = farebox("upload", "--state", farebox.state, "--config", config, "--url", echo,
                  "--attempts", "2", "--json")
    assert run.code != 0, run
    result = json.loads(run.out)
    assert result["acknowledged"] == [] and result["stopped_at"] == 1
    assert "signed" in result["reason"] and "clearing_public_key" in result["reason"]
    assert Echo.calls[0] == 1 and set(Echo.calls) == {1}  # never past the first batch
    assert farebox("batch", "list", "--state", farebox.state, "--json").json() == before
