"""The floor under `find` on any pyfuse3 + trio filesystem: a tree held in memory, every answer made ahead.

Used by scripts/bench_mount.py as the baseline for `find /mnt | wc -l`: the same number of directories and
entries as the mount of 10,000 VMs, served by handlers that do nothing but hand out what was computed at
start. Whatever `find` costs on it is what pyfuse3's request loop, trio and the kernel cost, with no xofs
in between (each directory takes at least four requests: OPENDIR, READDIRPLUS, a second READDIRPLUS that
finds the end, RELEASEDIR).

    python scripts/fuse_floor.py MOUNTPOINT DIRS ENTRIES
    python scripts/fuse_floor.py --wide MOUNTPOINT DIRS FILES

Mounts at MOUNTPOINT and serves until SIGTERM or SIGINT (then unmounts). The tree: a root with about
sqrt(DIRS) directories, each with as many directories, each of those with files, so that the totals come
close to DIRS directories and ENTRIES entries. With `--wide`, the floor under a first `ls -l` of one big
directory instead: the root holds one directory, `wide`, of DIRS empty directories and FILES files (as
`/vms` holds a directory and three export files per VM).
"""

from __future__ import annotations

import errno
import math
import signal
import stat
import sys

import pyfuse3
import trio

TTL = 60.0


class FloorFS(pyfuse3.Operations):
    def __init__(self, dirs: int, entries: int, *, wide: bool = False) -> None:
        super().__init__()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self._next = pyfuse3.ROOT_INODE
        root = self._add(None, b"", directory=True)
        if wide:
            big = self._add(root, b"wide", directory=True)
            for a in range(dirs):
                self._add(big, b"d%08d" % a, directory=True)
            for c in range(entries):
                self._add(big, b"f%08d.xva" % c, directory=False)
            return
        top = max(1, math.isqrt(dirs))
        per_top = max(1, (dirs - 1 - top) // top)
        files = max(0, round((entries - top - top * per_top) / (top * per_top)))
        for a in range(top):
            middle = self._add(root, b"d%d" % a, directory=True)
            for b in range(per_top):
                leaf = self._add(middle, b"e%d" % b, directory=True)
                for c in range(files):
                    self._add(leaf, b"f%d" % c, directory=False)

    def _add(self, parent: int | None, name: bytes, *, directory: bool) -> int:
        ino = self._next
        self._next += 1
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.st_mode = (stat.S_IFDIR | 0o500) if directory else (stat.S_IFREG | 0o400)
        attrs.st_nlink = 2 if directory else 1
        attrs.st_size = 0 if directory else 100
        attrs.entry_timeout = attrs.attr_timeout = TTL
        self.attrs[ino] = attrs
        if directory:
            self.children[ino] = []
        if parent is not None:
            self.children[parent].append((name, ino))
        return ino

    @property
    def shape(self) -> tuple[int, int]:
        """(directories, entries below the root)."""
        return len(self.children), len(self.attrs) - 1

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        for child, ino in self.children.get(parent_inode, ()):
            if child == name:
                return self.attrs[ino]
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self.children[fh]
        for index in range(start_id, len(children)):
            name, ino = children[index]
            if not pyfuse3.readdir_reply(token, name, self.attrs[ino], index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None


async def serve() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            print("ready", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def mount_and_serve(fs: pyfuse3.Operations, mountpoint: str, fsname: str) -> int:
    """Mount `fs`, print "ready", serve until SIGTERM or SIGINT, unmount (scripts/export_floor.py too)."""
    pyfuse3.init(fs, mountpoint, {f"fsname={fsname}", "default_permissions"})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


def main() -> int:
    args = sys.argv[1:]
    wide = args[:1] == ["--wide"]
    mountpoint, dirs, entries = args[wide], int(args[wide + 1]), int(args[wide + 2])
    fs = FloorFS(dirs, entries, wide=wide)
    dirs_made, entries_made = fs.shape
    print(f"shape {dirs_made} directories, {entries_made} entries", flush=True)
    return mount_and_serve(fs, mountpoint, "xofs-floor")


if __name__ == "__main__":
    raise SystemExit(main())
