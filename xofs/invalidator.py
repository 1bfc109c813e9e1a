"""The one worker that tells the kernel to drop cached entries and attributes.

`pyfuse3.invalidate_entry` and `invalidate_inode` block until related in-flight requests finish, so
calling them from a request handler (or while the trio loop is needed to finish those requests) can
deadlock the mount (fuse-lessons §1.8, pyfuse3 #2). They run here instead, in a thread of their own,
fed by a queue that handlers and the event feed only ever append to. A handler that changed what the kernel
holds by its own doing (the close of a file whose read measured an export's length) awaits `settled()`
before it replies, so the reader's next `stat` never meets the old copy; the trio loop serves other requests
meanwhile.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading

import pyfuse3
import trio

log = logging.getLogger(__name__)

_STOP = object()


class Invalidator:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.done = 0  # invalidations carried out, for status and tests
        self.queued = 0  # the number of the last item queued (by the trio thread)
        self.reached = 0  # the number of the last item that reached the kernel (set by the worker thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xofs-invalidator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def entry(self, parent: int, name: str) -> int:
        """Queue it; the item's number (see `pending`)."""
        return self._put("entry", parent, name)

    def inode(self, ino: int, attr_only: bool) -> int:
        """Queue it; the item's number (see `pending`)."""
        return self._put("inode", ino, attr_only)

    def pending(self, number: int) -> bool:
        """Whether the item of that number has yet to reach the kernel."""
        return self._thread is not None and number > self.reached

    def _put(self, kind: str, target: object, arg: object) -> int:
        self.queued += 1
        self._queue.put((kind, target, arg, self.queued))
        return self.queued

    async def settled(self, timeout: float = 1.0) -> None:
        """Return once everything queued so far has reached the kernel, or after `timeout` seconds."""
        if self._thread is None:
            return
        done = trio.Event()
        self._queue.put(("settled", trio.lowlevel.current_trio_token(), done, None))
        with trio.move_on_after(timeout):
            await done.wait()
        if not done.is_set():
            log.warning("kernel invalidations still queued after %g s (%d carried out so far): a stat may "
                        "show an old size or name for a moment", timeout, self.done)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            kind, target, arg, number = item
            if kind == "settled":
                try:
                    target.run_sync_soon(arg.set)
                except trio.RunFinishedError:  # the loop that waited has ended
                    pass
                continue
            try:
                if kind == "entry":
                    pyfuse3.invalidate_entry(target, arg.encode("utf-8", "surrogateescape"))
                else:
                    pyfuse3.invalidate_inode(target, attr_only=arg)
                self.done += 1
            except OSError as err:
                # ENOENT: the kernel had nothing cached for it, which is fine.
                if err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF):
                    log.warning("kernel invalidation of %s %s failed: %s", kind, target, err)
            except Exception:
                log.exception("kernel invalidation of %s %s failed", kind, target)
            self.reached = number
