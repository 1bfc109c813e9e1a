"""An example third-party view for xofs: /tags/<tag>/<vm name> links to every VM carrying that tag.

Install it next to xofs (`pip install ./examples/tags-view`) and remount: the entry point below adds
`/tags` to the tree. docs/views.md walks through it.
"""

from __future__ import annotations

from collections.abc import Mapping

from xofs.names import safe_name, unique_names
from xofs.views import Dir, Link, Node, ViewContext


class TagsView:
    name = "tags"

    def children(self, ctx: ViewContext, path: tuple[str, ...]) -> Mapping[str, Node] | None:
        # Recompute only when a VM appears, vanishes, or changes its tags or name.
        vms = ctx.of_type("VM", fields=("tags", "name_label"))
        tags = {safe_name(tag): tag for vm in vms.values() for tag in vm.get("tags") or () if isinstance(tag, str)}
        if not path:
            return {name: Dir() for name in tags}
        if len(path) != 1 or path[0] not in tags:
            return None
        tagged = [(vm_id, vm.get("name_label")) for vm_id, vm in vms.items() if tags[path[0]] in (vm.get("tags") or ())]
        return {name: Link(f"../../vms/{vm_id}", vm_id) for vm_id, name in unique_names(tagged).items()}
