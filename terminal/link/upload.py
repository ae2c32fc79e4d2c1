"""Uploading settlement batches to the clearing house (httpx).

Batches go in order, oldest first, each as ``POST URL/v1/batches`` with ``{terminal_id,
incarnation, number, body, hash, signature}`` (an :class:`Upload` of the settlement wire
format, whose :class:`Ack` is the answer). Idempotent: the same batch sent twice is the same
(terminal, incarnation, number, hash), which the receiver acknowledges again without storing
anything twice. A batch is marked acknowledged only by a 200 answer whose ``ack`` names exactly
that terminal, incarnation, number and hash and is signed by the clearing house's key (a
``SignedAck`` of the settlement wire format, verified with the terminal's
``clearing_public_key``); nothing else the server says changes anything here. An answer that
names the batch but is not so signed (an echo, a forgery, another clearing house) stops the
upload there: the batch stays pending.

Where batches go is a :class:`ClearingHouse`, made only by :func:`clearing_house`, which refuses
(:class:`UploadSetupError`, before anything is sent) to go without the clearing house's public
key, and plain ``http://`` to a host that is not loopback unless told it is meant
(``clearing_insecure_http``). ``https://`` verifies the server's certificate against httpx's
default CAs (certifi's bundle; ``SSL_CERT_FILE`` overrides it) or, given ``ca_bundle``, against
those certificates only (a private CA).

Timeouts, connection errors, 5xx, 408 (the receiver timed a slow body out) and 429, and unreadable
answers are retried with exponential backoff and full jitter; any other 4xx is the server refusing
that batch and stops the upload (later batches would not link). Answers are read up to :data:`MAX_ANSWER_BYTES`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from farebox.protocol.settlement import Ack, Upload, WireError, verify_ack

from farebox.terminal import failpoints
from farebox.terminal.errors import BadInput, TerminalError
from farebox.terminal.store.settlement import Batch, Settlement

if TYPE_CHECKING:  # httpx is imported when an upload runs, not by every command
    import httpx

LOG = logging.getLogger("farebox.terminal.link.upload")

MAX_ANSWER_BYTES = 64 * 1024
DEFAULT_ATTEMPTS = 5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
TIMEOUT_S = 10.0


#: 4xx answers that are no refusal of the batch: a body timed out on a slow link (408), too many
#: requests (429). Sent again like a 5xx.
RETRIED_4XX = frozenset({408, 429})

class UploadSetupError(BadInput, ValueError):
    """Batches cannot be uploaded as configured (no clearing house key, plain HTTP to a host
    that is not loopback, a CA bundle that cannot be read); one line naming the setting."""


class UploadRefused(TerminalError):
    """The server refused a batch (4xx), or answered with an ack the clearing house did not
    sign: retrying it will not help."""


class UploadFailed(TerminalError):
    """No usable answer after every attempt."""


@dataclass
class UploadResult:
    acknowledged: list[int] = field(default_factory=list)
    pending: int = 0  # batches still not acknowledged
    stopped_at: int | None = None
    reason: str | None = None

    @property
    def complete(self) -> bool:
        return self.stopped_at is None


@dataclass(frozen=True)
class ClearingHouse:
    """Where batches go and whose acks count: the URL, the clearing house's Ed25519 public key
    (raw 32 bytes) and what https:// verifies the server with (httpx's ``verify``). Made by
    :func:`clearing_house`, which checks them."""

    url: str
    public_key: bytes
    verify: ssl.SSLContext | bool = True


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine without asking DNS: ``localhost``, 127.0.0.0/8,
    ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def clearing_house(url: str, public_key: bytes | None, *, ca_bundle: Path | None = None,
                   insecure_http: bool = False) -> ClearingHouse:
    """The clearing house at ``url`` whose acks must verify with ``public_key``;
    UploadSetupError (nothing sent) when there is no key, when ``url`` is plain http:// to a
    host that is not loopback and ``insecure_http`` is not set, or when ``ca_bundle`` (PEM CA
    certificates that https:// then trusts, instead of the default ones) cannot be used."""
    if public_key is None:
        raise UploadSetupError(
            "clearing_public_key is not configured: the clearing house's acknowledgements "
            "cannot be verified without it, so no batch is uploaded (`farebox clearing key` "
            "prints it)")
    if len(public_key) != 32:
        raise UploadSetupError("clearing_public_key: expected 64 hex digits (an Ed25519 "
                               "public key)")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise UploadSetupError(f"clearing house {url[:80]!r}: expected http://HOST... or "
                               "https://HOST...")
    if parts.scheme == "http" and not insecure_http and not is_loopback(host):
        raise UploadSetupError(
            f"clearing house {url[:80]}: plain http:// to {host}, not a loopback address, "
            "is refused (batches would cross the network unprotected): use https://, or set "
            "clearing_insecure_http = true")
    return ClearingHouse(url, public_key, tls_verify(ca_bundle))


def tls_verify(ca_bundle: Path | None) -> ssl.SSLContext | bool:
    """What https:// to the clearing house verifies its server with (httpx's ``verify``): the
    default CAs, or only the PEM CA certificates in ``ca_bundle``; UploadSetupError naming
    ``clearing_ca_bundle`` when that file cannot be used."""
    if ca_bundle is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_bundle))
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) \
            or type(error).__name__
        raise UploadSetupError(f"clearing_ca_bundle {ca_bundle}: not usable as PEM CA "
                               f"certificates ({reason})") from None


