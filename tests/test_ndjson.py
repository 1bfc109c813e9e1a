"""/<collection>.ndjson: the whole inventory of one type as XO's own NDJSON, on real mounts and directly."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import xofs.views.ndjson as ndjson
from tests.support import SimProcess, require_tool, wait_for
from xofs.cache import COLLECTIONS, ObjectCache
from xofs.views import File, TypeSnapshot, load_views

RECORDED = Path("/work/shared/reference/real-xo/rest")
FILES = {"vms.ndjson": "vms", "vm-snapshots.ndjson": "vm-snapshots", "vdis.ndjson": "vdis",
         "vdi-snapshots.ndjson": "vdi-snapshots", "srs.ndjson": "srs", "hosts.ndjson": "hosts",
         "pools.ndjson": "pools"}


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (cmd, proc.returncode, proc.stderr)
    return proc.stdout


def xo_ndjson(sim: SimProcess, collection: str) -> dict[str, dict]:
    """XO's NDJSON of a collection (every field), id -> object, without the `href` XO adds."""
    status, headers, body = sim.request("GET", f"/rest/v0/{collection}?fields=*&ndjson=true")
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson"), (status, body[:200])
    objects = [json.loads(line) for line in body.decode().splitlines()]
    for obj in objects:
        del obj["href"]
    return {obj["id"]: obj for obj in objects}



# ---- rendering, directly ------------------------------------------------------------------------

def test_each_collection_has_its_own_root_file_view():
    views = load_views(list(FILES))
    assert sorted(views) == sorted(FILES)
    for name, view in views.items():
        assert isinstance(view.node, File) and isinstance(view.node.content, TypeSnapshot)
        assert COLLECTIONS[view.node.content.type_] == FILES[name]
        assert view.children(None, ()) is None


def test_lines_are_xo_compact_json_and_follow_changes():
    recorded = json.loads((RECORDED / "vms.fields-star.body").read_text())
    template = {k: v for k, v in recorded[0].items() if k != "href"}
    cache = ObjectCache()
    ids = [str(uuid.UUID(int=n)) for n in range(1000)]
    cache.replace_all([{**template, "id": i, "uuid": i, "name_label": f"vm-{n}"} for n, i in enumerate(ids)])
    render = ndjson.VmsNdjson().node.content.render
    lines = render(cache.of_type("VM")).decode().splitlines(keepends=True)
    assert len(lines) == 1000
    assert lines[0] == json.dumps(cache.get(ids[0]), separators=(",", ":"), ensure_ascii=False) + "\n"

    changed = copy.deepcopy(cache.get(ids[5]))
    changed["name_label"] = "renamed ✓"
    cache.apply("enter", {ids[5]: changed})
    cache.apply("exit", {ids[7]: 0})
    second = render(cache.of_type("VM"))
    objects = [json.loads(line) for line in second.decode().splitlines()]
    assert len(objects) == 999 and objects[5]["name_label"] == "renamed ✓"
    assert ids[7] not in {obj["id"] for obj in objects}
    assert '"renamed ✓"' in second.decode()  # not \u-escaped, like JSON.stringify


def test_a_lone_surrogate_keeps_the_line_valid_utf8():
    line = ndjson.ndjson_line({"id": "x", "type": "VM", "name_label": "bad \ud800 name"})
    assert json.loads(line.decode("utf-8")) == {"id": "x", "type": "VM", "name_label": "bad \ud800 name"}


# ---- real mounts ----------------------------------------------------------------------------------

def test_jq_and_wc_see_the_rest_collections(sim, make_mount):
    require_tool("jq")
    mount = make_mount(sim)
    root = mount.mountpoint
    assert set(FILES) <= set(os.listdir(root))
    for name, collection in FILES.items():
        path = root / name
        expected = xo_ndjson(sim, collection)
        assert expected, collection
        lines = run("jq", "-c", ".", str(path)).splitlines()
        got = [json.loads(line) for line in lines]
        assert {obj["id"]: obj for obj in got} == expected, name
        assert int(run("wc", "-l", str(path)).split()[0]) == len(expected)
        data = path.read_bytes()
        assert int(run("stat", "-c", "%s", str(path))) == len(data) == os.stat(path).st_size
        assert run("stat", "-c", "%F %a", str(path)).strip() == "regular file 400"
        # Compact lines, as XO writes them: each line is exactly json.dumps(..., separators=(",", ":")).
        for line in data.decode().splitlines():
            assert line == json.dumps(json.loads(line), separators=(",", ":"), ensure_ascii=False)
    # grep on the whole inventory at once.
    vm = next(iter(xo_ndjson(sim, "vms").values()))
    assert run("grep", "-c", f'"name_label":"{vm["name_label"]}"', str(root / "vms.ndjson")).strip() == "1"


