"""Hostile input: what a broken or malicious server can send, and paths that try to leave the tree.

- Listings with malformed JSON, wrong types, missing fields, huge strings, hostile names and ids, invalid
  UTF-8, duplicate ids, another collection's type (the simulator's `corrupt_listing` knob), and websocket
  frames of every wrong shape, events for unknown ids among them (`/_sim/websocket-frames`), on a real
  mount: it stays up, every real object is there, each bad one is skipped or shown safely, with one log
  line each.
- Hypothesis drives the JSON handling (`parse_collection`), the name mapping (`unique_names`) and the event
  handling (`ObjectCache.apply` then `Tree.on_changes`) with whatever it can make up.
- `..`, symbolic links and very long names: refused with the right errno; every link stays in the mount.

Already covered elsewhere (docs/reliability.md lists them): bad frames on a fake server
(`test_client_events.py`), garbage NDJSON lines and unusable listings (`test_client_rest.py`), malformed
objects in the cache (`test_tree.py`), the name mapping's own properties (`test_names.py`).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.hardening_support import all_frame, record, scaled, send_frames, set_faults, writable_sr
from tests.operate_support import documented
from tests.support import MountProcess, SimProcess, wait_for
from xofs.cache import KEPT_TYPES, ObjectCache
from xofs.client.rest import parse_collection
from xofs.errors import XoProtocolError
from xofs.names import NAME_MAX, unique_names
from xofs.sim.faults import CORRUPTIONS
from xofs.sim.rest_hostile import HOSTILE_IDS, HOSTILE_NAMES
from xofs.tree import ROOT_INODE, InvalidateEntry, InvalidateInode, Tree
from xofs.views import load_views

# scripts/reliability asks for more through $XOFS_RELIABILITY_FUZZ_EXAMPLES and ..._FUZZ_MACHINES.
FUZZ_EXAMPLES = int(scaled("fuzz_examples", 200))
MACHINE_RUNS, MACHINE_STEPS = int(scaled("fuzz_machines", 150)), 25
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_safe_name(name: str) -> None:
    """What every entry of the mount must be: a name the kernel, the shell and the tools take."""
    assert name not in ("", ".", "..") and "/" not in name and "\0" not in name, repr(name)
    assert len(name.encode("utf-8")) <= NAME_MAX, (len(name.encode()), name[:40])
    assert all(ord(c) >= 0x20 and ord(c) != 0x7F for c in name), repr(name)


def warnings_about(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and needle in line]


# ---- the simulator's knobs themselves --------------------------------------------------------------------

def test_corrupt_listing_is_checked_counted_and_scoped(fresh_sim):
    bad = fresh_sim.request("POST", "/_sim/faults", json.dumps({"corrupt_listing": "nonsense"}).encode(),
                            {"Content-Type": "application/json"})
    assert bad[0] == 400 and b"corrupt_listing" in bad[2]
    knobs = set_faults(fresh_sim, corrupt_listing={"kinds": ["duplicate_ids"], "collection": "srs", "count": 2})
    assert knobs["corrupt_listing"] == {"kinds": ["duplicate_ids"], "collection": "srs", "count": 2}
    plain = fresh_sim.get_json("/rest/v0/vms?fields=id")
    assert len({v["id"] for v in plain}) == len(plain), "another collection is left alone"
    for left in (1, None):
        srs = fresh_sim.get_json("/rest/v0/srs?fields=id,name_label")
        assert len({s["id"] for s in srs}) == len(srs) - 2
        assert (set_faults(fresh_sim)["corrupt_listing"] or {}).get("count") == left
    srs = fresh_sim.get_json("/rest/v0/srs?fields=id")
    assert len({s["id"] for s in srs}) == len(srs), "used up"


def test_reset_next_gets_drops_the_connection_after_the_headers(fresh_sim):
    set_faults(fresh_sim, reset_next_gets=1)
    with pytest.raises(Exception) as dropped:  # noqa: PT011 - urllib's IncompleteRead, whatever it wraps
        fresh_sim.request("GET", "/rest/v0/vms?fields=id")
    assert "IncompleteRead" in repr(dropped.value)
    assert fresh_sim.get_json("/rest/v0/vms?fields=id"), "used up after one"


# ---- hostile listings on a real mount --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_sim(tmp_path_factory):
    sim = SimProcess(args=["--seed", "1"], log_path=tmp_path_factory.mktemp("hostile") / "sim.log").start()
    yield sim
    sim.stop()


def reconnect(sim: SimProcess, mount: MountProcess) -> None:
    """Close the mount's event socket and wait until the feed is back (after its re-read of everything)."""
    live = mount.log_text().count(": live")
    assert sim.request("POST", "/_sim/close-websockets", b"")[0] == 204
    wait_for(lambda: mount.log_text().count(": live") > live, 30, "the feed and its re-read to come back")


