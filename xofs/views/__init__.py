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
import re
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


# What a plugin's code may raise that must fail its directory or file, not end the daemon: SystemExit and
# KeyboardInterrupt too (a plugin, or a library it calls, that exits). The daemon takes its own stop
# signals through trio's signal receiver, so no real Ctrl-C arrives as a KeyboardInterrupt there.
PLUGIN_FAILURES = (Exception, SystemExit, KeyboardInterrupt)
# The collections XO exports from (`GET /rest/v0/<collection>/<id>.<format>`).
EXPORT_COLLECTIONS = frozenset({"vms", "vm-snapshots", "vm-templates", "vdis", "vdi-snapshots"})
_EXPORT_ID = re.compile(r"[A-Za-z0-9_-]+")  # nothing that moves the URL elsewhere: no '/', '.', '?', '%'
_EXPORT_FORMAT = re.compile(r"[a-z0-9]+")
_EXPORT_QUERY = re.compile(r"[A-Za-z0-9_.~=&+,-]*")
LINK_MAX = 4095  # bytes: the kernel's PATH_MAX, less its NUL


def node_problem(node: object) -> str | None:
    """Why `node` is no node a view may answer, or None: a `Dir` of a known kind, a `File` of a known
    content whose fields have their types (an `Export` that names an XO export), a `Link` to a path the
    kernel takes; `obj_id` a str or None."""
    if not isinstance(node, Dir | File | Link):
        return f"a {type(node).__name__}, not a Dir, File or Link"
    if node.obj_id is not None and not isinstance(node.obj_id, str):
        return f"its obj_id is a {type(node.obj_id).__name__}, not a str"
    if isinstance(node, Dir):
        if node.kind not in ("plain", "import"):
            return f"a Dir of kind {node.kind!r}, not 'plain' or 'import'"
        return "an import Dir without the SR's id" if node.kind == "import" and node.obj_id is None else None
    if isinstance(node, Link):
        target = node.target
        if not isinstance(target, str) or not target or "\0" in target:
            return "a Link whose target is no path (empty, not a str, or with NUL in it)"
        try:
            length = len(target.encode("utf-8", "surrogateescape"))  # as the adapter hands it to the kernel
        except UnicodeEncodeError:
            return "a Link target with a lone surrogate in it, which no path can hold"
        return f"a Link target over {LINK_MAX} bytes" if length > LINK_MAX else None
    return content_problem(node.content)


def content_problem(content: object) -> str | None:
    """Why `content` is no file content xofs can serve, or None."""
    if isinstance(content, Export):
        if content.collection not in EXPORT_COLLECTIONS:
            return f"an Export from {content.collection!r}, not one of {', '.join(sorted(EXPORT_COLLECTIONS))}"
        for what, value, pattern in (("obj_id", content.obj_id, _EXPORT_ID), ("fmt", content.fmt, _EXPORT_FORMAT),
                                     ("query", content.query, _EXPORT_QUERY)):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                return f"an Export whose {what} {value!r} is not a plain {pattern.pattern} word"
        size = content.exact_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            return f"an Export whose exact_size {size!r} is no length (an int, 0 or more, or None)"
        return None
    if isinstance(content, Rendered | TypeSnapshot | Live):
        key = content.obj_id if isinstance(content, Rendered) else (
            content.type_ if isinstance(content, TypeSnapshot) else content.key)
        if not isinstance(key, str):
            return f"a {type(content).__name__} keyed by a value of type {type(key).__name__}, not a str"
        return None if callable(content.render) else f"a {type(content).__name__} whose render is not callable"
    return f"a File of a {type(content).__name__}"


class ObjectSource(Protocol):
    """What a `ViewContext` reads: xofs.cache.ObjectCache (so that a third-party view need not import it)."""

    def get(self, obj_id: str) -> dict | None: ...

    def of_type(self, type_: str) -> Mapping[str, dict]: ...


@dataclass
class ViewContext:
    """Read access to the object cache that records what a listing depended on."""

    cache: ObjectSource
    ids: set[str] = field(default_factory=set)
    types: dict[str, frozenset[str]] = field(default_factory=dict)

    def get(self, obj_id: str) -> dict | None:
        """One object (or None); the listing is recomputed whenever it changes."""
        self.ids.add(obj_id)
        return self.cache.get(obj_id)

    def of_type(self, type_: str, fields: tuple[str, ...] = ()) -> Mapping[str, dict]:
        """All objects of a type, id → object; the listing is recomputed when one appears or vanishes,
        or when one of them changes a field in `fields`."""
        fields = fields if isinstance(fields, str) else tuple(fields)  # once, were it an iterator
        if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
            # `fields=("name_label")` is a str: taken letter by letter, no change would ever recompute
            raise TypeError(f"of_type({type_!r}, fields={fields!r}): fields must be a tuple of field names, "
                            "such as ('name_label',)")
        self.types[type_] = self.types.get(type_, frozenset()) | frozenset(fields)
        return self.cache.of_type(type_)


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


def load_views(names: list[str] | None = None, failed: list[str] | None = None) -> dict[str, View]:
    """Instantiate the views registered under `xofs.views` (all, or those named), by directory name.

    xofs's own views come first and keep their names; third-party ones follow in the order of their
    distribution and entry point names (not the order of the files on disk), the first keeping a name.
    The entry points that failed to load are logged, and appended to `failed` if given."""
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
        except PLUGIN_FAILURES as err:  # a broken third-party plugin must not stop the mount
            # The cause on the line itself: `xofs status` keeps only the first line of a log record.
            log.error("view plugin %s failed to load; its directory is left out: %s: %s", _describe(ep),
                      type(err).__name__, err, exc_info=True)
            if failed is not None:
                failed.append(_describe(ep))
            continue
        if view.name in views:
            log.warning("two view plugins want /%s; keeping %s, ignoring %s", view.name, owners[view.name],
                        _describe(ep))
            continue
        views[view.name] = view
        owners[view.name] = _describe(ep)
        if not is_builtin(view):
            log.info("view plugin %s loaded: /%s", _describe(ep), view.name)
    return views


def is_builtin(view: object) -> bool:
    """Whether `view` is one of xofs's own: those are trusted (their listings are not checked, nor timed)
    and listed before the mount goes live."""
    return type(view).__module__.startswith("xofs.")


def _describe(ep: EntryPoint) -> str:
    """An entry point as its package's author knows it: `distribution: name = module:attribute`."""
    dist = f"{ep.dist.name}: " if ep.dist is not None else ""
    return f"{dist}{ep.name} = {ep.value}"


def _load_order(ep: EntryPoint) -> tuple[bool, str, str]:
    dist = ep.dist.name if ep.dist is not None else ""
    return dist != "xofs", dist, ep.name
