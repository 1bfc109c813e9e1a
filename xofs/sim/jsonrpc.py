"""XO's JSON-RPC 2.0 API over a websocket at `/api/`, as xo-server 5.207.2 serves it.

One JSON-RPC message per frame, parsed and answered as json-rpc-peer does it for XO (`jsonrpc_protocol`): only
requests get an answer, and a message the protocol refuses gets none. Requests run concurrently and their
answers may come back out of order.
A call goes through XO's pipeline (`xo-mixins/api.mjs`), in XO's order: unknown method (-32601), permission
(code 2 before sign-in), parameter validation against the method's XO schema (code 10 with ajv-style errors),
object lookup (code 1), then the method. A method that returns nothing answers `true`. Errors that are not XO
errors reach an admin as -32000 with the real message and a serialised error, anyone else as -32000
"unknown error from the peer".

Signed-in sockets receive the model's events as `all` notifications; nothing is sent before sign-in and there
is no initial snapshot. A token-authenticated socket whose token has expired is closed, without an answer, on
its next message.

Methods with behaviour: `session.*`, `token.create`, `system.*`, `xo.getAllObjects`, `vm.set/start/stop/
delete/snapshot`, `vdi.set/delete`. Every other method of the reference list is known (listed, permission- and
parameter-checked) and answers notImplemented (code 0).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any

import trio

from xofs.sim import jsonrpc_protocol as protocol
from xofs.sim.jsonrpc_errors import serialize_error
from xofs.sim.model import SimError, SimModel, iter_ndjson
from xofs.sim.rest_json import js_number

log = logging.getLogger(__name__)

Params = dict[str, Any]


def load_methods_info() -> dict[str, dict[str, Any]]:
    """`system.getMethodsInfo` of a real xo-server 5.207.2: {name: {description?, params, permission?}}."""
    return json.loads(resources.files("xofs.sim").joinpath("data/xo-jsonrpc-methods.json").read_text())


def dumps(message: dict[str, Any]) -> str:
    """Compact JSON like JavaScript's `JSON.stringify`."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def response(request_id: Any, result: Any) -> str:
    return f'{{"id":{echo_id(request_id)},"jsonrpc":"2.0","result":{dumps(result)}}}'


def error_response(request_id: Any, error: dict[str, Any]) -> str:
    return f'{{"error":{dumps(error)},"id":{echo_id(request_id)},"jsonrpc":"2.0"}}'


def echo_id(request_id: Any) -> str:
    """A request's id as XO writes it back: a number is the double JavaScript parsed, printed as JavaScript
    prints it (`1.0` and `1e2` come back as `1` and `100`)."""
    if isinstance(request_id, str):
        return dumps(request_id)
    return js_number(float(request_id))


def rpc_error(code: int, message: str, data: Any = None) -> dict[str, Any]:
    """A json-rpc-protocol `JsonRpcError` (key order code, data, message; data absent when undefined)."""
    out: dict[str, Any] = {"code": code}
    if data is not None:
        out["data"] = data
    out["message"] = message
    return out


# -- parameter validation: XO's schema dialect compiled to JSON Schema and checked like ajv (allErrors) ---------

def xo_to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """XO's schema dialect (`_xoJsonSchema.mjs`) as standard JSON Schema: properties required unless
    `optional`, no additional properties unless none are declared (or `*` gives their schema), strings
    non-empty unless `minLength`/`format`/`pattern` says otherwise."""
    schema = dict(schema)
    if "enum" in schema:
        return schema
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if "array" in types and isinstance(schema.get("items"), dict):
        schema["items"] = xo_to_json_schema(schema["items"])
    if "object" in types:
        properties = {k: dict(v) for k, v in (schema.get("properties") or {}).items()}
        if "additionalProperties" not in schema:
            wildcard = properties.pop("*", None)
            schema["additionalProperties"] = (xo_to_json_schema(wildcard) if wildcard is not None
                                              else not properties)
        elif isinstance(schema["additionalProperties"], dict):
            schema["additionalProperties"] = xo_to_json_schema(schema["additionalProperties"])
        if "required" not in schema:
            required = [k for k, v in properties.items() if not v.get("optional")]
            if required:
                schema["required"] = required
        schema["properties"] = {k: xo_to_json_schema({kk: vv for kk, vv in v.items() if kk != "optional"})
                                for k, v in properties.items()}
    if "string" in types and not {"minLength", "format", "pattern"} & schema.keys():
        schema["minLength"] = 1
    return schema


