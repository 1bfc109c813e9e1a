"""Hostile listings: what the `corrupt_listing` fault knob makes a collection listing answer.

No real XO sends these on purpose, but a proxy, a bug or a compromised server could, and a client must
survive them: skip or show safely what it cannot use, and keep going. Each corruption keeps the real items
of the listing and adds (or changes) a few, so a client that skips only what is bad still sees everything
else. Added items are copies of the listing's first object with a fresh random id (and `uuid`), their
`name_label` saying which corruption made them (`hostile-<kind>-<n>`) unless the name is the point; with
`fields`, every item is cut down to them. `limit` counts the real items only.
What each kind adds to the real items:

- `not_json`: NDJSON: a line cut in the middle of an object, and an HTML line; a JSON array: the whole
  text cut in half (so nothing in it parses);
- `garbage`: the whole body is an HTML error page (with the JSON content type and status 200);
- `wrong_types`: `id` a number, `name_label` a list, `size` a string, `type` null, `tags` a string,
  `$VBDs` and `VDIs` numbers; and items that are not objects (a list, a string, null, a number, true);
- `missing_fields`: an object without `id`, one without `type`, one without `name_label`, and `{}`;
- `huge_strings`: a 1 MiB `name_label`, a 4 MiB `name_description`, 10,000 `tags`;
- `hostile_names` (`HOSTILE_NAMES`): names with `/`, `..`, `.`, a leading dot, NUL, control characters,
  DEL, a newline, a lone surrogate (a `\\ud800` escape), the empty name, 400 bytes of `é`, shell
  metacharacters;
- `hostile_ids` (`HOSTILE_IDS`): ids `.`, `..`, `a/b`, with NUL, empty, 300 and 3,000 characters, with a
  space, a newline, `?` and `#`, `%2e%2e`, `../../etc`;
- `invalid_utf8`: a `name_label` holding bytes that are not UTF-8 (`ff fe c3 28`);
- `duplicate_ids`: the first item again, unchanged, and the second (or first) again with another name;
- `wrong_type_for_collection`: a `type` no XO has (`VM-banana`), and another collection's type.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from xofs.sim.rest_collections import NDJSON_TYPE, ListQuery, pick, predicate
from xofs.sim.rest_http import JSON_TYPE, Request, Send, StreamSender, send_bytes

_INVALID_UTF8_MARK = "@@xofs-sim-invalid-utf8@@"
_INVALID_UTF8 = b"\xff\xfe\xc3("
_GARBAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"
_DROP = object()


class _Raw:
    """A line sent as these bytes, whatever they are."""

    def __init__(self, data: bytes) -> None:
        self.data = data


HOSTILE_NAMES = ["a/b/../../etc/passwd", "..", ".", ".hidden", "nul\0byte", "ctl\x01\x1b[31mred\x1f", "del\x7f",
                 "line\nbreak", "lone \ud800 surrogate", "", "é" * 200, "$(rm -rf ~); `id` * ? [a] | > <",
                 " ", "~", "-rf"]
HOSTILE_IDS = [".", "..", "a/b", "nul\0id", "", "x" * 300, "y" * 3000, "sp ace", "new\nline", "q?x=1#frag",
               "%2e%2e", "../../etc"]


async def send_corrupt_listing(req: Request, send: Send, query: ListQuery, objects: list[dict[str, Any]],
                               href_base: Callable[[dict[str, Any]], str], type_: str,
                               kinds: tuple[str, ...]) -> None:
    """Answer a collection listing with `kinds` of corruption applied (NDJSON or a JSON array, as asked)."""
    match = predicate(query.filter)
    paths = query.fields.split(",") if query.fields not in (None, "*") else None
    items: list[Any] = []
    limit = query.limit
    for obj in objects:
        if limit == 0:
            break
        if match is None or match(obj):
            items.append({**obj, "href": f"{href_base(obj)}/{obj['id']}"})
            limit -= 1
    base = items[0] if items else {"type": type_, "name_label": "template", "href": href_base({}) + "/x"}
    href_prefix = base["href"].rsplit("/", 1)[0]
    if "garbage" in kinds:
        body = _GARBAGE
    else:
        for kind in kinds:
            items = _CORRUPTIONS[kind](items, base, href_prefix)
        if paths is not None:  # what was asked for, as XO would pick it (a corrupted key is kept if asked)
            items = [{**pick(i, paths), "href": i.get("href")} if isinstance(i, dict) and i else i for i in items]
        body = _ndjson(items) if query.ndjson else _array(items, cut="not_json" in kinds)
    if query.ndjson:
        stream = StreamSender(req, send, [("Content-Type", NDJSON_TYPE)])
        await stream.write(body)
        await stream.end()
    else:
        await send_bytes(req, send, 200, body, JSON_TYPE)


def _clone(base: dict[str, Any], href_prefix: str, kind: str, n: int, **changes: Any) -> dict[str, Any]:
    """A copy of `base` with a fresh id, named after the corruption, then `changes` (`_DROP` removes a key)."""
    new_id = str(uuid.uuid4())
    item = {**base, "id": new_id, "name_label": f"hostile-{kind}-{n}"}
    if "uuid" in base:
        item["uuid"] = new_id
    for key, value in changes.items():
        key = key.replace("__", "$")
        if value is _DROP:
            item.pop(key, None)
        else:
            item[key] = value
    item["href"] = f"{href_prefix}/{item.get('id')}"
    return item


def _not_json(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    cut = _Raw(('{"id":"' + str(uuid.uuid4()) + '","type":"' + str(base.get("type")) + '","name_label":"cut').encode())
    return [*items[:1], cut, _Raw(b"<html><body>502 Bad Gateway</body></html>"), *items[1:]]


def _wrong_types(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    kind = "wrong_types"
    added: list[Any] = [
        {**_clone(base, href_prefix, kind, 0), "id": 42},
        _clone(base, href_prefix, kind, 1, name_label=["a", "list"]),
        _clone(base, href_prefix, kind, 2, size="12 GiB", usage=-1.5),
        _clone(base, href_prefix, kind, 3, type=None),
        _clone(base, href_prefix, kind, 4, tags="a,b"),
        _clone(base, href_prefix, kind, 5, __VBDs=5, VDIs=17, __container=[], power_state=7),
        [1, 2], "a string", None, 17, True,
    ]
    return items + added


def _missing_fields(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    kind = "missing_fields"
    return items + [_clone(base, href_prefix, kind, 0, id=_DROP), _clone(base, href_prefix, kind, 1, type=_DROP),
                    _clone(base, href_prefix, kind, 2, name_label=_DROP), {}]


def _huge_strings(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    kind = "huge_strings"
    return items + [_clone(base, href_prefix, kind, 0, name_label="H" * (1 << 20)),
                    _clone(base, href_prefix, kind, 1, name_description="D" * (4 << 20)),
                    _clone(base, href_prefix, kind, 2, tags=[f"tag-{i}" for i in range(10_000)])]


def _hostile_names(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    return items + [_clone(base, href_prefix, "hostile_names", n, name_label=name)
                    for n, name in enumerate(HOSTILE_NAMES)]


def _hostile_ids(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    added = []
    for n, obj_id in enumerate(HOSTILE_IDS):
        item = _clone(base, href_prefix, "hostile_ids", n, id=obj_id)
        if "uuid" in item:
            item["uuid"] = obj_id
        added.append(item)
    return items + added


def _invalid_utf8(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    return items + [_clone(base, href_prefix, "invalid_utf8", 0, name_label=f"bad-utf8-{_INVALID_UTF8_MARK}")]


def _duplicate_ids(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    objects = [i for i in items if isinstance(i, dict)] or [base]
    other = objects[1] if len(objects) > 1 else objects[0]
    return items + [dict(objects[0]), {**other, "name_label": f"{other.get('name_label')} (duplicate)"}]


def _wrong_type_for_collection(items: list[Any], base: dict[str, Any], href_prefix: str) -> list[Any]:
    kind = "wrong_type_for_collection"
    other = "VDI" if base.get("type") != "VDI" else "VM"
    return items + [_clone(base, href_prefix, kind, 0, type="VM-banana"),
                    _clone(base, href_prefix, kind, 1, type=other)]


_CORRUPTIONS: dict[str, Callable[[list[Any], dict[str, Any], str], list[Any]]] = {
    "not_json": _not_json, "wrong_types": _wrong_types, "missing_fields": _missing_fields,
    "huge_strings": _huge_strings, "hostile_names": _hostile_names, "hostile_ids": _hostile_ids,
    "invalid_utf8": _invalid_utf8, "duplicate_ids": _duplicate_ids,
    "wrong_type_for_collection": _wrong_type_for_collection,
}


def _line(item: Any) -> bytes:
    if isinstance(item, _Raw):
        return item.data
    try:
        data = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate: Node's JSON.stringify writes it as a \u escape
        data = json.dumps(item, separators=(",", ":")).encode()
    return data.replace(_INVALID_UTF8_MARK.encode(), _INVALID_UTF8)


def _ndjson(items: list[Any]) -> bytes:
    return b"".join(_line(item) + b"\n" for item in items)


def _array(items: list[Any], *, cut: bool) -> bytes:
    body = b"[\n  " + b",\n  ".join(_line(i) for i in items if not isinstance(i, _Raw)) + b"\n]"
    return body[: len(body) // 2] if cut else body
