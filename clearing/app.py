"""The clearing receiver over HTTP (Starlette, served by uvicorn).

``POST /v1/batches``: one upload (see ``service.py``); 200 with the acknowledgement signed by
the receiver's key (a ``SignedAck`` of the settlement wire format), or 400 (not
an upload), 403 (unknown terminal), 409 (a number taken by another batch, out of order, a broken
chain), 408 (a body too slow), 413 (body over :data:`MAX_BODY_BYTES`), 422 (does not verify,
or a record no terminal writes: ``validate.py``), 503 (busy: ``Retry-After``), each
``{"error": ...}``.
``GET /v1/actions``: the action list, signed (a ``SignedActionList`` of the settlement wire
format, ``farebox.protocol.settlement``). ``GET /v1/health``: 200 ``{"ok": true}``.

Resources are bounded (:class:`Limits`, per worker process): at most ``max_uploads`` uploads are
being received or processed at once, and their bodies hold at most ``buffer_bytes`` together (a
body's declared length is reserved before it is read; a chunked one as it comes). One more is
answered 503 with ``Retry-After`` before its body is read. Bodies over :data:`SMALL_BODY_BYTES`
(or of unknown length) take at most three quarters of either bound, so a crowd of large bodies
leaves room for the small uploads terminals send. A body that has not arrived ``body_timeout_s``
after its headers is answered 408. Every 408, 413 and 503 closes the connection (its body unread).
Timeouts for connections that send no request are the server's (``server.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from farebox.protocol.settlement import utc_iso

from farebox.clearing.service import Receiver, Refused

LOG = logging.getLogger("farebox.clearing")
MAX_BODY_BYTES = 16 * 1024 * 1024
MIB = 1024 * 1024
#: a body this size or less is a small upload (a batch of 1,000 records is about 0.7 MiB)
SMALL_BODY_BYTES = MIB
#: answers after which the connection is closed: the body was not (all) read
_CLOSING = {408, 413, 503}


@dataclass(frozen=True)
class Limits:
    """What one receiver process takes at once (``farebox clearing serve`` options)."""

    max_uploads: int = 16  # uploads being received or processed at once
    buffer_bytes: int = 64 * MIB  # what their bodies may hold together
    body_timeout_s: float = 30.0  # from the headers to the body's last byte
    retry_after_s: int = 1  # what a 503 tells the client to wait
    header_timeout_s: float = 10.0  # a connection's request line and headers (server.py)
    keep_alive_timeout_s: float = 5.0  # an idle connection between requests (server.py)
    max_connections: int = 4096  # open connections; a request past them is 503 (uvicorn)

    def __post_init__(self) -> None:
        if self.max_uploads < 1 or self.max_connections < 1:
            raise ValueError("max_uploads and max_connections are at least 1")
        if self.buffer_bytes < MAX_BODY_BYTES:
            raise ValueError(f"the upload buffer holds at least one largest upload "
                             f"({MAX_BODY_BYTES // MIB} MiB)")
        if min(self.body_timeout_s, self.header_timeout_s, self.keep_alive_timeout_s) <= 0:
            raise ValueError("timeouts are more than 0 seconds")


class _Ticket:
    """One admitted upload: the bytes reserved for its body, and whether it is large."""

    __slots__ = ("reserved", "large")

    def __init__(self, reserved: int, large: bool) -> None:
        self.reserved, self.large = reserved, large


class _Gate:
    """The uploads admitted at once and the body bytes reserved for them (one event loop: no
    lock). Large bodies (over :data:`SMALL_BODY_BYTES`, or of unknown length) take at most three
    quarters of either bound: the rest is kept for the small uploads terminals send."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.large_max_uploads = max(1, limits.max_uploads * 3 // 4)
        self.large_max_bytes = max(MAX_BODY_BYTES, limits.buffer_bytes * 3 // 4)
        self.uploads = self.large_uploads = 0
        self.reserved = self.large_reserved = 0

    def _fits(self, more: int, large: bool) -> bool:
        if self.reserved + more > self.limits.buffer_bytes:
            return False
        return not large or self.large_reserved + more <= self.large_max_bytes

    def admit(self, declared: int | None) -> _Ticket | None:
        """A ticket for a body of ``declared`` bytes (None: chunked), or None: busy."""
        large = declared is None or declared > SMALL_BODY_BYTES
        size = declared or 0
        if self.uploads >= self.limits.max_uploads or not self._fits(size, large) or (
                large and self.large_uploads >= self.large_max_uploads):
            return None
        self.uploads += 1
        self.large_uploads += large
        self.reserved += size
        self.large_reserved += size if large else 0
        return _Ticket(size, large)

    def grow(self, ticket: _Ticket, more: int) -> bool:
        """Reserve ``more`` bytes for a body that brought more than it declared (chunked)."""
        large = ticket.large
        if not self._fits(more, large):
            return False
        ticket.reserved += more
        self.reserved += more
        self.large_reserved += more if large else 0
        return True

    def release(self, ticket: _Ticket) -> None:
        self.uploads -= 1
        self.large_uploads -= ticket.large
        self.reserved -= ticket.reserved
        self.large_reserved -= ticket.reserved if ticket.large else 0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _busy() -> Refused:
    return Refused(503, "the receiver is busy with other uploads; try again shortly")


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
        raise Refused(413, f"an upload is at most {MAX_BODY_BYTES} bytes")
    return int(declared)


async def _read_limited(request: Request, gate: _Gate, ticket: _Ticket) -> bytes:
    """The body, its bytes reserved on ``ticket`` as they come past what it declared."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(413, f"an upload is at most {MAX_BODY_BYTES} bytes")
        if size > ticket.reserved and not gate.grow(ticket, size - ticket.reserved):
            raise _busy()
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(receiver: Receiver, limits: Limits = Limits(), *, console: bool = True
               ) -> Starlette:
    gate = _Gate(limits)

    async def _take(request: Request) -> object:
        """The upload's JSON, read within the limits."""
        ticket = gate.admit(_declared_length(request))
        if ticket is None:
            raise _busy()
        try:
            try:
                async with asyncio.timeout(limits.body_timeout_s):
                    raw = await _read_limited(request, gate, ticket)
            except TimeoutError:
                raise Refused(408, f"the upload's body did not arrive within "
                              f"{limits.body_timeout_s:g} s") from None
            try:
                upload = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise Refused(400, "an upload is a JSON object") from None
            del raw
            return await run_in_threadpool(receiver.ingest, upload, utc_iso(_now()))
        finally:
            gate.release(ticket)

    async def batches(request: Request) -> JSONResponse:
        try:
            ack = await _take(request)
        except ClientDisconnect:
            LOG.info("a client went away before its upload was read")
            return JSONResponse({"error": "the client went away"}, status_code=400)
        except Refused as refused:
            LOG.warning("refused an upload: %s", refused.reason)
            headers = {"Connection": "close"} if refused.status in _CLOSING else {}
            if refused.status == 503:
                headers["Retry-After"] = str(limits.retry_after_s)
            return JSONResponse({"error": refused.reason}, status_code=refused.status,
                                headers=headers)
        LOG.info("batch %s/%s/%d: %d records, %d already stored%s", ack.terminal_id,
                 ack.incarnation, ack.number, ack.records, ack.duplicates,
                 " (received before)" if ack.again else "")
        return JSONResponse(receiver.sign_ack(ack).to_json())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def actions(request: Request) -> JSONResponse:
        document = await run_in_threadpool(receiver.action_list, _now())
        return JSONResponse(document)

    routes: list[BaseRoute] = [Route("/v1/batches", batches, methods=["POST"]),
                               Route("/v1/actions", actions, methods=["GET"]),
                               Route("/v1/health", health, methods=["GET"])]
    if console:
        from farebox.clearing.console.app import console_mount

        routes.append(console_mount(receiver))  # the operators' web console, /console
    return Starlette(routes=routes)
