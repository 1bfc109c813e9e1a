"""Export downloads: a small HTTP/1.1 GET reader on trio sockets, built for throughput.

Why not httpx: exports are the one place where xofs moves gigabytes, and `cp` out of the mount must keep up
with curl. httpx under trio reads 64 KiB per `recv` (httpcore's `READ_NUM_BYTES`), feeds every byte through
h11's receive buffer (a copy in, a copy out, chunk-framing bookkeeping per event), then through httpx's
stream layers, and every `recv` enters a cancel scope and yields to the scheduler. This reader sends one GET
with `Connection: close` and parses the response head itself. Then:

- `receive_into(view)` (what exports use) lets the socket write a plain body, or a chunk of at least
  256 KiB, straight into the caller's buffer: no copy of ours; after such a chunk only the next size line
  is read into the connection's buffer. `receive()` copies that into a new `bytes` (error bodies, tests);
- smaller chunks are read into one reusable 2 MiB buffer with `recv_into` and decoded from there, as many
  per call as fit (one copy: into the caller's buffer);
- the body is read through a non-blocking stdlib socket on a duplicate of the connection's descriptor:
  the read timeout (a cancel scope) is only entered when the socket is empty, and a stream that always has
  data yields to other tasks every 8 MiB (cancellation is still checked on every call). A bulk reader asks
  the socket to wake it only for 512 KiB at a time (`gather`);
- over TLS (`TlsPipe`) the same socket's bytes go into OpenSSL's memory buffer, up to 1 MiB per receive,
  and one receive decrypts every record at hand, up to the caller's buffer. Through `trio.SSLStream` each
  receive returned at most one 16 KiB record, after a pass through its Python machinery and our read
  timeout's cancel scope: the daemon spent 3.7-4.1 s of CPU per GiB and read an export from the simulator
  at 250-275 MB/s (2026-11-27, this machine; docs/performance.md has what replaced it).

Measured 2026-11-26 on the 2-core build machine, `xofs sim` on 127.0.0.1, the `receive(1 MiB)` loop timed
in-process (bytes discarded) against `curl -o /dev/null` of the same URL, runs alternating:

- 4 GiB `.raw` of a seeded (sparse, 4 MiB chunks) disk, client and simulator at real-time priority so that
  the other jobs on the machine do not decide: curl 1.84-1.89 s, this reader 1.72-1.77 s (1.07x curl),
  plain httpx `aiter_raw` 3.1 s (0.60x); a 2 GiB imported (incompressible) disk: 1.20x, httpx 0.84x;
- the same at normal priority while other test suites ran (load 3-5): 0.90-1.03x curl (median of 6-8),
  0.5-0.75x when the load was higher; httpx 0.34-0.56x in the same runs;
- CPU for 2 GiB: about 0.3 s user + 0.3 s system in-process (curl: 0.1 + 0.35 s), httpx about 1.5 s.

No Range, no HEAD (xo-api.md §1.9, §7.5: HEAD starts a real export), no proxies, no compression (we ask for
`identity`). Everything else — retries, error bodies — is the caller's (`rest.RestClient`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx
import trio

from xofs.errors import XoProtocolError, XoStalled, XoUnreachable, describe_connection_error

T = TypeVar("T")

DEFAULT_RECEIVE = 1 << 20  # what receive() asks the socket for when the caller does not say
_MAX_HEAD = 64 * 1024  # a response head larger than this is not from XO
_MAX_LINE = 8 * 1024  # chunk-size and trailer lines
_BUFFER = 2 << 20  # per export; chunked bodies are decoded from here
_MIN_FREE = 256 << 10  # below this much room at the end of the buffer, move the unread bytes to the front
_DIRECT_MIN = 256 << 10  # chunks this big, with nothing buffered, go from the socket to the caller directly
_LINE_FILL = 4 << 10  # read size for a chunk-size line that follows a big chunk
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_YIELD_EVERY = 8 << 20  # a receive loop that never waits still lets other tasks run this often
_GATHER_WAIT = 0.002  # gathering (gather()), the longest wait for the amount before taking what came


@dataclass(frozen=True)
class HttpTarget:
    """Where to send the GET: scheme, host, port, the request target (path + query) and the headers."""

    scheme: str
    host: str
    port: int
    target: str
    headers: list[tuple[str, str]]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.target}"


async def open_stream(target: HttpTarget, *, ssl_context: ssl.SSLContext | None,
                      connect_timeout: float, read_timeout: float) -> ExportResponse:
    """Connect, send the GET and read the response head; the body is left for `ExportResponse.receive`.

    Any status is returned: deciding what a non-200 means is the caller's job. Raises `XoUnreachable` when
    the connection fails and `XoProtocolError` when the answer is not HTTP/1.x.
    """
    if target.scheme == "https":
        stream, tls = await connect_tls(target, ssl_context, connect_timeout)
        response = ExportResponse(stream, target.url, read_timeout, tls=tls)
    else:
        stream = await connect(target, ssl_context, connect_timeout)
        response = ExportResponse(stream, target.url, read_timeout)
    try:
        await response._send_request(target)
        await response.read_head()
    except BaseException:
        await response.aclose()
        raise
    return response


async def connect(target: HttpTarget, ssl_context: ssl.SSLContext | None, timeout: float) -> trio.abc.Stream:
    """A TCP connection to the target, with TLS for https; XoUnreachable (saying why) when it fails."""
    stream: trio.abc.Stream
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(target.host, target.port)
            if target.scheme == "https":
                stream = trio.SSLStream(stream, ssl_context or ssl.create_default_context(),
                                        server_hostname=target.host, https_compatible=True)
                await stream.do_handshake()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise XoUnreachable(f"cannot reach XO at {target.url}: {connection_failure_reason(exc, timeout)}") from exc
    return stream


async def connect_tls(target: HttpTarget, ssl_context: ssl.SSLContext | None,
                      timeout: float) -> tuple[trio.SocketStream, TlsPipe]:
    """A TCP connection and a `TlsPipe` on a duplicate of its descriptor that has done its handshake: every
    byte of the exchange goes through the latter. XoUnreachable (saying why) when the connection or the
    handshake fails."""
    stream: trio.SocketStream | None = None
    pipe: TlsPipe | None = None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(target.host, target.port)
            sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
            sock.setblocking(False)
            pipe = TlsPipe(sock, ssl_context or ssl.create_default_context(), target.host)
            await pipe.handshake()
    except BaseException as exc:
        if pipe is not None:
            pipe.close()
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, OSError | trio.TooSlowError):  # ssl.SSLError is an OSError
            raise XoUnreachable(f"cannot reach XO at {target.url}: "
                                f"{connection_failure_reason(exc, timeout)}") from exc
        raise
    return stream, pipe


class TlsPipe:
    """TLS over a non-blocking socket, with OpenSSL working on memory buffers (`ssl.MemoryBIO`): the socket
    is read a lot at a time (a receive takes what is there, up to 1 MiB) and the records are decrypted from
    memory, where an `ssl.SSLSocket` reads each 16 KiB record with two system calls (its header, then its
    body): 131 reads per MiB under strace.

    `read_into` is what the body's receives call; it never waits (BlockingIOError when there is nothing).
    A connection that ends without TLS's close_notify ends the stream as one that has it (an https
    server may drop it so, as `trio.SSLStream(https_compatible=True)` accepts): the HTTP framing tells a
    complete body from a cut one.
    """

    CIPHERTEXT = 1 << 20  # the most one socket receive takes

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        self._cipher = memoryview(bytearray(self.CIPHERTEXT))
        self._unsent = b""  # TLS's own bytes the socket could not take yet
        self._eof = False

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    async def handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self._eof:
                    raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF,
                                          "the server closed the connection in the handshake") from None
                await self._send_pending()
                while not self._pull_nowait():
                    await trio.lowlevel.wait_readable(self.sock)
        await self._send_pending()

    async def send_all(self, data: bytes) -> None:
        self._ssl.write(data)
        await self._send_pending()

    def read_into(self, view: memoryview) -> int:
        """Decrypted bytes into `view` (up to its length), 0 at the end; BlockingIOError if none are at hand."""
        got, want = 0, len(view)
        while got < want:
            try:
                n = self._ssl.read(want - got, view[got:])
            except ssl.SSLWantReadError:
                if self._eof:
                    break  # the connection ended in the middle of a record: the framing says it was cut
                if not self._pull_nowait():
                    if got:
                        break
                    raise BlockingIOError from None
                continue
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                break  # the end, with or without close_notify
            if not n:
                break
            got += n
        if self._unsent or self._outgoing.pending:  # a TLS message to answer (a key update)
            self._send_nowait()
        return got

    def _pull_nowait(self) -> bool:
        """Move what the socket holds into OpenSSL's input (its end too); False if it held nothing."""
        try:
            n = self.sock.recv_into(self._cipher)
        except BlockingIOError:
            return False
        if n:
            self._incoming.write(self._cipher[:n])
        else:
            self._eof = True
            self._incoming.write_eof()
        return True

    def _send_nowait(self) -> None:
        self._unsent += self._outgoing.read()
        while self._unsent:
            try:
                n = self.sock.send(self._unsent)
            except BlockingIOError:
                return
            self._unsent = self._unsent[n:]

    async def _send_pending(self) -> None:
        self._send_nowait()
        while self._unsent:
            await trio.lowlevel.wait_writable(self.sock)
            self._send_nowait()


