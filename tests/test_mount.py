"""A real kernel mount of the simulator: life cycle, live changes, and the tools people use on it."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from trio_websocket import open_websocket_url

from tests.operate_support import assert_documented
from tests.support import MountProcess, SimProcess, is_mounted, missing, require_tool, wait_for


def xofs(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xofs", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)




async def rpc(sim: SimProcess, method: str, params: dict | None = None):
    """One JSON-RPC call on a fresh signed-in websocket, the way xo-cli makes them."""
    async with open_websocket_url(sim.url.replace("http", "ws", 1) + "/api/") as ws:
        calls = [("session.signIn", {"token": sim.token}), (method, params or {})]
        result = None
        for n, (name, args) in enumerate(calls, 1):
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": n, "method": name, "params": args}))
            while True:
                msg = json.loads(await ws.get_message())
                if msg.get("id") == n:
                    break
            assert "error" not in msg, msg
            result = msg["result"]
        return result


# ---- life cycle -----------------------------------------------------------------------------------

def test_startup_errors_say_what_is_wrong_in_one_line(sim, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env_token = {"XOFS_TOKEN": sim.token}
    cases = [
        (["mount", sim.url, str(mnt), "--foreground"], {"XOFS_TOKEN": ""}, "no XO token"),
        (["mount", sim.url, str(tmp_path / "missing"), "--foreground"], env_token, "does not exist"),
        (["mount", sim.url, str(tmp_path / "file"), "--foreground"], env_token, "not a directory"),
        (["mount", "http://127.0.0.1:9", str(mnt), "--foreground"], env_token, "127.0.0.1:9"),
        (["mount", "http://127.0.0.1:abc", str(mnt), "--foreground"], env_token, "its port is no number from 0"),
        (["mount", "http://127.0.0.1:99999", str(mnt), "--foreground"], env_token, "its port is no number from 0"),
        (["mount", " " + sim.url, str(mnt), "--foreground"], env_token, "it has spaces around it"),  # helper 46
        (["mount", sim.url, str(mnt), "--foreground"], {"XOFS_TOKEN": "wrong-token"}, "401"),
        (["mount", sim.url, str(mnt)], {"XOFS_TOKEN": "wrong-token"}, "401"),
        # A flag's bad value: one line, not argparse's whole usage (helper 47); a gid past what the kernel
        # takes failed every stat of the mount.
        (["mount", sim.url, str(mnt), "--gid", "4294967296"], env_token, "--gid: 4294967296 is more than"),
        (["mount", sim.url, str(mnt), "--umask", "999"], env_token, "--umask"),
    ]
    (tmp_path / "file").write_text("x")
    for args, env, words in cases:
        proc = xofs(*args, env=env)
        assert proc.returncode != 0, (args, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], (args, proc.stderr)
        assert not is_mounted(mnt)


def test_what_the_daemon_writes_is_its_users_alone_and_its_directories_are_checked(sim, tmp_path):
    """The state directory, log, spools and import records came out 0755/0644 (the umask's): the log names
    the XO account, VMs and disks; and a --spool-dir or --state-dir that is a file took the daemon down
    (helper 47)."""
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    mnt.mkdir()
    env = {"XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(state)}
    proc = xofs("mount", sim.url, str(mnt), env=env)  # detached: it logs to <state dir>/xofs.log
    try:
        assert proc.returncode == 0, proc.stderr
        os.listdir(mnt / "vms")
        made = [state, state / "xofs.log", *state.rglob("*")]
        assert len(made) > 3 and {p.stat().st_mode & 0o077 for p in made} == {0}, \
            [(p, oct(p.stat().st_mode)) for p in made]
        (state / "xofs.log").rename(state / "xofs.log.1")  # logrotate: the daemon goes on in a new file
    finally:
        assert xofs("umount", str(mnt)).returncode == 0
    wait_for(lambda: "unmounted" in (state / "xofs.log").read_text() if (state / "xofs.log").exists() else False,
             what="the stop's line in the new log")
    (tmp_path / "a-file").write_text("x")
    env = {"XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state-refused")}
    for flag in ("--spool-dir", "--state-dir"):
        proc = xofs("mount", sim.url, str(mnt), "--foreground", flag, str(tmp_path / "a-file"), env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and lines == [f"xofs: {flag} {tmp_path / 'a-file'} is not a directory"], \
            proc.stderr
        assert_documented(lines[0])


def test_a_hung_xo_fails_the_start_after_one_read_timeout_saying_so(tmp_path):
    """A stopped XO (SIGSTOP: it takes connections, answers nothing) made `xofs mount` wait three read
    timeouts (3 minutes by default) and then blame the connection (helper 45)."""
    hung = SimProcess(args=["--seed", "1"], log_path=tmp_path / "sim.log").start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        hung.proc.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        proc = xofs("mount", hung.url, str(mnt), "--foreground", "--read-timeout", "1",
                    env={"XOFS_TOKEN": hung.token, "XOFS_STATE_DIR": str(tmp_path / "state")})
        took = time.monotonic() - began
    finally:
        hung.proc.send_signal(signal.SIGCONT)
        hung.stop()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "did not answer within 1 s (--read-timeout)" in lines[0], lines[0]
    assert_documented(lines[0])
    assert took < 8, f"the start took {took:.1f} s"
    assert not is_mounted(mnt)


def test_an_already_mounted_directory_is_refused(sim, make_mount):
    mount = make_mount(sim)
    proc = xofs("mount", sim.url, str(mount.mountpoint), "--foreground", env={"XOFS_TOKEN": sim.token})
    assert proc.returncode != 0 and "already a mount point" in proc.stderr


def test_fusermount_unmounts_and_the_daemon_exits_0(sim, make_mount):
    mount = make_mount(sim)
    subprocess.run(["fusermount3", "-u", str(mount.mountpoint)], check=True)
    assert mount.proc.wait(15) == 0
    assert not is_mounted(mount.mountpoint)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_unmount_cleanly(sim, make_mount, signum):
    mount = make_mount(sim)
    mount.proc.send_signal(signum)
    assert mount.proc.wait(15) == 0
    assert not is_mounted(mount.mountpoint)
    assert "unmounted" in mount.log_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_twice_in_a_row_is_still_a_clean_stop(sim, make_mount, signum):
    """Ctrl-C pressed twice, or a service manager that signals again: the second one lands while the
    daemon stops, or after; it exited with that signal (the default action) instead of 0."""
    for delay in (0.0, 0.01, 0.05):
        mount = make_mount(sim)
        mount.proc.send_signal(signum)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            mount.proc.send_signal(signum)
        assert mount.proc.wait(15) == 0, (delay, mount.log_text())
        assert not is_mounted(mount.mountpoint)


def test_a_sigterm_the_moment_the_mount_shows_unmounts_cleanly(sim, tmp_path):
    """No window between the mount appearing and the signal handlers: a service manager (or a script that
    waits for /proc/mounts) may send SIGTERM at once."""
    for n in range(3):
        mount = MountProcess(sim.url, tmp_path / f"mnt{n}", token=sim.token, log_path=tmp_path / f"mount{n}.log",
                             env={"XOFS_STATE_DIR": str(tmp_path / "state")}).spawn()
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mount.mountpoint):  # no sleep: signal the instant the kernel lists it
                assert mount.proc.poll() is None and time.monotonic() < deadline, mount.log_text()
            mount.proc.send_signal(signal.SIGTERM)
            assert mount.proc.wait(15) == 0, mount.log_text()
            assert not is_mounted(mount.mountpoint)
        finally:
            mount.stop()


def test_a_killed_daemon_leaves_no_dead_mount(sim, make_mount):
    mount = make_mount(sim)
    mount.proc.kill()
    mount.proc.wait(5)
    wait_for(lambda: not is_mounted(mount.mountpoint), 10, "auto_unmount to remove the mount")


def test_without_foreground_the_command_returns_once_the_mount_is_live(sim, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")}
    try:
        proc = xofs("mount", sim.url, str(mnt), env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and proc.stderr == ""
        assert is_mounted(mnt)
        assert "vms" in os.listdir(mnt)
        inside = subprocess.Popen(["sleep", "60"], cwd=mnt / "vms")
        try:
            busy = xofs("umount", str(mnt))
        finally:
            inside.kill()
            inside.wait()
        assert busy.returncode == 1 and busy.stderr.endswith(f"Device or resource busy (a program still has a file "
                                                             f"or its directory there: fuser -vm {mnt} lists them)\n")
        assert_documented(busy.stderr.strip())
        umount = xofs("umount", str(mnt))
        assert umount.returncode == 0, umount.stderr
        wait_for(lambda: not is_mounted(mnt), 10, "the unmount")
        assert "mounted" in (tmp_path / "state" / "xofs.log").read_text()
        again = xofs("umount", str(mnt))  # fusermount3 would say "Invalid argument"
        assert again.returncode == 1 and again.stderr == f"xofs umount: {mnt} is not an xofs mount\n"
        assert_documented(again.stderr.strip())
        missing = xofs("umount", str(tmp_path / "missing"))
        assert missing.returncode == 1 and missing.stderr == f"xofs umount: {tmp_path / 'missing'} does not exist\n"
        assert_documented(missing.stderr.strip())
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def test_a_mount_point_with_a_space_is_known_as_mounted(sim, tmp_path):
    """/proc/mounts writes the space as `\\040`: a second mount onto the same directory is refused, not
    stacked over the first, and `xofs umount` finds it."""
    mnt = tmp_path / "mount point"
    mnt.mkdir()
    env = {"XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")}
    try:
        assert xofs("mount", sim.url, str(mnt), env=env).returncode == 0
        assert is_mounted(mnt, "fuse.xofs")
        again = xofs("mount", sim.url, str(mnt), env=env)
        assert again.returncode != 0 and f"{mnt} is already a mount point" in again.stderr, again.stderr
        assert open("/proc/mounts").read().count("mount\\040point") == 1
        umount = xofs("umount", str(mnt))
        assert umount.returncode == 0, umount.stderr
        wait_for(lambda: not is_mounted(mnt), 10, "the unmount")
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def test_a_symbolic_link_to_the_mount_point_works_for_mount_status_and_umount(sim, tmp_path):
    """The link went to the kernel as it was: "fuse_session_mount failed"."""
    (tmp_path / "mnt").mkdir()
    (tmp_path / "link").symlink_to("mnt")
    env = {"XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")}
    try:
        proc = xofs("mount", sim.url, str(tmp_path / "link"), env=env)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(tmp_path / "mnt", "fuse.xofs") and is_mounted(tmp_path / "link", "fuse.xofs")
        status = xofs("status", "--json", str(tmp_path / "link"))
        assert status.returncode == 0 and str(tmp_path / "mnt") in status.stdout, status.stderr
        assert xofs("umount", str(tmp_path / "link")).returncode == 0
        wait_for(lambda: not is_mounted(tmp_path / "mnt"), 10, "the unmount")
    finally:
        subprocess.run(["fusermount3", "-uz", str(tmp_path / "mnt")], capture_output=True)


# ---- freshness ------------------------------------------------------------------------------------

def first_vm(sim: SimProcess, power_state: str = "Running") -> dict:
    vms = sim.get_json(f"/rest/v0/vms?fields=id,name_label,power_state&filter=power_state:{power_state}")
    return vms[0]


def meta(mount: MountProcess, path: str) -> dict:
    return json.loads((mount.mountpoint / path / "meta.json").read_bytes())


async def test_changes_in_xo_reach_the_mount_without_waiting_for_a_ttl(fresh_sim, make_mount):
    # Kernel caches last 300 s here: only the event-driven invalidation can make changes visible.
    mount = make_mount(fresh_sim, "--attr-ttl", "300")
    vm = first_vm(fresh_sim, "Halted")
    vm_dir = f"vms/{vm['id']}"
    by_name = mount.mountpoint / "by-name" / "vms"
    assert meta(mount, vm_dir)["name_label"] == vm["name_label"]
    assert vm["name_label"] in os.listdir(by_name)
    dir_mtime = os.stat(mount.mountpoint / vm_dir).st_mtime_ns
    # Directories standing for no object carry the time their names last changed, as on a disk.
    times = {d: os.stat(mount.mountpoint / d).st_mtime_ns for d in ("by-name/vms", "vms", "vm-snapshots", "vdis")}

    def moved(d: str) -> bool:
        return os.stat(mount.mountpoint / d).st_mtime_ns > times[d]

    # A rename through REST.
    status, _, body = fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}",
                                        json.dumps({"nameLabel": "renamed-1"}).encode(),
                                        {"Content-Type": "application/json"})
    assert status == 204, body
    wait_for(lambda: meta(mount, vm_dir)["name_label"] == "renamed-1", what="the REST rename in meta.json")
    wait_for(lambda: "renamed-1" in os.listdir(by_name), what="the new name in /by-name")
    assert vm["name_label"] not in os.listdir(by_name)
    assert os.readlink(by_name / "renamed-1") == f"../../vms/{vm['id']}"
    # The VM's directory carries the time of the change, like its meta.json (the kernel's copy too, once the
    # invalidation worker, a moment after the listings changed, dropped the old).
    wait_for(lambda: os.stat(mount.mountpoint / vm_dir).st_mtime_ns
             == os.stat(mount.mountpoint / vm_dir / "meta.json").st_mtime_ns > dir_mtime, what="the change's time")
    wait_for(lambda: moved("by-name/vms"), what="/by-name/vms to take the time of the rename")
    assert not moved("vms")  # its names are the VMs' ids

    # A rename and a power change through JSON-RPC.
    await rpc(fresh_sim, "vm.set", {"id": vm["id"], "name_label": "renamed-2"})
    wait_for(lambda: meta(mount, vm_dir)["name_label"] == "renamed-2", what="the JSON-RPC rename")
    await rpc(fresh_sim, "vm.start", {"id": vm["id"]})
    wait_for(lambda: meta(mount, vm_dir)["power_state"] == "Running", what="the power change")

    # A creation (a snapshot) and a deletion.
    snap_id = await rpc(fresh_sim, "vm.snapshot", {"id": vm["id"], "name": "snap-x"})
    wait_for(lambda: snap_id in os.listdir(mount.mountpoint / "vm-snapshots"), what="the new snapshot")
    wait_for(lambda: moved("vm-snapshots"), what="/vm-snapshots to take the time of the snapshot")
    vdi = fresh_sim.get_json("/rest/v0/vdis?fields=id,$VBDs&limit=50")
    spare = next(v for v in vdi if not v["$VBDs"]) if any(not v["$VBDs"] for v in vdi) else vdi[-1]
    assert (mount.mountpoint / "vdis" / spare["id"] / "meta.json").exists()
    status, _, body = fresh_sim.request("DELETE", f"/rest/v0/vdis/{spare['id']}")
    assert status == 204, body
    wait_for(lambda: not (mount.mountpoint / "vdis" / spare["id"]).exists(), what="the deleted VDI to vanish")
    wait_for(lambda: moved("vdis"), what="/vdis to take the time of the deletion")
    assert f"{spare['id']}.vhd" not in os.listdir(mount.mountpoint / "vdis")


def test_a_dropped_websocket_is_survived(fresh_sim, make_mount):
    mount = make_mount(fresh_sim, "--attr-ttl", "300")
    vm = first_vm(fresh_sim, "Halted")
    status, _, _ = fresh_sim.request("POST", "/_sim/close-websockets", b"")
    assert status in (200, 204)
    wait_for(lambda: "event feed lost" in mount.log_text(), what="the drop to be noticed")
    fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}", json.dumps({"nameLabel": "after-drop"}).encode(),
                      {"Content-Type": "application/json"})
    wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "after-drop", 10, "the rename after the drop")


def test_a_restarted_simulator_is_survived(tmp_path, make_mount):
    state = tmp_path / "sim-state"
    sim1 = SimProcess(args=["--seed", "3", "--state-dir", str(state)], log_path=tmp_path / "sim1.log").start()
    port = sim1.port
    try:
        mount = make_mount(sim1, "--attr-ttl", "300")
        vm = first_vm(sim1, "Halted")
        sim1.stop()
        wait_for(lambda: "event feed lost" in mount.log_text(), 10, "the loss of the server")
        # Listings keep answering from the cache while the server is away.
        assert vm["id"] in os.listdir(mount.mountpoint / "vms")
        sim2 = _start_on_port(SimProcess(args=["--seed", "3", "--state-dir", str(state)],
                                         log_path=tmp_path / "sim2.log"), port)
        try:
            sim2.request("PATCH", f"/rest/v0/vms/{vm['id']}", json.dumps({"nameLabel": "after-restart"}).encode(),
                         {"Content-Type": "application/json"})
            wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "after-restart", 30,
                     "the rename after the restart")
        finally:
            sim2.stop()
    finally:
        sim1.stop()


def _start_on_port(sim: SimProcess, port: int) -> SimProcess:
    """SimProcess.start always asks for port 0; a restart must come back on the same port."""
    cmd = [sys.executable, "-m", "xofs", "sim", "--port", str(port), "--token", sim.token, *sim.args]
    sim.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(sim.log_path, "ab"), text=True)
    line = sim.proc.stdout.readline()
    assert line.startswith("xofs sim listening on "), line
    sim.url = line.strip().rsplit(" ", 1)[1]
    return sim


# ---- tools ----------------------------------------------------------------------------------------

def run(*cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert proc.returncode == 0, (cmd, proc.returncode, proc.stderr)
    return proc.stdout


def test_everyday_tools_work_on_the_mount(sim, make_mount):
    for tool in ("getfattr", "tree", "gio"):
        require_tool(tool)
    mount = make_mount(sim)
    root = mount.mountpoint
    vm = first_vm(sim)
    vm_dir = root / "vms" / vm["id"]

    listing = run("ls", "-l", str(root / "vms"))
    assert vm["id"] in listing and f"{vm['id']}.xva" in listing
    assert run("stat", "-c", "%s %a %U", str(vm_dir / "meta.json")).split()[1] == "400"
    found = run("find", str(root), "-name", "meta.json").split()
    assert str(vm_dir / "meta.json") in found
    assert json.loads(run("cat", str(vm_dir / "meta.json")))["id"] == vm["id"]
    attrs = run("getfattr", "-d", str(vm_dir / "meta.json"))
    assert f'user.xo.id="{vm["id"]}"' in attrs and 'user.xo.type="VM"' in attrs
    name_link = root / "by-name" / "vms" / vm["name_label"]
    assert run("readlink", "-f", str(name_link)).strip() == str(vm_dir)
    assert "meta.json" in run("tree", str(root / "vms" / vm["id"]))
    assert "meta.json" in run("gio", "list", str(vm_dir))
    info = run("gio", "info", str(vm_dir / "meta.json"))
    assert "standard::size" in info and "xattr::xo.id" in info or "standard::type: 1" in info


def test_rsync_copies_extended_attributes_and_links(sim, make_mount, tmp_path):
    require_tool("rsync")
    mount = make_mount(sim)
    vm = first_vm(sim)
    copy = tmp_path / "copy"
    copy.mkdir()
    # -X copies the attributes of every file and directory, and asks for none a symlink cannot have.
    run("rsync", "-aX", f"{mount.mountpoint / 'by-name'}/", f"{copy / 'by-name'}/")
    run("rsync", "-aX", f"{mount.mountpoint / 'vms' / vm['id']}/", f"{copy / 'vm'}/")
    assert os.readlink(copy / "by-name" / "vms" / vm["name_label"]) == f"../../vms/{vm['id']}"
    # again: nothing to do (a link's mode, lrwx------ under the umask, was a change rsync cannot make)
    again = run("rsync", "-aXi", f"{mount.mountpoint / 'by-name'}/", f"{copy / 'by-name'}/")
    assert again == "", again
    assert os.getxattr(copy / "vm" / "meta.json", "user.xo.id") == vm["id"].encode()
    assert os.getxattr(copy / "vm", "user.xo.type") == b"VM"


def test_a_third_party_view_plugin_joins_the_tree(sim, make_mount, tmp_path):
    """The example plugin of docs/views.md, registered through a real `xofs.views` entry point."""
    site = tmp_path / "site"
    dist = site / "xofs_tags_view-0.1.0.dist-info"
    dist.mkdir(parents=True)
    example = Path(__file__).parent.parent / "examples" / "tags-view" / "xofs_tags_view.py"
    (site / "xofs_tags_view.py").write_text(example.read_text())
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: xofs-tags-view\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[xofs.views]\ntags = xofs_tags_view:TagsView\n")
    mount = make_mount(sim, env={"PYTHONPATH": str(site)})
    tagged = [vm for vm in sim.get_json("/rest/v0/vms?fields=id,name_label,tags") if vm["tags"]]
    assert tagged, "the simulator's inventory has tagged VMs"
    tag = tagged[0]["tags"][0]
    assert "tags" in os.listdir(mount.mountpoint)
    links = os.listdir(mount.mountpoint / "tags" / tag.replace("/", "／"))
    assert tagged[0]["name_label"] in links or any(name.startswith(tagged[0]["name_label"]) for name in links)


BUGGY_VIEW = """
from xofs.views import Dir


class Buggy:
    name = "buggy"

    def children(self, ctx, path):
        if ctx.get(VM_ID)["name_label"] == "breaks-the-view":
            return ["not", "a", "mapping"]
        return {"ok": Dir()} if path == () else {}
"""


async def test_a_view_plugin_that_breaks_on_an_event_leaves_the_mount_up(fresh_sim, make_mount, tmp_path):
    """The event that made the plugin's listing fail used to end the daemon: an exception out of the
    event feed. Now only its directory fails (EIO), with one log line; the rest goes on."""
    vm = first_vm(fresh_sim)
    site = tmp_path / "site"
    (site / "buggy-0.1.dist-info").mkdir(parents=True)
    (site / "buggy_view.py").write_text(BUGGY_VIEW.replace("VM_ID", repr(vm["id"])))
    (site / "buggy-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: buggy\nVersion: 0.1\n")
    (site / "buggy-0.1.dist-info" / "entry_points.txt").write_text("[xofs.views]\nbuggy = buggy_view:Buggy\n")
    mount = make_mount(fresh_sim, env={"PYTHONPATH": str(site)})
    assert os.listdir(mount.mountpoint / "buggy") == ["ok"]
    await rpc(fresh_sim, "vm.set", {"id": vm["id"], "name_label": "breaks-the-view"})
    wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "breaks-the-view", 10, "the rename")
    with pytest.raises(OSError) as failed:
        os.listdir(mount.mountpoint / "buggy")
    assert failed.value.errno == errno.EIO
    assert mount.proc.poll() is None and is_mounted(mount.mountpoint)
    log = mount.log_text()
    assert log.count("ERROR xofs.tree: view /buggy failed to list /buggy") == 1, log
    assert "TypeError: children() answered a list, not a mapping of names to nodes" in log
    await rpc(fresh_sim, "vm.set", {"id": vm["id"], "name_label": "fine-again"})
    wait_for(lambda: os.path.isdir(mount.mountpoint / "buggy" / "ok"), 10, "the view to list again")


BAD_RENDER_VIEW = """
from xofs.views import File, Rendered, TypeSnapshot


class Notes:
    name = "notes"

    def children(self, ctx, path):
        vm = next(iter(ctx.of_type("VM")))
        return {"good.txt": File(Rendered(vm, lambda obj: obj["name_label"].encode())),
                "str.txt": File(Rendered(vm, lambda obj: obj["name_label"])),
                "raises.txt": File(Rendered(vm, lambda obj: obj["nme_label"]))}


class Summary:
    name = "summary.txt"
    node = File(TypeSnapshot("VM", lambda vms: 1 / 0))

    def children(self, ctx, path):
        return None
"""


def test_a_view_whose_render_function_is_broken_fails_its_files_only(sim, make_mount, tmp_path):
    """QA: `cat` of a file whose render function returned a str ended the daemon (pyfuse3 takes only
    bytes); one that raised failed `ls` of its directory, or of the mount's top for a file there."""
    site = tmp_path / "site"
    (site / "notes-0.1.dist-info").mkdir(parents=True)
    (site / "notes_view.py").write_text(BAD_RENDER_VIEW)
    (site / "notes-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: notes\nVersion: 0.1\n")
    (site / "notes-0.1.dist-info" / "entry_points.txt").write_text(
        "[xofs.views]\nnotes = notes_view:Notes\nsummary = notes_view:Summary\n")
    mount = make_mount(sim, env={"PYTHONPATH": str(site)})
    top = os.listdir(mount.mountpoint)
    assert "notes" in top and "vms" in top and "summary.txt" not in top
    assert os.listdir(mount.mountpoint / "notes") == ["good.txt"]
    for name in ("str.txt", "raises.txt"):
        result = subprocess.run(["cat", str(mount.mountpoint / "notes" / name)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode != 0 and "Input/output error" in result.stderr, result
    assert (mount.mountpoint / "notes" / "good.txt").read_bytes()
    assert mount.proc.poll() is None and is_mounted(mount.mountpoint)
    log = mount.log_text()
    assert "render function notes_view.Notes.children.<locals>.<lambda> returned str, not bytes" in log
    assert "raised KeyError: 'nme_label'" in log and "raised ZeroDivisionError: division by zero" in log


def test_listing_ten_thousand_vms_costs_a_constant_number_of_requests(tmp_path, make_mount):
    big = SimProcess(args=["--seed", "5", "--vms", "10000"], log_path=tmp_path / "big.log").start(timeout=60)
    try:
        mount = make_mount(big)
        before = big.get_json("/_sim/stats")["total"]
        entries = os.listdir(mount.mountpoint / "vms")
        assert len(entries) == 4 * 10000
        run("ls", "-l", str(mount.mountpoint / "vms"))
        found = run("find", str(mount.mountpoint / "by-name" / "vms")).count("\n")
        assert found == 10001
        after = big.get_json("/_sim/stats")["total"]
        # No request per entry: only the stats calls themselves.
        assert after - before <= 2, (before, after)
    finally:
        big.stop()


def test_refused_changes_log_both_paths_of_a_rename_and_the_attribute(sim, make_mount):
    mount = make_mount(sim)
    vm = first_vm(sim)
    sr = sim.get_json("/rest/v0/srs?fields=id&filter=content_type:user")[0]["id"]
    sr_dir = mount.mountpoint / "srs" / sr
    with pytest.raises(PermissionError):
        os.rename(sr_dir / "meta.json", sr_dir / "import" / "x.raw")
    with pytest.raises(PermissionError):
        os.setxattr(mount.mountpoint / "vms" / vm["id"], "user.xo.name_label", b"x")
    log = mount.log_text()
    assert (f"rename /srs/{sr}/meta.json -> /srs/{sr}/import/x.raw: only files in import directories can be "
            "renamed") in log, log
    assert f"setxattr /vms/{vm['id']} (attribute user.xo.name_label): " in log, log


def test_listings_start_with_dot_and_dot_dot(sim, make_mount):
    mount = make_mount(sim)
    vm = first_vm(sim)
    for directory, parent in ((mount.mountpoint, mount.mountpoint.parent),  # ls stats the root's `..`
                              (mount.mountpoint / "vms" / vm["id"], mount.mountpoint / "vms")):
        lines = run("ls", "-a1i", "--sort=none", str(directory)).splitlines()
        entries = [line.split(maxsplit=1) for line in lines]
        assert [name for _, name in entries[:2]] == [".", ".."], lines
        assert int(entries[0][0]) == os.stat(directory).st_ino
        assert int(entries[1][0]) == os.stat(parent).st_ino
        assert sorted(name for _, name in entries[2:]) == sorted(os.listdir(directory))


def test_fstat_of_an_open_file_works_after_its_object_is_deleted(fresh_sim, make_mount):
    """As on any filesystem: the descriptor still reads what it opened, and fstat (cat checks it) said
    ENOENT."""
    mount = make_mount(fresh_sim)
    vdi = next(v["id"] for v in fresh_sim.get_json("/rest/v0/vdis?fields=id,$VBDs") if not v["$VBDs"])
    path = mount.mountpoint / "vdis" / vdi / "meta.json"
    fd = os.open(path, os.O_RDONLY)
    try:
        status, _, body = fresh_sim.request("DELETE", f"/rest/v0/vdis/{vdi}")
        assert status in (200, 202, 204), body
        wait_for(lambda: vdi not in os.listdir(mount.mountpoint / "vdis"), 10, "the VDI to go")
        content = os.read(fd, 1 << 20)
        assert json.loads(content)["id"] == vdi
        assert os.fstat(fd).st_size == len(content)
        wait_for(lambda: missing(path), 10, "stat to say ENOENT once the kernel dropped its entry")
    finally:
        os.close(fd)


def test_an_open_meta_json_and_a_working_directory_outlive_their_objects_changes(fresh_sim, make_mount):
    """Through the kernel. A descriptor opened before a rename to a shorter name: fstat showed the new,
    smaller size while the descriptor reads its own longer version (`wc -c <&3`). A shell's working
    directory whose VM XO deletes: `ls`, `stat .` and `find .` failed with ENOENT; now it is a deleted
    directory, as on a local disk (helper 42)."""
    mount = make_mount(fresh_sim)
    vm = next(v for v in fresh_sim.get_json("/rest/v0/vms?fields=id,name_label,power_state")
              if v["power_state"] == "Halted")
    path = mount.mountpoint / "vms" / vm["id"] / "meta.json"
    fd = os.open(path, os.O_RDONLY)
    try:
        status, _, body = fresh_sim.request("PATCH", f"/rest/v0/vms/{vm['id']}", b'{"nameLabel": "s"}',
                                            {"Content-Type": "application/json"})
        assert status == 204, body
        wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "s", 10, "the rename")
        content = os.read(fd, 1 << 20)
        assert json.loads(content)["name_label"] == vm["name_label"]
        assert os.fstat(fd).st_size >= len(content) > path.stat().st_size - 1
    finally:
        os.close(fd)
    assert path.stat().st_size == len(path.read_bytes())
    vm_dir = mount.mountpoint / "vms" / vm["id"]
    script = (f"cd {vm_dir} && curl -sS -o /dev/null -w '%{{http_code}} ' -X DELETE "
              f"-b authenticationToken={fresh_sim.token} {fresh_sim.url}/rest/v0/vms/{vm['id']} && "
              f"while [ -e ../{vm['id']} ]; do sleep 0.05; done && "
              "stat -c '%h %F' . && ls -A . | wc -l && find . && echo done")
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["204", "0", "directory", "0", ".", "done"], done.stdout


def test_fstat_right_after_open_covers_what_the_descriptor_reads_while_xo_changes_fast(fresh_sim, make_mount):
    """QA helper 48: while another client changed a VM hundreds of times a second, `fstat` right after `open`
    showed the size of the version before about once in a thousand opens (the kernel's attributes were
    still to be dropped by the invalidation thread), less than the descriptor then read."""
    mount = make_mount(fresh_sim)
    vm = next(v["id"] for v in fresh_sim.get_json("/rest/v0/vms?fields=id,power_state")
              if v["power_state"] == "Halted")
    path = mount.mountpoint / "vms" / vm / "meta.json"
    stop = threading.Event()

    def change() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", fresh_sim.port, timeout=10)
        rng = random.Random(7)
        while not stop.is_set():
            body = json.dumps({"nameDescription": "x" * rng.randint(0, 3000)})
            conn.request("PATCH", f"/rest/v0/vms/{vm}", body, {"Cookie": f"authenticationToken={fresh_sim.token}",
                                                               "Content-Type": "application/json"})
            assert conn.getresponse().read() == b""
        conn.close()

    changers = [threading.Thread(target=change) for _ in range(3)]
    for thread in changers:
        thread.start()
    short, opens = [], 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            fd = os.open(path, os.O_RDONLY)
            try:
                size, data = os.fstat(fd).st_size, b""
                while chunk := os.read(fd, 1 << 16):
                    data += chunk
            finally:
                os.close(fd)
            opens += 1
            if size < len(data):
                short.append((size, len(data)))
    finally:
        stop.set()
        for thread in changers:
            thread.join()
    assert opens > 1000 and not short, (opens, short[:5])


def test_a_url_with_its_scheme_in_capitals_mounts(sim, make_mount):
    """`HTTP://host` passed the URL check and the REST calls, and then took the daemon down where the event
    feed's URL is made (helper 44)."""
    shouting = types.SimpleNamespace(url=sim.url.replace("http://", "HTTP://", 1), token=sim.token)
    mount = make_mount(shouting)
    assert os.listdir(mount.mountpoint / "vms")
    wait_for(lambda: "live" in mount.log_text(), what="the event feed to be live")
