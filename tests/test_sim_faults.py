"""The simulator's fault knobs (`/_sim/`): each one does what it says, and nothing else."""

from __future__ import annotations

import json
import socket
import time

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.sim_rest_support import ADMIN, basic, call
from tests.support import SimProcess

MiB = 1 << 20


def set_faults(sim: SimProcess, **knobs) -> dict:
    ans = call(sim, "POST", "/_sim/faults", json.dumps(knobs).encode(), {"Content-Type": "application/json"})
    assert ans.status == 200, ans.body
    return ans.json()


def find(sim: SimProcess, coll: str, name: str) -> dict:
    (obj,) = [o for o in call(sim, "GET", f"/rest/v0/{coll}?fields=*").json() if o["name_label"] == name]
    return obj


def export_snapshots(sim: SimProcess, vm_name: str) -> list[dict]:
    return [s for s in call(sim, "GET", "/rest/v0/vm-snapshots?fields=name_label").json()
            if s["name_label"] == f"[XO Export] {vm_name}"]


def wait_until(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_knobs_need_auth_and_take_partial_updates(fresh_sim):
    assert call(fresh_sim, "GET", "/_sim/faults", token=None).status == 401
    assert call(fresh_sim, "GET", "/_sim/faults", token=None, headers={"Authorization": basic(*ADMIN)}).status == 200
    defaults = call(fresh_sim, "GET", "/_sim/faults").json()
    assert defaults == {"latency_ms": 0, "cut_export_after_bytes": None, "end_export_after_bytes": None,
                        "stall_export_after_bytes": None,
                        "export_chunk_bytes": None, "export_bytes_per_second": None, "fail_next_import": 0,
                        "import_bytes_per_second": None,
                        "http_5xx_next": 0, "http_5xx_status": 503, "reset_next_gets": 0, "corrupt_listing": None,
                        "silent_websockets": False}
    assert set_faults(fresh_sim, latency_ms=5)["latency_ms"] == 5
    after = set_faults(fresh_sim, http_5xx_status=502)
    assert (after["latency_ms"], after["http_5xx_status"]) == (5, 502)
    bad = call(fresh_sim, "POST", "/_sim/faults", b'{"latency_ms": -1}', {"Content-Type": "application/json"})
    assert bad.status == 400 and "latency_ms" in bad.json()["error"]
    unknown = call(fresh_sim, "POST", "/_sim/faults", b'{"nope": 1}', {"Content-Type": "application/json"})
    assert unknown.status == 400 and "nope" in unknown.json()["error"]
    assert call(fresh_sim, "GET", "/_sim/faults").json()["latency_ms"] == 5  # a refused update changes nothing
    assert call(fresh_sim, "DELETE", "/_sim/faults").json() == defaults


def test_latency_delays_every_request_but_the_knobs(fresh_sim):
    def took(path: str) -> float:
        start = time.monotonic()
        assert call(fresh_sim, "GET", path).status == 200
        return time.monotonic() - start

    set_faults(fresh_sim, latency_ms=600)
    assert took("/rest/v0/pools") >= 0.6
    assert took("/_sim/faults") < 0.5
    set_faults(fresh_sim, latency_ms=None)
    assert took("/rest/v0/pools") < 0.5


def test_cut_export_drops_the_connection_mid_body(fresh_sim):
    vdi = find(fresh_sim, "vdis", "spare disk")
    set_faults(fresh_sim, cut_export_after_bytes=3 * MiB + 5)
    ans = call(fresh_sim, "GET", f"/rest/v0/vdis/{vdi['id']}.raw")
    assert ans.status == 200 and ans.chunked
    assert not ans.complete and len(ans.body) == 3 * MiB + 5
    vm = find(fresh_sim, "vms", "test-01")  # Paused: exported through a snapshot
    cut = call(fresh_sim, "GET", f"/rest/v0/vms/{vm['id']}.xva")
    assert not cut.complete and len(cut.body) == 3 * MiB + 5
    assert wait_until(lambda: not export_snapshots(fresh_sim, "test-01"))
    assert call(fresh_sim, "GET", "/_sim/stats").json()["exports_cut"] == 2
    set_faults(fresh_sim, cut_export_after_bytes=None)
    whole = call(fresh_sim, "GET", f"/rest/v0/vdis/{vdi['id']}.vhd")
    assert whole.complete and whole.body[-512:-504] == b"conectix"


def test_end_export_ends_the_answer_cleanly_but_short(fresh_sim):
    """As XO does when XAPI's answer, sent without a length, stops early: a complete chunked answer."""
    vdi = find(fresh_sim, "vdis", "spare disk")
    whole = call(fresh_sim, "GET", f"/rest/v0/vdis/{vdi['id']}.vhd")
    set_faults(fresh_sim, end_export_after_bytes=2 * MiB + 7)
    ans = call(fresh_sim, "GET", f"/rest/v0/vdis/{vdi['id']}.vhd")
    assert ans.status == 200 and ans.chunked and ans.complete
    assert ans.body == whole.body[:2 * MiB + 7]
    vm = find(fresh_sim, "vms", "test-01")  # Paused: exported through a snapshot, still removed
    assert call(fresh_sim, "GET", f"/rest/v0/vms/{vm['id']}.xva").complete
    assert wait_until(lambda: not export_snapshots(fresh_sim, "test-01"))
    stats = call(fresh_sim, "GET", "/_sim/stats").json()
    assert (stats["exports_ended_early"], stats["exports_cut"]) == (2, 0)


def chunk_sizes(sim: SimProcess, path: str, limit: int) -> tuple[list[int], bytes]:
    """The sizes of the HTTP chunks of an export's first `limit` body bytes (or more), and those bytes."""
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nCookie: authenticationToken={sim.token}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as sock:
        sock.sendall(request)
        wire = b""
        while b"\r\n\r\n" not in wire:
            wire += sock.recv(1 << 16)
        head, _, wire = wire.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        sizes, body = [], b""
        while len(body) < limit:
            while b"\r\n" not in wire:
                wire += sock.recv(1 << 16)
            line, _, wire = wire.partition(b"\r\n")
            size = int(line, 16)
            while len(wire) < size + 2:
                wire += sock.recv(1 << 16)
            assert wire[size:size + 2] == b"\r\n"
            sizes.append(size)
            body, wire = body + wire[:size], wire[size + 2:]
            if size == 0:
                break
    return sizes, body


def test_export_chunk_bytes_frames_exports_as_small_as_a_real_xo(fresh_sim):
    vdi = find(fresh_sim, "vdis", "spare disk")
    path = f"/rest/v0/vdis/{vdi['id']}.vhd"
    sizes, body = chunk_sizes(fresh_sim, path, 3 * MiB)
    assert max(sizes) == 2 * MiB  # the simulator's own framing: each block's data in one chunk
    set_faults(fresh_sim, export_chunk_bytes=65536)
    small_sizes, small_body = chunk_sizes(fresh_sim, path, 3 * MiB)
    assert max(small_sizes) == 65536 and len(small_sizes) >= 48
    n = min(len(body), len(small_body))
    assert small_body[:n] == body[:n]  # the same bytes, framed differently
    bad = call(fresh_sim, "POST", "/_sim/faults", b'{"export_chunk_bytes": 0}', {"Content-Type": "application/json"})
    assert bad.status == 400 and "export_chunk_bytes" in bad.json()["error"]
    assert set_faults(fresh_sim, export_chunk_bytes=None)["export_chunk_bytes"] is None


def test_export_bytes_per_second_paces_exports_in_small_chunks(fresh_sim):
    vdi = find(fresh_sim, "vdis", "spare disk")
    path = f"/rest/v0/vdis/{vdi['id']}.vhd"
    _, body = chunk_sizes(fresh_sim, path, MiB)
    set_faults(fresh_sim, export_bytes_per_second=2 * MiB)
    began = time.monotonic()
    sizes, paced = chunk_sizes(fresh_sim, path, MiB)
    took = time.monotonic() - began
    assert 0.4 <= took < 3, took  # 1 MiB at 2 MiB/s
    assert max(sizes) <= 2 * MiB // 10 and len(sizes) >= 5  # a tenth of a second's bytes per chunk at most
    assert paced[:MiB] == body[:MiB]
    bad = call(fresh_sim, "POST", "/_sim/faults", b'{"export_bytes_per_second": 0}',
               {"Content-Type": "application/json"})
    assert bad.status == 400 and "export_bytes_per_second" in bad.json()["error"]
    assert set_faults(fresh_sim, export_bytes_per_second=None)["export_bytes_per_second"] is None


def test_stalled_export_sends_nothing_more_until_the_client_leaves(fresh_sim):
    vm = find(fresh_sim, "vms", "test-01")  # Paused: exported through a snapshot
    set_faults(fresh_sim, stall_export_after_bytes=MiB)
    request = (f"GET /rest/v0/vms/{vm['id']}.xva HTTP/1.1\r\nHost: x\r\n"
               f"Cookie: authenticationToken={fresh_sim.token}\r\n\r\n").encode()
    received = b""
    with socket.create_connection(("127.0.0.1", fresh_sim.port), timeout=1.5) as sock:
        sock.sendall(request)
        with pytest.raises(TimeoutError):
            while chunk := sock.recv(1 << 16):
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        size_line, _, data = body.partition(b"\r\n")
        assert int(size_line, 16) == MiB and data == data[:MiB] + b"\r\n"  # one chunk, up to the stall point
        assert len(export_snapshots(fresh_sim, "test-01")) == 1
    assert wait_until(lambda: not export_snapshots(fresh_sim, "test-01"))
    assert call(fresh_sim, "GET", "/_sim/stats").json()["exports_stalled"] == 1


def test_fail_next_import_fails_one_upload_after_creating_its_vdi(fresh_sim):
    sr = find(fresh_sim, "srs", "nfs-vms")
    set_faults(fresh_sim, fail_next_import=True)
    before = {v["id"] for v in call(fresh_sim, "GET", "/rest/v0/vdis?fields=id").json()}
    failed = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=fails&raw=true", bytes(4 * MiB))
    assert failed.status == 500
    assert failed.body == b'{\n  "error": "500 Internal Server Error"\n}'
    assert {v["id"] for v in call(fresh_sim, "GET", "/rest/v0/vdis?fields=id").json()} == before
    assert call(fresh_sim, "GET", "/_sim/faults").json()["fail_next_import"] == 0
    ok = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=works&raw=true", bytes(MiB))
    assert ok.status == 201


def test_http_5xx_next_fails_that_many_requests(fresh_sim):
    set_faults(fresh_sim, http_5xx_next=2, http_5xx_status=502)
    first, second = (call(fresh_sim, "GET", "/rest/v0/pools") for _ in range(2))
    for ans in (first, second):
        assert ans.status == 502 and "http_5xx_next" in ans.json()["error"]
    assert call(fresh_sim, "GET", "/rest/v0/pools").status == 200
    assert call(fresh_sim, "GET", "/_sim/faults").json()["http_5xx_next"] == 0


def test_stats_count_requests_by_route_and_path(fresh_sim):
    assert call(fresh_sim, "POST", "/_sim/stats/reset").status == 204
    vm = find(fresh_sim, "vms", "db-01")
    call(fresh_sim, "GET", f"/rest/v0/vms/{vm['id']}")
    call(fresh_sim, "GET", f"/rest/v0/vms/{vm['id']}")
    call(fresh_sim, "GET", "/rest/v0/nowhere")
    stats = call(fresh_sim, "GET", "/_sim/stats").json()
    assert stats["total"] == 4  # the find() listing included, the /_sim/ calls not
    assert stats["routes"] == {"GET /rest/v0/vms": 1, "GET /rest/v0/vms/{id}": 2, "GET (no route)": 1}
    assert stats["paths"][f"GET /rest/v0/vms/{vm['id']}"] == 2
    call(fresh_sim, "POST", "/_sim/stats/reset")
    assert call(fresh_sim, "GET", "/_sim/stats").json()["total"] == 0


async def test_close_websockets_closes_signed_in_sockets(fresh_sim):
    async with open_websocket_url(fresh_sim.url.replace("http://", "ws://") + "/api/") as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.signIn",
                                          "params": {"token": fresh_sim.token}}))
        assert "result" in json.loads(await ws.get_message())
        ans = await trio.to_thread.run_sync(lambda: call(fresh_sim, "POST", "/_sim/close-websockets"))
        assert ans.status == 204
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            await ws.get_message()


async def test_expire_token_makes_rest_and_sockets_refuse_it(fresh_sim):
    async with open_websocket_url(fresh_sim.url.replace("http://", "ws://") + "/api/") as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.signIn",
                                          "params": {"token": fresh_sim.token}}))
        assert "result" in json.loads(await ws.get_message())
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "token.create", "params": {}}))
        token = json.loads(await ws.get_message())["result"]

    def rest_with(tok: str) -> int:
        return call(fresh_sim, "GET", "/rest/v0/pools", token=tok).status

    assert await trio.to_thread.run_sync(rest_with, token) == 200
    ans = await trio.to_thread.run_sync(lambda: call(fresh_sim, "POST", "/_sim/expire-token",
                                                     json.dumps({"token": token}).encode(),
                                                     {"Content-Type": "application/json"}))
    assert ans.status == 204
    assert await trio.to_thread.run_sync(rest_with, token) == 401
    assert await trio.to_thread.run_sync(rest_with, fresh_sim.token) == 200
    missing = await trio.to_thread.run_sync(lambda: call(fresh_sim, "POST", "/_sim/expire-token", b"{}",
                                                         {"Content-Type": "application/json"}))
    assert missing.status == 400
