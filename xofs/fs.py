"""The pyfuse3 adapter: FUSE requests in, answers from the tree and the file services out.

It stays thin on purpose. The tree (xofs.tree) says what exists, the views say what it looks like,
xofs.exports and xofs.imports serve file contents. This module turns their answers into
`EntryAttributes` and their `XofsError`s into a `FUSEError` plus one log line naming the path, the XO
object and XO's words. What each operation does on each kind of path is in docs/semantics.md.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import cachetools
import pyfuse3
import trio

from xofs.errors import XofsError
from xofs.files import Caller, ExportService, FileAttrs, ImportEntry, ImportService, OpenFile, OpenInfo
from xofs.invalidator import Invalidator
from xofs.names import NAME_MAX
from xofs.tree import Inode, InvalidateInode, Invalidation, Tree, ViewFailed
from xofs.views import PLUGIN_FAILURES, Dir, Export, File, Link, Live, Rendered, TypeSnapshot, is_builtin

log = logging.getLogger(__name__)

EXPORT_BLKSIZE = 1 << 20  # readers of streamed exports then ask for 1 MiB at a time (fuse-lessons §7)
FREE_INODES = 1 << 30  # what statfs reports free: files here are made from XO's objects, no table fills up
GETATTR_WAIT = 0.5  # at most, for the read out on a file to answer first (see `XoFS.getattr`)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass
class Freshness:
    """Kernel cache lifetimes: long while the event feed invalidates for us, short when it is down."""

    connected_ttl: float = 60.0
    fallback_ttl: float = 1.0
    feed_connected: bool = False

    @property
    def ttl(self) -> float:
        return self.connected_ttl if self.feed_connected else self.fallback_ttl


class RenderedFile:
    """An open meta.json: the bytes as they were at open, so one open reads one consistent version."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        # direct_io: reads go on to EOF whatever size the kernel cached, so a read racing with a change
        # and its invalidation still returns one whole version, never a cut or zero-padded one.
        self.info = OpenInfo(direct_io=True, keep_cache=False)

    async def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    async def write(self, offset: int, data: bytes) -> int:
        raise XofsError("metadata files are read-only", errno_=errno.EPERM)

    async def flush(self, caller: Caller) -> None:
        return None

    async def fsync(self) -> None:
        return None

    async def release(self) -> None:
        return None


# How an operation names what it is about (`XoFS.describe`): by file handle, by parent and name.
_HANDLE_OPS = frozenset({"read", "write", "flush", "fsync", "release", "readdir", "releasedir", "fsyncdir"})
_NAMED_OPS = frozenset({"lookup", "create", "unlink", "mkdir", "rmdir", "symlink", "mknod"})
_XATTR_OPS = frozenset({"getxattr", "setxattr", "removexattr"})


def _render_key(content: Rendered | TypeSnapshot | Live, render: Callable[..., Any]) -> tuple[str, str]:
    """A failing render function, for its traceback logged once: named (a view makes new lambdas at each
    listing, and a plugin's callable need not be hashable) and with what it renders from."""
    name = f"{getattr(render, '__module__', '?')}.{getattr(render, '__qualname__', type(render).__qualname__)}"
    if isinstance(content, Rendered):
        return name, content.obj_id
    return name, content.type_ if isinstance(content, TypeSnapshot) else content.key


