"""/search/<expression>/: XO's filter language as directories of links to the matching objects.

Any complex-matcher expression (the grammar XO's REST `?filter=` takes, evaluated by xofs.matcher, the
module the simulator answers `filter=` with) names a directory that exists when it is looked up:
`ls "/mnt/xo/search/type:VM power_state:running"`. It holds one symbolic link per matching VM, snapshot,
VDI, SR, host or pool, named like the entries of /by-name (VBDs are not shown). Since `/` cannot appear in
a file name, `／` (U+FF0F) in the directory name stands for `/`: `search/name_label:／^web／` is the
expression `name_label:/^web/`.

`ls /mnt/xo/search` itself lists only the saved searches: the expressions in the file named by
$XOFS_SAVED_SEARCHES, else $XDG_CONFIG_HOME/xofs/searches (~/.config/xofs/searches), one per line, `#`
starting a comment line. That small local file is read when xofs computes the listing of /search, which it
keeps, like every listing, until the kernel forgets the directory; any expression can be looked up
whether it is saved or not.

Results follow XO's events like every other listing. The listing depends on the fields the expression
names (`name_label:web` is recomputed only when some object's `name_label` changes, or objects come and
go); an expression with a bare term (`web`, `/^web/`, `>2`) searches every value of every object, so
its listing depends on every field and is recomputed whenever any object of a shown type changes.

A name that does not parse is no directory (ENOENT); the parser's message is logged once per name. So is
an expression whose evaluation over all objects takes more than SEARCH_BUDGET seconds of CPU (a regular
expression that backtracks, such as `name_label:／^(a|a)+$／` against a long name): the daemon answers
every request from one thread, and such a search would stop the whole mount (xofs.budget).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import cachetools

from xofs.budget import CpuBudget, OverBudget
from xofs.matcher import And, MatcherSyntaxError, Node, Not, Null, Or, Property, TruthyProperty, parse
from xofs.names import NAME_MAX, unique_names
from xofs.views import Dir, Link, ViewContext
from xofs.views import Node as TreeNode
from xofs.views.byname import KINDS

log = logging.getLogger(__name__)

# XO type -> the view its objects' directories are in (the types /by-name shows, so no VBDs).
TYPE_VIEWS: dict[str, str] = dict(KINDS.values())

SEARCH_BUDGET = 5.0  # seconds of CPU one evaluation over all objects may take (10,000 VMs: about 0.4 s)

SLASH = "／"  # U+FF0F FULLWIDTH SOLIDUS: stands for `/` in a directory name, as in xofs.names


def expression_of(name: str) -> str:
    """The expression a directory name stands for."""
    return name.replace(SLASH, "/")


def name_of(expression: str) -> str:
    """The directory name of an expression."""
    return expression.replace("/", SLASH)


def watched_fields(node: Node) -> frozenset[str] | None:
    """The top-level fields an expression reads from an object, or None when it tests every value."""
    if isinstance(node, Null):
        return frozenset()
    if isinstance(node, Property | TruthyProperty):
        return frozenset({node.name})  # what the property's own test reads lies inside that one field
    if isinstance(node, Not):
        return watched_fields(node.child)
    if isinstance(node, And | Or):
        fields: frozenset[str] = frozenset()
        for child in node.children:
            more = watched_fields(child)
            if more is None:
                return None
            fields |= more
        return fields
    return None  # a word, glob, regex, number or comparison on the object searches all its values


def saved_searches_file() -> Path:
    explicit = os.environ.get("XOFS_SAVED_SEARCHES")
    if explicit:
        return Path(explicit)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(config) / "xofs" / "searches"


def read_saved_searches(path: Path) -> list[str]:
    """The expressions in a saved-searches file: one a line, blank lines and `#` comment lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        log.warning("cannot read the saved searches in %s: %s", path, err)
        return []
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _matches(node: Node, obj: dict) -> bool:
    try:
        return node.match(obj)
    except TypeError:  # a comparison on an object with a `toString` key: XO's JavaScript throws there too
        return False


class SearchView:
    name = "search"

    def __init__(self) -> None:
        # Directory name -> its parsed expression, None when it does not parse. Lookups of one name come
        # again and again (the kernel keeps no negative entries), so parse and complain once per name.
        self._expressions: cachetools.LRUCache[str, Node | None] = cachetools.LRUCache(maxsize=1024)

    def expression(self, name: str) -> Node | None:
        """The parsed expression a directory name stands for; None (logged once) when it is not one."""
        try:
            return self._expressions[name]
        except KeyError:
            pass
        node: Node | None = None
        try:
            node = parse(expression_of(name))
        except MatcherSyntaxError as err:
            log.warning("/search/%s: not a filter expression, so no such directory: %s", name, err.message)
        except RecursionError:
            log.warning("/search/%s: not a filter expression, so no such directory: nested too deeply", name)
        self._expressions[name] = node
        return node

    def lookup(self, ctx: ViewContext, path: tuple[str, ...], name: str) -> TreeNode | None:
        """A search directory exists when asked for by name, listed or not."""
        return Dir() if not path and self.expression(name) is not None else None

    def children(self, ctx: ViewContext, path: tuple[str, ...]) -> Mapping[str, TreeNode] | None:
        if not path:
            return self.saved_entries()
        if len(path) != 1:
            return None
        name = path[0]
        node = self.expression(name)
        if node is None:
            return None
        try:
            with CpuBudget(SEARCH_BUDGET) as budget:
                return self.results(ctx, node, budget)
        except OverBudget:
            log.warning("/search/%s: matching it against the objects took more than %g s of CPU (a regular "
                        "expression that backtracks?), so it is no directory any more", name, SEARCH_BUDGET)
            self._expressions[name] = None
            return None

    def saved_entries(self) -> dict[str, TreeNode]:
        path = saved_searches_file()
        entries: dict[str, TreeNode] = {}
        for expression in read_saved_searches(path):
            name = name_of(expression)
            if name in (".", "..") or "\0" in name or len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
                log.warning("saved search %r in %s cannot be a directory name; left out", expression, path)
            elif self.expression(name) is not None:
                entries[name] = Dir()
        return entries

    def results(self, ctx: ViewContext, node: Node, budget: CpuBudget) -> dict[str, TreeNode]:
        """Links to the objects `node` matches, named after them; their names depend on `name_label`. Each
        match runs on `budget`."""
        fields = watched_fields(node)
        watch = tuple(sorted((fields or frozenset()) | {"name_label"}))
        found: list[tuple[str, object]] = []
        view_of: dict[str, str] = {}
        for type_, view in TYPE_VIEWS.items():
            for obj_id, obj in ctx.of_type(type_, watch).items():
                if fields is None:
                    ctx.get(obj_id)  # a bare term reads every field: any change of the object counts
                if budget.run(_matches, node, obj):
                    found.append((obj_id, obj.get("name_label")))
                    view_of[obj_id] = view
        return {name: Link(f"../../{view_of[obj_id]}/{obj_id}", obj_id)
                for obj_id, name in unique_names(found).items()}
