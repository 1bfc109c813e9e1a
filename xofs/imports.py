"""Imports: a disk image written into `/srs/<uuid>/import/` becomes a new VDI on that SR.

Each name in an import directory is an `_Import`, a small state machine:

- WRITING: the writer's bytes go to an on-disk spool (`xofs.import_spool`), at any offset. A VHD's
  leading footer copy is checked as soon as its first 512 bytes are in (EINVAL), and its virtual size
  against the SR's free space (ENOSPC); a raw image's size is checked as it grows.
- A VHD written in order from its start (cp, rsync, dd) is uploaded while it is written: once its block
  table is in, the file's final length is known (`planned_vhd_length`), which is the Content-Length XO
  needs, and the upload follows the writer through the spool. Its trailing footer is held back until the
  close has checked the whole file, so XO never finishes an import the close would refuse. A write out of
  order or past that length, a truncate, a writer that pauses, or a close at another length cancels it
  (XO destroys the VDI it began; checked as after any failed upload), and the close uploads as below.
- UPLOADING: started by the close (`flush`) or `fsync` that follows new writes, never by `release`, whose
  errors nobody sees (fuse-lessons §7): the close waits for XO's answer and returns it. A flush with no
  new writes does nothing, so the flushes of dup'd and forked descriptors (shell redirections) before the
  writes are harmless. A writer killed mid-copy also closes its files: its flush uploads nothing.
- IMPORTED: XO made the VDI. The entry keeps the writer's size, mtime and mode, remembered across remounts
  (`xofs.import_state`), so `rsync -a` and `cp -u` see it as up to date. For a short while after the last
  close the spool is kept: a writer that reopens the file and changes it (qemu-img creates an empty image,
  closes it, then reopens it to fill it) gets the new content uploaded at its close, and the VDI of the
  earlier close is then deleted, so one VDI remains.

Failures (a refused name or content, XO refusing or breaking the upload, a killed writer, an unlink
during the upload) remove the entry and its spool, and leave no VDI: XO destroys the half-made VDI
itself, and if it did not, the leftover is found and deleted here. What each operation does is in
docs/semantics.md (imports section).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import trio

from xofs.cache import Change, ObjectCache
from xofs.client.rest import GATEWAY_STATUSES, RestClient
from xofs.client.upload import IMPORT_MARK_LENGTH, IMPORT_MARK_TASK
from xofs.errors import TasksUnknown, XoError, XofsError
from xofs.files import Caller, FileAttrs, ImportEntry, OpenFile, OpenInfo
from xofs.formats.vhd import FOOTER_SIZE, VhdError, check_import_footer
from xofs.import_format import (
    ImageFormat,
    ImportName,
    check_complete_vhd,
    parse_name,
    planned_vhd_length,
    vhd_maps_blocks,
)
from xofs.import_spool import Spool, clean_stale_spools
from xofs.import_state import ImportRecord, ImportStore, server_dir_name

log = logging.getLogger(__name__)

DEFAULT_DESCRIPTION = "imported by xofs"
DESCRIPTION_XATTR = "user.xo.name_description"
REWRITE_GRACE = 5.0  # seconds a finished import's spool is kept for a writer that reopens it
SHUTDOWN_WAIT = 30.0  # seconds running uploads get to finish when the mount goes away
UNLINK_WAIT = 30.0  # seconds an unlink waits for the upload it cancels to be cleaned up
CLEANUP_TIMEOUT = 30.0  # seconds for the XO requests that remove what a failed import left
LEFTOVER_CHECKS = (0.0, 0.2, 0.5, 1.0, 2.0)  # when to look for a VDI XO should have destroyed itself
IMPORT_TASK = "[XO] Importing content into VDI"  # how XO names the XAPI task of an import: "… NAME on SR SR"
LEFTOVER_RETRY_MAX = 60.0  # seconds between two looks for such a VDI while that cannot be told
PF_EXITING = 0x4  # task flag: the process is exiting (include/linux/sched.h)
EARLY_PROBE_LIMIT = 16 << 20  # a VHD whose block table is not within its first 16 MiB is uploaded at its close
ABANDON_WINDOW = 60.0  # seconds after its import that removing rsync's temporary file deletes its VDI
KILL_POLL = 0.5  # seconds between two looks for a SIGKILL sent to a writer whose close waits for its upload
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)  # in /proc/<pid>/status's pending-signal masks
EARLY_STALL = 20.0  # seconds an upload that follows its writer waits for the next write before giving up


class Phase(Enum):
    WRITING = "writing"
    UPLOADING = "uploading"
    IMPORTED = "imported"


@dataclass(eq=False)
class _Upload:
    """One upload of a spool; `done` is set once it succeeded or everything it made was removed."""

    path: str  # the file it uploads, as the mount showed it when the upload began
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope | None = None
    cancel_reason: str | None = None
    error: XofsError | None = None
    started: float | None = None  # when sending began (monotonic), for transfers()
    sent: int = 0

    def progress(self, sent: int) -> None:
        self.sent = sent


@dataclass(eq=False)
class _Early:
    """An upload that follows its writer (a VHD written in order): `length` is what its block table says
    the file will be, sent as the Content-Length."""

    upload: _Upload
    length: int
    changed: trio.Event = field(default_factory=trio.Event)  # set (and replaced) at every write
    committed: bool = False  # the close checked the whole file: the trailing footer may go
    stopped: str | None = None  # why it was given up (cancelled by us, or failed before the close)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass(eq=False)
class _Import:
    """One name in one import directory, whatever its phase."""

    sr_id: str
    name: str
    kind: ImportName
    mode: int
    mtime_ns: int
    size: int = 0
    phase: Phase = Phase.WRITING
    spool: Spool | None = None
    dirty: bool = False  # written since the last upload started
    prefix: int = 0  # bytes 0..prefix are written: the footer copy is checked once it covers 512
    virtual_size: int | None = None  # a VHD's, from its footer
    vdi: str | None = None
    sent_label: str | None = None  # the name_label the VDI has in XO
    sent_description: str | None = None
    name_description: str | None = None  # set through the xattr
    superseded: str | None = None  # the VDI of an earlier close of the same content, deleted on success
    superseded_has_data: bool = False  # that earlier image held data: it stays in XO if the rewrite fails
    upload: _Upload | None = None
    early: _Early | None = None  # an upload following the writer
    in_order: bool = True  # every write so far appended at the end (no early upload otherwise)
    handles: int = 0
    failure: XofsError | None = None  # set when the import is dead: its open handles answer this
    gone: bool = False  # no longer in its directory
    from_disk: bool = False  # a record from an earlier mount, not yet checked against XO's VDIs
    kept_since: float = 0.0  # when the last handle closed on an imported spool
    imported_at: float | None = None  # trio.current_time() when this mount's upload made the VDI
    renamed: bool = False  # renamed since it was made: rsync never renames its temporary file but to its end
    writer: str = ""  # the process that last opened it for writing (`pid 1234 (cp)`), for `xofs status`

    @property
    def description(self) -> str:
        return self.name_description if self.name_description is not None else DEFAULT_DESCRIPTION

    def attrs(self) -> FileAttrs:
        return FileAttrs(size=self.size, mtime_ns=self.mtime_ns, mode=self.mode)

    def record(self) -> ImportRecord:
        assert self.vdi is not None
        return ImportRecord(self.vdi, self.size, self.mtime_ns, self.mode, self.name_description)


class ImportFile:
    """An open file in an import directory (the `xofs.files.OpenFile` contract)."""

    def __init__(self, manager: ImportManager, imp: _Import, *, writable: bool, caller: Caller,
                 path: str) -> None:
        # Writes skip the kernel's page cache (they go to the spool, whose own page cache holds them):
        # a third less CPU per written byte. Nothing is ever served from a stale cache.
        self.info = OpenInfo(direct_io=writable, keep_cache=False)
        self._manager = manager
        self.imp = imp
        self.writable = writable
        self.wrote = False  # whether anything was written through this open
        self.caller = caller
        self.path = path
        imp.handles += 1

    async def read(self, offset: int, size: int) -> bytes:
        spool = self.imp.spool
        if spool is None or spool.removed:
            if self.imp.failure is not None:
                raise self.imp.failure
            return b""
        return spool.read(offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise XofsError("the file is not open for writing", errno_=errno.EBADF)
        self.wrote = True
        return await self._manager.write(self, offset, data)

    async def flush(self, caller: Caller) -> None:
        await self._manager.flush(self)

    async def fsync(self) -> None:
        await self._manager.finish_now(self)

    async def release(self) -> None:
        self._manager.release(self)


class ImportManager:
    """Serves every import directory of one mount (the `xofs.files.ImportService` contract)."""

    def __init__(self, client: RestClient, cache: ObjectCache, *, state_dir: Path, spool_dir: Path,
                 server_key: str, max_uploads: int = 2, read_only: bool = False,
                 notify: Callable[[str, list[str]], None] = lambda sr, names: None,
                 rewrite_grace: float = REWRITE_GRACE, shutdown_wait: float = SHUTDOWN_WAIT) -> None:
        self.client = client
        self.cache = cache
        self.store = ImportStore(state_dir, server_key)
        self.spool_dir = spool_dir / server_dir_name(server_key)
        self.read_only = read_only
        self.notify = notify
        self.rewrite_grace = rewrite_grace
        self.shutdown_wait = shutdown_wait
        self._limiter = trio.CapacityLimiter(max_uploads)
        self._dirs: dict[str, dict[str, _Import]] = {}
        # per SR, every name this mount had as an import: saving replaces those records and keeps the others
        # (another mount's, sharing the state directory)
        self._known: dict[str, set[str]] = {}
        self._unchecked: set[str] = set()  # SRs whose remembered imports were not yet checked against XO
        self._uploads: set[_Upload] = set()
        self._nursery: trio.Nursery | None = None
        self._shutdown_scope: trio.CancelScope | None = None  # the wait for running uploads, while it runs
        self._no_wait = False  # stop_waiting() was called
        self._stopping = False  # the mount is going away: no later looks for what a failed import left
        # XAPI's tasks now (id -> task), to tell an import under way from what a failed one left; set by the
        # mount to its event feed's (`FeedRunner.xapi_tasks`); without it no such VDI is deleted
        self.xapi_tasks: Callable[[], Awaitable[dict[str, dict]]] | None = None

    # ---- life cycle -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve uploads until cancelled; then give running uploads `shutdown_wait` seconds to finish."""
        removed = clean_stale_spools(self.spool_dir)
        if removed:
            log.info("removed %d import spool(s) left by an earlier xofs in %s", removed, self.spool_dir)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    await self._stop_uploads()
        finally:
            self._nursery = None
            for imports in self._dirs.values():
                for imp in imports.values():
                    self._drop_spool(imp)

    def stop_writers(self) -> None:
        """The mount is stopping: no write reaches it any more (the FUSE loop reads no new request), so
        the uploads that follow files being written are given up now (XO destroys the VDIs they began),
        instead of after EARLY_STALL without a write, as "uploaded when it is closed", which never comes."""
        for imports in self._dirs.values():
            for imp in imports.values():
                self._stop_early(imp, "the mount is stopping while the file is being written", final=True)

    async def _stop_uploads(self) -> None:
        self._stopping = True
        for imports in self._dirs.values():
            for imp in imports.values():
                if imp.phase is Phase.WRITING and imp.dirty and imp.early is None:
                    log.warning("the mount is stopping while %s is being written: it is not imported",
                                _mount_path(imp))
        self.stop_writers()
        with trio.CancelScope(shield=True) as scope:
            self._shutdown_scope = scope
            wait = 0.0 if self._no_wait else self.shutdown_wait
            scope.deadline = trio.current_time() + wait
            if self._uploads and wait:
                log.info("waiting up to %.0f s for %d import upload(s) to finish", wait, len(self._uploads))
            while self._uploads:
                await trio.sleep(0.05)
        self._shutdown_scope = None
        for upload in list(self._uploads):
            log.warning("the mount is going away: cancelling the unfinished import upload of %s", upload.path)
            self._cancel(upload, "the mount was stopped before the upload finished")

    def stop_waiting(self) -> None:
        """No more waiting for running uploads at shutdown (a second SIGTERM or Ctrl-C): they are cancelled
        as those still running at the end of the wait are."""
        self._no_wait = True
        if self._shutdown_scope is not None:
            self._shutdown_scope.deadline = trio.current_time()

    def transfers(self) -> list[dict]:
        """Imports being written or uploaded, for `xofs status`: `done` is the bytes written so far, or
        sent to XO; `elapsed` the seconds since the upload began (None while the file is being written)."""
        now = time.monotonic()
        out = []
        for imports in self._dirs.values():
            for imp in imports.values():
                path = _mount_path(imp)
                upload = imp.upload
                if imp.phase is Phase.UPLOADING and upload is not None:
                    sending = upload.started is not None
                    out.append({"kind": "import", "path": path, "phase": "uploading" if sending else "waiting",
                                "done": upload.sent, "size": imp.size, "size_exact": True,
                                "elapsed": now - upload.started if upload.started is not None else 0.0,
                                "opener": imp.writer})
                elif imp.phase is Phase.WRITING and imp.dirty:
                    out.append({"kind": "import", "path": path, "phase": "writing", "done": imp.size,
                                "size": None, "size_exact": False, "elapsed": None, "opener": imp.writer})
        return out

    def on_changes(self, changes: list[Change]) -> None:
        """Forget imports whose VDI was deleted in XO: the file vanishes, and a new copy imports again."""
        deleted = {ch.obj_id for ch in changes if ch.type == "VDI" and ch.new is None}
        if not deleted:
            return
        for sr_id, imports in self._dirs.items():
            gone = [imp for imp in imports.values() if imp.phase is Phase.IMPORTED and imp.vdi in deleted]
            for imp in gone:
                log.info("the VDI %s of %s was deleted in XO: forgetting the import", imp.vdi, _mount_path(imp))
                self._forget(imp, "its VDI was deleted in XO")
            if gone:
                self._save(sr_id)
                self.notify(sr_id, [imp.name for imp in gone])

    # ---- listing ----------------------------------------------------------------------------------

    def entries(self, sr_id: str) -> dict[str, FileAttrs]:
        imports = self._dir(sr_id)
        return {name: imp.attrs() for name, imp in imports.items()}

    def open_attrs(self, file: OpenFile) -> FileAttrs | None:
        return file.imp.attrs() if isinstance(file, ImportFile) else None

    def xattrs(self, entry: ImportEntry) -> dict[str, bytes]:
        imp = self._dir(entry.sr_id).get(entry.name)
        if imp is None:
            return {}
        state = imp.phase.value if imp.phase is not Phase.WRITING or imp.size else "empty"
        out = {
            "user.xo.sr": imp.sr_id.encode(),
            "user.xo.format": imp.kind.format.value.encode(),
            "user.xo.state": state.encode(),
            "user.xo.name_label": imp.kind.label.encode("utf-8", "surrogateescape"),
            DESCRIPTION_XATTR: imp.description.encode(),
        }
        if imp.vdi is not None:
            out["user.xo.vdi"] = imp.vdi.encode()
        return out

    def dir_mode(self) -> int:
        return 0o500 if self.read_only else 0o700

    def _dir(self, sr_id: str) -> dict[str, _Import]:
        """The SR's imports, loaded from the state directory on first use; records whose VDI is gone from
        XO are dropped once the object cache is loaded."""
        imports = self._dirs.get(sr_id)
        if imports is None:
            imports = self._dirs[sr_id] = {}
            self._known[sr_id] = set()
            self._unchecked.add(sr_id)
            for name, rec in self.store.load(sr_id).items():
                try:
                    kind = parse_name(name)
                except XofsError:
                    continue
                self._known[sr_id].add(name)
                imports[name] = _Import(sr_id, name, kind, rec.mode, rec.mtime_ns, rec.size, Phase.IMPORTED,
                                        vdi=rec.vdi, sent_label=kind.label, name_description=rec.name_description,
                                        sent_description=rec.name_description or DEFAULT_DESCRIPTION,
                                        from_disk=True)
        if sr_id in self._unchecked and self.cache.loaded:
            self._unchecked.discard(sr_id)
            stale = [imp for imp in imports.values() if imp.from_disk and self.cache.get(imp.vdi or "") is None]
            for imp in imports.values():
                imp.from_disk = False
            for imp in stale:
                log.info("forgetting the import %s: its VDI %s is no longer in XO", _mount_path(imp), imp.vdi)
                self._forget(imp, "its VDI is no longer in XO")
            if stale:
                self._save(sr_id)
        return imports

    def _save(self, sr_id: str) -> None:
        imports = self._dirs.get(sr_id, {})
        self.store.save(sr_id, {n: i.record() for n, i in imports.items() if i.phase is Phase.IMPORTED},
                        known=self._known.get(sr_id, set()))

    # ---- opening ----------------------------------------------------------------------------------

    async def create(self, entry: ImportEntry, mode: int, caller: Caller, path: str) -> OpenFile:
        self._check_writable(path)
        kind = _parse(entry.name, path)
        imports = self._dir(entry.sr_id)
        if entry.name in imports:  # the kernel had a stale negative entry: same as opening with O_TRUNC
            return await self.open(entry, os.O_WRONLY | os.O_TRUNC, caller, path)
        imp = _Import(entry.sr_id, entry.name, kind, mode & 0o777, time.time_ns())
        imports[entry.name] = imp
        self._known[entry.sr_id].add(entry.name)
        imp.writer = caller.describe()
        return ImportFile(self, imp, writable=True, caller=caller, path=path)

    async def open(self, entry: ImportEntry, flags: int, caller: Caller, path: str) -> OpenFile:
        imp = self._get(entry, path)
        writable = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if not writable:
            if imp.phase is Phase.IMPORTED and imp.spool is None:
                raise XofsError(f"{path} is imported as VDI {imp.vdi}; read its content from /vdis/{imp.vdi}.raw",
                                errno_=errno.EACCES)
            return ImportFile(self, imp, writable=False, caller=caller, path=path)
        self._check_writable(path)
        if flags & os.O_TRUNC:
            self._truncate(imp, 0, path)
        imp.writer = caller.describe()
        return ImportFile(self, imp, writable=True, caller=caller, path=path)

    def _check_writable(self, path: str) -> None:
        if self.read_only:
            raise XofsError(f"{path}: the mount is read-only (--read-only)", errno_=errno.EROFS)

    def _get(self, entry: ImportEntry, path: str) -> _Import:
        imp = self._dir(entry.sr_id).get(entry.name)
        if imp is None:
            raise XofsError(f"{path}: no such file", errno_=errno.ENOENT)
        return imp

    # ---- writing ----------------------------------------------------------------------------------

    async def write(self, handle: ImportFile, offset: int, data: bytes) -> int:
        imp = await self._writable(handle.imp, handle.path)
        end = offset + len(data)
        if offset != imp.size:
            imp.in_order = False
            self._stop_early(imp, f"a write at {offset} is not at the end ({imp.size})")
        elif imp.early is not None and imp.early.stopped is None and end > imp.early.length:
            self._stop_early(imp, f"a write reaches {end}, past the {imp.early.length} bytes its block table "
                                  "announced")
        try:
            if imp.kind.format is ImageFormat.RAW and end > imp.size:
                self._check_room(imp, end, handle.path)
            if imp.spool is None:
                imp.spool = Spool(self.spool_dir)
            written = imp.spool.write(offset, data)
        except OSError as err:
            await self._fail(imp, XofsError(f"cannot write the import spool {self.spool_dir}: {err.strerror}",
                                            errno_=err.errno or errno.EIO))
            raise imp.failure from None  # type: ignore[misc]
        except XofsError as err:
            await self._fail(imp, err)
            raise
        imp.size = imp.spool.size
        imp.dirty = True
        imp.mtime_ns = time.time_ns()
        if offset <= imp.prefix:
            imp.prefix = max(imp.prefix, offset + written)
        if imp.early is not None:
            imp.early.wake()
        if imp.kind.format is ImageFormat.VHD and imp.prefix >= FOOTER_SIZE and (
                imp.virtual_size is None or offset < FOOTER_SIZE):
            try:
                self._check_footer(imp, handle.path)
            except XofsError as err:
                await self._fail(imp, err)
                raise
        self._maybe_start_early(imp, handle.path)
        return written

    # ---- uploading while the writer writes --------------------------------------------------------

    def _maybe_start_early(self, imp: _Import, path: str) -> None:
        """Start uploading a VHD written in order as soon as its block table tells its final length."""
        if (imp.early is not None or not imp.in_order or imp.kind.format is not ImageFormat.VHD
                or imp.phase is not Phase.WRITING or imp.virtual_size is None or imp.size > EARLY_PROBE_LIMIT
                or imp.vdi is not None or imp.superseded is not None or imp.spool is None or self._nursery is None
                or self._limiter.available_tokens < min(2, self._limiter.total_tokens)):
            # It would wait for its writer holding a slot: it leaves one for a close (a program writing
            # two VHDs at once and then a third file waited EARLY_STALL at that close).
            return
        length = planned_vhd_length(imp.spool.read, imp.size)
        if length is None or length <= imp.size:
            return
        early = imp.early = _Early(_Upload(path), length)
        log.debug("%s: its block table says %d bytes; uploading while it is written", path, length)
        self._nursery.start_soon(self._upload, imp, early.upload, path, early)

    def _stop_early(self, imp: _Import, reason: str, *, final: bool = False) -> _Early | None:
        """Give up the upload that follows the writer (XO destroys the VDI it began); the close uploads,
        unless `final` (the import failed or ended: nothing will be)."""
        if imp.early is not None:
            self._give_up(imp.early, _mount_path(imp), reason, final=final)
        return imp.early

    def _give_up(self, early: _Early, path: str, reason: str, *, final: bool = False) -> None:
        if early.stopped is None:
            early.stopped = reason
            log.info("%s: stopped uploading while it is written (%s); %s", path, reason,
                     "nothing is uploaded" if final else "it is uploaded when it is closed")
            self._cancel(early.upload, reason)

    async def _early_ready(self, imp: _Import, early: _Early, end: int) -> None:
        """Wait until the spool holds the bytes up to `end`; the trailing footer only after the close."""
        while end > min(imp.size, early.length if early.committed else early.length - FOOTER_SIZE):
            event = early.changed
            try:
                with trio.fail_after(EARLY_STALL):
                    await event.wait()
            except trio.TooSlowError:
                self._stop_early(imp, f"no write for {EARLY_STALL:.0f} s")
                await trio.lowlevel.checkpoint()  # the cancel lands here

    async def _writable(self, imp: _Import, path: str) -> _Import:
        """The import, ready to take writes: waits for a running upload, reopens a finished one."""
        if imp.failure is not None:
            raise imp.failure
        if imp.phase is Phase.UPLOADING:
            assert imp.upload is not None
            await imp.upload.done.wait()
            if imp.failure is not None:
                raise imp.failure
        if imp.phase is Phase.IMPORTED:
            if imp.spool is None:
                raise XofsError(f"{path} is already imported as VDI {imp.vdi}: its content cannot change; "
                                "remove it or write a new file", errno_=errno.EPERM)
            self._start_rewrite(imp)
        return imp

    def _start_rewrite(self, imp: _Import) -> None:
        """A writer changes a just-imported file: its next upload replaces the VDI of this one."""
        log.info("%s changes after its import as VDI %s: it will be imported again and that VDI replaced",
                 _mount_path(imp), imp.vdi)
        assert imp.spool is not None  # the earlier image, still kept
        if imp.kind.format is ImageFormat.VHD:
            imp.superseded_has_data = vhd_maps_blocks(imp.spool.read, imp.size)
        else:
            imp.superseded_has_data = imp.spool.has_data()
        imp.superseded, imp.vdi = imp.vdi, None
        imp.phase = Phase.WRITING
        self._save(imp.sr_id)

    def _check_footer(self, imp: _Import, path: str) -> None:
        """XO's checks of the leading footer copy (EINVAL), then the virtual size against the SR (ENOSPC)."""
        assert imp.spool is not None
        try:
            footer = check_import_footer(imp.spool.read(0, FOOTER_SIZE))
        except VhdError as err:
            raise XofsError(f"not a VHD XO can import (only dynamic and differencing VHDs are): {err}",
                            errno_=errno.EINVAL) from None
        imp.virtual_size = footer.current_size
        self._check_room(imp, footer.current_size, path)

    def _check_room(self, imp: _Import, need: int, path: str) -> None:
        """ENOSPC when a disk of `need` bytes does not fit in the SR's free space (`size - usage`). XO counts
        an import's VDI in `usage` from its start, when it makes the VDI (the recordings' SR comes with the
        VDI's `enter`, usage up by its size): the uploads under way are in it already."""
        sr = self.cache.get(imp.sr_id)
        size, usage = (sr.get("size"), sr.get("usage")) if sr else (None, None)
        if not isinstance(size, int) or not isinstance(usage, int):
            return
        free = size - usage
        if need > free:
            raise XofsError(f"a disk of {need} bytes does not fit in SR {sr.get('name_label')!r} ({imp.sr_id}): "
                            f"{max(free, 0)} bytes free", errno_=errno.ENOSPC)

    def _truncate(self, imp: _Import, size: int, path: str) -> None:
        if imp.failure is not None:
            raise imp.failure
        if size != imp.size:
            imp.in_order = False
            self._stop_early(imp, f"the file is truncated to {size} bytes")
        if imp.phase is Phase.UPLOADING:
            raise XofsError(f"{path} is being uploaded to XO", errno_=errno.EBUSY)
        if imp.kind.format is ImageFormat.RAW and size > imp.size:
            self._check_room(imp, size, path)  # before anything changes: a size refused leaves the entry as it was
        if imp.phase is Phase.IMPORTED:
            if size == imp.size:
                return
            if size == 0:
                log.info("%s is overwritten: a new import begins; VDI %s stays in XO", path, imp.vdi)
                imp.vdi = imp.sent_label = imp.sent_description = None
                imp.phase = Phase.WRITING
                imp.virtual_size = None
                self._save(imp.sr_id)
            elif imp.spool is None:
                raise XofsError(f"{path} is already imported as VDI {imp.vdi}: its content cannot change",
                                errno_=errno.EPERM)
            else:
                self._start_rewrite(imp)
        if size == imp.size:
            return
        if imp.spool is None:
            imp.spool = Spool(self.spool_dir)
        imp.spool.truncate(size)
        imp.size = size
        imp.prefix = min(imp.prefix, size)
        if size < FOOTER_SIZE:
            imp.virtual_size = None
        imp.dirty = True
        imp.mtime_ns = time.time_ns()

    # ---- closing ----------------------------------------------------------------------------------

    async def flush(self, handle: ImportFile) -> None:
        """A close: uploads what was written since the last upload, and answers XO's verdict."""
        imp = handle.imp
        if not handle.writable:
            if imp.failure is not None:
                raise imp.failure
            return
        if imp.phase is Phase.UPLOADING and not handle.wrote:
            return  # `touch`, or an open that wrote nothing: the upload is the writer's, and so is its verdict
        if imp.failure is not None:
            raise imp.failure
        if imp.phase is Phase.UPLOADING:
            await self._wait(imp, handle.caller.pid)
        elif imp.phase is Phase.WRITING and imp.dirty:
            if writer_was_killed(handle.caller.pid):
                await self._fail(imp, XofsError(f"the writer (pid {handle.caller.pid}) was killed before it "
                                                "finished: nothing is imported"))
                raise imp.failure  # type: ignore[misc]
            await self._finish(imp, handle.path, handle.caller.pid)

    async def finish_now(self, handle: ImportFile) -> None:
        """fsync: upload now what was written, whoever wrote it."""
        imp = handle.imp
        if imp.failure is not None:
            raise imp.failure
        if imp.phase is Phase.UPLOADING:
            await self._wait(imp)
        elif imp.phase is Phase.WRITING and imp.dirty:
            await self._finish(imp, handle.path)

    def release(self, handle: ImportFile) -> None:
        imp = handle.imp
        imp.handles -= 1
        if imp.handles or imp.gone:
            if imp.gone and not imp.handles:
                self._drop_spool(imp)
            return
        if imp.phase is Phase.IMPORTED:
            imp.kept_since = trio.current_time()
            if self._nursery is not None and self.rewrite_grace > 0:
                self._nursery.start_soon(self._expire_spool, imp, imp.kept_since)
            else:
                self._drop_spool(imp)
        elif imp.phase is Phase.WRITING:
            if imp.dirty:  # written but never finished: only a flush that was refused gets here
                log.warning("%s was closed without being imported; dropping what was written", handle.path)
                self._forget(imp, "it was closed without being imported")
                self._save(imp.sr_id)
                self.notify(imp.sr_id, [imp.name])
            else:
                self._drop_spool(imp)  # nothing written: an empty entry, nothing in XO

    async def _expire_spool(self, imp: _Import, since: float) -> None:
        await trio.sleep(self.rewrite_grace)
        if imp.kept_since == since and not imp.handles and imp.phase is Phase.IMPORTED:
            self._drop_spool(imp)

    def _drop_spool(self, imp: _Import) -> None:
        if imp.spool is not None:
            imp.spool.remove()
            imp.spool = None

    async def _wait(self, imp: _Import, writer: int = 0) -> None:
        """Until XO answers the upload; its error, if any. With the pid of the `writer` whose close waits:
        the kernel makes that wait uninterruptible, so a SIGKILL for it (looked for every `KILL_POLL`
        seconds) ends the wait instead, and the upload goes on without it."""
        assert imp.upload is not None
        upload = imp.upload
        while not upload.done.is_set():
            with trio.move_on_after(KILL_POLL if writer > 0 else math.inf):
                await upload.done.wait()
            if not upload.done.is_set() and kill_pending(writer):
                # The wrapper's log line names the path; the upload's own lines say how it ends.
                raise XofsError(f"its writer (pid {writer}) was killed while it waited for XO's answer: the upload "
                                "goes on, and this log will say how it ends", errno_=errno.EINTR)
        if upload.error is not None:
            raise upload.error

    async def _finish(self, imp: _Import, path: str, writer: int = 0) -> None:
        """Check the content, upload it, and wait for XO's answer (see `_wait` for `writer`)."""
        if imp.size == 0:  # written, then truncated to nothing: an empty file imports nothing
            imp.dirty = False
            self._drop_spool(imp)
            return
        assert imp.spool is not None
        try:
            if imp.kind.format is ImageFormat.VHD:
                if imp.prefix < FOOTER_SIZE:
                    self._check_footer(imp, path)
                await trio.to_thread.run_sync(check_complete_vhd, imp.spool.path, imp.size, FOOTER_SIZE)
            else:
                self._check_room(imp, imp.size, path)
        except XofsError as err:
            await self._fail(imp, err)
            raise
        early, imp.early = imp.early, None
        if early is not None and early.stopped is None and imp.size == early.length:
            early.committed = True  # the whole file is checked: its last bytes may go
            early.wake()
            upload = imp.upload = early.upload
        else:
            if early is not None:  # what it began must be gone before XO sees another VDI of that name
                self._give_up(early, _mount_path(imp), f"it was closed at {imp.size} bytes, not the {early.length} "
                                               "bytes its block table announced")
                await early.upload.done.wait()
            if self._nursery is None:
                raise XofsError("imports are not running (the mount is stopping)", errno_=errno.EIO)
            upload = imp.upload = _Upload(path)
            self._nursery.start_soon(self._upload, imp, upload, path)
        imp.phase = Phase.UPLOADING
        imp.dirty = False
        self._uploads.add(upload)
        await self._wait(imp, writer)

    # ---- uploading --------------------------------------------------------------------------------

    async def _upload(self, imp: _Import, upload: _Upload, path: str, early: _Early | None = None) -> None:
        """Send the spool to XO (at most `max_uploads` at a time), then record or clean up.

        Shielded: only an unlink or the end of the shutdown wait (through `upload.scope`) stops it, and
        the clean-up after a failure always runs. With `early`, it follows the writer (`_early_ready`);
        failing before the close has committed it only gives it up: the close then uploads as usual.
        """
        assert imp.spool is not None
        label, description = imp.kind.label, imp.description
        size = early.length if early is not None else imp.size
        ready = None if early is None else functools.partial(self._early_ready, imp, early)
        before = self._vdis_named(imp.sr_id, label)
        vdi: str | None = None
        error: XofsError | None = None
        xo_answered = False  # XO's own answer ended the upload: nothing made, or what it made destroyed
        with trio.CancelScope(shield=True):
            try:
                with trio.CancelScope() as scope:
                    upload.scope = scope
                    if upload.cancel_reason is not None:
                        scope.cancel()
                    async with self._limiter:
                        log.info("importing %s into SR %s (%d bytes, %s%s)", path, imp.sr_id, size,
                                 imp.kind.format.value, ", while it is written" if early else "")
                        upload.started = time.monotonic()
                        vdi = await self.client.import_vdi(
                            imp.sr_id, imp.spool.path, name_label=label, name_description=description,
                            raw=imp.kind.format is ImageFormat.RAW, progress=upload.progress, size=size,
                            ready=ready)
                if vdi is None:
                    error = XofsError(f"import into SR {imp.sr_id} cancelled: {upload.cancel_reason}")
            except XofsError as err:
                error = _upload_error(imp.sr_id, err)
                xo_answered = isinstance(err, XoError) and err.status != 0 and err.status not in GATEWAY_STATUSES
            except OSError as err:
                error = XofsError(f"import into SR {imp.sr_id} failed: cannot read the spool: {err.strerror}")
            except Exception as err:  # a bug must fail this import, never the mount
                log.exception("import of %s into SR %s: unexpected failure", path, imp.sr_id)
                error = XofsError(f"import into SR {imp.sr_id} failed: internal error: {err!r}")
            given_up = early is not None and not early.committed
            if given_up and error is not None and early.stopped is None:
                early.stopped = error.describe()  # the close must not count on it any more
                log.info("%s: uploading while it is written failed (%s); it is uploaded when it is closed",
                         path, error.describe())
            try:
                with trio.move_on_after(CLEANUP_TIMEOUT):
                    if error is None and vdi is not None:
                        error = await self._imported(imp, vdi, label, description, path)
                    elif xo_answered:
                        pass  # a refusal (401, 404, 422) made no VDI; a 500 destroyed the one it made
                    elif (why := await self._remove_leftovers(imp.sr_id, label, size, before)) is not None:
                        self._remove_leftovers_later(imp.sr_id, label, size, before, why)
                if error is not None and not given_up:
                    await self._fail(imp, error)
            finally:
                upload.error = error
                self._uploads.discard(upload)
                upload.done.set()

    async def _imported(self, imp: _Import, vdi: str, label: str, description: str, path: str) -> XofsError | None:
        """XO made the VDI: record it, give it the name the file has now, delete the one it replaces."""
        if imp.gone:  # removed while uploading, and the cancel came too late
            await self._delete_vdi(vdi, f"{path} was removed while it was being imported")
            return XofsError(f"{path} was removed while it was being imported")
        imp.phase, imp.vdi, imp.sent_label, imp.sent_description = Phase.IMPORTED, vdi, label, description
        imp.imported_at = trio.current_time()
        path = f"{path.rsplit('/', 1)[0]}/{imp.name}"  # its name now: it may have been renamed meanwhile
        log.info("imported %s as VDI %s on SR %s", path, vdi, imp.sr_id)
        changes = {}
        if imp.kind.label != label:  # renamed during the upload
            changes["name_label"] = imp.kind.label
        if imp.description != description:
            changes["name_description"] = imp.description
        if changes:
            try:
                await self.client.patch("vdis", vdi, changes)
                imp.sent_label, imp.sent_description = imp.kind.label, imp.description
                log.info("VDI %s of %s now has %s", vdi, path, _changes_words(changes))
            except XofsError as err:
                log.warning("VDI %s of %s keeps %r: renaming it failed: %s", vdi, path, label, err.describe())
        if imp.superseded is not None:
            await self._delete_vdi(imp.superseded, f"{path} was imported again")
            imp.superseded = None
        if imp.handles == 0:  # closed by another descriptor meanwhile: `release` already ran
            imp.kept_since = trio.current_time()
            self._drop_spool(imp)
        self._save(imp.sr_id)
        return None

    def _vdis_named(self, sr_id: str, label: str) -> set[str]:
        return {vdi_id for vdi_id, vdi in self.cache.of_type("VDI").items()
                if vdi.get("$SR") == sr_id and vdi.get("name_label") == label}

    async def _remove_leftovers(self, sr_id: str, label: str, length: int, before: set[str], *,
                                checks: tuple[float, ...] = LEFTOVER_CHECKS) -> str | None:
        """Delete the VDI a failed import left, if XO did not destroy it (xo-api.md §1.5: it should).

        It is the VDI on the SR with the import's name that did not exist before the upload and is none of
        ours, still marked with the body length (`xo:import:length`): XO removes that mark when an import
        ends, so an unmarked VDI of that name is someone else's (another client's import that finished
        meanwhile, one made in XO's web UI) and is never touched. A marked one may be another import of
        that name and length still under way (another client's, or another file of this mount), or one
        that has just ended (XO marks the task `success` a moment before it removes the marks): XAPI's
        tasks, asked now, tell. One whose import task is pending or succeeded (or, not marked with its task
        yet, any import task of that name) is left alone until it is not; XAPI's tasks that cannot be asked
        leave it too. None when done; otherwise why it must be looked at again later.
        """
        for attempt, delay in enumerate(checks):
            await trio.sleep(delay)
            try:
                vdis = await self.client.collection("vdis", fields="name_label,$SR,other_config")
            except XofsError as err:
                return f"XO's VDIs cannot be read: {err.describe()}"
            ours = {i.vdi for d in self._dirs.values() for i in d.values()} | {
                i.superseded for d in self._dirs.values() for i in d.values()}
            new = [v for v in vdis if v.get("$SR") == sr_id and v.get("name_label") == label
                   and v["id"] not in before and v["id"] not in ours]
            marked = [v for v in new if (v.get("other_config") or {}).get(IMPORT_MARK_LENGTH) == str(length)]
            if not marked:
                finished = [v["id"] for v in new]
                if finished:  # XO read the whole image before the upload was cut, or another client's import
                    log.info("VDI %s named %r appeared on SR %s during the failed import, as a finished import "
                             "(XO removed its import mark): left in XO, since it may be another client's",
                             ", ".join(finished), label, sr_id)
                return None
            if attempt < len(checks) - 1:
                continue
            names = ", ".join(v["id"] for v in marked)
            try:
                if self.xapi_tasks is None:
                    raise TasksUnknown("XAPI's tasks cannot be asked here")
                tasks = await self.xapi_tasks()
            except TasksUnknown as err:
                log.warning("VDI %s named %r on SR %s is left in XO: it may be what the failed import left, or "
                            "another import of that name under way, and %s; delete it in XO if no import of "
                            "that name is running", names, label, sr_id, err.message)
                return None
            except XofsError as err:
                return f"XAPI's tasks cannot be asked: {err.describe()}"
            busy = [task_id for task_id, task in tasks.items() if task.get("status") in ("pending", "success")
                    and any(task_id == v["other_config"].get(IMPORT_MARK_TASK)
                            or (IMPORT_MARK_TASK not in v["other_config"]
                                and str(task.get("name_label", "")).startswith(f"{IMPORT_TASK} {label} on SR "))
                            for v in marked)]
            if busy:
                return (f"an import of that name is under way or just ended (XAPI task {', '.join(sorted(busy))}): "
                        f"VDI {names} may be its")
            for v in marked:
                await self._delete_vdi(v["id"], f"XO did not destroy it after the failed import of {label!r}")
        return None

    def _remove_leftovers_later(self, sr_id: str, label: str, length: int, before: set[str], why: str) -> None:
        """Look for the VDI a failed upload left again, with backoff (one listing each time), until
        `_remove_leftovers` can tell (XO went down mid-upload, say: a restarted XO keeps the VDI it was
        filling) or the mount ends."""
        if self._stopping:
            return  # nothing to look with: the mount ends
        log.warning("cannot check SR %s for a VDI the failed import of %r left yet: %s; looking again until "
                    "it can", sr_id, label, why)

        async def retry() -> None:
            delay = 1.0
            while True:
                await trio.sleep(delay)
                if await self._remove_leftovers(sr_id, label, length, before, checks=(0.0,)) is None:
                    return
                delay = min(delay * 2, LEFTOVER_RETRY_MAX)

        if self._nursery is not None:
            self._nursery.start_soon(retry)

    async def _delete_vdi(self, vdi: str, why: str) -> None:
        try:
            await self.client.delete("vdis", vdi)
            log.info("deleted VDI %s: %s", vdi, why)
        except XofsError as err:
            if err.errno != errno.ENOENT:
                log.warning("could not delete VDI %s (%s): %s", vdi, why, err.describe())

    def _cancel(self, upload: _Upload, reason: str) -> None:
        upload.cancel_reason = reason
        if upload.scope is not None:
            upload.scope.cancel()

    # ---- failing and forgetting -------------------------------------------------------------------

    async def _fail(self, imp: _Import, error: XofsError) -> None:
        """The import is dead: its handles answer `error`, the entry, spool and any VDI it made go."""
        if imp.failure is not None:
            return
        imp.failure = error
        early = self._stop_early(imp, error.describe(), final=True)
        self._drop_spool(imp)
        if not imp.gone:
            self._forget(imp, None)
            self._save(imp.sr_id)
            self.notify(imp.sr_id, [imp.name])
        if early is not None:  # the failed close answers once the VDI the early upload began is gone
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await early.upload.done.wait()
        if imp.superseded is not None:
            superseded, imp.superseded = imp.superseded, None
            if imp.superseded_has_data:  # a whole image rewritten (rsync --inplace, truncate): never lost
                log.warning("%s: the import that was to replace VDI %s failed; that VDI, of its earlier close, "
                            "stays in XO", _mount_path(imp), superseded)
                return
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await self._delete_vdi(superseded, f"the import of {_mount_path(imp)} that was to replace it failed "
                                                   "(it was of an empty image, as qemu-img writes first)")

    def _forget(self, imp: _Import, reason: str | None) -> None:
        """Take the entry out of its directory (the caller saves); XO is not touched, but an upload that
        follows the writer is given up (which removes what it began)."""
        self._stop_early(imp, reason or "the import ended", final=True)
        imports = self._dirs.get(imp.sr_id, {})
        if imports.get(imp.name) is imp:
            del imports[imp.name]
        imp.gone = True
        if reason is not None and imp.failure is None:
            imp.failure = XofsError(f"{imp.name} is no longer in the import directory: {reason}")
        if not imp.handles and imp.phase is not Phase.UPLOADING:  # an upload drops its spool itself
            self._drop_spool(imp)

    # ---- changing entries -------------------------------------------------------------------------

    def _abandoned_by_rsync(self, imp: _Import, path: str) -> bool:
        """Whether removing this entry with rsync's temporary name is rsync abandoning the transfer it just
        made: imported by this mount within `ABANDON_WINDOW`, and its VDI attached to no VM. A file that
        only looks like one (`cp` to `.disk.img.backup`), or one imported long ago or by an earlier mount,
        is an import like any other, and its VDI stays (the caller says so)."""
        vdi = self.cache.get(imp.vdi or "")
        if imp.imported_at is None:
            why = "it was imported by an earlier mount"
        elif imp.renamed:
            why = "it was renamed since it was written"
        elif trio.current_time() - imp.imported_at > ABANDON_WINDOW:
            why = f"it was imported {trio.current_time() - imp.imported_at:.0f} s ago"
        elif vdi is not None and vdi.get("$VBDs"):
            why = "its VDI is attached to a VM"
        else:
            return True
        log.info("%s is named like rsync's temporary file, but %s: not an abandoned rsync transfer", path, why)
        return False

    async def unlink(self, entry: ImportEntry, path: str) -> None:
        """Forget a finished import (its VDI stays); cancel an unfinished one and remove all it made."""
        imp = self._get(entry, path)
        self._check_writable(path)
        if imp.phase is Phase.IMPORTED:
            if imp.kind.temporary and imp.vdi is not None and self._abandoned_by_rsync(imp, path):
                # rsync removes its temporary file instead of renaming it when the transfer was interrupted
                # (Ctrl-C: it closes the file first, which imported what it held) or failed its checksum:
                # the VDI holds an unfinished copy, made from this file moments ago. It goes too.
                vdi = imp.vdi
                self._forget(imp, "it was removed")
                self._save(imp.sr_id)
                await self._delete_vdi(vdi, f"{path}, rsync's temporary file, was removed instead of renamed "
                                            "to its final name: the transfer was abandoned")
                return
            log.info("%s removed: forgetting the import; VDI %s stays in XO", path, imp.vdi)
            self._forget(imp, "it was removed")
            self._save(imp.sr_id)
            return
        self._stop_early(imp, "the file was removed", final=True)
        self._forget(imp, None)
        if imp.early is not None:
            with trio.move_on_after(UNLINK_WAIT):
                await imp.early.upload.done.wait()
        if imp.phase is Phase.UPLOADING and imp.upload is not None:
            upload = imp.upload
            self._cancel(upload, f"{path} was removed during the upload")
            with trio.move_on_after(UNLINK_WAIT):
                await upload.done.wait()
        else:
            await self._fail(imp, XofsError(f"{path} was removed before it was imported"))
        self._save(imp.sr_id)

    async def rename(self, entry: ImportEntry, new_name: str, path: str) -> None:
        """Rename within the directory; an imported file's VDI gets the new name (PATCH name_label)."""
        imp = self._get(entry, path)
        self._check_writable(path)
        if new_name == entry.name:
            return
        try:
            kind = _parse(new_name, path)
        except XofsError as err:
            if err.errno == errno.EINVAL:  # EPERM, as below: `mv` words EINVAL as a move into a subdirectory
                err.errno = errno.EPERM
            raise
        if kind.format is not imp.kind.format:
            # EPERM, not EINVAL: `mv` words EINVAL from rename as "cannot move a directory into itself".
            raise XofsError(f"{path} cannot become {new_name!r}: that is a {kind.format.value} name and the file "
                            f"is imported as {imp.kind.format.value}", errno_=errno.EPERM)
        imports = self._dir(entry.sr_id)
        target = imports.get(new_name)
        if target is not None and (target.phase is not Phase.IMPORTED and target.size or target.handles):
            raise XofsError(f"{path} cannot replace {new_name!r}: that file is being written or uploaded",
                            errno_=errno.EBUSY)
        if _sent_again(imp, target):
            # rsync sends a file whose size and time match only when told to compare contents (`-c`) or to
            # ignore times (`-I`), and an imported file cannot be read back: each run would pile up a
            # duplicate VDI, exit 0. Refused: rsync says so and removes its temporary file, whose VDI goes.
            raise XofsError(f"{path} cannot replace {new_name!r}, imported as VDI {target.vdi}: it has the same "
                            "size and time stamp, so rsync sent it again only because it cannot read an imported "
                            "file back (--checksum or --ignore-times); remove the imported file first to import "
                            "it again", errno_=errno.EEXIST)
        if imp.phase is Phase.IMPORTED and imp.vdi is not None and imp.sent_label != kind.label:
            try:
                await self.client.patch("vdis", imp.vdi, {"name_label": kind.label})
            except XofsError as err:
                raise XofsError(f"{path}: cannot rename VDI {imp.vdi} to {kind.label!r}: {err.describe()}",
                                errno_=errno.EIO) from None
            imp.sent_label = kind.label
            log.info("%s renamed to %s: VDI %s is now named %r in XO", path, new_name, imp.vdi, kind.label)
        target = imports.get(new_name)
        if target is not None and target is not imp:
            log.info("%s replaces %s; VDI %s stays in XO", entry.name, new_name, target.vdi)
            self._forget(target, "another file was renamed over it")
        if imports.get(entry.name) is imp:
            del imports[entry.name]
        imp.name, imp.kind, imp.renamed = new_name, kind, True
        imports[new_name] = imp
        self._known[entry.sr_id].add(new_name)
        self._save(entry.sr_id)

    async def setattr(self, entry: ImportEntry, *, size: int | None, mode: int | None, mtime_ns: int | None,
                      path: str) -> FileAttrs:
        imp = self._get(entry, path)
        self._check_writable(path)
        if size is not None:
            # A truncate that fails so ends an import being written, as such a write does; never a finished
            # one (its VDI, record and entry stay as they were).
            writing = imp.phase is Phase.WRITING
            try:
                self._truncate(imp, size, path)
            except OSError as err:
                error = XofsError(f"{path}: cannot resize the import spool: {err.strerror}",
                                  errno_=err.errno or errno.EIO)
                if writing:
                    await self._fail(imp, error)
                raise error from None
            except XofsError as err:
                if writing and err.errno == errno.ENOSPC:  # a disk that cannot fit in the SR
                    await self._fail(imp, err)
                raise
        if mode is not None:
            imp.mode = mode & 0o777
        if mtime_ns is not None:
            imp.mtime_ns = mtime_ns
        if imp.phase is Phase.IMPORTED:
            self._save(imp.sr_id)
        return imp.attrs()

    async def setxattr(self, entry: ImportEntry, key: str, value: bytes, path: str) -> None:
        """`user.xo.name_description` sets the VDI's description (before or after the upload)."""
        imp = self._get(entry, path)
        self._check_writable(path)
        if key != DESCRIPTION_XATTR:
            if key.startswith("user.xo."):
                raise XofsError(f"{path}: {key} is read-only; only {DESCRIPTION_XATTR} can be set",
                                errno_=errno.EPERM)
            # ACLs and security labels, which copies try to keep: routine (a debug line)
            raise XofsError(f"{path}: extended attribute {key} is not supported", errno_=errno.ENOTSUP,
                            routine=not key.startswith("user."))
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise XofsError(f"{path}: {key} must be UTF-8 text", errno_=errno.EINVAL) from None
        imp.name_description = text
        if imp.phase is Phase.IMPORTED and imp.vdi is not None and imp.sent_description != text:
            try:
                await self.client.patch("vdis", imp.vdi, {"name_description": text})
            except XofsError as err:
                raise XofsError(f"{path}: cannot set the description of VDI {imp.vdi}: {err.describe()}",
                                errno_=errno.EIO) from None
            imp.sent_description = text
            log.info("VDI %s of %s now has %s", imp.vdi, path, _changes_words({"name_description": text}))
            self._save(imp.sr_id)


