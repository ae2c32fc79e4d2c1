"""Files only the terminal's user may read, whatever the umask: the state directory is made 0700
and the journal (with SQLite's ``-wal`` and ``-shm`` beside it, which take the journal's mode) is
0600. A directory that already exists is left as it is (its owner chose its mode)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: Path) -> None:
    """Create ``path`` (and its missing parents) if it is not there; the directory this makes
    is exactly 0700 (mkdir's mode is narrowed by the umask, so it is set again after)."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=DIRECTORY_MODE)
    except FileExistsError:
        return  # made meanwhile (or a file is there: opening the journal says so)
    os.chmod(path, DIRECTORY_MODE)


def private_file(path: Path) -> None:
    """Make the file at ``path`` and its ``-wal``/``-shm`` companions 0600 when they are ours and
    others may read them (a journal made under a loose umask, or by an older farebox)."""
    for candidate in (path, path.with_name(path.name + "-wal"),
                      path.with_name(path.name + "-shm")):
        try:
            info = os.stat(candidate)
        except FileNotFoundError:
            continue
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(candidate, FILE_MODE)