def _type_ok(value: Any, type_: str) -> bool:
    if type_ == "null":
        return value is None
    if type_ == "boolean":
        return isinstance(value, bool)
    if type_ == "integer":
        return isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
    if type_ == "number":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if type_ == "string":
        return isinstance(value, str)
    if type_ == "array":
        return isinstance(value, list)
    if type_ == "object":
        return isinstance(value, dict)
    return True


def validate(schema: dict[str, Any], value: Any, path: str = "", spath: str = "#") -> list[dict[str, Any]]:
    """ajv 8 (`allErrors`, `useDefaults`) errors of `value` against a JSON schema: `{instancePath,
    schemaPath, keyword, params, message}`. Defaults are filled into `value` in place, as ajv does."""
    errors: list[dict[str, Any]] = []

    def err(keyword: str, params: dict[str, Any], message: str, ipath: str = path,
            where: str = "") -> None:
        errors.append({"instancePath": ipath, "schemaPath": f"{spath}/{where or keyword}", "keyword": keyword,
                       "params": params, "message": message})

    if "enum" in schema:
        if value not in schema["enum"]:
            err("enum", {"allowedValues": schema["enum"]}, "must be equal to one of the allowed values")
        return errors
    type_ = schema.get("type")
    if type_ is not None:
        types = [type_] if isinstance(type_, str) else type_
        if not any(_type_ok(value, t) for t in types):
            shown = type_ if isinstance(type_, str) else ",".join(type_)
            err("type", {"type": type_}, f"must be {shown}")
            return errors
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            err("maxLength", {"limit": schema["maxLength"]},
                f"must NOT have more than {schema['maxLength']} characters")
        if "minLength" in schema and len(value) < schema["minLength"]:
            err("minLength", {"limit": schema["minLength"]},
                f"must NOT have fewer than {schema['minLength']} characters")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += validate(schema["items"], item, f"{path}/{i}", f"{spath}/items")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = sub["default"]
        for key in schema.get("required", []):
            if key not in value:
                err("required", {"missingProperty": key}, f"must have required property '{key}'")
        extra = schema.get("additionalProperties", True)
        for key in value:
            if key in properties:
                continue
            if extra is False:
                err("additionalProperties", {"additionalProperty": key}, "must NOT have additional properties")
            elif isinstance(extra, dict):
                errors += validate(extra, value[key], f"{path}/{key}", f"{spath}/additionalProperties")
        for key, sub in properties.items():
            if key in value:
                errors += validate(sub, value[key], f"{path}/{key}", f"{spath}/properties/{key}")
    return errors


# -- the methods ------------------------------------------------------------------------------------------

