"""What xo-server 5.207.2 makes of one incoming websocket frame, before any API method runs.

xo-server hands every frame to a json-rpc-peer 0.17.0 `Peer` (`write`), which parses it with
json-rpc-protocol 0.13.2 (the versions its yarn.lock pins). `parse` sorts a message into a request, a
notification, a response or an error, JSON-RPC 2.0 or 1.0 (no `jsonrpc` member: params must be an array, a
null id makes a notification), or rejects it: -32700 `invalid JSON`, or -32600 with a wording that names the
faulty member (`invalid identifier: null instead of number or string`, …).

Only requests are answered. A rejected message gets no answer at all: the peer formats the error (with id
null) but rejects `exec`'s promise with it, and `write` turns that into an `error` event, which xo-server
does not listen to (its patched EventEmitter logs "unhandled error event"). A response or an error naming an
id fails the same way (the server never sent a request to match), an error with id null is dropped, and
xo-server ignores notifications. A JSON array is a batch: every item is parsed first (one bad item and
nothing runs), the requests run, and the array of their answers goes to ws 8's `send`, which makes it a
binary frame of one zero byte per answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MISSING: Any = object()  # JavaScript's `undefined`: a member the message does not have


class Rejected(Exception):
    """A message json-rpc-protocol's `parse` refuses, with the code and message of the error it throws."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Message:
    """A parsed message: `kind` is "request", "notification", "response" or "error"."""

    kind: str
    id: Any = MISSING
    method: str = ""
    params: Any = MISSING


Parsed = Message | list["Parsed"]


def decode(text: str) -> Any:
    """`JSON.parse`: `json.loads` without the NaN and Infinity literals JavaScript refuses."""
    try:
        return json.loads(text, parse_constant=_refuse)
    except (ValueError, RecursionError):
        raise Rejected(-32700, "invalid JSON") from None


def _refuse(literal: str) -> Any:
    raise ValueError(literal)


def parse(message: Any) -> Parsed:
    """json-rpc-protocol's `parse` of a decoded JSON value (a list for a batch); raises Rejected."""
    if isinstance(message, list):
        return [parse(item) for item in message]
    if message is None:  # reading `jsonrpc` of null throws a TypeError, which is no JSON-RPC error
        raise Rejected(-32000, "unknown error from the peer")
    fields: dict[str, Any] = message if isinstance(message, dict) else {}  # other values have no members
    version = _version(fields.get("jsonrpc", MISSING))
    method, request_id = fields.get("method", MISSING), fields.get("id", MISSING)
    params = fields.get("params", MISSING)
    if isinstance(method, str):
        if request_id is (MISSING if version == "2.0" else None):
            _check_params(params, version)
            return Message("notification", method=method, params=params)
        _check_id(request_id)
        _check_params(params, version)
        return Message("request", request_id, method, params)
    error = fields.get("error", MISSING)
    if error is not (MISSING if version == "2.0" else None):
        if request_id is not None:
            _check_id(request_id)
        _check_error(error, version)
        return Message("error", request_id)
    _check_id(request_id)
    return Message("response", request_id)


def js_type(value: Any) -> str:
    """JavaScript's `typeof`, with "null" for null (the library's `getType`)."""
    if value is MISSING:
        return "undefined"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def _is_number(value: Any) -> bool:
    """A finite number (a JSON integer too big for a double is Infinity in JavaScript)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _version(jsonrpc: Any) -> str:
    if jsonrpc is MISSING:
        return "1.0"
    if jsonrpc == "2.0" and isinstance(jsonrpc, str):
        return "2.0"
    raise Rejected(-32600, f"invalid version: {js_type(jsonrpc)} instead of undefined or '2.0'")


def _check_id(request_id: Any) -> None:
    if not (_is_number(request_id) or isinstance(request_id, str)):
        raise Rejected(-32600, f"invalid identifier: {js_type(request_id)} instead of number or string")


def _check_params(params: Any, version: str) -> None:
    if version == "2.0":
        if params is not MISSING and not isinstance(params, list | dict):
            raise Rejected(-32600, f"invalid params: {js_type(params)} instead of undefined, array or object")
    elif not isinstance(params, list):
        raise Rejected(-32600, f"invalid params: {js_type(params)} instead of array")


def _check_error(error: Any, version: str) -> None:
    if version == "1.0":
        if error is None or error is MISSING:
            raise Rejected(-32600, f"invalid error {js_type(error)}")
        return
    fields = error if isinstance(error, dict) else {}
    code, message = fields.get("code", MISSING), fields.get("message", MISSING)
    if error is None or not (_is_number(code) and code % 1 == 0) or not isinstance(message, str):
        raise Rejected(-32600, f"invalid error: {js_type(error)} instead of {{code, message}}")
