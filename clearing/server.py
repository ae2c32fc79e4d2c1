"""Running the clearing receiver: uvicorn on a socket bound here (port 0 picks a free one), so
the caller learns the real address before the first request. Given a certificate and its key it
serves HTTPS itself (TLS terminated by uvicorn); otherwise plain HTTP, for loopback or behind a
TLS-terminating proxy.

Slow clients are bounded (:class:`farebox.clearing.app.Limits`): a connection that has not sent a
whole request line and headers ``header_timeout_s`` after it opened (or after it started its
next request) is answered 408 and closed, an idle keep-alive connection is closed after
``keep_alive_timeout_s`` (uvicorn's), headers are at most :data:`MAX_HEADER_BYTES`, and a request
past ``max_connections`` open connections is answered 503 (uvicorn's ``limit_concurrency``).
The body's own timeout and the bound on uploads at once are the app's.

With ``workers`` above 1 the socket is shared by that many worker processes (spawned, each its
own :class:`Store` and app, so each its own limits); this process supervises them: it starts one
again if it dies, and on SIGTERM or SIGINT stops them all and returns."""

from __future__ import annotations

import logging
import multiprocessing
import resource
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from farebox.clearing.app import Limits, create_app
from farebox.clearing.maintain import maintain
from farebox.clearing.service import Receiver
from farebox.clearing.store import Store

LOG = logging.getLogger("farebox.clearing")
MAX_HEADER_BYTES = 16 * 1024
_TIMEOUT_BODY = b'{"error": "the request headers did not arrive in time"}'
_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
#: restarts of dead workers after which the supervisor gives up, per worker
_RESTARTS_PER_WORKER = 5
#: how long a stopping supervisor waits for a worker before it kills it
_STOP_WAIT_S = 30.0


def guarded_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, which times out no connection before its first request (nor a
    request whose headers trickle in), with that timeout added."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm()  # a request begun but its headers not all here
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(_TIMEOUT_408)
                self.transport.close()

    return HeaderTimeoutProtocol


def _uvicorn_config(app, limits: Limits, tls_cert: str | None, tls_key: str | None):
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                          ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                          http=guarded_protocol(limits.header_timeout_s),
                          timeout_keep_alive=limits.keep_alive_timeout_s,
                          limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def _raise_open_files(limits: Limits) -> None:
    """Let this process hold its connections: the soft limit on open files raised towards
    ``max_connections`` and some to spare (never past the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            LOG.warning("cannot raise the open files limit to %d", target)


@dataclass(frozen=True)
class _Worker:
    """What a worker process needs (picklable: it goes to a spawned process)."""

    db: str
    limits: Limits
    tls_cert: str | None
    tls_key: str | None

    def run(self, sock: socket.socket) -> None:
        import uvicorn

        _raise_open_files(self.limits)
        with Store(self.db) as store:
            config = _uvicorn_config(create_app(Receiver(store), self.limits), self.limits,
                                     self.tls_cert, self.tls_key)
            uvicorn.Server(config).run(sockets=[sock])


def _worker_main(worker: _Worker, sock: socket.socket) -> None:
    logging.basicConfig(level=logging.INFO, format="farebox clearing: %(message)s")
    logging.getLogger("yoyo").setLevel(logging.WARNING)
    try:
        worker.run(sock)
    except KeyboardInterrupt:  # SIGINT to the whole group (a terminal's Ctrl-C): stopped
        pass


def serve(db: str, host: str, port: int, on_ready: Callable[[str], None], *,
          tls_cert: str | None = None, tls_key: str | None = None,
          limits: Limits = Limits(), workers: int = 1) -> None:
    """Serve ``db`` on ``host:port`` until SIGINT/SIGTERM: HTTPS with ``tls_cert`` (PEM, the
    chain) and ``tls_key`` (PEM), both or neither; OSError naming them when they cannot be
    used, before anything listens. ``workers`` processes share the socket (1: this one)."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a TLS certificate needs its key, and a key its certificate")
    if workers < 1:
        raise ValueError("at least one worker")
    _raise_open_files(limits)
    with Store(db) as store:
        maintain(db, datetime.now(timezone.utc))  # day partitions ahead, retention
        # the receiver's key made now, once, before workers could race to make it
        app = create_app(Receiver(store), limits)
        config = _uvicorn_config(app, limits, tls_cert, tls_key)
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
        sock.listen(1024)
        bound_host, bound_port = sock.getsockname()[:2]
        scheme = "https" if tls_cert is not None else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if workers == 1:
            on_ready(f"{scheme}://{shown}:{bound_port}")
            uvicorn.Server(config).run(sockets=[sock])
            return
    with sock:
        _supervise(_Worker(db, limits, tls_cert, tls_key), sock, workers,
                   lambda: on_ready(f"{scheme}://{shown}:{bound_port}"))


def _supervise(worker: _Worker, sock: socket.socket, count: int,
               ready: Callable[[], None]) -> None:
    """``count`` worker processes on ``sock``, started again when one dies, until SIGTERM or
    SIGINT: then each is sent SIGTERM and waited for (killed after :data:`_STOP_WAIT_S`)."""
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}

    def start():
        process = context.Process(target=_worker_main, args=(worker, sock),
                                  name="farebox-clearing-worker")
        process.start()
        return process

    processes = [start() for _ in range(count)]
    restarts = 0
    try:
        ready()
        while not stop.wait(0.5):
            for index, process in enumerate(processes):
                if not process.is_alive() and not stop.is_set():
                    restarts += 1
                    if restarts > _RESTARTS_PER_WORKER * count:
                        raise OSError(f"the receiver's workers keep ending (the last with "
                                      f"{process.exitcode}); stopped")
                    LOG.warning("worker %d (pid %s) ended with %s; starting another", index,
                                process.pid, process.exitcode)
                    processes[index] = start()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn shuts down gracefully
        for process in processes:
            process.join(_STOP_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
