"""The simulator's JSON-RPC API over a real websocket, compared with what a real xo-server 5.207.2 sends.

Most tests talk to `xofs sim` subprocesses (the shared `sim` for reads, `fresh_sim` for changes); the fault
knobs (closing sockets, expiring a token) are driven on an in-process server whose model the test holds.
Expected frames come from `xo-api.md` §4 and the recordings in `reference/real-xo/events/`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from tests.sim_rest_support import call
from tests.support import DEFAULT_TOKEN, SimProcess
from tests.test_sim_shapes import SHARED, shape_problems
from xofs.sim import jsonrpc_protocol as protocol
from xofs.sim.http_send import send_as_node_does
from xofs.sim.inventory import build_inventory
from xofs.sim.model import SimModel
from xofs.sim.server import hypercorn_config, load_rest_app, make_app

EVENTS = SHARED / "reference/real-xo/events"


class Rpc:
    """A JSON-RPC peer on one websocket: concurrent calls matched by id, notifications collected apart."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = -1  # xo-lib numbers its requests with negative integers
        self.waiting: dict[Any, trio.MemorySendChannel] = {}
        self.raw: dict[Any, str] = {}
        self.arrivals: list[Any] = []
        send, self.notifications = trio.open_memory_channel[str](math.inf)
        self._notify = send
        self.closed = trio.Event()

    async def read_forever(self) -> None:
        try:
            while True:
                text = await self.ws.get_message()
                message = json.loads(text)
                if "id" in message:
                    self.arrivals.append(message["id"])
                    self.raw[message["id"]] = text
                    waiter = self.waiting.pop(message["id"], None)
                    if waiter is not None:
                        waiter.send_nowait(message)
                else:
                    self._notify.send_nowait(text)
        except ConnectionClosed:
            self._notify.close()
            self.closed.set()

    async def request(self, method: str, params: Any = None, *, request_id: Any = None) -> dict[str, Any]:
        """The whole answer frame (parsed) of one call."""
        if request_id is None:
            request_id, self.next_id = self.next_id, self.next_id - 1
        send, receive = trio.open_memory_channel(1)
        self.waiting[request_id] = send
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.ws.send_message(json.dumps(message))
        with trio.fail_after(10):
            return await receive.receive()

    async def call(self, method: str, params: Any = None) -> Any:
        answer = await self.request(method, params)
        assert "result" in answer, answer
        return answer["result"]

    async def next_event(self, timeout: float = 3) -> dict[str, Any]:
        with trio.fail_after(timeout):
            return json.loads(await self.notifications.receive())

    async def events_for(self, seconds: float) -> list[dict[str, Any]]:
        out = []
        with trio.move_on_after(seconds):
            async for text in self.notifications:
                out.append(json.loads(text))
        return out


@asynccontextmanager
async def rpc(url: str, *, token: str | None = None) -> AsyncIterator[Rpc]:
    async with open_websocket_url(url.replace("http://", "ws://") + "/api/") as ws:
        async with trio.open_nursery() as nursery:
            peer = Rpc(ws)
            nursery.start_soon(peer.read_forever)
            if token is not None:
                await peer.call("session.signIn", {"token": token})
            yield peer
            nursery.cancel_scope.cancel()


def error_of(answer: dict[str, Any]) -> dict[str, Any]:
    assert set(answer) == {"error", "id", "jsonrpc"}, answer
    return answer["error"]


async def find_vm(peer: Rpc, name: str) -> dict[str, Any]:
    vms = await peer.call("xo.getAllObjects", {"filter": {"type": "VM", "name_label": name}})
    (vm,) = vms.values()
    return vm


# -- transport and framing --------------------------------------------------------------------------------

async def test_frames_echo_ids_and_use_xo_key_order(sim):
    async with rpc(sim.url) as peer:
        await peer.request("system.getServerVersion", request_id=-7)
        assert peer.raw[-7] == '{"id":-7,"jsonrpc":"2.0","result":"5.207.2"}'
        await peer.request("system.getServerVersion", request_id="abc")
        assert peer.raw["abc"] == '{"id":"abc","jsonrpc":"2.0","result":"5.207.2"}'
        await peer.request("nope.nope", request_id=3)
        assert peer.raw[3] == ('{"error":{"code":-32601,"data":"nope.nope","message":"method not found: nope.nope"},'
                               '"id":3,"jsonrpc":"2.0"}')


# A number id as it is sent, and as Node 20 writes back what `JSON.parse` made of it (`JSON.stringify`).
NUMBER_IDS = [("1.0", "1"), ("1e2", "100"), ("-1E+2", "-100"), ("-0.0", "0"), ("2.5e-3", "0.0025"),
              ("1e-7", "1e-7"), ("1e21", "1e+21"), ("123e-20", "1.23e-18"),
              ("12345678901234567890", "12345678901234567000")]