def listing_warnings(log: str) -> list[str]:
    """Warnings about the mount's own load of /vms (`fields=*`), and about objects the cache refused."""
    return [line for line in log.splitlines() if " WARNING " in line
            and ("fields=%2A" in line or "malformed object" in line or "the wrong type" in line)]


# For each corruption of the VM listing: how many items it adds that cannot be used (each must be skipped
# with one log line), and names that must show safely in /by-name/vms.
EXPECTED_SKIPPED = {
    "not_json": 2, "wrong_types": 11, "missing_fields": 3, "huge_strings": 0, "hostile_names": 0,
    "hostile_ids": len(HOSTILE_IDS), "invalid_utf8": 1, "duplicate_ids": 2, "wrong_type_for_collection": 2,
}


@pytest.mark.parametrize("kind", [k for k in CORRUPTIONS if k != "garbage"])
def test_a_hostile_vm_listing_leaves_the_mount_up_and_the_real_objects_there(hostile_sim, make_mount, kind):
    """The mount re-reads every collection after its event feed reconnects; this time /vms is hostile."""
    mount = make_mount(hostile_sim)
    vms = {v["id"]: v["name_label"] for v in hostile_sim.get_json("/rest/v0/vms?fields=id,name_label")}
    log_before = len(mount.log_text())
    set_faults(hostile_sim, corrupt_listing={"kinds": [kind], "collection": "vms", "count": None})
    try:
        reconnect(hostile_sim, mount)
    finally:
        set_faults(hostile_sim, corrupt_listing=None)
    listed = os.listdir(mount / "vms")
    for name in listed + os.listdir(mount / "by-name" / "vms"):
        check_safe_name(name)
    assert set(vms) <= set(listed), "a real VM is missing"
    for vm_id, label in vms.items():
        assert json.loads((mount / "vms" / vm_id / "meta.json").read_bytes())["name_label"] == label
    assert subprocess.run(["find", str(mount.mountpoint)], capture_output=True).returncode == 0
    assert subprocess.run(["ls", "-lR", str(mount.mountpoint)], capture_output=True).returncode == 0
    skipped = listing_warnings(mount.log_text()[log_before:])
    assert len(skipped) == EXPECTED_SKIPPED[kind], "\n".join(skipped)
    undocumented = [line for line in mount.log_text().splitlines() if " WARNING " in line and not documented(line)]
    assert undocumented == [], "not in docs/troubleshooting.md:\n" + "\n".join(undocumented)
    shown = {d for d in listed if "." not in d} - set(vms)
    if kind == "hostile_names":
        assert len(shown) == len(HOSTILE_NAMES), "each hostile name is shown, safely"
        links = os.listdir(mount / "by-name" / "vms")
        assert {"a／b／..／..／etc／passwd", "．.", "．", "nul␀byte", "line␊break", "unnamed"} <= set(links)
        for link in links:
            target = os.readlink(mount / "by-name" / "vms" / link)
            assert target.startswith("../../vms/") and target.count("/") == 3
    if kind == "huge_strings":
        assert len(shown) == 3
        long_name = next(n for n in os.listdir(mount / "by-name" / "vms") if n.startswith("HHHH"))
        assert len(long_name.encode()) <= NAME_MAX
    record("hostile input", f"VM listing: {kind}", skipped=len(skipped), shown_safely=len(shown), mount_up=True)


def test_a_listing_that_is_all_garbage_fails_loudly_and_the_mount_recovers(hostile_sim, make_mount):
    """Nothing usable at all is an error, not an empty /vms: the start fails, a resync is retried."""
    set_faults(hostile_sim, corrupt_listing={"kinds": ["garbage"], "collection": "vms", "count": None})
    try:
        with pytest.raises(RuntimeError, match="none of the"):
            make_mount(hostile_sim)
    finally:
        set_faults(hostile_sim, corrupt_listing=None)
    mount = make_mount(hostile_sim)
    before = len(os.listdir(mount / "vms"))
    set_faults(hostile_sim, corrupt_listing={"kinds": ["garbage"], "collection": "vms", "count": 2})
    reconnect(hostile_sim, mount)
    assert "none of the" in mount.log_text(), "the garbage re-read failed, and said so"
    assert len(os.listdir(mount / "vms")) == before, "a failed re-read changes nothing"
    assert set_faults(hostile_sim)["corrupt_listing"] is None


