"""The file tree the kernel sees: inode numbers, directory listings, and what a change in XO invalidates.

Pure logic, no FUSE calls: the adapter (xofs.fs) asks it for nodes and listings, and hands the
invalidations it returns to the worker that talks to the kernel (xofs.invalidator).

- An inode stands for a path. Numbers are never reused, and an inode lives while the kernel holds a
  lookup on it (`forget` ends it); a path that vanished from XO keeps its inode, marked stale, until then.
- A directory's listing is computed by its view on first use and kept, with what it depended on (see
  xofs.views.ViewContext), until an event touches one of those dependencies; the new listing is compared
  with the old one, and only names that vanished or changed are invalidated in the kernel.
- A listing that is costly to compute (a search over every object: 12 ms with 300 VMs, 0.4 s with
  10,000) is computed again at most once per RELIST_SPACING times what it cost: in a burst of changes
  (hundreds a second) it was computed again for every batch, the daemon fell behind the event feed, every
  other view went stale for tens of seconds and the feed's keepalive answer, queued behind the backlog,
  came too late (the feed was taken for lost). Changes to it meanwhile wait in `_deferred` until
  `relist_due`, which the syncer calls when `next_due` comes.
- A listing nothing has used for IDLE_LISTING seconds is not computed again at a change: it is dropped,
  and the kernel told to forget every entry it had (so that none shows stale), and the next use computes
  it afresh. Each search directory ever listed was otherwise computed again at every change it depended on
  for as long as the mount lived: a dozen bare-term searches, looked at once each, kept the daemon busy
  with metric events alone until its feed's keepalive went unanswered (helper 55). Meanwhile, for a
  directory standing for no object, every change of what it depended on moves the directory's time
  (`names_changed`), its names not worked out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from xofs.cache import Change, ObjectCache
from xofs.errors import XofsError
from xofs.files import ImportEntry, ImportService
from xofs.views import (
    PLUGIN_FAILURES,
    Dir,
    Export,
    File,
    Node,
    TypeSnapshot,
    View,
    ViewContext,
    is_builtin,
    name_problem,
    node_problem,
)

log = logging.getLogger(__name__)

ROOT_INODE = 1  # pyfuse3.ROOT_INODE
_SORT_AGAIN = 16  # directories of at most this many entries are sorted on each opendir

TreeNode = Node | ImportEntry
SLOW_VIEW = 1.0  # seconds: a view's listing that takes longer is logged (once per directory)
COSTLY_LISTING = 0.002  # seconds: a listing that took less to compute follows every batch of changes at once
RELIST_SPACING = 10  # a costlier one at most once per this many times its cost: a tenth of the daemon's time
IDLE_LISTING = 30.0  # seconds: a listing not used for this long is dropped at a change, not computed again
FAILED_KEPT = 10_000  # plugin problems remembered as logged


class ViewFailed(XofsError):
    """A view plugin raised, or answered something that is no listing: the directory fails with EIO."""
Path = tuple[str, ...]


@dataclass(slots=True)
class Inode:
    ino: int
    path: Path
    node: TreeNode
    lookups: int = 0
    stale: bool = False  # the path no longer exists in XO; kept until the kernel forgets it


@dataclass(frozen=True, slots=True)
class InvalidateEntry:
    """The kernel must drop its dentry `name` in directory `parent`."""

    parent: int
    name: str


@dataclass(frozen=True, slots=True)
class InvalidateInode:
    """The kernel must drop cached attributes (and data) of `ino`."""

    ino: int


Invalidation = InvalidateEntry | InvalidateInode


@dataclass(slots=True)
class _Listing:
    children: dict[str, TreeNode]
    ids: str | tuple[str, ...] = ()  # the one object most listings depend on, or a tuple (not a set): `_ids`
    types: dict[str, frozenset[str]] | None = None
    names: list[str] | None = None  # sorted, made on first use (readdir)
    due: float = 0.0  # a costly one: till when a change puts its computing off (time.monotonic(); see on_changes)
    used: float = 0.0  # time.monotonic() when a lookup or readdir last used it (see IDLE_LISTING)


# The indexes (an object id to the listings or files that depend on it, a path to the paths below it) hold
# one value for most keys (one directory per object, one meta.json), a short list for a few values and a
# set only past _FEW: with 10,000 VMs found, some 110,000 keys hold several values, and a set costs 216
# bytes where a list of two costs 72 (tracemalloc: 35 MB of sets, the daemon above its 300 MB goal).
# Values are never lists (paths are tuples).
K = TypeVar("K")
V = TypeVar("V", bound=Hashable)
Held = V | list[V] | set[V]
_FEW = 8


def _index_add(index: dict[K, Held], key: K, value: V) -> None:
    held = index.get(key)
    if held is None:
        index[key] = value
    elif isinstance(held, set):
        held.add(value)
    elif isinstance(held, list):
        if value not in held:
            if len(held) < _FEW:
                held.append(value)
            else:
                index[key] = {*held, value}
    elif held != value:
        index[key] = [held, value]


def _index_discard(index: dict[K, Held], key: K, value: V) -> None:
    held = index.get(key)
    if isinstance(held, list):
        if value in held:
            held.remove(value)
            if len(held) == 1:
                index[key] = held[0]
    elif isinstance(held, set):
        held.discard(value)
        if not held:
            del index[key]
    elif held is not None and held == value:
        del index[key]


def _values(held: Held | None) -> Iterable[V]:
    if held is None:
        return ()
    return held if isinstance(held, (list, set)) else (held,)


def _indexed(index: dict[K, Held], key: K) -> Iterable[V]:
    return _values(index.get(key))


def _ids(listing: _Listing) -> tuple[str, ...]:
    return (listing.ids,) if isinstance(listing.ids, str) else listing.ids


class Tree:
    def __init__(self, cache: ObjectCache, views: Mapping[str, View], imports: ImportService | None = None) -> None:
        self.cache = cache
        self.views = dict(views)
        self.imports = imports
        self._next_ino = ROOT_INODE + 1
        self.inodes: dict[int, Inode] = {ROOT_INODE: Inode(ROOT_INODE, (), Dir(), lookups=1)}
        self._by_path: dict[Path, int] = {(): ROOT_INODE}
        self._listings: dict[Path, _Listing] = {}
        self._dep_ids: dict[str, Held[Path]] = {}
        self._dep_types: dict[str, dict[Path, frozenset[str]]] = {}
        # object id -> inodes of the files rendered from it and of the directories standing for it (whose
        # st_mtime is the object's)
        self._files_of: dict[str, Held[int]] = {}
        self._files_of_type: dict[str, Held[int]] = {}  # XO type -> inodes of files rendered from all of it
        self._failed: set[Hashable] = set()  # what was logged once: failed listings, bad entries, slow views
        self._deferred: dict[Path, float] = {}  # costly listings changes touched -> when to compute them again
        # path -> the paths one level below it that have an inode or a listing, or such paths below them:
        # what a vanished directory takes along is found without going through every path known (10,000
        # VMs removed at once on a mount with 10,000 looked up took seconds, the whole mount waiting).
        self._below: dict[Path, Held[Path]] = {}
        # Directories standing for no object (collections, /by-name, searches) whose names xofs saw change
        # -> when (time.time(), their st_mtime), while they have an inode: as on a disk, a file manager or a
        # `find -newer` sees entries come and go by the directory's time.
        self.names_changed: dict[Path, float] = {}
        # Such directories' idle listings, dropped at a change (IDLE_LISTING), without their entries: what
        # they depended on still moves the directory's time until they are listed again or forgotten.
        self._dormant: dict[Path, _Listing] = {}

    # ---- reading the tree -------------------------------------------------------------------------

    def inode(self, ino: int) -> Inode | None:
        return self.inodes.get(ino)

    def path_str(self, ino: int) -> str:
        inode = self.inodes.get(ino)
        return "/" + "/".join(inode.path) if inode else f"<inode {ino}>"

    def node_at(self, path: Path) -> TreeNode | None:
        if not path:
            return Dir()
        parent = self.children(path[:-1])
        if parent is None:
            return None
        node = parent.get(path[-1])
        return node if node is not None else self._unlisted(path)

    def _unlisted(self, path: Path) -> TreeNode | None:
        """An entry its view does not list but answers for when asked by name (the optional `View.lookup`)."""
        view = self.views.get(path[0]) if len(path) > 1 else None
        lookup = getattr(view, "lookup", None)
        if lookup is None:
            return None
        where = "/" + "/".join(path)
        try:
            node = lookup(ViewContext(self.cache), path[1:-1], path[-1])
        except PLUGIN_FAILURES as exc:  # a buggy (third-party) view must not take the mount down
            if self._first_time((path, "lookup")):
                log.error("view /%s failed to look up %s: %s: %s", path[0], where, type(exc).__name__, exc,
                          exc_info=exc)
            raise ViewFailed(f"view /{path[0]} failed to look up {where} (its traceback is in the log)") from None
        self._failed.discard((path, "lookup"))
        problem = None if node is None else node_problem(node)
        if problem is not None:
            log.warning("view /%s answered a lookup of %s with no node: %s", path[0], where, problem)
            return None
        return node

    def children(self, path: Path) -> Mapping[str, TreeNode] | None:
        """The entries of the directory at `path`, or None when it is not a directory (any more)."""
        listing = self._listings.get(path)
        if listing is not None:
            listing.used = time.monotonic()
            return listing.children
        if not path:
            listing = _Listing({name: getattr(view, "node", None) or Dir() for name, view in self.views.items()})
        else:
            node = self.node_at(path)
            if not isinstance(node, Dir):
                return None
            if node.kind == "import":
                # Import directories change through the operations on them; they are never cached here.
                if self.imports is None or node.obj_id is None:
                    return {}
                return {name: ImportEntry(node.obj_id, name) for name in self.imports.entries(node.obj_id)}
            view = self.views.get(path[0])
            if view is None:
                return None
            listing = self._list_view(view, path)
            if listing is None:
                return None
        self._store_listing(path, listing)
        return listing.children

    def _list_view(self, view: View, path: Path) -> _Listing | None:
        """A view's listing, checked: a view that raises or answers no mapping fails the directory with
        `ViewFailed` (its traceback logged once, until it lists again); a third-party view's entries that
        the kernel would refuse are left out with a warning, and its slow listings logged. A buggy view must
        not take the mount down. A costly listing keeps till when to put off computing it again
        (`_Listing.due`: see `on_changes`)."""
        ctx = ViewContext(self.cache)
        where = "/" + "/".join(path)
        own = is_builtin(view)  # xofs's own views are not checked nor logged slow
        started = time.monotonic()
        try:
            answer = view.children(ctx, path[1:])
            if answer is not None and not isinstance(answer, Mapping):
                raise TypeError(f"children() answered a {type(answer).__name__}, not a mapping of names to nodes")
            entries = None if answer is None else dict(answer)  # a plugin's own mapping may raise here too
        except PLUGIN_FAILURES as exc:
            if self._first_time(path):  # the cause on the line itself: `xofs status` shows only that line
                log.error("view /%s failed to list %s: %s: %s", path[0], where, type(exc).__name__, exc,
                          exc_info=exc)
            raise ViewFailed(f"view /{path[0]} failed to list {where} (its traceback is in the log)") from None
        finally:
            if not own:
                self._report_slow(path, time.monotonic() - started)
        self._failed.discard(path)
        if entries is None:
            return None
        made = time.monotonic()
        cost = made - started
        due = made + RELIST_SPACING * cost if cost >= COSTLY_LISTING else 0.0
        ids = tuple(ctx.ids)
        if len(ids) == 1:
            ids = ids[0]
        if own:  # checking costs 18 ms per 40,000 entries
            return _Listing(entries, ids, ctx.types or None, due=due)
        checked = {}
        for name, node in entries.items():
            problem = name_problem(name) or node_problem(node)
            if problem is None:
                checked[name] = node
            elif self._first_time((path, repr(name))):
                log.warning("view /%s lists %r in %s, left out: %s", path[0], name, where, problem)
        return _Listing(checked, ids, ctx.types or None, due=due)

    def _first_time(self, key: Hashable) -> bool:
        """Whether a plugin's problem `key` is new (logged once); the memory of them is bounded."""
        if key in self._failed:
            return False
        if len(self._failed) >= FAILED_KEPT:  # a plugin churning bad names: some are logged again
            self._failed.clear()
        self._failed.add(key)
        return True

    def _report_slow(self, path: Path, seconds: float) -> None:
        """Views run in the thread that answers the kernel: a slow one stalls the whole mount."""
        if seconds > SLOW_VIEW and self._first_time((path, "slow")):
            log.warning("view /%s took %.1f s to list %s, and the whole mount waited: a view must answer from "
                        "the object cache, without I/O (docs/views.md)", path[0], seconds, "/" + "/".join(path))

    def sorted_names(self, path: Path) -> list[str] | None:
        """The names in the directory at `path`, sorted (kept with the listing of a big directory: it is
        listed again and again; a small one is sorted again, rather than keep 40,000 short lists)."""
        children = self.children(path)
        if children is None:
            return None
        listing = self._listings.get(path)
        if listing is None or len(children) <= _SORT_AGAIN:  # import directories are never kept
            return sorted(children)
        if listing.names is None:
            listing.names = sorted(listing.children)
        return listing.names

    def lookup(self, parent: int, name: str) -> Inode | None:
        """The child `name` of `parent`, counting one kernel lookup on it; None if it does not exist."""
        pinode = self.inodes.get(parent)
        if pinode is None or pinode.stale:
            return None
        listing = self.children(pinode.path)
        return None if listing is None else self.lookup_listed(pinode, listing, name)

    def lookup_listed(self, pinode: Inode, listing: Mapping[str, TreeNode], name: str) -> Inode | None:
        """`lookup` of `name` in `pinode`, whose listing `listing` (from `children`) is at hand: readdir's
        loop takes the listing once for thousands of names."""
        path = pinode.path + (name,)
        node = listing.get(name)
        if node is None:
            node = self._unlisted(path)
            if node is None:
                return None
        inode = self._inode_for(path, node)
        inode.lookups += 1
        return inode

    def forget(self, ino: int, nlookup: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None or ino == ROOT_INODE:
            return
        inode.lookups -= nlookup
        if inode.lookups > 0:
            return
        del self.inodes[ino]
        if self._by_path.get(inode.path) == ino:
            del self._by_path[inode.path]
            self.names_changed.pop(inode.path, None)
            self._drop_listing(inode.path)
            self._unnote(inode.path)
        self._unindex_file(inode)

    # ---- changes from XO --------------------------------------------------------------------------

    def on_changes(self, changes: Iterable[Change]) -> list[Invalidation]:
        """Recompute what the changes touch (a costly listing when due: see the module's docstring); return
        the kernel invalidations they need."""
        out: list[Invalidation] = []
        affected: set[Path] = set()
        for ch in changes:
            affected.update(_indexed(self._dep_ids, ch.obj_id))
            watchers = self._dep_types.get(ch.type)
            if watchers:
                fields = ch.changed_fields() if ch.old is not None and ch.new is not None else None
                affected.update(p for p, watch in watchers.items() if fields is None or watch & fields)
            out.extend(InvalidateInode(ino) for ino in _indexed(self._files_of, ch.obj_id))
            out.extend(InvalidateInode(ino) for ino in _indexed(self._files_of_type, ch.type))
        now = time.monotonic()
        now_due: list[Path] = []
        for path in affected:
            listing = self._listings.get(path)
            if listing is None and path in self._dormant:
                out.extend(self._dormant_changed(path))
            if listing is None or path in self._deferred:  # not listed; or put off already, till it is due
                continue
            if listing.due > now and now - listing.used <= IDLE_LISTING:
                self._deferred[path] = listing.due
            else:
                now_due.append(path)
        now_due.extend(path for path, due in self._deferred.items() if due <= now)
        out.extend(self._relist(now_due))
        return list(dict.fromkeys(out))  # a batch may touch one file many times

    def next_due(self) -> float | None:
        """When the first listing put off by `on_changes` is due (time.monotonic()), None if none is."""
        return min(self._deferred.values(), default=None)

    def relist_due(self) -> list[Invalidation]:
        """Compute again the put-off listings that are due; the kernel invalidations that needs."""
        now = time.monotonic()
        return list(dict.fromkeys(self._relist([path for path, due in self._deferred.items() if due <= now])))

    def _relist(self, paths: list[Path]) -> list[Invalidation]:
        out: list[Invalidation] = []
        now = time.monotonic()
        for path in sorted(set(paths), key=len):  # parents first: a vanished parent takes its subtree along
            old = self._listings.get(path)
            if old is None:
                self._deferred.pop(path, None)
                continue
            self._drop_listing(path)
            if now - old.used > IDLE_LISTING:  # unused: forgotten, here and in the kernel, till it is used
                dir_ino = self._by_path.get(path)
                if dir_ino is not None:
                    out.extend(InvalidateEntry(dir_ino, name) for name in old.children)
                    # What it depends on changed: its names may have (not worked out, to save that cost).
                    if changed := self._names_changed(path, dir_ino):
                        out.extend(changed)
                        old.children, old.names = {}, None
                        self._dormant[path] = old
                        self._index_listing(path, old)
                continue
            try:
                new = self.children(path) or {}
            except ViewFailed:  # logged; its entries are gone until the view lists again
                new = {}
            if (kept := self._listings.get(path)) is not None:
                kept.used = old.used  # computing it again is no use of it
            dir_ino = self._by_path.get(path)
            if dir_ino is not None and new.keys() != old.children.keys():
                out.extend(self._names_changed(path, dir_ino))
            for name, node in old.children.items():
                if new.get(name) == node:
                    continue
                child = self._by_path.get(path + (name,))
                if name in new and child is not None and _same_kind(node, new[name]):
                    self._rebind(self.inodes[child], new[name])  # same file, new size or target
                    out.append(InvalidateInode(child))
                    continue
                if dir_ino is not None:
                    out.append(InvalidateEntry(dir_ino, name))
                self._detach(path + (name,))
        return out

    def _names_changed(self, path: Path, dir_ino: int) -> list[Invalidation]:
        """The names in the directory at `path` changed: its time, if it stands for no object (an object's
        directory carries the object's time), and the kernel's copy of it."""
        node = self.inodes[dir_ino].node
        if not isinstance(node, Dir) or node.obj_id:
            return []
        self.names_changed[path] = time.time()
        return [InvalidateInode(dir_ino)]

    def _dormant_changed(self, path: Path) -> list[Invalidation]:
        """Something the dormant listing at `path` depended on changed: the directory's time moves."""
        dir_ino = self._by_path.get(path)
        if dir_ino is None:
            self._drop_listing(path)
            return []
        return self._names_changed(path, dir_ino)

    def rename_import(self, parent: int, old: str, new: str) -> None:
        """A file in an import directory was renamed: its inode now stands for the new name (the kernel
        moves the dentry and keeps the inode), and whatever had the new name before is gone."""
        pinode = self.inodes.get(parent)
        if pinode is None:
            return
        old_path, new_path = pinode.path + (old,), pinode.path + (new,)
        replaced = self._by_path.pop(new_path, None)
        if replaced is not None:
            self.inodes[replaced].stale = True
            self._unnote(new_path)
        ino = self._by_path.pop(old_path, None)
        if ino is None:
            return
        self._unnote(old_path)
        inode = self.inodes[ino]
        inode.path = new_path
        if isinstance(inode.node, ImportEntry):
            inode.node = ImportEntry(inode.node.sr_id, new)
        self._by_path[new_path] = ino
        self._note(new_path)

    def parent_ino(self, inode: Inode) -> int:
        """The inode of the directory holding `inode` (the root's own for the root, as for `/..`)."""
        return self._by_path.get(inode.path[:-1], ROOT_INODE) if inode.path else ROOT_INODE

    def files_with(self, content: object) -> list[int]:
        """The live inodes of files showing `content` (an Export or a Rendered)."""
        obj_id = getattr(content, "obj_id", None)
        return [ino for ino in _indexed(self._files_of, obj_id)
                if isinstance(self.inodes[ino].node, File) and self.inodes[ino].node.content == content]

    def export_files_of(self, obj_id: str) -> list[int]:
        """The live inodes of files showing an export of `obj_id`."""
        return [ino for ino in _indexed(self._files_of, obj_id)
                if isinstance(self.inodes[ino].node, File) and isinstance(self.inodes[ino].node.content, Export)]

    def invalidate_import_dir(self, sr_id: str, names: Iterable[str]) -> list[Invalidation]:
        """Entries of an import directory that changed outside a FUSE operation (an upload finished)."""
        out: list[Invalidation] = []
        for path, ino in list(self._by_path.items()):
            node = self.inodes[ino].node
            if isinstance(node, Dir) and node.kind == "import" and node.obj_id == sr_id:
                out.extend(InvalidateEntry(ino, name) for name in names)
                for name in names:
                    child = self._by_path.get(path + (name,))
                    if child is not None:
                        out.append(InvalidateInode(child))
        return out

    # ---- bookkeeping ------------------------------------------------------------------------------

    def _inode_for(self, path: Path, node: TreeNode) -> Inode:
        ino = self._by_path.get(path)
        if ino is not None:
            inode = self.inodes[ino]
            if inode.node is node:  # the usual case: the listing the inode came from is still current
                return inode
            if _same_kind(inode.node, node):
                if inode.node != node:
                    self._rebind(inode, node)
                return inode
            self._detach(path)
        inode = Inode(self._next_ino, path, node)
        self._next_ino += 1
        self.inodes[inode.ino] = inode
        self._by_path[path] = inode.ino
        self._note(path)
        self._index_file(inode)
        return inode

    def _rebind(self, inode: Inode, node: TreeNode) -> None:
        self._unindex_file(inode)
        inode.node = node
        self._index_file(inode)

    def _detach(self, path: Path) -> None:
        """The path is gone: its inode (and those below it) become stale until the kernel forgets them."""
        todo = [path]
        while todo:
            p = todo.pop()
            ino = self._by_path.pop(p, None)
            if ino is not None and (inode := self.inodes.get(ino)) is not None:
                inode.stale = True
            self._drop_listing(p, unnote=False)
            todo.extend(_values(self._below.pop(p, None)))
        self._unnote(path)

    def _note(self, path: Path) -> None:
        """`path` has an inode or a listing now: reachable from its parents in `_below`."""
        while path:
            parent = path[:-1]
            if (ino := self._by_path.get(parent)) is not None:
                parent = self.inodes[ino].path  # that tuple, not a copy: 41,000 of them with 10,000 VMs found
            known = parent in self._below
            _index_add(self._below, parent, path)
            if known:
                return
            path = parent  # the parent was known through nothing else: it must be reachable too

    def _unnote(self, path: Path) -> None:
        """`path` lost its inode or listing: out of `_below` once nothing keeps it there, and so on up."""
        while path and path not in self._by_path and path not in self._listings and path not in self._below:
            parent = path[:-1]
            if parent not in self._below:
                return
            _index_discard(self._below, parent, path)
            if parent in self._below:
                return
            path = parent

    def _store_listing(self, path: Path, listing: _Listing) -> None:
        listing.used = time.monotonic()
        if (dormant := self._dormant.pop(path, None)) is not None:
            self._unindex_listing(path, dormant)
        self._listings[path] = listing
        self._note(path)
        self._index_listing(path, listing)

    def _index_listing(self, path: Path, listing: _Listing) -> None:
        for obj_id in _ids(listing):
            _index_add(self._dep_ids, obj_id, path)
        for type_, fields in (listing.types or {}).items():
            self._dep_types.setdefault(type_, {})[path] = fields

    def _unindex_listing(self, path: Path, listing: _Listing) -> None:
        for obj_id in _ids(listing):
            _index_discard(self._dep_ids, obj_id, path)
        for type_ in listing.types or ():
            self._dep_types.get(type_, {}).pop(path, None)

    def _drop_listing(self, path: Path, *, unnote: bool = True) -> None:
        """The listing at `path` goes, and a dormant one."""
        self._deferred.pop(path, None)
        if (dormant := self._dormant.pop(path, None)) is not None:
            self._unindex_listing(path, dormant)
        listing = self._listings.pop(path, None)
        if listing is None:
            return
        if unnote:
            self._unnote(path)
        self._unindex_listing(path, listing)

    def _file_index(self, inode: Inode) -> tuple[dict[str, Held[int]], str] | None:
        node = inode.node
        if isinstance(node, Dir):
            return (self._files_of, node.obj_id) if node.obj_id else None
        if not isinstance(node, File):
            return None
        if isinstance(node.content, TypeSnapshot):
            return self._files_of_type, node.content.type_
        return (self._files_of, node.obj_id) if node.obj_id else None

    def _index_file(self, inode: Inode) -> None:
        where = self._file_index(inode)
        if where:
            _index_add(where[0], where[1], inode.ino)

    def _unindex_file(self, inode: Inode) -> None:
        where = self._file_index(inode)
        if where:
            _index_discard(where[0], where[1], inode.ino)


def _same_kind(a: TreeNode, b: TreeNode) -> bool:
    """Whether an inode can keep its number across the change from node a to node b."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Dir) and isinstance(b, Dir):
        return a.kind == b.kind
    if isinstance(a, File) and isinstance(b, File):
        return type(a.content) is type(b.content)
    return True