async def test_number_ids_are_echoed_as_javascript_writes_them(sim):
    async with open_websocket_url(sim.url.replace("http://", "ws://") + "/api/") as ws:
        for sent, echoed in NUMBER_IDS:
            await ws.send_message(f'{{"jsonrpc":"2.0","id":{sent},"method":"system.getServerVersion"}}')
            with trio.fail_after(5):
                assert await ws.get_message() == f'{{"id":{echoed},"jsonrpc":"2.0","result":"5.207.2"}}'
        await ws.send_message('{"jsonrpc":"2.0","id":1.0,"method":"nope.nope"}')
        with trio.fail_after(5):
            assert await ws.get_message() == ('{"error":{"code":-32601,"data":"nope.nope","message":'
                                              '"method not found: nope.nope"},"id":1,"jsonrpc":"2.0"}')


# What json-rpc-protocol 0.13.2's `parse` (src/parse.ts; the version xo-server 5.207.2's yarn.lock pins)
# makes of a frame: the kind of message, or the code and message of the error it throws. json-rpc-peer 0.17.0
# would answer that error with id null, but hands it to an `error` event instead of sending it (`write`).
PARSED = [
    ("{not json", (-32700, "invalid JSON")),
    ("NaN", (-32700, "invalid JSON")),
    ('{"jsonrpc":"1.0","id":1,"method":"m"}', (-32600, "invalid version: string instead of undefined or '2.0'")),
    ('{"jsonrpc":2,"id":1,"method":"m"}', (-32600, "invalid version: number instead of undefined or '2.0'")),
    ('{"jsonrpc":"2.0","id":null,"method":"m"}', (-32600, "invalid identifier: null instead of number or string")),
    ('{"jsonrpc":"2.0","id":{},"method":"m"}', (-32600, "invalid identifier: object instead of number or string")),
    ('{"jsonrpc":"2.0","id":true,"method":"m"}', (-32600, "invalid identifier: boolean instead of number or string")),
    ('{"jsonrpc":"2.0","id":1e400,"method":"m"}', (-32600, "invalid identifier: number instead of number or string")),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":5}',
     (-32600, "invalid params: number instead of undefined, array or object")),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":null}',
     (-32600, "invalid params: null instead of undefined, array or object")),
    ('{"id":1,"method":"m"}', (-32600, "invalid params: undefined instead of array")),  # JSON-RPC 1.0
    ('{"id":1,"method":"m","params":{}}', (-32600, "invalid params: object instead of array")),
    ('{"jsonrpc":"2.0"}', (-32600, "invalid identifier: undefined instead of number or string")),
    ("5", (-32600, "invalid identifier: undefined instead of number or string")),
    ('{"id":3}', (-32600, "invalid error undefined")),  # 1.0: no method and no null error: an error
    ('{"jsonrpc":"2.0","id":3,"error":{"code":1.5,"message":"m"}}',
     (-32600, "invalid error: object instead of {code, message}")),
    ("null", (-32000, "unknown error from the peer")),  # a TypeError, which the library does not name
    ('{"id":1,"method":"m","params":[]}', "request"),  # JSON-RPC 1.0
    ('{"jsonrpc":"2.0","id":"a","method":"m","params":[1]}', "request"),
    ('{"id":null,"method":"m","params":[]}', "notification"),  # 1.0: a null id makes a notification
    ('{"jsonrpc":"2.0","method":"m"}', "notification"),
    ('{"jsonrpc":"2.0","id":10}', "response"),
    ('{"jsonrpc":"2.0","id":1,"method":5}', "response"),  # no string method, no error
    ('{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"m"}}', "error"),
    ('[{"jsonrpc":"2.0","id":1,"method":"m"},{"jsonrpc":"2.0","method":"n"}]', ["request", "notification"]),
    ('[{"jsonrpc":"2.0","id":1,"method":"m"},{"jsonrpc":"2.0","id":null,"method":"n"}]',
     (-32600, "invalid identifier: null instead of number or string")),  # one bad item refuses the batch
]


@pytest.mark.parametrize("frame, parsed", PARSED)
def test_frames_parse_as_json_rpc_protocol_parses_them(frame, parsed):
    def kinds(message: protocol.Parsed) -> Any:
        return [kinds(m) for m in message] if isinstance(message, list) else message.kind

    try:
        assert kinds(protocol.parse(protocol.decode(frame))) == parsed
    except protocol.Rejected as error:
        assert (error.code, error.message) == parsed


