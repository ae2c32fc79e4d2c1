"""Readers that hand frames straight to a simulated card in the same process.

:class:`InProcessTransport` is the bare seam (``exchange``) plus the :class:`~..reader.Reader`
calls; :class:`CardFileReader` is the same over a card file, locked while the reader is open and
saved after every block write that lands (``sim:CARD.json``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from farebox.protocol.errors import ProtocolError, TransportTimeout
from farebox.protocol.frames import Polling, PollingResponse
from farebox.protocol.sim.card import Faults, SimulatedLiteS
from farebox.protocol.sim.cardfile import DEFAULT_LOCK_TIMEOUT_S, CardFile


class InProcessTransport:
    """Carries frames to a ``SimulatedLiteS``; simulates its latency through ``sleep`` if given.

    A card slower than the timeout still acts on the command (a write lands); only its answer
    is lost, as with a real reader.
    """

    def __init__(self, card: SimulatedLiteS, sleep: Callable[[float], None] | None = None,
                 name: str = "sim") -> None:
        self.card = card
        self.name = name
        self.exchanges = 0
        self._sleep = sleep

    def exchange(self, frame: bytes, timeout_s: float) -> bytes:
        self.exchanges += 1
        answer = self.card.respond(frame)
        latency_s = self.card.faults.latency_s
        if answer is None or latency_s > timeout_s:
            if self._sleep is not None:
                self._sleep(timeout_s)
            reason = "no answer" if answer is None else f"answer after {latency_s} s"
            raise TransportTimeout(f"{reason}, timeout {timeout_s} s")
        if self._sleep is not None and latency_s > 0:
            self._sleep(latency_s)
        return answer

    def wait_for_card(self, system_code: int, timeout_s: float) -> PollingResponse | None:
        try:
            return PollingResponse.from_frame(self.exchange(Polling(system_code).to_frame(),
                                                            timeout_s))
        except (TransportTimeout, ProtocolError):
            return None

    def wait_for_removal(self, timeout_s: float) -> bool:
        return not self.card.in_field

    def close(self) -> None:
        pass


class CardFileReader(InProcessTransport):
    """The card in a card file, presented to this process: ``sim:CARD.json``.

    The file stays locked (one writer per card) until :meth:`close`; every landed block write is
    saved back atomically, so a process killed mid-tap leaves the card as a real one would be.
    """

    def __init__(self, path: str | os.PathLike[str], *, faults: Faults | None = None,
                 writable: bool = True,
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        self.file = CardFile(path, writable=writable, lock_timeout_s=lock_timeout_s)
        super().__init__(self.file.card, name=f"sim:{path}")
        if faults is not None:
            self.card.faults = faults
        if writable:
            self.card.on_write = lambda card: self.file.save()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CardFileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
