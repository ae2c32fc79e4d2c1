"""systemd's service notification protocol (sd_notify), for ``Type=notify`` units.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the Unix socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with ``@``). This sender is
written here rather than taken from PyPI: the ``sdnotify`` package has had no release since 2017,
``systemd-python`` needs libsystemd headers to build, and the protocol is twenty lines.

Nothing is sent when ``NOTIFY_SOCKET`` is unset (the daemon run by hand or in a test). A send
that fails (systemd restarted, the socket gone) is logged once and otherwise ignored: the daemon
never stops taking fares because its supervisor cannot be told.

The watchdog: systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it is meant
for); :meth:`Notifier.watchdog` sends ``WATCHDOG=1`` at most every quarter of that interval, so
calling it on every loop pass costs nothing and a missed pass or two cannot let it expire.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

LOG = logging.getLogger("farebox.terminal.daemon.sdnotify")


def socket_address(value: str) -> str | bytes:
    """The address ``$NOTIFY_SOCKET`` names: a path, or a Linux abstract name (``@name``)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """The watchdog interval systemd asked for (None: no watchdog for this process)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (a parent that exec'd us keeps it)
    return int(usec) / 1_000_000


class Notifier:
    """Tells the service manager how the daemon is doing; a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 clock=time.monotonic) -> None:
        env = os.environ if env is None else env
        self._address = socket_address(env["NOTIFY_SOCKET"]) if env.get("NOTIFY_SOCKET") else None
        self.watchdog_s = watchdog_interval_s(env) if self._address else None
        self._clock = clock
        self._last_ping: float | None = None
        self._socket: socket.socket | None = None
        self._failed = False
        self.ready_sent = False
        self.status: str | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines (keys as given, upper case); True when it went out."""
        if self._address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as error:
            if not self._failed:
                LOG.warning("cannot notify the service manager (%s); going on without it", error)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        """READY=1 (once: the first time the reader answers), with a status line."""
        if self.ready_sent:
            self.set_status(status)
            return
        self.status = status
        self.ready_sent = self.send(ready=1, status=status, mainpid=os.getpid()) or self.ready_sent
        self._last_ping = self._clock()

    def set_status(self, status: str) -> None:
        """STATUS=... (what ``systemctl status`` shows); sent only when it changes."""
        if status != self.status:
            self.status = status
            self.send(status=status)

    def watchdog(self) -> None:
        """WATCHDOG=1, at most every quarter of the watchdog interval."""
        if self.watchdog_s is None:
            return
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_s / 4:
            return
        self._last_ping = now
        self.send(watchdog=1)

    def stopping(self, status: str = "stopping") -> None:
        self.send(stopping=1, status=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