async def test_only_requests_are_answered(sim):
    """xo-server answers nothing to a frame the protocol refuses, to a response or an error (it sent no
    request), or to a notification; a JSON-RPC 1.0 request (no "jsonrpc", array params) is answered in 2.0
    form, its array params spread into an object as XO does."""
    async with open_websocket_url(sim.url.replace("http", "ws") + "/api/") as ws:
        for frame, parsed in PARSED:
            if parsed != "request" and not isinstance(parsed, list):
                await ws.send_message(frame)
        await ws.send_message('{"jsonrpc":"2.0","id":3,"error":{"code":1,"message":"m"}}')
        await ws.send_message(json.dumps({"id": 7, "method": "system.getServerVersion", "params": []}))
        with trio.fail_after(5):
            assert await ws.get_message() == '{"id":7,"jsonrpc":"2.0","result":"5.207.2"}'
        await ws.send_message(json.dumps({"id": 8, "method": "system.getServerVersion", "params": ["x"]}))
        with trio.fail_after(5):
            assert await ws.get_message() == '{"id":8,"jsonrpc":"2.0","result":"5.207.2"}'
        await ws.send_message(json.dumps({"id": 9, "method": "xo.getAllObjects", "params": ["x"]}))
        with trio.fail_after(5):
            answer = json.loads(await ws.get_message())
        assert (answer["id"], answer["error"]["code"]) == (9, 2)  # {"0": "x"}: checked after the permission
        with trio.move_on_after(0.5):
            extra = await ws.get_message()
            pytest.fail(f"unexpected frame {extra!r}")


async def test_a_batch_is_answered_with_a_zero_byte_per_answer(sim):
    """json-rpc-peer answers a batch with the array of its answers, and ws 8's `send` makes an array a binary
    frame of one zero byte per item (checked with json-rpc-peer 0.17.0 and ws 8.21.0 under Node 20)."""
    async with open_websocket_url(sim.url.replace("http", "ws") + "/api/") as ws:
        version = {"jsonrpc": "2.0", "method": "system.getServerVersion"}
        await ws.send_message(json.dumps([{**version, "id": 1}, version, {**version, "id": 2}, []]))
        with trio.fail_after(5):
            assert await ws.get_message() == b"\0\0\0"  # two answers and the empty batch's (empty) array
        await ws.send_message("[]")
        with trio.fail_after(5):
            assert await ws.get_message() == b""
        # an answer to no request fails the whole batch, after its requests ran: nothing is sent
        await ws.send_message(json.dumps([{**version, "id": 3}, {"jsonrpc": "2.0", "id": 4, "result": 1}]))
        await ws.send_message(json.dumps({**version, "id": 5}))
        with trio.fail_after(5):
            assert json.loads(await ws.get_message())["id"] == 5
        with trio.move_on_after(0.5):
            extra = await ws.get_message()
            pytest.fail(f"unexpected frame {extra!r}")


async def test_only_the_exact_api_path_is_upgraded(sim):
    for path in ("/api", "/api/?x=1", "/foo"):
        with trio.move_on_after(1) as waited:
            with pytest.raises(HandshakeError):
                async with open_websocket_url(sim.url.replace("http", "ws") + path):
                    pass
        assert waited.cancelled_caught, f"{path}: the server answered instead of leaving the client waiting"


async def test_requests_run_concurrently(fresh_sim):
    async with rpc(fresh_sim.url, token=fresh_sim.token) as peer:
        web = await find_vm(peer, "web-01")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: peer.request("vm.snapshot", {"id": web["id"]}, request_id=100))
            await trio.sleep(0.01)
            nursery.start_soon(lambda: peer.request("system.getServerVersion", request_id=101))
        # the snapshot was sent first but makes XAPI calls: the quick answer overtakes it
        assert peer.arrivals.index(101) < peer.arrivals.index(100)
        assert "result" in json.loads(peer.raw[100])


# -- session, tokens, system -------------------------------------------------------------------------------

async def test_before_sign_in(sim):
    async with rpc(sim.url) as peer:
        assert await peer.call("system.getServerVersion") == "5.207.2"
        assert error_of(await peer.request("session.getUser")) == {"code": -32000,
                                                                   "message": "unknown error from the peer"}
        assert error_of(await peer.request("xo.getAllObjects")) == {
            "message": "not enough permissions", "code": 2, "data": {"object": {}}}
        assert error_of(await peer.request("acl.get")) == {
            "message": "not enough permissions", "code": 2, "data": {"permission": "admin", "object": {}}}
        assert error_of(await peer.request("session.signOut"))["code"] == 2