def _changes_words(changes: dict[str, str]) -> str:
    """A PATCH's fields for a log line: `name_label 'x' and name_description 'y'`."""
    return " and ".join(f"{key} {value!r}" for key, value in changes.items())


def _mount_path(imp: _Import) -> str:
    """The import's file as the mount shows it, for log lines."""
    return f"/srs/{imp.sr_id}/import/{imp.name}"


def _parse(name: str, path: str) -> ImportName:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are no UTF-8 (kept as surrogates): XO's names are JSON text
        raise XofsError(f"{path}: the name is not valid UTF-8, and a VDI's name must be text",
                        errno_=errno.EINVAL) from None
    try:
        return parse_name(name)
    except XofsError as err:
        raise XofsError(f"{path}: {err.message}", errno_=err.errno) from None


def _sent_again(imp: _Import, target: _Import | None) -> bool:
    """Whether renaming rsync's temporary file `imp` over the imported `target` is rsync sending an unchanged
    file again (see `rename`)."""
    return (imp.kind.temporary and imp.phase is Phase.IMPORTED and target is not None and target is not imp
            and target.phase is Phase.IMPORTED and target.vdi is not None
            and (imp.size, imp.mtime_ns) == (target.size, target.mtime_ns))


def _upload_error(sr_id: str, err: XofsError) -> XofsError:
    """XO's refusal as the close() error: ENOSPC or EACCES where they fit, otherwise EIO."""
    words = err.describe()
    if err.errno == errno.ENOSPC or "SR_FULL" in words or "space" in words.lower():
        code = errno.ENOSPC
    elif err.errno == errno.EACCES:
        code = errno.EACCES
    else:
        code = errno.EIO
    return XofsError(f"import into SR {sr_id} failed: {words}", errno_=code)


def kill_pending(pid: int) -> bool:
    """Whether process `pid` has a SIGKILL pending (in /proc/<pid>/status, `SigPnd` or `ShdPnd`): sent while
    it waits in a system call the kernel will not interrupt. False when it cannot tell."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd"):
            try:
                if int(value.strip(), 16) & SIGKILL_BIT:
                    return True
            except ValueError:
                return False
    return False


def writer_was_killed(pid: int) -> bool:
    """Whether process `pid` is exiting because of a signal (its files are being closed by the kernel).

    A killed `cp` still closes its files, and FUSE sends the flush; without this check that flush would
    upload a half-copied image. Reads /proc/<pid>/stat: the PF_EXITING flag (field 9) and the exit code
    (field 52, whose low 7 bits are the signal). False when it cannot tell.
    """
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    try:
        flags, exit_code = int(fields[6]), int(fields[49])
    except (IndexError, ValueError):
        return False
    return bool(flags & PF_EXITING) and exit_code & 0x7F != 0
