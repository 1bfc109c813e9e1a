"""What a running mount is doing, as the JSON of `/.xofs/status.json` (read by `xofs status` and any tool).

The mount registers its pieces here once they exist (`register`); the control view renders `snapshot()` on
every stat and open of the file, so it is always current and costs nothing when nobody looks. Nothing
secret goes in: no token, no credentials, only where the credentials come from.

The snapshot holds: the server and mount point, the event feed's state (connected or not, since when, the
age of the last event, reconnections, events applied, the age of the last full read of XO's objects, and
how many were made, and failed, while the feed was down), how many objects of each type are cached, every
live transfer (exports being read, imports being written or uploaded: path, phase, bytes done, size, rate,
ETA), and the last warnings and errors of the log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xofs.cache import KEPT_TYPES, ObjectCache
from xofs.log_lines import one_line

RECENT_ERRORS = 20


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors of the log, for the status file."""

    def __init__(self, size: int = RECENT_ERRORS) -> None:
        super().__init__(level=logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": record.created, "level": record.levelname, "logger": record.name,
                             "message": one_line(record.getMessage())})


@dataclass
class MountState:
    """The pieces of one mount that the status reads."""

    url: str
    mountpoint: str
    feed_kind: Callable[[], str]  # "jsonrpc" or "sse" (it may fall back from one to the other)
    credentials: str  # where the token comes from, never the token
    syncer: Any  # xofs.sync.Syncer: state, state_since, reconnects, events
    cache: ObjectCache
    transfer_sources: list[Callable[[], list[dict]]] = field(default_factory=list)
    errors: RecentErrors = field(default_factory=RecentErrors)
    started: float = field(default_factory=time.time)
    options: dict[str, Any] = field(default_factory=dict)


_current: MountState | None = None


def register(state: MountState | None) -> None:
    """Make `state` the mount this process reports on (None when it ends)."""
    global _current
    _current = state


def current() -> MountState | None:
    return _current


def snapshot(now: float | None = None) -> dict[str, Any]:
    """The status of the mount of this process, as plain JSON-able data."""
    state = _current
    now = time.time() if now is None else now
    if state is None:
        return {"mounted": False}
    syncer, cache = state.syncer, state.cache
    last_event = cache.last_event
    counts = {type_: len(cache.of_type(type_)) for type_ in sorted(KEPT_TYPES)}
    return {
        "mounted": True,
        "pid": os.getpid(),
        "url": state.url,
        "mountpoint": state.mountpoint,
        "credentials": state.credentials,
        "uptime": round(now - state.started, 1),
        "options": state.options,
        "feed": {
            "kind": state.feed_kind(),
            "state": syncer.state,
            "connected": syncer.state == "connected",
            "since": round(now - syncer.state_since, 1),
            "last_event_age": round(now - last_event, 1) if last_event else None,
            "reconnects": syncer.reconnects,
            "events": syncer.events,
            "polls": syncer.polls,
            "poll_failures": syncer.poll_failures,
            "last_read_age": round(time.monotonic() - syncer.loaded_at, 1) if syncer.loaded_at else None,
        },
        "cache": {"objects": len(cache), "by_type": counts},
        "transfers": [_with_rate(t) for source in state.transfer_sources for t in source()],
        "errors": list(state.errors.records),
    }


def _with_rate(transfer: dict[str, Any]) -> dict[str, Any]:
    """A transfer with its average `rate` (bytes/s) and `eta` (seconds) when they can be told."""
    out = dict(transfer)
    elapsed, done, size = out.get("elapsed"), out.get("done") or 0, out.get("size")
    rate = done / elapsed if elapsed and out.get("phase") != "failed" else None  # a broken one goes nowhere
    out["rate"] = round(rate) if rate else None
    out["eta"] = round((size - done) / rate, 1) if rate and size is not None and size >= done else None
    if isinstance(elapsed, float):
        out["elapsed"] = round(elapsed, 1)
    return out


def render_json() -> bytes:
    return (json.dumps(snapshot(), indent=2) + "\n").encode()
