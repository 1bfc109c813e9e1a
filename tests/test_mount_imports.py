"""Imports through a real kernel mount, with the tools people use: cp, rsync, dd, shell redirection,
qemu-img. Each case checks the tool's exit status, what XO ends up with (the VDIs, their names, their raw
content), and that nothing is left behind when it fails (no VDI, no spool, no entry).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.operate_support import documented
from tests.support import MountProcess, SimProcess, require_tool, set_faults, wait_for
from tests.test_imports import make_raw, make_vhd, raw_export, sr_ids, vdis
from xofs.imports import REWRITE_GRACE

pytestmark = pytest.mark.mount


def sh(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, **kwargs)
    if check:
        assert proc.returncode == 0, (cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc


def import_dir(mount: MountProcess, sr: str) -> Path:
    return mount / f"srs/{sr}/import"


def spools(mount: MountProcess) -> list[Path]:
    """The daemon's import spools (under its state directory, where make_mount puts everything)."""
    return list(Path(mount.env["XOFS_STATE_DIR"]).rglob("*.spool"))


def one_vdi(sim: SimProcess, label: str, sr: str) -> dict:
    found = vdis(sim, name_label=label)
    assert [v["$SR"] for v in found] == [sr], found
    return found[0]


def transferred(rsync: subprocess.CompletedProcess) -> list[str]:
    """The files an `rsync --itemize-changes` run sent (the import directory's own times and mode, which
    it tries to set every time, are not files)."""
    return [line for line in rsync.stdout.splitlines() if not line.startswith(".d")]


# ---- the tools --------------------------------------------------------------------------------------------


def test_every_tool_imports_one_vdi_with_the_source_content(fresh_sim, make_mount, tmp_path):
    require_tool("rsync")
    require_tool("qemu-img")
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    raw = tmp_path / "src.raw"
    raw_data = make_raw(raw, 4 << 20)
    vhd_bytes, vhd_content = make_vhd(tmp_path, "src.vhd")
    vhd = tmp_path / "src.vhd"

    sh("cp", str(raw), str(target / "by-cp.raw"))
    sh("cp", str(vhd), str(target / "by-cp-vhd.vhd"))
    sh("rsync", "-a", str(vhd), str(target / "by-rsync.vhd"))
    sh("dd", f"if={raw}", f"of={target / 'by-dd.img'}", "bs=1M", "conv=fsync")
    sh("sh", "-c", f"cat '{raw}' > '{target / 'by-shell.raw'}'")
    sh("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", str(raw),
       str(target / "by-qemu.vhd"))

    for label, content in [("by-cp", raw_data), ("by-dd", raw_data), ("by-shell", raw_data)]:
        vdi = one_vdi(fresh_sim, label, sr)
        assert raw_export(fresh_sim, vdi["id"]) == content, label
    for label in ("by-cp-vhd", "by-rsync", "by-qemu"):
        vdi = one_vdi(fresh_sim, label, sr)
        expected = raw_data.ljust(len(vhd_content), b"\0") if label == "by-qemu" else vhd_content
        assert raw_export(fresh_sim, vdi["id"]) == expected, label
    assert vdis(fresh_sim, name_label="src") == []  # rsync's temporary name never reached XO

    names = sorted(os.listdir(target))
    assert names == ["by-cp-vhd.vhd", "by-cp.raw", "by-dd.img", "by-qemu.vhd", "by-rsync.vhd", "by-shell.raw"]
    assert os.stat(target / "by-rsync.vhd").st_size == len(vhd_bytes)
    assert int(os.stat(target / "by-rsync.vhd").st_mtime) == int(os.stat(vhd).st_mtime)
    new_id = sh("getfattr", "--only-values", "-n", "user.xo.vdi", str(target / "by-rsync.vhd")).stdout
    assert new_id == one_vdi(fresh_sim, "by-rsync", sr)["id"]
    # The new VDI shows up in the rest of the tree from XO's events.
    wait_for(lambda: any(new_id in name for name in os.listdir(mount / f"srs/{sr}/vdis")), what="/srs/…/vdis")
    wait_for(lambda: any(new_id in name for name in os.listdir(mount / "vdis")), what="/vdis")
    # Spools outlive a finished import only for the few seconds a writer may take to reopen the file.
    wait_for(lambda: spools(mount) == [], timeout=10, what="the spools to go")