# ---- hostile frames on the websocket ---------------------------------------------------------------------

def test_hostile_websocket_frames_leave_the_feed_up_and_are_logged_once_each(hostile_sim, make_mount):
    mount = make_mount(hostile_sim, "--attr-ttl", "300")
    vm = hostile_sim.get_json("/rest/v0/vms?fields=id,name_label,$VBDs")[0]
    ghost_vm, ghost_vbd = str(uuid.uuid4()), str(uuid.uuid4())
    frames = [
        "this is not JSON",
        "[1, 2, 3]",
        json.dumps({"jsonrpc": "2.0", "method": "all", "params": "not an object"}),
        json.dumps({"jsonrpc": "2.0", "id": 999999, "result": True}),  # an answer to nothing
        all_frame("exit", {"no-such-object": 0, str(uuid.uuid4()): 0}),  # unknown ids: nothing to do
        all_frame("enter", {"banana-1": {"id": "banana-1", "type": "banana"}}),  # a type nobody shows
        all_frame("enter", {vm["id"]: "not an object"}),
        all_frame("enter", {"key": {"id": "another-id", "type": "VM"}}),
        all_frame("enter", {"../x": {"id": "../x", "type": "VM", "name_label": "escape"}}),
        all_frame("enter", {"z" * 3000: {"id": "z" * 3000, "type": "VM", "name_label": "long id"}}),
        all_frame("enter", {ghost_vbd: {"id": ghost_vbd, "type": "VBD", "VM": "no-such-vm", "VDI": "no-such-vdi",
                                        "is_cd_drive": False}}),
        all_frame("enter", {ghost_vm: {"id": ghost_vm, "type": "VM", "name_label": "ghost/../vm",
                                       "$VBDs": [ghost_vbd, "no-such-vbd"], "power_state": "Halted"}}),
        all_frame("enter", {str(uuid.uuid4()): {"type": "VM", "name_label": "no id"}}),
    ]
    bad_vbds = str(uuid.uuid4())
    frames.append(all_frame("enter", {bad_vbds: {"id": bad_vbds, "type": "VM", "name_label": "bad-vbds",
                                                 "$VBDs": 5}}))
    assert send_frames(hostile_sim, frames) >= 1
    wait_for(lambda: (mount / "vms" / ghost_vm).exists(), 10, "the ghost VM the frames made up")
    log = mount.log_text()
    assert "event feed lost" not in log, "garbage on the socket must not drop the session"
    expected = {"frame that is not JSON": 1, "frame that is not an object": 1, "unexpected shape": 1,
                "unexpected frame": 1, "skipping entered item": 1, "malformed object in an XO event": 5}
    for needle, count in expected.items():
        assert len(warnings_about(log, needle)) == count, (needle, warnings_about(log, needle))
    assert len(warnings_about(log, "")) == sum(expected.values()), "one line per bad frame or item, no more"
    undocumented = [line for line in log.splitlines() if " WARNING " in line and not documented(line)]
    assert undocumented == [], "not in docs/troubleshooting.md:\n" + "\n".join(undocumented)
    # What was made up is shown safely: the ghost VM lists, its dangling disk references give no links.
    assert os.listdir(mount / "vms" / ghost_vm / "vdis") == []
    assert "ghost／..／vm" in os.listdir(mount / "by-name" / "vms")
    assert not (mount / "vms" / bad_vbds).exists()
    assert json.loads((mount / "vms" / vm["id"] / "meta.json").read_bytes())["name_label"] == vm["name_label"]
    for name in os.listdir(mount / "vms"):
        check_safe_name(name)
    # And the feed still works: a real change arrives.
    status, _, _ = hostile_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}", b'{"nameLabel": "after-frames"}',
                                       {"Content-Type": "application/json"})
    assert status == 204
    wait_for(lambda: "after-frames" in os.listdir(mount / "by-name" / "vms"), 10, "a real event after the garbage")
    hostile_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}", json.dumps({"nameLabel": vm["name_label"]}).encode(),
                        {"Content-Type": "application/json"})
    record("hostile input", "websocket frames", frames=len(frames), feed_dropped=False, mount_up=True)


# ---- paths that try to escape ----------------------------------------------------------------------------

