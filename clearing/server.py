"""Running the clearing receiver: uvicorn on a socket bound here (port 0 picks a free one), so
the caller learns the real address before the first request. Given a certificate and its key it
serves HTTPS itself (TLS terminated by uvicorn); otherwise plain HTTP, for loopback or behind a
TLS-terminating proxy."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime, timezone

from farebox.clearing.app import create_app
from farebox.clearing.maintain import maintain
from farebox.clearing.service import Receiver
from farebox.clearing.store import Store


def serve(db: str, host: str, port: int, on_ready: Callable[[str], None], *,
          tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Serve ``db`` on ``host:port`` until SIGINT/SIGTERM (uvicorn's own handling): HTTPS with
    ``tls_cert`` (PEM, the chain) and ``tls_key`` (PEM), both or neither; OSError naming them
    when they cannot be used, before anything listens."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a TLS certificate needs its key, and a key its certificate")
    with Store(db) as store:
        maintain(db, datetime.now(timezone.utc))  # day partitions ahead, retention
        config = uvicorn.Config(create_app(Receiver(store)), log_level="warning",
                                access_log=False, lifespan="off", ssl_certfile=tls_cert,
                                ssl_keyfile=tls_key)
        try:
            config.load()  # the TLS context too: a bad certificate or key is said now
        except OSError as error:  # ssl.SSLError is an OSError
            raise OSError(error.errno, f"cannot serve TLS with certificate {tls_cert} and key "
                          f"{tls_key}: {error.strerror or error}") from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}"
                          ) from None
        sock.listen(128)
        bound_host, bound_port = sock.getsockname()[:2]
        server = uvicorn.Server(config)
        scheme = "https" if tls_cert is not None else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        on_ready(f"{scheme}://{shown}:{bound_port}")
        server.run(sockets=[sock])
