"""Simulated card files: read defensively, written atomically, one writer at a time.

A card file is JSON (``idm``, ``pmm``, ``system_code``, ``blocks``; docs/cli.md, "Card files").
:class:`CardFile` holds an exclusive ``flock`` on the file for as long as it is open, so two
processes cannot both transact on one card. Every save writes a temporary file in the same
directory, locks it, fsyncs it and renames it over the card, then fsyncs the directory: a crash
leaves the old card or the new one.

Because a save replaces the file (a new inode), a process waiting for the lock re-checks after
acquiring it that the path still names the file it locked, and starts again if not; the holder
locks each new file before renaming it into place, so the lock passes from inode to inode without
a gap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from farebox.protocol.sim.card import CardFileError, SimulatedCard, card_from_json
from farebox.protocol.files import UntrustedFileError, open_regular, parse_json, read_fd_limited

DEFAULT_LOCK_TIMEOUT_S = 2.0
_LOCK_POLL_S = 0.02


class CardBusy(CardFileError):
    """Another process holds the card file."""


def card_from_bytes(data: bytes, path: Path) -> SimulatedCard:
    try:
        return card_from_json(parse_json(data, path))
    except UntrustedFileError as error:
        raise CardFileError(str(error)) from None
    except CardFileError as error:
        raise CardFileError(f"{path}: {error}") from None


def load_card(path: str | os.PathLike[str]) -> SimulatedCard:
    """Read a card file without locking it (for looking, not for transacting)."""
    path = Path(path)
    try:
        fd = open_regular(path)
    except UntrustedFileError as error:
        raise CardFileError(_card_message(error, path)) from None
    try:
        return card_from_bytes(_read(fd, path), path)
    finally:
        os.close(fd)


def save_card(card: SimulatedCard, path: str | os.PathLike[str]) -> None:
    """Write a card file atomically (no lock: for a file nobody else is using, e.g. a new card)."""
    os.close(_replace(card, Path(path)))


class CardFile:
    """A card file opened for a transaction: locked until :meth:`close`, saved by :meth:`save`.

    ``writable`` checks up front that the directory takes new files, so a card that could not
    be saved is refused before the terminal records any intent.
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = True,
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        self.path = Path(path)
        self._fd: int | None = self._lock(lock_timeout_s)
        try:
            self.card = card_from_bytes(_read(self._fd, self.path), self.path)
            if writable:
                _check_directory_writable(self.path)
        except BaseException:
            self.close()
            raise

    def _lock(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fd = open_regular(self.path)
            except UntrustedFileError as error:
                raise CardFileError(_card_message(error, self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise CardBusy(f"{self.path}: card busy (another process is using it)") from None
                time.sleep(_LOCK_POLL_S)
                continue
            held = os.fstat(fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # the holder replaced the file while we waited: lock the new one

    def save(self) -> None:
        """Replace the file with the card's current contents, keeping the lock."""
        if self._fd is None:
            raise RuntimeError("the card file is closed")
        new_fd = _replace(self.card, self.path)
        old_fd, self._fd = self._fd, new_fd
        os.close(old_fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> CardFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _card_message(error: UntrustedFileError, path: Path) -> str:
    message = str(error)
    return message.replace(": no such file", ": no such card file", 1)


def _read(fd: int, path: Path) -> bytes:
    try:
        return read_fd_limited(fd, path)
    except UntrustedFileError as error:
        raise CardFileError(str(error)) from None
    except OSError as error:
        raise CardFileError(f"{path}: cannot read: {error.strerror}") from None


def _check_directory_writable(path: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as error:
        raise CardFileError(f"{path.parent}: cannot write the card's directory "
                            f"({error.strerror})") from None
    os.close(fd)
    os.unlink(name)


def _replace(card: SimulatedCard, path: Path) -> int:
    """Write ``card`` to a locked temporary file, rename it over ``path``; return its fd, locked."""
    text = json.dumps(card.to_json(), indent=2) + "\n"
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # new and unseen: never blocks
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        os.close(fd)
        raise
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return fd