async def test_sign_in_with_token_and_password(sim):
    async with rpc(sim.url) as peer:
        user = await peer.call("session.signIn", {"token": sim.token})
        assert list(user) == ["id", "email", "groups", "permission", "preferences"]
        assert (user["email"], user["permission"], user["groups"]) == ("admin@admin.net", "admin", [])
        assert await peer.call("session.getUser") == user
        assert await peer.call("session.signOut") is True
        assert error_of(await peer.request("xo.getAllObjects"))["code"] == 2
        assert await peer.call("session.signIn", {"email": "admin@admin.net", "password": "admin"}) == user
        assert await peer.call("session.signInWithToken", {"token": sim.token}) == user


async def test_failed_sign_ins_and_throttling(sim):
    async with rpc(sim.url) as peer:
        assert error_of(await peer.request("session.signIn", {"token": "x" * 43})) == {
            "message": "invalid credentials", "code": 3}
        assert error_of(await peer.request("session.signIn", {"username": "admin@admin.net", "password": "no"})) == {
            "message": "invalid credentials", "code": 3}
        # a retry within 2 s is refused with XO's plain "too fast" error, hidden from a signed-out socket
        assert error_of(await peer.request("session.signIn", {"email": "admin@admin.net", "password": "admin"})) == {
            "code": -32000, "message": "unknown error from the peer"}
        await trio.sleep(2.1)
        assert (await peer.call("session.signIn", {"email": "admin@admin.net", "password": "admin"}))["id"]
        invalid = error_of(await peer.request("session.signInWithToken", {"token": 1}))
        assert invalid["code"] == 10 and invalid["data"]["errors"][0]["message"] == "must be string"


async def test_token_create(sim):
    async with rpc(sim.url, token=sim.token) as peer:
        token = await peer.call("token.create", {"description": "test", "expiresIn": "1 hour"})
        assert isinstance(token, str) and len(token) == 43
        again = await peer.call("token.create", {"client": {"id": "xofs-test"}})
        assert await peer.call("token.create", {"client": {"id": "xofs-test"}}) == again != token
        too_short = error_of(await peer.request("token.create", {"expiresIn": 1000}))
        assert too_short["code"] == -32000 and too_short["message"] == "invalid expiresIn duration: 1000"
        assert too_short["data"]["name"] == "Error"  # an admin sees the real error
        bad = error_of(await peer.request("token.create", {"client": {}}))
        assert bad["code"] == 10 and bad["data"]["errors"] == [{
            "instancePath": "/client", "schemaPath": "#/properties/client/required", "keyword": "required",
            "params": {"missingProperty": "id"}, "message": "must have required property 'id'"}]
    async with rpc(sim.url, token=token) as other:
        assert (await other.call("session.getUser"))["email"] == "admin@admin.net"


async def test_an_admin_gets_xos_serialised_error_without_local_paths(sim):
    """An admin's non-XO error carries `serializeError(error)` (xo-server's `utils.mjs`, `xo-mixins/api.mjs`):
    message, name and a Node stack of XO's own code, here complex-matcher's parse error thrown in
    `xo.getAllObjects` (frames as Node 20 prints them for 5.207.2's sources; 10 frames at most)."""
    async with rpc(sim.url, token=sim.token) as peer:
        answer = await peer.request("xo.getAllObjects", {"filter": "name_label:(", "limit": 1})
        raw = peer.raw[answer["id"]]
        assert raw.startswith('{"error":{"code":-32000,"data":{"message":"parse error: expected end of input at '
                              'position 10","name":"Error","stack":"Error: parse error')
        xo, api = "/opt/xen-orchestra", "file:///opt/xen-orchestra/packages/xo-server/src/xo-mixins/api.mjs"
        assert error_of(answer)["data"]["stack"].split("\n") == [
            "Error: parse error: expected end of input at position 10",
            f"    at get value [as value] ({xo}/packages/complex-matcher/index.js:328:11)",
            f"    at P.parse ({xo}/packages/complex-matcher/index.js:416:40)",
            f"    at Xo.getAllObjects (file://{xo}/packages/xo-server/src/api/xo.mjs:64:17)",
            f"    at Xo.apiWrapper ({api}:269:25)",
            f"    at {api}:426:33",
            "    at AsyncLocalStorage.run (node:async_hooks:346:14)",
            f"    at Task.runInside ({xo}/@vates/task/index.js:204:41)",
            f"    at Task.run ({xo}/@vates/task/index.js:188:31)",
            f"    at run ({api}:426:16)",
            f"    at #callApiMethod ({api}:475:24)",
        ]
        regexp = error_of(await peer.request("xo.getAllObjects", {"filter": "name_label:/(/"}))
        assert regexp["message"] == "Invalid regular expression: /(/: Unterminated group"
        assert regexp["data"]["name"] == "SyntaxError"  # `new RegExp` throws a SyntaxError
        assert regexp["data"]["stack"].startswith("SyntaxError: Invalid regular expression: /(/: Unterminated "
                                                  "group\n    at new RegExp (<anonymous>)\n")
        too_short = error_of(await peer.request("token.create", {"expiresIn": 1000}))
        for data in (error_of(answer)["data"], regexp["data"], too_short["data"]):
            assert list(data) == ["message", "name", "stack"]
            lines = data["stack"].split("\n")
            assert len(lines) <= 11 and all(line.startswith("    at ") for line in lines[1:])
            assert ".py" not in data["stack"] and "/work" not in data["stack"] and "xofs" not in data["stack"]


