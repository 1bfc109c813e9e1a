"""Two ways to drive the same behaviour suite (rclone's vfstest, s3ql's t3/t4 tiers).

`DirectDriver` calls the `XoFS` operations object in the test's own trio loop, with no kernel in
between: fast, and failures point at xofs's own logic. `MountDriver` goes through a real kernel mount of
`xofs mount` in a subprocess with ordinary system calls: what cp, rsync and a file browser see. Both
answer the same questions with the same types, and raise `OSError` with an errno on failure.
"""

from __future__ import annotations

import os
import stat as stat_mod
import unittest.mock
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyfuse3

READDIR_PIECE = 7  # entries per readdir call of DirectDriver.listdir: small, so that listings come in pieces


@dataclass
class Stat:
    mode: int
    size: int
    uid: int
    mtime_ns: int
    blksize: int

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)

    @property
    def perm(self) -> int:
        return self.mode & 0o7777


class DirectDriver:
    name = "direct"

    def __init__(self, fs) -> None:
        self.fs = fs
        self.ctx = pyfuse3.RequestContext()

    async def _resolve(self, path: str) -> int:
        ino = pyfuse3.ROOT_INODE
        for part in [p for p in path.split("/") if p]:
            try:
                attrs = await self.fs.lookup(ino, part.encode(), self.ctx)
            except pyfuse3.FUSEError as err:
                raise OSError(err.errno, os.strerror(err.errno), path) from None
            ino = attrs.st_ino
        return ino

    async def listdir(self, path: str) -> list[str]:
        """As the kernel lists a directory: opendir, readdir in pieces of READDIR_PIECE entries (each
        starting at the offset the last one ended with), releasedir."""
        ino = await self._resolve(path)

        def reply(piece: list, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
            if len(piece) == READDIR_PIECE:
                return False  # the kernel's buffer is full: this entry comes in the next piece
            piece.append((name.decode("utf-8", "surrogateescape"), attrs.st_ino, next_id))
            return True

        names: list[str] = []
        try:
            fh = await self.fs.opendir(ino, self.ctx)
            try:
                offset = 0
                with unittest.mock.patch.object(pyfuse3, "readdir_reply", reply):
                    while True:
                        piece: list = []
                        await self.fs.readdir(fh, offset, piece)
                        if not piece:
                            break
                        for name, entry_ino, _ in piece:
                            inode = self.fs.tree.inode(entry_ino)
                            if name in (".", ".."):  # first, and no lookup counted (os.listdir skips them)
                                dir_inode = self.fs.tree.inode(ino)
                                assert inode is not None and not names and inode.path == (
                                    dir_inode.path if name == "." else dir_inode.path[:-1]), name
                                continue
                            assert inode is not None and inode.path[-1] == name and inode.lookups > 0, name
                            names.append(name)
                        offset = piece[-1][2]
            finally:
                await self.fs.releasedir(fh)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None
        return sorted(names)

    async def stat(self, path: str) -> Stat:
        ino = await self._resolve(path)
        try:
            a = await self.fs.getattr(ino, self.ctx)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None
        return Stat(a.st_mode, a.st_size, a.st_uid, a.st_mtime_ns, a.st_blksize)

    async def statvfs(self) -> tuple[int, int, int, int, int]:
        """f_frsize, f_blocks, f_bfree, f_files, f_ffree."""
        s = await self.fs.statfs(self.ctx)
        return s.f_frsize, s.f_blocks, s.f_bfree, s.f_files, s.f_ffree

    async def read(self, path: str) -> bytes:
        ino = await self._resolve(path)
        try:
            info = await self.fs.open(ino, os.O_RDONLY, self.ctx)
            chunks = []
            offset = 0
            while True:
                chunk = await self.fs.read(info.fh, offset, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
            await self.fs.release(info.fh)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None
        return b"".join(chunks)

    async def readlink(self, path: str) -> str:
        ino = await self._resolve(path)
        try:
            return (await self.fs.readlink(ino, self.ctx)).decode()
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None

    async def getxattr(self, path: str, name: str) -> bytes:
        ino = await self._resolve(path)
        try:
            return await self.fs.getxattr(ino, name.encode(), self.ctx)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None

    async def listxattr(self, path: str) -> list[str]:
        ino = await self._resolve(path)
        return sorted(n.decode() for n in await self.fs.listxattr(ino, self.ctx))

    async def _in_parent(self, path: str, op, *args) -> None:
        """`op(parent inode, name, *args, ctx)` for `path`; a FUSEError as the OSError the kernel would give."""
        parent, name = path.rsplit("/", 1)
        ino = await self._resolve(parent)
        try:
            await op(ino, name.encode(), *args, self.ctx)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None

    async def mkdir(self, path: str) -> None:
        await self._in_parent(path, self.fs.mkdir, 0o755)

    async def unlink(self, path: str) -> None:
        await self._in_parent(path, self.fs.unlink)

    async def rmdir(self, path: str) -> None:
        await self._in_parent(path, self.fs.rmdir)

    async def rename(self, old: str, new: str) -> None:
        pold, nold = old.rsplit("/", 1)
        pnew, nnew = new.rsplit("/", 1)
        ino_old, ino_new = await self._resolve(pold), await self._resolve(pnew)
        try:
            await self.fs.rename(ino_old, nold.encode(), ino_new, nnew.encode(), 0, self.ctx)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), old) from None

    async def open_write(self, path: str) -> None:
        ino = await self._resolve(path)
        try:
            info = await self.fs.open(ino, os.O_WRONLY, self.ctx)
            await self.fs.release(info.fh)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None

    async def chmod(self, path: str, mode: int) -> None:
        ino = await self._resolve(path)
        attr = pyfuse3.EntryAttributes()
        attr.st_mode = mode
        # pyfuse3.SetattrFields is read-only from Python; the adapter only reads these flags.
        fields = SimpleNamespace(update_mode=True, update_size=False, update_mtime=False, update_atime=False,
                                 update_uid=False, update_gid=False, update_ctime=False)
        try:
            await self.fs.setattr(ino, attr, fields, None, self.ctx)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None

    async def symlink(self, target: str, path: str) -> None:
        parent, name = path.rsplit("/", 1)
        ino = await self._resolve(parent)
        try:
            await self.fs.symlink(ino, name.encode(), target.encode(), self.ctx)
        except pyfuse3.FUSEError as err:
            raise OSError(err.errno, os.strerror(err.errno), path) from None


class MountDriver:
    name = "mount"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _p(self, path: str) -> str:
        return str(self.root) + path

    async def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    async def stat(self, path: str) -> Stat:
        s = os.lstat(self._p(path))
        return Stat(s.st_mode, s.st_size, s.st_uid, s.st_mtime_ns, s.st_blksize)

    async def statvfs(self) -> tuple[int, int, int, int, int]:
        s = os.statvfs(self.root)
        return s.f_frsize, s.f_blocks, s.f_bfree, s.f_files, s.f_ffree

    async def read(self, path: str) -> bytes:
        with open(self._p(path), "rb") as f:
            return f.read()

    async def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    async def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._p(path), name, follow_symlinks=False)

    async def listxattr(self, path: str) -> list[str]:
        return sorted(os.listxattr(self._p(path), follow_symlinks=False))

    async def mkdir(self, path: str) -> None:
        os.mkdir(self._p(path))

    async def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    async def rename(self, old: str, new: str) -> None:
        os.rename(self._p(old), self._p(new))

    async def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    async def open_write(self, path: str) -> None:
        os.close(os.open(self._p(path), os.O_WRONLY))

    async def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    async def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))
