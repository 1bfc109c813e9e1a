"""A mount of an XO of the legacy era (`xofs sim --legacy`: text 401, HTML 404, bare UUID on import, no
event stream) works as on a current one."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest

from tests.operate_support import assert_documented, halted_vm, meta, rest, status_of, wait_for, xofs
from tests.support import SimProcess
from tests.test_imports import make_raw, make_vhd, sr_ids, vdis


@pytest.fixture
def legacy_sim(tmp_path) -> Iterator[SimProcess]:
    sim = SimProcess(args=["--seed", "8", "--legacy", "--state-dir", str(tmp_path / "sim-state")],
                     log_path=tmp_path / "sim.log").start()
    yield sim
    sim.stop()


def export_start(sim: SimProcess, vdi: str, size: int) -> bytes:
    """The first `size` bytes of a VDI's raw export (XO has no Range: read them and hang up)."""
    req = urllib.request.Request(f"{sim.url}/rest/v0/vdis/{vdi}.raw",
                                 headers={"Cookie": f"authenticationToken={sim.token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read(size)


def test_the_legacy_simulator_answers_the_old_way(legacy_sim):
    status, headers, body = legacy_sim.request("GET", "/rest/v0/vms", token="wrong")
    assert (status, body) == (401, b"Unauthorized")
    status, headers, body = legacy_sim.request("GET", "/rest/v0/events")
    assert status == 404 and headers["Content-Type"].startswith("text/html")
    assert b"Cannot GET /rest/v0/events" in body


def test_the_legacy_patch_takes_xapi_names_and_ignores_the_rest(legacy_sim):
    """The legacy router's PATCH set `name_label`, `name_description` and `tags` and ignored every other
    key, camelCase ones included; it answered 204 before XAPI had checked the values (QA helper 52: the
    simulator took today's camelCase names in legacy mode too)."""
    vm = halted_vm(legacy_sim)
    before = legacy_sim.get_json(f"/rest/v0/vms/{vm}")
    for body in ({"nameLabel": "camel"}, {"name_label": 5}, [1, 2]):
        status, answer = rest(legacy_sim, "PATCH", f"/rest/v0/vms/{vm}", body)
        assert status == 204, answer
    assert legacy_sim.get_json(f"/rest/v0/vms/{vm}")["name_label"] == before["name_label"]
    status, _ = rest(legacy_sim, "PATCH", f"/rest/v0/vms/{vm}",
                     {"name_label": "old-style", "tags": ["a"], "nameDescription": "ignored"})
    assert status == 204
    after = legacy_sim.get_json(f"/rest/v0/vms/{vm}")
    assert (after["name_label"], after["tags"]) == ("old-style", ["a"])
    assert after["name_description"] == before["name_description"]


def test_a_legacy_xo_mounts_reads_exports_and_imports(legacy_sim, make_mount, tmp_path):
    mnt = tmp_path / "refused"
    mnt.mkdir()
    proc = xofs("mount", legacy_sim.url, str(mnt), env={"XOFS_TOKEN": "wrong-token",
                                                        "XOFS_STATE_DIR": str(tmp_path / "state")})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "401: Unauthorized" in lines[0], proc.stderr
    assert_documented(lines[0])

    mount = make_mount(legacy_sim, "--events", "sse")  # no event stream in that era: the JSON-RPC feed
    assert "no REST event stream" in mount.log_text() and "using the JSON-RPC event feed" in mount.log_text()
    assert_documented(next(line for line in mount.log_text().splitlines() if "no REST event stream" in line))
    feed = status_of(mount.mountpoint)["feed"]
    assert feed["kind"] == "jsonrpc" and feed["connected"]
    vm = halted_vm(legacy_sim)
    assert meta(mount.mountpoint, f"vms/{vm}")["id"] == vm
    vdi = legacy_sim.get_json("/rest/v0/vdis?fields=id&limit=1")[0]["id"]
    with open(mount.mountpoint / "vdis" / f"{vdi}.raw", "rb") as f:
        data = f.read(1 << 20)
    assert data == export_start(legacy_sim, vdi, 1 << 20)

    # An import: the legacy router answers a bare UUID with 200.
    make_raw(tmp_path / "old.raw", 1 << 20)
    sr = sr_ids(legacy_sim)[0]
    target = mount.mountpoint / "srs" / sr / "import" / "old-era.raw"
    subprocess.run(["cp", str(tmp_path / "old.raw"), str(target)], check=True, timeout=60)
    made = vdis(legacy_sim, name_label="old-era")
    assert len(made) == 1 and made[0]["$SR"] == sr
    assert os.getxattr(target, "user.xo.vdi").decode() == made[0]["id"]
    # A VHD: the legacy router took any `raw` in the query, `raw=false` too, for a raw upload, and stored
    # the VHD file itself as the disk (helper 43).
    vhd, content = make_vhd(tmp_path, "old.vhd")
    subprocess.run(["cp", str(tmp_path / "old.vhd"), str(target.with_name("old-vhd.vhd"))], check=True, timeout=60)
    made = vdis(legacy_sim, name_label="old-vhd")
    assert len(made) == 1 and made[0]["size"] == len(content)
    assert export_start(legacy_sim, made[0]["id"], len(content)) == content

    # A token that expires mid-mount: the text 401 is EACCES too.
    assert rest(legacy_sim, "POST", "/_sim/expire-token", {"token": legacy_sim.token})[0] == 204
    with pytest.raises(PermissionError), open(mount.mountpoint / "vdis" / f"{vdi}.raw", "rb") as f:
        f.read(4096)
    wait_for(lambda: "XO answered 401: Unauthorized" in mount.log_text(), 5, "the refusal in the log")
