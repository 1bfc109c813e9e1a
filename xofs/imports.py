"""Imports: a disk image written into `/srs/<uuid>/import/` becomes a new VDI on that SR.

(Being written: the `ImportManager` below has the interface `xofs.mount` wires in; its behaviour follows.)
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import trio

from xofs.cache import Change, ObjectCache
from xofs.client.rest import RestClient
from xofs.errors import XofsError
from xofs.files import Caller, FileAttrs, ImportEntry, OpenFile


class ImportManager:
    """Serves every import directory of one mount (the `xofs.files.ImportService` contract)."""

    def __init__(self, client: RestClient, cache: ObjectCache, *, state_dir: Path, spool_dir: Path,
                 server_key: str, max_uploads: int = 2, read_only: bool = False,
                 notify: Callable[[str, list[str]], None] = lambda sr, names: None) -> None:
        self.client = client
        self.cache = cache
        self.state_dir = state_dir
        self.spool_dir = spool_dir
        self.server_key = server_key
        self.max_uploads = max_uploads
        self.read_only = read_only
        self.notify = notify

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def on_changes(self, changes: list[Change]) -> None:
        return None

    def entries(self, sr_id: str) -> dict[str, FileAttrs]:
        return {}

    def xattrs(self, entry: ImportEntry) -> dict[str, bytes]:
        return {}

    def dir_mode(self) -> int:
        return 0o500 if self.read_only else 0o700

    async def create(self, entry: ImportEntry, mode: int, caller: Caller, path: str) -> OpenFile:
        raise XofsError(f"{path}: imports are not implemented yet", errno_=errno.ENOSYS)

    async def open(self, entry: ImportEntry, flags: int, caller: Caller, path: str) -> OpenFile:
        raise XofsError(f"{path}: imports are not implemented yet", errno_=errno.ENOSYS)

    async def unlink(self, entry: ImportEntry, path: str) -> None:
        raise XofsError(f"{path}: no such import", errno_=errno.ENOENT)

    async def rename(self, entry: ImportEntry, new_name: str, path: str) -> None:
        raise XofsError(f"{path}: no such import", errno_=errno.ENOENT)

    async def setattr(self, entry: ImportEntry, *, size: int | None, mode: int | None, mtime_ns: int | None,
                      path: str) -> FileAttrs:
        raise XofsError(f"{path}: no such import", errno_=errno.ENOENT)

    async def setxattr(self, entry: ImportEntry, key: str, value: bytes, path: str) -> None:
        raise XofsError(f"{path}: no such import", errno_=errno.ENOENT)
