"""The simulator's objects have the shapes of a real XO's, their cross references hold, and seeds are stable.

The reference is `reference/real-xo/jsonrpc/xo.getAllObjects.response.json`: every object a real xo-server
5.207.2 sent for a small pool (REST's `*.fields-star.body` hold the same objects plus `href`). Objects are
compared per type and state (VM power state; VBD with or without a `VDI`), on their key sets and the JSON type
of every value, and, for the structured values listed in `NESTED`, on their inner keys too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support import require_tool
from xofs.sim.inventory import build_inventory
from xofs.sim.model import SimModel

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():
    SHARED = Path("/work/shared")
RECORDED_OBJECTS = SHARED / "reference/real-xo/jsonrpc/xo.getAllObjects.response.json"

# Values whose inner keys are fixed by XO's code (the others, e.g. `other` or `xenStoreData`, are free maps).
NESTED = ("memory", "CPUs", "boot", "xenTools", "os_version", "cpus", "license_server", "template_info",
          "vulnerabilities", "chipset_info")

# Intentional differences, with their reasons.
ALLOWED_EXTRA_NESTED = {
    # A third of the running VMs report memory in use, as guests whose tools fill VM_guest_metrics.memory do
    # (xo-api.md's VM example); the recorded fake guest reported none.
    ("VM", "Running", "memory"): {"usage"},
    ("VM", "Paused", "memory"): {"usage"},
}
ALLOWED_MISSING_NESTED = {
    # Default templates have no `install-arch`, so no `template_info.arch` (both kinds are recorded; the key
    # set of the custom one is the union).
    ("VM-template", "Halted", "template_info"): {"arch"},
}
# Keys XO shows whenever the XAPI field is set, whatever the power state: a VM resumed from suspension keeps
# the `suspendSr` it was suspended to (only the recorded Suspended VM had one).
OPTIONAL_KEYS = {"suspendSr"}
# Types the recorded pool has that the simulator has too (messages and tasks come and go).
RECORDED_TYPES = {"pool", "host", "SR", "PBD", "SM", "network", "PIF", "VM", "VM-controller", "VM-snapshot",
                  "VM-template", "VBD", "VDI", "VDI-snapshot", "VIF"}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def group(obj: dict[str, Any]) -> tuple[str, str]:
    """The shape class of an object: its type and what makes its key set vary."""
    if obj["type"].startswith("VM"):
        return obj["type"], obj["power_state"]
    if obj["type"] == "VBD":
        return "VBD", "with VDI" if "VDI" in obj else "empty"
    return obj["type"], ""


def recorded_shapes() -> dict[tuple[str, str], list[dict[str, Any]]]:
    objects = json.loads(RECORDED_OBJECTS.read_text())["result"]
    shapes: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for obj in objects.values():
        shapes[group(obj)].append(obj)
    return shapes


def shape_problems(objects: dict[str, dict[str, Any]]) -> list[str]:
    """How the objects' shapes differ from the recorded objects of the same type and state."""
    recorded = recorded_shapes()
    problems = []
    for obj in objects.values():
        key = group(obj)
        if obj["type"] == "task":
            continue
        if key not in recorded:
            problems.append(f"{key}: no recorded object of this kind ({obj['id']})")
            continue
        refs = recorded[key]
        if not any(set(obj) - OPTIONAL_KEYS == set(ref) - OPTIONAL_KEYS for ref in refs):
            ref = refs[0]
            problems.append(f"{key} {obj.get('name_label', obj['id'])}: extra {sorted(set(obj) - set(ref))}, "
                            f"missing {sorted(set(ref) - set(obj))}")
            continue
        if not any(same_order(obj, ref) for ref in refs):  # JSON.stringify writes keys in insertion order
            problems.append(f"{key} {obj.get('name_label', obj['id'])}: keys in another order than XO's: "
                            f"{list(obj)}")
        for name, value in obj.items():
            types = {json_type(ref[name]) for ref in refs if name in ref}
            if not types and name in OPTIONAL_KEYS:
                continue
            if json_type(value) not in types:
                problems.append(f"{key}.{name}: {json_type(value)}, recorded {types}")
            if name in NESTED and isinstance(value, dict):
                ref_keys = set().union(*(set(ref[name]) for ref in refs if isinstance(ref.get(name), dict)))
                extra = set(value) - ref_keys - ALLOWED_EXTRA_NESTED.get((*key, name), set())
                missing = ref_keys - set(value) - ALLOWED_MISSING_NESTED.get((*key, name), set())
                if extra or missing:
                    problems.append(f"{key}.{name}: extra {sorted(extra)}, missing {sorted(missing)}")
                if not any(same_order(value, ref[name]) for ref in refs if isinstance(ref.get(name), dict)):
                    problems.append(f"{key}.{name}: keys in another order than XO's: {list(value)}")
                for inner, inner_value in value.items():
                    inner_types = {json_type(ref[name][inner]) for ref in refs
                                   if isinstance(ref.get(name), dict) and inner in ref[name]}
                    if inner_types and json_type(inner_value) not in inner_types:
                        problems.append(f"{key}.{name}.{inner}: {json_type(inner_value)}, recorded {inner_types}")
    return problems