def test_paths_that_try_to_escape_are_refused_with_the_right_errno(hostile_sim, make_mount, tmp_path):
    set_faults(hostile_sim, corrupt_listing={"kinds": ["hostile_names"], "collection": None, "count": None})
    try:
        mount = make_mount(hostile_sim)
    finally:
        set_faults(hostile_sim, corrupt_listing=None)
    root = mount.mountpoint
    sr = writable_sr(hostile_sim)
    imports = root / "srs" / sr / "import"

    def errno_of(call) -> int:
        with pytest.raises(OSError) as err:
            call()
        return err.value.errno

    long_name = "x" * 252 + ".raw"  # 256 bytes
    assert errno_of(lambda: os.stat(root / "vms" / ("y" * 256))) == errno.ENAMETOOLONG
    assert errno_of(lambda: open(imports / long_name, "wb")) == errno.ENAMETOOLONG
    (tmp_path / "a.raw").write_bytes(b"\0" * 4096)
    assert errno_of(lambda: os.rename(imports / "../../../vms", imports / "x")) in (errno.EPERM, errno.EXDEV)
    assert errno_of(lambda: open(imports / ".." / "escape.raw", "wb")) == errno.EPERM
    assert errno_of(lambda: os.symlink("/etc/passwd", imports / "link.raw")) == errno.EPERM
    assert errno_of(lambda: os.symlink("../../..", root / "vms" / "loop")) == errno.EPERM
    assert errno_of(lambda: os.link(root / "vms", imports / "hard.raw")) in (errno.EPERM, errno.EISDIR)
    assert errno_of(lambda: os.stat("/".join([str(root)] + ["vms", ".."] * 1100))) == errno.ENAMETOOLONG
    assert os.listdir(imports) == []
    # Every link in the tree, hostile names included, points at an entry inside the mount.
    links = subprocess.run(["find", str(root), "-type", "l"], capture_output=True, text=True, check=True)
    count = 0
    for line in links.stdout.splitlines():
        link = Path(line)
        target = os.path.normpath(os.path.join(link.parent, os.readlink(link)))
        assert target.startswith(str(root) + "/"), (link, target)
        assert os.path.lexists(target), (link, target)
        count += 1
    assert count > 20
    follow = subprocess.run(["find", "-L", str(root)], capture_output=True, text=True)
    assert follow.returncode == 0 and "loop" not in follow.stderr, follow.stderr[-500:]
    record("hostile input", "escaping paths", links_checked=count, escaped=0)


# ---- hypothesis: the JSON handling -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
good_items = st.fixed_dictionaries(
    {"id": st.uuids().map(str), "type": st.sampled_from(sorted(KEPT_TYPES)),
     "name_label": st.text(max_size=30), "href": st.just("/rest/v0/x/y")},
    optional={"size": st.integers(min_value=0, max_value=2**53), "tags": st.lists(st.text(max_size=5), max_size=3)})
bad_items = json_values | st.fixed_dictionaries(
    {"id": json_values, "type": json_values, "name_label": json_values, "size": json_values})
junk_lines = st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b)


def check_parsed(items: list) -> None:
    ids = [i["id"] for i in items]
    assert len(ids) == len(set(ids))
    for item in items:
        assert isinstance(item, dict) and isinstance(item["id"], str) and item["id"]
        assert "href" not in item


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["application/x-ndjson", "application/json; charset=utf-8", ""]))
def test_fuzz_parse_collection_takes_any_bytes(body, ctype):
    try:
        check_parsed(parse_collection(body, ctype, what="fuzz"))
    except XoProtocolError:
        pass


@FUZZ
@given(st.lists(st.one_of(good_items.map(lambda i: ("good", i)), bad_items.map(lambda i: ("bad", i)),
                          junk_lines.map(lambda b: ("junk", b))), max_size=12))
def test_fuzz_parse_collection_keeps_every_good_item_and_only_them(entries):
    lines = []
    for kind, value in entries:
        lines.append(value if kind == "junk" else json.dumps(value).encode())
    body = b"\n".join(lines) + b"\n"
    try:
        items = parse_collection(body, "application/x-ndjson", what="fuzz")
    except XoProtocolError:
        items = []
    check_parsed(items)
    seen: set[str] = set()
    wanted = []
    for kind, value in entries:
        if kind == "good" and value["id"] not in seen:
            seen.add(value["id"])
            wanted.append(value["id"])
    got = [i["id"] for i in items]
    assert [i for i in got if i in seen] == wanted, "a good item was dropped or reordered"


