"""The on-disk spool that serves exports read out of order (XO exports are forward-only, with no Range).

An entry holds the first bytes of one export, written in stream order by the one `ExportFeed` filling it,
read back at any offset by any number of open files. Entries are unlinked temporary files (O_TMPFILE), so
nothing outlives the daemon even when it is killed; the directory is still swept at start and at exit.

A complete entry is kept after its readers close (`qemu-img info` then `qemu-img convert` cost one export),
until XO says the object changed, or until space is needed: the total is kept under `limit` by dropping the
least recently used entries that nobody reads. An incomplete entry nobody reads is dropped at once.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import trio

from xofs.errors import XofsError

log = logging.getLogger(__name__)

FILE_PREFIX = "xofs-export-"


class SpoolFull(XofsError):
    """The spool cannot take more bytes: every entry is in use and the limit is reached."""


class SpoolEntry:
    """The spooled beginning of one export. Only the feed writes it; readers wait for what they need."""

    def __init__(self, spool: Spool, key: str, file: IO[bytes], obj_ids: frozenset[str]) -> None:
        self.spool = spool
        self.key = key
        self.obj_ids = obj_ids  # the XO objects whose change makes this content stale
        self._file = file
        self.written = 0  # bytes on disk (counted in the spool's total from the moment they are reserved)
        self.readable = 0  # bytes readers may use (the feed publishes them once verified)
        self.length: int | None = None  # set once the export ended cleanly: the entry is complete
        self.error: XofsError | None = None  # why the entry will never grow further
        self.users = 0
        self.stale = False  # XO changed the object: serve current readers, never new ones
        self.last_used = time.monotonic()
        self.on_drop: Callable[[], None] | None = None  # stops the feed filling it when the entry is dropped
        self.dropped = False
        self._io = 0  # file operations running in threads: the file is closed once none is left
        self._changed = trio.Event()

    @property
    def complete(self) -> bool:
        return self.length is not None

    # --- the feed's side ---

    async def append(self, data: bytes) -> None:
        """Write the next bytes of the stream (raises SpoolFull when the limit leaves no room)."""
        self.spool.reserve(self, len(data))
        at = self.written
        self.written += len(data)
        await self._in_thread(_pwrite_all, data, at)

    def publish(self, upto: int) -> None:
        """Let readers use the bytes before `upto`."""
        if upto > self.readable:
            self.readable = upto
            self._wake()

    def finish(self, length: int) -> None:
        self.readable = self.length = length
        self._wake()

    def fail(self, error: XofsError) -> None:
        if self.error is None and self.length is None:
            self.error = error
        self._wake()

    # --- the readers' side ---

    async def read(self, offset: int, size: int, deadline: float = math.inf) -> bytes:
        """The bytes at [offset, offset+size), short only at the end of the export. Fails when they do not
        all come within `deadline` seconds of the first (see `ExportFeed.read`)."""
        self.last_used = time.monotonic()
        end = offset + size
        deadline_at = math.inf  # set when the read's first byte comes
        while self.readable < end and self.length is None:
            if self.error is not None:
                raise self.error
            if deadline_at == math.inf and self.readable > offset:
                deadline_at = trio.current_time() + deadline
            if trio.current_time() >= deadline_at:
                raise too_slow(self.key, offset, size, self.readable - offset, deadline)
            with trio.move_on_at(deadline_at):  # woken by every write too
                await self._wait()
        if self.length is not None:
            end = min(end, self.length)
        if end <= offset:
            return b""
        self.last_used = time.monotonic()
        data = await self._in_thread(os.pread, end - offset, offset)
        if len(data) != end - offset:  # the file is ours alone: this cannot happen unless the disk failed
            raise XofsError(f"the spool file of {self.key} gave {len(data)} bytes at {offset}, "
                            f"{end - offset} were written")
        return data

    async def length_beyond(self, n: int) -> int | None:
        """The export's length if it is `n` bytes or fewer; None once it is known to be longer."""
        while self.length is None and self.readable <= n:
            if self.error is not None:
                raise self.error
            await self._wait()
        return self.length if self.length is not None and self.length <= n else None

    async def _wait(self) -> None:
        event = self._changed
        await event.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _in_thread(self, fn: Callable, *args: object) -> bytes | int:
        if self.dropped:
            raise self.error or XofsError(f"the spool entry of {self.key} was dropped")
        self._io += 1
        try:
            return await trio.to_thread.run_sync(fn, self._file.fileno(), *args)
        except OSError as err:
            raise XofsError(f"the spool file of {self.key} in {self.spool.directory}: {err.strerror}") from err
        finally:
            self._io -= 1
            if self.dropped and not self._io:
                self._file.close()

    def drop(self) -> None:
        """Give the file back (once no thread uses it) and fail whoever still waits."""
        self.dropped = True
        self.fail(XofsError(f"the spool entry of {self.key} was dropped"))
        if not self._io:
            self._file.close()