def same_order(obj: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Whether the keys both have come in the same order in each."""
    return [k for k in obj if k in ref] == [k for k in ref if k in obj]


def consistency_problems(objects: dict[str, dict[str, Any]]) -> list[str]:
    """Broken cross references between the objects (what XO's links would show)."""
    problems: list[str] = []

    def expect(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for obj_id, obj in objects.items():
        by_type[obj["type"]].append(obj)
        expect(obj["id"] == obj_id, f"{obj_id}: id {obj['id']}")
        expect(obj["id"] == obj["uuid"] or obj["id"] == f"{obj['$pool']}-{obj['uuid']}", f"{obj_id}: uuid")
        expect(obj["$pool"] == obj["$poolId"] and obj["$pool"] in objects, f"{obj_id}: $pool")
        expect(obj["_xapiRef"].startswith("OpaqueRef:"), f"{obj_id}: _xapiRef")
    refs = [o["_xapiRef"] for o in objects.values()]
    expect(len(refs) == len(set(refs)), "duplicate _xapiRef")

    for vm in [o for t in ("VM", "VM-snapshot", "VM-template", "VM-controller") for o in by_type[t]]:
        for vbd_id in vm["$VBDs"]:
            vbd = objects.get(vbd_id)
            expect(vbd is not None and vbd["VM"] == vm["id"], f"{vm['name_label']}: $VBDs {vbd_id}")
        for vif_id in vm["VIFs"]:
            vif = objects.get(vif_id)
            expect(vif is not None and vif["$VM"] == vm["id"], f"{vm['name_label']}: VIFs {vif_id}")
        for snap_id in vm["snapshots"]:
            snap = objects.get(snap_id)
            expect(snap is not None and snap.get("$snapshot_of") == vm["id"], f"{vm['name_label']}: snapshot")
        if "$snapshot_of" in vm:
            expect(vm["id"] in objects[vm["$snapshot_of"]]["snapshots"], f"{vm['name_label']}: $snapshot_of")
        container = objects.get(vm["$container"])
        expect(container is not None and container["type"] in ("host", "pool"), f"{vm['name_label']}: $container")
        running = vm["power_state"] in ("Running", "Paused")
        expect((container["type"] == "host" and vm["id"] in container["residentVms"]) == running
               or (not running and container["type"] == "host"),
               f"{vm['name_label']}: residentVms / $container")
        for dev_id in [*vm["$VBDs"], *vm["VIFs"]]:
            if vm["type"] == "VM" and dev_id in objects:
                expect(objects[dev_id]["attached"] == running, f"{vm['name_label']}: {dev_id} attached")
    for host in by_type["host"]:
        for vm_id in host["residentVms"]:
            vm = objects.get(vm_id)
            expect(vm is not None and vm["$container"] == host["id"] and vm["power_state"] in ("Running", "Paused"),
                   f"{host['name_label']}: residentVms {vm_id}")
        for pbd_id in host["$PBDs"]:
            expect(objects[pbd_id]["host"] == host["id"], f"{host['name_label']}: $PBDs")
        expect(objects[host["controlDomain"]]["type"] == "VM-controller", f"{host['name_label']}: controlDomain")
    for vbd in by_type["VBD"]:
        expect(vbd["id"] in objects[vbd["VM"]]["$VBDs"], f"VBD {vbd['id']}: VM")
        if "VDI" in vbd:
            expect(vbd["id"] in objects[vbd["VDI"]]["$VBDs"], f"VBD {vbd['id']}: VDI")
    for vdi in by_type["VDI"] + by_type["VDI-snapshot"]:
        expect(vdi["id"] in objects[vdi["$SR"]]["VDIs"], f"VDI {vdi['name_label']}: $SR")
        for vbd_id in vdi["$VBDs"]:
            expect(objects.get(vbd_id, {}).get("VDI") == vdi["id"], f"VDI {vdi['name_label']}: $VBDs")
        for snap_id in vdi["snapshots"]:
            expect(objects.get(snap_id, {}).get("$snapshot_of") == vdi["id"], f"VDI {vdi['name_label']}: snapshots")
    for sr in by_type["SR"]:
        vdis = [objects.get(i) for i in sr["VDIs"]]
        expect(all(v is not None and v["$SR"] == sr["id"] for v in vdis), f"SR {sr['name_label']}: VDIs")
        expect(sr["usage"] == sum(v["size"] for v in vdis if v), f"SR {sr['name_label']}: usage")
        for pbd_id in sr["$PBDs"]:
            expect(objects[pbd_id]["SR"] == sr["id"], f"SR {sr['name_label']}: $PBDs")
    for network in by_type["network"]:
        vifs = {v["id"] for v in by_type["VIF"] if v["$network"] == network["id"]}
        expect(set(network["VIFs"]) == vifs, f"network {network['name_label']}: VIFs")
    for pool in by_type["pool"]:
        expect(objects[pool["master"]]["type"] == "host", "pool master")
    return problems


@pytest.fixture(scope="module")
def inventory() -> dict[str, dict[str, Any]]:
    return build_inventory(1, 12)


def test_every_object_has_a_recorded_shape(inventory):
    assert shape_problems(inventory) == []


def test_every_recorded_shape_is_simulated(inventory):
    simulated = {group(o) for o in inventory.values()}
    missing = set(recorded_shapes()) - simulated
    assert missing == set()
    assert {o["type"] for o in inventory.values()} == RECORDED_TYPES


def test_shapes_hold_for_bigger_and_other_inventories():
    for seed, vms in [(2, 60), (7, 12), (3, 1)]:
        objects = build_inventory(seed, vms)
        assert shape_problems(objects) == [], (seed, vms)
        assert consistency_problems(objects) == [], (seed, vms)


def test_cross_references_hold(inventory):
    assert consistency_problems(inventory) == []


def test_the_recorded_pool_is_consistent_by_the_same_rules():
    """The consistency rules themselves agree with a real XO's objects."""
    objects = json.loads(RECORDED_OBJECTS.read_text())["result"]
    problems = consistency_problems(objects)
    # The recorded pool was hand-made: its SR `usage` values are not sums of VDI sizes.
    assert [p for p in problems if not p.endswith(": usage")] == []


def test_the_inventory_mirrors_the_recorded_pool(inventory):
    vms = {o["name_label"]: o for o in inventory.values() if o["type"] == "VM"}
    assert [vms[n]["power_state"] for n in ("web-01", "db-01", "app-01", "test-01")] == [
        "Running", "Halted", "Suspended", "Paused"]
    assert {o["power_state"] for o in vms.values()} == {"Running", "Halted", "Suspended", "Paused"}
    srs = {o["name_label"]: o for o in inventory.values() if o["type"] == "SR"}
    assert srs["nfs-vms"]["allocationStrategy"] == "thin" and srs["nfs-vms"]["shared"]
    assert srs["Local storage"]["allocationStrategy"] == "thick"
    assert srs["ISO library"]["content_type"] == "iso" and "allocationStrategy" not in srs["ISO library"]
    db = vms["db-01"]
    assert inventory[db["$container"]]["type"] == "host"  # its disk is on local storage
    assert inventory[vms["app-01"]["$container"]]["type"] == "pool"
    suspend = [o for o in inventory.values() if o.get("VDI_type") == "suspend"]
    assert len(suspend) == 1 and suspend[0]["$VBDs"] == []
    cds = [o for o in inventory.values() if o["type"] == "VBD" and o["is_cd_drive"]]
    assert any("VDI" not in cd for cd in cds)
    assert any(inventory[cd["VDI"]]["$SR"] == srs["ISO library"]["id"] for cd in cds if "VDI" in cd)
    templates = [o for o in inventory.values() if o["type"] == "VM-template"]
    pool = next(o for o in inventory.values() if o["type"] == "pool")
    default = [t for t in templates if t["isDefaultTemplate"]]
    assert default and all(t["id"] == f"{pool['id']}-{t['uuid']}" for t in default)
    user_disks = [o for o in inventory.values() if o["type"] == "VDI" and o["VDI_type"] == "user"
                  and o["$SR"] != srs["ISO library"]["id"]]
    assert all(1 << 30 <= v["size"] <= 100 << 30 for v in user_disks)
    halted = vms["db-01"]
    assert not {"xenTools", "mainIpAddress", "managementAgentDetected"} & set(halted)
    assert halted["os_version"] is None and halted["addresses"] == {} and halted["startTime"] is None


def recorded_vm_layout(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where the recorded pool's VMs and snapshot live: each one's `$container` (a host's name, or "pool"),
    its drives (device, disk name, SR name, the SR's container) in order, and how many snapshots each of
    their disks has."""
    def place(obj_id: str) -> str:
        return objects[obj_id]["name_label"] if objects[obj_id]["type"] == "host" else objects[obj_id]["type"]

    layout: dict[str, Any] = {}
    for name in ("web-01", "db-01", "app-01", "test-01", "web-01 before upgrade"):
        (vm,) = [o for o in objects.values() if o["type"] in ("VM", "VM-snapshot") and o["name_label"] == name]
        drives = []
        for vbd in (objects[i] for i in vm["$VBDs"]):
            vdi = objects.get(vbd.get("VDI", ""))
            sr = objects[vdi["$SR"]] if vdi is not None else None
            drives.append((vbd["device"], vdi and vdi["name_label"], sr and sr["name_label"],
                           sr and place(sr["$container"]), vdi and len(vdi["snapshots"])))
        layout[name] = (place(vm["$container"]), drives)
    return layout


def test_the_first_vms_sit_where_the_recorded_ones_do(inventory):
    """db-01's disk is on xcp-01's local storage, so its `$container` is xcp-01; web-01's snapshot holds its
    root disk only (2 VBDs; `web-01 data` has no snapshot): `jsonrpc/xo.getAllObjects.response.json`."""
    recorded = json.loads(RECORDED_OBJECTS.read_text())["result"]
    assert recorded_vm_layout(inventory) == recorded_vm_layout(recorded)


def test_same_seed_same_inventory_other_seed_other_ids():
    first = build_inventory(5, 12)
    assert json.dumps(first) == json.dumps(build_inventory(5, 12))
    other = build_inventory(6, 12)
    assert not set(first) & set(other)
    # VM i keeps its ids whatever the VM count
    more = build_inventory(5, 20)
    web = next(o for o in first.values() if o.get("name_label") == "web-01" and o["type"] == "VM")
    assert more[web["id"]]["$VBDs"] == web["$VBDs"]


def test_model_objects_keep_their_shapes_after_operations(tmp_path):
    model = SimModel(seed=1, vms=12)
    vms = {o["name_label"]: o for o in model.by_type("VM")}
    model.vm_stop(vms["web-01"]["id"])
    model.vm_start(vms["db-01"]["id"])
    model.vm_start(vms["app-01"]["id"])
    model.vm_start(vms["test-01"]["id"])
    model.vm_snapshot(vms["proxy-01"]["id"])
    model.vm_stop(vms["proxy-01"]["id"], force=True)
    sr = next(o for o in model.by_type("SR") if o["name_label"] == "nfs-vms")
    model.create_vdi(sr["id"], name_label="new", size=1 << 20)
    model.vm_delete(vms["mail-01"]["id"])
    objects = {k: v for k, v in model.all_objects().items() if v["type"] != "task"}
    assert shape_problems(objects) == []
    assert consistency_problems(objects) == []


@pytest.mark.timeout(60)
def test_ten_thousand_vms_start(tmp_path):
    cmd = [sys.executable, "-m", "xofs", "sim", "--port", "0", "--token", "t" * 43, "--vms", "10000"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        elapsed = time.monotonic() - started
        print(f"xofs sim --vms 10000 ready in {elapsed:.2f} s")
        assert line.startswith("xofs sim listening on http://127.0.0.1:")
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    model = SimModel(seed=1, vms=10000)
    assert len(model.by_type("VM")) == 10000
    assert consistency_problems(model.all_objects()) == []


def test_state_dir_survives_a_restart(tmp_path):
    state = tmp_path / "state"
    model = SimModel(seed=3, vms=12, state_dir=state)
    vms = {o["name_label"]: o for o in model.by_type("VM")}
    model.vm_set(vms["web-01"]["id"], name_label="web-01-renamed", tags=["x"])
    snap = model.vm_snapshot(vms["web-01"]["id"], "before")
    model.vm_delete(vms["db-01"]["id"])
    model.vm_stop(vms["proxy-01"]["id"])
    sr = next(o for o in model.by_type("SR") if o["name_label"] == "nfs-vms")
    vdi = model.create_vdi(sr["id"], name_label="imported", size=4096)
    path = model.new_disk_path(vdi["id"])
    path.write_bytes(b"x" * 4096)
    model.attach_disk_file(vdi["id"], path)
    token = model.create_token(model.user, description="kept")
    before = {k: v for k, v in model.all_objects().items() if v["type"] != "task"}
    model.close()

    again = SimModel(seed=3, vms=12, state_dir=state)
    after = {k: v for k, v in again.all_objects().items() if v["type"] != "task"}
    assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)
    assert again.get(snap)["name_label"] == "before"
    assert again.user_for_token(token) == again.user
    assert again.token_record(token)["description"] == "kept"
    assert again.disk(vdi["id"]).read(0, 4) == b"xxxx"
    assert (state / "journal.jsonl").stat().st_mode & 0o077 == 0  # it holds the tokens (helper 47)
    with pytest.raises(Exception, match="--seed 3 --vms 12"):
        SimModel(seed=4, vms=12, state_dir=state)


def test_a_self_signed_certificate_names_this_machine_when_served_on_all_addresses(tmp_path):
    """It named only localhost: `https://<this host>:PORT` failed with "Hostname mismatch" (helper 47)."""
    import socket

    from xofs.sim.tls import self_signed

    require_tool("openssl")
    for host, named in (("127.0.0.1", False), ("0.0.0.0", True)):
        cert, _ = self_signed(tmp_path / host, host=host)
        sans = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
                              capture_output=True, text=True, check=True).stdout
        assert "DNS:localhost" in sans and "IP Address:127.0.0.1" in sans
        assert (f"DNS:{socket.gethostname()}" in sans) == named, sans
