"""Keeping the object cache, and through it the kernel's caches, in step with XO.

`Syncer` is the event feed's sink: after every (re)connection it re-reads every collection (one request
each, run concurrently) and reconciles; between those it applies `all` notifications. Either way, the
changes go to the tree, whose invalidations go to the kernel. It also owns the feed's state, which sets
the kernel cache lifetimes (long while events flow, about a second when they do not), and, while no feed is
live, re-reads everything every `--poll-interval` seconds (`poll_while_down`), so that a feed that stays
down (a proxy that refuses websockets, XO's socket broken while its REST API works) leaves the mount at most
that far behind XO instead of showing what it last knew for ever. Full reads never overlap: one that starts
while another runs waits for it, so an older read cannot land after a newer one.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable

import trio

from xofs.cache import COLLECTIONS, Change, ObjectCache
from xofs.client.rest import RestClient
from xofs.errors import xofs_error_in
from xofs.fs import Freshness
from xofs.malloc import give_back_free_memory
from xofs.tree import Invalidation, Tree

log = logging.getLogger(__name__)

POLL_SHARE = 10  # while the feed is down, a full read every this many times its own duration at most
POLL_PAUSE_MAX = 300.0  # but that rule never waits longer than this (a slow answer is no CPU spent)


class Syncer:
    def __init__(self, client: RestClient, cache: ObjectCache, tree: Tree, freshness: Freshness,
                 invalidate: Callable[[list[Invalidation]], None],
                 on_changes: Callable[[list[Change]], None] | None = None, poll_interval: float = 0) -> None:
        self.client = client
        self.cache = cache
        self.tree = tree
        self.freshness = freshness
        self.invalidate = invalidate
        self.on_changes = on_changes
        self.state = "starting"
        self.state_since = time.time()
        self.reconnects = 0
        self._was_connected = False
        self.events = 0
        self.poll_interval = poll_interval  # seconds; 0: no reads while the feed is down
        self.polls = 0  # full reads made because no feed was live
        self.poll_failures = 0  # and those that failed
        self.loaded_at = 0.0  # time.monotonic() of the last full read that succeeded, 0 before the first
        self._down_at = time.monotonic()  # when the feed last stopped being live (or the syncer was made)
        self._tried_at = 0.0  # when the last full read ended, whether it succeeded or not
        self._took = 0.0  # how long the last one that succeeded took, seconds
        self._polled_this_outage = False
        self._said_not_up = False  # "not connected" logged since the feed was last live (or ever)
        self._state_changed = trio.Event()
        self._loading = trio.Lock()
        self._put_off = trio.Event()  # the tree put off a costly listing (see `relist_when_due`)

    async def load(self) -> None:
        """Read every collection the views need, one request each, all at once (after any full read that
        is running: see the module's docstring)."""
        async with self._loading:
            await self._timed_load(retry=True)

    async def _timed_load(self, *, retry: bool) -> None:
        """`_load`, its end and its duration noted (the caller holds `_loading`)."""
        started = time.monotonic()
        try:
            await self._load(retry=retry)
        finally:
            self._tried_at = time.monotonic()
        self._took = self._tried_at - started

    async def _load(self, *, retry: bool) -> None:
        results: dict[str, list[dict]] = {}

        async def fetch(type_: str, coll: str) -> None:
            listed = await self.client.collection(coll, fields="*", retry=retry)
            objects = [obj for obj in listed if _listed_as(obj, type_, coll)]
            self.cache.share_values(objects)
            results[coll] = objects

        async with trio.open_nursery() as nursery:
            for type_, coll in COLLECTIONS.items():
                nursery.start_soon(fetch, type_, coll)
        started = time.monotonic()
        first = not self.cache.loaded
        changes = self.cache.replace_all(obj for objs in results.values() for obj in objs)
        if first:
            # Before the first load nothing was mounted, so no export or import can remember anything
            # about these objects: only the tree needs to hear of them (52,000 "changes" for 10,000 VMs).
            self.invalidate(self.tree.on_changes(changes))
        else:
            self._dispatch(changes)
        # What a full read leaves (the cache, the listings) lives long and forms no cycles, yet the cyclic
        # collector would walk its millions of containers again at each full collection (a fifth of a
        # find's time with 10,000 VMs): set it aside, after one collection so no garbage is kept with it.
        gc.collect()
        gc.freeze()
        give_back_free_memory()
        self.loaded_at = time.monotonic()
        log.debug("cache holds %d objects (%d changed) after %.3f s of reconciling",
                  len(self.cache), len(changes), time.monotonic() - started)

    # The EventSink protocol (xofs.client.reconnect)

    async def resync(self) -> None:
        """`load`, for a feed that (re)connected; a failure says it was the re-read, not the feed's socket."""
        try:
            await self.load()
        except Exception as exc:  # the collections are read at once: an exception group
            err = xofs_error_in(exc)
            if err is not None:
                err.message = f"re-reading XO's objects after connecting: {err.message}"
            raise

    async def poll_while_down(self) -> None:
        """Forever: while no event feed is live, `load` every `poll_interval` seconds, counted from the loss or
        from the last read, whichever came later (a feed that comes back within `interval` re-reads
        everything itself, so a short loss costs no extra read; a loss found after a silence counts from the
        silence, and its first read may come at once), and at least ten times as long as the last
        read that succeeded took (a read of 10,000 VMs takes seconds of CPU: polling must not become most of
        the daemon's work), up to `POLL_PAUSE_MAX`. 0: never. A failed read is logged and tried again as long
        after, with no retry of its own (the next poll is that); the mount keeps serving what it has."""
        interval = self.poll_interval
        if interval <= 0:
            return
        while True:
            if self.state == "connected":
                await self._state_changed.wait()
                continue
            wait = max(self._down_at, self._tried_at) + self._poll_pause(interval) - time.monotonic()
            if wait > 0:
                with trio.move_on_after(wait):
                    await self._state_changed.wait()
                continue
            await self._poll(interval)

    def _poll_pause(self, interval: float) -> float:
        return max(interval, min(POLL_SHARE * self._took, POLL_PAUSE_MAX))

    async def _poll(self, interval: float) -> None:
        async with self._loading:
            # The feed came back, and re-read everything, while this waited: that read is newer. This sees it
            # because `Reconnector.follow` goes live with no checkpoint after its re-read releases the lock.
            if self.state == "connected":
                return
            if not self._polled_this_outage:
                self._polled_this_outage = True
                log.info("XO event feed down for %.0f s: re-reading XO's objects every %s s until it is back",
                         time.monotonic() - self._down_at, _seconds(self._poll_pause(interval)))
            try:
                await self._timed_load(retry=False)
            except Exception as exc:  # the collections are read at once: an exception group
                self.poll_failures += 1
                err = xofs_error_in(exc)
                if err is None:
                    log.exception("re-reading XO's objects while the event feed is down failed; trying again "
                                  "in %s s", _seconds(self._poll_pause(interval)))
                else:
                    log.warning("re-reading XO's objects while the event feed is down: %s; trying again in "
                                "%s s", err.describe(), _seconds(self._poll_pause(interval)))
            else:
                self.polls += 1

    def apply(self, kind: str, items: dict) -> None:
        self.events += 1
        self._dispatch(self.cache.apply(kind, items))

    def feed_state(self, state: str, detail: str = "", quiet_for: float = 0.0) -> None:
        """The feed's new state. A loss noticed `quiet_for` seconds after the feed fell silent counts from
        then: the first re-read comes `--poll-interval` after the silence began, not after it was noticed."""
        if state == self.state:
            return
        if state == "connected":
            if self._was_connected:  # also through "connecting": a feed restarted for a new token
                self.reconnects += 1
            self._was_connected = True
            log.info("XO event feed connected: kernel caches now last %.0f s", self.freshness.connected_ttl)
        elif state == "disconnected" and self.state == "connected":
            log.warning("XO event feed lost (%s): reconnecting; kernel caches last %.0f s meanwhile",
                        detail or "no reason given", self.freshness.fallback_ttl)
        elif state == "disconnected" and not self._said_not_up:
            # A feed that never came up (or one restarted for a new token) is not "lost"; said once, not at
            # every start of a feed (the mount starts a second one after its first 15 s).
            self._said_not_up = True
            log.warning("XO event feed not connected (%s): retrying; kernel caches last %.0f s meanwhile",
                        detail or "no reason given", self.freshness.fallback_ttl)
        down = ("starting", "connecting", "disconnected")
        if not (state in down and self.state in down):  # "disconnected for" counts from the last live feed
            self.state_since = time.time() - (quiet_for if state == "disconnected" else 0.0)
        if self.state == "connected":
            self._down_at = time.monotonic() - quiet_for
            self._polled_this_outage = False
        if state == "connected":
            self._said_not_up = False
        self.state = state
        self.freshness.feed_connected = state == "connected"
        self._state_changed.set()
        self._state_changed = trio.Event()

    def _dispatch(self, changes: list[Change]) -> None:
        if not changes:
            return
        if self.on_changes is not None:
            self.on_changes(changes)
        self.invalidate(self.tree.on_changes(changes))
        if self.tree.next_due() is not None:
            self._put_off.set()

    async def relist_when_due(self) -> None:
        """Compute again, when they are due, the costly listings the tree put off (`Tree.on_changes`), so
        that they follow the changes even when no more come."""
        while True:
            due = self.tree.next_due()
            # Woken early when another listing is put off: it may be due sooner than this one.
            with trio.move_on_after(math.inf if due is None else max(0.0, due - time.monotonic())):
                await self._put_off.wait()
                self._put_off = trio.Event()
                continue
            self.invalidate(self.tree.relist_due())


def _seconds(value: float) -> str:
    """30.0 -> "30", 34.16 -> "34.2", 0.3 -> "0.3": a pause as the log says it."""
    return f"{value:.1f}".removesuffix(".0")


def _listed_as(obj: dict, type_: str, coll: str) -> bool:
    """Whether an object of the listing of `coll` has that collection's one type; one log line if not (a
    `VM-banana`, or a VDI among the VMs, would otherwise be dropped silently or shown in another view)."""
    if obj.get("type") == type_:
        return True
    log.warning("XO listed %s of the wrong type %.40r among its %s: skipping it", obj.get("id"), obj.get("type"),
                coll)
    return False