# ---- hypothesis: the name mapping ------------------------------------------------------------------------

any_label = st.one_of(st.text(max_size=300), st.sampled_from(HOSTILE_NAMES), json_values)


@FUZZ
@given(st.lists(st.tuples(st.uuids().map(str), any_label), max_size=25, unique_by=lambda t: t[0]),
       st.sampled_from(["", ".vhd", ".xva.zst"]))
def test_fuzz_names_of_any_label_type_are_safe_and_unique(items, extension):
    names = unique_names(items, extension)
    assert len(set(names.values())) == len(items)
    for name in names.values():
        check_safe_name(name)
        name.encode("utf-8")


# ---- hypothesis: the event handling, cache and tree together ---------------------------------------------

ID_POOL = [str(uuid.UUID(int=n)) for n in range(1, 9)]
ids = st.sampled_from(ID_POOL) | st.sampled_from(HOSTILE_IDS[:6]) | st.text(max_size=5)
refs = st.lists(st.sampled_from(ID_POOL) | json_values, max_size=3) | json_values
objects = st.fixed_dictionaries(
    {"id": ids, "type": st.sampled_from([*sorted(KEPT_TYPES), "task", "banana"]) | json_values},
    optional={"name_label": any_label, "$VBDs": refs, "VDIs": refs, "VDI": st.sampled_from(ID_POOL) | json_values,
              "VM": st.sampled_from(ID_POOL), "size": st.integers(min_value=0, max_value=1 << 40) | json_values,
              "$SR": st.sampled_from(ID_POOL), "is_cd_drive": st.booleans(), "content_type": st.just("user"),
              "power_state": st.sampled_from(["Running", "Halted"]) | json_values,
              "memory": json_values, "tags": json_values})


class CacheAndTree(RuleBasedStateMachine):
    """Events of any shape into the cache, its changes into the tree, with lookups like a kernel's."""

    @initialize()
    def start(self) -> None:
        self.cache = ObjectCache()
        self.tree = Tree(self.cache, load_views())
        self.tree.on_changes(self.cache.replace_all([]))

    def _apply(self, changes) -> None:
        for inv in self.tree.on_changes(changes):
            if isinstance(inv, InvalidateEntry):
                assert inv.parent in self.tree.inodes, "an invalidation names a directory the kernel never saw"
                check_safe_name(inv.name)
            else:
                assert isinstance(inv, InvalidateInode) and inv.ino in self.tree.inodes

    @rule(items=st.dictionaries(ids, objects | json_values, max_size=4))
    def enter(self, items) -> None:
        self._apply(self.cache.apply("enter", items))

    @rule(gone=st.dictionaries(ids, st.just(0) | json_values, max_size=3))
    def exit(self, gone) -> None:
        self._apply(self.cache.apply("exit", gone))

    @rule(everything=st.lists(objects | json_values, max_size=6))
    def resync(self, everything) -> None:
        self._apply(self.cache.replace_all(everything))

    @rule(kind=json_values, items=json_values)
    def nonsense(self, kind, items) -> None:
        self._apply(self.cache.apply(kind, items))

    @rule(depth=st.integers(min_value=1, max_value=4), pick=st.integers(min_value=0))
    def look_around(self, depth, pick) -> None:
        """A kernel walking down the tree: lookups (which make inodes) and listings."""
        ino, path = ROOT_INODE, ()
        for _ in range(depth):
            children = self.tree.children(path)
            if not children:
                return
            names = sorted(children)
            name = names[pick % len(names)]
            inode = self.tree.lookup(ino, name)
            if inode is None:
                return
            ino, path = inode.ino, (*path, name)

    @invariant()
    def every_listing_is_safe_and_matches_the_cache(self) -> None:
        if not hasattr(self, "tree"):
            return
        for view in ("vms", "vdis", "srs", "by-name"):
            for name in self.tree.children((view,)) or {}:
                check_safe_name(name)
        vms = set(self.cache.of_type("VM"))
        assert {n for n in self.tree.children(("vms",)) or {} if "." not in n} == vms
        for obj in self.cache:
            assert isinstance(obj.get("$VBDs", []), list) and isinstance(obj.get("VDIs", []), list)
        for vm_id in vms:
            for name in self.tree.children(("vms", vm_id, "vdis")) or {}:
                check_safe_name(name)


TestCacheAndTree = CacheAndTree.TestCase
TestCacheAndTree.settings = settings(max_examples=MACHINE_RUNS, stateful_step_count=MACHINE_STEPS, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])

