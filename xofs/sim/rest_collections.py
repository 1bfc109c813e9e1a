"""Collections and single objects: `GET /rest/v0/<collection>[/<id>]` and `GET /rest/v0/vms/<id>/vdis`.

Each collection holds exactly one XO type. A listing takes tsoa's query parameters (`fields`, `ndjson`,
`markdown`, `filter`, `limit`, checked in that order, all failures in one 422), filters with a
complex-matcher expression (a parse error is a 400 naming the string), counts `limit` after the filter the
way `sendObjects` does (a loop that stops when the counter hits exactly 0, so `limit=1.5` lists everything),
and maps each object as `makeObjectMapper` does: an href string without `fields`, `{...object, href}` with
`fields=*`, lodash `pick` of the listed paths plus `href` otherwise.

Output: pretty JSON (through `send_json`, so ETag, 304, gzip and HEAD apply), NDJSON with `ndjson=true`
(compact lines; a bare href is a JSON string literal), or a markdown table with `markdown=true`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from xofs.matcher import MatcherSyntaxError, compile_filter
from xofs.sim import rest_json
from xofs.sim.rest_http import JSON_TYPE, Request, RestError, Send, StreamSender, send_bytes
from xofs.sim.rest_params import ParamErrors, invalid_parameters

BASE_URL = "/rest/v0"

# Collection path -> the one XO type it holds.
COLLECTIONS: dict[str, str] = {
    "vms": "VM", "vm-snapshots": "VM-snapshot", "vm-templates": "VM-template", "vm-controllers": "VM-controller",
    "vdis": "VDI", "vdi-snapshots": "VDI-snapshot", "srs": "SR", "hosts": "host", "pools": "pool",
    "vbds": "VBD", "vifs": "VIF", "networks": "network", "pifs": "PIF", "pbds": "PBD",
}
NDJSON_TYPE = "application/x-ndjson"
MARKDOWN_TYPE = "text/markdown; charset=utf-8"
_NDJSON_BATCH = 256 * 1024  # bytes of NDJSON lines gathered before they are sent


class ListQuery:
    """The validated query of a listing route."""

    def __init__(self, req: Request) -> None:
        errors = ParamErrors()
        self.fields = errors.string("fields", req.query.get("fields"))
        errors.boolean("ndjson", req.query.get("ndjson"))
        errors.boolean("markdown", req.query.get("markdown"))
        self.filter = errors.string("filter", req.query.get("filter"))
        limit = errors.number("limit", req.query.get("limit"))
        errors.raise_if_any()
        self.limit = math.inf if limit is None else limit
        # sendObjects compares the raw strings: `ndjson=TRUE` passes validation but still gives JSON.
        self.ndjson = req.query.get("ndjson") == "true"
        self.markdown = req.query.get("markdown") == "true"


def predicate(expression: str | None) -> Callable[[dict[str, Any]], bool] | None:
    """The compiled filter, or None for no filter; a syntax error is XO's `ApiError` 400."""
    if expression is None:
        return None
    try:
        return compile_filter(expression)
    except MatcherSyntaxError as error:
        raise RestError(400, error.message, data={"stringToParse": expression}) from error


