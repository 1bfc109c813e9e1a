"""/by-name/<kind>/<name_label>: symbolic links to the objects, named after what people call them."""

from __future__ import annotations

from collections.abc import Mapping

from xofs.names import unique_names
from xofs.views import Dir, Link, Node, ViewContext

# subdirectory -> (XO type, the view its links point into)
KINDS: dict[str, tuple[str, str]] = {
    "vms": ("VM", "vms"),
    "vm-snapshots": ("VM-snapshot", "vm-snapshots"),
    "vdis": ("VDI", "vdis"),
    "vdi-snapshots": ("VDI-snapshot", "vdi-snapshots"),
    "srs": ("SR", "srs"),
    "hosts": ("host", "hosts"),
    "pools": ("pool", "pools"),
}


class ByNameView:
    name = "by-name"

    def children(self, ctx: ViewContext, path: tuple[str, ...]) -> Mapping[str, Node] | None:
        if not path:
            return {kind: Dir() for kind in KINDS}
        if len(path) != 1 or path[0] not in KINDS:
            return None
        type_, view = KINDS[path[0]]
        objects = ctx.of_type(type_, ("name_label",))
        names = unique_names((obj_id, obj.get("name_label")) for obj_id, obj in objects.items())
        return {name: Link(f"../../{view}/{obj_id}", obj_id) for obj_id, name in names.items()}
