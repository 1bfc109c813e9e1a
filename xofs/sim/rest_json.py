"""JSON text as Node writes it: `JSON.stringify(value, null, 2)` for Express bodies, compact for NDJSON.

Python's `json.dumps(indent=2)` already lays out objects as Node does (same separators, `[]` and `{}` for
empty containers) but runs in pure Python, and it writes integral floats as `1.0` where Node writes `1`.
`pretty` is a faster recursive formatter with Node's number rules. `PrettyCache` keeps the formatted text of
objects the model has not replaced since, so that listing 10,000 VMs with `fields=*` twice costs one
formatting, not two.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from json.encoder import encode_basestring as _quote  # C-accelerated, escapes like Node (no \u for non-ASCII)
from typing import Any

_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def js_number(value: float) -> str:
    """A number as `Number.prototype.toString` writes it (`1` not `1.0`, `1e-7`, `1e+21`, and beyond 2**53
    the shortest digits padded with zeros); NaN and the infinities are `null`, as in `JSON.stringify`."""
    if math.isnan(value) or math.isinf(value):
        return "null"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    # repr gives the shortest digits that read back as this double, the digits JavaScript picks too.
    _, digits_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digits_tuple))
    k = len(digits)
    n = k + int(exponent)  # the value is 0.<digits> * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if n > 0 else '-'}{abs(n - 1)}"
    return "-" + text if value < 0 else text


def pretty(value: Any, indent: str = "") -> str:
    """`JSON.stringify(value, null, 2)` of a value nested at `indent` (its first line is not indented)."""
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is dict:
        if not value:
            return "{}"
        inner = indent + "  "
        return ("{\n" + inner + (",\n" + inner).join([
            _quote(k) + ": " + (_quote(v) if type(v) is str else pretty(v, inner)) for k, v in value.items()
        ]) + "\n" + indent + "}")
    if kind is list or kind is tuple:
        if not value:
            return "[]"
        inner = indent + "  "
        return ("[\n" + inner + (",\n" + inner).join([
            _quote(v) if type(v) is str else pretty(v, inner) for v in value
        ]) + "\n" + indent + "]")
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return js_number(value)
    if isinstance(value, str):
        return _quote(str(value))
    if isinstance(value, int):
        return int.__repr__(int(value))
    raise TypeError(f"cannot write {kind.__name__} as JSON")


def compact(value: Any) -> str:
    """`JSON.stringify(value)`: no spaces at all, as NDJSON lines and WebSocket frames are."""
    return _COMPACT.encode(value)


def quote(text: str) -> str:
    """A JSON string literal (an NDJSON line of an href is exactly this)."""
    return _quote(text)


class PrettyCache:
    """The pretty text of whole objects at collection depth, reused while the model holds the same dict.

    The model replaces an object's dict when it changes (it never edits one in place), so "the same dict
    as last time" means "the same text as last time". Entries whose object is gone are dropped by
    `forget_missing`.
    """

    def __init__(self) -> None:
        self._texts: dict[str, tuple[dict[str, Any], str]] = {}

    def item_with_href(self, obj: dict[str, Any], href: str) -> str:
        """`{...obj, href}` as an array item of a pretty collection (indented by two spaces)."""
        key = obj.get("id")
        entry = self._texts.get(key) if isinstance(key, str) else None
        if entry is not None and entry[0] is obj:
            body = entry[1]
        else:
            body = pretty(obj, "  ")
            if isinstance(key, str):
                self._texts[key] = (obj, body)
        tail = '"href": ' + _quote(href) + "\n  }"
        if body == "{}":
            return "{\n    " + tail
        return body[:-4] + ",\n    " + tail

    def forget_missing(self, live: dict[str, Any]) -> None:
        """Drop the texts of objects that are no longer in `live` (id -> object)."""
        for key in [k for k in self._texts if k not in live]:
            del self._texts[key]
