"""XO's REST event stream (`GET /rest/v0/events`): the simulator's, as xo-api.md §4 describes it, and a
mount that follows it instead of the JSON-RPC feed (`--events sse`)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator

import httpx
import trio

from tests.operate_support import assert_documented, halted_vm, meta, rename_vm, rest, status_of, wait_for
from tests.support import SimProcess


class Stream:
    """One open event stream, read event by event (`event:` and `data:` lines, then a blank line)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 5) -> tuple[str, dict]:
        event, data = "", []
        with trio.fail_after(timeout):
            async for line in self._lines:
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    data.append(line[len("data: "):])
                elif not line and event:
                    return event, json.loads("\n".join(data))
        raise AssertionError("the stream ended")


async def open_stream(client: httpx.AsyncClient, sim: SimProcess) -> AsyncIterator[Stream]:
    async with client.stream("GET", f"{sim.url}/rest/v0/events",
                             headers={"Cookie": f"authenticationToken={sim.token}"}) as response:
        yield Stream(response)


def subscribe(sim: SimProcess, sub_id: str, collection: str, fields: list[str] | str = "*") -> tuple[int, dict]:
    status, body = rest(sim, "POST", f"/rest/v0/events/{sub_id}/subscriptions",
                        {"collection": collection, "fields": fields})
    return status, json.loads(body) if body else {}


def spare_vdi(sim: SimProcess) -> dict:
    return next(v for v in sim.get_json("/rest/v0/vdis?fields=id,name_label,$VBDs,type") if not v["$VBDs"])


async def test_the_simulator_streams_subscribed_changes_as_xo_does(fresh_sim):
    sim = fresh_sim
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.get(f"{sim.url}/rest/v0/events")
        assert refused.status_code == 401 and refused.json() == {"error": "invalid credentials"}
        async with client.stream("GET", f"{sim.url}/rest/v0/events",
                                 headers={"Cookie": f"authenticationToken={sim.token}"}) as response:
            stream = Stream(response)
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache, no-transform"
            event, init = await stream.next()
            assert event == "init" and uuid.UUID(init["id"])
            sub = init["id"]
            assert subscribe(sim, sub, "VM", ["id", "name_label"]) == (201, {"id": "VM"})
            assert subscribe(sim, sub, "VDI") == (201, {"id": "VDI"})
            # XO's `task` collection is its own tasks (`xoApp.tasks`), not XAPI's `task` objects; the
            # simulator runs none of XO's, so the XAPI tasks the changes below leave are never sent.
            assert subscribe(sim, sub, "task") == (201, {"id": "task"})

            vm = halted_vm(sim)
            rename_vm(sim, vm, "streamed")
            assert await stream.next() == ("update", {"$subscription": "VM", "id": vm, "name_label": "streamed"})
            # A change to a field the subscription does not list is not sent; the VDI's removal is, whole.
            status, body = rest(sim, "PATCH", f"/rest/v0/vms/{vm}", {"nameDescription": "unseen"})
            assert status == 204, body
            vdi = spare_vdi(sim)
            assert rest(sim, "DELETE", f"/rest/v0/vdis/{vdi['id']}")[0] == 204
            event, data = await stream.next()
            assert event == "remove" and data["$subscription"] == "VDI" and data["id"] == vdi["id"]
            assert data["name_label"] == vdi["name_label"] and data["type"] == "VDI"

            # Unsubscribed: VM changes stop.
            status, _ = rest(sim, "DELETE", f"/rest/v0/events/{sub}/subscriptions/VM")
            assert status == 204
            rename_vm(sim, vm, "not streamed")
            other = spare_vdi(sim)
            status, body = rest(sim, "PATCH", f"/rest/v0/vdis/{other['id']}", {"name_label": "streamed-vdi"})
            assert status == 204, body
            event, data = await stream.next()
            assert (event, data["$subscription"], data["name_label"]) == ("update", "VDI", "streamed-vdi")

            status, body = subscribe(sim, "no-such-subscriber", "VM")
            assert status == 404 and body["error"] == "no such event no-such-subscriber"
            status, body = subscribe(sim, sub, "not-a-type")
            assert status == 422 and "body.collection" in body["error"]


async def test_close_websockets_also_ends_event_streams(fresh_sim):
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("GET", f"{fresh_sim.url}/rest/v0/events",
                                 headers={"Cookie": f"authenticationToken={fresh_sim.token}"}) as response:
            stream = Stream(response)
            assert (await stream.next())[0] == "init"
            assert rest(fresh_sim, "POST", "/_sim/close-websockets")[0] == 204
            with trio.fail_after(5):
                remaining = [line async for line in stream._lines]
            assert all(not line.startswith("event:") for line in remaining)


def test_a_mount_follows_the_event_stream(fresh_sim, make_mount):
    mount = make_mount(fresh_sim, "--events", "sse", "--attr-ttl", "300")
    feed = status_of(mount.mountpoint)["feed"]
    assert feed["kind"] == "sse" and feed["connected"]
    vm = halted_vm(fresh_sim)
    assert meta(mount.mountpoint, f"vms/{vm}")["id"] == vm
    rename_vm(fresh_sim, vm, "sse-1")
    wait_for(lambda: meta(mount.mountpoint, f"vms/{vm}")["name_label"] == "sse-1", 10, "the update event")
    vdi = spare_vdi(fresh_sim)
    assert vdi["id"] in os.listdir(mount.mountpoint / "vdis")
    assert rest(fresh_sim, "DELETE", f"/rest/v0/vdis/{vdi['id']}")[0] == 204
    wait_for(lambda: vdi["id"] not in os.listdir(mount.mountpoint / "vdis"), 10, "the remove event")
    # The stream is cut: the mount reconnects, re-reads, and follows again.
    assert rest(fresh_sim, "POST", "/_sim/close-websockets")[0] == 204
    wait_for(lambda: status_of(mount.mountpoint)["feed"]["reconnects"] == 1, 10, "the reconnection")
    for words in ("XO event feed lost", "reconnecting in"):
        assert_documented(next(line for line in mount.log_text().splitlines() if words in line))
    rename_vm(fresh_sim, vm, "sse-2")
    wait_for(lambda: meta(mount.mountpoint, f"vms/{vm}")["name_label"] == "sse-2", 10, "an event after it")
    assert status_of(mount.mountpoint)["feed"]["events"] >= 2