class Connection:
    """One websocket's JSON-RPC session: who signed in, and the calls it makes."""

    def __init__(self, model: SimModel, methods_info: dict[str, dict[str, Any]]) -> None:
        self.model = model
        self.methods_info = methods_info
        self.user: dict[str, Any] | None = None
        self.token: str | None = None  # the token it signed in with: its expiry closes the socket
        self.handlers: dict[str, Callable[[Params], Awaitable[Any]]] = {
            "session.signIn": self.sign_in, "session.signInWithToken": self.sign_in,
            "session.signInWithPassword": self.sign_in, "session.signOut": self.sign_out,
            "session.getUser": self.get_user, "token.create": self.create_token,
            "system.getServerVersion": self.get_server_version, "system.listMethods": self.list_methods,
            "system.getMethodsInfo": self.get_methods_info, "xo.getAllObjects": self.get_all_objects,
            "vm.set": self.vm_set, "vm.start": self.vm_start, "vm.stop": self.vm_stop,
            "vm.delete": self.vm_delete, "vm.snapshot": self.vm_snapshot,
            "vdi.set": self.vdi_set, "vdi.delete": self.vdi_delete,
        }

    @property
    def expired(self) -> bool:
        return self.token is not None and self.model.token_record(self.token) is None

    async def call(self, name: str, params: Any) -> Any:
        """Run a method through XO's checks; raises SimError (or another exception) on failure."""
        info = self.methods_info.get(name)
        if info is None:
            raise MethodNotFound(name)
        permission = info.get("permission", "<user>")
        if permission is not None:
            if self.user is None:
                raise SimError.unauthorized(None if permission == "<user>" else permission)
            if permission == "admin" and self.user["permission"] != "admin":
                raise SimError.unauthorized(permission)
        if params is protocol.MISSING:
            params = {}
        elif isinstance(params, list):  # XO spreads the params into an object: `{ _log, ...params }`
            params = {str(i): value for i, value in enumerate(params)}
        spec = info.get("params", {})
        if isinstance(params, dict) and "id" not in params and "id" in spec:
            # XO accepts the namespace as the id parameter: `vm.start {vm: …}`.
            namespace = name.split(".", 1)[0]
            if namespace not in spec and isinstance(params.get(namespace), str):
                params["id"] = params.pop(namespace)
        errors = validate(xo_to_json_schema({"type": "object", "properties": spec}), params)
        if errors:
            raise SimError.invalid_parameters(errors)
        handler = self.handlers.get(name)
        if handler is None:
            raise SimError.not_implemented()
        result = await handler(params)
        return True if result is None else result

    async def xapi(self) -> None:
        """The time a XAPI call takes (a fault knob may raise it)."""
        await trio.sleep(self.model.xapi_latency)

    # session, token, system

    async def sign_in(self, params: Params) -> dict[str, Any]:
        user, token = self.model.authenticate(params)
        self.user, self.token = user, token
        return public_user(user)

    async def sign_out(self, params: Params) -> None:
        self.user = self.token = None

    async def get_user(self, params: Params) -> dict[str, Any]:
        if self.user is None:
            # XO dereferences the missing user: a TypeError, which non-admins see as "unknown error".
            raise TypeError("Cannot read properties of undefined (reading 'id')")
        return public_user(self.user)

    async def create_token(self, params: Params) -> str:
        assert self.user is not None
        return self.model.create_token(self.user, description=params.get("description"),
                                       client_id=(params.get("client") or {}).get("id"),
                                       expires_in=params.get("expiresIn"))

    async def get_server_version(self, params: Params) -> str:
        return self.model.version

    async def list_methods(self, params: Params) -> list[str]:
        return list(self.methods_info)

    async def get_methods_info(self, params: Params) -> dict[str, Any]:
        return self.methods_info

    # objects

    async def get_all_objects(self, params: Params) -> Any:
        predicate = make_filter(params.get("filter"))
        limit = params.get("limit")
        if params.get("ndjson"):
            # XO evaluates the filter when the download is fetched, not now.
            path = self.model.register_download(
                lambda: iter_ndjson(select(self.model.all_objects(), predicate, limit)))
            return {"$getFrom": path}
        return {o["id"]: o for o in select(self.model.all_objects(), predicate, limit)}

    # VMs and VDIs: each pays a XAPI round trip before acting

    async def vm_set(self, params: Params) -> None:
        vm_id = params.pop("id")
        self.model.get_typed(vm_id, ("VM", "VM-snapshot", "VM-template"))
        await self.xapi()
        self.model.vm_set(vm_id, **params)

    async def vm_start(self, params: Params) -> None:
        self.model.get_typed(params["id"], "VM")
        await self.xapi()
        self.model.vm_start(params["id"])

    async def vm_stop(self, params: Params) -> None:
        self.model.get_typed(params["id"], "VM")
        await self.xapi()
        self.model.vm_stop(params["id"], force=bool(params.get("force")))

    async def vm_delete(self, params: Params) -> None:
        self.model.get_typed(params["id"], ("VM", "VM-snapshot", "VM-template"))
        await self.xapi()
        force = bool(params.get("force"))
        self.model.vm_delete(params["id"], force=force, delete_disks=params.get("deleteDisks", True),
                             bypass_blocked=params.get("forceBlockedOperation", force),
                             force_default_template=params.get("forceDeleteDefaultTemplate", force))

    async def vm_snapshot(self, params: Params) -> str:
        self.model.get_typed(params["id"], "VM")
        await self.xapi()
        await self.xapi()  # a snapshot is slower than a single call
        return self.model.vm_snapshot(params["id"], params.get("name"), description=params.get("description"))

    async def vdi_set(self, params: Params) -> None:
        self.model.get_typed(params["id"], ("VDI", "VDI-snapshot"))
        await self.xapi()
        if "cbt" in params:
            self.model.update(params["id"], {"cbt_enabled": params["cbt"]})
        self.model.vdi_set(params["id"], name_label=params.get("name_label"),
                           name_description=params.get("name_description"), size=params.get("size"))

    async def vdi_delete(self, params: Params) -> None:
        self.model.get_typed(params["id"], ("VDI", "VDI-snapshot"))
        await self.xapi()
        self.model.vdi_delete(params["id"])


