"""The on-disk spool that holds a file being imported until it is uploaded.

XO needs the whole length before the first byte (Content-Length, xo-api.md §1.5), and writers may write
anywhere (qemu-img writes the block table after the data), so every import is written to a local file
first and never held in memory. A spool is named after the daemon's pid: spools of a daemon that died
are removed when a daemon starts (`clean_stale_spools`), those of a live one are left alone.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".spool"


class Spool:
    """One import's bytes in a local file. Reads and writes are plain syscalls on the trio thread: they
    hit the page cache, and a thread hop per 128 KiB write would cost more than the write."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{os.getpid()}-{uuid.uuid4().hex}{SUFFIX}"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.size = 0

    def write(self, offset: int, data: bytes) -> int:
        written = os.pwrite(self._require_fd(), data, offset)
        self.size = max(self.size, offset + written)
        return written

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._require_fd(), size, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._require_fd(), size)
        self.size = size

    def has_data(self) -> bool:
        """Whether any byte of the file is stored: a file only truncated to its size (qemu-img's empty raw
        image) holds none. True where the filesystem cannot tell (SEEK_DATA unsupported)."""
        try:
            os.lseek(self._require_fd(), 0, os.SEEK_DATA)
        except OSError as err:
            return err.errno != errno.ENXIO
        return True

    def remove(self) -> None:
        """Delete the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)

    @property
    def removed(self) -> bool:
        return self._fd is None

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"spool {self.path} was removed")
        return self._fd


def clean_stale_spools(directory: Path) -> int:
    """Remove spools left by daemons that are no longer running; returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.endswith(SUFFIX):
            continue
        pid_text = name.split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _is_xofs(int(pid_text)):
            continue
        try:
            (directory / name).unlink()
            removed += 1
        except OSError as err:
            log.warning("cannot remove the stale import spool %s: %s", directory / name, err.strerror)
    return removed


def _is_xofs(pid: int) -> bool:
    """Whether `pid` is a running xofs daemon (a pid reused by another program does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"xofs" in f.read()
    except OSError:
        return False
