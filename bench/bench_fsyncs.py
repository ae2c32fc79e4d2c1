"""The terminal's fsyncs per tap, counted by strace: in the field (from the card's first command
to its result shown) and in all (the work after the card left included), for a CLI tap on a card
file and for each tap the daemon serves. The baseline is the one fsync a tap cannot do without:
its intent's (README, step 8). A card file's own syncs (the card's, not the terminal's) are left
out; so is the journal's creation (the first CLI tap makes the journal).

    .venv/bin/python bench/bench_fsyncs.py [--taps 4]

Uses tests/terminal/fsync_harness.py, as tests/terminal/test_fsyncs.py does (which pins 1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "terminal"))

from test_fsyncs import in_field_syncs, traced  # noqa: E402


def _all_syncs(calls, state: Path) -> int:
    return sum(1 for call, path, _ in calls if call in ("fsync", "fdatasync")
               and (path == str(state) or path.startswith(f"{state}/")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taps", type=int, default=4, help="taps of each kind")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("bench_fsyncs: strace is missing (bootstrap.sh installs it)")
    from farebox.tools.cli import main as farebox

    with tempfile.TemporaryDirectory(prefix="fb-fsyncs-") as name:
        folder = Path(name)
        state, cards = folder / "cli-state", folder / "cards"
        cards.mkdir()
        card = cards / "card.json"
        farebox(["card", "new", str(card), "--issued", "2026-01-15", "--balance", "100"])
        in_field, total = [], []
        for minute in range(args.taps + 1):
            run = folder / f"cli{minute}"
            run.mkdir()
            calls = traced(run, "cli", "tap", card, "--fare", "1", "--state", state,
                           "--at", f"2026-11-22T08:{minute:02d}:00+08:00")
            if minute == 0:
                continue  # this one made the journal
            spans = in_field_syncs(calls, state, lambda path, data: path == "stdout"
                                   and data.startswith("APPROVED"))
            in_field.append(sum(len(span) for span in spans))
            total.append(_all_syncs(calls, state))
        daemon_state = folder / "daemon-state"
        calls = traced(folder, "daemon", daemon_state, args.taps)
        spans = in_field_syncs(calls, daemon_state, lambda path, data: data == "shown\\n")
        daemon_in_field = [len(span) for span in spans]
        daemon_total = _all_syncs(calls, daemon_state)
    print(f"fsyncs per tap (strace; baseline: 1, the intent's), {args.taps} taps each")
    print(f"  CLI tap, in the field            {max(in_field)} (each: {in_field})")
    print(f"  CLI tap, whole process           {max(total)} (each: {total})")
    print(f"  daemon tap, in the field         {max(daemon_in_field)} (each: {daemon_in_field})")
    print(f"  daemon, whole run of {args.taps} taps     {daemon_total} "
          "(start-up and the checkpoints after each card included)")


if __name__ == "__main__":
    main()