async def test_system_methods(sim):
    reference = json.loads((SHARED / "reference/xo-jsonrpc-methods.json").read_text())
    async with rpc(sim.url) as peer:
        assert await peer.call("system.listMethods") == list(reference)
        assert await peer.call("system.getMethodsInfo") == reference


# -- objects -----------------------------------------------------------------------------------------------

async def test_get_all_objects(sim):
    inventory = build_inventory(1, 12)
    async with rpc(sim.url, token=sim.token) as peer:
        objects = await peer.call("xo.getAllObjects")
        objects = {k: v for k, v in objects.items() if v["type"] != "task"}
        assert objects == inventory
        assert shape_problems(objects) == []
        vdis = await peer.call("xo.getAllObjects", {"filter": {"type": "VDI"}})
        assert set(vdis) == {k for k, v in inventory.items() if v["type"] == "VDI"}
        tagged = await peer.call("xo.getAllObjects", {"filter": {"type": "VM", "tags": ["web"]}})
        assert [v["name_label"] for v in tagged.values()] == ["web-01"]
        assert len(await peer.call("xo.getAllObjects", {"filter": {"type": "VM"}, "limit": 3})) == 3
        # complex-matcher strings match substrings: `type:VM` also takes the VM-controllers (dom0s)
        running = await peer.call("xo.getAllObjects", {"filter": "type:VM power_state:Running"})
        assert {v["type"] for v in running.values()} == {"VM", "VM-controller"}
        running = await peer.call("xo.getAllObjects", {"filter": "type:/^VM$/ power_state:running"})
        assert running == {k: v for k, v in inventory.items() if v["type"] == "VM" and v["power_state"] == "Running"}
        bad = error_of(await peer.request("xo.getAllObjects", {"limit": "3"}))
        assert bad == {"message": "invalid parameters", "code": 10, "data": {"errors": [{
            "instancePath": "/limit", "schemaPath": "#/properties/limit/type", "keyword": "type",
            "params": {"type": "number"}, "message": "must be number"}]}}


async def test_get_all_objects_ndjson(sim):
    async with rpc(sim.url, token=sim.token) as peer:
        result = await peer.call("xo.getAllObjects", {"ndjson": True, "filter": {"type": "SR"}})
    assert list(result) == ["$getFrom"] and result["$getFrom"].startswith("/api/")
    with urllib.request.urlopen(sim.url + result["$getFrom"]) as answer:  # one-shot, no auth
        lines = answer.read().decode().splitlines()
        assert answer.headers["Content-Type"].startswith("application/json")
    assert [json.loads(line)["type"] for line in lines] == ["SR"] * 4
    again = call(sim, "GET", result["$getFrom"], token=None)  # no redirect followed
    assert again.status == 302 and again.header("Location") == "/signin"  # taken: XO's sign-in gate answers


async def test_parameter_and_lookup_errors(sim):
    async with rpc(sim.url, token=sim.token) as peer:
        missing = error_of(await peer.request("vm.start", {}))
        assert missing == {"message": "invalid parameters", "code": 10, "data": {"errors": [{
            "instancePath": "", "schemaPath": "#/required", "keyword": "required",
            "params": {"missingProperty": "id"}, "message": "must have required property 'id'"}]}}
        extra = error_of(await peer.request("vm.start", {"id": "x", "bogus": 1}))["data"]["errors"]
        assert extra == [{"instancePath": "", "schemaPath": "#/additionalProperties",
                          "keyword": "additionalProperties", "params": {"additionalProperty": "bogus"},
                          "message": "must NOT have additional properties"}]
        empty = error_of(await peer.request("vm.set", {"id": "x", "name_label": ""}))["data"]["errors"]
        assert empty[0]["keyword"] == "minLength" and empty[0]["message"] == "must NOT have fewer than 1 characters"
        assert error_of(await peer.request("vm.start", {"id": "nope"})) == {
            "message": "no such VM nope", "code": 1, "data": {"id": "nope", "type": "VM"}}
        assert error_of(await peer.request("vm.delete", {"id": "nope"})) == {
            "message": "no such VM,VM-snapshot,VM-template nope", "code": 1,
            "data": {"id": "nope", "type": ["VM", "VM-snapshot", "VM-template"]}}
        web = await find_vm(peer, "web-01")
        assert error_of(await peer.request("vm.start", {"vm": web["id"]}))["code"] == 13  # `vm` as the id
        assert error_of(await peer.request("vm.pause", {"id": web["id"]})) == {"message": "not implemented", "code": 0}


