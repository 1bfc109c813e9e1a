"""The floor under `cp` of an export on any pyfuse3 + trio filesystem: files that each stream one URL.

Used by scripts/bench_exports.py beside curl: the same export, served by a file system that does the least
any FUSE reader of an HTTP stream can do. Each read receives just the bytes it asks for (one `recv_into`
copy into a single 1 MiB buffer, HTTP chunk framing decoded on the way) and hands that buffer to pyfuse3
(the second copy, into the reader's pages); nothing is read ahead, checked, hashed or kept. Whatever `cp`
gets from it against curl is what FUSE, pyfuse3 and trio leave on this machine with no xofs in between.

    python scripts/export_floor.py MOUNTPOINT TOKEN URL SIZE [URL SIZE ...]

Mounts at MOUNTPOINT a directory holding a file per URL, `export-0`, `export-1`…, of SIZE bytes (the
export's length: a reader stops at the stream's end in any case), whose reads stream a GET of that URL with
XO's `authenticationToken` cookie, one GET per open. Reads must come in order (cp, cat, dd); any other
read fails with EIO. Serves until SIGTERM or SIGINT (then unmounts).
"""

from __future__ import annotations

import errno
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyfuse3
import trio
from fuse_floor import mount_and_serve  # this script's directory is first on sys.path

T = TypeVar("T")
BUFFER = 1 << 20  # the kernel asks for at most 1 MiB per read (st_blksize below)
TTL = 60.0


class HttpBody:
    """The body of one GET on a non-blocking socket, `read_into` a buffer in the order it comes."""

    def __init__(self, url: str, token: str) -> None:
        self.url = urlsplit(url)
        self.token = token
        self.sock: socket.socket | None = None
        self.framing = b""  # bytes received beyond a head or a chunk-size line
        self.chunked = False
        self.left: int | None = None  # bytes left in the current chunk, or in a Content-Length body
        self.first_chunk = True
        self.ended = False

    async def open(self) -> None:
        host, port = self.url.hostname or "127.0.0.1", self.url.port or 80
        self.sock = socket.create_connection((host, port))
        self.sock.setblocking(False)
        target = self.url.path + (f"?{self.url.query}" if self.url.query else "")
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: authenticationToken="
                          f"{self.token}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.framing:
            if not (data := await self._recv(64 << 10)):
                raise OSError(f"{self.url.geturl()} closed the connection without answering")
            self.framing += data
        head, self.framing = self.framing.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split(" ")[1] != "200":
            raise OSError(f"{self.url.geturl()} answered {lines[0]!r}")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        if not self.chunked and "content-length" in fields:
            self.left = int(fields["content-length"])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    async def read_into(self, view: memoryview) -> int:
        """Fill `view` from the body; fewer bytes only at its end."""
        got = 0
        while got < len(view) and not self.ended:
            if self.chunked and not self.left:
                await self._next_chunk()
                continue
            take = len(view) - got if self.left is None else min(self.left, len(view) - got)
            if self.framing:
                n = min(take, len(self.framing))
                view[got:got + n] = self.framing[:n]
                self.framing = self.framing[n:]
            else:
                n = await self._recv_into(view[got:got + take])
                if not n:
                    if self.left is not None:
                        raise OSError(f"{self.url.geturl()} ended early")
                    self.ended = True
            got += n
            if self.left is not None:
                self.left -= n
                self.ended = self.ended or (not self.chunked and self.left == 0)
        return got

    async def _next_chunk(self) -> None:
        """Read the next chunk-size line (after the CRLF that ends the previous chunk)."""
        skip = 0 if self.first_chunk else 2
        while (lf := self.framing.find(b"\r\n", skip)) < 0:
            data = await self._recv(4 << 10)
            if not data:
                raise OSError(f"{self.url.geturl()} ended early")
            self.framing += data
        size = int(self.framing[skip:lf].split(b";")[0], 16)
        self.framing = self.framing[lf + 2:]
        self.first_chunk = False
        self.left = size
        self.ended = size == 0

    async def _recv(self, n: int) -> bytes:
        assert self.sock is not None
        return await self._when_readable(self.sock.recv, n)

    async def _recv_into(self, view: memoryview) -> int:
        assert self.sock is not None
        return await self._when_readable(self.sock.recv_into, view)

    async def _when_readable(self, op: Callable[[Any], T], arg: Any) -> T:
        """`op(arg)` on the non-blocking socket, waiting until it has something."""
        assert self.sock is not None
        while True:
            try:
                return op(arg)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)


class ExportFloorFS(pyfuse3.Operations):
    def __init__(self, token: str, exports: list[tuple[str, int]]) -> None:
        super().__init__()
        self.token = token
        # inode -> (name, URL, size); the root is inode 1
        self.files = {pyfuse3.ROOT_INODE + 1 + i: (f"export-{i}".encode(), url, size)
                      for i, (url, size) in enumerate(exports)}
        # fh -> (body, its reply buffer, [position]); a buffer each: a read waiting for bytes has half filled it
        self.streams: dict[int, tuple[HttpBody, memoryview, list[int]]] = {}
        self.next_fh = 1

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o500, 2
        elif inode in self.files:
            attrs.st_mode, attrs.st_nlink, attrs.st_size = stat.S_IFREG | 0o400, 1, self.files[inode][2]
            attrs.st_blksize = BUFFER
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.entry_timeout = attrs.attr_timeout = TTL
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        for inode, (file_name, _, _) in self.files.items():
            if parent_inode == pyfuse3.ROOT_INODE and name == file_name:
                return self._attrs(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inodes = sorted(self.files)
        for index in range(start_id, len(inodes)):
            if not pyfuse3.readdir_reply(token, self.files[inodes[index]][0], self._attrs(inodes[index]), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.streams[fh] = (HttpBody(self.files[inode][1], self.token), memoryview(bytearray(BUFFER)), [0])
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        body, buffer, position = self.streams[fh]
        if off != position[0] or size > BUFFER:
            raise pyfuse3.FUSEError(errno.EIO)
        try:
            if body.sock is None:
                await body.open()
            n = await body.read_into(buffer[:size])
        except OSError as exc:
            print(f"export_floor: {exc}", file=sys.stderr, flush=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
        position[0] += n
        return buffer[:n]

    async def release(self, fh: int) -> None:
        body, _, _ = self.streams.pop(fh)
        body.close()


def main() -> int:
    mountpoint, token, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    exports = [(rest[i], int(rest[i + 1])) for i in range(0, len(rest), 2)]
    return mount_and_serve(ExportFloorFS(token, exports), mountpoint, "xofs-export-floor")


if __name__ == "__main__":
    raise SystemExit(main())
