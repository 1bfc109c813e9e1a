"""/<collection>.ndjson at the root: every object of one XO type, one compact JSON object per line.

The same lines as XO's `GET /rest/v0/<collection>?fields=*&ndjson=true` without the `href` XO adds, made
from the object cache (no request), so `jq`, `grep` and `wc -l` work on the whole inventory at once. The
file is rendered again whenever an object of its type changes; a line is kept for as long as the cache
holds the same dict for its object (the cache replaces an object's dict on every change, never edits one),
so a change re-encodes one object, not 10,000.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from xofs.views import File, Node, TypeSnapshot, ViewContext


def ndjson_line(obj: dict) -> bytes:
    """One object as XO's NDJSON writes it: `JSON.stringify(obj)` and a line feed."""
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in a name: JSON escapes keep the line valid UTF-8
        return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n").encode("utf-8")


class LineCache:
    """The NDJSON text of a type's objects, re-encoding only the objects whose dict changed."""

    def __init__(self) -> None:
        self._lines: dict[str, tuple[dict, bytes]] = {}  # object id -> (the dict encoded, its line)

    def render(self, objects: Mapping[str, dict]) -> bytes:
        old = self._lines
        fresh: dict[str, tuple[dict, bytes]] = {}
        for obj_id, obj in objects.items():
            hit = old.get(obj_id)
            # Holding the dict in the entry keeps `is` meaningful: its id cannot be reused meanwhile.
            fresh[obj_id] = hit if hit is not None and hit[0] is obj else (obj, ndjson_line(obj))
        self._lines = fresh  # objects that vanished drop out here
        return b"".join(line for _, line in fresh.values())


class NdjsonView:
    """A root-level `<collection>.ndjson` file; subclasses name the XO type and the collection."""

    type_ = ""
    collection = ""

    def __init__(self) -> None:
        self.name = f"{self.collection}.ndjson"
        self.node = File(TypeSnapshot(self.type_, LineCache().render))

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
