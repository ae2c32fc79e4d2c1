"""What the two simulated-card servers share (nfcpy's udp link, pcscd's vpcd driver): the
presentation count, the stop flag, the serve loop over presentations with a fault plan, and a
background thread whose failure is handed to ``close``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from farebox.protocol.sim.card import Faults

FaultPlan = Sequence[Faults] | Callable[[int], Faults | None]
"""Faults per presentation: ``plan[number - 1]`` (Faults() past the end) or ``plan(number)``."""

P = TypeVar("P")


def faults_for(plan: FaultPlan, number: int) -> Faults:
    """The faults ``plan`` gives presentation ``number`` (1-based)."""
    if callable(plan):
        return plan(number) or Faults()
    return plan[number - 1] if number <= len(plan) else Faults()


class CardServer(Generic[P]):
    """A card that readers can tap, one presentation at a time, served on one thread.

    Subclasses call ``__init__`` and implement the presentation; :meth:`serve_presentations`,
    :meth:`start_background` and :meth:`join_background` are the loop and the thread around it.
    """

    #: How the server names itself in thread names and errors.
    kind = "card server"

    def __init__(self) -> None:
        self.presentation_count = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def serve_presentations(
        self,
        present: Callable[[Faults], P | None],
        presentations: int | None,
        faults: FaultPlan,
        on_presentation: Callable[[P], None] | None,
        away_s: float = 0.0,
    ) -> int:
        """``present`` ``presentations`` times (None: until stopped), ``away_s`` apart; return
        how many were served. ``present`` returning None (stopped, no reader) ends the loop;
        ``on_presentation`` runs on this thread after each one (an exception from it ends it)."""
        served = 0
        while (presentations is None or served < presentations) and not self.stopping:
            if served and away_s > 0 and self._stopping.wait(away_s):
                break
            presentation = present(faults_for(faults, self.presentation_count + 1))
            if presentation is None:
                break
            served += 1
            if on_presentation is not None:
                on_presentation(presentation)
        return served

    def start_background(self, serve: Callable[[], object], name: str) -> threading.Thread:
        """Run ``serve`` on a daemon thread; :meth:`join_background` re-raises what it raised."""
        if self._thread is not None:
            raise RuntimeError(f"the {self.kind} is already serving in the background")

        def run() -> None:
            try:
                serve()
            except BaseException as error:  # handed to join_background()
                self._thread_error = error

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        return self._thread

    def join_background(
        self, join_timeout_s: float, release: Callable[[], None] = lambda: None
    ) -> None:
        """Join the background thread (after a stop), then ``release`` the server's resources;
        RuntimeError if the thread failed or did not stop in time."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(join_timeout_s)
        release()
        if thread is not None and thread.is_alive():
            raise RuntimeError(f"the {self.kind} thread did not stop in {join_timeout_s} s")
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise RuntimeError(f"the {self.kind} thread failed") from error