def test_a_vhd_written_in_order_is_uploaded_while_it_is_written(fresh_sim, make_mount, tmp_path):
    """Half a VHD written through the mount: XO already has the VDI, announced at the file's final length;
    the close finishes that one upload (no second VDI), and the content is the source's."""
    image, expected = make_vhd(tmp_path, size=8 << 20)
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    before = len(vdis(fresh_sim))
    fd = os.open(import_dir(mount, sr) / "live.vhd", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        half = len(image) // 2
        assert os.write(fd, image[:half]) == half
        early = wait_for(lambda: vdis(fresh_sim, name_label="live"), timeout=10, what="the VDI of the upload")
        assert early[0]["other_config"]["xo:import:length"] == str(len(image))
        assert os.write(fd, image[half:]) == len(image) - half
    finally:
        os.close(fd)
    vdi = one_vdi(fresh_sim, "live", sr)
    assert vdi["id"] == early[0]["id"] and len(vdis(fresh_sim)) == before + 1
    assert raw_export(fresh_sim, vdi["id"]) == expected
    assert "while it is written" in mount.log_text()


def test_rerunning_rsync_or_cp_u_transfers_nothing_even_after_a_remount(fresh_sim, make_mount, tmp_path):
    require_tool("rsync")
    src = tmp_path / "images"
    src.mkdir()
    make_vhd(src, "a.vhd")
    make_raw(src / "b.raw", 2 << 20)
    for leftover in src.glob("*.src.raw"):
        leftover.unlink()
    for leftover in src.glob("*.expected.raw"):
        leftover.unlink()
    state = {"XOFS_STATE_DIR": str(tmp_path / "state-shared")}
    mount = make_mount(fresh_sim, env=state)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    sh("rsync", "-a", f"{src}/", f"{target}/")
    count = len(vdis(fresh_sim))
    first = {label: one_vdi(fresh_sim, label, sr)["id"] for label in ("a", "b")}

    again = sh("rsync", "-a", "--itemize-changes", f"{src}/", f"{target}/")
    assert transferred(again) == []
    sh("cp", "-u", str(src / "a.vhd"), str(src / "b.raw"), str(target))
    assert len(vdis(fresh_sim)) == count

    mount.stop()
    mount = make_mount(fresh_sim, env=state)
    target = import_dir(mount, sr)
    again = sh("rsync", "-a", "--itemize-changes", f"{src}/", f"{target}/")
    assert transferred(again) == []
    sh("cp", "-u", str(src / "a.vhd"), str(target))
    assert len(vdis(fresh_sim)) == count
    assert {label: one_vdi(fresh_sim, label, sr)["id"] for label in ("a", "b")} == first


def test_rsync_checksum_again_fails_loudly_instead_of_piling_up_duplicates(fresh_sim, make_mount, tmp_path):
    """`rsync -a --checksum` cannot read an imported file back, so every run sent every file again and each
    rename over the imported file left one more VDI, exit 0. Now the rename is refused: rsync exits 23 and
    removes its temporary file, whose VDI goes; the first import stays, the only one."""
    require_tool("rsync")
    src = tmp_path / "images"
    src.mkdir()
    make_raw(src / "c.raw", 2 << 20)
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    sh("rsync", "-a", "--checksum", f"{src}/", f"{target}/")
    first = one_vdi(fresh_sim, "c", sr)["id"]
    # Until REWRITE_GRACE after the close reached the daemon, the import's spool is kept, and reads of it answer.
    wait_for(lambda: spools(mount) == [], REWRITE_GRACE + 10, "the import's spool to go")
    for flag in ("--checksum", "--ignore-times"):
        again = sh("rsync", "-a", flag, f"{src}/", f"{target}/", check=False)
        assert again.returncode == 23, again.stdout + again.stderr
        assert "File exists" in again.stderr, again.stderr
        wait_for(lambda: [v["id"] for v in vdis(fresh_sim, name_label="c")] == [first], 10,
                 "the VDI of rsync's second copy to be removed")
        assert os.listdir(target) == ["c.raw"]
    assert os.getxattr(target / "c.raw", "user.xo.vdi").decode() == first
    assert "rsync sent it again only because it cannot read an imported file back" in mount.log_text()
    # A changed file (another time stamp) still replaces it, as a new VDI; the first one stays in XO.
    os.utime(src / "c.raw", (1_600_000_000, 1_600_000_000))
    sh("rsync", "-a", f"{src}/", f"{target}/")
    assert len(vdis(fresh_sim, name_label="c")) == 2


def test_two_mounts_sharing_a_state_directory_keep_each_others_import_records(fresh_sim, make_mount, tmp_path):
    """The default state directory is one per user, so two mounts of one XO share it: each one's saves
    replaced the other's records, and after a remount `cp -u` imported a file again (a second VDI)."""
    state = {"XOFS_STATE_DIR": str(tmp_path / "state-shared")}
    make_raw(tmp_path / "one.raw", 1 << 20)
    a, b = make_mount(fresh_sim, env=state), make_mount(fresh_sim, env=state)
    sr = sr_ids(fresh_sim)[0]
    sh("cp", str(tmp_path / "one.raw"), str(import_dir(a, sr) / "from-a.raw"))
    sh("cp", str(tmp_path / "one.raw"), str(import_dir(b, sr) / "from-b.raw"))
    sh("cp", str(tmp_path / "one.raw"), str(import_dir(a, sr) / "from-a-again.raw"))
    b.stop()
    b = make_mount(fresh_sim, env=state)
    assert sorted(os.listdir(import_dir(b, sr))) == ["from-a-again.raw", "from-a.raw", "from-b.raw"]
    count = len(vdis(fresh_sim))
    sh("cp", "-u", str(tmp_path / "one.raw"), str(import_dir(b, sr) / "from-b.raw"))
    assert len(vdis(fresh_sim)) == count and len(vdis(fresh_sim, name_label="from-b")) == 1


def test_rename_and_unlink_in_the_import_directory(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    make_raw(tmp_path / "x.raw", 1 << 20)
    sh("cp", str(tmp_path / "x.raw"), str(target / "x.raw"))
    vdi = one_vdi(fresh_sim, "x", sr)
    os.rename(target / "x.raw", target / "renamed.raw")
    assert one_vdi(fresh_sim, "renamed", sr)["id"] == vdi["id"]
    other = sh("mv", str(target / "renamed.raw"), str(target / "renamed.vhd"), check=False)
    assert other.returncode == 1 and other.stderr.endswith(": Operation not permitted\n"), other.stderr
    assert "that is a vhd name and the file is imported as raw" in mount.log_text()
    assert os.stat(target / "renamed.raw").st_size == 1 << 20
    os.unlink(target / "renamed.raw")
    assert os.listdir(target) == []
    assert one_vdi(fresh_sim, "renamed", sr)["id"] == vdi["id"]  # forgetting an import never deletes a disk
    proc = sh("mkdir", str(target / "dir"), check=False)
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr


# ---- refusals and failures ----------------------------------------------------------------------------------


def assert_refused(proc: subprocess.CompletedProcess, message: str, sim: SimProcess, before: int,
                   target: Path, mount: MountProcess) -> None:
    assert proc.returncode != 0, (proc.args, proc.stdout, proc.stderr)
    assert message in proc.stderr, (proc.args, proc.stderr)
    assert len(vdis(sim)) == before
    assert os.listdir(target) == []
    assert spools(mount) == []


def test_refused_content_fails_the_copy_and_leaves_nothing(fresh_sim, make_mount, tmp_path):
    require_tool("qemu-img")
    mount = make_mount(fresh_sim)
    srs = sr_ids(fresh_sim)
    sr, smallest = srs[0], srs[-1]
    target = import_dir(mount, sr)
    before = len(vdis(fresh_sim))

    (tmp_path / "notes.txt").write_text("hello\n")
    proc = sh("cp", str(tmp_path / "notes.txt"), str(target / "notes.txt"), check=False)
    assert_refused(proc, "Invalid argument", fresh_sim, before, target, mount)

    fixed = tmp_path / "fixed.vhd"
    sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(fixed), "2M")
    proc = sh("cp", str(fixed), str(target / "fixed.vhd"), check=False)
    assert_refused(proc, "Invalid argument", fresh_sim, before, target, mount)
    # One warning for the failure, not one more for each operation that reports it again, as qemu-img's
    # write, fsync and close do (helper 43)
    fd = os.open(target / "again.vhd", os.O_WRONLY | os.O_CREAT, 0o644)
    for step in (lambda: os.write(fd, fixed.read_bytes()), lambda: os.fsync(fd), lambda: os.close(fd)):
        with pytest.raises(OSError):
            step()
    warned = [line for line in mount.log_text().splitlines() if "WARNING" in line and "again.vhd" in line]
    assert len(warned) == 1, warned

    image, _ = make_vhd(tmp_path, "good.vhd")
    truncated = tmp_path / "truncated.vhd"
    truncated.write_bytes(image[: len(image) // 2])
    proc = sh("cp", str(truncated), str(target / "truncated.vhd"), check=False)
    assert_refused(proc, "Invalid argument", fresh_sim, before, target, mount)

    broken = bytearray(image)
    broken[70] ^= 0xFF
    (tmp_path / "broken.vhd").write_bytes(broken)
    proc = sh("rsync", "-a", str(tmp_path / "broken.vhd"), f"{target}/", check=False)
    assert_refused(proc, "Invalid argument", fresh_sim, before, target, mount)

    (tmp_path / "text.vhd").write_text("not a disk\n" * 1000)
    proc = sh("cp", str(tmp_path / "text.vhd"), str(target / "text.vhd"), check=False)
    assert_refused(proc, "Invalid argument", fresh_sim, before, target, mount)

    # A name that is no UTF-8 cannot be a VDI's name: refused at create (it used to end the mount).
    with pytest.raises(OSError) as err:
        open(os.fsencode(target) + b"/bad\xff\xfename.raw", "wb").close()
    assert err.value.errno == errno.EINVAL
    assert "the name is not valid UTF-8" in mount.log_text()
    assert os.listdir(target) == [] and len(vdis(fresh_sim)) == before

    free = next(s["size"] - s["usage"] for s in fresh_sim.get_json("/rest/v0/srs?fields=id,size,usage")
                if s["id"] == smallest)
    huge = tmp_path / "huge.vhd"
    sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(huge), str(free + (1 << 30)))
    proc = sh("cp", str(huge), str(import_dir(mount, smallest) / "huge.vhd"), check=False)
    assert_refused(proc, "No space left on device", fresh_sim, before, import_dir(mount, smallest), mount)
    assert "does not fit in SR" in mount.log_text()
    # Each refusal's line is one that troubleshooting.md explains.
    undocumented = [line for line in mount.log_text().splitlines() if " WARNING " in line and not documented(line)]
    assert undocumented == [], "\n".join(undocumented)


def test_xo_failure_fails_close_with_eio_and_leaves_nothing(fresh_sim, make_mount, tmp_path):
    require_tool("rsync")
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    make_raw(tmp_path / "f.raw", 1 << 20)
    before = len(vdis(fresh_sim))
    set_faults(fresh_sim, fail_next_import=True)
    proc = sh("cp", str(tmp_path / "f.raw"), str(target / "f.raw"), check=False)
    assert_refused(proc, "Input/output error", fresh_sim, before, target, mount)
    log = mount.log_text()
    assert f"/srs/{sr}/import/f.raw" in log and f"import into SR {sr} failed" in log
    assert "500 Internal Server Error" in log

    set_faults(fresh_sim, fail_next_import=True)
    proc = sh("rsync", "-a", str(tmp_path / "f.raw"), f"{target}/", check=False)
    assert_refused(proc, "Input/output error", fresh_sim, before, target, mount)


def test_a_killed_cp_leaves_no_vdi_and_no_spool(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    before = len(vdis(fresh_sim))
    fifo = tmp_path / "slow-source"
    os.mkfifo(fifo)
    cp = subprocess.Popen(["cp", str(fifo), str(target / "k.raw")], stderr=subprocess.PIPE)
    with open(fifo, "wb") as feed:
        feed.write(os.urandom(1 << 20))
        feed.flush()
        wait_for(lambda: (target / "k.raw").exists() and os.stat(target / "k.raw").st_size >= 1 << 20,
                 what="the first MiB in the import")
        cp.send_signal(signal.SIGKILL)
        assert cp.wait(10) == -signal.SIGKILL
    wait_for(lambda: os.listdir(target) == [], what="the entry to go")
    assert len(vdis(fresh_sim)) == before
    assert spools(mount) == []
    assert "was killed before it finished" in mount.log_text()


def test_sigkill_ends_a_cp_waiting_for_its_upload_and_the_upload_goes_on(fresh_sim, make_mount, tmp_path):
    """The kernel waits for a close's FLUSH without interruption: `kill -9` of a `cp` waiting for XO's
    answer left it in state D until XO answered (up to half an hour on a real XO). xofs looks for the
    SIGKILL and answers the close; the image was whole, so the upload goes on and the VDI is made."""
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    data = make_raw(tmp_path / "src.raw", 8 << 20)
    set_faults(fresh_sim, import_bytes_per_second=1 << 20)  # eight seconds of upload after the close
    cp = subprocess.Popen(["cp", str(tmp_path / "src.raw"), str(target / "killed.raw")], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.getxattr(target / "killed.raw", "user.xo.state") == b"uploading", 10,
                 "cp's close to wait for the upload")
        cp.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert cp.wait(10) == -signal.SIGKILL
        assert time.monotonic() - killed < 4, "the killed cp waited for XO's answer"  # half the upload's time
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.wait()
    set_faults(fresh_sim, import_bytes_per_second=None)
    wait_for(lambda: os.getxattr(target / "killed.raw", "user.xo.state") == b"imported", 20, "the import to end")
    assert raw_export(fresh_sim, one_vdi(fresh_sim, "killed", sr)["id"]) == data
    assert "was killed while it waited for XO's answer: the upload goes on" in mount.log_text()


def test_truncate_beyond_the_srs_free_space_fails_and_leaves_nothing(fresh_sim, make_mount, tmp_path):
    """`truncate -s 600G` answered ENOSPC but left an empty entry listed (QA); a finished import truncated
    so within its rewrite grace lost its VDI (review)."""
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    huge = sh("truncate", "-s", "1P", str(target / "huge.raw"), check=False)
    assert huge.returncode != 0 and "No space left on device" in huge.stderr, huge.stderr
    assert os.listdir(target) == []
    make_raw(tmp_path / "kept.raw", 1 << 20)
    sh("cp", str(tmp_path / "kept.raw"), str(target / "kept.raw"))
    kept = one_vdi(fresh_sim, "kept", sr)["id"]
    again = sh("truncate", "-s", "1P", str(target / "kept.raw"), check=False)  # within the 5 s grace
    assert again.returncode != 0 and "No space left on device" in again.stderr, again.stderr
    assert os.listdir(target) == ["kept.raw"] and one_vdi(fresh_sim, "kept", sr)["id"] == kept
    assert "does not fit in SR" in mount.log_text()


def test_a_failed_rewrite_of_a_whole_image_keeps_its_vdi(fresh_sim, make_mount, tmp_path):
    """QA: `cp a.vhd` then, within the 5 s rewrite grace, `truncate -s 1M` of it (refused at its close:
    no footer at its end) deleted the VDI of the whole image imported a second before."""
    require_tool("qemu-img")
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    make_raw(tmp_path / "src.raw", 3 << 20)
    sh("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", str(tmp_path / "src.raw"),
       str(tmp_path / "tr.vhd"))
    sh("cp", str(tmp_path / "tr.vhd"), str(target / "tr.vhd"))
    first = one_vdi(fresh_sim, "tr", sr)["id"]
    cut = sh("truncate", "-s", "1M", str(target / "tr.vhd"), check=False)
    assert cut.returncode != 0 and "Invalid argument" in cut.stderr, cut.stderr
    assert one_vdi(fresh_sim, "tr", sr)["id"] == first
    assert f"the import that was to replace VDI {first} failed; that VDI, of its earlier close, stays in XO" \
        in mount.log_text()


def test_read_only_mount_refuses_imports(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim, "--read-only")
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr)
    assert os.stat(target).st_mode & 0o777 == 0o500
    make_raw(tmp_path / "r.raw", 1 << 20)
    before = len(vdis(fresh_sim))
    proc = sh("cp", str(tmp_path / "r.raw"), str(target / "r.raw"), check=False)
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    assert len(vdis(fresh_sim)) == before


def test_fstat_of_a_descriptor_still_open_on_a_refused_import_works(fresh_sim, make_mount):
    mount = make_mount(fresh_sim)
    target = import_dir(mount, sr_ids(fresh_sim)[0])
    fd = os.open(target / "zeros.vhd", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as err:
            os.write(fd, bytes(512))  # no VHD footer: the import fails, and its entry goes
        assert err.value.errno == errno.EINVAL
        assert not (target / "zeros.vhd").exists()
        assert os.fstat(fd).st_size >= 0  # as on any filesystem (qemu-img reported ENOENT here)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_an_interrupted_rsync_leaves_no_cut_short_vdi(fresh_sim, make_mount, tmp_path):
    require_tool("rsync")
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    src = tmp_path / "big.raw"
    make_raw(src, 16 << 20)
    rsync = subprocess.Popen(["rsync", "--bwlimit=2000", str(src), f"{import_dir(mount, sr)}/"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: any(n.startswith(".big.raw.") for n in os.listdir(import_dir(mount, sr))), 10,
                 "rsync's temporary file")
        time.sleep(1)
        os.killpg(rsync.pid, signal.SIGINT)  # Ctrl-C: rsync closes its temporary file, then removes it
        assert rsync.wait(timeout=60) != 0
        # rsync's first process exits at once; its receiver removes the temporary file a moment later.
        wait_for(lambda: os.listdir(import_dir(mount, sr)) == [], 10, "rsync to remove its temporary file")
        wait_for(lambda: not [v for v in vdis(fresh_sim) if v["name_label"] == "big"], 10,
                 "no VDI made of the part rsync had sent")
        assert "rsync's temporary file, was removed instead of renamed" in mount.log_text()
    finally:
        # rsync's receiver and generator linger after Ctrl-C, asleep in the import directory (their working
        # directory): they kept the mount busy, and its unmount waited 15 s for the daemon, then killed it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rsync.pid, signal.SIGKILL)
        rsync.wait()
        wait_for(lambda: subprocess.run(["pgrep", "-g", str(rsync.pid)], capture_output=True).returncode == 1,
                 10, "rsync's processes to end")
    assert mount.stop() == 0


def test_touch_during_an_upload_does_not_wait_for_it(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim)
    target = import_dir(mount, sr_ids(fresh_sim)[0])
    make_raw(tmp_path / "slow.raw", 3 << 20)
    set_faults(fresh_sim, import_bytes_per_second=512 << 10)  # about 6 s of upload at the close
    cp = subprocess.Popen(["cp", str(tmp_path / "slow.raw"), str(target / "slow.raw")])
    try:
        wait_for(lambda: os.getxattr(target / "slow.raw", "user.xo.state") == b"uploading", 10, "the upload")
        started = time.monotonic()
        sh("touch", str(target / "slow.raw"))  # opens for writing, writes nothing, closes
        assert time.monotonic() - started < 3  # half the upload's time: touch did not wait for it
        assert os.getxattr(target / "slow.raw", "user.xo.state") == b"uploading"
        assert cp.wait(timeout=60) == 0
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.wait()
    assert len([v for v in vdis(fresh_sim) if v["name_label"] == "slow"]) == 1


def test_cp_a_and_mv_into_an_import_directory_leave_no_warning_for_acls(fresh_sim, make_mount, tmp_path):
    """`cp -a` and `mv` set a POSIX ACL on the copy and go on quietly when the mount refuses it (ENOTSUP);
    the mount logs that at debug level, so warnings (and `xofs status`'s recent errors) keep to real failures.
    A `user.*` attribute a user sets on purpose is still refused with a warning."""
    require_tool("setfattr")
    mount = make_mount(fresh_sim)
    target = import_dir(mount, sr_ids(fresh_sim)[0])
    for name in ("kept.raw", "moved.raw"):
        make_raw(tmp_path / name, 1 << 20)
    sh("cp", "-a", str(tmp_path / "kept.raw"), str(target / "kept.raw"))
    sh("mv", str(tmp_path / "moved.raw"), str(target / "moved.raw"))
    refused = sh("setfattr", "-n", "user.note", "-v", "x", str(target / "kept.raw"), check=False)
    assert refused.returncode != 0 and "Operation not supported" in refused.stderr
    warnings = [line for line in mount.log_text().splitlines() if " WARNING " in line]
    assert any("user.note" in line for line in warnings), warnings
    assert not any("posix_acl" in line for line in warnings), warnings


def test_a_failed_import_leaves_another_clients_import_of_the_same_name_under_way_alone(fresh_sim, make_mount,
                                                                                        tmp_path):
    """After a failed upload xofs looks for the VDI XO should have destroyed: one on the SR with the same
    name and the same import mark. Another client's import of the same name and length, begun meanwhile
    and still under way, looked just like it and was deleted under that client (helper 43): its pending
    XAPI task (the event feed's) now tells it apart."""
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = import_dir(mount, sr) / "same.raw"
    data = make_raw(tmp_path / "same.raw", 16 << 20)
    set_faults(fresh_sim, import_bytes_per_second=2 << 20)  # 8 s for each upload
    cp = subprocess.Popen(["cp", str(tmp_path / "same.raw"), str(target)], stderr=subprocess.PIPE, text=True)
    theirs: list = []
    try:
        wait_for(lambda: os.path.exists(target) and os.getxattr(target, "user.xo.state") == b"uploading", 10,
                 "our upload to begin")
        other = threading.Thread(target=lambda: theirs.append(fresh_sim.request(
            "POST", f"/rest/v0/srs/{sr}/vdis?raw=true&name_label=same", data,
            {"Content-Type": "application/octet-stream"})))
        other.start()
        wait_for(lambda: len(vdis(fresh_sim, name_label="same")) == 2, 10, "their VDI to be made")
        os.unlink(target)  # ours fails: its upload is cancelled
        assert cp.wait(30) != 0
        other.join(60)
    finally:
        cp.kill()
        cp.wait()
    status, _, body = theirs[0]
    assert status == 201, body
    assert raw_export(fresh_sim, one_vdi(fresh_sim, "same", sr)["id"]) == data
    log = mount.log_text()
    assert "an import of that name is under way" in log and "did not destroy" not in log


def test_an_import_xo_refused_is_not_followed_by_a_search_for_its_vdi(fresh_sim, make_mount, tmp_path):
    """XO's own answer to the upload (a 401 here, a 500 above) means no VDI is left: XO made none, or
    destroyed it. xofs looked all the same, and with a revoked token it listed every VDI once a minute,
    per failed file, until the token worked again, saying that XO did not answer (helper 45)."""
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    make_raw(tmp_path / "refused.raw", 1 << 20)
    status, _, _ = fresh_sim.request("POST", "/_sim/expire-token", json.dumps({"token": fresh_sim.token}).encode(),
                                     {"Content-Type": "application/json"})
    assert status == 204
    proc = sh("cp", str(tmp_path / "refused.raw"), str(import_dir(mount, sr) / "refused.raw"), check=False)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr
    time.sleep(1)
    assert "cannot check SR" not in mount.log_text()
