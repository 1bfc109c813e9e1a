"""The simulator's exports, checked with real tools: curl, qemu-img, xva-img, zstd; and the snapshot an export
of a running VM makes, seen over REST and in the event stream."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from urllib.parse import quote

import h11
import pytest
import trio
import xxhash
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol
from trio_websocket import open_websocket_url

from tests.sim_rest_support import REFERENCE, call, recorded, recorded_header, recorded_names, watch_events
from tests.support import SimProcess, require_tool
from xofs.sim import http_send
from xofs.sim.model import SimModel

MiB = 1 << 20


def find(sim: SimProcess, coll: str, name: str) -> dict:
    expression = quote(f"name_label:{json.dumps(name)}")
    (obj,) = [o for o in call(sim, "GET", f"/rest/v0/{coll}?fields=*&filter={expression}").json()
              if o["name_label"] == name]
    return obj


def curl(sim: SimProcess, path: str, out: Path, *extra: str) -> dict[str, str]:
    """Download with curl; returns its `-w` figures (http_code, size_download, speed_download)."""
    result = subprocess.run(
        [require_tool("curl"), "-sS", "-b", f"authenticationToken={sim.token}", "-o", str(out), *extra,
         "-w", "%{http_code} %{size_download} %{speed_download}", sim.url + path],
        capture_output=True, text=True, timeout=120, check=True)
    code, size, speed = result.stdout.split()
    return {"http_code": code, "size_download": size, "speed_download": speed}


def digest_file(path: Path) -> str:
    """A fast content hash (XXH3-128): these files are gigabytes, and this machine has two cores."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def model_disk_digest(seed: int, vdi_id: str) -> str:
    """The content the simulator's model gives a VDI, computed in this process from the same seed."""
    digest = xxhash.xxh3_128()
    for chunk in SimModel(seed=seed).disk(vdi_id).iter_raw():
        digest.update(chunk)
    return digest.hexdigest()


def snapshots_named(sim: SimProcess, name: str) -> list[dict]:
    return [s for s in call(sim, "GET", "/rest/v0/vm-snapshots?fields=id,name_label").json()
            if s["name_label"] == name]


def wait_until(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def assert_download_headers(ans, obj_id: str, fmt: str, recording: str) -> None:
    meta, _ = recorded(recording)
    assert ans.status == 200
    assert ans.names() == recorded_names(meta)
    assert ans.header("content-disposition") == f"attachment; filename={obj_id}.{fmt}"
    for name in ("content-type", "Vary", "Transfer-Encoding", "Connection", "Keep-Alive"):
        assert ans.header(name) == recorded_header(meta, name), name
    assert ans.header("Content-Length") is None and ans.header("Accept-Ranges") is None


# -- VDI exports -------------------------------------------------------------------------------------------


def test_raw_export_is_the_models_disk_content(sim, tmp_path):
    vdi = find(sim, "vdis", "test-01 root")
    ans = call(sim, "GET", f"/rest/v0/vdis/{vdi['id']}.raw", read_body=False)
    assert_download_headers(ans, vdi["id"], "raw", "exports/vdi-raw.test-01-root")
    figures = curl(sim, f"/rest/v0/vdis/{vdi['id']}.raw", tmp_path / "disk.raw", "-H", "Range: bytes=0-511")
    assert figures["http_code"] == "200" and int(figures["size_download"]) == vdi["size"]  # Range is ignored
    assert digest_file(tmp_path / "disk.raw") == model_disk_digest(1, vdi["id"])


def test_vhd_export_converts_back_to_the_raw_content(sim, tmp_path):
    qemu_img = require_tool("qemu-img")
    vdi = find(sim, "vdis", "test-01 root")
    ans = call(sim, "GET", f"/rest/v0/vdis/{vdi['id']}.vhd")
    assert_download_headers(ans, vdi["id"], "vhd", "exports/vdi-vhd.test-01-root")
    assert ans.body[:8] == b"conectix" and ans.body[-512:-504] == b"conectix"
    (tmp_path / "disk.vhd").write_bytes(ans.body)
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(tmp_path / "disk.vhd"),
                    str(tmp_path / "from-vhd.raw")], check=True, timeout=60)
    assert (tmp_path / "from-vhd.raw").stat().st_size == vdi["size"]
    assert digest_file(tmp_path / "from-vhd.raw") == model_disk_digest(1, vdi["id"])  # = the .raw export
    assert call(sim, "GET", f"/rest/v0/vdis/{vdi['id']}.vhd").body == ans.body  # the same bytes every time


