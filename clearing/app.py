"""The clearing receiver over HTTP (Starlette, served by uvicorn).

``POST /v1/batches``: one upload (see ``service.py``); 200 with the acknowledgement signed by the
receiver's key (a ``SignedAck`` of the settlement wire format), or 400 (not
an upload), 403 (unknown terminal), 409 (a number taken by another batch, out of order, a broken
chain), 413 (body over :data:`MAX_BODY_BYTES`), 422 (does not verify), each ``{"error": ...}``.
``GET /v1/actions``: the action list, signed (a ``SignedActionList`` of the settlement wire
format, ``farebox.protocol.settlement``). ``GET /v1/health``: 200 ``{"ok": true}``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from farebox.protocol.settlement import utc_iso

from farebox.clearing.service import Receiver, Refused

LOG = logging.getLogger("farebox.clearing")
MAX_BODY_BYTES = 16 * 1024 * 1024


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _read_limited(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise Refused(413, f"an upload is at most {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(413, f"an upload is at most {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(receiver: Receiver) -> Starlette:
    async def batches(request: Request) -> JSONResponse:
        try:
            raw = await _read_limited(request)
            try:
                upload = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise Refused(400, "an upload is a JSON object") from None
            ack = await run_in_threadpool(receiver.ingest, upload, utc_iso(_now()))
        except Refused as refused:
            LOG.warning("refused an upload: %s", refused.reason)
            return JSONResponse({"error": refused.reason}, status_code=refused.status)
        LOG.info("batch %s/%s/%d: %d records, %d already stored%s", ack.terminal_id,
                 ack.incarnation, ack.number, ack.records, ack.duplicates,
                 " (received before)" if ack.again else "")
        return JSONResponse(receiver.sign_ack(ack).to_json())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def actions(request: Request) -> JSONResponse:
        document = await run_in_threadpool(receiver.action_list, _now())
        return JSONResponse(document)

    return Starlette(routes=[Route("/v1/batches", batches, methods=["POST"]),
                             Route("/v1/actions", actions, methods=["GET"]),
                             Route("/v1/health", health, methods=["GET"])])
