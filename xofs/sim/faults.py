"""Fault injection and request counting: the simulator's knobs for testing clients against a bad day.

No real XO has any of this. The REST app serves it under `/_sim/` (same authentication as `/rest/v0`):

- `POST /_sim/faults` with a JSON object sets knobs (only the keys given; `null` clears one), answers the
  whole set; `GET /_sim/faults` reads it; `DELETE /_sim/faults` resets every knob.
  - `latency_ms`: every request (except `/_sim/` ones) waits this long before it is handled;
  - `cut_export_after_bytes`: every export sends this many body bytes, then the connection is dropped
    mid-body (the client sees an incomplete chunked response);
  - `stall_export_after_bytes`: every export sends this many body bytes, then sends nothing more until
    the client gives up;
  - `fail_next_import`: `true` or a count: the next import(s) fail on the "XAPI" side after the VDI was
    created, as `import-raw-xapi-500` recorded: 500 `{"error": "500 Internal Server Error"}`, VDI destroyed;
  - `http_5xx_next`: a count: the next requests answer `http_5xx_status` (default 503) with an XO-style
    JSON error body, without doing anything else.
- `GET /_sim/stats`: requests counted by route (`GET /rest/v0/vms/{id}`), by exact path and in total, plus
  cut and stalled exports; `POST /_sim/stats/reset` zeroes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class FaultsError(ValueError):
    """A knob given a value it cannot take; the message says which and why."""


@dataclass
class Stats:
    """Request counts since start (or the last reset)."""

    total: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    exports_cut: int = 0
    exports_stalled: int = 0

    def record(self, method: str, route: str, path: str) -> None:
        self.total += 1
        self.routes[f"{method} {route}"] += 1
        self.paths[f"{method} {path}"] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "routes": dict(self.routes), "paths": dict(self.paths),
                "exports_cut": self.exports_cut, "exports_stalled": self.exports_stalled}

    def reset(self) -> None:
        self.total = 0
        self.routes.clear()
        self.paths.clear()
        self.exports_cut = 0
        self.exports_stalled = 0


_KNOBS = ("latency_ms", "cut_export_after_bytes", "stall_export_after_bytes", "fail_next_import",
          "http_5xx_next", "http_5xx_status")


@dataclass
class Faults:
    """The current knobs (all off by default) and the request statistics."""

    latency_ms: float = 0.0
    cut_export_after_bytes: int | None = None
    stall_export_after_bytes: int | None = None
    fail_next_import: int = 0
    http_5xx_next: int = 0
    http_5xx_status: int = 503
    stats: Stats = field(default_factory=Stats)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _KNOBS}

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

    def take_import_failure(self) -> bool:
        """Whether this import must fail (uses one `fail_next_import`)."""
        if self.fail_next_import <= 0:
            return False
        self.fail_next_import -= 1
        return True

    def note_export_fault(self, cut: bool) -> None:
        if cut:
            self.stats.exports_cut += 1
        else:
            self.stats.exports_stalled += 1


def _check(name: str, value: Any) -> Any:
    defaults = Faults()
    if value is None:
        return getattr(defaults, name)
    if isinstance(value, bool):
        if name == "fail_next_import":
            return int(value)
        raise FaultsError(f"{name} must be a number, not {value!r}")
    if not isinstance(value, int | float) or value < 0:
        raise FaultsError(f"{name} must be a non-negative number, not {value!r}")
    if name == "latency_ms":
        return float(value)
    if value != int(value):
        raise FaultsError(f"{name} must be a whole number, not {value!r}")
    if name == "http_5xx_status" and not 500 <= value <= 599:
        raise FaultsError(f"http_5xx_status must be a 5xx status, not {value!r}")
    return int(value)