def pick(obj: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """lodash `pick`: the listed keys or dotted paths that exist, nested as in the source, in list order."""
    out: dict[str, Any] = {}
    for path in paths:
        if path in obj:
            out[path] = obj[path]
            continue
        keys = path.split(".")
        value: Any = obj
        for key in keys:
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                break
        else:
            _set_path(out, obj, keys, value)
    return out


def _set_path(out: Any, source: Any, keys: list[str], value: Any) -> None:
    """lodash `baseSet`: create the containers along `keys` (lists where the source has lists)."""
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(out, list):
            index = int(key)
            out.extend([None] * (index + 1 - len(out)))
            if last:
                out[index] = value
                return
            source = source[index]
            if out[index] is None:
                out[index] = [] if isinstance(source, list) else {}
            out = out[index]
        else:
            if last:
                out[key] = value
                return
            source = source[key]
            if key not in out:
                out[key] = [] if isinstance(source, list) else {}
            out = out[key]


class Lister:
    """Answers listing routes; keeps the formatted text of unchanged objects between requests."""

    def __init__(self) -> None:
        self.cache = rest_json.PrettyCache()

    async def send_list(self, req: Request, send: Send, query: ListQuery, objects: Iterable[dict[str, Any]],
                        href_base: Callable[[dict[str, Any]], str], *, filtered: bool = False) -> None:
        """List `objects` (already filtered if `filtered`) with hrefs `href_base(obj) + "/" + id`."""
        match = None if filtered else predicate(query.filter)
        fields = query.fields
        paths = fields.split(",") if fields is not None and fields != "*" else None
        limit = query.limit
        selected: list[tuple[dict[str, Any], str]] = []
        for obj in objects:
            if limit == 0:
                break
            if match is not None and not match(obj):
                continue
            selected.append((obj, f"{href_base(obj)}/{obj['id']}"))
            limit -= 1
        if query.ndjson and query.markdown:
            raise invalid_parameters("Cannot use both ndjson and markdown output formats simultaneously")
        if query.ndjson:
            await self._send_ndjson(req, send, selected, fields, paths)
        elif query.markdown:
            await _send_markdown(req, send, selected, fields, paths)
        else:
            await send_bytes(req, send, 200, self._json_array(selected, fields, paths).encode(), JSON_TYPE)

    def _json_array(self, selected: list[tuple[dict[str, Any], str]], fields: str | None,
                    paths: list[str] | None) -> str:
        if not selected:
            return "[]"
        if fields is None:
            items = [rest_json.quote(href) for _, href in selected]
        elif paths is None:
            items = [self.cache.item_with_href(obj, href) for obj, href in selected]
        else:
            items = [rest_json.pretty({**pick(obj, paths), "href": href}, "  ") for obj, href in selected]
        return "[\n  " + ",\n  ".join(items) + "\n]"

    async def _send_ndjson(self, req: Request, send: Send, selected: list[tuple[dict[str, Any], str]],
                           fields: str | None, paths: list[str] | None) -> None:
        stream = StreamSender(req, send, [("Content-Type", NDJSON_TYPE)])
        batch: list[str] = []
        size = 0
        for obj, href in selected:
            if fields is None:
                line = rest_json.quote(href)
            elif paths is None:
                body = rest_json.compact(obj)
                line = (body[:-1] + "," if len(body) > 2 else "{") + '"href":' + rest_json.quote(href) + "}"
            else:
                line = rest_json.compact({**pick(obj, paths), "href": href})
            batch.append(line)
            size += len(line) + 1
            if size >= _NDJSON_BATCH:
                await stream.write(("\n".join(batch) + "\n").encode())
                batch, size = [], 0
        if batch:
            await stream.write(("\n".join(batch) + "\n").encode())
        await stream.end()


async def _send_markdown(req: Request, send: Send, selected: list[tuple[dict[str, Any], str]],
                         fields: str | None, paths: list[str] | None) -> None:
    """`makeMarkdownTable`: hrefs one per line, else a table whose columns are the first row's keys."""
    if not selected:
        text = "No results."
    elif fields is None:
        text = "\n".join(href for _, href in selected)
    else:
        rows = [obj if paths is None else pick(obj, paths) for obj, _ in selected]
        headers = list(rows[0])
        lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
        lines += ["| " + " | ".join(_cell(row.get(h)) for h in headers) + " |" for row in rows]
        text = "\n".join(lines)
    stream = StreamSender(req, send, [("Content-Type", MARKDOWN_TYPE)])
    await stream.write(text.encode())
    await stream.end()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        text = rest_json.compact(value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = rest_json.js_number(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def collection_href(req: Request) -> Callable[[dict[str, Any]], str]:
    """`makeObjectMapper` without a path: the request path, without a trailing slash."""
    base = req.raw_path[:-1] if req.raw_path.endswith("/") else req.raw_path
    return lambda _obj: base


def vdi_href(obj: dict[str, Any]) -> str:
    """The href base of a VM's disk listing: `/rest/v0/vdis` or `/rest/v0/vdi-snapshots`, by the disk's type."""
    return f"{BASE_URL}/{obj['type'].lower()}s"
