"""What both event feeds share: the sink they drive, and staying connected to XO with backoff.

A feed (`xofs.client.events.EventFeed`, `xofs.client.sse.SseFeed`) knows how to hold one session: connect,
sign in or subscribe, queue XO's changes while the sink re-reads everything, then apply them. `Reconnector`
runs those sessions one after another for as long as the feed lives, with exponential backoff and jitter
between them, tells the sink of each change of state once (retries while disconnected stay in the log), and
passes `started()` on when the first session goes live.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from xofs.errors import XoAuthError, XofsError


class EventSink(Protocol):
    """What a feed drives: the daemon's object cache."""

    async def resync(self) -> None:
        """Re-read everything; called after each (re)connect and sign-in, before queued events are applied."""

    def apply(self, kind: str, items: dict) -> None:
        """One `all` notification: kind "enter" (items: id -> object) or "exit" (items: id -> 0)."""

    def feed_state(self, state: str, detail: str = "", quiet_for: float = 0.0) -> None:
        """"connecting" (at start), "connected" (live), "disconnected" (with the reason; once per loss).
        `quiet_for`: how long before a loss was noticed the feed had already been of no use (a silent socket
        is taken for lost only once a keepalive call went unanswered)."""

    def session_failed(self, reason: str, refused: bool) -> None:
        """Every session that ended, the retries while disconnected too; `refused`: XO refused the token
        (its source is then read again each time, not only at the loss)."""


class SessionEnded(Exception):
    """A session ended; the message says why, `quiet_for` how long it had been silent by then."""

    def __init__(self, reason: str, quiet_for: float = 0.0) -> None:
        super().__init__(reason)
        self.quiet_for = quiet_for


class Reconnector:
    """Runs a feed's sessions one after another, and holds the feed's state as its sink sees it."""

    def __init__(self, sink: EventSink, log: logging.Logger, name: str, backoff: tuple[float, float]) -> None:
        self.sink = sink
        self.log = log  # the feed's own logger, so that log lines name the feed's module
        self.name = name  # how the feed's log lines start: "XO event feed wss://xo/api/"
        self.backoff = backoff  # (first pause, longest pause), seconds
        self.state = ""
        self._task_status: trio.TaskStatus[None] | None = None  # until the first session goes live

    async def run(self, session: Callable[[], Awaitable[None]], *, fatal: tuple[type[XofsError], ...],
                  task_status: trio.TaskStatus[None]) -> None:
        """Forever: `session()`, a pause, `session()` again. `task_status.started()` when one first goes live.

        A session ends by raising `SessionEnded` or an `XofsError`, whose words are the reason logged. Before
        the first session went live, an error of a `fatal` type is raised instead (bad credentials, say, do
        not get better by retrying).
        """
        self._task_status = task_status
        self._set_state("connecting")
        delay = self.backoff[0]
        while True:
            refused, quiet_for = False, 0.0
            try:
                await session()
            except SessionEnded as end:
                reason, quiet_for = str(end), end.quiet_for
            except XofsError as err:
                if self._task_status is not None and isinstance(err, fatal):
                    raise
                reason = err.describe()
                refused = isinstance(err, XoAuthError)
            if self.state == "connected":
                delay = self.backoff[0]
            self._set_state("disconnected", reason, quiet_for)
            self.sink.session_failed(reason, refused)
            sleep = random.uniform(delay / 2, delay)
            self.log.warning("%s: %s; reconnecting in %.1f s", self.name, reason, sleep)
            await trio.sleep(sleep)
            delay = min(delay * 2, self.backoff[1])

    async def follow(self, queue: trio.MemoryReceiveChannel[tuple[str, dict]], detail: str = "") -> None:
        """After the resync: apply what queued meanwhile, in arrival order, and only then go live (`detail`
        ends the log line); then apply changes as they come, until the queue ends.

        A change that raced with the re-read is harmless to replay: it carries whole objects, or ids of gone ones.
        """
        while True:
            try:
                kind, items = queue.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                return
            self.sink.apply(kind, items)
        self._set_state("connected")
        self.log.info("%s: live%s", self.name, detail)
        if self._task_status is not None:
            status, self._task_status = self._task_status, None
            status.started()
        async for kind, items in queue:
            self.sink.apply(kind, items)

    def _set_state(self, state: str, detail: str = "", quiet_for: float = 0.0) -> None:
        """Tell the sink, only on a change: retries while disconnected stay in the log."""
        if state != self.state:
            self.state = state
            self.sink.feed_state(state, detail, quiet_for)
