"""`/.xofs/`: the mount's own control files, beside the views of XO's objects.

`/.xofs/status.json` is the mount's status as `xofs.status` renders it, made afresh on every stat and
open (a `Live` file), so `cat`, `jq` or `watch` see what the daemon is doing now: the event feed, the
cache, live transfers with their progress, the last errors. It is read-only, like everything outside the
import directories. A dot name keeps it out of `ls` and of globs such as `/mnt/xo/*`.
"""

from __future__ import annotations

from collections.abc import Mapping

from xofs import status
from xofs.views import File, Live, Node, ViewContext


class ControlView:
    name = ".xofs"

    def children(self, ctx: ViewContext, path: tuple[str, ...]) -> Mapping[str, Node] | None:
        if path:
            return None
        return {"status.json": File(Live("status.json", status.render_json))}
