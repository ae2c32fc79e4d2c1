"""Reading small files that arrive from outside (card files, action lists, configuration) without
trusting them: regular files only (a FIFO or ``/dev/zero`` is refused without blocking), a size
cap, and JSON whose nesting or numbers cannot exhaust the parser."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a card file is about 1 KiB, a large action list well below this


class UntrustedFileError(ValueError):
    """The file cannot be used; the message is one line naming the path."""


def read_fd_limited(fd: int, path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """All of the regular file open at ``fd`` (at most ``max_bytes``)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedFileError(f"{path}: not a regular file")
    if info.st_size > max_bytes:
        raise UntrustedFileError(f"{path}: larger than {max_bytes} bytes")
    chunks, total = [], 0
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:  # the file grew while being read
            raise UntrustedFileError(f"{path}: larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def open_regular(path: Path) -> int:
    """Open ``path`` read-only without blocking on a FIFO or device; the caller closes the fd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UntrustedFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UntrustedFileError(f"{path}: is a directory") from None
    except OSError as error:
        raise UntrustedFileError(f"{path}: cannot open: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedFileError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_limited(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    path = Path(path)
    fd = open_regular(path)
    try:
        return read_fd_limited(fd, path, max_bytes)
    except OSError as error:
        raise UntrustedFileError(f"{path}: cannot read: {error.strerror}") from None
    finally:
        os.close(fd)


def parse_json(data: bytes, path: Path) -> object:
    """JSON from untrusted bytes: UTF-8 text; deep nesting and huge numbers are errors, not
    crashes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UntrustedFileError(f"{path}: not JSON (not UTF-8 text)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UntrustedFileError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    except RecursionError:
        raise UntrustedFileError(f"{path}: not usable JSON (nested too deeply)") from None
    except ValueError as error:  # e.g. an integer of thousands of digits
        message = " ".join(str(error).split())
        raise UntrustedFileError(f"{path}: not usable JSON ({message})") from None


def load_json(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> object:
    return parse_json(read_limited(path, max_bytes), Path(path))
