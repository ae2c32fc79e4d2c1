"""Issue 17 item 5 from the shell: an edit of the journal's write states or card memory outside
the journal is found by ``journal verify`` (exit 3, naming the table and row), stops ``batch
close`` from settling it and the daemon from starting (``doctor`` fails); a flipped bit anywhere
in the file is never an internal error; a journal of schema 3 carries on."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from farebox.terminal.store.journal import JournalBroken
from farebox.tools.cli import EXIT_JOURNAL_BROKEN, exit_status

AT = "2026-11-22T08:00:00+08:00"
FIXTURE_V3 = Path(__file__).resolve().parents[1] / "fixtures" / "journal_v3"


def init(farebox, state: Path | None = None) -> None:
    run = farebox("terminal", "init", "--state", state or farebox.state, "--id", "T1", "--json")
    assert run.code == 0, run.err


def taps(farebox, card, *times: str) -> list[dict]:
    return [farebox.tap(card, "--fare", "1.00", at=at).json() for at in times]


def edit(state: Path, statement: str) -> None:
    db = sqlite3.connect(state / "journal.sqlite3")
    db.execute(statement)
    db.commit()
    db.close()


def one_line(run) -> None:
    assert run.err.endswith("\n") and run.err.count("\n") == 1, run.err
    assert "Traceback" not in run.err and "internal error" not in run.err, run.err


def test_damage_is_exit_3():
    assert EXIT_JOURNAL_BROKEN == 3 and exit_status(JournalBroken("x")) == 3


def test_a_payment_edited_to_void_is_found_and_never_settled(farebox):
    """The issue's first edit: ``card_writes.state`` of an approved payment set to ``void``
    used to leave ``journal verify`` "chain whole" and ``batch close`` settled it as void."""
    init(farebox)
    card = farebox.card(balance="10.00")
    taps(farebox, card, AT, "2026-11-22T08:05:00+08:00")
    listing = farebox("journal", "list", "--state", farebox.state, "--json").json()
    first = next(r for r in listing["records"] if r["seq"] == 1)
    edit(farebox.state, f"UPDATE card_writes SET state = 'void' WHERE tap_id = "
                        f"'{first['tap_id']}'")
    verify = farebox("journal", "verify", "--state", farebox.state, "--json")
    assert verify.code == 3
    assert json.loads(verify.out) == {
        "ok": False, "records": 2, "marks": 4, "bad_seq": None, "table": "card_writes",
        "row": first["tap_id"], "problem": "state is 'void' but its chain entry 2 says "
                                           "'committed'"}
    human = farebox("journal", "verify", "--state", farebox.state)
    assert human.code == 3 and human.out == (
        f"journal chain BROKEN at card_writes row {first['tap_id']}: state is 'void' but its "
        "chain entry 2 says 'committed'\n")
    close = farebox("batch", "close", "--state", farebox.state)
    assert close.code == 3 and close.out == ""
    one_line(close)
    assert f"card_writes row {first['tap_id']}" in close.err and "nothing was settled" in close.err
    listing = farebox("batch", "list", "--state", farebox.state, "--json").json()
    assert listing["batches"] == []


def test_a_memory_edited_down_and_a_restored_card_stop_the_daemon(farebox):
    """The issue's second edit: ``cards.highest_counter`` set to 1, then the card image from
    before the taps restored: the daemon used to approve it. It refuses to start (exit 3, the
    card untouched) and ``doctor`` fails its journal check."""
    init(farebox)
    card = farebox.card(balance="10.00")
    before = card.read_bytes()
    taps(farebox, card, AT, "2026-11-22T08:05:00+08:00")
    edit(farebox.state, "UPDATE cards SET highest_counter = 1")
    card.write_bytes(before)  # the restored image: balance 10.00 again
    run = farebox("run", "--reader", f"sim:{card}", "--fare", "1.00", "--max-taps", 1,
                  "--state", farebox.state)
    assert run.code == 3 and run.out == ""
    one_line(run)
    assert "journal chain BROKEN at cards row" in run.err and "highest_counter is 1" in run.err
    assert card.read_bytes() == before
    doctor = farebox("doctor", "--state", farebox.state, "--json")
    checks = {c["check"]: c for c in json.loads(doctor.out)["checks"]}
    assert doctor.code == 3 and checks["journal"]["status"] == "fail"
    assert "highest_counter is 1" in checks["journal"]["found"]
    assert "farebox journal verify" in checks["journal"]["fix"]
    assert farebox("journal", "verify", "--state", farebox.state).code == 3


def test_the_daemon_starts_on_a_whole_journal_and_leaves_a_checkpoint(farebox):
    init(farebox)
    card = farebox.card(balance="10.00")
    taps(farebox, card, AT)
    run = farebox("run", "--reader", f"sim:{card}", "--fare", "1.00", "--max-taps", 1,
                  "--state", farebox.state, "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["outcome"] == "approved"
    with sqlite3.connect(farebox.state / "journal.sqlite3") as db:
        point = json.loads(db.execute("SELECT value FROM meta WHERE key = 'verified_through'"
                                      ).fetchone()[0])
    assert point["records"][0] == 2 and point["marks"][0] == 4  # the daemon's own tap too
    doctor = farebox("doctor", "--state", farebox.state, "--json")
    journal = next(c for c in json.loads(doctor.out)["checks"] if c["check"] == "journal")
    assert journal["status"] == "ok" and "2 records, 4 chain entries" in journal["found"]


def test_a_schema_3_journal_is_seeded_and_carries_on(farebox, tmp_path):
    """A terminal state written by the code before the chain (tests/fixtures/journal_v3, made
    as tests/terminal/test_journal_chain.py says): it verifies, its tap left in doubt is
    completed by the daemon, it settles."""
    state = tmp_path / "v3"
    shutil.copytree(FIXTURE_V3, state)
    (state / "identity.key").chmod(0o600)
    verified = farebox("journal", "verify", "--state", state, "--json").json()
    assert (verified["ok"], verified["records"], verified["marks"]) == (True, 7, 10)
    run = farebox("run", "--reader", f"sim:{state / 'card.json'}", "--fare", "1.00",
                  "--max-taps", 1, "--state", state, "--json")
    assert run.code == 0, run.err
    assert farebox("journal", "list", "--state", state, "--json").json()["in_doubt"] == 0
    closed = farebox("batch", "close", "--state", state, "--json").json()
    assert closed["closed"] and closed["held_back"] == 0
    assert farebox("journal", "verify", "--state", state, "--json").json()["ok"]


# ---- a flipped bit ----------------------------------------------------------------------------

@pytest.fixture
def journal_state(farebox, tmp_path) -> tuple[Path, Path]:
    """A real state: taps, one cut off and completed, a batch, a clock reset, an add value."""
    init(farebox)
    card = farebox.card(balance="50.00")
    taps(farebox, card, AT, "2026-11-22T08:05:00+08:00")
    cut = farebox("tap", card, "--fare", "1.00", "--at", "2026-11-22T08:10:00+08:00",
                  "--state", farebox.state, "--leave-after", 4)
    assert cut.code == 1
    farebox("batch", "close", "--state", farebox.state, "--json").json()
    taps(farebox, card, "2026-11-22T08:20:00+08:00")
    farebox.add_value(card, "20.00", at="2026-11-22T08:30:00+08:00").json()
    assert farebox("terminal", "clock", "reset", "--at", "2026-11-22T08:40:00+08:00",
                   "--reason", "test", "--state", farebox.state).code == 0
    assert farebox("journal", "verify", "--state", farebox.state).code == 0
    base = tmp_path / "base"
    shutil.copytree(farebox.state, base)
    shutil.copy(card, base / "card.json")
    assert not (base / "journal.sqlite3-wal").exists() or \
        (base / "journal.sqlite3-wal").stat().st_size == 0
    return base, base / "card.json"


COMMANDS = (("journal", "verify"), ("journal", "show", "3"), ("batch", "close"),
            ("tap", "CARD", "--fare", "1.00", "--at", "2026-11-22T09:00:00+08:00"))


def test_a_flipped_bit_anywhere_is_never_an_internal_error(farebox, journal_state, tmp_path):
    """A bit flipped at offsets drawn with a fixed seed (most in bytes that are in use), each on
    a fresh copy, under every command that opens the journal: exit 0, 2 or 3 with one line,
    never exit 1, never a traceback (a UnicodeDecodeError or a malformed image used to be)."""
    base, card = journal_state
    data = (base / "journal.sqlite3").read_bytes()
    used = [i for i, byte in enumerate(data) if byte]
    rng = random.Random(17)
    offsets = sorted({rng.choice(used) if rng.random() < 0.8 else rng.randrange(len(data))
                      for _ in range(90)} | {0, 18, 28, 100, 105, 4096 + 10})
    seen: dict[str, set] = {}
    for offset in offsets:
        bit = rng.randrange(8)
        for command in COMMANDS:
            state = tmp_path / "flipped"
            shutil.rmtree(state, ignore_errors=True)
            shutil.copytree(base, state)
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            (state / "journal.sqlite3").write_bytes(flipped)
            argv = [str(state / "card.json") if a == "CARD" else a for a in command]
            run = farebox(*argv, "--state", state)
            where = f"{' '.join(command[:2])} with bit {bit} of byte {offset} flipped"
            assert run.code in (0, 2, 3), f"{where}: exit {run.code}: {run.err!r}"
            assert "Traceback" not in run.err and "internal error" not in run.err, \
                f"{where}: {run.err!r}"
            if run.code in (2, 3):  # one line on stderr, or journal verify's own report
                assert run.err.count("\n") == 1 or (
                    command[1] == "verify" and run.err == "" and "BROKEN" in run.out), \
                    f"{where}: {run.out!r} {run.err!r}"
            seen.setdefault(command[0] + " " + command[1], set()).add(run.code)
    assert all(3 in codes for codes in seen.values()), seen  # the flips hit what is read
