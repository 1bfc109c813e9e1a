"""One running export: a task that receives XO's stream into a bounded memory window or into a spool entry.

XO exports are one forward-only GET each (no Range, xo-api.md §1.9). An `ExportFeed` owns that GET: a task
of the manager's nursery receives the body while FUSE reads are answered, so HTTP receiving overlaps with
the replies to the kernel.

- In memory, it keeps the bytes from `back_window` before the reader's position to at most `readahead`
  after it: memory per open file is bounded and does not depend on the export's size. Reads inside that
  window, and forward skips (received and dropped), are answered from it. Exports that stream at once share
  the read-ahead (each gets at least `MIN_READAHEAD`): together they hold about what one would, and four
  readers measured a little faster that way than with the whole read-ahead each (docs/performance.md).
- Diverted into a `SpoolEntry` (the reader jumped where the window cannot serve), it writes every byte to
  disk as fast as XO sends, and readers read the spool.

A clean end of the stream is taken for the export's end only if the check of its format agrees
(`export_checks`: XO ends its answer cleanly even when XAPI's stopped early); otherwise the feed fails.

Every byte is hashed as it arrives (XXH3-128, ~50 GB/s), so that a second export of the same object can be
checked against what the first one already handed out: a feed made with `verify=(n, digest)` publishes
nothing until its first `n` bytes hash to `digest`, and fails otherwise. That is what lets a reader's jump
backwards restart an export without ever mixing bytes of two different versions, and what lets an export
whose reader went quiet give its slot to a waiting reader (`ExportSlots`): it is parked, and restarted,
checked the same way, when its reader comes back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import sys
from collections import deque
from collections.abc import Awaitable, Callable

import trio
import xxhash

from xofs.client.export import ExportResponse
from xofs.errors import XofsError
from xofs.export_checks import StreamCheck
from xofs.spool import SpoolEntry, too_slow

log = logging.getLogger(__name__)

MIN_READAHEAD = 2 << 20  # the least read-ahead of one export: two of the kernel's 1 MiB requests
RECEIVE = 2 << 20  # one receive buffer (a huge page): a read of 1 MiB at a 1 MiB offset is a view of one
GATHER = 512 << 10  # the socket wakes the receiving task once it holds this much (or after 2 ms with less)
PARK_CHECK = 1.0  # how often a reader waiting for a slot looks for an idle export to park


class StreamChanged(XofsError):
    """A restarted export does not start with the bytes the earlier one handed out."""


class Parked(XofsError):
    """The export gave its slot to another reader; the next read restarts it."""


class ExportSlots:
    """At most `limit` exports at a time. A reader that waits takes the slot of an export whose reader has
    not read for `idle_after` seconds (a file left open by a program that waits for another one, which
    would otherwise wait forever)."""

    def __init__(self, limit: int, idle_after: float) -> None:
        self.limit = limit
        self.idle_after = idle_after
        self._free = trio.Semaphore(limit)
        self._over = 0  # exports running beyond the limit (see `acquire`)
        self.holders: set[ExportFeed] = set()
        self.quiet_since = trio.current_time()  # when the last export ended (or the slots were made)
        self.stopped = False  # the mount is stopping: no export starts any more (`stop`)

    def stop(self) -> None:
        """No export starts from now on: a reader waiting for a slot fails within `PARK_CHECK`, instead of
        holding up the stop and then starting an export (of a running VM: a snapshot) for nobody."""
        self.stopped = True

    @property
    def free(self) -> int:
        return self._free.value

    async def acquire(self, feed: ExportFeed) -> None:
        """Take a slot for `feed`, waiting for one if need be. Two kinds of export go beyond the limit rather
        than wait: one resuming after it was parked (its reader only paused, as `cmp a b` or a program
        reading several files in turn does: parking it again for the next would restart exports over and
        over), and one whose wait would never end, every slot being held by an idle export that cannot be
        restarted (a running VM's: each export of it is another snapshot), most likely by the very program
        that now waits."""
        self._check_stopped(feed)
        if self._free.value == 0:
            if feed.resuming:
                self._go_over(feed, "it resumes after being parked")
                return
            log.info("export %s waits: all %d export slots are in use (%s)", feed.label, self.limit,
                     ", ".join(sorted(f.label for f in self.holders if not f.cancelled)))
        while True:
            with trio.move_on_after(PARK_CHECK):
                await self._free.acquire()
                if self.stopped:  # the slot came free because the stop cancelled its export
                    self._free.release()
                    self._check_stopped(feed)
                self.holders.add(feed)
                return
            self._check_stopped(feed)
            if not self._park_one(feed) and self._all_held_by_idle_unrepeatable():
                self._go_over(feed, "every slot is held by an idle export that could not be restarted")
                return

    def _check_stopped(self, feed: ExportFeed) -> None:
        if self.stopped:
            raise XofsError(f"export {feed.label} not started: the mount is stopping")

    def _go_over(self, feed: ExportFeed, why: str) -> None:
        self._over += 1
        self.holders.add(feed)
        log.info("export %s goes beyond the limit of %d exports at once: %s", feed.label, self.limit, why)

    def release(self, feed: ExportFeed) -> None:
        self.holders.remove(feed)
        if self._over:
            self._over -= 1
        else:
            self._free.release()
        if not self.holders:
            self.quiet_since = trio.current_time()
        for other in self.holders:
            other.make_room()  # its share of the read-ahead grew

    def _park_one(self, waiter: ExportFeed) -> bool:
        now = trio.current_time()
        idle = [f for f in self.holders if f.parkable(now, self.idle_after)]
        if not idle:
            return False
        victim = min(idle, key=lambda f: f.last_read)
        log.info("export %s parked after %.0f s without a read, for %s; it restarts at its next read",
                 victim.label, now - victim.last_read, waiter.label)
        victim.park()
        return True

    def _all_held_by_idle_unrepeatable(self) -> bool:
        now = trio.current_time()
        held = [f for f in self.holders if not f.cancelled]
        return bool(held) and all(f.idle(now, self.idle_after) and not f.repeatable for f in held)


class ReceiveBuffers:
    """The receive buffers of one server's exports, reused once nothing refers to them any more (the window
    dropped every view of one, and pyfuse3 copied the replies made of it): a new one costs page faults and
    clearing 2 MiB. Shared by the exports, so a new open (rsync going through a directory of exports) takes
    buffers the earlier ones left instead of mapping fresh ones; `unmap_free` gives them back to the system
    once exports have stopped for a while.

    Each is a private mapping of its own, aligned to and as long as a huge page (2 MiB), and marked for
    transparent huge pages: both copies of every byte (the socket's into the buffer, the FUSE reply's out
    of it) then walk one page-table entry per 2 MiB instead of 512. In perf samples of the daemon during a
    4 GiB `cp` on a 2-vCPU VM: the reply's copy 21% -> 12-15%, the socket's 16% -> 12-15%, pinning the
    reply's pages (`gup_fast`) 11% -> 3.5%; its CPU per 4 GiB 10-13% lower (docs/performance.md). Where the
    kernel gives no huge page the buffer works the same, only slower.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._pool: list[mmap.mmap] = []
        self.mapped = 0  # buffers mapped so far (a count for tests)

    def take(self, n: int) -> memoryview:
        """A buffer of `n` (at most `size`) bytes that no one else holds."""
        for buffer in self._pool:
            # The pool's reference, the loop's and getrefcount's own: no memoryview of it is alive.
            if sys.getrefcount(buffer) == 3:
                return memoryview(buffer)[:n]
        buffer = huge_page_buffer(self.size)
        self.mapped += 1
        if len(self._pool) < self.keep:
            self._pool.append(buffer)
        return memoryview(buffer)[:n]

    @property
    def pooled(self) -> int:
        """How many buffers the pool keeps mapped."""
        return len(self._pool)

    @property
    def held(self) -> int:
        """How many of them a view still refers to (as in `take`: the pool's, the loop's and getrefcount's)."""
        return sum(1 for buffer in self._pool if sys.getrefcount(buffer) > 3)

    def unmap_free(self) -> int:
        """Unmap the pooled buffers that no one holds; returns how many."""
        kept = []
        for buffer in self._pool:
            try:
                buffer.close()  # refused while a memoryview of it is alive
            except BufferError:
                kept.append(buffer)
        unmapped = len(self._pool) - len(kept)
        self._pool = kept
        return unmapped


