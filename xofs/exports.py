"""Reading XO exports (`.xva`, `.vhd`, `.raw`) through the mount: sizes, streaming, spooling, limits.

`ExportManager` is the mount's `ExportService` (xofs.files). It does no I/O for `stat` or `open`: an export
starts on the first read of an open file (never a HEAD: on XO that starts a real export) and is cancelled
when the file is released. What a read is served from:

- a sequential reader (cp, cat, dd, rsync, tar, sha256sum) from the memory window of its own export
  (xofs.export_stream), forward skips and small backward seeks included;
- a reader that jumps (qemu-img) from the spool (xofs.spool): the export goes on into a local file, filled
  in stream order, and every read waits for its bytes there. If the window had already dropped bytes, the
  export is restarted into the spool and checked against the hash of what the first one delivered;
- an export already spooled in full (and unchanged since, as far as XO's events say) from that spool alone.

At most `max_exports` exports run at once (xofs.export_stream.ExportSlots); a reader that waits may park
an export whose reader went quiet, which restarts, checked the same way, when that reader comes back.

Sizes: `.raw` is exact (the VDI's `size`). The others are exact once a full read measured them (until an
event says the object or one of its disks changed), and until then a safe upper bound (xofs.export_sizes).
A read that reaches the size shown waits to see where the stream ends: the size is corrected when it was a
bound, and a stream longer than the size shown fails the read (EIO) rather than let a reader that trusts
`st_size` (rsync, tar) stop short without noticing.

Failures are `XofsError`s naming the file, the export, the offset and XO's words: a vanished object is
ENOENT, a refused token EACCES, a broken stream EIO. A broken stream is never silently resumed.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import trio

from xofs.cache import Change, ObjectCache
from xofs.client.export import ExportResponse, without_url
from xofs.client.rest import DISK_TYPES, RestClient
from xofs.client.upload import IMPORT_MARK
from xofs.errors import XofsError, XoProtocolError
from xofs.export_checks import check_for
from xofs.export_sizes import (
    BOUND_MARGIN,
    UNKNOWN_DISK,
    compressed_bound,
    compression_of,
    vhd_bound,
    vm_disks,
    xva_bound,
)
from xofs.export_stream import MIN_READAHEAD, RECEIVE, ExportFeed, ExportSlots, ReceiveBuffers
from xofs.files import Caller, FileAttrs, OpenInfo
from xofs.spool import Spool, SpoolEntry
from xofs.views import Export

log = logging.getLogger(__name__)
T = TypeVar("T")

BACK_WINDOW = 1 << 20  # bytes kept behind a reader for small backward seeks (mountpoint-s3 keeps 1 MiB too)
SKIP_LIMIT = 16 << 20  # a later forward jump up to this far is received and dropped; further ones spool
LIVE_POWER_STATES = frozenset({"Running", "Paused"})  # a VM in these may change its disks without an event
BUFFERS_IDLE = 60.0  # seconds without a running export after which the receive buffers are unmapped

VM_TYPES = frozenset({"VM", "VM-snapshot"})


class ExportReadError(XofsError):
    """A read of an export file failed; the message names the file, the export, the offset and why."""


class ExportManager:
    """The `ExportService` of one mount: sizes, the export slots and the spool of one XO server."""

    def __init__(self, client: RestClient, cache: ObjectCache, *, spool_dir: Path, spool_limit: int = 8 << 30,
                 max_exports: int = 4, readahead: int = 8 << 20,
                 on_size_known: Callable[[Export], None] | None = None, park_idle_after: float = 10.0,
                 buffers_idle: float = BUFFERS_IDLE, on_bounds_changed: Callable[[str], None] | None = None,
                 read_deadline: float = 120.0) -> None:
        self.client = client
        self.cache = cache
        self.spool = Spool(spool_dir, spool_limit)
        self.max_exports = max_exports
        self.readahead = max(readahead, MIN_READAHEAD)
        # Called when a file's size changed without an XO event: measured, or found wrong. The mount
        # invalidates the kernel's attributes of that file.
        self.on_size_known = on_size_known
        # Called when the size bounds of an object's exports changed through an event about another object
        # (a VM's .xva when one of its disks grew): the mount invalidates the attributes of its export files.
        self.on_bounds_changed = on_bounds_changed
        # How long a read may wait for the rest of its bytes once some came (then it fails: `too_slow`): bounds
        # the time a reader spends in the kernel, unkillable, on a stream that trickles.
        self.read_deadline = read_deadline
        self.slots = ExportSlots(max_exports, park_idle_after)
        # As many buffers as the exports' windows can span together: each read-ahead + BACK_WINDOW, and a
        # buffer at each end and one being filled.
        self.buffers = ReceiveBuffers(RECEIVE, max_exports * ((self.readahead + BACK_WINDOW) // RECEIVE + 3))
        self.buffers_idle = buffers_idle
        self._measured: dict[str, int] = {}  # export path -> length of a complete export
        self._measured_of: dict[str, dict[str, Export]] = {}  # object id -> its exports in _measured, by path
        self._xva_bounds: dict[str, int] = {}  # VM id -> size bound of its plain XVA
        self._generation: dict[str, int] = {}  # object id -> count of changes seen, to spot races
        self._nursery: trio.Nursery | None = None
        self.exports_started = 0  # for status lines and tests
        self.cut_by_stop: list[str] | None = None  # what the stop signal found under way (`stop_starting`)
        self._started_ns = time.time_ns()  # the time of files whose object has not changed since
        self.open_files: set[ExportFile] = set()  # for `transfers()`

    # --- life ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the export tasks; sweep the spool at start and when the mount ends."""
        self.spool.sweep()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._unmap_idle_buffers()
        finally:
            self._nursery = None
            self.spool.close()

    async def _unmap_idle_buffers(self) -> None:
        """Give the receive buffers back to the system once no export has run for `buffers_idle` seconds:
        kept, they would hold the daemon up to 56 MiB larger for good after a burst of exports."""
        while True:
            quiet_for = trio.current_time() - self.slots.quiet_since
            if self.slots.holders or quiet_for < self.buffers_idle:
                await trio.sleep(max(self.buffers_idle - quiet_for, 0) + self.buffers_idle / 10)
                continue
            unmapped = self.buffers.unmap_free()
            if unmapped:
                log.debug("unmapped %d idle receive buffers (%d MiB)", unmapped, unmapped * RECEIVE >> 20)
            await trio.sleep(self.buffers_idle)

    def on_changes(self, changes: list[Change]) -> None:
        """Forget what XO's events say may be out of date: for a VM its disks too, for a disk its VMs. The
        end of an import into a disk is no change of its bytes: see `_import_marks_gone`."""
        ids: set[str] = set()
        for change in changes:
            if not _import_marks_gone(change):
                ids.add(change.obj_id)
            for obj in (change.old, change.new):
                if obj is not None:
                    ids.update(self._related(change.type, obj))
        for obj_id in ids:
            self.forget_object(obj_id)
        for change in changes:
            if change.new is None and self.cache.get(change.obj_id) is None:
                # Gone from XO: its count goes too, or a long mount would keep one for every task, message
                # and snapshot XO ever made and removed. No file of it measures any more (`measured`).
                self._generation.pop(change.obj_id, None)

    def forget_object(self, obj_id: str) -> None:
        self._generation[obj_id] = self._generation.get(obj_id, 0) + 1
        if self._xva_bounds.pop(obj_id, None) is not None and self.on_bounds_changed is not None:
            self.on_bounds_changed(obj_id)
        for path, export in self._measured_of.pop(obj_id, {}).items():
            if self._measured.pop(path, None) is not None:
                self.size_changed(export)  # a disk's size changes with an event about its VM, and back
        self.spool.forget_objects({obj_id})

    def _related(self, type_: str, obj: dict) -> set[str]:
        """Objects whose exports contain (or are contained in) `obj`'s: via VBDs, both ways."""
        related: set[str] = set()
        if type_ in VM_TYPES or type_ in DISK_TYPES:
            vbds = obj.get("$VBDs")
            for vbd_id in vbds if isinstance(vbds, list) else []:
                vbd = self.cache.get(vbd_id) if isinstance(vbd_id, str) else None
                if vbd is not None:
                    related.update(v for v in (vbd.get("VDI"), vbd.get("VM")) if isinstance(v, str))
        elif type_ == "VBD":
            related.update(v for v in (obj.get("VDI"), obj.get("VM")) if isinstance(v, str))
        if isinstance(obj.get("suspendVdi"), str):
            related.add(obj["suspendVdi"])
        return related

    # --- sizes ---

    def size_of(self, export: Export, obj: dict | None = None) -> tuple[int, str]:
        """The size to show and where it comes from: `xo` (exact by format), `measured`, or `bound`.
        `obj` is the export's object when the caller has it at hand."""
        if export.exact_size is not None:
            return export.exact_size, "xo"
        measured = self._measured.get(export.path) if self._measured else None
        if measured is not None:
            return measured, "measured"
        obj = obj if obj is not None else self.cache.get(export.obj_id) or {}
        return self._bound(export, obj) + BOUND_MARGIN, "bound"

    def _bound(self, export: Export, obj: dict) -> int:
        if export.fmt in ("vhd", "raw"):
            size = obj.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                size = UNKNOWN_DISK
            return vhd_bound(size) if export.fmt == "vhd" else size
        if export.fmt == "xva":
            # Kept per VM until an event about it or one of its disks (`forget_object`): `ls -l /vms` asks
            # for three of these per VM (plain, zstd, gzip), and working one out walks the VM's disks.
            bound = self._xva_bounds.get(export.obj_id)
            if bound is None:
                bound = self._xva_bounds[export.obj_id] = xva_bound(*vm_disks(obj, self.cache.get))
            method = compression_of(export.query)
            return compressed_bound(bound, method) if method else bound
        log.warning("no size bound is known for the export format %r; showing %d", export.fmt, UNKNOWN_DISK)
        return UNKNOWN_DISK

    def measured(self, export: Export, length: int, generation: tuple[int, ...]) -> None:
        """A complete export of `export` was `length` bytes: show that from now on (unless XO changed it)."""
        if export.exact_size is not None or generation != self._generations(export):
            return
        if self.cache.get(export.obj_id) is None:  # deleted while the stream ended: nothing to show it for
            return
        if self._measured.get(export.path) == length:
            return
        self._measured[export.path] = length
        self._measured_of.setdefault(export.obj_id, {})[export.path] = export
        log.debug("export %s measured: %d bytes", export.path, length)
        self.size_changed(export)

    def unmeasure(self, export: Export, wrong: int) -> None:
        """The measured length `wrong` turned out wrong: go back to the bound (unless it was replaced already)."""
        if self._measured.get(export.path) == wrong:
            del self._measured[export.path]
            self._measured_of.get(export.obj_id, {}).pop(export.path, None)
            self.size_changed(export)

    def size_changed(self, export: Export) -> None:
        if self.on_size_known is not None:
            try:
                self.on_size_known(export)
            except Exception:  # the kernel keeps an old size a little longer; reads stay correct
                log.exception("invalidating the size of %s failed", export.path)

    def _generations(self, export: Export) -> tuple[int, ...]:
        obj = self.cache.get(export.obj_id) or {}
        type_ = obj.get("type", "")
        ids = sorted({export.obj_id} | self._related(type_, obj))
        return tuple(self._generation.get(i, 0) for i in ids)

    def live(self, export: Export) -> bool:
        """Whether the export's bytes may change without an XO event: a running or paused VM's export (each
        one is of a new snapshot), or a disk such a VM has plugged in (written to as it runs). Such an
        export is never parked (its restart could not match) and a complete spool copy of it is never
        served to a later open (it could be arbitrarily old)."""
        obj = self.cache.get(export.obj_id) or {}
        if obj.get("type") == "VM":
            return obj.get("power_state") in LIVE_POWER_STATES
        if obj.get("type") != "VDI":
            return False  # snapshots do not change
        vms = (self.cache.get(i) for i in self._related("VDI", obj))  # its VBDs' VMs (and itself)
        return any(vm is not None and vm.get("type") == "VM" and vm.get("power_state") in LIVE_POWER_STATES
                   for vm in vms)

    def spooled_copy(self, export: Export) -> SpoolEntry | None:
        """A spool entry of `export` a new open may read from: not for a live export (`live`)."""
        return None if self.live(export) else self.spool.lookup(export.url_path)

    def _objects_of(self, export: Export) -> frozenset[str]:
        obj = self.cache.get(export.obj_id) or {}
        return frozenset({export.obj_id} | self._related(obj.get("type", ""), obj))

    # --- ExportService ---

    def attrs(self, export: Export) -> FileAttrs:
        obj = self.cache.get(export.obj_id)
        if obj is None:
            raise XofsError(f"{export.path}: XO has no object {export.obj_id} any more", object_id=export.obj_id,
                            errno_=errno.ENOENT)
        size, source = self.size_of(export, obj)
        changed = self.cache.changed_at.get(export.obj_id)
        return FileAttrs(size=size, mtime_ns=int(changed * 1e9) if changed else self._started_ns, mode=0o400,
                         exact=source != "bound")

    def xattrs(self, export: Export) -> dict[str, bytes]:
        _, source = self.size_of(export)
        return {"user.xo.size_exact": b"false" if source == "bound" else b"true"}

    async def open(self, export: Export, path: str, caller: Caller | None = None) -> ExportFile:
        if self.cache.get(export.obj_id) is None:
            raise XofsError(f"{path}: XO has no object {export.obj_id} any more", object_id=export.obj_id,
                            errno_=errno.ENOENT)
        file = ExportFile(self, export, path, caller.describe() if caller is not None else "")
        self.open_files.add(file)
        return file

    def stop_starting(self) -> None:
        """The mount is stopping: no export starts any more (readers waiting for a slot fail), and those
        running are cancelled, so that a read waiting for their bytes (a slow or stalled stream) fails now
        instead of holding up the stop, its reader unkillable meanwhile."""
        self.cut_by_stop = self.under_way()  # before the cancels below make them "failed"
        self.slots.stop()
        for feed in list(self.slots.holders):
            feed.cancel("the mount is stopping")

    def under_way(self) -> list[str]:
        """The files whose export neither ended nor failed: what a stop now cuts."""
        return sorted(t["path"] for t in self.transfers() if not t["complete"] and t["phase"] != "failed")

    def transfers(self) -> list[dict]:
        """The exports under way, for `xofs status`: one per open file that started reading. `done` counts
        the bytes received from XO, `read` the reader's position, `complete` whether XO sent the whole
        export, `elapsed` the seconds since the open; `phase` is "starting" while a read waits for its export
        to start (a slot, XO's answer), "failed" for one that broke off (a next read may start it again)."""
        now = time.monotonic()
        out = []
        for file in self.open_files:
            if file.entry is not None:
                phase, received, complete = "spooling", file.entry.written, file.entry.complete
                failed = file.entry.error is not None
            elif file.feed is not None:
                phase, received, complete = "streaming", file.feed.received, file.feed.length is not None
                failed = file.feed.error is not None
            elif file.starting:
                phase, received, complete, failed = "starting", 0, False, False
            else:
                continue
            if failed and not complete:
                phase = "failed"
            size, basis = self.size_of(file.export)
            out.append({"kind": "export", "path": file.path, "export": file.export.url_path,
                        "phase": phase, "done": received, "read": file.position, "size": size,
                        "size_exact": basis != "bound", "complete": complete, "elapsed": now - file.opened,
                        "opener": file.opener})
        return out

    # --- starting exports ---

    def _feed(self, export: Export, *, verify: tuple[int, bytes] | None = None,
              spool: SpoolEntry | None = None, resume_at: int = 0, resuming: bool = False) -> ExportFeed:
        async def open_response() -> ExportResponse:
            self.exports_started += 1
            log.debug("export %s: starting", export.url_path)
            response = await self.client.open_export(export.path)
            if response.close_delimited and export.exact_size is None:
                # Where no size checks the length (a .vhd, an .xva), a cut that closes the connection cleanly
                # would be copied short with exit status 0 and its length learnt as exact: refused.
                await response.aclose()
                raise XoProtocolError(f"{response.url} answered the export with neither chunked framing nor a "
                                      "length, so a cut could not be told from its end (a proxy in between that "
                                      "rewrites XO's answers?)", object_id=export.obj_id)
            return response

        return ExportFeed(export.url_path, open_response, self.slots, self.buffers, readahead=self.readahead,
                          back_window=BACK_WINDOW, verify=verify, spool=spool, resume_at=resume_at,
                          repeatable=not self.live(export), resuming=resuming,
                          check=check_for(export.url_path, export.fmt, compression_of(export.query)))

    async def _start(self, feed: ExportFeed) -> None:
        if self._nursery is None:
            raise XofsError("the export service is not running", errno_=errno.EIO)
        await self._nursery.start(feed.run)

    async def stream(self, export: Export, verify: tuple[int, bytes] | None = None,
                     resume_at: int = 0, resuming: bool = False) -> ExportFeed:
        """Start an export read from memory; returns once XO answered 200 (raises its refusal).

        With `verify`, its start must hash as an earlier export did, and reading resumes at `resume_at`;
        `resuming`: it restarts a parked export."""
        feed = self._feed(export, verify=verify, resume_at=resume_at, resuming=resuming)
        await self._start(feed)
        return feed

    async def spooled(self, export: Export, verify: tuple[int, bytes] | None = None) -> SpoolEntry:
        """A spool entry for `export` (acquired by the caller): the one there is, or a new export into one."""
        entry = self.spooled_copy(export)
        if entry is not None and verify is None:
            self.spool.acquire(entry)
            return entry
        entry = self.spool.create(export.url_path, self._objects_of(export))
        self.spool.acquire(entry)
        feed = self._feed(export, verify=verify, spool=entry)
        entry.on_drop = feed.cancel
        try:
            await self._start(feed)
        except BaseException:
            self.spool.release(entry)
            raise
        return entry

    def divert(self, export: Export, feed: ExportFeed) -> SpoolEntry:
        """Move a running memory export into a new spool entry (acquired by the caller)."""
        entry = self.spool.create(export.url_path, self._objects_of(export))
        self.spool.acquire(entry)
        entry.on_drop = feed.cancel
        feed.divert(entry)
        return entry


