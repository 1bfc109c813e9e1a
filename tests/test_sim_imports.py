"""The simulator's imports (`POST /rest/v0/srs/<id>/vdis`, `PUT /rest/v0/vdis/<id>.<fmt>`) against the
recorded answers of a real xo-server: what is created when, what every failure says, and that what goes in
comes back out byte for byte."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import trio

from tests.sim_rest_support import REFERENCE, call, recorded, recorded_header, recorded_names, watch_events
from tests.support import SimProcess, require_tool, set_faults

MiB = 1 << 20


def sr_named(sim: SimProcess, name: str) -> dict:
    (sr,) = [s for s in call(sim, "GET", "/rest/v0/srs?fields=*").json() if s["name_label"] == name]
    return sr


def vdi_ids(sim: SimProcess) -> set[str]:
    return {v["id"] for v in call(sim, "GET", "/rest/v0/vdis?fields=id").json()}


def vdi_named(sim: SimProcess, name: str) -> list[dict]:
    expression = quote(f"name_label:{json.dumps(name)}")
    found = call(sim, "GET", f"/rest/v0/vdis?fields=*&filter={expression}").json()
    return [v for v in found if v["name_label"] == name]


def pattern(size: int, seed: int = 1) -> bytes:
    """Data with zero stretches (so sparse handling matters) and non-repeating content."""
    out = bytearray(size)
    block = os.urandom(64 * 1024)
    for offset in range(0, size, 256 * 1024):
        out[offset:offset + len(block)] = block[: size - offset]
    out[:16] = seed.to_bytes(16, "big")
    return bytes(out)


def qemu_vhd(tmp_path: Path, raw: bytes, subformat: str) -> bytes:
    """`qemu-img convert -O vpc -o subformat=...` of raw bytes."""
    qemu_img = require_tool("qemu-img")
    src, dst = tmp_path / f"src-{subformat}.raw", tmp_path / f"disk-{subformat}.vhd"
    src.write_bytes(raw)
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat}", str(src), str(dst)],
                   check=True, timeout=60)
    return dst.read_bytes()


def vhd_virtual_size(vhd: bytes) -> int:
    return int.from_bytes(vhd[48:56], "big")  # the footer copy's current size


def assert_created(ans, recording: str) -> str:
    meta, _ = recorded(recording)
    assert ans.status == 201, ans.body
    assert ans.names() == recorded_names(meta)
    for header in ("Content-Type", "Vary", "Connection", "Keep-Alive"):
        assert ans.header(header) == recorded_header(meta, header)
    new_id = ans.json()["id"]
    assert ans.body == f'{{\n  "id": "{new_id}"\n}}'.encode() and len(ans.body) == 50
    assert ans.header("Location") == f"/rest/v0/vdis/{new_id}"
    return new_id


def imported(sim: SimProcess, vdi_id: str) -> dict:
    """The VDI once its import is over: XO answers while its objects still show the import's marks, which
    go with the task 0.2 s later (`import-raw-4MiB.ws-frames.jsonl`)."""
    vdi = call(sim, "GET", f"/rest/v0/vdis/{vdi_id}").json()
    assert set(vdi["other_config"]) == {"xo:import:task", "xo:import:length"}
    deadline = time.monotonic() + 2
    while vdi["other_config"] and time.monotonic() < deadline:
        time.sleep(0.05)
        vdi = call(sim, "GET", f"/rest/v0/vdis/{vdi_id}").json()
    return vdi


def assert_500(ans, message: str) -> None:
    assert ans.status == 500
    assert ans.body == json.dumps({"error": message}, indent=2).encode()


# -- success ---------------------------------------------------------------------------------------------


def test_raw_import_creates_a_vdi_that_exports_back_identical(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    data = pattern(4 * MiB)
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=x&raw=true", data,
               {"Content-Type": "application/octet-stream"})
    new_id = assert_created(ans, "imports/import-raw-4MiB")
    vdi = imported(fresh_sim, new_id)
    _, after = recorded("imports/imported-vdi.after.raw-4MiB")
    expected = json.loads(after)
    assert list(vdi) == list(expected)
    for key in ("type", "name_label", "name_description", "size", "usage", "VDI_type", "other_config",
                "$VBDs", "chainPhysicalUsage", "$SR"):
        assert vdi[key] == (sr["id"] if key == "$SR" else expected[key]), key
    exported = call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}.raw")
    assert exported.body == data
    assert new_id in call(fresh_sim, "GET", f"/rest/v0/srs/{sr['id']}").json()["VDIs"]


def import_batches(frames: list[dict]) -> list[list[tuple]]:
    """Each `all` frame as what an importer's watcher sees: (kind, type, marks or task status) per item."""
    kinds = {}
    out = []
    for params in frames:
        items = []
        for obj_id, obj in params["items"].items():
            if obj == 0:
                items.append(("exit", kinds.get(obj_id)))
                continue
            kinds[obj_id] = obj["type"]
            detail = (obj["status"] if obj["type"] == "task"
                      else sorted(obj["other_config"]) if obj["type"] == "VDI" else None)
            items.append(("enter", obj["type"], detail))
        out.append(items)
    return out