# -- operations and their events ---------------------------------------------------------------------------

def recorded_frames(name: str) -> list[dict[str, Any]]:
    return [json.loads(json.loads(line)["raw"]) for line in (EVENTS / f"{name}.frames.jsonl").read_text().splitlines()]


async def test_rename_sends_one_enter_like_the_recording(fresh_sim):
    (recorded,) = recorded_frames("vm-rename-mod")
    (recorded_vm,) = recorded["params"]["items"].values()
    async with rpc(fresh_sim.url, token=fresh_sim.token) as peer, rpc(fresh_sim.url) as anonymous:
        web = await find_vm(peer, "web-01")
        assert await peer.call("vm.set", {"id": web["id"], "name_label": "web-01-renamed"}) is True
        frame = await peer.next_event()
        assert list(frame) == list(recorded) and frame["method"] == "all"
        assert list(frame["params"]) == ["type", "items"] and frame["params"]["type"] == "enter"
        assert list(frame["params"]["items"]) == [web["id"]]
        renamed = frame["params"]["items"][web["id"]]
        assert renamed["name_label"] == "web-01-renamed"
        assert list(renamed) == list(recorded_vm)  # same keys in the same order as a real XO's
        assert {k: v for k, v in renamed.items() if k != "name_label"} == {
            k: v for k, v in web.items() if k != "name_label"}
        assert await peer.events_for(0.3) == []
        assert await anonymous.events_for(0.3) == []  # never signed in: nothing


async def test_vdi_delete_enters_the_sr_then_exits_the_vdi(fresh_sim):
    recorded = recorded_frames("vdi-delete-del")
    assert [f["params"]["type"] for f in recorded] == ["enter", "exit"]
    async with rpc(fresh_sim.url, token=fresh_sim.token) as peer:
        spare = next(iter((await peer.call("xo.getAllObjects", {"filter": {"name_label": "spare disk"}})).values()))
        assert await peer.call("vdi.delete", {"id": spare["id"]}) is True
        enter, exit_ = await peer.next_event(), await peer.next_event()
        assert (enter["params"]["type"], exit_["params"]["type"]) == ("enter", "exit")
        entered = enter["params"]["items"]
        assert {o["type"] for o in entered.values()} <= {"SR", "task"}
        sr = entered[spare["$SR"]]
        assert spare["id"] not in sr["VDIs"]
        assert exit_["params"]["items"] == {spare["id"]: 0}
        assert error_of(await peer.request("vdi.delete", {"id": spare["id"]}))["code"] == 1


async def test_snapshot_and_delete_events(fresh_sim):
    async with rpc(fresh_sim.url, token=fresh_sim.token) as peer:
        web = await find_vm(peer, "web-01")
        snap_id = await peer.call("vm.snapshot", {"id": web["id"], "name": "s1"})
        entered = (await peer.next_event())["params"]["items"]
        types = sorted(o["type"] for o in entered.values())
        # no network, as in the recorded export's snapshot (exports/vm-xva.running.web-01.with-ws.ws-frames.jsonl)
        assert types == sorted(["task", "VDI", "VDI", "SR", "VDI-snapshot", "VDI-snapshot", "VBD", "VBD", "VBD",
                                "VIF", "VM-snapshot", "VM"])
        assert entered[snap_id]["name_label"] == "s1" and snap_id in entered[web["id"]]["snapshots"]
        task = next(o for o in entered.values() if o["type"] == "task")
        assert (task["name_label"], task["status"]) == ("Async.VM.snapshot", "success")
        assert (await peer.next_event())["params"] == {"type": "exit", "items": {task["id"]: 0}}
        assert await peer.call("vm.delete", {"id": snap_id}) is True
        frames = [await peer.next_event(), await peer.next_event()]
        assert [f["params"]["type"] for f in frames] == ["enter", "exit"]
        gone = frames[1]["params"]["items"]
        assert snap_id in gone and len(gone) == 7  # the snapshot, 3 VBDs, 1 VIF, 2 VDI-snapshots
        assert snap_id not in frames[0]["params"]["items"][web["id"]]["snapshots"]