def batches_url(url: str) -> str:
    return url.rstrip("/") + "/v1/batches"


def upload_of(settlement: Settlement, batch: Batch) -> Upload:
    return Upload.of(settlement.identity.terminal_id, settlement.identity.incarnation,
                     batch.number, batch.signed)


def upload_payload(settlement: Settlement, batch: Batch) -> dict:
    """The JSON sent for ``batch``."""
    return upload_of(settlement, batch).to_json()


def http_client(house: ClearingHouse, timeout_s: float = TIMEOUT_S) -> httpx.Client:
    """An httpx client for ``house``: no redirects, its certificate check."""
    import httpx

    return httpx.Client(timeout=timeout_s, follow_redirects=False, verify=house.verify)


def upload(settlement: Settlement, house: ClearingHouse, now: Callable[[], datetime], *,
           client: httpx.Client | None = None, attempts: int = DEFAULT_ATTEMPTS,
           on_batch: Callable[[Batch, bool], None] = lambda batch, acked: None,
           sleep: Callable[[float], None] = time.sleep,
           should_stop: Callable[[], bool] = lambda: False) -> UploadResult:
    """Send every unacknowledged batch in order until one cannot be; see the module doc."""
    if not isinstance(house, ClearingHouse):  # the checks of clearing_house() are not skipped
        raise TypeError("upload() needs a ClearingHouse (see clearing_house())")
    result = UploadResult()
    pending = settlement.unacknowledged()
    own_client = client is None
    client = client or http_client(house)
    try:
        for index, batch in enumerate(pending):
            if should_stop():
                result.stopped_at, result.reason = batch.number, "stopped"
                break
            failpoints.hit("upload-before-send")
            try:
                _send(client, batches_url(house.url), upload_of(settlement, batch),
                      house.public_key, attempts, sleep, should_stop)
            except (UploadRefused, UploadFailed) as error:
                result.stopped_at, result.reason = batch.number, str(error)
                LOG.info("upload stopped at batch %d: %s", batch.number, error)
                on_batch(batch, False)
                break
            failpoints.hit("upload-after-ack")
            if settlement.acknowledge(batch.number, batch.hash, now()):
                result.acknowledged.append(batch.number)
            on_batch(batch, True)
    finally:
        if own_client:
            client.close()
    result.pending = len(settlement.unacknowledged())
    return result