class MethodNotFound(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"method not found: {name}")
        self.name = name


def public_user(user: dict[str, Any]) -> dict[str, Any]:
    """XO's `getUserPublicProperties`."""
    keys = ("authProviders", "id", "email", "groups", "permission", "preferences")
    return {k: user[k] for k in keys if k in user}


def is_match(obj: Any, source: Any) -> bool:
    """lodash `isMatch`: partial deep equality (objects: a subset of keys; arrays: every source item found)."""
    if isinstance(source, dict):
        return isinstance(obj, dict) and all(k in obj and is_match(obj[k], v) for k, v in source.items())
    if isinstance(source, list):
        return isinstance(obj, list) and all(any(is_match(o, s) for o in obj) for s in source)
    return obj == source and type(obj) is type(source) or (
        isinstance(obj, int | float) and isinstance(source, int | float)
        and not isinstance(obj, bool) and not isinstance(source, bool) and obj == source)


def make_filter(spec: Any) -> Callable[[dict[str, Any]], bool] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        from xofs.matcher import compile_filter

        return compile_filter(spec)
    return lambda obj: is_match(obj, spec)


def select(objects: dict[str, dict[str, Any]], predicate: Callable[[dict[str, Any]], bool] | None,
           limit: float | None) -> Iterator[dict[str, Any]]:
    """XO's `getObjects`: filter, then stop after `limit` matches (a fractional limit rounds up, as in XO)."""
    remaining = math.inf if limit is None else limit
    for obj in list(objects.values()):
        if predicate is None or predicate(obj):
            if remaining <= 0:
                return
            remaining -= 1
            yield obj