async def test_power_operations(fresh_sim):
    async with rpc(fresh_sim.url, token=fresh_sim.token) as peer:
        web = await find_vm(peer, "web-01")
        assert error_of(await peer.request("vm.start", {"id": web["id"]})) == {
            "message": "VM state is running but should be halted", "code": 13,
            "data": {"objectId": web["id"], "expected": "halted", "actual": "running"}}
        assert await peer.call("vm.stop", {"id": web["id"]}) is True
        halted = await find_vm(peer, "web-01")
        assert halted["power_state"] == "Halted" and "mainIpAddress" not in halted
        assert await peer.call("vm.start", {"id": web["id"]}) is True
        assert (await find_vm(peer, "web-01"))["power_state"] == "Running"
        assert await peer.call("vm.stop", {"id": web["id"], "force": True}) is True
        assert await peer.call("vm.set", {"id": web["id"], "blockedOperations": {"destroy": True}}) is True
        blocked = error_of(await peer.request("vm.delete", {"id": web["id"]}))
        assert blocked["code"] == 5 and blocked["message"].startswith("forbidden operation: destroy is blocked")
        assert await peer.call("vm.delete", {"id": web["id"], "forceBlockedOperation": True}) is True
        assert error_of(await peer.request("vm.start", {"id": web["id"]}))["code"] == 1
        db = await find_vm(peer, "db-01")
        (vdi_id,) = await peer.call("xo.getAllObjects", {"filter": {"type": "VDI", "name_label": "db-01 root"}})
        assert await peer.call("vdi.set", {"id": vdi_id, "name_label": "db root", "size": "16G"}) is True
        changed = (await peer.call("xo.getAllObjects", {"filter": {"id": vdi_id}}))[vdi_id]
        assert (changed["name_label"], changed["size"]) == ("db root", 16 << 30)
        assert db["power_state"] == "Halted"


async def test_state_dir_keeps_changes_across_restarts(fresh_sim):
    async with rpc(fresh_sim.url, token=fresh_sim.token) as peer:
        web = await find_vm(peer, "web-01")
        await peer.call("vm.set", {"id": web["id"], "name_label": "kept"})
        token = await peer.call("token.create", {"description": "kept too"})
        before = await peer.call("xo.getAllObjects", {"filter": {"type": "VM"}})
    fresh_sim.stop()
    assert fresh_sim.proc.returncode == 0  # SIGTERM stops it cleanly
    fresh_sim.start()
    async with rpc(fresh_sim.url, token=token) as peer:
        assert await peer.call("xo.getAllObjects", {"filter": {"type": "VM"}}) == before