def huge_page_buffer(size: int) -> mmap.mmap:
    """`size` bytes of private anonymous memory marked MADV_HUGEPAGE. Recent kernels (6.18 here) start an
    anonymous mapping whose length is a whole number of huge pages on a huge-page boundary; where one does
    not, the buffer straddles two and gets small pages. A shared mapping would get none here."""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError, AttributeError):  # only advice: without it, small pages
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


class ExportFeed:
    """One GET of an export, received by `run` (started in the manager's nursery)."""

    def __init__(self, label: str, open_response: Callable[[], Awaitable[ExportResponse]], slots: ExportSlots,
                 buffers: ReceiveBuffers, *, readahead: int, back_window: int,
                 verify: tuple[int, bytes] | None = None, spool: SpoolEntry | None = None,
                 resume_at: int = 0, repeatable: bool = True, resuming: bool = False,
                 check: StreamCheck | None = None) -> None:
        self.label = label  # the export's path, for log lines
        self._end_check = check  # whether a clean end of the stream is the end of its format (export_checks)
        # Whether a second export would give the same bytes (false for a running VM and its disks): only
        # then may the export be parked, since its restart must match what it delivered.
        self.repeatable = repeatable
        self.resuming = resuming  # it restarts an export that was parked (ExportSlots.acquire)
        self._open_response = open_response
        self._slots = slots
        self.readahead = readahead
        self.back_window = back_window
        self.received = 0  # bytes of the stream received so far
        self.length: int | None = None  # set at the clean end of the stream
        self.error: XofsError | None = None
        self._hash = xxhash.xxh3_128()
        self._verify = verify
        self.verified = verify is None or verify[0] == 0
        # The memory window: `_window` holds the stream's bytes from `window_start` to `received`.
        self._window: deque[memoryview] = deque()
        self.window_start = 0
        self.reader_pos = resume_at  # where the reader is: bytes before reader_pos - back_window are dropped
        self.last_read = trio.current_time()
        self._reading = 0  # reads waiting on this feed: it is not idle while there is one
        self.parked = False
        self._wanted = 0  # the end of the bytes a waiting reader needs
        # Diverted into a spool entry: bytes received but not yet written there.
        self.spool = spool
        self._pending: list[memoryview] = []
        self._pending_from = 0
        self._arrived = trio.Event()  # new bytes, the end, or an error
        self._room = trio.Event()  # the reader moved on, or the feed was diverted
        self._scope = trio.CancelScope()
        self._cancelled_because = ""  # what `cancel` was told, for the readers' error
        self.running = False
        self._buffers = buffers

    @property
    def done(self) -> bool:
        return self.length is not None or self.error is not None

    @property
    def cancelled(self) -> bool:
        """Cancelled or parked: it gives its slot back as soon as its task ends."""
        return self._scope.cancel_called

    def digest(self) -> tuple[int, bytes]:
        """How many bytes were received and their hash, for checking a restarted export."""
        return self.received, self._hash.digest()

    # --- the task ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait for an export slot, open the GET, then receive until the end.

        Until the GET answered 200 (task_status.started), failures are raised to whoever started the feed:
        XO's refusal (404, 401…) belongs to the read that started the export. After that, they are kept in
        `error` for the readers, never raised into the nursery.
        """
        started = False
        with self._scope:
            await self._slots.acquire(self)
            try:
                try:
                    response = await self._open_response()
                except XofsError as err:
                    self._fail(err)
                    raise
                self.running = True
                task_status.started()
                started = True
                try:
                    await self._receive_all(response)
                except XofsError as err:
                    self._fail(err)
                except Exception as err:  # a bug must fail the reads, never the mount
                    log.exception("export %s: unexpected failure while receiving", self.label)
                    self._fail(XofsError(f"export {self.label}: internal error: {err!r}"))
                finally:
                    self.running = False
                    with trio.CancelScope(shield=True):
                        await response.aclose()
            finally:
                self._slots.release(self)
        if not self.done:
            if self.parked:
                self._fail(Parked(f"export {self.label} was parked after {self.received} bytes"))
            else:
                self._fail(XofsError(f"export {self.label} was cancelled{self._cancelled_because}"))
        if not started:
            assert self.error is not None
            raise self.error

    def _share(self) -> int:
        """This export's read-ahead: `readahead` shared with the other exports running at once."""
        return max(MIN_READAHEAD, self.readahead // max(1, len(self._slots.holders)))

    def idle(self, now: float, idle_after: float) -> bool:
        """A memory export, still receiving, whose reader has not read for `idle_after` seconds."""
        return (self.spool is None and self.running and not self.done and not self._reading
                and now - self.last_read >= idle_after)

    def parkable(self, now: float, idle_after: float) -> bool:
        """Idle, and restartable with the same bytes."""
        return self.repeatable and self.idle(now, idle_after)

    def park(self) -> None:
        """Give up the slot; the reader's next read restarts the export (`Parked` tells it to)."""
        self.parked = True
        self._scope.cancel()

    def cancel(self, because: str = "") -> None:
        """Stop receiving and drop the connection (which cancels the export on XO's side); `because` ends
        the readers' error ("export … was cancelled: the mount is stopping")."""
        self._cancelled_because = f": {because}" if because else ""
        self._scope.cancel()
        if not self.running and not self.done:
            self._fail(XofsError(f"export {self.label} was cancelled{self._cancelled_because}"))

    async def _receive_all(self, response: ExportResponse) -> None:
        response.gather(GATHER)
        buffer, filled = memoryview(b""), 0
        while True:
            if self.spool is not None:
                await self._flush_pending()
            elif self.verified and self.received >= max(self.reader_pos + self._share(), self._wanted):
                room = self._room
                await room.wait()
                continue
            # The stream is received into buffers that end on 1 MiB boundaries of the stream, each filled
            # by as many receives as it takes: a read within one buffer goes out as a view of it, uncopied.
            if filled == len(buffer):
                buffer, filled = self._buffers.take(RECEIVE - self.received % RECEIVE), 0
            n = await response.receive_into(buffer[filled:])
            if not n:
                break
            if self._end_check is not None:
                await self._feed_check(buffer[filled:filled + n])
            self._take(buffer[filled:filled + n], buffer[:filled + n])
            filled += n
        if self._verify is not None and not self.verified:
            raise StreamChanged(f"export {self.label} is now {self.received} bytes long, shorter than the "
                                f"{self._verify[0]} bytes an earlier export of it already handed out")
        if self._end_check is not None:
            self._end_check.finish(self.received)
        self.length = self.received
        if self.spool is not None:
            await self._flush_pending()
            self.spool.finish(self.length)
        self._wake_readers()

    async def _feed_check(self, data: memoryview) -> None:
        """Show the end check the bytes that just came. A decompressing one runs in a worker thread: a piece
        of very compressible data can take it a second, which the mount's other operations must not wait."""
        assert self._end_check is not None
        if self._end_check.costly:
            await trio.to_thread.run_sync(self._end_check.feed, data)
        else:
            self._end_check.feed(data)

    def _take(self, data: memoryview, whole: memoryview) -> None:
        """`data` just arrived at the end of `whole`, the filled part of its receive buffer."""
        if not self.verified:
            self._check(data)
        self._hash.update(data)
        self.received += len(data)
        if self.spool is not None:
            self._pending.append(data)
        else:
            last = self._window[-1] if self._window else None
            if last is not None and last.obj is whole.obj and len(last) == len(whole) - len(data):
                self._window[-1] = whole  # the buffer's filled part grew: still one piece of the window
            else:
                self._window.append(data)
            self._trim()
        if self.received >= self._wanted:  # a reader waiting for more than this is not woken for nothing
            self._wake_readers()

    def _check(self, data: bytes) -> None:
        assert self._verify is not None
        n, digest = self._verify
        if self.received + len(data) < n:
            return
        probe = self._hash.copy()
        probe.update(memoryview(data)[: n - self.received])
        if probe.digest() != digest:
            raise StreamChanged(f"export {self.label} restarted with bytes that differ from those of the earlier "
                                f"export within its first {n} bytes: the object changed in between")
        self.verified = True
        if self.spool is not None:
            self.spool.publish(self._pending_from)

    async def _flush_pending(self) -> None:
        """Write what was received since the last write (one write per receive, or the whole window)."""
        assert self.spool is not None
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        await self.spool.append(data)
        self._pending_from += len(data)
        if self.verified:
            self.spool.publish(self._pending_from)

    def _fail(self, err: XofsError) -> None:
        if self.error is None and self.length is None:
            self.error = err
        if self.spool is not None:
            self.spool.fail(err)
        self._wake_readers()

    def _wake_readers(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    def make_room(self) -> None:
        """Let the receiving task look again at how far it may receive (the reader moved on, the feed was
        diverted, or its share of the read-ahead grew)."""
        self._room.set()
        self._room = trio.Event()

    def _trim(self) -> None:
        keep_from = self.reader_pos - self.back_window
        while self._window and self.window_start + len(self._window[0]) <= keep_from:
            self.window_start += len(self._window.popleft())

    # --- memory reads ---

    def can_serve(self, offset: int, skip_limit: int) -> bool:
        """Whether a read at `offset` can be answered from the memory window (now or after a short wait)."""
        return self.spool is None and self.window_start <= offset <= self.received + skip_limit

    async def read(self, offset: int, size: int, deadline: float = math.inf) -> bytes | memoryview:
        """Bytes at [offset, offset+size) from the memory window; short only at the end of the stream. Fails
        when some of them came but not all within `deadline` seconds (`too_slow`)."""
        self._reading += 1
        try:
            return await self._read(offset, size, deadline)
        finally:
            self._reading -= 1
            self.last_read = trio.current_time()

    async def _read(self, offset: int, size: int, deadline: float) -> bytes | memoryview:
        end = offset + size
        self.reader_pos = max(self.reader_pos, offset)
        self._trim()
        self.make_room()
        # A stream that trickles (a byte now and then: the read timeout never fires) would hold the reader
        # in the kernel, where not even SIGKILL ends a read the daemon has taken: once the read's first
        # byte came, the rest must come within `deadline`, or it fails. Not from the read's start: a read
        # ahead of the stream (qemu-img's) waits for the stream to get there first. Not a short answer:
        # through the page cache (sendfile, splice, mmap) the kernel takes one for the end of the file,
        # and the copy would end there, exit 0.
        deadline_at = math.inf  # set when the read's first byte comes
        while (self.received < end or not self.verified) and self.length is None:
            if self.error is not None:
                raise self.error
            if deadline_at == math.inf and self.received > offset and self.verified:
                deadline_at = trio.current_time() + deadline
            if trio.current_time() >= deadline_at:
                raise too_slow(self.label, offset, size, self.received - offset, deadline)
            self._wanted = offset + 1 if deadline_at == math.inf else end  # woken for the first byte, then all
            with trio.move_on_at(deadline_at):
                await self._wait()
        self._wanted = 0
        if offset < self.window_start:  # another reader of the same file moved the window on meanwhile
            raise XofsError(f"export {self.label}: bytes at {offset} already dropped")
        data = self._slice(offset, min(end, self.received))
        self.reader_pos = max(self.reader_pos, offset + len(data))
        self._trim()
        self.make_room()
        return data

    async def length_beyond(self, n: int) -> int | None:
        """The stream's length if it is `n` bytes or fewer; None once it is known to be longer."""
        self._reading += 1
        try:
            return await self._length_beyond(n)
        finally:
            self._reading -= 1
            self.last_read = trio.current_time()

    async def _length_beyond(self, n: int) -> int | None:
        while self.length is None and self.received <= n:
            if self.error is not None:
                raise self.error
            self._wanted = n + 1
            self.make_room()
            await self._wait()
        self._wanted = 0
        return self.length if self.length is not None and self.length <= n else None

    async def _wait(self) -> None:
        event = self._arrived
        await event.wait()

    def _slice(self, start: int, end: int) -> bytes | memoryview:
        """The window's bytes [start, end): a view when one receive buffer holds them all, else a copy."""
        if end <= start:
            return b""
        parts: list[memoryview] = []
        pos = self.window_start
        for chunk in self._window:
            chunk_end = pos + len(chunk)
            if chunk_end > start:
                if pos >= end:
                    break
                a, b = max(start - pos, 0), min(end - pos, len(chunk))
                parts.append(chunk if a == 0 and b == len(chunk) else chunk[a:b])
            pos = chunk_end
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    # --- switching to the spool ---

    def divert(self, entry: SpoolEntry) -> None:
        """From now on, write the stream into `entry`, starting with the window (which must start at 0)."""
        assert self.window_start == 0 and self.spool is None and self.length is None
        self.spool = entry
        self._pending = list(self._window)
        self._window.clear()
        if self.error is not None:
            entry.fail(self.error)
        self.make_room()