def test_vdi_snapshot_exports_and_types_are_kept_apart(sim):
    snap = call(sim, "GET", "/rest/v0/vdi-snapshots?fields=id").json()[0]["id"]
    ans = call(sim, "GET", f"/rest/v0/vdi-snapshots/{snap}.vhd")
    assert_download_headers(ans, snap, "vhd", "exports/vdi-snapshot-vhd")
    wrong = call(sim, "GET", f"/rest/v0/vdis/{snap}.vhd")
    assert wrong.status == 404 and wrong.json()["error"] == f"no such VDI {snap}"


def test_bad_vdi_formats_are_422_after_the_id_is_known(sim):
    vdi = find(sim, "vdis", "test-01 root")
    qcow2 = call(sim, "GET", f"/rest/v0/vdis/{vdi['id']}.qcow2")
    _, body = recorded("exports/vdi-qcow2.422")
    assert (qcow2.status, qcow2.body) == (422, body)
    upper = call(sim, "GET", f"/rest/v0/vdis/{vdi['id']}.VHD")
    assert upper.status == 422 and upper.json()["error"]["format"]["value"] == "VHD"
    missing = "00000000-0000-0000-0000-000000000000"
    unknown = call(sim, "GET", f"/rest/v0/vdis/{missing}.qcow2")
    assert unknown.status == 404 and unknown.json() == {"error": f"no such VDI {missing}",
                                                        "data": {"id": missing, "type": "VDI"}}


def test_a_vhd_export_sends_each_block_s_data_in_one_chunk(sim):
    """Big chunks (a real XO sends its socket reads, the `export_chunk_bytes` knob does that), each block's
    data as read from the disk: a bitmap of 512 bytes before it, the metadata before the first."""
    vdi = find(sim, "vdis", "spare disk")
    request = (f"GET /rest/v0/vdis/{vdi['id']}.vhd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               f"Cookie: authenticationToken={sim.token}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=30) as sock:
        sock.sendall(request)
        stream = sock.makefile("rb")
        while stream.readline() not in (b"\r\n", b""):
            pass
        sizes = []
        while (size := int(stream.readline().split(b";")[0], 16)) > 0:
            stream.read(size)
            assert stream.read(2) == b"\r\n"
            sizes.append(size)
    blocks = [size for size in sizes if size >= MiB]
    assert len(blocks) > 2 and set(blocks) == {2 * MiB}, sizes
    assert all(size < 64 * 1024 or size == 2 * MiB for size in sizes), sizes
    assert len(sizes) == 2 * len(blocks) + 1, sizes


@pytest.mark.timeout(60)
def test_raw_export_reaches_a_gigabyte_per_second_with_curl(sim, tmp_path):
    vdi = find(sim, "vdis", "spare disk")
    speeds = []
    for _ in range(3):
        figures = curl(sim, f"/rest/v0/vdis/{vdi['id']}.raw", Path("/dev/null"))
        assert int(figures["size_download"]) == vdi["size"]
        speeds.append(float(figures["speed_download"]))
    assert max(speeds) >= 1e9, speeds


def test_gzip_accepted_means_a_gzipped_export(sim):
    vdi = find(sim, "vdis", "spare disk")
    plain = call(sim, "GET", f"/rest/v0/vdis/{vdi['id']}.vhd")
    zipped = call(sim, "GET", f"/rest/v0/vdis/{vdi['id']}.vhd", headers={"Accept-Encoding": "gzip"})
    assert zipped.header("Content-Encoding") == "gzip" and zipped.header("Vary") == "Accept-Encoding"
    assert gzip.decompress(zipped.body) == plain.body


def test_head_runs_the_export_and_sends_headers_only(sim):
    vdi = find(sim, "vdis", "test-01 root")
    ans = call(sim, "HEAD", f"/rest/v0/vdis/{vdi['id']}.vhd")
    meta, _ = recorded("exports/vdi-vhd.HEAD")
    assert ans.status == 200 and ans.body == b""
    assert ans.names() == recorded_names(meta)  # no framing header, as Node answers a HEAD
    vm = find(sim, "vms", "test-01")
    head = call(sim, "HEAD", f"/rest/v0/vms/{vm['id']}.xva")
    assert head.status == 200 and head.body == b""
    assert wait_until(lambda: not snapshots_named(sim, "[XO Export] test-01"))


