"""A transport that hands frames straight to a simulated card in the same process."""

from collections.abc import Callable

from ..errors import TransportTimeout
from ..simcard import SimulatedLiteS


class InProcessTransport:
    """Carries frames to a ``SimulatedLiteS``; simulates its latency through ``sleep`` if given.

    A card slower than the timeout still acts on the command (a write lands); only its answer
    is lost, as with a real reader.
    """

    def __init__(self, card: SimulatedLiteS, sleep: Callable[[float], None] | None = None) -> None:
        self.card = card
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
