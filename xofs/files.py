"""The contract between the FUSE adapter and the modules that serve file contents.

`xofs.fs` knows nothing about HTTP: reading an export goes through an `ExportService` (xofs.exports) and
everything inside an import directory through an `ImportService` (xofs.imports). Each open file is an
`OpenFile`; errors are raised as `xofs.errors.XofsError` (which carries the errno and the words for the
log line) and the adapter turns them into `FUSEError`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from xofs.views import Export


@dataclass(frozen=True, slots=True)
class ImportEntry:
    """A node inside an SR's import directory: a file being written, or one already imported."""

    sr_id: str
    name: str


@dataclass
class FileAttrs:
    """What `stat` shows for a file served by a service."""

    size: int
    mtime_ns: int
    mode: int  # permission bits only, e.g. 0o400
    exact: bool = True  # False when `size` is an upper bound (an export not yet read in full)


@dataclass
class OpenInfo:
    """How the kernel should treat an open file (pyfuse3.FileInfo flags)."""

    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made the request: the adapter passes the FUSE request context through."""

    pid: int = 0
    uid: int = 0
    gid: int = 0

    def describe(self) -> str:
        """`pid 1234 (cp)`, the process that made the request, as it was then: for the log and `xofs status`.

        FUSE gives the calling thread's id: a threaded reader (a Go program, a backup agent's worker) is
        named by its process, whose id `ps` knows. The name is the kernel's (15 bytes, which may cut a UTF-8
        character: escaped, never an error); a process already gone is named by its id alone."""
        try:
            with open(f"/proc/{self.pid}/status", "rb") as status:
                pid = next(int(line.split()[1]) for line in status if line.startswith(b"Tgid:"))
            with open(f"/proc/{pid}/comm", "rb") as comm:
                name = comm.read().rstrip(b"\n").decode("utf-8", "backslashreplace")
        except (OSError, ValueError, StopIteration):
            return f"pid {self.pid}"
        return f"pid {pid} ({name})"


class OpenFile(Protocol):
    """One open file. Operations a file does not support raise XofsError with the right errno."""

    info: OpenInfo

    async def read(self, offset: int, size: int) -> bytes | memoryview: ...

    async def write(self, offset: int, data: bytes) -> int: ...

    async def flush(self, caller: Caller) -> None: ...

    async def fsync(self) -> None: ...

    async def release(self) -> None: ...


class ExportService(Protocol):
    def attrs(self, export: Export) -> FileAttrs:
        """Size (exact, or a safe upper bound) and times, with no request to XO."""
        ...

    def xattrs(self, export: Export) -> dict[str, bytes]: ...

    async def open(self, export: Export, path: str, caller: Caller | None = None) -> OpenFile:
        """Open for reading; the export itself starts on the first read, never at open. `caller`: who opened
        it, named in the log and in `xofs status`."""
        ...

    def forget_object(self, obj_id: str) -> None:
        """An event said the object's content may have changed: drop remembered exact sizes."""
        ...


class ImportService(Protocol):
    def entries(self, sr_id: str) -> dict[str, FileAttrs]:
        """The files shown in the SR's import directory."""
        ...

    def xattrs(self, entry: ImportEntry) -> dict[str, bytes]: ...

    def open_attrs(self, file: OpenFile) -> FileAttrs | None:
        """The attributes of an open file of this service, even once its entry is gone (failed, removed):
        `fstat` of a descriptor still open must keep working, as on any filesystem."""
        ...

    def dir_mode(self) -> int:
        """Permission bits of import directories (0o700, or 0o500 on a read-only mount)."""
        ...

    async def create(self, entry: ImportEntry, mode: int, caller: Caller, path: str) -> OpenFile: ...

    async def open(self, entry: ImportEntry, flags: int, caller: Caller, path: str) -> OpenFile: ...

    async def unlink(self, entry: ImportEntry, path: str) -> None: ...

    async def rename(self, entry: ImportEntry, new_name: str, path: str) -> None: ...

    async def setattr(self, entry: ImportEntry, *, size: int | None, mode: int | None,
                      mtime_ns: int | None, path: str) -> FileAttrs: ...

    async def setxattr(self, entry: ImportEntry, key: str, value: bytes, path: str) -> None: ...