def _pwrite_all(fd: int, data: bytes, at: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
    return len(data)


class Spool:
    """All spool entries of a mount, by export path, in `directory`, at most `limit` bytes in all."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.used = 0
        self._entries: dict[str, SpoolEntry] = {}

    def sweep(self) -> None:
        """Remove what an older daemon may have left (named files, from before O_TMPFILE or a crash)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob(FILE_PREFIX + "*"):
            try:
                path.unlink()
            except OSError as err:
                log.warning("cannot remove the old spool file %s: %s", path, err.strerror)

    def lookup(self, key: str) -> SpoolEntry | None:
        """The entry for an export, unless it is stale or failed."""
        entry = self._entries.get(key)
        if entry is None or entry.stale or entry.error is not None:
            return None
        return entry

    def create(self, key: str, obj_ids: frozenset[str]) -> SpoolEntry:
        old = self._entries.pop(key, None)
        if old is not None:
            old.stale = True
            self._maybe_drop(old)
        self.directory.mkdir(parents=True, exist_ok=True)
        file = tempfile.TemporaryFile(dir=self.directory, prefix=FILE_PREFIX)  # noqa: SIM115 - owned by the entry
        entry = SpoolEntry(self, key, file, obj_ids)
        self._entries[key] = entry
        return entry

    def acquire(self, entry: SpoolEntry) -> None:
        entry.users += 1
        entry.last_used = time.monotonic()

    def release(self, entry: SpoolEntry) -> None:
        entry.users -= 1
        self._maybe_drop(entry)

    def forget_objects(self, obj_ids: set[str]) -> None:
        """XO changed these objects: their entries serve their current readers, then go."""
        for entry in list(self._entries.values()):
            if entry.obj_ids & obj_ids:
                entry.stale = True
                self._maybe_drop(entry)

    def reserve(self, entry: SpoolEntry, n: int) -> None:
        """Count `n` more bytes of `entry`, first dropping least recently used idle entries to make room.

        Raises SpoolFull when even that leaves no room."""
        self._make_room(entry, n)
        self.used += n

    def _make_room(self, entry: SpoolEntry, n: int) -> None:
        if self.used + n <= self.limit:
            return
        idle = sorted((e for e in self._entries.values() if e.users == 0 and e is not entry),
                      key=lambda e: e.last_used)
        for victim in idle:
            log.debug("spool: dropping %s (%d bytes, least recently used) to make room", victim.key, victim.written)
            self._drop(victim)
            if self.used + n <= self.limit:
                return
        raise SpoolFull(f"the export spool in {self.directory} is full ({self.used} of {self.limit} bytes, all "
                        "held by open files): this file can only be read from start to end")

    def close(self) -> None:
        for entry in list(self._entries.values()):
            self._drop(entry)
        self.sweep()

    def _maybe_drop(self, entry: SpoolEntry) -> None:
        if entry.users == 0 and (entry.stale or not entry.complete or entry.error is not None):
            self._drop(entry)

    def _drop(self, entry: SpoolEntry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.on_drop is not None:
            entry.on_drop()
            entry.on_drop = None
        self.used -= entry.written
        entry.drop()

    def __len__(self) -> int:
        return len(self._entries)


def too_slow(label: str, offset: int, size: int, came: int, seconds: float) -> XofsError:
    """A read whose bytes began to come but not all within `seconds`: a stalled or trickling export."""
    return XofsError(f"export {label}: {came} of the {size} bytes of a read at {offset} came in {seconds:g} s: "
                     "XO's export is stalled or too slow (a short answer would end a copy made through the page "
                     "cache there)")
