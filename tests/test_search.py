"""/search/<expression>/: XO's filter language as directories, on real mounts of the simulator.

The mount tests compare with XO's own answer for the same expression (the simulator's REST `?filter=`),
so the local matcher and XO's can never drift apart unnoticed; the first tests call the view directly on
objects recorded from a real xo-server, to pin what each listing depends on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.support import MountProcess, SimProcess, missing, wait_for
from xofs.budget import CpuBudget, OverBudget
from xofs.cache import ObjectCache
from xofs.matcher import MatcherSyntaxError, parse
from xofs.names import unique_names
from xofs.views import Dir, Link, ViewContext, search
from xofs.views.search import SearchView, read_saved_searches, saved_searches_file, watched_fields

RECORDED = Path("/work/shared/reference/real-xo/rest")
# The collections /search shows, and the one it leaves out.
SHOWN = ["vms", "vm-snapshots", "vdis", "vdi-snapshots", "srs", "hosts", "pools"]
ALL_COLLECTIONS = [*SHOWN, "vbds"]


def recorded_objects() -> list[dict]:
    objects = []
    for coll in ALL_COLLECTIONS:
        for obj in json.loads((RECORDED / f"{coll}.fields-star.body").read_text()):
            obj.pop("href", None)
            objects.append(obj)
    return objects


def recorded_cache(objects: list[dict] | None = None) -> ObjectCache:
    cache = ObjectCache()
    cache.replace_all(recorded_objects() if objects is None else objects)
    return cache



def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (cmd, proc.returncode, proc.stderr)
    return proc.stdout


def xo_filter(sim: SimProcess, expression: str, fields: str = "id") -> list[dict]:
    """What XO answers for `filter=expression`, over every collection /search shows."""
    query = urllib.parse.urlencode({"filter": expression, "fields": fields})
    found = []
    for coll in SHOWN:
        for obj in sim.get_json(f"/rest/v0/{coll}?{query}"):
            found.append({**obj, "collection": coll})
    return found


def search_dir(mount: MountProcess, expression: str) -> Path:
    return mount.mountpoint / "search" / expression.replace("/", "／")


def linked(directory: Path) -> dict[str, str]:
    """Entry name -> link target of a search directory."""
    return {name: os.readlink(directory / name) for name in os.listdir(directory)}


# ---- the view on recorded objects ---------------------------------------------------------------

def test_results_link_to_every_matching_object_but_vbds_named_like_by_name():
    cache = recorded_cache()
    view = SearchView()
    entries = view.children(ViewContext(cache), ("type:VDI",))
    vdis = {**cache.of_type("VDI"), **cache.of_type("VDI-snapshot")}
    assert vdis and len(entries) == len(vdis)
    names = unique_names((obj_id, vdi.get("name_label")) for obj_id, vdi in vdis.items())
    views = {"VDI": "vdis", "VDI-snapshot": "vdi-snapshots"}
    assert entries == {name: Link(f"../../{views[vdis[obj_id]['type']]}/{obj_id}", obj_id)
                       for obj_id, name in names.items()}
    # The cache keeps VBDs, but /search never shows them.
    assert cache.of_type("VBD") and view.children(ViewContext(cache), ("type:VBD",)) == {}


def test_a_property_expression_depends_on_its_fields_a_bare_term_on_everything():
    cache = recorded_cache()
    view = SearchView()
    ctx = ViewContext(cache)
    view.children(ctx, ("power_state:Running !|(tags? $pool:x)",))
    shown = {"VM", "VM-snapshot", "VDI", "VDI-snapshot", "SR", "host", "pool"}
    assert set(ctx.types) == shown
    assert all(fields == {"power_state", "tags", "$pool", "name_label"} for fields in ctx.types.values())
    assert not ctx.ids  # no per-object dependency: other fields may change at no cost

    ctx = ViewContext(cache)
    view.children(ctx, ("name_label:web running",))  # `running` searches every value
    assert ctx.ids == {obj_id for t in shown for obj_id in cache.of_type(t)}

    assert watched_fields(parse("CPUs:number:>2")) == {"CPUs"}
    assert watched_fields(parse("/x/")) is None and watched_fields(parse("!>3")) is None


def test_a_syntax_error_is_no_directory_and_one_log_line(caplog):
    cache = recorded_cache()
    view = SearchView()
    caplog.set_level(logging.WARNING, "xofs.views.search")
    for _ in range(3):
        assert view.lookup(ViewContext(cache), (), "name_label:(") is None
        assert view.children(ViewContext(cache), ("name_label:(",)) is None
    with pytest.raises(MatcherSyntaxError) as err:
        parse("name_label:(")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and err.value.message in lines[0] and "/search/name_label:(" in lines[0], lines
    assert view.lookup(ViewContext(cache), (), "name_label:／^web／") == Dir()
    assert view.lookup(ViewContext(cache), ("name_label:web",), "x") is None


def test_saved_searches_file_location_and_format(tmp_path, monkeypatch):
    monkeypatch.delenv("XOFS_SAVED_SEARCHES", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert saved_searches_file() == tmp_path / "config" / "xofs" / "searches"
    assert read_saved_searches(saved_searches_file()) == []  # no file: no saved searches, no complaint
    saved = tmp_path / "config" / "xofs" / "searches"
    saved.parent.mkdir(parents=True)
    saved.write_text("# mine\n\n  power_state:Running  \n   # indented comment\nname_label:/^web/\n")
    assert read_saved_searches(saved_searches_file()) == ["power_state:Running", "name_label:/^web/"]
    monkeypatch.setenv("XOFS_SAVED_SEARCHES", str(tmp_path / "elsewhere"))
    assert saved_searches_file() == tmp_path / "elsewhere"


# ---- real mounts ----------------------------------------------------------------------------------

# Expressions through XO's filter and through /search must select the same objects. Each kind the
# grammar has is here: words, quoted values, regexes, globs, numbers, comparisons, negation, `|( )`,
# `prop?`, nested properties and `$`-properties.
AGREEMENT = [
    "web",
    "WEB-01",
    "type:VM power_state:running",
    "name_label:/^web/",
    "name_label:/DB/i",
    "name_label:/-0[12] r/",
    "name_label:*-01",
    "name_label:web*root",
    'name_label:"web-01 root"',
    '"Local storage"',
    'tags:"env=prod"',
    "CPUs:number:2",
    "memory:size:8589934592",
    "size:>10737418240",
    "size:<=2147483648",
    "size:>=1e10 !type:VDI-snapshot",
    "!power_state:Running",
    "|(name_label:web name_label:db)",
    "|(name_label:mail (type:VDI size:<4e9))",
    "snapshots?",
    "!name_description?",
    "$snapshot_of?",
    "tags:length:0 type:VM",
    "other:base_template_name:debian",
    "4294967296",
]


def test_search_agrees_with_xo_filter(sim, make_mount):
    mount = make_mount(sim)
    srs = sim.get_json("/rest/v0/srs?fields=id,VDIs,$pool")
    sr = max(srs, key=lambda s: len(s["VDIs"]))
    expressions = [*AGREEMENT, f"$SR:{sr['id']}", f"$pool:{sr['$pool']} type:SR"]
    everything = {obj["id"] for coll in SHOWN for obj in sim.get_json(f"/rest/v0/{coll}?fields=id")}
    for expression in expressions:
        expected = {obj["id"] for obj in xo_filter(sim, expression)}
        got = {target.rsplit("/", 1)[1] for target in linked(search_dir(mount, expression)).values()}
        assert got == expected, expression
        assert expected and expected != everything, f"{expression!r} selects nothing or everything"


def test_ls_readlink_and_find_on_a_search_directory(sim, make_mount, tmp_path):
    mount = make_mount(sim, env={"XOFS_SAVED_SEARCHES": str(tmp_path / "no-such-file")})
    expression = "type:VM power_state:running"
    directory = search_dir(mount, expression)
    matches = xo_filter(sim, expression, "id,name_label")
    assert len(matches) > 1
    names = unique_names((vm["id"], vm["name_label"]) for vm in matches)
    collection = {obj["id"]: obj["collection"] for obj in matches}
    assert set(run("ls", str(directory)).splitlines()) == set(names.values())
    for obj_id, name in names.items():
        target = f"{collection[obj_id]}/{obj_id}"
        assert run("readlink", str(directory / name)).strip() == f"../../{target}"
        assert run("readlink", "-f", str(directory / name)).strip() == str(mount.mountpoint / target)
    found = run("find", "-L", str(directory), "-name", "meta.json").splitlines()
    assert sorted(found) == sorted(str(directory / name / "meta.json") for name in names.values())
    meta = json.loads((directory / names[matches[0]["id"]] / "meta.json").read_text())
    assert meta["id"] == matches[0]["id"] and meta["power_state"] == "Running"

    # `／` stands for `/`: a regex over names, and its result is what XO answers.
    regex = search_dir(mount, "name_label:/^web-01/")
    assert regex.name == "name_label:／^web-01／"
    web = {obj["id"] for obj in xo_filter(sim, "name_label:/^web-01/")}
    assert {t.rsplit("/", 1)[1] for t in linked(regex).values()} == web and len(web) >= 3  # the VM, its disks

    # Unsaved searches exist when looked up, but /search lists none of them.
    assert os.listdir(mount.mountpoint / "search") == []
    assert os.path.isdir(directory)


BACKTRACKING = "name_label:／^(a|a)+$／"  # exponential in Python's re (and in V8) against "aaa…a!"


def test_a_search_that_backtracks_is_stopped_and_becomes_no_directory(caplog, monkeypatch):
    monkeypatch.setattr(search, "SEARCH_BUDGET", 0.3)
    objects = recorded_objects()
    vm = next(obj for obj in objects if obj["type"] == "VM")
    cache = recorded_cache([*objects, {**vm, "id": "backtracking", "name_label": "a" * 40 + "!"}])
    view = SearchView()
    caplog.set_level(logging.WARNING, "xofs.views.search")
    assert view.lookup(ViewContext(cache), (), BACKTRACKING) == Dir()
    started = time.process_time()
    assert view.children(ViewContext(cache), (BACKTRACKING,)) is None
    assert time.process_time() - started < 3  # 2**40 steps otherwise
    assert view.lookup(ViewContext(cache), (), BACKTRACKING) is None
    assert view.children(ViewContext(cache), (BACKTRACKING,)) is None  # not tried again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"/search/{BACKTRACKING}" in lines[0] and "0.3 s of CPU" in lines[0], lines
    # Other searches keep working, each with its own budget.
    assert view.children(ViewContext(cache), (f"name_label:{vm['name_label']}",))


def test_a_cpu_budget_ends_a_regex_and_leaves_other_timers_alone():
    before = signal.getsignal(signal.SIGVTALRM)
    signal.setitimer(signal.ITIMER_REAL, 100)  # as pytest-timeout's own timer
    try:
        with CpuBudget(0.2) as budget:
            assert budget.run(re.fullmatch, r"(a|a)+", "aa") is not None
            with pytest.raises(OverBudget):
                budget.run(re.search, r"^(a|a)+$", "a" * 40 + "!")
            with pytest.raises(OverBudget):  # spent: every later run fails at once
                budget.run(len, "x")
        assert 99 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    assert signal.getsignal(signal.SIGVTALRM) == before
    assert signal.getitimer(signal.ITIMER_VIRTUAL) == (0.0, 0.0)


def test_a_search_that_backtracks_costs_its_directory_not_the_mount(fresh_sim, make_mount):
    mount = make_mount(fresh_sim)
    vms = fresh_sim.get_json("/rest/v0/vms?fields=id,name_label")
    status, _, body = fresh_sim.request("PATCH", f"/rest/v0/vms/{vms[0]['id']}",
                                        json.dumps({"nameLabel": "a" * 40 + "!"}).encode(),
                                        {"Content-Type": "application/json"})
    assert status == 204, body
    wait_for(lambda: os.path.lexists(mount.mountpoint / "by-name" / "vms" / ("a" * 40 + "!")),
             what="the rename to show")
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        os.listdir(mount.mountpoint / "search" / BACKTRACKING)
    assert time.monotonic() - started < 30
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):  # not tried again
        os.listdir(mount.mountpoint / "search" / BACKTRACKING)
    assert time.monotonic() - started < 1
    lines = [line for line in mount.log_text().splitlines() if f"/search/{BACKTRACKING}" in line]
    assert len(lines) == 1 and "of CPU" in lines[0], lines
    # The mount goes on answering, and a later rename is not held up by the search.
    fresh_sim.request("PATCH", f"/rest/v0/vms/{vms[1]['id']}", json.dumps({"nameLabel": "okapi"}).encode(),
                      {"Content-Type": "application/json"})
    wait_for(lambda: os.path.lexists(mount.mountpoint / "by-name" / "vms" / "okapi"), timeout=5,
             what="a later rename to show at once")


def test_a_rename_in_xo_moves_a_vm_in_and_out_of_search_directories(fresh_sim, make_mount):
    # Kernel caches last 300 s: only the event-driven invalidation can make the change visible.
    mount = make_mount(fresh_sim, "--attr-ttl", "300")
    vm = fresh_sim.get_json("/rest/v0/vms?fields=id,name_label&filter=power_state:Halted")[0]
    old = search_dir(mount, f'type:VM name_label:"{vm["name_label"]}"')
    new = search_dir(mount, "name_label:/^zebra-/")
    bare = search_dir(mount, "zebra")  # a bare term: depends on every field
    assert linked(old)[vm["name_label"]] == f"../../vms/{vm['id']}"
    assert os.listdir(new) == [] and os.listdir(bare) == []

    status, _, body = fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}",
                                        json.dumps({"nameLabel": "zebra-1"}).encode(),
                                        {"Content-Type": "application/json"})
    assert status == 204, body
    wait_for(lambda: os.listdir(new) == ["zebra-1"], what="the renamed VM to enter the search")
    assert os.readlink(new / "zebra-1") == f"../../vms/{vm['id']}"
    assert linked(bare) == {"zebra-1": f"../../vms/{vm['id']}"}
    assert vm["name_label"] not in os.listdir(old)
    wait_for(lambda: missing(old / vm["name_label"]), what="the kernel to drop the old name's entry")

    fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}", json.dumps({"nameLabel": "okapi"}).encode(),
                      {"Content-Type": "application/json"})
    wait_for(lambda: os.listdir(new) == [], what="the VM to leave the search")
    assert os.listdir(bare) == []
    wait_for(lambda: missing(new / "zebra-1"), what="the kernel to drop the entry that left the search")


def test_a_syntax_error_gives_enoent_and_one_log_line(sim, make_mount):
    mount = make_mount(sim)
    name = "name_label:(web"
    with pytest.raises(MatcherSyntaxError) as err:
        parse(name)
    status, _, body = sim.request("GET", "/rest/v0/vms?" + urllib.parse.urlencode({"filter": name}))
    assert status == 400 and err.value.message in body.decode(), body  # XO's own words
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            os.listdir(mount.mountpoint / "search" / name)
        with pytest.raises(OSError) as stat_err:
            os.stat(mount.mountpoint / "search" / name / "x")
        assert stat_err.value.errno == errno.ENOENT
    lines = [line for line in mount.log_text().splitlines() if f"/search/{name}" in line]
    assert len(lines) == 1 and err.value.message in lines[0], lines


def test_saved_searches_are_listed(sim, make_mount, tmp_path):
    saved = tmp_path / "searches"
    saved.write_text("# searches I use\ntype:VM power_state:running\n\nname_label:/^web/\n"
                     "name_label:(broken\n")
    mount = make_mount(sim, env={"XOFS_SAVED_SEARCHES": str(saved)})
    root = mount.mountpoint / "search"
    assert sorted(os.listdir(root)) == ["name_label:／^web／", "type:VM power_state:running"]
    running = {obj["id"] for obj in xo_filter(sim, "type:VM power_state:running")}
    assert {t.rsplit("/", 1)[1] for t in linked(root / "type:VM power_state:running").values()} == running
    assert "name_label:(broken" in mount.log_text()  # the broken line is said once, and left out


def test_a_kept_bare_term_search_does_not_hold_the_mount_behind_a_burst_of_renames(make_mount, tmp_path):
    """With 300 VMs a bare-term search costs its listing some 12 ms; listed again for every batch of a
    burst of renames (hundreds a second) it held the daemon tens of seconds behind XO in every view and
    the feed was taken for lost (helper 42). It is now listed again at most once per ten times its cost."""
    big = SimProcess(args=["--seed", "3", "--vms", "300", "--state-dir", str(tmp_path / "sim-state")],
                     log_path=tmp_path / "sim.log").start()
    try:
        mount = make_mount(big)
        vms = [vm["id"] for vm in big.get_json("/rest/v0/vms?fields=id")]
        batch = search_dir(mount, "batch")  # a bare term: its listing depends on every field of everything
        assert os.listdir(batch) == []
        with httpx.Client(base_url=big.url, cookies={"authenticationToken": big.token}, timeout=10) as xo:
            renamed, started = 0, time.monotonic()
            while time.monotonic() - started < 4:
                answer = xo.patch(f"/rest/v0/vms/{vms[renamed % len(vms)]}", json={"nameLabel": f"batch {renamed}"})
                assert answer.status_code == 204, answer.text
                renamed += 1
                if renamed % 50 == 0:
                    os.listdir(batch)  # kept in use, as a file browser showing it does
            assert renamed > 400, f"only {renamed} renames in 4 s: the burst is too slow to test anything"
            answer = xo.patch(f"/rest/v0/vms/{vms[0]}", json={"nameLabel": "the last rename"})
            assert answer.status_code == 204, answer.text
        ended = time.monotonic()
        wait_for(lambda: os.path.lexists(mount.mountpoint / "by-name" / "vms" / "the last rename"), timeout=30,
                 what="the last rename to show")
        behind = time.monotonic() - ended
        assert behind < 3, f"the mount showed the last rename {behind:.1f} s after XO made it ({renamed} before it)"
        last_names = {n % len(vms): f"batch {n}" for n in range(renamed)}
        expected = {name for index, name in last_names.items() if index != 0}
        wait_for(lambda: expected <= set(os.listdir(batch)), timeout=10, what="the search to catch up")
        assert "feed lost" not in mount.log_text()
    finally:
        big.stop()