def test_a_change_in_xo_changes_the_file(fresh_sim, make_mount):
    # Kernel caches last 300 s: only the event-driven invalidation can make the change visible.
    mount = make_mount(fresh_sim, "--attr-ttl", "300")
    path = mount.mountpoint / "vms.ndjson"
    before = path.read_bytes()
    vm = json.loads(before.splitlines()[0])
    status, _, body = fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}",
                                        json.dumps({"nameLabel": "a much longer name than before"}).encode(),
                                        {"Content-Type": "application/json"})
    assert status == 204, body

    def renamed() -> bool:
        return b'"name_label":"a much longer name than before"' in path.read_bytes()

    wait_for(renamed, what="the rename in vms.ndjson")
    after = path.read_bytes()
    assert os.stat(path).st_size == len(after) > len(before)
    assert {json.loads(line)["id"]: json.loads(line) for line in after.splitlines()} == xo_ndjson(fresh_sim, "vms")

    # A VDI deleted in XO leaves vdis.ndjson.
    vdis = xo_ndjson(fresh_sim, "vdis")
    spare = next(v for v in vdis.values() if not v["$VBDs"])
    assert spare["id"].encode() in (mount.mountpoint / "vdis.ndjson").read_bytes()
    status, _, body = fresh_sim.request("DELETE", f"/rest/v0/vdis/{spare['id']}")
    assert status == 204, body
    wait_for(lambda: spare["id"].encode() not in (mount.mountpoint / "vdis.ndjson").read_bytes(),
             what="the deleted VDI to leave vdis.ndjson")
    assert int(run("wc", "-l", str(mount.mountpoint / "vdis.ndjson")).split()[0]) == len(vdis) - 1


def test_rsync_sees_a_change_that_keeps_the_size(fresh_sim, make_mount, tmp_path):
    require_tool("rsync")
    # rsync -a skips a file whose size and mtime match the copy's: the file's mtime must move with XO's
    # changes of its type, even when its size does not.
    mount = make_mount(fresh_sim, "--attr-ttl", "300")
    path = mount.mountpoint / "vms.ndjson"
    backup = tmp_path / "backup"
    run("rsync", "-a", str(path), f"{backup}/")
    before = os.stat(path)
    vm = json.loads(path.read_bytes().splitlines()[0])
    time.sleep(1.1)  # rsync compares whole seconds
    same_length = vm["name_label"][:-1] + ("X" if vm["name_label"][-1] != "X" else "Y")
    status, _, body = fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}",
                                        json.dumps({"nameLabel": same_length}).encode(),
                                        {"Content-Type": "application/json"})
    assert status == 204, body
    wait_for(lambda: json.dumps(same_length).encode() in path.read_bytes(), what="the rename in vms.ndjson")
    after = os.stat(path)
    assert after.st_size == before.st_size and after.st_mtime_ns > before.st_mtime_ns
    run("rsync", "-a", str(path), f"{backup}/")
    assert (backup / "vms.ndjson").read_bytes() == path.read_bytes()


@pytest.mark.timeout(60)
def test_one_open_reads_one_snapshot(fresh_sim, make_mount):
    mount = make_mount(fresh_sim, "--attr-ttl", "300")
    path = mount.mountpoint / "vms.ndjson"
    first = os.open(path, os.O_RDONLY)  # unbuffered: every read below reaches the kernel
    try:
        head = os.read(first, 10)
        vm = json.loads(path.read_bytes().splitlines()[0])
        fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}", json.dumps({"nameLabel": "zz-next"}).encode(),
                          {"Content-Type": "application/json"})
        wait_for(lambda: b'"zz-next"' in path.read_bytes(), what="the rename in a new open")
        chunks = [head]
        while chunk := os.read(first, 1000):
            chunks.append(chunk)
    finally:
        os.close(first)
    old = b"".join(chunks)
    assert b'"zz-next"' not in old and vm["name_label"].encode() in old
    assert len([json.loads(line) for line in old.splitlines()]) == len(xo_ndjson(fresh_sim, "vms"))
    assert [json.loads(line)["id"] for line in old.splitlines()][0] == vm["id"]