async def test_an_import_leaves_its_marks_until_after_the_answer(fresh_sim):
    """`import-raw-4MiB.ws-frames.jsonl`: XAPI's task succeeds while the VDI still has its `xo:import:*`
    marks, XO answers, and the marks go with the task in a later batch: a client that looks at XO's
    objects just after the answer sees a marked VDI whose task has succeeded."""
    recording = [json.loads(line) for line in
                 (REFERENCE / "imports/import-raw-4MiB.ws-frames.jsonl").read_text().splitlines()]
    sr = sr_named(fresh_sim, "nfs-vms")
    async with watch_events(fresh_sim) as watcher:
        ans = await trio.to_thread.run_sync(lambda: call(
            fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=x&raw=true", pattern(4 * MiB),
            {"Content-Type": "application/octet-stream"}))
        answered = len(watcher.frames)
        new_id = assert_created(ans, "imports/import-raw-4MiB")
        assert await trio.to_thread.run_sync(imported, fresh_sim, new_id)
    ours = import_batches(watcher.frames)
    marks = ["xo:import:length", "xo:import:task"]
    assert import_batches([json.loads(r["raw"])["params"] for r in recording]) == [
        [("enter", "VDI", []), ("enter", "SR", None)],
        [("enter", "task", "pending"), ("enter", "VDI", ["xo:import:length"])],
        [("enter", "VDI", marks), ("enter", "task", "success")],
        [("enter", "VDI", [])],
        [("exit", "task")],
    ]
    # The recorded upload took less than XO's event period, so the task's mark came with the success; here
    # it comes first on its own, as in a real XO's longer upload.
    assert ours == [
        [("enter", "VDI", []), ("enter", "SR", None)],
        [("enter", "task", "pending"), ("enter", "VDI", ["xo:import:length"])],
        [("enter", "VDI", marks)],
        [("enter", "VDI", marks), ("enter", "task", "success")],
        [("enter", "VDI", [])],
        [("exit", "task")],
    ]
    assert list(watcher.frames[2]["items"][new_id]["other_config"]) == marks  # in the order XO set them
    assert answered <= 4  # the answer came before the marks went


