"""Import uploads: a local file sent as one HTTP/1.1 request body with a Content-Length, on a trio socket.

Why not httpx: an import moves gigabytes, and `cp` into the mount must keep up with `curl -T`. httpx under
trio hands every block of the body through h11 and its stream layers (about 1.4 s of CPU per GiB, against
curl's 0.3 s). Here the request head is written by hand, then the body goes out

- over plain TCP, with `os.sendfile` from the file straight into the socket (no copy through Python);
- over TLS, as large `send_all`s of `os.pread` blocks through `trio.SSLStream`.

The file's pages well behind the upload are dropped from the page cache as it goes (`_Sender._drop_sent`):
the file is a spool, read once, and holding gigabytes of it would push out what the machine caches for
better uses. The kernel writes them back first, so nothing is lost: a retry reads them from disk. That
writing back may wait for a slow disk, so the advice is given from a worker thread, never from trio's. On a
virtual machine whose host backs memory on demand this matters more: pages freed here are reused at once
for the spool's next writes, and a fresh page costs some ten times a reused one (measured: 2 GiB written
in 4 s into fresh pages, in 1 s when dropped 64 MiB behind).

The answer is read by `export.ExportResponse`'s parser, concurrently with the sending: XO may answer (an
error) before it has read the whole body, and then stop reading, so waiting for the body to go out first
would hang or lose the answer. An upload is never retried (it is not idempotent), and it is cancellable at
every block: cancelling closes the connection, which XO sees as a cut upload (it destroys the new VDI).
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import trio

from xofs.client.export import ExportResponse, HttpTarget, connect, connection_failure_reason
from xofs.errors import XofsError, XoProtocolError, XoUnreachable

BLOCK = 1 << 20  # progress is reported, and cancellation checked, once per block
DROP_EVERY = 16 << 20  # how often the pages behind the upload are dropped
DROP_LAG = 32 << 20  # how far behind the upload a page must be to be dropped
# The `other_config` keys XO sets on a disk while an import fills it (xo-api.md; it removes them when the
# import ends): the import task's id and the body length.
IMPORT_MARK = "xo:import:"
IMPORT_MARK_TASK = IMPORT_MARK + "task"
IMPORT_MARK_LENGTH = IMPORT_MARK + "length"
_ANSWER_GRACE = 5.0  # after the sending broke, how long XO's answer (its reason) is still waited for


async def upload_file(target: HttpTarget, method: str, path: Path, size: int, *,
                      ssl_context: ssl.SSLContext | None, connect_timeout: float, send_timeout: float,
                      answer_timeout: float, progress: Callable[[int], None] | None = None,
                      ready: Callable[[int], Awaitable[None]] | None = None) -> ExportResponse:
    """Send the first `size` bytes of `path` as the body of `method target`; return the answer, head read.

    `target.headers` must not hold Content-Length (it is added). `send_timeout` bounds how long the socket may
    take no body bytes; `answer_timeout` how long XO may take to answer after the last byte, and every wait
    while its body is read. `progress(sent)` is called after every block. A file still being written is
    sent as it grows: `ready(end)` returns once the file's bytes up to `end` are there to send (the time it
    takes counts against no timeout; cancel the upload to give up). Any status is returned (the
    caller reads the body and closes the answer). Raises `XoUnreachable` when the connection fails or breaks
    before an answer, `XoProtocolError` when the answer is not HTTP/1.x or a success comes before the whole
    body was sent, `XofsError` when the file is shorter than `size`, and `OSError` when it cannot be read.
    """
    lines = [f"{method} {target.target} HTTP/1.1", *(f"{name}: {value}" for name, value in target.headers),
             f"Content-Length: {size}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with open(path, "rb") as file:
        stream = await connect(target, ssl_context, connect_timeout)
        # No read timeout while the body goes out (it may take hours, or follow a writer): the sender
        # gives XO `answer_timeout` from its last byte. Then every wait while the answer is read has it.
        response = ExportResponse(stream, target.url, math.inf)
        try:
            answer_error: XofsError | None = None
            answered = False
            async with trio.open_nursery() as nursery:
                sender = _Sender(stream, head, file.fileno(), size, target.url, send_timeout, progress,
                                 ready, stop=nursery.cancel_scope, answer_timeout=answer_timeout)
                nursery.start_soon(sender.run)
                try:
                    await response.read_head()
                    answered = True
                    response.read_timeout = answer_timeout
                except XofsError as exc:
                    answer_error = exc
                nursery.cancel_scope.cancel()  # an answer before the end of the body: stop sending
            if sender.file_error is not None:  # the connection was dropped on purpose: the file is the story
                raise sender.file_error
            if not answered:
                if sender.error is not None:  # the answer is missing because the sending broke: say how
                    raise sender.error from answer_error
                assert answer_error is not None
                raise answer_error
            if sender.sent < size and 200 <= response.status < 300:
                raise XoProtocolError(f"{target.url} answered {response.status} after {sender.sent} of {size} "
                                      f"bytes of the upload")
        except BaseException:
            await response.aclose()
            raise
    return response


class _FileFailed(Exception):
    """The file could not be read (the reason is in `_Sender.file_error`)."""


class _Sender:
    """Writes the request head and body, alongside the task that waits for the answer.

    A failure is kept (`.error` for the connection, `.file_error` for the file), never raised: when the
    connection breaks, XO's answer (which says why) is still waited for, a little; when the file fails,
    everything stops at once (`stop` is cancelled) and the connection is dropped, so XO sees a cut upload.
    """

    def __init__(self, stream: trio.abc.Stream, head: bytes, fd: int, size: int, url: str, timeout: float,
                 progress: Callable[[int], None] | None, ready: Callable[[int], Awaitable[None]] | None, *,
                 stop: trio.CancelScope, answer_timeout: float) -> None:
        self.stream = stream
        self.head = head
        self.fd = fd
        self.size = size
        self.url = url
        self.timeout = timeout
        self.progress = progress
        self.ready = ready
        self.stop = stop
        self.answer_timeout = answer_timeout
        self.sent = 0
        self.dropped = 0  # the pages before this offset were last asked to leave the page cache
        self.dropping = False  # a worker thread is giving that advice
        self.error: XoUnreachable | None = None
        self.file_error: XofsError | OSError | None = None

    async def run(self) -> None:
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(self.head)
            if isinstance(self.stream, trio.SocketStream):
                await self._send_plain(self.stream.socket.fileno())
            else:
                await self._send_tls()
            await trio.sleep(self.answer_timeout)  # cancelled by the answer, normally
            self.error = XoUnreachable(f"{self.url} did not answer within {self.answer_timeout:g} s after the "
                                       "last byte of the upload")
            self.stop.cancel()
        except _FileFailed:
            self.stop.cancel()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                ssl.SSLError) as exc:
            self.error = XoUnreachable(f"upload to {self.url} broke after {self.sent} of {self.size} bytes: "
                                       f"{connection_failure_reason(exc, self.timeout)}")
            self.error.__cause__ = exc
            await trio.sleep(_ANSWER_GRACE)
            self.stop.cancel()

    async def _send_plain(self, sock: int) -> None:
        """`os.sendfile` a block at a time, waiting for room in the socket (for `timeout` at most)."""
        while self.sent < self.size:
            end = min(self.sent + BLOCK, self.size)
            await trio.lowlevel.checkpoint()
            if self.ready is not None:
                await self.ready(end)
            while self.sent < end:
                try:
                    n = os.sendfile(sock, self.fd, self.sent, end - self.sent)
                except BlockingIOError:
                    with trio.fail_after(self.timeout):
                        await trio.lowlevel.wait_writable(sock)
                    continue
                if not n:
                    self._fail(self._shrank())
                self.sent += n
            self._drop_sent()
            if self.progress is not None:
                self.progress(self.sent)

    async def _send_tls(self) -> None:
        """`os.pread` blocks sent whole through the TLS stream (one encryption and one send each)."""
        while self.sent < self.size:
            if self.ready is not None:
                await self.ready(min(self.sent + BLOCK, self.size))
            try:
                data = os.pread(self.fd, min(BLOCK, self.size - self.sent), self.sent)
            except OSError as exc:
                self._fail(exc)
            if not data:
                self._fail(self._shrank())
            with trio.fail_after(self.timeout):
                await self.stream.send_all(data)
            self.sent += len(data)
            self._drop_sent()
            if self.progress is not None:
                self.progress(self.sent)

    def _drop_sent(self) -> None:
        """Every DROP_EVERY bytes, have the kernel drop the file's pages more than DROP_LAG behind.

        Pages still dirty (a spool being written as it is uploaded) are only queued for writing back by
        the first ask; the range covers the last few steps again, so the next asks drop them. The ask runs
        in a worker thread on a duplicate of the descriptor (the upload may end first); while one runs, no
        other starts (a slow disk then gets fewer, larger asks).
        """
        end = self.sent - DROP_LAG
        if end - self.dropped < DROP_EVERY or self.dropping:
            return
        start = max(0, self.dropped - 3 * DROP_EVERY)
        self.dropped = end
        self.dropping = True
        fd = os.dup(self.fd)

        def drop() -> None:
            try:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            except OSError:  # only advice: a file system that cannot take it loses nothing
                pass
            finally:
                os.close(fd)

        def done(_: object) -> None:
            self.dropping = False

        trio.lowlevel.start_thread_soon(drop, done)

    def _fail(self, error: XofsError | OSError) -> NoReturn:
        self.file_error = error
        raise _FileFailed

    def _shrank(self) -> XofsError:
        return XofsError(f"the file being uploaded to {self.url} shrank ({self.sent} of {self.size} bytes sent)")
