"""`/.xofs/status.json` and `xofs status`: the feed, the cache, live transfers with their progress, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.operate_support import assert_documented, status_of, xofs
from tests.support import is_mounted
from tests.test_imports import sr_ids
from tests.test_operate_credentials import run_on_terminal
from xofs.files import Caller
from xofs.status_cli import _transfer


def test_the_status_file_describes_the_mount(sim, make_mount):
    mount = make_mount(sim)
    root = mount.mountpoint
    assert ".xofs" in os.listdir(root) and stat.S_IMODE(os.stat(root / ".xofs" / "status.json").st_mode) == 0o400
    status = status_of(root)
    assert status["mounted"] and status["pid"] == mount.proc.pid
    assert status["url"] == sim.url and status["mountpoint"] == str(root)
    assert status["credentials"] == "$XOFS_TOKEN"
    assert status["feed"]["kind"] == "jsonrpc" and status["feed"]["connected"]
    assert status["feed"]["reconnects"] == 0
    assert status["cache"]["by_type"]["VM"] == len(sim.get_json("/rest/v0/vms?fields=id"))
    assert status["transfers"] == [] and status["errors"] == []
    # A refused operation shows among the recent errors.
    try:
        open(root / "vms" / "new-file", "w").close()
    except PermissionError:
        pass
    errors = status_of(root)["errors"]
    assert len(errors) == 1 and errors[0]["level"] == "WARNING" and "/vms/new-file" in errors[0]["message"]
    assert sim.token not in (root / ".xofs" / "status.json").read_text()


WRITER = """
import sys
with open(sys.argv[1], "wb") as f:
    f.write(b"\\1" * (1 << 20))
    f.flush()
    print("written", flush=True)
    sys.stdin.read()
