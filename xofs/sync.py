"""Keeping the object cache, and through it the kernel's caches, in step with XO.

`Syncer` is the event feed's sink: after every (re)connection it re-reads every collection (one request
each, run concurrently) and reconciles; between those it applies `all` notifications. Either way, the
changes go to the tree, whose invalidations go to the kernel. It also owns the feed's state, which sets
the kernel cache lifetimes (long while events flow, about a second when they do not).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import trio

from xofs.cache import COLLECTIONS, Change, ObjectCache
from xofs.client.rest import RestClient
from xofs.errors import xofs_error_in
from xofs.fs import Freshness
from xofs.tree import Invalidation, Tree

log = logging.getLogger(__name__)


class Syncer:
    def __init__(self, client: RestClient, cache: ObjectCache, tree: Tree, freshness: Freshness,
                 invalidate: Callable[[list[Invalidation]], None],
                 on_changes: Callable[[list[Change]], None] | None = None) -> None:
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

    async def load(self) -> None:
        """Read every collection the views need, one request each, all at once."""
        results: dict[str, list[dict]] = {}

        async def fetch(type_: str, coll: str) -> None:
            objects = [obj for obj in await self.client.collection(coll, fields="*") if _listed_as(obj, type_, coll)]
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

    def apply(self, kind: str, items: dict) -> None:
        self.events += 1
        self._dispatch(self.cache.apply(kind, items))

    def feed_state(self, state: str, detail: str = "") -> None:
        if state == self.state:
            return
        if state == "connected":
            if self._was_connected:  # also through "connecting": a feed restarted for a new token
                self.reconnects += 1
            self._was_connected = True
            log.info("XO event feed connected: kernel caches now last %.0f s", self.freshness.connected_ttl)
        elif state == "disconnected":
            log.warning("XO event feed lost (%s): reconnecting; kernel caches last %.0f s meanwhile",
                        detail or "no reason given", self.freshness.fallback_ttl)
        down = ("starting", "connecting", "disconnected")
        if not (state in down and self.state in down):  # "disconnected for" counts from the last live feed
            self.state_since = time.time()
        self.state = state
        self.freshness.feed_connected = state == "connected"

    def _dispatch(self, changes: list[Change]) -> None:
        if not changes:
            return
        if self.on_changes is not None:
            self.on_changes(changes)
        self.invalidate(self.tree.on_changes(changes))


def _listed_as(obj: dict, type_: str, coll: str) -> bool:
    """Whether an object of the listing of `coll` has that collection's one type; one log line if not (a
    `VM-banana`, or a VDI among the VMs, would otherwise be dropped silently or shown in another view)."""
    if obj.get("type") == type_:
        return True
    log.warning("XO listed %s of the wrong type %.40r among its %s: skipping it", obj.get("id"), obj.get("type"),
                coll)
    return False