def _send(client: httpx.Client, url: str, sent: Upload, public_key: bytes, attempts: int,
          sleep: Callable[[float], None], should_stop: Callable[[], bool]) -> None:
    """POST one batch until it is acknowledged by an ack signed with ``public_key``;
    UploadRefused on 4xx and on an ack that names the batch but is not so signed, UploadFailed
    when the attempts run out."""
    import httpx

    payload = sent.to_json()
    problem = "no attempt made"
    for attempt in range(attempts):
        if attempt:
            delay = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** attempt))
            LOG.info("batch %d: %s; trying again in %.1f s", sent.number, problem, delay)
            sleep(delay)
            if should_stop():
                break
        try:
            status, answer = _post(client, url, payload)
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            continue
        if 400 <= status < 500 and status not in RETRIED_4XX:
            raise UploadRefused(f"the server refused batch {sent.number} ({status}: "
                                f"{_error_text(answer)})")
        if status != 200:
            problem = f"HTTP {status}"
            continue
        try:
            names_it = Ack.from_json(answer).batch == sent.name
        except WireError:
            names_it = False
        if not names_it:
            problem = "an answer that does not acknowledge this batch"
            continue
        try:
            verify_ack(answer, public_key)
        except WireError as forged:
            raise UploadRefused(f"batch {sent.number} not acknowledged: the answer names it but "
                                f"{forged}; only an ack signed with clearing_public_key counts, "
                                "so it stays pending") from None
        return
    raise UploadFailed(f"batch {sent.number}: {problem} (after {attempts} attempts)")


def _post(client: httpx.Client, url: str, payload: dict) -> tuple[int, object]:
    """Status and the JSON answer (None when it is not JSON or too long)."""
    with client.stream("POST", url, json=payload) as response:
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                return response.status_code, None
        try:
            return response.status_code, json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return response.status_code, None


def _error_text(answer: object) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return " ".join(answer["error"].split())[:200]
    return "no reason given"


class BackgroundUploader:
    """The daemon's uploads: a thread with its own journal connection that uploads whenever
    :meth:`wake` is called (a batch closed) and at least every ``interval_s``. :meth:`stop`
    returns within ``join_s``; an upload still in flight then is abandoned (it is idempotent:
    the next run sends that batch again)."""

    def __init__(self, open_settlement: Callable[[], Settlement], house: ClearingHouse,
                 now: Callable[[], datetime], interval_s: float = 60.0,
                 also: Callable[[], None] | None = None,
                 on_synced: Callable[[], None] = lambda: None) -> None:
        """``also``: more work each round (fetching the action list); what it raises is
        logged. ``on_synced``: called (on this thread) after each round that leaves no batch
        unacknowledged, whether it sent some or found none to send."""
        self._open = open_settlement
        self._also = also
        self._on_synced = on_synced
        self.house = house
        self.now = now
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farebox-upload", daemon=True)
        self.uploads = 0

    def start(self) -> BackgroundUploader:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, join_s: float = 1.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(join_s)

    def _run(self) -> None:
        try:
            settlement = self._open()
        except Exception as error:  # noqa: BLE001 - a thread must say why it ends
            LOG.warning("uploads stopped: %s", error)
            return
        try:
            while not self._stopping.is_set():
                self._wake.wait(self.interval_s)
                self._wake.clear()
                if self._stopping.is_set():
                    break
                self._upload_once(settlement)
                if self._also is not None and not self._stopping.is_set():
                    try:
                        self._also()
                    except Exception as error:  # noqa: BLE001 - a round fails, not the thread
                        LOG.warning("%s", error)
        finally:
            settlement.journal.close()

    def _upload_once(self, settlement: Settlement) -> None:
        try:
            if not settlement.unacknowledged():
                self._on_synced()
                return
            result = upload(settlement, self.house, self.now, attempts=3,
                            sleep=lambda s: self._stopping.wait(s),
                            should_stop=self._stopping.is_set)
        except Exception as error:  # noqa: BLE001 - the journal busy or failing: try later
            LOG.warning("upload failed (%s); trying again later", error)
            return
        self.uploads += 1
        if result.pending == 0:
            self._on_synced()
        if result.acknowledged:
            LOG.info("uploaded batches %s", result.acknowledged)
        if not result.complete and result.reason != "stopped":
            LOG.warning("upload stopped at batch %s: %s", result.stopped_at, result.reason)