"""


def big_vdi(sim) -> dict:
    return max(sim.get_json("/rest/v0/vdis?fields=id,size"), key=lambda v: v["size"])


def test_xofs_status_shows_transfers_under_way(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim)
    root = mount.mountpoint
    vdi = big_vdi(fresh_sim)
    target = root / "srs" / sr_ids(fresh_sim)[0] / "import" / "incoming.raw"
    # The import is written by a process of its own: a file open here would be closed (and so flushed, which
    # starts its upload) in every child this test forks to run `xofs status`.
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    with open(root / "vdis" / f"{vdi['id']}.raw", "rb") as export:
        assert len(export.read(2 << 20)) == 2 << 20
        assert writer.stdout.readline() == "written\n"

        plain = xofs("status", str(root))
        assert plain.returncode == 0, plain.stderr
        lines = plain.stdout.splitlines()
        assert lines[0].startswith(f"{fresh_sim.url} on {root} (pid {mount.proc.pid}")
        assert any(line.strip().startswith(f"export  /vdis/{vdi['id']}.raw  streaming") for line in lines), lines
        assert any(line.strip().startswith("import  /srs/") and "incoming.raw  writing  1.0 MiB" in line
                   for line in lines), "\n".join(lines)
        assert "\x1b[" not in plain.stdout  # no terminal: plain lines, printed once

        as_json = json.loads(xofs("status", str(root), "--json").stdout)
        by_kind = {t["kind"]: t for t in as_json["transfers"]}
        export_t, import_t = by_kind["export"], by_kind["import"]
        assert export_t["path"] == f"/vdis/{vdi['id']}.raw" and export_t["export"] == f"/rest/v0/vdis/{vdi['id']}.raw"
        assert export_t["size"] == vdi["size"] and export_t["size_exact"] and export_t["read"] == 2 << 20
        assert 2 << 20 <= export_t["done"] < vdi["size"] and export_t["rate"] > 0 and export_t["eta"] > 0
        assert (import_t["phase"], import_t["done"], import_t["size"]) == ("writing", 1 << 20, None)
        opener = f"pid {os.getpid()} ({Path('/proc/self/comm').read_text().strip()})"
        assert export_t["opener"] == opener  # what started an export in XO: a scanner would show here
        assert import_t["opener"] == f"pid {writer.pid} ({Path(f'/proc/{writer.pid}/comm').read_text().strip()})"
        assert any(line.strip().startswith(f"export  /vdis/{vdi['id']}.raw  streaming") and line.endswith(opener)
                   for line in lines), lines

        everywhere = xofs("status")  # without a mount point: every xofs mount
        assert everywhere.returncode == 0 and f" on {root} " in everywhere.stdout

        # On a terminal: progress bars, redrawn in place, until the transfers are over.
        code, screen = run_on_terminal(["status", str(root)], [], {}, timeout=2.5)
        assert "[" in screen and "] " in screen and "%" in screen
        assert "\x1b[" in screen  # drawn again in place at least once
    writer.communicate("", timeout=30)  # it closes the file: the upload runs, and ends
    assert writer.returncode == 0
    code, screen = run_on_terminal(["status", str(root)], [], {}, timeout=10)
    assert code == 0 and "transfers: none" in screen


def test_xofs_status_says_what_is_wrong(tmp_path):
    proc = xofs("status", str(tmp_path))
    assert proc.returncode == 1 and f"{tmp_path} is not an xofs mount" in proc.stderr
    assert_documented(proc.stderr.strip())
    proc = xofs("status", str(tmp_path / "nope"))
    assert proc.returncode == 1 and f"{tmp_path / 'nope'} does not exist or is not a directory" in proc.stderr
    assert_documented(proc.stderr.strip())
    (tmp_path / "a-file").write_text("x")  # it said "cannot read …/a-file/.xofs/status.json" (helper 44)
    proc = xofs("status", str(tmp_path / "a-file"))
    assert proc.returncode == 1 and f"{tmp_path / 'a-file'} is not an xofs mount" in proc.stderr
    assert_documented(proc.stderr.strip())


def auto_unmount_helper(daemon: int) -> int:
    """The pid of the `fusermount3` libfuse leaves running beside a daemon, to unmount when it dies."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                name, rest = f.read().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if name.endswith("(fusermount3") and int(rest.split()[1]) == daemon:
            return int(entry)
    raise AssertionError(f"no fusermount3 helper beside daemon {daemon}")


def heads(output: str) -> list[str]:
    """The first line of each mount's status in `xofs status`'s output."""
    return [line for line in output.splitlines() if not line.startswith(" ")]


def test_xofs_status_shows_every_mount_when_one_daemon_is_stuck(sim, make_mount):
    stuck, healthy = make_mount(sim), make_mount(sim)
    pid = status_of(stuck.mountpoint)["pid"]
    os.kill(pid, signal.SIGSTOP)  # a read on its mount now waits in the kernel until SIGCONT
    try:
        started = time.monotonic()
        proc = xofs("status", timeout=30)
        assert time.monotonic() - started < 15
        line = (f"xofs status: the daemon of {stuck.mountpoint} (pid {pid}) does not answer within 5 s: "
                f"it is stopped (kill -CONT {pid} resumes it)")
        assert proc.returncode == 1 and line in proc.stderr.splitlines(), proc.stderr
        assert_documented(line)
        assert any(h.startswith(f"{sim.url} on {healthy.mountpoint} (pid {healthy.proc.pid}")
                   for h in heads(proc.stdout)), proc.stdout

        proc = xofs("status", "--json", "--timeout", "1", timeout=30)
        by_mount = {entry["mountpoint"]: entry for entry in json.loads(proc.stdout)}
        assert by_mount[str(healthy.mountpoint)]["pid"] == healthy.proc.pid
        assert by_mount[str(stuck.mountpoint)]["error"].startswith(
            f"the daemon of {stuck.mountpoint} (pid {pid}) does not answer within 1 s")
        assert proc.returncode == 1

        # On a terminal, the stuck one's line is drawn among the others; with no transfer, it is over.
        code, screen = run_on_terminal(["status", "--timeout", "1"], [], {}, timeout=20)
        assert code == 1 and f" on {healthy.mountpoint} (pid" in screen, screen
        assert f"the daemon of {stuck.mountpoint} (pid {pid}) does not answer within 1 s" in screen
    finally:
        os.kill(pid, signal.SIGCONT)
    assert xofs("status", str(stuck.mountpoint), timeout=30).returncode == 0  # it answers again


def test_xofs_status_shows_every_mount_when_one_daemon_is_gone(sim, make_mount):
    dead, healthy = make_mount(sim), make_mount(sim)
    # Without its auto_unmount helper, a killed daemon leaves its mount behind: "Transport endpoint is not
    # connected" (the helper first: killed after the daemon, it could unmount before it dies).
    os.kill(auto_unmount_helper(dead.proc.pid), signal.SIGKILL)
    dead.proc.kill()
    dead.proc.wait(10)
    assert is_mounted(dead.mountpoint, "fuse.xofs")

    proc = xofs("status", timeout=30)
    line = f"xofs status: the xofs daemon of {dead.mountpoint} is gone: unmount it (fusermount3 -u {dead.mountpoint})"
    assert proc.returncode == 1 and line in proc.stderr.splitlines(), proc.stderr
    assert_documented(line)
    assert any(h.startswith(f"{sim.url} on {healthy.mountpoint} (pid {healthy.proc.pid}")
               for h in heads(proc.stdout)), proc.stdout

    proc = xofs("status", "--json", timeout=30)
    by_mount = {entry["mountpoint"]: entry for entry in json.loads(proc.stdout)}
    assert by_mount[str(dead.mountpoint)] == {"mountpoint": str(dead.mountpoint), "error": line[len("xofs status: "):]}
    assert by_mount[str(healthy.mountpoint)]["pid"] == healthy.proc.pid
    assert proc.returncode == 1


def test_xofs_status_of_several_mount_points(sim, make_mount, tmp_path):
    one, two = make_mount(sim), make_mount(sim)
    proc = xofs("status", str(one.mountpoint), str(two.mountpoint))
    assert proc.returncode == 0, proc.stderr
    first, second = heads(proc.stdout)
    assert first.startswith(f"{sim.url} on {one.mountpoint} (pid {one.proc.pid}")
    assert second.startswith(f"{sim.url} on {two.mountpoint} (pid {two.proc.pid}")
    entries = json.loads(xofs("status", "--json", str(one.mountpoint), str(two.mountpoint)).stdout)
    assert [e["pid"] for e in entries] == [one.proc.pid, two.proc.pid]

    # One that is no mount among them: its line, the others all the same, and exit status 1.
    proc = xofs("status", str(one.mountpoint), str(tmp_path / "nope"))
    assert proc.returncode == 1 and heads(proc.stdout)[0].startswith(f"{sim.url} on {one.mountpoint} (pid ")
    assert proc.stderr == f"xofs status: {tmp_path / 'nope'} does not exist or is not a directory\n"


def test_xofs_status_of_a_path_inside_a_mount_shows_that_mount(sim, make_mount, tmp_path):
    mount = make_mount(sim)
    proc = xofs("status", str(mount.mountpoint / "vms"))
    assert proc.returncode == 0, proc.stderr
    assert heads(proc.stdout)[0].startswith(f"{sim.url} on {mount.mountpoint} (pid {mount.proc.pid}")
    (tmp_path / "link").symlink_to(mount.mountpoint / "vms")  # through a symbolic link too
    proc = xofs("status", "--json", str(tmp_path / "link"))
    assert proc.returncode == 0 and json.loads(proc.stdout)["mountpoint"] == str(mount.mountpoint), proc
    # A reader that had enough (`| head`): no BrokenPipeError traceback (helpers 46, 47)
    for plain in ("--json", ""):
        cut = subprocess.run(f"{sys.executable} -m xofs status {plain} {mount.mountpoint} | true", shell=True,
                             capture_output=True, text=True, timeout=60)
        assert cut.stderr == "", cut.stderr


def test_the_opener_is_named_by_its_process_whatever_its_name(sim, make_mount, tmp_path):
    """FUSE gives the calling thread's id, and the kernel cuts a name to 15 bytes, through a UTF-8 character
    if need be: that failed every export open of such a program with EIO (helper 56). A thread is named by its
    process; the name is escaped, in `xofs status` too."""
    worker: list[str] = []
    thread = threading.Thread(target=lambda: worker.append(Caller(threading.get_native_id()).describe()),
                              name="worker-3")
    thread.start()
    thread.join()
    assert worker == [f"pid {os.getpid()} ({Path('/proc/self/comm').read_text().strip()})"]
    assert Caller(0).describe() == "pid 0"
    head = tmp_path / "копировщик"  # 20 bytes of UTF-8: its process name is cut inside a character
    head.symlink_to(shutil.which("head"))
    mount = make_mount(sim)
    vm = sim.get_json("/rest/v0/vms?fields=id&filter=power_state:Halted&limit=1")[0]["id"]
    got = subprocess.run([str(head), "-c", "1024", str(mount / "vms" / f"{vm}.xva")], capture_output=True,
                         timeout=60)
    assert got.returncode == 0 and len(got.stdout) == 1024, got.stderr
    assert "unexpected failure" not in mount.log_text()
    line = _transfer({"kind": "export", "path": "/vms/x\n.xva", "phase": "streaming", "done": 1, "size": 2,
                      "opener": "pid 7 (a\nERROR x\x1b[2J)"}, bars=False)
    assert "\n" not in line and "\x1b" not in line and line.endswith("pid 7 (a\\nERROR x\\x1b[2J)")
