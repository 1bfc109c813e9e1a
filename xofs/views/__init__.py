"""View plugins: each top-level directory of the mount is a view that maps XO objects to a tree.

A view does no I/O. It is asked for the children of one of its directories and answers from the object
cache through a `ViewContext`, which records what the answer depended on: the tree recomputes a listing
only when one of those objects changed, or, for whole types, when an object of that type appeared,
vanished, or changed one of the fields named in `ctx.of_type(type_, fields=…)`. That is what lets 200
metric events a second on 10,000 VMs cost nothing for `ls /vms`.

A view is a class registered under the entry point group `xofs.views`; docs/views.md shows how to write
one. The nodes a view returns:

- `Dir(kind=…)`: a directory whose children the same view lists (path one level deeper), or, for
  `kind="import"`, the import machinery of xofs (`/srs/<uuid>/import/`).
- `File(content)`: a file whose bytes come from a `Content` description (`Rendered` for text made from an
  object; `TypeSnapshot` for text made from every object of a type; `Export` for an XO export stream, read
  by xofs.exports).
- `Link(target)`: a symbolic link, relative to the directory it is in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "xofs.views"


@dataclass(frozen=True, slots=True)
class Rendered:
    """A small file rendered from one XO object by a pure function (meta.json, for example)."""

    obj_id: str
    render: Callable[[dict], bytes]


@dataclass(frozen=True, slots=True)
class Export:
    """An XO export stream: GET /rest/v0/<collection>/<obj_id>.<fmt>[?query].

    `exact_size` is the length when the format fixes it (`.raw`: the VDI's size); otherwise xofs.exports
    reports a safe upper bound until one full read told it the exact length.
    """

    collection: str
    obj_id: str
    fmt: str
    query: str = ""
    exact_size: int | None = None

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.obj_id}.{self.fmt}" + (f"?{self.query}" if self.query else "")

    @property
    def url_path(self) -> str:
        """The GET's path on XO, as log lines and errors name the export."""
        return f"/rest/v0/{self.path}"


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """A file rendered from every object of one XO type at once (e.g. `/vms.ndjson`).

    One open reads one consistent snapshot; the file is invalidated whenever an object of the type changes.
    """

    type_: str
    render: Callable[[Mapping[str, dict]], bytes]


@dataclass(frozen=True, slots=True)
class Live:
    """A small file rendered afresh on every stat and every open, from state that is not an XO object
    (the mount's own status, say). `key` names it; `render` must be cheap and must not block."""

    key: str
    render: Callable[[], bytes]


Content = Rendered | Export | TypeSnapshot | Live


@dataclass(frozen=True, slots=True)
class Dir:
    obj_id: str | None = None  # the XO object this directory stands for, for xattrs
    kind: str = "plain"  # "plain": listed by the view; "import": an SR's import directory


@dataclass(frozen=True, slots=True)
class File:
    content: Content
    obj_id: str | None = None


@dataclass(frozen=True, slots=True)
class Link:
    target: str
    obj_id: str | None = None


Node = Dir | File | Link


def name_problem(name: object) -> str | None:
    """Why `name` cannot be an entry of a directory (the kernel refuses a whole listing for one such name),
    or None."""
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not a str"
    if name in ("", ".", ".."):
        return "empty, '.' or '..'"
    if "/" in name or "\0" in name:
        return "'/' or NUL in it"
    try:
        raw = name.encode("utf-8", "surrogateescape")  # as the adapter hands names to the kernel
    except UnicodeEncodeError:
        return "a lone surrogate in it, which no file name can hold"
    if len(raw) > 255:
        return "longer than 255 bytes"
    return None


def node_problem(node: object) -> str | None:
    """Why `node` is no node a view may answer (`Dir`, `File` of a known content, `Link` to a str), or None."""
    if isinstance(node, Dir):
        return None
    if isinstance(node, File):
        return None if isinstance(node.content, Content) else f"a File of a {type(node.content).__name__}"
    if isinstance(node, Link):
        return None if isinstance(node.target, str) and node.target else "a Link without a target"
    return f"a {type(node).__name__}, not a Dir, File or Link"


@dataclass
class ViewContext:
    """Read access to the object cache that records what a listing depended on."""

    cache: object  # xofs.cache.ObjectCache (kept loose so third-party views need not import it)
    ids: set[str] = field(default_factory=set)
    types: dict[str, frozenset[str]] = field(default_factory=dict)

    def get(self, obj_id: str) -> dict | None:
        """One object (or None); the listing is recomputed whenever it changes."""
        self.ids.add(obj_id)
        return self.cache.get(obj_id)  # type: ignore[attr-defined]

    def of_type(self, type_: str, fields: tuple[str, ...] = ()) -> Mapping[str, dict]:
        """All objects of a type, id → object; the listing is recomputed when one appears or vanishes,
        or when one of them changes a field in `fields`."""
        self.types[type_] = self.types.get(type_, frozenset()) | frozenset(fields)
        return self.cache.of_type(type_)  # type: ignore[attr-defined]


class View(Protocol):
    """What a view plugin provides. `name` is its top-level entry: a directory, unless the view sets
    `node` to something else (a `File(TypeSnapshot(...))` for a root-level file, say)."""

    name: str

    def children(self, ctx: ViewContext, path: tuple[str, ...]) -> Mapping[str, Node] | None:
        """The entries of the directory at `path` (relative to the view; `()` is its top directory),
        or None when there is no such directory (any more)."""
        ...

    # Optional: `lookup(ctx, path, name) -> Node | None` answers for a name the listing of `path` does not
    # show (/search/<expression> exists whenever it is looked up, yet is never listed).


def load_views(names: list[str] | None = None) -> dict[str, View]:
    """Instantiate the views registered under `xofs.views` (all, or those named), by directory name.

    xofs's own views come first and keep their names; third-party ones follow in the order of their
    distribution and entry point names (not the order of the files on disk), the first keeping a name."""
    views: dict[str, View] = {}
    owners: dict[str, str] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=_load_order):
        if names is not None and ep.name not in names:
            continue
        try:
            view = ep.load()()
            problem = name_problem(view.name) or node_problem(getattr(view, "node", Dir()))
            if problem:
                raise TypeError(f"its name {view.name!r} or node is unusable: {problem}")
        except (Exception, SystemExit) as err:  # a broken third-party plugin must not stop the mount
            # The cause on the line itself: `xofs status` keeps only the first line of a log record.
            log.error("view plugin %s failed to load; its directory is left out: %s: %s", _describe(ep),
                      type(err).__name__, err, exc_info=True)
            continue
        if view.name in views:
            log.warning("two view plugins want /%s; keeping %s, ignoring %s", view.name, owners[view.name],
                        _describe(ep))
            continue
        views[view.name] = view
        owners[view.name] = _describe(ep)
    return views


def _describe(ep: EntryPoint) -> str:
    """An entry point as its package's author knows it: `distribution: name = module:attribute`."""
    dist = f"{ep.dist.name}: " if ep.dist is not None else ""
    return f"{dist}{ep.name} = {ep.value}"


def _load_order(ep: EntryPoint) -> tuple[bool, str, str]:
    dist = ep.dist.name if ep.dist is not None else ""
    return dist != "xofs", dist, ep.name
