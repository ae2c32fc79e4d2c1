"""Uploading settlement batches to the clearing house (httpx).

Batches go in order, oldest first, each as ``POST URL/v1/batches`` with ``{terminal_id,
incarnation, number, body, hash, signature}`` (an :class:`Upload` of the settlement wire
format, whose :class:`Ack` is the answer). Idempotent: the same batch sent twice is the same
(terminal, incarnation, number, hash), which the receiver acknowledges again without storing
anything twice. A batch is marked acknowledged only by a 200 answer whose ``ack`` names exactly
that terminal, incarnation, number and hash; nothing else the server says changes anything here.

Timeouts, connection errors, 5xx and unreadable answers are retried with exponential backoff and
full jitter; a 4xx is the server refusing that batch and stops the upload (later batches would
not link). Answers are read up to :data:`MAX_ANSWER_BYTES`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from farebox.protocol.settlement import Ack, Upload, WireError

from farebox.terminal import failpoints
from farebox.terminal.errors import TerminalError
from farebox.terminal.store.settlement import Batch, Settlement

if TYPE_CHECKING:  # httpx is imported when an upload runs, not by every command
    import httpx

LOG = logging.getLogger("farebox.terminal.link.upload")

MAX_ANSWER_BYTES = 64 * 1024
DEFAULT_ATTEMPTS = 5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
TIMEOUT_S = 10.0


class UploadRefused(TerminalError):
    """The server refused a batch (4xx): retrying it will not help."""


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


def batches_url(url: str) -> str:
    return url.rstrip("/") + "/v1/batches"


def upload_of(settlement: Settlement, batch: Batch) -> Upload:
    return Upload.of(settlement.identity.terminal_id, settlement.identity.incarnation,
                     batch.number, batch.signed)


def upload_payload(settlement: Settlement, batch: Batch) -> dict:
    """The JSON sent for ``batch``."""
    return upload_of(settlement, batch).to_json()


def upload(settlement: Settlement, url: str, now: Callable[[], datetime], *,
           client: httpx.Client | None = None, attempts: int = DEFAULT_ATTEMPTS,
           on_batch: Callable[[Batch, bool], None] = lambda batch, acked: None,
           sleep: Callable[[float], None] = time.sleep,
           should_stop: Callable[[], bool] = lambda: False) -> UploadResult:
    """Send every unacknowledged batch in order until one cannot be; see the module doc."""
    import httpx

    result = UploadResult()
    pending = settlement.unacknowledged()
    own_client = client is None
    client = client or httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)
    try:
        for index, batch in enumerate(pending):
            if should_stop():
                result.stopped_at, result.reason = batch.number, "stopped"
                break
            failpoints.hit("upload-before-send")
            try:
                _send(client, batches_url(url), upload_of(settlement, batch), attempts, sleep,
                      should_stop)
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


def _send(client: httpx.Client, url: str, sent: Upload, attempts: int,
          sleep: Callable[[float], None], should_stop: Callable[[], bool]) -> None:
    """POST one batch until it is acknowledged; UploadRefused on 4xx, UploadFailed when the
    attempts run out."""
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
        if 400 <= status < 500:
            raise UploadRefused(f"the server refused batch {sent.number} ({status}: "
                                f"{_error_text(answer)})")
        if status != 200:
            problem = f"HTTP {status}"
            continue
        try:
            if Ack.from_json(answer).batch == sent.name:
                return
        except WireError:
            pass
        problem = "an answer that does not acknowledge this batch"
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

    def __init__(self, open_settlement: Callable[[], Settlement], url: str,
                 now: Callable[[], datetime], interval_s: float = 60.0,
                 also: Callable[[], None] | None = None,
                 on_synced: Callable[[], None] = lambda: None) -> None:
        """``also``: more work each round (fetching the action list); what it raises is
        logged. ``on_synced``: called (on this thread) after each round that leaves no batch
        unacknowledged, whether it sent some or found none to send."""
        self._open = open_settlement
        self._also = also
        self._on_synced = on_synced
        self.url = url
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
            result = upload(settlement, self.url, self.now, attempts=3,
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
