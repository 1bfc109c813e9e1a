"""The built-in per-collection views: /vms, /vm-snapshots, /vdis, /vdi-snapshots, /srs, /hosts, /pools.

Each shows one XO type as `<uuid>/` directories holding `meta.json` (the object as XO's REST API returns
it), plus the export files of that type next to them, and links to related disks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import orjson

from xofs.views import Dir, Export, File, Link, Node, Rendered, ViewContext


def render_json(obj: dict) -> bytes:
    """The object as XO's REST API returns it: JSON indented by 2 spaces, like Express's `json spaces`.

    orjson writes numbers the way JavaScript does (`1e-7`, not Python's `1e-07`) and is some 30 times
    faster than the json module's indenting encoder, which matters: `find` stats every meta.json.
    """
    try:
        return orjson.dumps(obj, option=orjson.OPT_INDENT_2)
    except (TypeError, orjson.JSONEncodeError):  # a lone surrogate in a name: JSON escapes keep it valid UTF-8
        return json.dumps(obj, indent=2, ensure_ascii=True).encode("utf-8")


class ObjectView:
    """One XO type as `<uuid>/meta.json` directories; subclasses add export files and subdirectories."""

    name = ""
    type_ = ""
    collection = ""

    def object_files(self, obj: dict) -> dict[str, Node]:
        """Entries next to `<uuid>/` in the view's top directory (export files)."""
        return {}

    def object_dirs(self, obj: dict) -> dict[str, Node]:
        """Subdirectories inside `<uuid>/` besides meta.json."""
        return {}

    def subdir(self, ctx: ViewContext, obj: dict, name: str) -> Mapping[str, Node] | None:
        return None

    # Fields of the objects that the top directory's entries depend on (besides membership).
    listing_fields: tuple[str, ...] = ()

    def children(self, ctx: ViewContext, path: tuple[str, ...]) -> Mapping[str, Node] | None:
        if not path:
            entries: dict[str, Node] = {}
            for obj_id, obj in ctx.of_type(self.type_, self.listing_fields).items():
                entries[obj_id] = Dir(obj_id)
                entries.update(self.object_files(obj))
            return entries
        obj = ctx.get(path[0])
        if obj is None or obj.get("type") != self.type_:
            return None
        if len(path) == 1:
            return {"meta.json": File(Rendered(obj["id"], render_json), obj["id"]), **self.object_dirs(obj)}
        if len(path) == 2:
            return self.subdir(ctx, obj, path[1])
        return None


def disk_links(ctx: ViewContext, vm: dict, vdi_type: str, vdi_view: str) -> dict[str, Node]:
    """Links to the disks plugged into a VM (CD drives and ISO images left out)."""
    links: dict[str, Node] = {}
    for vbd_id in vm.get("$VBDs") or ():
        vbd = ctx.get(vbd_id) if isinstance(vbd_id, str) else None
        if not vbd or vbd.get("is_cd_drive") or not isinstance(vbd.get("VDI"), str):
            continue
        vdi = ctx.get(vbd["VDI"])
        if vdi and vdi.get("type") == vdi_type:
            links[f"{vdi['id']}.vhd"] = Link(f"../../../{vdi_view}/{vdi['id']}.vhd", vdi["id"])
    return links


class VmsView(ObjectView):
    name, type_, collection = "vms", "VM", "vms"
    disk_type, disk_view = "VDI", "vdis"

    def object_files(self, obj: dict) -> dict[str, Node]:
        oid = obj["id"]
        return {
            f"{oid}.xva": File(Export(self.collection, oid, "xva"), oid),
            f"{oid}.xva.zst": File(Export(self.collection, oid, "xva", "compress=zstd"), oid),
            f"{oid}.xva.gz": File(Export(self.collection, oid, "xva", "compress=gzip"), oid),
        }

    def object_dirs(self, obj: dict) -> dict[str, Node]:
        return {"vdis": Dir(obj["id"])}

    def subdir(self, ctx: ViewContext, obj: dict, name: str) -> Mapping[str, Node] | None:
        return disk_links(ctx, obj, self.disk_type, self.disk_view) if name == "vdis" else None


class VmSnapshotsView(VmsView):
    name, type_, collection = "vm-snapshots", "VM-snapshot", "vm-snapshots"
    disk_type, disk_view = "VDI-snapshot", "vdi-snapshots"


class VdisView(ObjectView):
    name, type_, collection = "vdis", "VDI", "vdis"
    listing_fields = ("size",)  # the .raw file's exact size

    def object_files(self, obj: dict) -> dict[str, Node]:
        oid = obj["id"]
        size = obj.get("size")
        return {
            f"{oid}.vhd": File(Export(self.collection, oid, "vhd"), oid),
            f"{oid}.raw": File(Export(self.collection, oid, "raw", exact_size=size if isinstance(size, int) else None),
                               oid),
        }


class VdiSnapshotsView(VdisView):
    name, type_, collection = "vdi-snapshots", "VDI-snapshot", "vdi-snapshots"


def sr_writable(sr: dict) -> bool:
    """XO counts an SR with a size and a content type other than `iso` as writable."""
    return bool(sr.get("size")) and sr.get("content_type") != "iso"


class SrsView(ObjectView):
    name, type_, collection = "srs", "SR", "srs"

    def object_dirs(self, obj: dict) -> dict[str, Node]:
        dirs: dict[str, Node] = {"vdis": Dir(obj["id"])}
        if sr_writable(obj):
            dirs["import"] = Dir(obj["id"], kind="import")
        return dirs

    def subdir(self, ctx: ViewContext, obj: dict, name: str) -> Mapping[str, Node] | None:
        if name != "vdis":
            return None
        links: dict[str, Node] = {}
        for vdi_id in obj.get("VDIs") or ():
            vdi = ctx.get(vdi_id) if isinstance(vdi_id, str) else None
            if vdi is None:
                continue
            view = {"VDI": "vdis", "VDI-snapshot": "vdi-snapshots"}.get(vdi.get("type", ""))
            if view:
                links[f"{vdi_id}.vhd"] = Link(f"../../../{view}/{vdi_id}.vhd", vdi_id)
        return links


class HostsView(ObjectView):
    name, type_, collection = "hosts", "host", "hosts"


class PoolsView(ObjectView):
    name, type_, collection = "pools", "pool", "pools"