def without_url(words: str, url: str) -> str:
    """An export failure's words, for a line that names the export already: "export from URL broke after …"
    becomes "the export broke after …", "URL did not answer" "XO did not answer"."""
    return words.replace(f"export from {url} ", "the export ", 1).replace(f"{url} ", "XO ", 1)


def connection_failure_reason(exc: BaseException, timeout: float) -> str:
    """A few words on why sending or receiving failed (a timeout says after how long)."""
    if isinstance(exc, trio.TooSlowError):
        return f"timed out after {timeout:g} s"
    return describe_connection_error(exc)


class ExportResponse:
    """One streamed export: `.status`, `.headers`, then `receive()` until it returns b"" (a clean end).

    `receive` raises `XoUnreachable` when the connection breaks, stalls for `read_timeout`, or ends before
    the declared length (Content-Length, or a chunked body without its last chunk), so a cut download is
    never mistaken for a complete one. `aclose()` drops the connection, which is how a download is cancelled.
    """

    status: int
    reason: str
    headers: httpx.Headers

    def __init__(self, stream: trio.abc.Stream, url: str, read_timeout: float, *,
                 tls: TlsPipe | None = None) -> None:
        self.url = url
        self.bytes_received = 0
        self.content_length: int | None = None
        self._stream = stream
        # The exchange goes through a non-blocking stdlib socket on a duplicate of the connection's file
        # descriptor (see _raw_receive): TLS's (from connect_tls), or a plain one made here. Another trio
        # stream (an upload's `trio.SSLStream`) is read through its receive_some.
        self._tls = tls
        self._raw: socket.socket | None = tls.sock if tls is not None else None
        if tls is None and isinstance(stream, trio.SocketStream):
            self._raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
            self._raw.setblocking(False)
        self._unyielded = 0  # bytes received since the last time receive() let other tasks run
        self._gather = 0  # SO_RCVLOWAT set by gather(), 0 if not
        self.read_timeout = read_timeout
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # the unread bytes are _buf[_start:_end]
        self._chunked = False
        self._left: int | None = None  # body bytes still due (Content-Length), or left in the current chunk
        self._chunk_seen = False  # a chunk's data came before, so a CRLF precedes the next size line
        self._last_chunk_read = False
        self._big_chunks = False  # the last chunk was at least _DIRECT_MIN bytes
        self._done = False
        self._closed = False

    async def __aenter__(self) -> ExportResponse:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (mid-body, this cancels the download on the server side too)."""
        if not self._closed:
            self._closed = True
            if self._raw is not None:
                trio.lowlevel.notify_closing(self._raw)
                self._raw.close()
            await trio.aclose_forcefully(self._stream)

    @property
    def close_delimited(self) -> bool:
        """The body ends where the connection does (neither chunked nor of a stated length): a cut that closes
        the connection cleanly cannot be told from its end. XO always sends exports chunked (REPORT.md #10)."""
        return not self._chunked and self.content_length is None

    async def receive_into(self, view: memoryview) -> int:
        """Up to `len(view)` (> 0) bytes of the body written into `view`; how many, 0 at the end.

        Where the framing allows (a plain body, a chunk of at least 256 KiB), the socket writes straight
        into `view`: the caller's buffer is the only user-space copy of those bytes. Smaller chunks are
        decoded from the connection's buffer and copied into `view`, as many as fit.
        """
        if self._done:
            return 0
        if self._chunked:
            n = await self._receive_chunked_into(view)
        elif self._left is None:  # delimited by the end of the connection
            n = await self._receive_plain_into(view, eof_ok=True)
        else:
            n = await self._receive_plain_into(view[:self._left]) if self._left else 0
            self._left -= n
        if not n:
            self._done = True
        self.bytes_received += n
        return n

    def gather(self, nbytes: int) -> None:
        """Let the socket wake the reader only once it holds `nbytes` (SO_RCVLOWAT), or after
        `_GATHER_WAIT` with less: for a bulk reader that would otherwise be woken for every packet.

        Woken per packet, a reader that keeps up drains the socket in small pieces, and the sender (on the
        same machine, the simulator) does the receiving side's TCP work and a wakeup for each: on the 2-vCPU
        build machine the simulator spent 7-15% more CPU (medians of 8-10 runs) on an export read by `cp`
        from the mount than on one read by curl; gathering 512 KiB, as much as for curl, and the daemon
        5-13% less (docs/performance.md). Over TLS too (the socket counts encrypted bytes); not through a trio
        stream (an upload's answer).
        """
        if self._raw is None or nbytes <= 1:
            return
        try:
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except OSError:
            return
        self._gather = nbytes

    async def first_bytes(self) -> None:
        """Wait for the body's first bytes (kept for `receive_into`). A connection that closes or stalls after
        the head, before any of them, raises `XoUnreachable` here, while nothing was handed out and trying
        the GET again is safe."""
        if self._start < self._end or self._done or self._left == 0:
            return
        await self._fill(eof_ok=self.close_delimited)

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE) -> bytes:
        """Up to `max_bytes` of the body (what is already there, waiting only if nothing is); b"" at the end.
        A copy of what `receive_into` gives: for error bodies and tests, not for bulk bytes."""
        if max_bytes <= 0:
            return b""
        buffer = bytearray(max_bytes)
        n = await self.receive_into(memoryview(buffer))
        return bytes(memoryview(buffer)[:n])

    async def read_all(self, limit: int) -> bytes:
        """The rest of the body, at most `limit` bytes (for error answers, which are small)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (data := await self.receive(limit - size)):
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    # --- body framing ---

    async def _receive_plain_into(self, view: memoryview, *, eof_ok: bool = False) -> int:
        if self._start < self._end:
            n = min(len(view), self._end - self._start)
            view[:n] = self._view[self._start:self._start + n]
            self._start += n
            return n
        n = await self._recv_into(view)
        if not n and not eof_ok:
            raise self._ended_early()
        return n

    async def _receive_chunked_into(self, view: memoryview) -> int:
        """Decode chunks into `view` until it is full or nothing more is at hand."""
        got, want = 0, len(view)
        while got < want and await self._chunk_ready(bool(got)):
            take = min(self._left, want - got)
            buffered = self._end - self._start
            if buffered:
                take = min(take, buffered)
                view[got:got + take] = self._view[self._start:self._start + take]
                self._start += take
            elif got:
                break
            elif self._left >= _DIRECT_MIN:  # a big chunk: from the socket straight into the caller's buffer
                take = await self._recv_into(view[got:got + take])
                if not take:
                    raise self._ended_early()
            else:
                await self._fill()
                continue
            self._left -= take
            got += take
        return got

    async def _chunk_ready(self, holding: bool) -> bool:
        """Make sure a chunk with bytes left is under way, reading the next size line if need be. False at
        the end of the body, and when that line is not all here while the caller is `holding` bytes it can
        return first."""
        while not self._left:
            if self._last_chunk_read:
                return False
            size = self._parse_chunk_size()
            if size is None:  # the size line is not all here yet
                if holding:
                    return False
                # After a big chunk, read just the size line and a little: the next big one goes direct.
                await self._fill(_LINE_FILL if self._big_chunks else None)
                continue
            if size == 0:
                await self._skip_trailers()
                self._last_chunk_read = True
                return False
            self._left = size
            self._big_chunks = size >= _DIRECT_MIN
        return True

    def _parse_chunk_size(self) -> int | None:
        """The next chunk's size from the buffer (eating the CRLF that ends the previous chunk), or None."""
        lf = self._buf.find(b"\n", self._start, self._end)
        if lf < 0:
            if self._end - self._start > _MAX_LINE:
                raise XoProtocolError(f"export from {self.url}: chunk size line too long")
            return None
        if self._chunk_seen:
            if lf != self._start + 1 or self._buf[self._start] != 0x0D:
                raise XoProtocolError(f"export from {self.url}: chunk data not followed by CRLF")
            self._chunk_seen = False
            self._start = lf + 1
            return self._parse_chunk_size()
        line = bytes(self._buf[self._start:lf]).rstrip(b"\r")
        size = line.split(b";", 1)[0].strip()
        if not size or size.strip(_HEX_DIGITS):
            raise XoProtocolError(f"export from {self.url}: bad chunk size line {line[:40]!r}")
        self._start = lf + 1
        self._chunk_seen = True
        return int(size, 16)

    async def _skip_trailers(self) -> None:
        while await self._read_line():
            pass

    # --- buffer and socket ---

    async def _fill(self, limit: int | None = None, *, eof_ok: bool = False) -> bool:
        """Read more (up to `limit` bytes) into the buffer, making room first; the end of the connection here
        is an early end (False with `eof_ok`)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < _MIN_FREE:
            leftover = self._end - self._start
            self._buf[:leftover] = self._buf[self._start:self._end]
            self._start, self._end = 0, leftover
        room = self._view[self._end:] if limit is None else self._view[self._end:self._end + limit]
        n = await self._recv_into(room)  # which applies the read timeout itself
        if not n:
            if eof_ok:
                return False
            raise self._ended_early()
        self._end += n
        return True

    async def _recv_into(self, view: memoryview) -> int:
        if self._raw is None:
            data = await self._guarded(self._stream.receive_some, len(view))
            view[:len(data)] = data
            return len(data)
        if self._tls is not None:
            return await self._raw_receive(self._tls.read_into, view)
        return await self._raw_receive(self._raw.recv_into, view)

    async def _raw_receive(self, op: Callable[[Any], T], arg: Any) -> T:
        """`op` on the non-blocking socket, waiting (with the read timeout) only when nothing is there.

        Cheaper than `trio.SocketStream.receive_some`, which enters a cancel scope and yields to the
        scheduler on every call: here cancellation is still checked every call, but a stream that always
        has data yields only every `_YIELD_EVERY` bytes.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            found_nothing = False
            while True:
                try:
                    result = op(arg)
                    break
                except BlockingIOError:
                    await self._wait_readable(any_byte=found_nothing)
                    found_nothing = True
                    self._unyielded = 0
        except (OSError, trio.TooSlowError, trio.ClosedResourceError) as exc:
            raise self._broken(exc) from exc
        self._unyielded += result if isinstance(result, int) else len(result)
        if self._unyielded >= _YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def _wait_readable(self, *, any_byte: bool) -> None:
        """Until the socket may be read; TooSlowError after the read timeout without a byte.

        Gathering (`gather`), a first wait lasts at most `_GATHER_WAIT` and the next receive takes whatever
        came by then; a wait after a receive that found nothing at all waits for any byte.
        """
        assert self._raw is not None
        if self._gather and not any_byte:
            with trio.move_on_after(_GATHER_WAIT):
                await trio.lowlevel.wait_readable(self._raw)
            return
        if self._gather:
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        try:
            with trio.fail_after(self.read_timeout):
                await trio.lowlevel.wait_readable(self._raw)
        finally:
            if self._gather:
                with contextlib.suppress(OSError):  # closed meanwhile
                    self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self._gather)

    async def _guarded(self, receive: Callable[[Any], Awaitable[T]], arg: Any) -> T:
        try:
            with trio.fail_after(self.read_timeout):
                return await receive(arg)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                ssl.SSLError) as exc:
            raise self._broken(exc) from exc

    def _broken(self, exc: BaseException) -> XoUnreachable:
        kind = XoStalled if isinstance(exc, trio.TooSlowError) else XoUnreachable
        return kind(f"export from {self.url} broke after {self.bytes_received} bytes: "
                    f"{connection_failure_reason(exc, self.read_timeout)}")

    def _ended_early(self) -> XoUnreachable:
        due = f" of {self.content_length}" if self.content_length is not None else ""
        return XoUnreachable(f"export from {self.url} ended early: the connection closed after "
                             f"{self.bytes_received}{due} bytes")

    async def _read_line(self) -> bytes:
        while (lf := self._buf.find(b"\n", self._start, self._end)) < 0:
            if self._end - self._start > _MAX_LINE:
                raise XoProtocolError(f"export from {self.url}: framing line too long")
            await self._fill()
        line = bytes(self._buf[self._start:lf]).rstrip(b"\r")
        self._start = lf + 1
        return line

    # --- request and response head ---

    async def _send_request(self, target: HttpTarget) -> None:
        lines = [f"GET {target.target} HTTP/1.1", *(f"{name}: {value}" for name, value in target.headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            with trio.fail_after(self.read_timeout):
                if self._tls is not None:
                    await self._tls.send_all(head)
                else:
                    await self._stream.send_all(head)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise XoUnreachable(f"cannot send the request to {self.url}: "
                                f"{connection_failure_reason(exc, self.read_timeout)}") from exc

    async def read_head(self) -> None:
        """Read the status line and headers of the answer (1xx interim answers skipped); the body stays."""
        while True:
            status, reason, fields = await self._read_one_head()
            if not 100 <= status < 200:
                break  # 1xx are interim answers (100 Continue): the real one follows
        self.status, self.reason, self.headers = status, reason, httpx.Headers(fields)
        self._choose_framing()

    async def _read_one_head(self) -> tuple[int, str, list[tuple[str, str]]]:
        while (end := self._buf.find(b"\r\n\r\n", self._start, self._end)) < 0:
            if self._end - self._start > _MAX_HEAD:
                raise XoProtocolError(f"{self.url} answered a response head over {_MAX_HEAD} bytes")
            try:
                answered = await self._fill(eof_ok=True)
            except XoUnreachable as exc:  # a silence past the read timeout, a reset: not a close
                reason = connection_failure_reason(exc.__cause__, self.read_timeout) if exc.__cause__ else str(exc)
                raise type(exc)(f"{self.url} did not answer: {reason}") from None
            if not answered:
                raise XoUnreachable(f"{self.url} closed the connection without answering")
        head = bytes(self._buf[self._start:end]).decode("latin-1")
        self._start = end + 4
        status_line, *header_lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
            raise XoProtocolError(f"{self.url} answered something that is not HTTP/1.x: {status_line[:80]!r}")
        fields: list[tuple[str, str]] = []
        for line in header_lines:
            if line[:1] in (" ", "\t") and fields:  # obsolete line folding
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}")
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise XoProtocolError(f"{self.url} answered a malformed header line: {line[:80]!r}")
            fields.append((name, value.strip()))
        return int(code), reason, fields

    def _choose_framing(self) -> None:
        """RFC 9112 §6.3: no body, chunked, Content-Length, or everything until the connection closes."""
        if self.status in (204, 304):
            self._left = 0
            return
        # The request asks for `identity`: bytes coded otherwise would be handed out as the export itself (a
        # gzip of the VHD, copied with exit status 0), so any other coding is refused.
        content = [c.strip().lower() for c in self.headers.get_list("content-encoding", split_commas=True)]
        if any(c not in ("", "identity") for c in content):
            raise XoProtocolError(f"{self.url} answered a body coded {', '.join(content)}, not the export's bytes")
        codings = [c.strip().lower() for c in self.headers.get_list("transfer-encoding", split_commas=True)]
        if any(c not in ("chunked", "identity") for c in codings):
            raise XoProtocolError(f"{self.url} answered a body coded {', '.join(codings)}, not the export's bytes")
        if codings:
            self._chunked = codings[-1] == "chunked"
            return
        lengths = {v.strip() for v in self.headers.get_list("content-length", split_commas=True)}
        if lengths:
            value = lengths.pop()
            if lengths or not value.isdigit():
                raise XoProtocolError(f"{self.url} answered an invalid Content-Length")
            self.content_length = self._left = int(value)