async def test_a_failed_import_shows_the_failure_then_the_clean_up(fresh_sim):
    """`import-raw-xapi-500.ws-frames.jsonl`: XAPI's upload fails, watchers see the task's failure; in XO's
    next batch the task leaves with the VDI while `Async.VDI.destroy` and the SR enter; the destroy task
    leaves a batch later."""
    recording = [json.loads(line) for line in
                 (REFERENCE / "imports/import-raw-xapi-500.ws-frames.jsonl").read_text().splitlines()]
    real = import_batches([json.loads(r["raw"])["params"] for r in recording])
    sr = sr_named(fresh_sim, "nfs-vms")
    set_faults(fresh_sim, fail_next_import=True)
    async with watch_events(fresh_sim) as watcher:
        ans = await trio.to_thread.run_sync(lambda: call(
            fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=fails&raw=true", pattern(4 * MiB)))
        assert ans.status == 500
        await trio.sleep(0.5)  # the destroy task leaves 0.2 s after it came
    ours = import_batches(watcher.frames)
    marks = ["xo:import:length", "xo:import:task"]
    clean_up = [
        [("enter", "task", "success"), ("enter", "SR", None)],
        [("exit", "task"), ("exit", "VDI")],
        [("exit", "task")],
    ]
    assert real == [
        [("enter", "VDI", []), ("enter", "SR", None)],
        [("enter", "task", "pending"), ("enter", "VDI", ["xo:import:length"])],
        [("enter", "VDI", marks), ("enter", "task", "failure")],
        *clean_up,
    ]
    # The task's mark and its failure come apart here: the recorded upload took less than XO's event period.
    assert ours == [
        [("enter", "VDI", []), ("enter", "SR", None)],
        [("enter", "task", "pending"), ("enter", "VDI", ["xo:import:length"])],
        [("enter", "VDI", marks)],
        [("enter", "task", "failure")],
        *clean_up,
    ]


def test_dynamic_vhd_import_exports_back_identical(fresh_sim, tmp_path):
    sr = sr_named(fresh_sim, "nfs-vms")
    data = pattern(6 * MiB + 512 * 3)
    vhd = qemu_vhd(tmp_path, data, "dynamic")
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=vhd-import", vhd,
               {"Content-Type": "application/octet-stream"})
    new_id = assert_created(ans, "imports/import-vhd-dynamic-16MiB")
    vdi = imported(fresh_sim, new_id)
    assert vdi["size"] == vhd_virtual_size(vhd)  # the footer's size, not the body's
    assert vdi["usage"] == len(vhd) and vdi["other_config"] == {}
    exported = call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}.raw").body
    qemu_raw = tmp_path / "qemu.raw"
    subprocess.run([require_tool("qemu-img"), "convert", "-f", "vpc", "-O", "raw",
                    str(tmp_path / "disk-dynamic.vhd"), str(qemu_raw)], check=True, timeout=60)
    assert exported == qemu_raw.read_bytes()
    assert exported[:len(data)] == data
    again = call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}.vhd").body
    (tmp_path / "again.vhd").write_bytes(again)
    subprocess.run([require_tool("qemu-img"), "convert", "-f", "vpc", "-O", "raw", str(tmp_path / "again.vhd"),
                    str(tmp_path / "again.raw")], check=True, timeout=60)
    assert (tmp_path / "again.raw").read_bytes() == exported


def test_a_vhd_body_is_converted_as_it_arrives(fresh_sim, tmp_path):
    """As XO pipes an upload on to XAPI: the new disk holds the first blocks before the body has ended, and
    the simulator keeps no copy of the body (it used to spool it whole, then convert)."""
    sr = sr_named(fresh_sim, "nfs-vms")
    data = pattern(8 * MiB)
    vhd = qemu_vhd(tmp_path, data, "dynamic")
    disks = tmp_path / "sim-state" / "disks"
    conn = http.client.HTTPConnection("127.0.0.1", fresh_sim.port, timeout=30)
    conn.putrequest("POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=streamed")
    conn.putheader("Cookie", f"authenticationToken={fresh_sim.token}")
    conn.putheader("Content-Length", str(len(vhd)))
    conn.endheaders()
    conn.send(vhd[:-3 * MiB])  # the first blocks, with the next pieces' worth behind them
    deadline = time.monotonic() + 10
    while True:
        files = sorted(p.name for p in disks.iterdir()) if disks.exists() else []
        written = list(disks.glob("*.raw")) if disks.exists() else []
        if written and written[0].read_bytes()[:2 * MiB] == data[:2 * MiB]:
            break
        assert time.monotonic() < deadline, files
        time.sleep(0.02)
    assert all(name.endswith(".raw") for name in files), files
    conn.send(vhd[-3 * MiB:])
    resp = conn.getresponse()
    assert resp.status == 201, resp.read()
    new_id = json.loads(resp.read())["id"]
    conn.close()
    assert call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}.raw").body[:len(data)] == data


