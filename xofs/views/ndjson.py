"""/<collection>.ndjson at the root: every object of one XO type, one compact JSON object per line.

The same lines as XO's `GET /rest/v0/<collection>?fields=*&ndjson=true` without the `href` XO adds, made
from the object cache (no request), so `jq`, `grep` and `wc -l` work on the whole inventory at once. The
file is rendered again, when next read or stat'ed, after an object of its type changed: orjson writes
10,000 VMs in about 40 ms, so no per-line cache is kept (it would double the memory the file costs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import orjson

from xofs.views import File, Node, TypeSnapshot, ViewContext


def ndjson_line(obj: dict) -> bytes:
    """One object as XO's NDJSON writes it: `JSON.stringify(obj)` and a line feed."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    except (TypeError, orjson.JSONEncodeError):  # a lone surrogate in a name: escapes keep it valid UTF-8
        return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n").encode("utf-8")


def render_lines(objects: Mapping[str, dict]) -> bytes:
    return b"".join(map(ndjson_line, objects.values()))


class NdjsonView:
    """A root-level `<collection>.ndjson` file; subclasses name the XO type and the collection."""

    type_ = ""
    collection = ""

    def __init__(self) -> None:
        self.name = f"{self.collection}.ndjson"
        self.node = File(TypeSnapshot(self.type_, render_lines))

    def children(self, ctx: ViewContext, path: tuple[str, ...]) -> Mapping[str, Node] | None:
        return None  # a file, not a directory


class VmsNdjson(NdjsonView):
    type_, collection = "VM", "vms"


class VmSnapshotsNdjson(NdjsonView):
    type_, collection = "VM-snapshot", "vm-snapshots"


class VdisNdjson(NdjsonView):
    type_, collection = "VDI", "vdis"


class VdiSnapshotsNdjson(NdjsonView):
    type_, collection = "VDI-snapshot", "vdi-snapshots"


class SrsNdjson(NdjsonView):
    type_, collection = "SR", "srs"


class HostsNdjson(NdjsonView):
    type_, collection = "host", "hosts"


class PoolsNdjson(NdjsonView):
    type_, collection = "pool", "pools"