# -- the websocket ------------------------------------------------------------------------------------------

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def serve(model: SimModel, methods_info: dict[str, dict[str, Any]], receive: Receive, send: Send) -> None:
    """Serve one ASGI websocket (already known to be `/api/`) until it closes."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    conn = Connection(model, methods_info)
    outgoing, to_send = trio.open_memory_channel[str | bytes](math.inf)
    events = model.subscribe()
    closed = False

    async def write() -> None:
        try:
            async for frame in to_send:
                if model.socket_faults.silent:  # fault knob: the socket stays open and says nothing
                    continue
                await send({"type": "websocket.send", "bytes" if isinstance(frame, bytes) else "text": frame})
        except Exception:  # noqa: BLE001 - the peer went away while we wrote: the socket is over
            log.debug("websocket send failed", exc_info=True)
            nursery.cancel_scope.cancel()

    async def forward_events() -> None:
        async with events:
            async for kind, items in events:
                if conn.user is not None:  # XO notifies signed-in connections only
                    outgoing.send_nowait(dumps({"jsonrpc": "2.0", "method": "all",
                                                "params": {"type": kind, "items": items}}))
        nursery.cancel_scope.cancel()  # the model dropped us (too far behind): close

    async def handle(text: str) -> None:
        answer = await answer_message(conn, text)
        if answer is not None:
            outgoing.send_nowait(answer)

    try:
        async with trio.open_nursery() as nursery:
            unregister = model.register_socket(nursery.cancel_scope.cancel)
            unregister_writer = model.socket_faults.register(outgoing.send_nowait)
            nursery.start_soon(write)
            nursery.start_soon(forward_events)
            try:
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        closed = True
                        break
                    if conn.expired:
                        log.info("closing a socket whose token expired")
                        break
                    text = message.get("text")
                    if text is None:
                        text = (message.get("bytes") or b"").decode("utf-8", "replace")
                    nursery.start_soon(handle, text)
            finally:
                unregister()
                unregister_writer()
                nursery.cancel_scope.cancel()
    finally:
        events.close()
        if not closed:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    # xo-server closes a socket whose token expired with no status code (1005 at the client)
                    await send({"type": "websocket.close", "code": 1005 if conn.expired else 1000})
                except Exception:  # noqa: BLE001 - the peer may already be gone
                    pass


async def answer_message(conn: Connection, text: str) -> str | bytes | None:
    """The frame answering one incoming frame: text for a request, binary for a batch, None when XO sends
    nothing (see `jsonrpc_protocol`)."""
    try:
        return await execute(conn, protocol.parse(protocol.decode(text)))
    except protocol.Rejected as error:
        log.info("no answer to a message json-rpc-protocol refuses: %s %s", error.code, error.message)
    except Unanswerable as error:
        log.info("no answer to a JSON-RPC %s", error)
    return None


class Unanswerable(Exception):
    """A message that makes json-rpc-peer's `exec` fail after parsing: XO answers nothing."""


async def execute(conn: Connection, message: protocol.Parsed) -> str | bytes | None:
    """json-rpc-peer's `exec`: the answer to a request, a batch's zero bytes, or None."""
    if isinstance(message, list):
        return await execute_batch(conn, message)
    if message.kind == "request":
        return await answer_request(conn, message)
    if message.kind == "response" or (message.kind == "error" and message.id is not None):
        # the peer looks up the request this answers: the server sent none, and the lookup throws
        raise Unanswerable(f"{message.kind} with id {message.id!r}, which answers no request of the server")
    return None  # a notification (xo-server runs only requests), or an error with id null (dropped)


async def execute_batch(conn: Connection, messages: list[protocol.Parsed]) -> bytes:
    """Every item runs (concurrently); if one fails there is no answer, else ws turns the array of answers
    into a binary frame of one zero byte per answer (`Buffer.from` of an array of strings)."""
    answers: list[object] = []
    failures: list[Unanswerable] = []

    async def run(message: protocol.Parsed) -> None:
        try:
            answer = await execute(conn, message)
        except Unanswerable as error:
            failures.append(error)
        else:
            if answer is not None:
                answers.append(answer)

    async with trio.open_nursery() as nursery:
        for message in messages:
            nursery.start_soon(run, message)
    if failures:
        raise failures[0]
    return bytes(len(answers))


async def answer_request(conn: Connection, message: protocol.Message) -> str:
    request_id = message.id
    try:
        result = await conn.call(message.method, message.params)
    except MethodNotFound as error:
        return error_response(request_id, rpc_error(-32601, str(error), error.name))
    except SimError as error:
        return error_response(request_id, error.to_json())
    except Exception as error:  # noqa: BLE001 - any other failure is XO's "unknown error"
        log.debug("JSON-RPC %s failed", message.method, exc_info=True)
        return error_response(request_id, unknown_error(conn, error))
    return response(request_id, result)


def unknown_error(conn: Connection, error: Exception) -> dict[str, Any]:
    """A non-XO error: detailed for an admin, hidden from anyone else (`api.mjs`)."""
    if conn.user is not None and conn.user.get("permission") == "admin":
        return rpc_error(-32000, str(error), serialize_error(error))
    return rpc_error(-32000, "unknown error from the peer")
