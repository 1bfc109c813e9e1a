"""The `data` an admin gets with a -32000 error: XO's `serializeError` of the JavaScript error, stack included.

xo-server answers an error that is not an XO error with `new JsonRpcError(error.message, undefined,
serializeError(serializeError(error)))` when the caller is an admin (`xo-mixins/api.mjs`). `serializeError`
(`utils.mjs`) copies the error's enumerable properties, then `code`, `message`, `name` and `stack`; `code` is
undefined on a plain error, so JSON leaves it out: `{"message", "name", "stack"}`.

The stack is the one Node 20 prints for xo-server 5.207.2 installed from source in /opt/xen-orchestra: the
frames of the code that threw (where the simulator knows it), then those of XO's API call path, at most 10
(Node's default `Error.stackTraceLimit`, which xo-server keeps). Nothing of the simulator's own files shows.
"""

from __future__ import annotations

from typing import Any

from xofs.matcher import MatcherSyntaxError

XO = "/opt/xen-orchestra"
CM = f"{XO}/packages/complex-matcher/index.js"  # complex-matcher 1.1.1, a CommonJS module of the monorepo
API = f"file://{XO}/packages/xo-server/src/xo-mixins/api.mjs"
STACK_LIMIT = 10

# From the API method's wrapper down to `#callApiMethod`: xo-server runs every logged method inside a
# @vates/task `Task` (lines and columns of 5.207.2's sources, names as Node 20 prints them).
API_FRAMES = [
    f"Xo.apiWrapper ({API}:269:25)",
    f"{API}:426:33",
    "AsyncLocalStorage.run (node:async_hooks:346:14)",
    f"Task.runInside ({XO}/@vates/task/index.js:204:41)",
    f"Task.run ({XO}/@vates/task/index.js:188:31)",
    f"run ({API}:426:16)",
    f"#callApiMethod ({API}:475:24)",
]

# `xo.getAllObjects` with a string filter calls `CM.parse(filter)` (`api/xo.mjs`). A syntax error throws from
# the parser's `Failure.value` getter; the frames of the other two errors come from deep in the parser
# combinators (these are those of `name_label:/(/` and `size:>abc`, taken from complex-matcher 1.1.1 run
# under Node 20).
GET_ALL_OBJECTS = f"Xo.getAllObjects (file://{XO}/packages/xo-server/src/api/xo.mjs:64:17)"
PARSE_ERROR_FRAMES = [f"get value [as value] ({CM}:328:11)", f"P.parse ({CM}:416:40)", GET_ALL_OBJECTS]
REGEXP_ERROR_FRAMES = [
    "new RegExp (<anonymous>)", f"new RegExpNode ({CM}:244:15)", f"P.grammar.regex [as _parse] ({CM}:526:29)",
    f"P._parse ({CM}:346:35)", f"P._parse ({CM}:346:35)", f"P._parse ({CM}:444:27)", f"P._parse ({CM}:383:35)",
    f"P._parse ({CM}:407:27)", f"P._parse ({CM}:346:35)", f"P._parse ({CM}:444:27)",
]
NUMBER_ERROR_FRAMES = [
    f"new Comparison ({CM}:72:13)", f"{CM}:534:16", f"P._parse ({CM}:409:24)", f"P._parse ({CM}:346:35)",
    f"P._parse ({CM}:444:27)", f"P._parse ({CM}:383:35)", f"P._parse ({CM}:407:27)", f"P._parse ({CM}:346:35)",
    f"P._parse ({CM}:444:27)", f"P._parse ({CM}:433:40)",
]


def serialize_error(error: BaseException) -> dict[str, Any]:
    """XO's `serializeError` of the JavaScript error `error` stands for."""
    name, frames = _javascript_error(error)
    message = str(error)
    stack = "\n".join([f"{name}: {message}", *(f"    at {f}" for f in [*frames, *API_FRAMES][:STACK_LIMIT])])
    return {"message": message, "name": name, "stack": stack}


def _javascript_error(error: BaseException) -> tuple[str, list[str]]:
    """The class of the JavaScript error, and the frames above the API method's wrapper where known."""
    if isinstance(error, MatcherSyntaxError):
        if error.message.startswith("Invalid regular expression"):  # `new RegExp` throws a SyntaxError
            return "SyntaxError", REGEXP_ERROR_FRAMES
        if error.message == "value must be a number":
            return "TypeError", NUMBER_ERROR_FRAMES
        return "Error", PARSE_ERROR_FRAMES
    return ("TypeError" if isinstance(error, TypeError) else "Error"), []