# -- VM exports -----------------------------------------------------------------------------------------------


def xva_members(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.timeout(60)
def test_xva_of_a_paused_vm_is_a_snapshot_xva_img_can_read(sim, tmp_path):
    xva_img = require_tool("xva-img")
    vm = find(sim, "vms", "test-01")
    assert vm["power_state"] == "Paused"
    ans = call(sim, "GET", f"/rest/v0/vms/{vm['id']}.xva")
    assert_download_headers(ans, vm["id"], "xva", "exports/vm-xva.paused.test-01")
    members = xva_members(ans.body)
    assert list(members)[0] == "ova.xml"
    assert b"[XO Export] test-01" in members["ova.xml"]
    (tmp_path / "x").mkdir()
    with tarfile.open(fileobj=io.BytesIO(ans.body)) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (disk_dir,) = [p for p in (tmp_path / "x").iterdir() if p.is_dir()]
    subprocess.run([xva_img, "disk-export", str(disk_dir), str(tmp_path / "xva.raw")], check=True, timeout=60,
                   capture_output=True)
    root = find(sim, "vdis", "test-01 root")
    assert digest_file(tmp_path / "xva.raw") == model_disk_digest(1, root["id"])
    assert wait_until(lambda: not snapshots_named(sim, "[XO Export] test-01"))


@pytest.mark.timeout(90)
def test_xva_compression_values(sim, tmp_path):
    zstd = require_tool("zstd")
    vm = find(sim, "vms", "db-01")  # Halted: no snapshot, so every export has the same bytes
    path = f"/rest/v0/vms/{vm['id']}.xva"
    plain = call(sim, "GET", path)
    assert plain.status == 200 and plain.body[257:262] == b"ustar"
    assert call(sim, "GET", path + "?compress=false", limit=4 * MiB).body == plain.body[:4 * MiB]
    zstd_body = call(sim, "GET", path + "?compress=zstd")
    assert_download_headers(zstd_body, vm["id"], "xva", "exports/vm-xva.halted.db-01.compress-zstd")
    (tmp_path / "vm.xva.zst").write_bytes(zstd_body.body)
    subprocess.run([zstd, "-q", "-d", str(tmp_path / "vm.xva.zst"), "-o", str(tmp_path / "vm.xva")], check=True,
                   timeout=60)
    assert (tmp_path / "vm.xva").read_bytes() == plain.body
    gzipped = call(sim, "GET", path + "?compress=gzip").body
    assert gzipped[:2] == b"\x1f\x8b" and gzip.decompress(gzipped) == plain.body
    assert call(sim, "GET", path + "?compress=true", limit=4 * MiB).body == gzipped[:4 * MiB]
    bogus = call(sim, "GET", path + "?compress=bogus")
    _, body = recorded("exports/vm-xva.halted.db-01.compress-bogus")
    assert (bogus.status, bogus.body) == (422, body)


def test_bad_vm_formats(sim):
    vm = find(sim, "vms", "db-01")
    foo = call(sim, "GET", f"/rest/v0/vms/{vm['id']}.foo")
    _, body = recorded("exports/vm-ova.bad-format-foo")
    assert (foo.status, foo.body) == (422, body)
    ova = call(sim, "GET", f"/rest/v0/vms/{vm['id']}.ova")
    assert (ova.status, ova.json()) == (501, {"error": "not implemented"})
    missing = "00000000-0000-0000-0000-000000000000"
    assert call(sim, "GET", f"/rest/v0/vms/{missing}.foo").status == 404


def test_snapshot_exports_and_templates(sim):
    snap = call(sim, "GET", "/rest/v0/vm-snapshots?fields=id").json()[0]["id"]
    ans = call(sim, "GET", f"/rest/v0/vm-snapshots/{snap}.xva")
    assert_download_headers(ans, snap, "xva", "exports/vm-snapshot-xva")
    assert call(sim, "GET", f"/rest/v0/vms/{snap}.xva").status == 404


def test_cancelled_export_still_removes_its_snapshot(sim):
    vm = find(sim, "vms", "backup-01")
    assert vm["power_state"] == "Running"
    request = (f"GET /rest/v0/vms/{vm['id']}.xva HTTP/1.1\r\nHost: x\r\n"
               f"Cookie: authenticationToken={sim.token}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=30) as sock:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert len(snapshots_named(sim, "[XO Export] backup-01")) == 1
    assert wait_until(lambda: not snapshots_named(sim, "[XO Export] backup-01"))


async def test_watchers_see_the_export_snapshot_come_and_go(sim):
    vm = await trio.to_thread.run_sync(find, sim, "vms", "web-01")
    disks = await trio.to_thread.run_sync(lambda: call(sim, "GET", f"/rest/v0/vms/{vm['id']}/vdis?fields=id").json())
    async with watch_events(sim) as watcher:
        ans = await trio.to_thread.run_sync(lambda: call(sim, "GET", f"/rest/v0/vms/{vm['id']}.xva"))
        assert ans.status == 200 and ans.complete
    snapshots = watcher.entered(lambda o: o["type"] == "VM-snapshot" and o["name_label"] == "[XO Export] web-01")
    assert snapshots, watcher.frames
    assert snapshots[0]["id"] in watcher.exited()
    sources = {d["id"] for d in disks}
    vdi_snapshots = watcher.entered(lambda o: o["type"] == "VDI-snapshot" and o.get("$snapshot_of") in sources)
    assert vdi_snapshots and {v["id"] for v in vdi_snapshots} <= watcher.exited()
    tasks = watcher.entered(lambda o: o["type"] == "task" and o["name_label"] == "[XO] VM export")
    assert {t["status"] for t in tasks} >= {"pending", "success"}


def frame_sequence(frames: list[tuple[float, dict]]) -> list[tuple[str, list[str]]]:
    """(kind, item types in order) of each `all` frame, objects that exit named by the type they entered
    with. Task exits are left out: a finished task lingers for a while, so where its exit falls depends on
    how long the export took."""
    types: dict[str, str] = {}
    out = []
    for _, params in frames:
        items = []
        for obj_id, obj in params["items"].items():
            if obj != 0:
                types[obj_id] = obj["type"]
                items.append(obj["type"])
            elif types[obj_id] != "task":
                items.append(types[obj_id])
        if items:
            out.append((params["type"], items))
    return out


async def export_frames(sim: SimProcess, vm_name: str) -> list[tuple[float, dict]]:
    """(seconds since the request, params) of each `all` frame a signed-in socket gets while the VM is
    exported, and for a second after."""
    vm = await trio.to_thread.run_sync(find, sim, "vms", vm_name)
    frames: list[tuple[float, dict]] = []
    async with open_websocket_url(sim.url.replace("http://", "ws://") + "/api/") as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.signIn",
                                          "params": {"token": sim.token}}))
        assert "result" in json.loads(await ws.get_message())
        start = time.monotonic()

        async def read() -> None:
            while True:
                message = json.loads(await ws.get_message())
                frames.append((time.monotonic() - start, message["params"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            ans = await trio.to_thread.run_sync(lambda: call(sim, "GET", f"/rest/v0/vms/{vm['id']}.xva"))
            assert ans.status == 200 and ans.complete
            await trio.sleep(1)  # the disks leave 200 ms after the snapshot, their tasks 200 ms later
            nursery.cancel_scope.cancel()
    return frames


async def test_export_events_follow_the_recorded_sequence(fresh_sim):
    """`exports/vm-xva.running.web-01.with-ws.ws-frames.jsonl`: the pending `[XO] VM export` task enters
    alone; ~220 ms later the snapshot's objects enter with `Async.VM.snapshot` (no network); at the end the
    VM-snapshot and its devices exit while its VDI-snapshots enter again without VBDs; ~200 ms later they
    exit and their source disks and SR enter with two `Async.VDI.destroy` tasks."""
    recording = [json.loads(line) for line in
                 (REFERENCE / "exports/vm-xva.running.web-01.with-ws.ws-frames.jsonl").read_text().splitlines()]
    real = [(r["t_rel_s"], json.loads(r["raw"])["params"]) for r in recording]
    ours = await export_frames(fresh_sim, "web-01")
    assert frame_sequence(ours) == frame_sequence(real) == [
        ("enter", ["task"]),
        ("enter", ["task", "VDI-snapshot", "VBD", "VDI-snapshot", "VBD", "VBD", "VIF", "VM-snapshot", "VDI", "SR",
                   "VDI", "VM"]),
        ("enter", ["task", "task", "VDI-snapshot", "VDI-snapshot", "VM"]),
        ("exit", ["VM-snapshot", "VBD", "VBD", "VBD", "VIF"]),
        ("enter", ["task", "task", "SR", "VDI", "VDI"]),
        ("exit", ["VDI-snapshot", "VDI-snapshot"]),
    ]
    enters = [(t, p["items"]) for t, p in ours if p["type"] == "enter"]
    (export_task,) = enters[0][1].values()
    assert (export_task["name_label"], export_task["status"]) == ("[XO] VM export", "pending")
    snapshot_task = next(iter(enters[1][1].values()))
    assert (snapshot_task["name_label"], snapshot_task["status"]) == ("Async.VM.snapshot", "success")
    assert enters[1][0] - enters[0][0] >= 0.15  # XO waited for XAPI's snapshot
    gone = [o for o in enters[2][1].values() if o["type"] == "VDI-snapshot"]
    assert [o["$VBDs"] for o in gone] == [[], []]
    assert enters[3][0] - enters[2][0] >= 0.15
    assert {o["name_label"] for o in enters[3][1].values() if o["type"] == "task"} == {"Async.VDI.destroy"}


async def test_a_short_exports_snapshot_task_leaves_with_the_snapshot(fresh_sim):
    """The recorded export (1 MiB, streamed in 17 ms) ended before XO's next `event.from`: the exit of the
    `Async.VM.snapshot` task came in the batch where the VM-snapshot and its devices left, with the export
    and `Async.VM.destroy` tasks entering finished."""
    recording = [json.loads(line) for line in
                 (REFERENCE / "exports/vm-xva.running.web-01.with-ws.ws-frames.jsonl").read_text().splitlines()]
    real = [(r["t_rel_s"], json.loads(r["raw"])["params"]) for r in recording]
    knob = json.dumps({"end_export_after_bytes": 1054720}).encode()  # the recorded body's size
    assert call(fresh_sim, "POST", "/_sim/faults", knob, {"Content-Type": "application/json"}).status == 200
    ours = await export_frames(fresh_sim, "web-01")
    for frames in (real, ours):
        label = {}  # id -> a task's name, any other object's type
        for _, params in frames:
            for obj_id, obj in params["items"].items():
                if obj != 0:
                    label[obj_id] = obj["name_label"] if obj["type"] == "task" else obj["type"]
        batches = [(params["type"], [label[i] for i in params["items"]]) for _, params in frames]
        at = batches.index(("exit", ["Async.VM.snapshot", "VM-snapshot", "VBD", "VBD", "VBD", "VIF"]))
        kind, entered = batches[at - 1]  # the enter of the same batch
        assert (kind, sorted(entered)) == ("enter", ["Async.VM.destroy", "VDI-snapshot", "VDI-snapshot", "VM",
                                                     "[XO] VM export"])


class _Protocol:
    """What `http_send._send_h11_event` uses of hypercorn's H11Protocol: its h11 connection and its send."""

    def __init__(self) -> None:
        self.connection = h11.Connection(h11.SERVER)
        self.connection.receive_data(b"GET /rest/v0/vdis/x.raw HTTP/1.1\r\nHost: xo\r\n\r\n")
        assert isinstance(self.connection.next_event(), h11.Request)
        self.connection.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
        self.sent: list[bytes] = []

    async def send(self, event: RawData) -> None:
        self.sent.append(event.data)


async def test_a_large_body_chunk_goes_to_the_socket_as_it_is_and_a_small_one_in_one_piece():
    """The simulator's copy of each 4 MiB chunk into its framing cost `cp` from a mount a fifth of its speed
    (xofs.sim.http_send). The bytes sent are h11's, whichever way."""
    http_send.send_as_node_does()
    assert H11Protocol._send_h11_event is http_send._send_h11_event
    protocol = _Protocol()
    chunk = os.urandom(4 << 20)
    await http_send._send_h11_event(protocol, h11.Data(data=chunk))
    assert any(piece is chunk for piece in protocol.sent)  # the very object: not copied
    assert b"".join(protocol.sent) == b"400000\r\n" + chunk + b"\r\n"
    protocol.sent.clear()
    await http_send._send_h11_event(protocol, h11.Data(data=b'{"id":1}'))
    assert protocol.sent == [b'8\r\n{"id":1}\r\n']
    protocol.sent.clear()
    await http_send._send_h11_event(protocol, h11.EndOfMessage())
    assert protocol.sent == [b"0\r\n\r\n"]
