"""The one worker that tells the kernel to drop cached entries and attributes.

`pyfuse3.invalidate_entry` and `invalidate_inode` block until related in-flight requests finish, so
calling them from a request handler (or while the trio loop is needed to finish those requests) can
deadlock the mount (fuse-lessons §1.8, pyfuse3 #2). They run here instead, in a thread of their own,
fed by a queue that handlers and the event feed only ever append to.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading

import pyfuse3

log = logging.getLogger(__name__)

_STOP = object()


class Invalidator:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.done = 0  # invalidations carried out, for status and tests

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xofs-invalidator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def entry(self, parent: int, name: str) -> None:
        self._queue.put(("entry", parent, name))

    def inode(self, ino: int, attr_only: bool) -> None:
        self._queue.put(("inode", ino, attr_only))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            kind, target, arg = item
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
