"""Nobody let in, nothing destroyed, no secret shown.

- Private by default: no `allow_other`, modes 0400/0500 (0700 for import directories), and a second local
  user gets nowhere; with `-o allow_other` (always with `default_permissions`) that user may read, and still
  not write, import or change anything.
- Nothing destructive by default: unlink, rename, truncate, chmod, chown, utimes, xattrs, writes on exports
  and metadata all fail, as root too, and no request but GET reaches XO (`/_sim/stats`).
- The token never shows: not in the daemon's command line, its log (at DEBUG), any file or extended
  attribute of the mount, the status file and `xofs status`, the state directory; and not in any log the
  suite's other mounts wrote before this module ran.

The second user is made with `useradd` when missing (and removed afterwards); commands run as it through
`runuser`. The tests need root, as scripts/test runs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

from tests.hardening_support import (
    MiB,
    changes_sent,
    expire_token,
    import_raw,
    pattern_bytes,
    record,
    reset_stats,
    stats,
    vdi_ids,
    writable_sr,
)
from tests.operate_support import assert_documented, documented
from tests.support import DEFAULT_TOKEN, MountProcess, SimProcess, require_tool, wait_for
from xofs import cli

pytestmark = pytest.mark.mount

OTHER = "xofs-other"


@pytest.fixture(scope="module")
def other_user():
    """A second local user, made for these tests when there is none."""
    if os.geteuid() != 0:
        pytest.fail("these tests add a local user and mount for it: run them as root (scripts/test does)")
    require_tool("runuser")
    made = subprocess.run(["id", OTHER], capture_output=True).returncode != 0
    if made:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER],
                       check=True)
    yield OTHER
    if made:
        subprocess.run(["userdel", OTHER], check=False)


@pytest.fixture
def public_dir():
    """A directory any user can traverse (pytest's tmp_path is private to root), for mount points."""
    path = Path(tempfile.mkdtemp(prefix="xofs-security-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def mount_at(sim: SimProcess, where: Path, tmp_path: Path, *extra: str) -> MountProcess:
    mount = MountProcess(sim.url, where / "mnt", token=sim.token, extra=list(extra),
                         env={"XOFS_STATE_DIR": str(tmp_path / "state")}, log_path=tmp_path / "mount.log")
    return mount.start()


def as_other(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", OTHER, "--", *cmd], capture_output=True, text=True, timeout=60)


def xofs_status_as_other(path: Path) -> tuple[int, str]:
    """`xofs status PATH` run as the second user, in a forked child of this process: the interpreter and its
    packages may live where that user cannot go (a clean clone under /root). Its exit status and stderr."""
    user = pwd.getpwnam(OTHER)
    # Everything the command needs is loaded before the switch: after it, the second user may not read
    # the project's files (helper 56: a clone under /root failed with ModuleNotFoundError).
    importlib.import_module(cli.build_parser("status").parse_args(["status", str(path)])._module)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest, whatever happens
        code = 99
        try:
            os.close(read)
            sys.stdout = sys.stderr = open(write, "w")  # noqa: SIM115
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            code = cli.main(["status", str(path)])
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with open(read) as answer:
        text = answer.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), text


def mount_options(mount: MountProcess) -> set[str]:
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == str(mount.mountpoint):
                return set(fields[3].split(","))
    raise AssertionError(f"{mount.mountpoint} is not mounted")


def test_private_by_default(sim, other_user, public_dir, tmp_path):
    mount = mount_at(sim, public_dir, tmp_path)
    try:
        options = mount_options(mount)
        assert "allow_other" not in options and "default_permissions" in options, options
        root = mount.mountpoint
        modes: dict[int, int] = {}
        vm = sim.get_json("/rest/v0/vms?fields=id&limit=1")[0]["id"]
        sr = writable_sr(sim)
        for path in [root, root / "vms", root / "vms" / vm, root / "vms" / vm / "meta.json",
                     root / "vms" / f"{vm}.xva", root / "srs" / sr / "import", root / ".xofs" / "status.json"]:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode & 0o077 == 0, f"{path} is open to others: {mode:o}"
            modes[mode] = modes.get(mode, 0) + 1
        assert set(modes) == {0o400, 0o500, 0o700}
        for cmd in (["ls", str(root)], ["cat", str(root / "vms" / vm / "meta.json")],
                    ["stat", str(root / "vms")], ["cp", "/etc/hostname", str(root / "srs" / sr / "import" / "x.raw")]):
            denied = as_other(*cmd)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (cmd, denied.stderr)
        # `xofs status` as the second user says why it cannot look, and tells the mount (FUSE refuses) from a
        # path it cannot reach (pytest's tmp_path is private to root).
        code, said = xofs_status_as_other(root)
        assert code == 1 and said.strip() == (f"xofs status: {root} is another user's mount, made without "
                                               "--allow-other: only that user can look into it (run xofs status "
                                               "as them)"), said
        assert_documented(said.strip())
        code, said = xofs_status_as_other(tmp_path / "mnt")
        assert code == 1 and said.strip() == (f"xofs status: {tmp_path / 'mnt'} cannot be reached: a directory "
                                               "above it lets only its owner in (run xofs status as the mount's "
                                               "user)"), said
        assert_documented(said.strip())
        private = public_dir / "private"  # reachable, but no mount: it was called another user's mount
        private.mkdir(mode=0o700)
        code, said = xofs_status_as_other(private)
        assert code == 1 and said.strip() == (f"xofs status: {private} is not an xofs mount (its owner lets no "
                                               "one else in)"), said
        assert_documented(said.strip())
    finally:
        mount.stop()


def test_allow_other_always_comes_with_default_permissions_and_a_second_user_can_only_read(
        fresh_sim, other_user, public_dir, tmp_path):
    data = pattern_bytes(2 * MiB, 21)
    vdi = import_raw(fresh_sim, data, "shared")
    mount = mount_at(fresh_sim, public_dir, tmp_path, "-o", "allow_other")
    try:
        options = mount_options(mount)
        assert {"allow_other", "default_permissions"} <= options, options
        root = mount.mountpoint
        vm = fresh_sim.get_json("/rest/v0/vms?fields=id&limit=1")[0]["id"]
        sr = writable_sr(fresh_sim)
        wait_for((root / "vdis" / f"{vdi}.raw").exists, 10, "the disk on the mount")
        reset_stats(fresh_sim)
        can = {
            "list": as_other("ls", str(root / "vms")),
            "read metadata": as_other("cat", str(root / "vms" / vm / "meta.json")),
            "read an export": as_other("sha256sum", str(root / "vdis" / f"{vdi}.raw")),
        }
        cannot = {
            "import": as_other("cp", "/etc/hostname", str(root / "srs" / sr / "import" / "x.raw")),
            "remove": as_other("rm", "-f", str(root / "vms" / vm / "meta.json")),
            "rename": as_other("mv", str(root / "vms" / vm), str(root / "vms" / "x")),
            "truncate": as_other("truncate", "-s", "0", str(root / "vms" / vm / "meta.json")),
            "chmod": as_other("chmod", "777", str(root / "vms" / vm)),
            "set an xattr": as_other("setfattr", "-n", "user.xo.name_label", "-v", "x", str(root / "vms" / vm)),
        }
        for what, proc in can.items():
            assert proc.returncode == 0, (what, proc.stderr)
        assert json.loads(can["read metadata"].stdout)["id"] == vm
        assert can["read an export"].stdout.split()[0] == hashlib.sha256(data).hexdigest()
        for what, proc in cannot.items():
            assert proc.returncode != 0, what
            assert "Permission denied" in proc.stderr or "Operation not permitted" in proc.stderr, (what, proc.stderr)
        assert changes_sent(stats(fresh_sim)) == {}
        assert os.listdir(root / "srs" / sr / "import") == []
        record("security", "second user with allow_other", can=sorted(can), cannot=sorted(cannot))
    finally:
        mount.stop()
    # allow_other with a umask that keeps others out: the second user passes FUSE but not the modes.
    mount = mount_at(fresh_sim, public_dir, tmp_path, "-o", "allow_other,umask=077")
    try:
        denied = as_other("ls", str(mount.mountpoint / "vms"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
    finally:
        mount.stop()


def test_nothing_destructive_reaches_xo(fresh_sim, make_mount, tmp_path):
    require_tool("setfattr")
    data = pattern_bytes(MiB, 22)
    vdi = import_raw(fresh_sim, data, "keep-me")
    mount = make_mount(fresh_sim)
    root = mount.mountpoint
    vm = fresh_sim.get_json("/rest/v0/vms?fields=id&filter=power_state:Running&limit=1")[0]["id"]
    sr = writable_sr(fresh_sim)
    wait_for((root / "vdis" / f"{vdi}.raw").exists, 10, "the disk on the mount")
    # One file imported through the mount: removing its entry must not remove the VDI either.
    src = tmp_path / "mine.raw"
    src.write_bytes(pattern_bytes(MiB, 23))
    assert subprocess.run(["cp", str(src), str(root / "srs" / sr / "import" / "mine.raw")]).returncode == 0
    vdis_before = vdi_ids(fresh_sim)
    reset_stats(fresh_sim)
    targets = [root / "vms" / vm / "meta.json", root / "vms" / f"{vm}.xva", root / "vdis" / f"{vdi}.raw",
               root / "vdis" / vdi / "meta.json"]
    attempts: list[list[str]] = []
    for t in targets:
        attempts += [["rm", "-f", str(t)], ["mv", str(t), str(t) + ".moved"], ["truncate", "-s", "0", str(t)],
                     ["chmod", "644", str(t)], ["chown", "nobody", str(t)], ["touch", "-d", "2000-01-01", str(t)],
                     ["setfattr", "-n", "user.xo.name_label", "-v", "renamed", str(t)],
                     ["setfattr", "-x", "user.xo.id", str(t)], ["sh", "-c", f"echo x > '{t}'"],
                     ["dd", "if=/dev/zero", f"of={t}", "bs=512", "count=1", "conv=notrunc"],
                     ["ln", str(t), str(root / "vms" / "hardlink")]]
    attempts += [["rm", "-rf", str(root / "vms" / vm)], ["rmdir", str(root / "vdis" / vdi)],
                 ["mv", str(root / "vms" / vm), str(root / "vms" / "renamed")], ["mkdir", str(root / "vms" / "new")],
                 ["ln", "-s", "/etc", str(root / "vms" / "link")], ["rm", "-rf", str(root / "by-name")],
                 ["mv", str(root / "srs" / sr / "import" / "mine.raw"), str(root / "vms" / "mine.raw")]]
    succeeded = [a for a in attempts if subprocess.run(a, capture_output=True, timeout=60).returncode == 0]
    assert succeeded == [], succeeded
    # Each refusal's line is one that troubleshooting.md explains.
    warnings = [line for line in mount.log_text().splitlines() if " WARNING " in line]
    undocumented = [line for line in warnings if not documented(line)]
    assert warnings and not undocumented, "\n".join(undocumented)
    assert subprocess.run(["rm", str(root / "srs" / sr / "import" / "mine.raw")]).returncode == 0
    assert changes_sent(stats(fresh_sim)) == {}, "something but a read reached XO"
    assert vdi_ids(fresh_sim) == vdis_before
    assert (root / "vdis" / f"{vdi}.raw").read_bytes() == data
    record("security", "destructive operations as root", tried=len(attempts) + 1, reached_xo=0)


def _token_free(text: str | bytes, secrets: list[str], where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in secrets:
        assert secret.encode() not in data, f"a token is in {where}"


def test_the_token_is_never_shown(fresh_sim, tmp_path, tmp_path_factory):
    require_tool("getfattr")
    sim = fresh_sim
    data = pattern_bytes(MiB, 24)
    vdi = import_raw(sim, data, "secret-test")
    token_file = tmp_path / "token"
    token_file.write_text(sim.token)
    token_file.chmod(0o600)
    state = tmp_path / "state"
    mount = MountProcess(sim.url, tmp_path / "mnt", token=sim.token, log_path=tmp_path / "mount.log",
                         extra=["--token-file", str(token_file), "--log-level", "DEBUG"],
                         env={"XOFS_STATE_DIR": str(state), "XOFS_TOKEN": ""}).start()
    secrets = [sim.token, DEFAULT_TOKEN]
    try:
        root = mount.mountpoint
        sr = writable_sr(sim)
        wait_for((root / "vdis" / f"{vdi}.raw").exists, 10, "the disk on the mount")
        # Exercise what logs the most: listings, an export, an import, failures, a refused token.
        subprocess.run(["find", str(root)], capture_output=True, check=True)
        assert (root / "vdis" / f"{vdi}.raw").read_bytes() == data
        (tmp_path / "up.raw").write_bytes(pattern_bytes(MiB, 25))
        subprocess.run(["cp", str(tmp_path / "up.raw"), str(root / "srs" / sr / "import" / "up.raw")], check=True)
        subprocess.run(["cp", "/etc/hostname", str(root / "srs" / sr / "import" / "bad.txt")], capture_output=True)
        expire_token(sim, sim.token)
        with pytest.raises(PermissionError):
            (root / "vdis" / f"{vdi}.raw").read_bytes()
        cmdline = Path(f"/proc/{mount.proc.pid}/cmdline").read_bytes()
        _token_free(cmdline, secrets, "the daemon's command line")
        for task in os.listdir(f"/proc/{mount.proc.pid}/task"):
            _token_free(Path(f"/proc/{mount.proc.pid}/task/{task}/comm").read_bytes(), secrets, "a thread name")
        files = 0
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                attrs = subprocess.run(["getfattr", "-h", "-d", "-m", "-", str(path)], capture_output=True)
                _token_free(attrs.stdout, secrets, f"the xattrs of {path}")
                if name in filenames and (name.endswith((".json", ".ndjson"))):
                    _token_free(path.read_bytes(), secrets, str(path))
                    files += 1
        status = subprocess.run([sys.executable, "-m", "xofs", "status", str(root)], capture_output=True, timeout=30)
        status_json = subprocess.run([sys.executable, "-m", "xofs", "status", str(root), "--json"],
                                     capture_output=True, timeout=30)
        assert status.returncode == 0 and status_json.returncode == 0, status.stderr
        _token_free(status.stdout + status.stderr + status_json.stdout, secrets, "xofs status")
        _token_free((root / ".xofs" / "status.json").read_bytes(), secrets, "/.xofs/status.json")
    finally:
        mount.stop()
    log = mount.log_text()
    assert "DEBUG" in log and len(log) > 1000
    _token_free(log, secrets, "the mount's log")
    for path in state.rglob("*"):
        if path.is_file():
            _token_free(path.read_bytes(), secrets, str(path))
    # Every log any mount of this test session wrote so far (each test's mount*.log and state directories).
    logs = [p for p in tmp_path_factory.getbasetemp().rglob("*.log") if p.name.startswith(("mount", "xofs"))]
    for path in logs:
        _token_free(path.read_bytes(), secrets, str(path))
    record("security", "token search", files_and_xattrs_checked=files, mount_logs_checked=len(logs), found=0)
