"""/etc/fstab through `mount.xofs`, called the way mount(8) calls a helper: `mount.xofs SPEC DIR -o OPTIONS`."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.operate_support import Daemon, assert_documented, mount_helper, status_of, write_private
from tests.support import is_mounted, require_tool
from xofs.options import OPTIONS


def mount_line(mnt) -> str:
    target = os.path.realpath(mnt)
    with open("/proc/mounts") as f:
        return next(line for line in f if line.split()[1] == target)


def test_an_fstab_entry_mounts_through_the_helper_and_umount_ends_it(sim, tmp_path):
    token = write_private(tmp_path / "token", sim.token)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # What mount(8) passes for `URL DIR xofs _netdev,token_file=…,allow_other,… 0 0`: its own options too.
    options = (f"rw,_netdev,nofail,x-systemd.automount,token_file={token},allow_other,uid=1234,gid=2345,"
               f"attr_ttl=30,max_exports=2,state_dir={tmp_path / 'state'},log_file={tmp_path / 'fstab.mount.log'},"
               "noatime,nodiratime,lazytime,nodev")  # nodiratime: libfuse refused it (44); lazytime: xofs (47)
    daemon = Daemon(mnt)
    try:
        proc = mount_helper(sim.url, str(mnt), "-o", options)
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
        daemon.attach()
        fields = mount_line(mnt).split()
        assert fields[0] == sim.url and fields[2] == "fuse.xofs"  # so `mount -a` sees it as mounted
        assert {"noatime", "nodev"} <= set(fields[3].split(",")) and "allow_other" in fields[3]
        st = os.stat(mnt / "vms")
        assert (st.st_uid, st.st_gid) == (1234, 2345)
        assert stat.S_IMODE(st.st_mode) == 0o555  # allow_other: others may read (umask 022)
        vm = os.listdir(mnt / "vms")[0]
        assert stat.S_IMODE(os.stat(mnt / "vms" / vm / "meta.json").st_mode) == 0o444
        options_shown = status_of(mnt)["options"]
        assert (options_shown["uid"], options_shown["gid"], options_shown["attr_ttl"]) == (1234, 2345, 30.0)
        assert options_shown["max_exports"] == 2 and options_shown["umask"] == "022"
        # mount(8) -a sees the fstab entry as mounted already (--fake: it calls no helper).
        fstab = tmp_path / "fstab"
        fstab.write_text(f"{sim.url} {mnt} xofs {options} 0 0\n")
        fake = subprocess.run([require_tool("mount"), "--fake", "-av", "--fstab", str(fstab)], capture_output=True,
                              text=True, timeout=30)
        assert "already mounted" in fake.stdout, (fake.stdout, fake.stderr)
        subprocess.run(["umount", str(mnt)], check=True)
        daemon.wait_gone()
    finally:
        daemon.cleanup()


def test_umask_shapes_the_modes(sim, make_mount):
    mount = make_mount(sim, "-o", "umask=027")
    assert stat.S_IMODE(os.stat(mount.mountpoint / "vms").st_mode) == 0o550
    vm = next(n for n in os.listdir(mount.mountpoint / "vms") if "." not in n)
    assert stat.S_IMODE(os.stat(mount.mountpoint / "vms" / vm / "meta.json").st_mode) == 0o440
    plain = make_mount(sim)
    assert stat.S_IMODE(os.stat(plain.mountpoint / "vms").st_mode) == 0o500  # the default: the owner only


def test_the_helper_checks_everything_before_mounting(sim, tmp_path):
    token = write_private(tmp_path / "token", sim.token)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # -f (fake): everything is checked, nothing is mounted.
    proc = mount_helper(sim.url, str(mnt), "-f", "-o", f"token_file={token}")
    assert proc.returncode == 0 and not is_mounted(mnt), proc.stderr
    cases = [
        (f"token_file={token},colour=blue", "unknown mount option 'colour=blue'"),
        (f"token_file={token},uid=abc", "bad mount option 'uid=abc'"),
        (f"token_file={token},umask=999", "bad mount option 'umask=999': '999' is not an octal umask"),
        # No slot: every read of an export, or every import, would wait for ever (0 hung, -1 crashed).
        (f"token_file={token},max_exports=0", "bad mount option 'max_exports=0': 0 is less than 1"),
        (f"token_file={token},max_uploads=-1", "bad mount option 'max_uploads=-1': -1 is less than 1"),
        (f"token_file={token},spool_size=abc", "'abc' is not a size (such as 20G, 512M or 100000)"),
        (f"token_file={token},import_wait=-5", "bad mount option 'import_wait=-5': -5 is negative"),
        (f"token_file={token},keepalive=0", "bad mount option 'keepalive=0'"),
        (f"token_file={token},poll_interval=nan", "bad mount option 'poll_interval=nan': 'nan' is not a finite number"),
        (f"token_file={token},attr_ttl=inf", "bad mount option 'attr_ttl=inf': 'inf' is not a finite number"),
        (f"token_file={token},spool_size=inf", "bad mount option 'spool_size=inf': 'inf' is not a size"),
        (f"token_file={token},readahead=1M", "bad mount option 'readahead=1M': 1M is less than 2M"),
        (f"token={sim.token}", "a secret on the command line is visible to every user"),
        (f"token_file={tmp_path / 'missing'}", "cannot read"),
        (f"token_file={token},attr_ttl", "-o attr_ttl needs a value"),
    ]
    for options, words in cases:
        proc = mount_helper(sim.url, str(mnt), "-o", options)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and words in lines[0], (options, proc.stderr)
        assert_documented(lines[0])
        assert sim.token not in proc.stderr
        assert not is_mounted(mnt)
    # -s (sloppy): unknown options are dropped instead of refused.
    proc = mount_helper(sim.url, str(mnt), "-s", "-f", "-o", f"token_file={token},colour=blue")
    assert proc.returncode == 0, proc.stderr


def test_every_option_is_documented():
    text = (Path(__file__).parent.parent / "docs" / "operating.md").read_text()
    table = text[text.index("## Options"):]
    for option in OPTIONS:
        assert f"| `{option.name}" in table, option.name