def test_a_state_dir_of_another_seed_is_refused(tmp_path):
    state = str(tmp_path / "state")
    SimModel(seed=7, vms=12, state_dir=tmp_path / "state").close()
    run = subprocess.run([sys.executable, "-m", "xofs", "sim", "--port", "0", "--seed", "8", "--state-dir", state],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--seed 7 --vms 12" in run.stderr and run.stdout == ""


def test_the_token_can_come_from_the_environment_where_ps_does_not_show_it(tmp_path):
    """scripts/demo passes its token so: as an argument every user of the machine could read it."""
    env = {**os.environ, "XOFS_TOKEN": "env-token-0123456789abcdefghijklmnopqrstuvwxyz"}
    with open(tmp_path / "sim.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "xofs", "sim", "--port", "0", "--vms", "2"], env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        for token, status in ((env["XOFS_TOKEN"], 200), ("another-token", 401)):
            request = urllib.request.Request(f"{url}/rest/v0/vms", headers={"Cookie": f"authenticationToken={token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    assert (answer.status, token) == (status, token)
            except urllib.error.HTTPError as err:
                assert (err.code, token) == (status, token)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = (tmp_path / "sim.log").read_text()
    assert "demo token" not in log and "accepting the token in $XOFS_TOKEN" in log  # none generated: it had one


# -- fault knobs, on an in-process server ------------------------------------------------------------------

@asynccontextmanager
async def in_process_sim(model: SimModel) -> AsyncIterator[str]:
    config = hypercorn_config("127.0.0.1:0")
    send_as_node_does()  # as `xofs sim` serves
    async with trio.open_nursery() as nursery:
        await nursery.start(model.run)
        app = make_app(model, load_rest_app(model))
        binds = await nursery.start(lambda task_status: hypercorn_serve(app, config, task_status=task_status))
        yield binds[0]
        nursery.cancel_scope.cancel()


async def test_an_expired_token_closes_the_socket_on_its_next_message():
    model = SimModel(seed=1, vms=4, tokens=[DEFAULT_TOKEN])
    async with in_process_sim(model) as url:
        token = model.create_token(model.user)
        async with rpc(url, token=token) as peer, rpc(url, token=DEFAULT_TOKEN) as other:
            assert await peer.call("system.getServerVersion") == "5.207.2"
            model.expire_token(token)
            await peer.ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "system.getServerVersion"}))
            with trio.fail_after(3):
                await peer.closed.wait()
            assert 1 not in peer.raw  # closed without an answer
            assert peer.ws.closed.code == 1005  # and without a status code, as xo-server closes it
            assert await other.call("system.getServerVersion") == "5.207.2"


async def test_close_all_sockets():
    model = SimModel(seed=1, vms=4, tokens=[DEFAULT_TOKEN])
    async with in_process_sim(model) as url:
        async with rpc(url, token=DEFAULT_TOKEN) as a, rpc(url) as b:
            model.close_all_sockets()
            for peer in (a, b):
                with trio.fail_after(3):
                    await peer.closed.wait()


async def test_churn_sends_vm_updates_to_signed_in_sockets(tmp_path):
    churning = SimProcess(args=["--seed", "2", "--churn", "40"], log_path=tmp_path / "sim.log").start()
    try:
        async with rpc(churning.url, token=churning.token) as peer, rpc(churning.url) as anonymous:
            frames = await peer.events_for(1.0)
            assert len(frames) >= 10
            items = [o for f in frames for o in f["params"]["items"].values()]
            assert {f["params"]["type"] for f in frames} == {"enter"}
            assert {(o["type"], o["power_state"]) for o in items} == {("VM", "Running")}
            assert await anonymous.events_for(0.2) == []
    finally:
        churning.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_cleanly(tmp_path, signum):
    proc = SimProcess(args=["--seed", "2"], log_path=tmp_path / "sim.log").start()
    proc.proc.send_signal(signum)
    assert proc.proc.wait(10) == 0
    proc.stop()


class _RawSocket:
    """A websocket client of a few lines that offers permessage-deflate and shows each frame's first byte."""

    def __init__(self, sim: SimProcess, offer: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", sim.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /api/ HTTP/1.1\r\nHost: xo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Sec-WebSocket-Extensions: {offer}\r\n\r\n").encode())
        self.stream = self.sock.makefile("rb")
        assert self.stream.readline().startswith(b"HTTP/1.1 101 ")
        headers = []
        while (line := self.stream.readline()) not in (b"\r\n", b""):
            headers.append(line.decode().lower())
        assert any(h.startswith("sec-websocket-extensions: permessage-deflate") for h in headers), headers

    def call(self, request_id: int, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        """The first byte of the answer's frame (FIN, RSV1, opcode) and its payload, as sent."""
        payload = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        size = (bytes([0x80 | len(payload)]) if len(payload) < 126
                else bytes([0x80 | 126]) + struct.pack("!H", len(payload)))
        self.sock.sendall(bytes([0x81]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        first, second = self.stream.read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self.stream.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self.stream.read(8))[0]
        return first, self.stream.read(length)


def test_compression_follows_xo_s_threshold_where_ws_applies_it(tmp_path):
    """xo-server's config.toml: `perMessageDeflate = {threshold = 524288}`, which its ws (^8.2.3) applies only
    without server context takeover: only messages of 512 KiB or more are then compressed (wsproto alone
    compressed all); with context takeover, as a browser offers it, every message is."""
    sim = SimProcess(args=["--seed", "4", "--vms", "300"], log_path=tmp_path / "sim.log").start()
    try:
        ws = _RawSocket(sim, "permessage-deflate; server_no_context_takeover; client_max_window_bits")
        first, payload = ws.call(1, "session.signIn", {"token": sim.token})
        assert first == 0x81 and json.loads(payload)["id"] == 1  # FIN, text, RSV1 clear: as it is
        first, payload = ws.call(2, "xo.getAllObjects", {})
        assert first == 0xC1, hex(first)  # FIN, RSV1 (compressed), text
        text = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
        assert len(text) >= 512 * 1024 and json.loads(text)["id"] == 2
        ws.sock.close()
        ws = _RawSocket(sim, "permessage-deflate; client_max_window_bits")
        first, payload = ws.call(1, "session.signIn", {"token": sim.token})
        assert first == 0xC1, hex(first)
        assert json.loads(zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff"))["id"] == 1
        ws.sock.close()
    finally:
        sim.stop()