def _import_marks_gone(change: Change) -> bool:
    """Whether `change` only takes an import's `xo:import:*` marks off a disk. XO does that after the
    import's task succeeded and after it answered the upload (`import-raw-4MiB.ws-frames.jsonl`: 0.2 s
    later): the disk's bytes were final before, and a length measured since (an `rsync` right after the
    import) still holds. The disk's VMs are forgotten all the same: an XVA holds its disks' records."""
    if change.type not in DISK_TYPES or change.old is None or change.new is None:
        return False
    if change.changed_fields() != {"other_config"}:
        return False
    before, after = change.old.get("other_config"), change.new.get("other_config")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return False
    marks = {k for k in before if isinstance(k, str) and k.startswith(IMPORT_MARK)}
    return bool(marks) and after == {k: v for k, v in before.items() if k not in marks}


class ExportFile:
    """One open export file (an `OpenFile`). Reads come one at a time from the kernel for one reader."""

    def __init__(self, manager: ExportManager, export: Export, path: str, opener: str = "") -> None:
        self.manager = manager
        self.export = export
        self.path = path
        self.opener = opener  # who opened it (`pid 1234 (cp)`), for the log: what starts exports in XO
        self.info = OpenInfo(direct_io=True, keep_cache=False)
        self.feed: ExportFeed | None = None  # reading from memory
        self.entry: SpoolEntry | None = None  # reading from the spool
        self.generation = manager._generations(export)
        self._shown_at_open = manager.size_of(export)
        self.position = 0  # end of the last read, for log lines
        self.first_read: int | None = None  # where the first read began, for log lines
        self.read_start = False  # a read began at offset 0 (see `_positioned_end`)
        self.opened = time.monotonic()
        self.starting = False  # a read waits for an export to start (a slot, XO's answer): `xofs status`
        # Once an export of this file was dropped, any next one must match what it delivered.
        self._verify: tuple[int, bytes] | None = None
        self._resume_at = 0  # where the reader of a parked export was
        self.released = False
        self._lock = trio.Lock()  # the kernel may send reads of one file concurrently: take them in turn
        self._failure: str | None = None  # why the last read failed (None once a read succeeded)
        self._repeats = 0  # reads since the one logged that failed the same way (logged at debug level)

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        try:
            self._lock.acquire_nowait()  # the usual case, without the scheduling round of `acquire`
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            if self.manager.cache.get(self.export.obj_id) is None:
                # XO said the object is gone: what is still buffered must not make a copy look complete.
                raise XofsError("the XO object was deleted while it was being read",
                                errno_=errno.ENOENT)
            exact = self.export.exact_size
            if exact is not None and offset >= exact:
                data = b""  # past the end of a file whose length is known: no export for that
            else:
                source = await self._source(offset, size)
                data = await source.read(offset, size, self.manager.read_deadline)  # short only at the end
                await self._check_end(source, offset, size)
                if not data and source.length is not None and offset > source.length:
                    self._beyond_end(offset, source.length)
                past_end = source.length is not None and offset + size > source.length  # asked for more
                if past_end and not self.read_start and offset > 0:
                    self._positioned_end(offset if self.first_read is None else self.first_read, source.length)
        except ExportReadError:
            raise
        except XofsError as err:
            raise self._error(err, offset) from None
        finally:
            self._lock.release()
        self.position = offset + len(data)
        if self.first_read is None:
            self.first_read = offset
        self.read_start = self.read_start or offset == 0
        if self._failure is not None:  # a later failure, even the same one, is a new incident
            self._count_repeats()
            self._failure = None
        return data

    async def _source(self, offset: int, size: int) -> ExportFeed | SpoolEntry:
        if self.released:
            raise XofsError("the file was closed")
        if self.entry is not None:
            return self.entry
        feed = self.feed
        resuming = False
        if feed is not None and feed.parked:
            # It gave its slot to another reader: restart it, checked against what it had received.
            self._verify, self._resume_at = feed.digest(), feed.reader_pos
            self.feed = feed = None
            resuming = True
        if feed is not None:
            if feed.error is not None:
                # A broken export is not resumed (its bytes could not all be checked), but what it received
                # before it broke is its bytes: a reader of the start (`head`, `file`) still gets them.
                if feed.verified and feed.window_start <= offset and offset + size <= feed.received:
                    return feed
                raise feed.error
            if feed.length is not None and feed.window_start <= offset:
                return feed  # the whole rest of the export is in memory
            # A jump forward before anything was dropped is how random readers start (qemu-img, file):
            # spool now, while that costs no second export. Later, short skips are received and dropped.
            jump = feed.window_start == 0 and offset > feed.reader_pos
            if not jump and feed.can_serve(offset, SKIP_LIMIT):
                return feed
            if feed.can_serve(offset, offset) and offset >= self.manager.spool.limit:
                return feed  # a skip further than the spool could hold: receive and drop
            if feed.window_start == 0:
                log.debug("%s: read at %d out of order; spooling the export from here on", self.path, offset)
                self.entry = self.manager.divert(self.export, feed)
            else:
                where = "behind what the export still holds" if offset < feed.window_start else "too far ahead"
                log.info("%s: read at %d is %s (it holds %d-%d); restarting the export into the spool, "
                         "checked against the %d bytes received", self.path, offset, where, feed.window_start,
                         feed.received, feed.received)
                self._verify = feed.digest()
                feed.cancel()
                self.feed = None
                self.entry = await self._started(self.manager.spooled(self.export, self._verify))
            self.feed = None
            return self.entry
        if self._verify is not None and offset >= self._resume_at - BACK_WINDOW:
            self.feed = await self._started(self.manager.stream(self.export, self._verify, self._resume_at,
                                                                resuming))
            return self.feed
        entry = self.manager.spooled_copy(self.export)
        # A first read at 0 is sequential; one elsewhere is random access, unless too far for the spool.
        if entry is not None or 0 < offset < self.manager.spool.limit or self._verify is not None:
            self.entry = await self._started(self.manager.spooled(self.export, self._verify))
            return self.entry
        self.feed = await self._started(self.manager.stream(self.export))
        return self.feed

    async def _started(self, starting: Awaitable[T]) -> T:
        """`starting` awaited, the file shown meanwhile as waiting for its export to start."""
        self.starting = True
        try:
            return await starting
        finally:
            self.starting = False

    async def _check_end(self, source: ExportFeed | SpoolEntry, offset: int, size: int) -> None:
        """Where the read meets the end of the stream or a size the reader may rely on, make sure they agree.

        The reader may have seen the size shown when it opened the file or the one shown now (a complete
        export of another open may have measured it meanwhile): a stream longer than either fails the read
        that reaches it, since rsync or tar would stop there and call the copy complete.
        """
        sizes = {self._shown_at_open, self.manager.size_of(self.export)}
        too_long = [(shown, basis) for shown, basis in sizes
                    if offset + size >= shown and await source.length_beyond(shown) is None]
        length = source.length
        exact = self.export.exact_size
        if length is not None and (exact is None or length == exact):
            self.manager.measured(self.export, length, self.generation)
        if too_long:
            self._too_long(*min(too_long))
        if length is not None and offset + size > length:
            # The end came before a length measured earlier, shown as exact: the reader may rely on it
            # (rsync reads up to it; a copy through the page cache would end there, padded with zeros).
            cut = max((shown for shown, basis in sizes if basis == "measured" and shown > length), default=None)
            if cut is not None:
                raise XofsError(f"XO's export ended after {length} bytes, before the length measured by an "
                                f"earlier read, {cut}: the object changed without an event; the size is the "
                                "length once the file is closed: read it again")
        if length is not None and exact is not None and length != exact:
            self._check_resized(exact)
            raise XofsError(f"XO's export ended after {length} bytes, but the VDI's size is {exact}")

    def _check_resized(self, exact: int) -> None:
        """The VDI was resized since the open (XO says so now): the reader took the file for the old size."""
        now = (self.manager.cache.get(self.export.obj_id) or {}).get("size")
        if isinstance(now, int) and now != exact:
            raise XofsError(f"the VDI's size changed from {exact} to {now} bytes after the file was opened: "
                            "read it again")

    def _beyond_end(self, offset: int, length: int) -> None:
        """A read that starts past the stream's end. Where the reader was shown a larger size, it took the
        file for longer (`tail -c`, `dd skip=`, a footer read at the end of a size that was a bound): an
        empty answer would make it print nothing and succeed. It fails, and the size is now the length."""
        shown = max(self._shown_at_open[0], self.manager.size_of(self.export)[0])
        if shown > length:
            raise XofsError(f"the read starts beyond the end of the export ({length} bytes): the size shown "
                            f"when the file was opened, {self._shown_at_open[0]} ({self._shown_at_open[1]}), "
                            "was more than its length; the size is the length once the file is closed: read it "
                            "again")
        # Shown the length, yet asked past it: a reader that seeks past the end (`dd skip=`), or a copy
        # through the page cache (sendfile, splice) whose kernel still had a larger size and which took the
        # zeros of the last read up to here. An empty answer would end the second with success, padded: it
        # fails, and the kernel is told the length again (at the last close, the file being open).
        self.manager.size_changed(self.export)
        raise XofsError(f"the read starts at {offset}, beyond the end of the export ({length} bytes): a copy "
                        "through the page cache whose kernel still had a larger size for the file would end "
                        "padded; the kernel is told the length at the close: read it again")

    def _positioned_end(self, first: int, length: int) -> None:
        """The end of the stream, reached by a reader that never read the start (it began at `first`), in a
        file shown larger than its length (a bound). Such a reader placed itself from the size shown
        (`tail -c N`, `tail -n`, a seek from the end): it read the wrong bytes and would end with 0, so the
        read fails, and the size is now the length. `dd skip=` placed from the start, meets it too."""
        shown = self._shown_at_open[0]
        if shown > length:
            raise XofsError(f"a read that began at offset {first}, not at the start, reached the end of the "
                            f"export ({length} bytes) before the size shown when the file was opened, {shown} "
                            f"({self._shown_at_open[1]}): a position taken from that size (tail -c, a seek from "
                            "the end) was wrong, or another reader of the file read its start into the page "
                            "cache; the size is the length once the file is closed: read it again")

    def _too_long(self, shown: int, basis: str) -> NoReturn:
        if basis == "measured":
            self.manager.unmeasure(self.export, shown)
            raise XofsError(f"the export is longer than the {shown} bytes measured by an earlier read (it "
                            "changed in between), and a reader may have taken that size for the length: "
                            "read it again")
        if basis == "bound":
            raise XofsError(f"the export is longer than the upper bound of {shown} bytes computed for it; "
                            "this is a bug in xofs.export_sizes, please report it")
        self._check_resized(shown)  # whether the end of the stream is known by now or not
        raise XofsError(f"XO's export is longer than the {shown} bytes the VDI's size says")

    def _error(self, err: XofsError, offset: int) -> ExportReadError:
        errno_ = err.errno
        # The feed's and the spool's own errors start by naming the export, which this one names already.
        words = err.message
        if words.startswith(named := f"export {self.export.url_path}"):
            rest = words[len(named):]
            words = rest[2:] if rest.startswith(": ") else "the export" + rest
        elif (url := _url_named(words, self.export.url_path)) is not None:
            words = without_url(words, url)  # the connection's words name the whole URL
        if self.manager.cache.get(self.export.obj_id) is None and errno_ == errno.EIO:
            errno_ = errno.ENOENT
            words += " (the object is no longer in XO)"
        error = ExportReadError(f"{self.path}: export {self.export.url_path} at offset {offset}: {words}",
                                object_id=self.export.obj_id, errno_=errno_)
        error.repeated = words == self._failure
        if error.repeated:
            self._repeats += 1
        else:
            self._count_repeats()
        self._failure = words
        return error

    def _count_repeats(self) -> None:
        """One line for the reads that failed as the one logged before them did, once they stop."""
        if self._repeats:
            log.info("%s: %d more read(s) failed as the one logged before them (each logged at debug level)",
                     self.path, self._repeats)
        self._repeats = 0

    async def write(self, offset: int, data: bytes) -> int:
        raise XofsError("exports are read-only", errno_=errno.EPERM)

    async def flush(self, caller: Caller) -> None:
        return None

    async def fsync(self) -> None:
        return None

    async def release(self) -> None:
        self.released = True
        self.manager.open_files.discard(self)
        self._count_repeats()
        if self.feed is not None:
            feed, self.feed = self.feed, None
            if not feed.done:
                log.debug("%s: closed at offset %d by %s; export %s cancelled after %d bytes", self.path,
                          self.position, self.opener or "its opener", feed.label, feed.received)
            feed.cancel()
        if self.entry is not None:
            entry, self.entry = self.entry, None
            self.manager.spool.release(entry)


def _url_named(words: str, url_path: str) -> str | None:
    """The URL ending in `url_path` (with its query, if any) that `words` names, if it names one."""
    for word in words.split():
        if word.startswith(("http://", "https://")) and url_path in word:
            return word
    return None