def test_default_name_and_description(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?raw=true&name_description=from%20a%20test",
               bytes(MiB))
    new_id = assert_created(ans, "imports/import-raw-no-name")
    vdi = call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}").json()
    assert re.fullmatch(r"\[XO\] Imported disk - \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", vdi["name_label"])
    assert vdi["name_description"] == "from a test"


def test_iso_sr_accepts_an_import_like_xo(fresh_sim):
    sr = sr_named(fresh_sim, "ISO library")
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=iso&raw=true", bytes(MiB))
    assert_created(ans, "imports/import-iso-sr")


def test_import_marks_other_config_while_the_body_is_sent(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    data = pattern(2 * MiB)
    conn = http.client.HTTPConnection("127.0.0.1", fresh_sim.port, timeout=30)
    conn.putrequest("POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=slow&raw=true")
    conn.putheader("Cookie", f"authenticationToken={fresh_sim.token}")
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders()
    conn.send(data[:MiB])
    deadline = time.monotonic() + 5
    while not (found := vdi_named(fresh_sim, "slow")) or "xo:import:task" not in found[0]["other_config"]:
        assert time.monotonic() < deadline, found
        time.sleep(0.02)
    marks = found[0]["other_config"]
    assert marks["xo:import:length"] == str(len(data))
    task = marks["xo:import:task"]
    assert re.fullmatch(r"[0-9a-f-]{36}", task)
    conn.send(data[MiB:])
    resp = conn.getresponse()
    assert resp.status == 201
    conn.close()
    vdi = imported(fresh_sim, vdi_named(fresh_sim, "slow")[0]["id"])
    assert vdi["other_config"] == {} and vdi["size"] == len(data)


def test_put_raw_into_an_existing_vdi(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    first = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=x&raw=true", pattern(4 * MiB, 1))
    new_id = first.json()["id"]
    data = pattern(4 * MiB, 2)
    ans = call(fresh_sim, "PUT", f"/rest/v0/vdis/{new_id}.raw", data)
    meta, _ = recorded("imports/put-vdi-raw")
    assert (ans.status, ans.body) == (204, b"")
    assert ans.names() == recorded_names(meta)
    assert call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}.raw").body == data
    partial = call(fresh_sim, "PUT", f"/rest/v0/vdis/{new_id}.raw", b"\x01" * MiB)
    assert partial.status == 204
    assert call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}.raw").body == b"\x01" * MiB + data[MiB:]
    too_big = call(fresh_sim, "PUT", f"/rest/v0/vdis/{new_id}.raw", bytes(5 * MiB))
    assert_500(too_big, "500 Internal Server Error")
    assert call(fresh_sim, "GET", f"/rest/v0/vdis/{new_id}.raw").body == b"\x01" * MiB + data[MiB:]
    qcow2 = call(fresh_sim, "PUT", f"/rest/v0/vdis/{new_id}.qcow2", bytes(MiB))
    assert qcow2.status == 422 and qcow2.json()["error"]["format"]["value"] == "qcow2"


# -- failures --------------------------------------------------------------------------------------------------


def test_fixed_vhd_fails_on_its_footer_and_creates_nothing(fresh_sim, tmp_path):
    sr = sr_named(fresh_sim, "nfs-vms")
    before = vdi_ids(fresh_sim)
    vhd = qemu_vhd(tmp_path, pattern(2 * MiB), "fixed")
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=fixed", vhd)
    assert ans.status == 500
    message = ans.json()["error"]
    found = re.fullmatch(r"invalid footer checksum (\d+), expected (\d+)\n\+ actual - expected\n\n\+ (\d+)\n- (\d+)",
                         message)
    assert found and found[1] == found[3] and found[2] == found[4], message
    assert vdi_ids(fresh_sim) == before


