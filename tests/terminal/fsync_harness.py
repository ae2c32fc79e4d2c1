"""Run under ``strace`` by test_fsyncs.py: the CLI's tap, or the daemon's loop, with a marker
written to a file before every card command, so that the trace shows when a card is in the field.

    python fsync_harness.py MARKS cli ARGV...            farebox ARGV (a tap on a card file)
    python fsync_harness.py MARKS daemon STATE CARDS     the daemon loop over CARDS presentations
    python fsync_harness.py MARKS daemon-cold STATE N    the same without open_terminal

Nothing is replaced: the markers are an extra ``write`` before each command goes to the card.
The daemon presents one card after another (different cards: the same card back within
REPRESENT_GUARD_S would be the same presentation) and writes ``shown`` when a tap's result is
reported (its TapEvent), which is when the customer sees it.
"""

from __future__ import annotations

import os
import sys
import time

from farebox.protocol.sim import inprocess

MARKS = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
_exchange = inprocess.InProcessTransport.exchange


def _marked(self, frame, timeout_s):
    os.write(MARKS, b"command\n")
    return _exchange(self, frame, timeout_s)


inprocess.InProcessTransport.exchange = _marked


def daemon(state: str, presentations: int, *, cold: bool = False) -> int:
    """``cold``: the terminal made without open_terminal, whose journal has not started its WAL
    when the first card comes."""
    from datetime import date
    from pathlib import Path

    from farebox.protocol.sim.card import SimulatedLiteS
    from farebox.terminal.card.issue import IssueRequest, issue, new_idm
    from farebox.terminal.card.keys import published_test_keys
    from farebox.terminal.config import load_config
    from farebox.terminal.core.rules import Tariff
    from farebox.terminal.daemon.events import TapEvent
    from farebox.terminal.daemon.loop import Daemon
    from farebox.terminal.runtime import open_terminal

    keys = published_test_keys()
    cards = []
    for number in range(presentations):
        idm = new_idm()
        _, _, blocks = issue(IssueRequest(issued=date(2026, 1, 15), number=12345670 + number,
                                          balance_cents=10_000), keys, idm)
        card = SimulatedLiteS(idm, blocks=blocks)
        card.in_field = False
        cards.append(card)

    class Hand(inprocess.InProcessTransport):
        """Presents each card once, then takes it away."""

        def __init__(self):
            super().__init__(cards[0], name="hand")
            self.next = 0

        def wait_for_card(self, system_code, timeout_s):
            if not self.card.in_field:
                if self.next >= len(cards):
                    time.sleep(0.01)
                    return None
                self.card = cards[self.next]
                self.card.in_field = True
                self.next += 1
            return super().wait_for_card(system_code, timeout_s)

        def wait_for_removal(self, timeout_s):
            self.card.in_field = False
            return True

    def shown(event):
        if isinstance(event, TapEvent):
            os.write(MARKS, b"shown\n")

    config = load_config(None).with_flags(state_dir=Path(state))
    reader = Hand()
    if cold:
        from farebox.terminal.card.tap import Terminal
        from farebox.terminal.store.journal import Journal

        Journal(Path(state) / "journal.sqlite3").close()  # made by an earlier process
        with Journal(Path(state) / "journal.sqlite3") as journal:
            stats = Daemon(Terminal(journal, keys), lambda: reader, Tariff.flat(100),
                           on_event=shown, max_taps=presentations).run()
        return 0 if stats.taps == presentations else 1
    with open_terminal(config) as terminal:
        stats = Daemon(terminal, lambda: reader, Tariff.flat(100), on_event=shown,
                       max_taps=presentations).run()
    return 0 if stats.taps == presentations else 1


if __name__ == "__main__":
    if sys.argv[2] == "cli":
        from farebox.tools.cli import main

        sys.exit(main(sys.argv[3:]))
    sys.exit(daemon(sys.argv[3], int(sys.argv[4]), cold=sys.argv[2] == "daemon-cold"))
