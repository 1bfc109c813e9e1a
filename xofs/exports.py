"""Reading XO export streams (`.xva`, `.vhd`, `.raw`) through the mount: sizes, read-ahead, spool, limits.

Skeleton: the public API the mount wires in; the implementation follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from xofs.cache import Change, ObjectCache
from xofs.client.rest import RestClient
from xofs.files import FileAttrs, OpenFile
from xofs.views import Export

log = logging.getLogger(__name__)


class ExportManager:
    """The `ExportService` of a mount: one per XO server."""

    def __init__(self, client: RestClient, cache: ObjectCache, *, spool_dir: Path, spool_limit: int = 8 << 30,
                 max_exports: int = 4, readahead: int = 8 << 20,
                 on_size_known: Callable[[Export], None] | None = None) -> None:
        self.client = client
        self.cache = cache
        self.spool_dir = spool_dir
        self.spool_limit = spool_limit
        self.max_exports = max_exports
        self.readahead = readahead
        self.on_size_known = on_size_known

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    def on_changes(self, changes: list[Change]) -> None:
        raise NotImplementedError

    def attrs(self, export: Export) -> FileAttrs:
        raise NotImplementedError

    def xattrs(self, export: Export) -> dict[str, bytes]:
        raise NotImplementedError

    async def open(self, export: Export, path: str) -> OpenFile:
        raise NotImplementedError

    def forget_object(self, obj_id: str) -> None:
        raise NotImplementedError
