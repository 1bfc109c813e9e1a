"""Fault injection and request counting: the simulator's knobs for testing clients against a bad day.

No real XO has any of this. The REST app serves it under `/_sim/` (same authentication as `/rest/v0`):

- `POST /_sim/faults` with a JSON object sets knobs (only the keys given; `null` clears one), answers the
  whole set; `GET /_sim/faults` reads it; `DELETE /_sim/faults` resets every knob.
  - `latency_ms`: every request (except `/_sim/` ones) waits this long before it is handled;
  - `cut_export_after_bytes`: every export sends this many body bytes, then the connection is dropped
    mid-body (the client sees an incomplete chunked response);
  - `end_export_after_bytes`: every export sends this many body bytes, then ends its answer cleanly (the
    chunked framing's last chunk), as a real xo-server does when XAPI, answering it without a length,
    stops early: the client sees a complete answer of the wrong length;
  - `stall_export_after_bytes`: every export sends this many body bytes, then sends nothing more until
    the client gives up;
  - `export_chunk_bytes`: every export's body goes out in HTTP chunks of at most this many bytes. A real
    xo-server pipes XAPI's answer through, one chunk per piece its socket read: 64 KiB at most. Without
    the knob the simulator sends chunks of 1 MiB or more, which its Python HTTP stack needs to keep up
    with curl above 1 GB/s (with 64 KiB it serves an export at 35-45% of that speed);
  - `export_bytes_per_second`: every export's body goes out at most this fast, in chunks of a tenth of a
    second's bytes at most (a slow link, or XAPI reading a busy SR): a stream that never stalls long
    enough for a client's read timeout, yet takes long over each MiB;
  - `fail_next_import`: `true` or a count: the next import(s) fail on the "XAPI" side after the VDI was
    created, as `import-raw-xapi-500` recorded: 500 `{"error": "500 Internal Server Error"}`, VDI destroyed;
  - `import_bytes_per_second`: imports read their body at most this fast (a slow XAPI), so that an upload
    can be caught in the middle;
  - `http_5xx_next`: a count: the next requests answer `http_5xx_status` (default 503) with an XO-style
    JSON error body, without doing anything else;
  - `reset_next_gets`: a count: the next GETs under `/rest/v0` get the answer's status line and headers,
    then the connection is closed (the client sees the connection drop before any byte of the body);
  - `corrupt_listing`: the next collection listing(s) answer hostile items (`rest_hostile.py`): malformed
    JSON, wrong types, missing fields, huge strings, hostile names or ids, invalid UTF-8, duplicate ids;
  - `silent_websockets`: every JSON-RPC websocket stays open but sends nothing (no answers, no events).
- `POST /_sim/websocket-frames` sends raw text frames on every open JSON-RPC websocket (`SocketFaults`).
- `GET /_sim/stats`: requests counted by route (`GET /rest/v0/vms/{id}`), by exact path and in total, plus
  cut, ended early and stalled exports; `POST /_sim/stats/reset` zeroes them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# What `corrupt_listing` can do to a listing; `rest_hostile.py` says what each one sends.
CORRUPTIONS = ("not_json", "garbage", "wrong_types", "missing_fields", "huge_strings", "hostile_names",
               "hostile_ids", "invalid_utf8", "duplicate_ids", "wrong_type_for_collection")


class FaultsError(ValueError):
    """A knob given a value it cannot take; the message says which and why."""


@dataclass
class Stats:
    """Request counts since start (or the last reset)."""

    total: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    exports_cut: int = 0
    exports_ended_early: int = 0
    exports_stalled: int = 0

    def record(self, method: str, route: str, path: str) -> None:
        self.total += 1
        self.routes[f"{method} {route}"] += 1
        self.paths[f"{method} {path}"] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "routes": dict(self.routes), "paths": dict(self.paths),
                "exports_cut": self.exports_cut, "exports_ended_early": self.exports_ended_early,
                "exports_stalled": self.exports_stalled}

    def reset(self) -> None:
        self.total = 0
        self.routes.clear()
        self.paths.clear()
        self.exports_cut = 0
        self.exports_ended_early = 0
        self.exports_stalled = 0


_KNOBS = ("latency_ms", "cut_export_after_bytes", "end_export_after_bytes", "stall_export_after_bytes",
          "export_chunk_bytes", "export_bytes_per_second", "fail_next_import", "import_bytes_per_second",
          "http_5xx_next", "http_5xx_status", "reset_next_gets", "corrupt_listing", "silent_websockets")


@dataclass(frozen=True)
class Corruption:
    """The `corrupt_listing` knob: which corruptions, of which collection (None: any), how many more
    listings (None: every one until the knob is reset)."""

    kinds: tuple[str, ...]
    collection: str | None = None
    count: int | None = 1

    def as_dict(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds), "collection": self.collection, "count": self.count}


@dataclass
class Faults:
    """The current knobs (all off by default) and the request statistics."""

    latency_ms: float = 0.0
    cut_export_after_bytes: int | None = None
    end_export_after_bytes: int | None = None
    stall_export_after_bytes: int | None = None
    export_chunk_bytes: int | None = None
    export_bytes_per_second: int | None = None
    fail_next_import: int = 0
    import_bytes_per_second: int | None = None
    http_5xx_next: int = 0
    http_5xx_status: int = 503
    reset_next_gets: int = 0
    corrupt_listing: Corruption | None = None
    silent_websockets: bool = False
    stats: Stats = field(default_factory=Stats)

    def as_dict(self) -> dict[str, Any]:
        knobs = {name: getattr(self, name) for name in _KNOBS}
        if self.corrupt_listing is not None:
            knobs["corrupt_listing"] = self.corrupt_listing.as_dict()
        return knobs

    def update(self, changes: Any) -> None:
        """Apply a partial update (`POST /_sim/faults`); nothing changes if any value is wrong."""
        if not isinstance(changes, dict):
            raise FaultsError("the body must be a JSON object of knobs")
        unknown = [k for k in changes if k not in _KNOBS]
        if unknown:
            raise FaultsError(f"unknown knob(s) {', '.join(unknown)}; known: {', '.join(_KNOBS)}")
        checked = {name: _check(name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self, name, value)

    def reset(self) -> None:
        """Every knob back to off (`DELETE /_sim/faults`); the statistics stay."""
        defaults = Faults()
        for name in _KNOBS:
            setattr(self, name, getattr(defaults, name))

    def take_5xx(self) -> int | None:
        """The status to fail this request with, if `http_5xx_next` has some left (one is used up)."""
        if self.http_5xx_next <= 0:
            return None
        self.http_5xx_next -= 1
        return self.http_5xx_status

    def take_reset(self) -> bool:
        """Whether this GET's connection must be dropped (uses one `reset_next_gets`)."""
        if self.reset_next_gets <= 0:
            return False
        self.reset_next_gets -= 1
        return True

    def take_corruption(self, collection: str) -> tuple[str, ...] | None:
        """The corruptions to apply to this listing of `collection`, if `corrupt_listing` applies to it
        (a counted knob uses one up, and switches itself off after the last)."""
        knob = self.corrupt_listing
        if knob is None or knob.collection not in (None, collection):
            return None
        if knob.count is not None:
            left = knob.count - 1
            self.corrupt_listing = Corruption(knob.kinds, knob.collection, left) if left > 0 else None
        return knob.kinds

    def take_import_failure(self) -> bool:
        """Whether this import must fail (uses one `fail_next_import`)."""
        if self.fail_next_import <= 0:
            return False
        self.fail_next_import -= 1
        return True

    def note_export_fault(self, kind: str) -> None:
        """Count an export that a knob cut, ended early or stalled."""
        if kind == "cut":
            self.stats.exports_cut += 1
        elif kind == "end":
            self.stats.exports_ended_early += 1
        else:
            self.stats.exports_stalled += 1