def test_raw_false_reads_the_body_as_a_vhd(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    before = vdi_ids(fresh_sim)
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=rawfalse&raw=false", pattern(MiB))
    assert ans.status == 500 and ans.json()["error"].startswith("invalid footer checksum ")
    assert vdi_ids(fresh_sim) == before


def chunked_post(sim: SimProcess, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
    try:
        conn.request("POST", path, body=iter([body[:MiB], body[MiB:]]), encode_chunked=True,
                     headers={"Cookie": f"authenticationToken={sim.token}", "Transfer-Encoding": "chunked",
                              "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_chunked_raw_upload_fails_before_anything_is_created(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    before = vdi_ids(fresh_sim)
    status, body = chunked_post(fresh_sim, f"/rest/v0/srs/{sr['id']}/vdis?name_label=chunked&raw=true",
                                pattern(4 * MiB))
    _, expected = recorded("imports/import-raw-chunked-no-length")
    assert (status, body) == (500, expected)
    assert vdi_ids(fresh_sim) == before


async def test_chunked_vhd_upload_creates_then_destroys_the_vdi(fresh_sim, tmp_path):
    import trio

    from tests.sim_rest_support import watch_events

    sr = sr_named(fresh_sim, "nfs-vms")
    before = vdi_ids(fresh_sim)
    vhd = qemu_vhd(tmp_path, pattern(2 * MiB), "dynamic")
    async with watch_events(fresh_sim) as watcher:
        status, body = await trio.to_thread.run_sync(
            chunked_post, fresh_sim, f"/rest/v0/srs/{sr['id']}/vdis?name_label=chunkedvhd", vhd)
    _, expected = recorded("imports/import-vhd-chunked-no-length")
    assert (status, body) == (500, expected)
    assert vdi_ids(fresh_sim) == before
    created = watcher.entered(lambda o: o["type"] == "VDI" and o["name_label"] == "chunkedvhd")
    assert created and created[0]["id"] in watcher.exited()


def test_bare_raw_flag_is_422_but_unknown_sr_is_404_first(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=bare&raw", bytes(4096))
    _, expected = recorded("imports/import-bare-raw-flag")
    assert (ans.status, ans.body) == (422, expected)
    missing = "00000000-0000-0000-0000-000000000000"
    unknown = call(fresh_sim, "POST", f"/rest/v0/srs/{missing}/vdis?raw", bytes(4096))
    assert unknown.status == 404 and unknown.json() == {"error": f"no such SR {missing}",
                                                        "data": {"id": missing, "type": "SR"}}


def test_an_sr_without_room_answers_xapis_sr_full(fresh_sim, tmp_path):
    qemu_img = require_tool("qemu-img")
    sr = sr_named(fresh_sim, "ISO library")
    free = sr["size"] - sr["usage"]
    big = tmp_path / "big.vhd"
    subprocess.run([qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(big), str(1 << 40)],
                   check=True, timeout=30)
    vhd = big.read_bytes()
    before = vdi_ids(fresh_sim)
    ans = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=too-big", vhd)
    assert ans.status == 500
    assert ans.json() == {"error": f"SR_FULL({vhd_virtual_size(vhd)}, {free})",
                          "info": "This is a XenServer/XCP-ng error, not an XO error"}
    assert vdi_ids(fresh_sim) == before


def test_put_needs_a_length(fresh_sim):
    sr = sr_named(fresh_sim, "nfs-vms")
    new_id = call(fresh_sim, "POST", f"/rest/v0/srs/{sr['id']}/vdis?name_label=x&raw=true", bytes(MiB)).json()["id"]
    conn = http.client.HTTPConnection("127.0.0.1", fresh_sim.port, timeout=30)
    conn.request("PUT", f"/rest/v0/vdis/{new_id}.raw", body=iter([bytes(MiB)]), encode_chunked=True,
                 headers={"Cookie": f"authenticationToken={fresh_sim.token}", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (500, {
        "error": "Trying to import a VDI without a length field. Please report this error to the Xen Orchestra team."})
    conn.close()


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_unknown_vdi_put_is_404(fresh_sim, fmt):
    missing = "00000000-0000-0000-0000-000000000000"
    ans = call(fresh_sim, "PUT", f"/rest/v0/vdis/{missing}.{fmt}", bytes(512))
    assert ans.status == 404 and ans.json()["error"] == f"no such VDI {missing}"