def _op(fn: F) -> F:
    """Turn what a handler raises into a FUSEError, with one log line for every failure."""

    @functools.wraps(fn)
    async def wrapper(self: XoFS, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError as err:
            if err.errno not in (errno.ENOENT, errno.ENODATA, errno.ENOTSUP):
                log.debug("%s %s: %s", fn.__name__, self.describe(fn.__name__, args), os.strerror(err.errno))
            raise
        except XofsError as err:
            where = self.describe(fn.__name__, args)
            words = err.describe()
            if words.startswith(f"{where}: "):  # the error names the file itself (an export read's does)
                words = words[len(where) + 2:]
            log.log(logging.DEBUG if err.repeated or err.routine else logging.WARNING, "%s %s: %s", fn.__name__,
                    where, words)
            err.repeated = True  # a failure kept and raised again (a dead import: its fsync, its close) once
            raise pyfuse3.FUSEError(err.errno) from None
        except Exception:
            log.exception("%s %s: unexpected failure", fn.__name__, self.describe(fn.__name__, args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class _Handle:
    ino: int
    file: OpenFile
    # What `getattr` answers once the file's object is gone while it is open (`fstat` must work on an open
    # descriptor, as on any filesystem; the descriptor reads what it opened). None for import files.
    attrs: pyfuse3.EntryAttributes | None = None
    flushed: bool = False  # closed once (a meta.json's version then no longer holds its size up)


class XoFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, tree: Tree, *, exports: ExportService | None, imports: ImportService | None,
                 invalidator: Invalidator, freshness: Freshness, read_only: bool = False,
                 uid: int | None = None, gid: int | None = None, umask: int = 0o077) -> None:
        super().__init__()
        self.tree = tree
        self.exports = exports
        self.imports = imports
        self.invalidator = invalidator
        self.freshness = freshness
        self.read_only = read_only
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        # What the owner may do is given to group and others too, less the umask: the default (077) keeps
        # everything private; `--allow-other` mounts default to 022. Files in import directories keep the
        # mode their writer chose.
        self.umask = umask
        self.started_ns = time.time_ns()
        self._handles: dict[int, _Handle] = {}
        self._dir_handles: dict[int, tuple[int, list[str]]] = {}
        self._open_count: dict[int, int] = {}
        self._next_fh = 1
        # The sizes of whole-type files (`vms.ndjson`: megabytes, tens of milliseconds to render) by the type
        # version they were measured at. An object's file (meta.json, some 16 KiB) is rendered again on each
        # stat and open: orjson takes microseconds, and keeping renderings would scatter them through the
        # heap during a `find` (RSS that is never given back).
        self._snapshot_sizes: cachetools.LRUCache[TypeSnapshot, tuple[int, int]] = cachetools.LRUCache(maxsize=64)
        # Export files: the size the kernel was told last, until it forgets the inode: what it holds (an
        # invalidation leaves the size in place until it asks again), but for a reply that an attribute
        # change overtook, which it drops (see `read`).
        self._last_told: dict[int, int] = {}
        # Open export files whose size the kernel must be told again at their close, until then: the size
        # held for them until their last release (`read`), or None where only their measured length changed,
        # told at the first flush (`export_size_known`).
        self._at_close: dict[int, int | None] = {}
        # file inode -> the number of its last attribute invalidation queued, until an open saw it done
        self._attrs_dropping: dict[int, int] = {}
        self._reading: dict[int, int] = {}  # files with reads out, how many
        self._reads_idle: dict[int, trio.Event] = {}  # set when a file's last read out is answered
        # Render functions that failed (and what for), each logged with its traceback once until it renders again.
        self._render_failures: cachetools.LRUCache[tuple[str, str], bool] = cachetools.LRUCache(maxsize=1024)

    # ---- helpers ----------------------------------------------------------------------------------

    def describe(self, op: str, args: tuple) -> str:
        """What operation `op` was about, for log lines: a path (handlers get inodes, or file handles), both
        paths of a rename or link, the attribute of an xattr operation."""
        if not args or not isinstance(args[0], int):
            return "?"
        if op in _HANDLE_OPS:
            handle = self._handles.get(args[0])
            if handle is not None:
                return self.tree.path_str(handle.ino)
            dir_handle = self._dir_handles.get(args[0])
            return "?" if dir_handle is None else self.tree.path_str(dir_handle[0])
        if op in _NAMED_OPS:
            return self._child_path(args[0], args[1])
        if op == "rename":
            return f"{self._child_path(args[0], args[1])} -> {self._child_path(args[2], args[3])}"
        path = self.tree.path_str(args[0])
        if op == "link":
            return f"{path} -> {self._child_path(args[1], args[2])}"
        if op in _XATTR_OPS:
            return f"{path} (attribute {args[1].decode('utf-8', 'replace')})"
        return path

    def _child_path(self, parent: int, name: bytes) -> str:
        return self.tree.path_str(parent).rstrip("/") + "/" + name.decode("utf-8", "replace")

    def apply_invalidations(self, items: list[Invalidation]) -> None:
        """Queue kernel invalidations (never run inside a handler, at most awaited: see xofs.invalidator)."""
        for item in items:
            if isinstance(item, InvalidateInode):
                number = self.invalidator.inode(item.ino, attr_only=self._open_count.get(item.ino, 0) > 0)
                node = getattr(self.tree.inode(item.ino), "node", None)
                if isinstance(node, File) and isinstance(node.content, Rendered | TypeSnapshot | Live):
                    self._attrs_dropping[item.ino] = number  # what `open` of a rendered file waits for
            else:
                self.invalidator.entry(item.parent, item.name)

    def render(self, content: Rendered | TypeSnapshot | Live) -> bytes:
        """The bytes of a rendered file as of now (ENOENT if its object is gone)."""
        cache = self.tree.cache
        if isinstance(content, Live):
            return self._checked(content, content.render)
        if isinstance(content, TypeSnapshot):
            return self._checked(content, content.render, cache.of_type(content.type_))
        obj = cache.get(content.obj_id)
        if obj is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._checked(content, content.render, obj)

    def _checked(self, content: Rendered | TypeSnapshot | Live, render: Callable[..., Any], *args: Any) -> bytes:
        """What a render function of a view gives, if it is bytes. A plugin's bug (it raises, or gives a str)
        fails that file with EIO and one line naming the function, its traceback logged once until it
        renders again; it is left out of its directory's listing, and never fails the listing or the mount
        (pyfuse3 ends the daemon on a read reply that is not bytes)."""
        try:
            data = render(*args)
        except PLUGIN_FAILURES as err:
            self._render_failed(content, render, f"raised {type(err).__name__}: {err}", err)
        if not isinstance(data, bytes | bytearray):
            self._render_failed(content, render, f"returned {type(data).__name__}, not bytes", None)
        if self._render_failures:
            self._render_failures.pop(_render_key(content, render), None)
        return data

    def _render_failed(self, content: Rendered | TypeSnapshot | Live, render: Callable[..., Any], what: str,
                       err: BaseException | None) -> NoReturn:
        key = _render_key(content, render)
        if key not in self._render_failures:
            self._render_failures[key] = True
            log.error("render function %s %s (a bug of the view that made the file)", key[0], what, exc_info=err)
        raise XofsError(f"its render function {key[0]} {what}", errno_=errno.EIO)

    def rendered_size(self, content: Rendered | TypeSnapshot) -> int:
        """The length of `render(content)`, measured once per version of a whole-type file."""
        if isinstance(content, Rendered):
            return len(self.render(content))
        version = self.tree.cache.type_version.get(content.type_, 0)
        known = self._snapshot_sizes.get(content)
        if known is None or known[0] != version:
            known = self._snapshot_sizes[content] = (version, len(self.render(content)))
        return known[1]

    def warm(self) -> None:
        """Work out, before the mount goes live, what the first `ls -l` of each of xofs's own top-level
        directories needs: its listing, sorted, and the sizes of the export files in it (bounds walk each
        VM's disks). A third-party view's are left for their first use: a slow or broken one must not hold
        up, or stop, the start."""
        started = time.monotonic()
        for name in self.tree.sorted_names(()) or ():
            if not is_builtin(self.tree.views.get(name)):
                continue
            try:
                entries = self.tree.children((name,))
                self.tree.sorted_names((name,))
            except ViewFailed:  # logged; the mount starts without it
                continue
            for node in (entries or {}).values():
                if isinstance(node, File) and isinstance(node.content, Export) and self.exports is not None:
                    try:
                        self.exports.attrs(node.content)
                    except XofsError:  # its object went meanwhile: the listing follows with the event
                        continue
        log.debug("top-level listings worked out in %.3f s", time.monotonic() - started)

    def export_size_known(self, export: Export) -> None:
        """An export's exact length became known (or its bound changed): refresh its size in the kernel, at
        once for the files no one has open, at their close for the others (see `read`)."""
        now = []
        for ino in self.tree.files_with(export):
            if ino in self._open_count:
                self._at_close.setdefault(ino, None)
            else:
                now.append(InvalidateInode(ino))
        self.apply_invalidations(now)

    def export_bounds_changed(self, obj_id: str) -> None:
        """The size bounds of `obj_id`'s exports changed (a disk of the VM grew): refresh them in the kernel,
        which would otherwise show the old, smaller bound for up to attr_ttl."""
        self.apply_invalidations([InvalidateInode(ino) for ino in self.tree.export_files_of(obj_id)])

    def import_entries_changed(self, sr_id: str, names: list[str]) -> None:
        """Entries of an import directory changed outside a FUSE operation (an upload ended)."""
        self.apply_invalidations(self.tree.invalidate_import_dir(sr_id, names))

    def _inode(self, ino: int) -> Inode:
        inode = self.tree.inode(ino)
        if inode is None or inode.stale:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    def _obj_mtime_ns(self, obj_id: str | None) -> int:
        return self._time_ns(self.tree.cache.changed_at.get(obj_id) if obj_id else None)

    def _time_ns(self, changed: float | None) -> int:
        """The time of a change xofs saw; the mount's start for none since."""
        return int(changed * 1e9) if changed else self.started_ns

    def _file_attrs(self, inode: Inode) -> FileAttrs:
        node = inode.node
        if isinstance(node, ImportEntry):
            if self.imports is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attrs = self.imports.entries(node.sr_id).get(node.name)
            if attrs is None:
                # Gone (failed, removed), but `fstat` of a descriptor still open on it must work, as on
                # any filesystem: qemu-img would report ENOENT instead of the write's own error.
                for handle in self._handles.values():
                    if handle.ino == inode.ino:
                        attrs = self.imports.open_attrs(handle.file)
                        if attrs is not None:
                            return attrs
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs
        assert isinstance(node, File)
        if isinstance(node.content, TypeSnapshot):
            changed = self.tree.cache.type_changed_at.get(node.content.type_)
            return FileAttrs(self.rendered_size(node.content), self._time_ns(changed), 0o400)
        if isinstance(node.content, Rendered):
            return FileAttrs(self.rendered_size(node.content), self._obj_mtime_ns(node.obj_id), 0o400)
        if isinstance(node.content, Live):
            return FileAttrs(len(self.render(node.content)), time.time_ns(), 0o400)
        if self.exports is None:
            raise XofsError("exports are not available on this mount", errno_=errno.EIO)
        return self.exports.attrs(node.content)

    def attributes(self, inode: Inode, told: bool = True) -> pyfuse3.EntryAttributes:
        """What `stat` shows of `inode`; `told`: the answer goes to the kernel (not kept for a handle).

        Not a pure function: for an export file, a size `told` is recorded (`_last_told`, which `read`
        compares with where the stream ended), and while it is open, a size held (`_at_close`) is shown where
        it is larger than the current one. Every path that hands attributes to the kernel must come through
        here with `told=True`, and nothing else may.
        """
        node = inode.node
        mtime = self.started_ns
        blksize = 4096
        if isinstance(node, Dir):
            mode = 0o040500
            if node.kind == "import" and self.imports is not None:
                mode = 0o040000 | (0o500 if self.read_only else self.imports.dir_mode())
            nlink, size = 2, 0
            mtime = (self._obj_mtime_ns(node.obj_id) if node.obj_id
                     else self._time_ns(self.tree.names_changed.get(inode.path)))
        elif isinstance(node, Link):
            mode, nlink, size = 0o120777, 1, len(node.target.encode())
        else:
            attrs = self._file_attrs(inode)
            mode, nlink, size, mtime = 0o100000 | attrs.mode, 1, attrs.size, attrs.mtime_ns
            if isinstance(node, ImportEntry) or isinstance(node.content, Export):
                blksize = EXPORT_BLKSIZE  # cp and friends then move 1 MiB per request
            if isinstance(node, File) and inode.ino in self._open_count:
                # Each open of a rendered file reads the version it opened: the size must cover the
                # longest of those still open (`wc -c` of an open descriptor takes fstat's size), never less.
                # An open export file shows the size held for it (`read`).
                size = max([size, self._at_close.get(inode.ino) or 0,
                            *(len(h.file.data) for h in self._handles.values()
                              if h.ino == inode.ino and isinstance(h.file, RenderedFile) and not h.flushed)])
            if told and isinstance(node, File) and isinstance(node.content, Export):
                self._last_told[inode.ino] = size
        if not isinstance(node, (ImportEntry, Link)):  # a symlink is lrwxrwxrwx, as Linux shows every one
            mode = (mode & ~0o777) | (((mode >> 6) & 0o7) * 0o111 & ~self.umask)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
        # An import entry changes by the daemon's own doing (an upload ends, a write is refused and the entry
        # goes) and its invalidation runs a moment later in another thread: the kernel asks again every time,
        # so `ls` or `stat` right after a refused write never shows the entry still there.
        ttl = 0.0 if isinstance(node, ImportEntry) else self.freshness.ttl
        entry.entry_timeout = entry.attr_timeout = ttl
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_blksize = blksize
        entry.st_mode = mode
        entry.st_nlink = nlink
        entry.st_size = size
        entry.st_blocks = (size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = mtime
        return entry

    def _add_handle(self, ino: int, file: OpenFile) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        inode = self.tree.inode(ino)
        kept = self.attributes(inode, told=False) if inode is not None and isinstance(inode.node, File) else None
        self._handles[fh] = _Handle(ino, file, kept)
        self._open_count[ino] = self._open_count.get(ino, 0) + 1
        info = file.info
        return pyfuse3.FileInfo(fh=fh, direct_io=info.direct_io, keep_cache=info.keep_cache,
                                nonseekable=info.nonseekable)

    def _import_entry(self, parent: int, name: bytes) -> ImportEntry:
        """The import-directory entry `name` in `parent`, or EPERM when `parent` is no import directory."""
        if not self._is_import_dir(parent):
            raise XofsError("only import directories (/srs/<uuid>/import/) can be written to", errno_=errno.EPERM,
                            object_id=self._object_of(parent, name))
        if self.read_only:
            raise XofsError("the mount is read-only (--read-only)", errno_=errno.EROFS)
        pnode = self._inode(parent).node
        assert isinstance(pnode, Dir) and pnode.obj_id
        return ImportEntry(pnode.obj_id, name.decode("utf-8", "surrogateescape"))

    def _object_of(self, parent: int, name: bytes) -> str | None:
        """The XO object the entry `name` of `parent` stands for (for the log line of a refusal), if any."""
        try:
            listing = self.tree.children(self._inode(parent).path)
        except (XofsError, pyfuse3.FUSEError):
            return None
        node = None if listing is None else listing.get(name.decode("utf-8", "surrogateescape"))
        return None if node is None else node.obj_id

    def _is_import_dir(self, ino: int) -> bool:
        node = self._inode(ino).node
        return isinstance(node, Dir) and node.kind == "import" and bool(node.obj_id) and self.imports is not None

    @staticmethod
    def _check_length(name: bytes) -> None:
        """ENAMETOOLONG for a name longer than NAME_MAX bytes: the kernel leaves that check to FUSE
        filesystems (it passes names of up to 1024 bytes or more), and tools expect it."""
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)

    @staticmethod
    def _caller(ctx: pyfuse3.RequestContext | None) -> Caller:
        return Caller(ctx.pid, ctx.uid, ctx.gid) if ctx is not None else Caller()

    # ---- lookups and attributes -------------------------------------------------------------------

    @_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_length(name)
        inode = self.tree.lookup(parent_inode, name.decode("utf-8", "surrogateescape"))
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            return self.attributes(inode)
        except BaseException:
            self._forget(inode.ino, 1)
            raise

    @_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        idle = self._reads_idle.get(inode)
        if idle is not None:
            # A read of this file is out: answered in between, the kernel would not shrink the file where
            # that read ends short (see `read`), so a page-cache copy ending there would fail. A moment's
            # wait lets it answer first (stat during a copy: sequential reads leave gaps between them).
            with trio.move_on_after(GETATTR_WAIT):
                await idle.wait()
        found = self.tree.inode(inode)
        if found is None or found.stale:  # gone from XO; still open?
            kept = next((h.attrs for h in self._handles.values() if h.ino == inode and h.attrs), None)
            if kept is not None:
                return kept
            if found is not None and isinstance(found.node, Dir):
                # Still a program's working directory (or open): a deleted directory, as on a local disk.
                gone = self.attributes(found, told=False)
                gone.st_nlink = 0
                return gone
        return self.attributes(self._inode(inode))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self._forget(ino, nlookup)

    def _forget(self, ino: int, nlookup: int) -> None:
        self.tree.forget(ino, nlookup)
        if self.tree.inode(ino) is None:
            self._attrs_dropping.pop(ino, None)
            self._last_told.pop(ino, None)  # the kernel dropped the inode and the size it held

    @_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode).node
        if not isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target.encode()

    @_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        found = self.tree.inode(inode)
        if found is not None and found.stale and isinstance(found.node, Dir):
            names: list[str] | None = []  # its object went, but a program is in it: empty, as a deleted directory
        else:
            entry = self._inode(inode)
            names = self.tree.sorted_names(entry.path)
            if names is None:  # a directory that is none any more (its object went) is gone
                raise pyfuse3.FUSEError(errno.ENOENT if isinstance(entry.node, Dir) else errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        # A snapshot taken at opendir (listings are replaced, never changed in place): offsets stay valid
        # however entries come and go meanwhile.
        self._dir_handles[fh] = (inode, names)
        return fh

    @_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent, names = self._dir_handles[fh]
        pinode = self.tree.inode(parent)
        listing = self.tree.children(pinode.path) if pinode is not None and not pinode.stale else None
        if listing is None:  # the directory itself vanished since opendir
            return
        # `.` and `..` first (offsets 0 and 1), as ls -a and sshfs users expect; the kernel takes no lookup
        # of them, so none is counted.
        for offset in range(start_id, 2):
            dot = pinode if offset == 0 else self.tree.inode(self.tree.parent_ino(pinode)) or pinode
            if not pyfuse3.readdir_reply(token, b"." * (offset + 1), self.attributes(dot), offset + 1):
                return
        # Thousands of entries per call on a big directory: the methods are looked up once.
        lookup, attributes, reply, forget = (self.tree.lookup_listed, self.attributes, pyfuse3.readdir_reply,
                                             self._forget)
        for index in range(max(start_id - 2, 0), len(names)):
            name = names[index]
            inode = lookup(pinode, listing, name)
            if inode is None:  # vanished since opendir
                continue
            try:
                attrs = attributes(inode)
            except (pyfuse3.FUSEError, XofsError) as err:  # vanished meanwhile: left out, as above
                log.debug("readdir %s: %s left out: %s", self.tree.path_str(parent), name, err)
                forget(inode.ino, 1)
                continue
            if not reply(token, name.encode("utf-8", "surrogateescape"), attrs, index + 3):
                forget(inode.ino, 1)  # not delivered: the kernel took no lookup
                return

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # ---- extended attributes ----------------------------------------------------------------------

    def _xattrs(self, inode: Inode) -> dict[str, bytes]:
        node = inode.node
        out: dict[str, bytes] = {}
        obj_id = getattr(node, "obj_id", None)
        if isinstance(node, ImportEntry):
            return self.imports.xattrs(node) if self.imports else {}
        if isinstance(node, Link):
            # Linux serves `user.*` attributes on regular files and directories only: on a symlink the
            # kernel answers ENODATA without asking, so listing them there would make `rsync -aX` and
            # `getfattr -h -d` fail on names that cannot be read.
            return out
        obj = self.tree.cache.get(obj_id) if obj_id else None
        if obj is not None:
            out["user.xo.id"] = obj["id"].encode()
            out["user.xo.type"] = str(obj.get("type")).encode()
            label = obj.get("name_label")
            if isinstance(label, str):
                out["user.xo.name_label"] = label.encode("utf-8", "replace")
            pool = obj.get("$pool")
            if isinstance(pool, str):
                out["user.xo.pool"] = pool.encode()
        if isinstance(node, File) and isinstance(node.content, Export) and self.exports is not None:
            out["user.xo.export"] = f"/rest/v0/{node.content.path}".encode()
            out.update(self.exports.xattrs(node.content))
            if self._at_close.get(inode.ino) is not None:
                out["user.xo.size_exact"] = b"false"  # a size held until the file's last close (`read`)
        return out

    @_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # security.*, system.* (SELinux labels, POSIX ACLs): not supported on this filesystem. ENOTSUP
            # rather than ENODATA lets `ls -l` remember that per device instead of asking for every entry
            # (two FUSE round trips per entry otherwise). A `user.*` name the node lacks is ENODATA below:
            # ENOTSUP there would tell tools that this filesystem has no extended attributes at all.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        value = self._xattrs(self._inode(inode)).get(name.decode("utf-8", "replace"))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [k.encode() for k in self._xattrs(self._inode(inode))]

    @_op
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        entry = self._inode(inode)
        if not isinstance(entry.node, ImportEntry) or self.imports is None:
            raise XofsError("extended attributes can only be set on files in import directories",
                            errno_=errno.EPERM)
        await self.imports.setxattr(entry.node, name.decode("utf-8", "replace"), value,
                                    self.tree.path_str(inode))

    @_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise XofsError("extended attributes of XO objects cannot be removed", errno_=errno.EPERM)

    # ---- reading and writing ----------------------------------------------------------------------

    @_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self._inode(inode)
        node = entry.node
        path = self.tree.path_str(inode)
        if isinstance(node, ImportEntry) and self.imports is not None:
            return self._add_handle(inode, await self.imports.open(node, flags, self._caller(ctx), path))
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise XofsError("XO objects are read-only here; write into /srs/<uuid>/import/ to import a disk",
                            errno_=errno.EPERM)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if isinstance(node.content, Rendered | TypeSnapshot | Live):
            # The handle is made before any wait, so that a stat meanwhile covers the version it reads.
            info = self._add_handle(inode, RenderedFile(self.render(node.content)))
            number = self._attrs_dropping.get(inode)
            if number is not None:
                if self.invalidator.pending(number):
                    # The kernel may still hold the size of the version before: an fstat of this descriptor
                    # must not show less than it reads.
                    await self.invalidator.settled()
                if self._attrs_dropping.get(inode) == number:  # not one queued meanwhile, still on its way
                    del self._attrs_dropping[inode]
            return info
        if self.exports is None:
            raise XofsError("exports are not available on this mount", errno_=errno.EIO)
        return self._add_handle(inode, await self.exports.open(node.content, path, self._caller(ctx)))

    @_op
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """A read of an open file.

        `sendfile` and `splice` (`shutil.copyfile`, `pv`) read even a direct-I/O file through the page cache,
        in pages. The kernel zero-fills a short answer (the end of an export) to the end of the request, and
        shrinks the file to where the answer ended only if no attribute change of the file reached it since
        it sent the read. A `stat` answered in between (its own request may have gone out after the read's,
        before the daemon took the read: the daemon cannot see it) leaves the size it holds, which the copy
        then takes the zeros up to, and ends there with success if the size it holds is no further than the
        request's end: silently padded. So where the size the kernel was told last (`_last_told`) is more
        than a short answer of an export file gave:

        - the kernel is told that size (`_hold`) until the file's last release: a copy that took the zeros
          then reads past them, beyond the end of the stream, and fails (EIO), as again when it tries once
          more; told the length in between (a `stat`), it would end there, padded. Not until a `flush`: a
          child process closing the descriptor it inherited flushes too, while the copy goes on; and
          another descriptor of the file may be copying the same zeroed pages. The release tells the
          length. Where the kernel was told the length already, nothing is held: a copy made again after
          such a failure ends right, whatever `stat`s come (a size held larger would make the kernel take
          the zeros of the last page, had it not yet copied it);
        - where that size lies within the zeros, the read fails (EIO) instead: such a copy would end there.
          Bounds lie further than any read reaches (`BOUND_MARGIN`), so this is only for a stream that
          ended before a measured length.

        A read that fails holds the size too (at least past the read): a later call of the same copy, after
        a `stat` told a smaller size, would find the end there and succeed with what it took. A `getattr`
        while a read is out waits for its answer (at most GETATTR_WAIT), so that most short answers do
        shrink the file and such copies end right.
        """
        handle = self._handles[fh]
        ino = handle.ino
        reading = self._reading.get(ino, 0)
        self._reading[ino] = reading + 1
        if not reading:
            self._reads_idle[ino] = trio.Event()
        try:
            # A memoryview is fine: pyfuse3 takes any contiguous buffer and copies it into its reply at once.
            data = await handle.file.read(off, size)
        except Exception:
            if ino in self._last_told:
                self._hold(ino, max(self._last_told[ino], off + 1))
            raise
        finally:
            if self._reading[ino] == 1:
                del self._reading[ino]
                self._reads_idle.pop(ino).set()  # a getattr waiting runs after this answer (see `getattr`)
            else:
                self._reading[ino] -= 1
        end = off + len(data)
        if len(data) < size and self._last_told.get(ino, 0) > end:
            told = self._last_told[ino]
            self._hold(ino, told)
            if told <= off + size:
                raise XofsError(f"the stream ended at {end} bytes, short of the size the kernel may still "
                                f"hold for the file, {told}: a copy through the page cache would end there, "
                                "padded with zeros; read it again", errno_=errno.EIO,
                                object_id=self._object_id(ino))
        return data

    def _object_id(self, ino: int) -> str | None:
        """The XO object the file `ino` comes from, for an error's log line (None for an import file)."""
        inode = self.tree.inode(ino)
        node = None if inode is None else inode.node
        return node.obj_id if isinstance(node, (Dir, File, Link)) else None

    def _hold(self, ino: int, size: int) -> None:
        """Show the open export file `ino` at least `size` bytes long until its last release (`read`)."""
        self._at_close[ino] = max(self._at_close.get(ino) or 0, size)

    @_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._handles[fh].file.write(off, buf)

    @_op
    async def flush(self, fh: int) -> None:
        handle = self._handles[fh]
        await handle.file.flush(Caller())
        if handle.ino in self._at_close and self._at_close[handle.ino] is None:
            # The size a read measured reaches the kernel before the reader's close returns (`read`), so
            # that its `stat` or `rsync` right after sees it. A size held goes at the release.
            del self._at_close[handle.ino]
            self.apply_invalidations([InvalidateInode(handle.ino)])
            await self.invalidator.settled()
        elif isinstance(handle.file, RenderedFile) and not handle.flushed:
            # Its version no longer holds the size shown (`attributes`); where it held it above the current
            # one, the kernel drops that before the close returns: a `stat` right after shows the exact size.
            handle.flushed = True
            inode = self.tree.inode(handle.ino)
            if inode is not None and not inode.stale and isinstance(inode.node, File):
                with contextlib.suppress(pyfuse3.FUSEError, XofsError):  # a render that fails: no size to fix
                    held_up = self._file_attrs(inode).size < len(handle.file.data)
                    if held_up:
                        self.apply_invalidations([InvalidateInode(handle.ino)])
                        await self.invalidator.settled()

    @_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._handles[fh].file.fsync()

    @_op
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        left = self._open_count.get(handle.ino, 1) - 1
        if left:
            self._open_count[handle.ino] = left
            await handle.file.release()
            return
        self._open_count.pop(handle.ino, None)
        await handle.file.release()
        if handle.ino in self._at_close:
            # The size held (`read`), or one measured while no flush came (the reader was killed), goes now:
            # the kernel sends the release as the last descriptor's close returns (once no read is out).
            del self._at_close[handle.ino]
            self.apply_invalidations([InvalidateInode(handle.ino)])
            await self.invalidator.settled()

    @_op
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_length(name)
        entry = self._import_entry(parent_inode, name)
        file = await self.imports.create(entry, mode, self._caller(ctx), self._child_path(parent_inode, name))
        inode = self.tree.lookup(parent_inode, entry.name)
        if inode is None:
            await file.release()
            raise XofsError("the new file vanished right after it was created", errno_=errno.EIO)
        return self._add_handle(inode.ino, file), self.attributes(inode)

    # ---- changing the tree ------------------------------------------------------------------------

    @_op
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = self._inode(inode)
        node = entry.node
        if isinstance(node, Dir) and node.kind == "import" and self.imports is not None and not self.read_only:
            # `rsync -a images/ …/import/` sets the times and mode of the directory itself: accepted, and
            # nothing to keep (XO has no such thing to change).
            return self.attributes(entry)
        if not isinstance(node, ImportEntry) or self.imports is None:
            raise XofsError("attributes of XO objects cannot be changed", errno_=errno.EPERM)
        await self.imports.setattr(
            entry.node,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode & 0o7777 if fields.update_mode else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            path=self.tree.path_str(inode),
        )
        return self.attributes(entry)

    @_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        entry = self._import_entry(parent_inode, name)
        await self.imports.unlink(entry, self._child_path(parent_inode, name))

    @_op
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check_length(name_new)
        if not self._is_import_dir(parent_inode_old):
            raise XofsError("only files in import directories can be renamed (to import a file, copy it into "
                            "/srs/<uuid>/import/)", errno_=errno.EPERM,
                            object_id=self._object_of(parent_inode_old, name_old))
        entry = self._import_entry(parent_inode_old, name_old)
        if parent_inode_new != parent_inode_old:
            self._import_entry(parent_inode_new, name_new)  # EPERM when the target is no import directory
            raise XofsError("a file can only be renamed within its own import directory", errno_=errno.EXDEV)
        if flags:
            # RENAME_NOREPLACE, RENAME_EXCHANGE: not supported. mv asks for RENAME_NOREPLACE first and falls
            # back to a plain rename on EINVAL, so this is no failure worth a warning (logged at DEBUG).
            raise pyfuse3.FUSEError(errno.EINVAL)
        new_name = name_new.decode("utf-8", "surrogateescape")
        await self.imports.rename(entry, new_name, self._child_path(parent_inode_old, name_old))
        self.tree.rename_import(parent_inode_old, entry.name, new_name)

    @_op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> None:
        raise XofsError("directories cannot be made on xofs", errno_=errno.EPERM)

    @_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise XofsError("directories cannot be removed on xofs (nothing in XO is deleted through the mount)",
                        errno_=errno.EPERM, object_id=self._object_of(parent_inode, name))

    @_op
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise XofsError("symbolic links cannot be made on xofs", errno_=errno.EPERM)

    @_op
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise XofsError("hard links cannot be made on xofs", errno_=errno.EPERM)

    @_op
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> None:
        raise XofsError("special files cannot be made on xofs", errno_=errno.EPERM)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stat = pyfuse3.StatvfsData()
        total = free = 0
        for sr in self.tree.cache.of_type("SR").values():
            size, usage = sr.get("size"), sr.get("usage")
            if isinstance(size, int) and isinstance(usage, int) and size >= 0 and sr.get("content_type") != "iso":
                total += size
                free += max(size - usage, 0)
        stat.f_bsize = stat.f_frsize = 1 << 20
        stat.f_blocks = total >> 20
        stat.f_bfree = stat.f_bavail = free >> 20
        # Nothing here runs out of inodes: report plenty free (as rclone does), not none (`df -i` at 100%).
        stat.f_ffree = stat.f_favail = FREE_INODES
        stat.f_files = len(self.tree.cache) + FREE_INODES
        stat.f_namemax = 255
        return stat