class SocketFaults:
    """The websocket side of the knobs, shared by the REST control routes and every JSON-RPC socket
    (the model holds the one instance): while `silent`, sockets write nothing; `send_raw` writes frames."""

    def __init__(self) -> None:
        self.silent = False
        self._writers: set[Callable[[str], None]] = set()

    def register(self, write: Callable[[str], None]) -> Callable[[], None]:
        """Record an open socket's frame writer; returns the call that forgets it."""
        self._writers.add(write)
        return lambda: self._writers.discard(write)

    def send_raw(self, frames: list[str]) -> int:
        """Queue these text frames, as they are, on every open socket; returns how many sockets."""
        writers = list(self._writers)
        for write in writers:
            for frame in frames:
                write(frame)
        return len(writers)


def _check(name: str, value: Any) -> Any:
    defaults = Faults()
    if value is None:
        return getattr(defaults, name)
    if name == "corrupt_listing":
        return _check_corruption(value)
    if name == "silent_websockets":
        if not isinstance(value, bool):
            raise FaultsError(f"silent_websockets must be true or false, not {value!r}")
        return value
    if isinstance(value, bool):
        if name == "fail_next_import":
            return int(value)
        raise FaultsError(f"{name} must be a number, not {value!r}")
    if not isinstance(value, int | float) or value < 0:
        raise FaultsError(f"{name} must be a non-negative number, not {value!r}")
    if name == "latency_ms":
        return float(value)
    if name in ("import_bytes_per_second", "export_chunk_bytes", "export_bytes_per_second") and value == 0:
        raise FaultsError(f"{name} must be positive (null for no limit)")
    if value != int(value):
        raise FaultsError(f"{name} must be a whole number, not {value!r}")
    if name == "http_5xx_status" and not 500 <= value <= 599:
        raise FaultsError(f"http_5xx_status must be a 5xx status, not {value!r}")
    return int(value)


def _check_corruption(value: Any) -> Corruption:
    """`"kind"`, `["kind", …]` or `{"kinds": …, "collection": "vms", "count": N or null}`."""
    spec = value if isinstance(value, dict) else {"kinds": value}
    unknown = set(spec) - {"kinds", "collection", "count"}
    if unknown:
        raise FaultsError(f"corrupt_listing takes kinds, collection and count, not {', '.join(sorted(unknown))}")
    kinds = spec.get("kinds")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not isinstance(kinds, list) or not kinds or any(k not in CORRUPTIONS for k in kinds):
        raise FaultsError(f"corrupt_listing kinds must be some of {', '.join(CORRUPTIONS)}, not {kinds!r}")
    collection = spec.get("collection")
    if collection is not None and not isinstance(collection, str):
        raise FaultsError(f"corrupt_listing collection must be a collection name, not {collection!r}")
    count = spec.get("count", 1)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise FaultsError(f"corrupt_listing count must be a positive whole number or null, not {count!r}")
    return Corruption(tuple(kinds), collection, count)
