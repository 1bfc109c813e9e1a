"""Query and path parameter checks with tsoa's words, and the 422 they add up to.

tsoa checks every declared parameter of a route, in declaration order, and reports all the failures at
once; xo-server turns them into `invalidParameters(fields)`, whose JSON is
`{"error": {"<param>": {"message": …, "value": …}}, "data": {}}` (an object where other errors have a
string). The messages are tsoa's (`invalid boolean value`, `invalid float number`, `invalid string value`),
except that a value outside an enum or union reads `Value does not match any allowed schema`, as xo-server
rewrites it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from xofs.sim.rest_http import RestError

NO_SCHEMA_MATCH = "Value does not match any allowed schema"
# validator.js `isFloat` (en-US), which tsoa uses for `number` parameters.
_FLOAT = re.compile(r"^[-+]?[0-9]*(\.[0-9]*)?([eE][-+]?[0-9]+)?$")

QueryValue = str | list[str] | None


class ParamErrors:
    """Collects field errors in the order the parameters are declared, then raises them as one 422."""

    def __init__(self) -> None:
        self.fields: dict[str, dict[str, Any]] = {}

    def add(self, name: str, message: str, value: Any) -> None:
        self.fields[name] = {"message": message, "value": value}

    def string(self, name: str, value: QueryValue) -> str | None:
        if value is None or isinstance(value, str):
            return value
        self.add(name, "invalid string value", value)
        return None

    def boolean(self, name: str, value: QueryValue) -> bool | None:
        """tsoa's boolean: `true`/`false` in any case; anything else, an empty value included, fails."""
        if value is None:
            return None
        text = value if isinstance(value, str) else ",".join(value)
        if text.lower() == "true":
            return True
        if text.lower() == "false":
            return False
        self.add(name, "invalid boolean value", value)
        return None

    def number(self, name: str, value: QueryValue) -> float | None:
        if value is None:
            return None
        text = value if isinstance(value, str) else ",".join(value)
        if text in ("", ".", "-", "+") or not _FLOAT.match(text):
            self.add(name, "invalid float number", value)
            return None
        try:
            return float(text)
        except ValueError:  # "e5" passes isFloat, and JavaScript's parseFloat makes it NaN
            return math.nan

    def choice(self, name: str, value: QueryValue, allowed: tuple[str, ...]) -> str | None:
        if value is None or (isinstance(value, str) and value in allowed):
            return value
        self.add(name, NO_SCHEMA_MATCH, value)
        return None

    def raise_if_any(self) -> None:
        if self.fields:
            raise RestError(422, self.fields, data={})


def invalid_parameters(message: str) -> RestError:
    """XO's `invalidParameters(message)`: 422 with the message and `data: {}` (its `errors` is undefined)."""
    return RestError(422, message, data={})
