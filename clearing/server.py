"""Running the clearing receiver: uvicorn on a socket bound here (port 0 picks a free one), so
the caller learns the real address before the first request."""

from __future__ import annotations

import socket
from collections.abc import Callable

from farebox.clearing.app import create_app
from farebox.clearing.service import Receiver
from farebox.clearing.store import Store


def serve(db: str, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve ``db`` on ``host:port`` until SIGINT/SIGTERM (uvicorn's own handling)."""
    import uvicorn

    with Store(db) as store:
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
        config = uvicorn.Config(create_app(Receiver(store)), log_level="warning",
                                access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        on_ready(f"http://{bound_host}:{bound_port}")
        server.run(sockets=[sock])
