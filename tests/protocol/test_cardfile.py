"""Card files: atomic saves, defensive loading, one writer at a time (flock)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from farebox.protocol.frames import SERVICE_LITE_S_RW, BlockListElement, WriteWithoutEncryption
from farebox.protocol.sim.card import CardFileError, Faults, SimulatedLiteS
from farebox.protocol.sim.cardfile import CardBusy, CardFile, load_card, save_card

IDM = bytes.fromhex("0102030405060708")
NEW = bytes([0xEE]) * 16


def make_card(**kwargs):
    return SimulatedLiteS(IDM, blocks=[bytes([number]) * 16 for number in range(14)], **kwargs)


def write(card, block_number, data=NEW):
    frame = WriteWithoutEncryption(IDM, (SERVICE_LITE_S_RW,), (BlockListElement(block_number),),
                                   (data,)).to_frame()
    return card.respond(frame)


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "card.json"
    card = make_card()
    card.blocks[3] = NEW
    save_card(card, path)
    assert json.loads(path.read_text()) == card.to_json()
    assert load_card(path).to_json() == card.to_json()
    assert [entry.name for entry in tmp_path.iterdir()] == ["card.json"]


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "card.json"
    save_card(make_card(), path)
    card = load_card(path)
    write(card, 0)
    save_card(card, path)
    assert load_card(path).blocks[0] == NEW


def test_on_write_can_persist_each_landed_block(tmp_path):
    path = tmp_path / "card.json"
    card = make_card(faults=Faults(tear_write_number=2), on_write=lambda c: save_card(c, path))
    write(card, 6)
    assert load_card(path).blocks[6] == NEW
    write(card, 7)
    assert load_card(path).blocks[7] == NEW[:8] + b"\x07" * 8


def _card_json(**changes):
    obj = make_card().to_json()
    obj.update(changes)
    return json.dumps({key: value for key, value in obj.items() if value is not None})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such card file"),
        ("{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[]", "expected a JSON object"),
        (_card_json(idm=None), "missing key 'idm'"),
        (_card_json(idm="zz02030405060708"), "'idm' is not hex"),
        (_card_json(idm="01020304050607"), "'idm' must be 8 bytes"),
        (_card_json(pmm=1234), "'pmm' must be a hex string"),
        (_card_json(system_code="88b400"), "'system_code' must be 2 bytes"),
        (_card_json(blocks=["00" * 16] * 13), "'blocks' must be a list of 14"),
        (_card_json(blocks=["00" * 16] * 13 + ["00" * 15]), "'blocks[13]' must be 16 bytes"),
        (_card_json(blocks=["00" * 16] * 13 + [None]), "'blocks[13]' must be a hex string"),
    ],
)
def test_load_card_errors_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "card.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(CardFileError) as raised:
        load_card(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message


def test_load_card_of_a_directory_is_a_card_file_error(tmp_path):
    with pytest.raises(CardFileError, match="not a regular file"):
        load_card(tmp_path)


# ---- hostile files: refused quickly, never read whole, never blocking ---------------------------

@pytest.mark.parametrize("make", ["fifo", "dev_zero", "huge", "deep", "digits", "directory"])
def test_hostile_card_files_are_refused_fast(tmp_path, make):
    path = tmp_path / "card.json"
    if make == "fifo":
        os.mkfifo(path)  # opening it for reading would block until a writer came
    elif make == "dev_zero":
        path = "/dev/zero"
    elif make == "huge":
        path.write_bytes(b" " * (1 << 20) + b"{}")
    elif make == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif make == "digits":
        path.write_text('{"idm": ' + "9" * 5000 + "}")
    else:
        path.mkdir()
    start = time.monotonic()
    with pytest.raises(CardFileError) as raised:
        CardFile(path)
    assert time.monotonic() - start < 5  # generous: the point is "does not hang"
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def test_a_card_file_that_grew_past_the_limit_while_open_is_refused(tmp_path):
    path = tmp_path / "card.json"
    path.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(CardFileError, match="larger than"):
        load_card(path)


# ---- one writer per card ------------------------------------------------------------------------

def test_a_second_open_waits_then_says_card_busy(tmp_path):
    path = tmp_path / "card.json"
    save_card(make_card(), path)
    with CardFile(path):
        start = time.monotonic()
        with pytest.raises(CardBusy, match="card busy"):
            CardFile(path, lock_timeout_s=0.3)
        assert time.monotonic() - start >= 0.3


def test_the_lock_survives_saves_that_replace_the_file(tmp_path):
    """A save renames a new file over the card; the lock must move with it, or a process that
    opens the path after the save would find the new file unlocked."""
    path = tmp_path / "card.json"
    save_card(make_card(), path)
    with CardFile(path) as held:
        write(held.card, 6)
        held.save()
        held.save()
        with pytest.raises(CardBusy):
            CardFile(path, lock_timeout_s=0.1)
    with CardFile(path, lock_timeout_s=0.1) as again:  # released on close
        assert again.card.blocks[6] == NEW


def test_a_waiter_gets_the_card_as_the_holder_left_it(tmp_path):
    """The waiter blocked on the old file must not read it: it re-opens the path it finds."""
    path = tmp_path / "card.json"
    save_card(make_card(), path)
    seen = []
    holder = CardFile(path)

    def wait():
        with CardFile(path, lock_timeout_s=5) as waiter:
            seen.append(waiter.card.blocks[6])

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    write(holder.card, 6)
    holder.save()
    time.sleep(0.1)
    holder.close()
    thread.join(5)
    assert seen == [NEW]


_LOCK_AND_WRITE = """
import sys, time
from farebox.protocol.sim.cardfile import CardBusy, CardFile
try:
    with CardFile(sys.argv[1], lock_timeout_s=float(sys.argv[2])) as held:
        print("locked", flush=True)
        time.sleep(float(sys.argv[3]))
except CardBusy:
    print("busy", flush=True)
"""


def test_two_processes_one_card(tmp_path):
    path = tmp_path / "card.json"
    save_card(make_card(), path)
    first = subprocess.Popen([sys.executable, "-c", _LOCK_AND_WRITE, str(path), "1", "1.5"],
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "locked"
    second = subprocess.run([sys.executable, "-c", _LOCK_AND_WRITE, str(path), "0.2", "0"],
                            capture_output=True, text=True, timeout=30)
    assert second.stdout.strip() == "busy"
    first.wait(30)
    third = subprocess.run([sys.executable, "-c", _LOCK_AND_WRITE, str(path), "0.2", "0"],
                           capture_output=True, text=True, timeout=30)
    assert third.stdout.strip() == "locked"


_OPEN_FOR_WRITING = """
import sys
from farebox.protocol.sim.cardfile import CardFile, load_card
from farebox.protocol.sim.card import CardFileError
load_card(sys.argv[1])  # looking is fine
try:
    CardFile(sys.argv[1])
except CardFileError as error:
    print(error)
"""


def without_root_powers(argv: list[str]) -> list[str]:
    """``argv`` run so that file permissions bind (root overrides them through capabilities)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to run this test as root")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner",
            "--inh-caps=-all", "--", *argv]


def test_a_directory_that_takes_no_new_files_is_refused_before_use(tmp_path):
    """The card file opens for looking but not for a transaction, since no save could land."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    try:
        path = str(folder / "card.json")
        save_card(make_card(), path)
        folder.chmod(0o555)
        done = subprocess.run(without_root_powers([sys.executable, "-c", _OPEN_FOR_WRITING, path]),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "cannot write the card's directory" in done.stdout
    finally:
        folder.chmod(0o700)
