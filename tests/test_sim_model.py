"""The simulator's model, called directly: XO operations, their errors, auth, tokens, events and tasks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import trio

from tests.test_sim_shapes import consistency_problems
from xofs.sim.model import SimError, SimModel, TooFastError, parse_duration_ms, parse_size


@pytest.fixture
def model() -> Iterator[SimModel]:
    model = SimModel(seed=1, vms=12)
    yield model
    model.close()  # the temporary directory of its imported disks


def vm(model: SimModel, name: str) -> dict:
    return next(o for o in model.by_type("VM") if o["name_label"] == name)


def summary(batches):
    """[(kind, sorted types)] of event batches."""
    return [(kind, sorted(o["type"] if o else 0 for o in items.values())) for kind, items in batches]


# -- objects and errors --------------------------------------------------------------------------------------

def test_lookups_by_id_ref_and_type(model):
    web = vm(model, "web-01")
    assert model.get(web["id"]) is web
    assert model.get(web["_xapiRef"]) is web
    assert model.get("nope") is None
    snapshot = model.get(web["snapshots"][0])
    with pytest.raises(SimError) as info:
        model.get_typed(snapshot["id"], "VM")
    assert (info.value.code, info.value.message, info.value.data) == (
        1, f"no such VM {snapshot['id']}", {"id": snapshot["id"], "type": "VM"})
    assert info.value.http_status == 404
    with pytest.raises(SimError) as info:
        model.get_typed("x", ("VDI", "VDI-snapshot"))
    assert info.value.message == "no such VDI,VDI-snapshot x"
    assert info.value.data == {"id": "x", "type": ["VDI", "VDI-snapshot"]}
    assert [o["name_label"] for o in model.by_type("VM")][:4] == ["web-01", "db-01", "app-01", "test-01"]


def test_update_merges_removes_and_nulls(model):
    from xofs.sim.model import NULL

    web = vm(model, "web-01")
    model.update(web["id"], {"name_label": "x", "mainIpAddress": None, "os_version": NULL})
    new = model.get(web["id"])
    assert new is not web and web["name_label"] == "web-01"  # copy on write: the old dict never changes
    assert new["name_label"] == "x" and "mainIpAddress" not in new and new["os_version"] is None


def test_a_tasks_progress_is_written_as_node_writes_it(model):
    """JSON-RPC frames and NDJSON lines come from Python's encoder, which writes a float 1.0 as `1.0` where
    XO (Node) writes `1`: a whole progress is kept as an int."""
    task = model.start_task("[XO] Exporting content of VDI as raw stream")
    model.task_progress(task, 0.25)
    assert json.dumps(model.get(task)["progress"]) == "0.25"
    model.task_progress(task, 1.0)
    assert json.dumps(model.get(task)["progress"]) == "1"


def test_a_snapshots_vifs_keep_their_vms_macs(model):
    """XAPI copies a VIF's MAC into a snapshot, in the inventory's snapshots as in new ones (QA 59)."""
    def macs(vm_like: dict) -> list[str]:
        return [model.get(v)["MAC"] for v in vm_like["VIFs"]]

    snaps = model.by_type("VM-snapshot")
    assert snaps
    for snap in snaps:
        assert macs(snap) == macs(model.get(snap["$snapshot_of"]))
    web = vm(model, "web-01")
    assert macs(model.get(model.vm_snapshot(web["id"], "again"))) == macs(web)


def test_start_stop_cycle_and_errors(model):
    web = vm(model, "web-01")
    with pytest.raises(SimError) as info:
        model.vm_start(web["id"])
    assert info.value.to_json() == {"message": "VM state is running but should be halted", "code": 13,
                                    "data": {"objectId": web["id"], "expected": "halted", "actual": "running"}}
    host = web["$container"]
    model.vm_stop(web["id"])
    halted = model.get(web["id"])
    assert halted["power_state"] == "Halted" and "xenTools" not in halted and halted["startTime"] is None
    assert halted["$container"] == model.pool_id and web["id"] not in model.get(host)["residentVms"]
    with pytest.raises(SimError) as info:
        model.vm_stop(web["id"])
    assert info.value.code == 13 and info.value.data["actual"] == "halted"
    model.vm_start(web["id"])
    running = model.get(web["id"])
    assert running["power_state"] == "Running" and running["mainIpAddress"] == web["mainIpAddress"]
    assert running["startTime"] >= int(time.time()) - 5
    assert running["id"] in model.get(running["$container"])["residentVms"]
    assert consistency_problems(model.all_objects()) == []


def test_paused_and_suspended_vms(model):
    test = vm(model, "test-01")
    with pytest.raises(SimError) as info:
        model.vm_stop(test["id"])  # a clean shutdown needs a running VM
    assert info.value.data["actual"] == "paused"
    model.vm_start(test["id"])
    assert model.get(test["id"])["power_state"] == "Running"
    app = vm(model, "app-01")
    image = next(o for o in model.by_type("VDI") if o["VDI_type"] == "suspend")
    model.vm_start(app["id"])
    assert model.get(app["id"])["power_state"] == "Running"
    assert model.get(image["id"]) is None  # resuming consumes the suspend image
    assert consistency_problems(model.all_objects()) == []


def test_snapshot_creates_and_links_everything(model):
    web = vm(model, "web-01")
    model.flush_events()
    snap_id = model.vm_snapshot(web["id"], description="d")
    snap = model.get(snap_id)
    assert snap["type"] == "VM-snapshot" and snap["$snapshot_of"] == web["id"] and snap["name_description"] == "d"
    assert snap["name_label"].startswith("web-01_") and snap["name_label"].endswith("Z")
    assert snap_id in model.get(web["id"])["snapshots"]
    assert "vulnerabilities" not in snap and "xenTools" not in snap and snap["power_state"] == "Halted"
    disks = model.vm_disks(snap_id)
    assert [vdi["type"] for _, vdi, _ in disks] == ["VDI-snapshot", "VDI-snapshot"]
    assert all(not vbd["attached"] for vbd, _, _ in disks)
    sources = model.vm_disks(web["id"])
    assert [vdi["$snapshot_of"] for _, vdi, _ in disks] == [vdi["id"] for _, vdi, _ in sources]
    assert disks[0][2].read(0, 4096) == sources[0][2].read(0, 4096)  # a snapshot reads what the disk held
    batches = model.flush_events()
    # no network: XO did not re-emit it for the new VIF (exports/vm-xva.running.web-01.with-ws.ws-frames.jsonl)
    assert summary(batches) == [("enter", sorted(
        ["task", "VDI", "VDI", "SR", "VDI-snapshot", "VDI-snapshot", "VBD", "VBD", "VBD", "VIF", "VM-snapshot",
         "VM"]))]
    assert consistency_problems(model.all_objects()) == []


def test_delete_vm_with_snapshots_and_disks(model):
    web = vm(model, "web-01")
    objects_before = set(model.all_objects())
    doomed = {web["id"], *web["$VBDs"], *web["VIFs"], *web["snapshots"]}
    for snap_id in web["snapshots"]:
        snap = model.get(snap_id)
        doomed |= {*snap["$VBDs"], *snap["VIFs"]}
        doomed |= {model.get(v)["VDI"] for v in snap["$VBDs"] if "VDI" in model.get(v)}
    doomed |= {vdi["id"] for _, vdi, _ in model.vm_disks(web["id"])}
    model.flush_events()
    model.vm_delete(web["id"])
    gone = objects_before - set(model.all_objects())
    assert gone == doomed
    exit_ = dict(model.flush_events())["exit"]
    assert set(exit_) == doomed and set(exit_.values()) == {0}
    assert consistency_problems(model.all_objects()) == []


def test_delete_keeps_disks_shared_with_another_vm(model):
    web, db = vm(model, "web-01"), vm(model, "db-01")
    (_, vdi, _), *_ = model.vm_disks(db["id"])
    vbd = {"type": "VBD", "attached": False, "bootable": False, "device": "xvdc", "is_cd_drive": False,
           "position": "2", "read_only": False, "VDI": vdi["id"], "VM": web["id"], **model_common(model)}
    model.add(vbd)
    model.update(web["id"], {"$VBDs": [*web["$VBDs"], vbd["id"]]})
    model.update(vdi["id"], {"$VBDs": [*vdi["$VBDs"], vbd["id"]]})
    model.vm_delete(db["id"])
    assert model.get(vdi["id"])["$VBDs"] == [vbd["id"]]


def model_common(model: SimModel) -> dict:
    oid, ref = model.new_ids()
    return {"id": oid, "uuid": oid, "$pool": model.pool_id, "$poolId": model.pool_id, "_xapiRef": ref}


def test_delete_refusals(model):
    web = vm(model, "web-01")
    model.vm_set(web["id"], blockedOperations={"destroy": True})
    with pytest.raises(SimError) as info:
        model.vm_delete(web["id"])
    assert info.value.to_json() == {
        "message": "forbidden operation: destroy is blocked: protected from accidental deletion", "code": 5,
        "data": {"operation": "destroy is blocked: protected from accidental deletion"}}
    assert info.value.http_status == 403
    template = next(o for o in model.by_type("VM-template") if o["isDefaultTemplate"])
    with pytest.raises(SimError) as info:
        model.vm_delete(template["id"])
    assert info.value.code == 25 and info.value.http_status == 409
    assert info.value.data == {"actual": True, "expected": False, "object": template["uuid"],
                               "property": "isDefaultTemplate"}
    model.vm_delete(web["id"], force=True)
    assert model.get(web["id"]) is None


def test_vdi_set_and_delete(model):
    web = vm(model, "web-01")
    (_, root, _), *_ = model.vm_disks(web["id"])
    with pytest.raises(SimError) as info:
        model.vdi_delete(root["id"])
    assert info.value.to_json() == {"message": "VDI in use", "code": 17,
                                    "data": {"objectId": root["id"], "operation": "destroy"}}
    with pytest.raises(SimError) as info:
        model.vdi_set(root["id"], size=1024)
    assert info.value.to_json() == {
        "message": f"cannot set new size (1024) below the current size ({root['size']})", "code": 10, "data": {}}
    sr_before = model.get(root["$SR"])
    model.vdi_set(root["id"], name_label="renamed", size="20G")
    assert model.get(root["id"])["size"] == 20 << 30
    assert model.get(root["$SR"])["usage"] == sr_before["usage"] + (20 << 30) - root["size"]
    spare = next(o for o in model.by_type("VDI") if o["name_label"] == "spare disk")
    model.flush_events()
    model.vdi_delete(spare["id"])
    batches = model.flush_events()
    # As recorded (`events/vdi-delete-del`): the SR whose VDIs changed enters, then the VDI exits.
    assert summary(batches) == [("enter", ["SR", "task"]), ("exit", [0])]
    assert batches[1][1] == {spare["id"]: 0}
    assert spare["id"] not in batches[0][1][spare["$SR"]]["VDIs"]
    assert consistency_problems(model.all_objects()) == []


def test_create_vdi_and_attach_a_file(model, tmp_path):
    sr = next(o for o in model.by_type("SR") if o["name_label"] == "nfs-vms")
    vdi = model.create_vdi(sr["id"], name_label="x", size=1 << 20)
    assert {k: vdi[k] for k in ("type", "VDI_type", "$VBDs", "usage", "name_description")} == {
        "type": "VDI", "VDI_type": "user", "$VBDs": [], "usage": 0, "name_description": ""}
    assert vdi["id"] in model.get(sr["id"])["VDIs"]
    assert model.disk(vdi["id"]).read(0, 512) == bytes(512)  # a new VDI is blank
    path = model.new_disk_path(vdi["id"])
    path.write_bytes(b"\1" * (1 << 20))
    model.attach_disk_file(vdi["id"], path)
    assert model.disk(vdi["id"]).read(0, 2) == b"\1\1"
    assert model.get(vdi["id"])["usage"] == 1 << 20
    model.vdi_delete(vdi["id"])
    assert not path.exists()  # no VDI uses the file any more


def test_vm_set_fields(model):
    web = vm(model, "web-01")
    model.vm_set(web["id"], name_label="w", name_description="d", tags=["a"], auto_poweron=True, CPUs=1)
    new = model.get(web["id"])
    assert (new["name_label"], new["name_description"], new["tags"], new["auto_poweron"]) == ("w", "d", ["a"], True)
    assert new["other"]["auto_poweron"] == "true" and new["CPUs"]["number"] == 1
    with pytest.raises(SimError) as info:
        model.vm_set(web["id"], memoryMax=1)
    assert info.value.code == 0


# -- events ------------------------------------------------------------------------------------------------

def test_events_are_deduplicated_per_tick(model):
    sr = next(o for o in model.by_type("SR") if o["name_label"] == "nfs-vms")
    model.flush_events()
    vdi = model.create_vdi(sr["id"], name_label="brief", size=1 << 20)
    model.vdi_delete(vdi["id"])  # added then removed within one tick: nothing about it
    batches = model.flush_events()
    assert all(vdi["id"] not in items for _, items in batches)
    web = vm(model, "web-01")
    model.vm_set(web["id"], name_label="a")
    model.vm_set(web["id"], name_label="b")
    assert model.flush_events() == [("enter", {web["id"]: model.get(web["id"])})]
    assert model.flush_events() == []


async def test_subscribers_get_one_enter_then_one_exit_per_tick(model):
    async with trio.open_nursery() as nursery:
        await nursery.start(model.run)
        events = model.subscribe()
        spare = next(o for o in model.by_type("VDI") if o["name_label"] == "spare disk")
        model.vdi_delete(spare["id"])
        with trio.fail_after(2):
            kind, items = await events.receive()
            assert kind == "enter" and {o["type"] for o in items.values()} == {"SR", "task"}
            kind, items = await events.receive()
            assert (kind, items) == ("exit", {spare["id"]: 0})
            # the finished task leaves a moment later
            kind, items = await events.receive()
            assert kind == "exit" and list(items.values()) == [0]
        await events.aclose()
        model.vm_set(vm(model, "web-01")["id"], name_label="x")  # a closed subscriber is simply dropped
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_churn_updates_running_vms(model):
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: model.run(churn=50, task_status=task_status))
        events = model.subscribe()
        seen = []
        with trio.move_on_after(1):
            async for kind, items in events:
                seen += [(kind, o["type"], o["power_state"]) for o in items.values()]
                if len(seen) >= 10:
                    break
        nursery.cancel_scope.cancel()
    assert len(seen) >= 10 and set(seen) == {("enter", "VM", "Running")}


# -- auth and tokens ---------------------------------------------------------------------------------------

def test_password_and_token_auth_with_throttling(model):
    user, token = model.authenticate({"email": "admin@admin.net", "password": "admin"})
    assert user["email"] == "admin@admin.net" and user["permission"] == "admin" and token is None
    with pytest.raises(SimError) as info:
        model.authenticate({"username": "admin@admin.net", "password": "wrong"})
    assert info.value.to_json() == {"message": "invalid credentials", "code": 3}
    with pytest.raises(TooFastError):  # within 2 s of a failure, even with the right password
        model.authenticate({"email": "admin@admin.net", "password": "admin"})
    with pytest.raises(ValueError, match="empty password"):
        model.authenticate({"email": "x", "password": ""})
    tok = model.create_token(user)
    assert model.authenticate({"token": tok}) == (user, tok)
    with pytest.raises(SimError):
        model.authenticate({"token": "nope"})
    model.expire_token(tok)
    assert model.user_for_token(tok) is None


def test_token_creation_rules(model):
    user = model.user
    a = model.create_token(user, client_id="c1", description="first")
    assert len(a) == 43 and set(a) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    record = model.token_record(a)
    assert record["client"] == {"id": "c1"} and record["expiration"] - record["created_at"] == 30 * 86400_000
    b = model.create_token(user, client_id="c1", description="again", expires_in="1 hour")
    assert b == a and model.token_record(a)["description"] == "again"
    assert model.create_token(user, client_id="c2") != a
    with pytest.raises(ValueError, match="invalid expiresIn duration: 1000"):
        model.create_token(user, expires_in=1000)
    with pytest.raises(ValueError, match="too high expiresIn duration: 1 year"):
        model.create_token(user, expires_in="1 year")


def test_cli_tokens():
    model = SimModel(seed=1, vms=1, tokens=["t" * 43])
    assert model.user_for_token("t" * 43) == model.user


def test_durations_and_sizes():
    assert parse_duration_ms("30 days") == 30 * 86400_000
    assert parse_duration_ms("0.5 year") == 0.5 * 365.25 * 86400_000
    assert parse_duration_ms("2h") == 7200_000 and parse_duration_ms(90_000) == 90_000
    with pytest.raises(TypeError):
        parse_duration_ms("soon")
    assert parse_size("10G") == 10 << 30 and parse_size(5) == 5 and parse_size("512 MiB") == 512 << 20


def test_downloads_are_one_shot(model):
    path = model.register_download(lambda: iter([b"a\n", b"b\n"]))
    assert path.startswith("/api/")
    assert b"".join(model.take_download(path)) == b"a\n b\n".replace(b" ", b"")
    assert model.take_download(path) is None


def test_vm_disks_and_generated_contents(model):
    db = vm(model, "db-01")
    disks = model.vm_disks(db["id"])
    assert [(vbd["device"], vdi["name_label"]) for vbd, vdi, _ in disks] == [("xvda", "db-01 root")]  # no CD
    content = disks[0][2]
    assert content.size == disks[0][1]["size"] and content.read(0, 512)[510:] == b"\x55\xaa"  # an MBR
    again = SimModel(seed=1, vms=12).disk(disks[0][1]["id"])
    assert again.read(0, 1 << 20) == content.read(0, 1 << 20)  # same seed, same bytes
    other = SimModel(seed=2, vms=12)
    ((_, _, other_content),) = other.vm_disks(vm(other, "db-01")["id"])
    assert other_content.read(1 << 20, 4096) != content.read(1 << 20, 4096)  # another seed, other bytes
