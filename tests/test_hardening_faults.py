"""Faults, each on a real mount of the simulator, each ending with the mount usable again without a remount:
the server restarted (idle, during a listing, mid-export, mid-import), the websocket closed or silent, a slow
server, 5xx bursts and dropped connections, an expired token, a killed daemon, a full spool directory.

Not repeated here (docs/reliability.md points at them): a dropped websocket and a plain restart
(`test_mount.py`), a cut export (`test_mount_exports.py`), an injected import failure and a killed `cp`
(`test_mount_imports.py`), the client's retries and timeouts (`test_client_rest.py`, `test_client_events.py`).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import trio

from tests.hardening_support import (
    MiB,
    RestartableSim,
    changes_sent,
    expire_token,
    first_vm,
    import_raw,
    pattern_bytes,
    record,
    rename_vm,
    reset_faults,
    reset_stats,
    rpc,
    set_faults,
    stats,
    vdi_ids,
    writable_sr,
)
from tests.support import MountProcess, SimProcess, is_mounted, require_tool, wait_for

pytestmark = pytest.mark.mount


@pytest.fixture
def rsim(tmp_path):
    server = RestartableSim(tmp_path, "--seed", "11")
    yield server
    server.close()


def meta(mount: MountProcess, path: str) -> dict:
    return json.loads((mount.mountpoint / path / "meta.json").read_bytes())


def live_count(mount: MountProcess) -> int:
    """How many times the event feed went live (once at start, once per reconnection)."""
    return mount.log_text().count(": live")


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def disk_on_a_mount(rsim, make_mount, name: str, seed: int, *mount_args: str):
    """A new 4 MiB disk of `pattern_bytes(seed)` called `name`, and a mount (`mount_args`) that shows it:
    (the bytes, the VDI's id, the simulator, the mount, its `.raw` on the mount)."""
    data = pattern_bytes(4 * MiB, seed)
    vdi = import_raw(rsim.sim, data, name)
    mount = make_mount(rsim.sim, *mount_args)
    src = mount / "vdis" / f"{vdi}.raw"
    wait_for(src.exists, 10, "the disk on the mount")
    return data, vdi, rsim.sim, mount, src


def wait_live_again(mount: MountProcess, before: int, timeout: float = 30) -> None:
    wait_for(lambda: live_count(mount) > before, timeout, "the event feed to be live again")


def assert_listing_matches(mount: MountProcess, sim: SimProcess) -> None:
    """The mount lists exactly XO's VMs, with their current names in /by-name."""
    vms = sim.get_json("/rest/v0/vms?fields=id,name_label")
    listed = set(os.listdir(mount / "vms"))
    assert {v["id"] for v in vms} == {n for n in listed if "." not in n}
    assert {v["name_label"] for v in vms} <= set(os.listdir(mount / "by-name" / "vms"))


# ---- the server restarted --------------------------------------------------------------------------------

def test_restart_while_idle(rsim, make_mount):
    mount = make_mount(rsim.sim, "--attr-ttl", "300")
    vm = first_vm(rsim.sim)
    started = live_count(mount)
    rsim.stop()
    wait_for(lambda: "event feed lost" in mount.log_text(), 10, "the loss of the server to be noticed")
    # Served from memory meanwhile: listings, metadata, names.
    assert vm["id"] in os.listdir(mount / "vms")
    assert meta(mount, f"vms/{vm['id']}")["name_label"] == vm["name_label"]
    sim = rsim.start()
    rename_vm(sim, vm["id"], "renamed-while-reconnecting")  # most likely before the feed is back: the resync
    wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "renamed-while-reconnecting", 30,
             "the rename made while the feed was away")
    wait_live_again(mount, started)
    rename_vm(sim, vm["id"], "renamed-after")  # and through events again
    wait_for(lambda: "renamed-after" in os.listdir(mount / "by-name" / "vms"), 5, "the rename through events")
    assert "renamed-while-reconnecting" not in os.listdir(mount / "by-name" / "vms")
    assert_listing_matches(mount, sim)


def test_restart_during_a_listing(rsim, make_mount):
    """The server dies while the mount re-reads every collection (and while `find` walks the mount)."""
    mount = make_mount(rsim.sim, "--attr-ttl", "300")
    vm = first_vm(rsim.sim)
    started = live_count(mount)
    set_faults(rsim.sim, latency_ms=2000)
    reset_stats(rsim.sim)
    walker = subprocess.Popen(["sh", "-c", f"for i in 1 2 3 4 5 6 7 8; do find {mount.mountpoint} >/dev/null "
                               f"|| exit 1; ls -l {mount.mountpoint}/vms >/dev/null || exit 1; sleep 0.3; done"])
    assert rsim.sim.request("POST", "/_sim/close-websockets", b"")[0] == 204
    wait_for(lambda: stats(rsim.sim)["routes"].get("GET /rest/v0/vms", 0) > 0, 15,
             "the mount's re-read of the collections to begin")
    rsim.stop(kill=True)  # mid-listing: the answers, held by the latency, never come
    sim = rsim.start()
    assert walker.wait(60) == 0, "find and ls -l fail while the server is away"
    wait_live_again(mount, started, 40)
    rename_vm(sim, vm["id"], "after-listing-restart")
    wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "after-listing-restart", 10,
             "events after the restart")
    assert_listing_matches(mount, sim)


def test_restart_mid_export_fails_the_copy_then_the_next_copy_is_exact(rsim, make_mount, tmp_path):
    require_tool("pv")
    data = pattern_bytes(48 * MiB, 1)
    vdi = import_raw(rsim.sim, data, "restart-export")
    mount = make_mount(rsim.sim)
    src = mount / "vdis" / f"{vdi}.raw"
    wait_for(src.exists, 10, "the imported disk on the mount")
    started = live_count(mount)
    out = tmp_path / "cut.raw"
    with open(out, "wb") as sink:
        reader = subprocess.Popen(["pv", "-q", "-L", "8m", str(src)], stdout=sink, stderr=subprocess.PIPE)
        wait_for(lambda: out.stat().st_size > 4 * MiB, 20, "the copy to be under way")
        rsim.stop(kill=True)
        assert reader.wait(60) != 0, "a copy cut by a server restart must fail"
        stderr = reader.stderr.read().decode()
    assert "Input/output error" in stderr, stderr
    assert out.stat().st_size < len(data)
    rsim.start()
    wait_live_again(mount, started)
    copy = tmp_path / "again.raw"
    assert run("cp", str(src), str(copy)).returncode == 0
    assert copy.read_bytes() == data
    record("faults", "server restarted mid-export", result="cp exit non-zero (EIO), next cp byte-exact",
           bytes_checked=len(data), bytes_lost=0)


def test_restart_mid_import_fails_the_close_and_leaves_no_vdi(rsim, make_mount, tmp_path):
    mount = make_mount(rsim.sim)
    sr = writable_sr(rsim.sim)
    src = tmp_path / "restart-import.raw"
    src.write_bytes(pattern_bytes(16 * MiB, 2))
    set_faults(rsim.sim, import_bytes_per_second=2 * MiB)  # slow enough to be caught mid-upload
    cp = subprocess.Popen(["cp", str(src), str(mount / f"srs/{sr}/import/restart-import.raw")],
                          stderr=subprocess.PIPE, text=True)
    wait_for(lambda: vdi_ids(rsim.sim, "restart-import"), 20, "XO to create the VDI of the upload")
    rsim.stop(kill=True)  # XO dies with the VDI made and its content half written
    assert cp.wait(60) != 0
    assert "Input/output error" in cp.stderr.read()
    sim = rsim.start()
    # The VDI the interrupted upload made is gone once the server is back: XO left it, xofs removes it.
    wait_for(lambda: not vdi_ids(sim, "restart-import"), 45, "the half-made VDI to be removed")
    assert os.listdir(mount / f"srs/{sr}/import") == []
    assert "restart-import" in mount.log_text()
    # And the next copy works, without a remount.
    assert run("cp", str(src), str(mount / f"srs/{sr}/import/restart-import.raw")).returncode == 0
    assert len(vdi_ids(sim, "restart-import")) == 1


# ---- the websocket ---------------------------------------------------------------------------------------

def test_closed_websocket_reconnects_with_backoff_and_shows_what_changed_meanwhile(rsim, make_mount):
    sim = rsim.sim
    mount = make_mount(sim, "--attr-ttl", "300", "--connect-timeout", "1")
    vm = first_vm(sim)
    spare = sorted(vdi_ids(sim, "spare disk"))[0]
    assert (mount / "vdis" / spare / "meta.json").exists()
    started = live_count(mount)
    # Keep it from coming back at once: new sockets get no answer to their sign-in while this is set.
    set_faults(sim, silent_websockets=True)
    assert sim.request("POST", "/_sim/close-websockets", b"")[0] == 204
    wait_for(lambda: mount.log_text().count("reconnecting in") >= 3, 30, "three failed reconnections")
    rename_vm(sim, vm["id"], "changed-while-disconnected")
    assert sim.request("DELETE", f"/rest/v0/vdis/{spare}")[0] == 204
    set_faults(sim, silent_websockets=False)
    wait_live_again(mount, started, 40)
    wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "changed-while-disconnected", 5,
             "the rename made while disconnected (the kernel cache lasts 300 s: only an invalidation shows it)")
    wait_for(lambda: not (mount / "vdis" / spare).exists(), 5, "the VDI deleted while disconnected to vanish")
    delays = [float(d) for d in re.findall(r"reconnecting in ([0-9.]+) s", mount.log_text())]
    assert len(set(delays)) > 1, f"no jitter or backoff in the reconnection delays {delays}"
    assert "event feed lost" in mount.log_text()


def test_silent_websocket_is_found_by_the_keepalive(rsim, make_mount):
    """Open but silent: no frame, no answer. The keepalive (a call every 5 s here, answered within 5 s; 30 s
    by default, which made this test take a minute) must notice. The silence counts towards --poll-interval
    (5 s here, 30 by default): XO's objects are read again at once, the feed still silent, and what changed
    meanwhile shows (it showed a poll interval later: helper 48). Then the feed reconnects."""
    sim = rsim.sim
    mount = make_mount(sim, "--attr-ttl", "300", "--keepalive", "5", "--poll-interval", "5")
    vm = first_vm(sim)
    started = live_count(mount)
    set_faults(sim, silent_websockets=True)
    since = time.monotonic()
    rename_vm(sim, vm["id"], "renamed-into-the-silence")  # its event is never delivered
    time.sleep(1)
    assert meta(mount, f"vms/{vm['id']}")["name_label"] == vm["name_label"]  # nothing came through
    wait_for(lambda: "no answer to the keepalive call" in mount.log_text(), 15, "the keepalive to notice")
    detected = time.monotonic() - since
    assert detected <= 2 * 5 + 3, f"a silent websocket found after {detected:.1f} s with a keepalive of 5 s"
    # Within half the poll interval: the read made at once, not one a poll interval after the loss was found.
    wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "renamed-into-the-silence", 2.5,
             "the change made during the silence, from the re-read made at once")
    set_faults(sim, silent_websockets=False)
    wait_live_again(mount, started, 40)
    record("faults", "silent websocket (keepalive 5 s)", detected_after_s=round(detected, 1), bound_s=10)


def test_a_short_keepalive_finds_a_silent_websocket_within_twice_its_interval(fresh_sim, make_mount):
    """`-o keepalive=1` reaches the mount's feed: the same silence is found within about 2 s, not a minute."""
    mount = make_mount(fresh_sim, "-o", "keepalive=1", "--connect-timeout", "1")
    started = live_count(mount)
    set_faults(fresh_sim, silent_websockets=True)
    since = time.monotonic()
    wait_for(lambda: "no answer to the keepalive call within 1 s" in mount.log_text(), 10, "the keepalive to notice")
    detected = time.monotonic() - since
    assert detected <= 2 + 1, f"a silent websocket found after {detected:.1f} s with a keepalive of 1 s"
    set_faults(fresh_sim, silent_websockets=False)
    wait_live_again(mount, started)


def test_while_the_feed_stays_down_changes_in_xo_show_within_the_poll_interval(fresh_sim, make_mount):
    """A feed that cannot come back (here: websockets that never answer; a proxy refusing upgrades is the same)
    left the mount showing what it last knew for ever. `--poll-interval 1` reads XO's objects again every
    second while the feed is down: a rename and a deletion made in XO show, and `status.json` says so."""
    mount = make_mount(fresh_sim, "--keepalive", "1", "--connect-timeout", "1", "--poll-interval", "1")
    vm = first_vm(fresh_sim)
    spare = sorted(vdi_ids(fresh_sim, "spare disk"))[0]
    assert (mount / "vdis" / spare / "meta.json").exists()
    started = live_count(mount)
    set_faults(fresh_sim, silent_websockets=True)
    wait_for(lambda: "no answer to the keepalive call" in mount.log_text(), 10, "the keepalive to notice")
    rename_vm(fresh_sim, vm["id"], "renamed-while-the-feed-is-down")
    assert fresh_sim.request("DELETE", f"/rest/v0/vdis/{spare}")[0] == 204
    wait_for(lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "renamed-while-the-feed-is-down", 10,
             "the rename made while the feed is down")
    wait_for(lambda: not (mount / "vdis" / spare).exists(), 5, "the deleted VDI to vanish")
    assert live_count(mount) == started, "the feed came back: the test showed nothing about polling"
    status = json.loads((mount.mountpoint / ".xofs" / "status.json").read_bytes())
    assert not status["feed"]["connected"] and status["feed"]["polls"] >= 1, status["feed"]
    assert status["feed"]["last_read_age"] < 5, status["feed"]
    shown = subprocess.run([sys.executable, "-m", "xofs", "status", str(mount.mountpoint)], capture_output=True,
                           text=True, timeout=30)
    assert re.search(r"^  objects read .+ ago \(\d+ read\(s\) while the feed was down\)$", shown.stdout, re.M), \
        shown.stdout + shown.stderr
    # Every 1 s, or ten times the first read's duration if that was longer (a loaded machine).
    assert re.search(r"re-reading XO's objects every [0-9.]+ s until it is back", mount.log_text())
    set_faults(fresh_sim, silent_websockets=False)
    wait_live_again(mount, started)


# ---- a slow server ---------------------------------------------------------------------------------------

def test_slow_server_listings_from_cache_and_a_stalled_export_fails_after_the_read_timeout(rsim, make_mount,
                                                                                           tmp_path):
    data, vdi, sim, mount, src = disk_on_a_mount(rsim, make_mount, "slow", 3, "--read-timeout", "3")
    set_faults(sim, latency_ms=700)
    reset_stats(sim)
    began = time.monotonic()
    assert run("ls", "-lR", str(mount / "vms")).returncode == 0
    assert run("find", str(mount.mountpoint), "-name", "meta.json").returncode == 0
    assert time.monotonic() - began < 5, "listings must come from memory, not wait for a slow XO"
    assert stats(sim)["total"] == 0, stats(sim)  # no listing asked XO anything
    began = time.monotonic()
    assert run("cp", str(src), str(tmp_path / "slow.raw")).returncode == 0
    assert (tmp_path / "slow.raw").read_bytes() == data
    assert time.monotonic() - began >= 0.7  # the latency was real
    set_faults(sim, latency_ms=0, stall_export_after_bytes=MiB)
    began = time.monotonic()
    stalled = run("cp", str(src), str(tmp_path / "stalled.raw"), timeout=60)
    took = time.monotonic() - began
    assert stalled.returncode != 0 and "Input/output error" in stalled.stderr
    assert 3 <= took < 15, f"a stalled export must fail after the 3 s read timeout, not after {took:.1f} s"
    assert f"/vdis/{vdi}.raw" in mount.log_text()
    reset_faults(sim)
    assert run("cp", str(src), str(tmp_path / "after.raw")).returncode == 0
    assert (tmp_path / "after.raw").read_bytes() == data
    record("faults", "stalled export", failed_after_s=round(took, 1), read_timeout_s=3)


def test_an_export_that_trickles_fails_the_read_after_twice_the_read_timeout(rsim, make_mount, tmp_path):
    """XO sends, but slowly: never silent for the read timeout, so the socket never gives up. A read the
    daemon has taken holds its reader in the kernel, unkillable; once some of its bytes came but not all
    within twice the read timeout, it fails (EIO) instead of answering short, which a copy through the page
    cache would take for the end of the file."""
    data, vdi, sim, mount, src = disk_on_a_mount(rsim, make_mount, "trickle", 5, "--read-timeout", "1")
    set_faults(sim, export_bytes_per_second=64 << 10)  # a MiB in 16 s, a piece every 0.1 s
    try:
        began = time.monotonic()
        slow = run("cp", str(src), str(tmp_path / "slow.raw"), timeout=60)
        took = time.monotonic() - began
        # Through the page cache (sendfile): the kernel's read-ahead requests fail the same way, but it then
        # reads the page it needs alone, which comes in time, and goes on: the copy creeps on at XO's pace,
        # with the right bytes, and can be killed. (A short answer would have ended it there, exit 0.)
        set_faults(sim, export_bytes_per_second=16 << 10)
        copier = subprocess.Popen([sys.executable, "-c", "import shutil, sys; shutil.copyfile(*sys.argv[1:])",
                                   str(src), str(tmp_path / "sendfile.raw")])
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                copier.wait(timeout=6)
        finally:
            copier.kill()
            killed_at = time.monotonic()
            copier.wait(timeout=30)
        assert time.monotonic() - killed_at < 5
        got = (tmp_path / "sendfile.raw").read_bytes()
        assert 0 < len(got) < len(data) and got == data[:len(got)]
    finally:
        reset_faults(sim)
    assert slow.returncode != 0 and "Input/output error" in slow.stderr
    assert 2 <= took < 10, f"a trickling export must fail a read after 2 s (twice the read timeout), not {took:.1f} s"
    assert re.search(rf"/vdis/{vdi}\.raw.* of the 1048576 bytes of a read at 0 came in 2 s: XO's export is stalled "
                     "or too slow", mount.log_text())
    assert run("cp", str(src), str(tmp_path / "after.raw")).returncode == 0
    assert (tmp_path / "after.raw").read_bytes() == data
    record("faults", "trickling export", failed_after_s=round(took, 1), read_timeout_s=1)


def test_qemu_img_reading_ahead_of_a_slow_steady_export_is_not_taken_for_a_stall(rsim, make_mount, tmp_path):
    """qemu-img reads a `.vhd` out of order (from the spool), ahead of the stream: with each read's deadline
    counted from the read's start, `qemu-img convert` of an export streaming a steady 1 MiB/s failed
    ("… came in 2 s: XO's export is stalled") at `--read-timeout 1` where `cp` worked (helper 41). It counts
    from the read's first byte."""
    require_tool("qemu-img")
    data, vdi, sim, mount, src = disk_on_a_mount(rsim, make_mount, "steady", 7, "--read-timeout", "1")
    vhd = mount / "vdis" / f"{vdi}.vhd"
    set_faults(sim, export_bytes_per_second=MiB)
    try:
        converted = run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(tmp_path / "out.raw"),
                        timeout=60)
    finally:
        reset_faults(sim)
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "out.raw").read_bytes() == data
    assert "stalled or too slow" not in mount.log_text()


def test_head_of_an_export_cut_further_on_gets_its_bytes_and_cp_fails(rsim, make_mount, tmp_path):
    """The read-ahead met the cut before `head` read on: every later read failed, even of bytes received
    before the break (helper 41: `head -c 3000000` of a stream cut at 5 MB exited 1). They are the export's
    bytes; a read past them still fails."""
    data, vdi, sim, mount, src = disk_on_a_mount(rsim, make_mount, "cut-later", 8)
    set_faults(sim, cut_export_after_bytes=3 * MiB + 11)
    try:
        head = subprocess.run(["head", "-c", "1000000", str(src)], capture_output=True, timeout=60)
        copied = run("cp", str(src), str(tmp_path / "cut.raw"))
    finally:
        reset_faults(sim)
    assert head.returncode == 0 and head.stdout == data[:1000000], head.stderr
    assert copied.returncode != 0 and "Input/output error" in copied.stderr


def test_a_stop_cancels_the_export_reads_under_way_at_once(rsim, make_mount, tmp_path):
    """SIGTERM while a read waits for a stalled export: the stop gave it the whole import wait (30 s) and its
    reader, in the kernel, could not even be killed meanwhile (helper 41). Exports are cancelled at once."""
    data, vdi, sim, mount, src = disk_on_a_mount(rsim, make_mount, "stopped", 6)
    set_faults(sim, stall_export_after_bytes=MiB + 5)
    out = tmp_path / "out.raw"
    with open(out, "wb") as sink:
        reader = subprocess.Popen(["cat", str(src)], stdout=sink, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: out.stat().st_size >= MiB, 10, "the first MiB")
        time.sleep(0.5)  # the next read waits for the stalled export
        began = time.monotonic()
        mount.proc.send_signal(signal.SIGTERM)
        assert reader.wait(timeout=15) != 0
        took = time.monotonic() - began
    finally:
        reader.kill()
        reader.wait()
    assert took < 5, f"the reader waited {took:.1f} s for the stop"
    # The read under way gets EIO, as troubleshooting.md says; the close after it finds the mount gone.
    said = reader.stderr.read().decode()
    assert f"cat: {src}: Input/output error" in said, said
    assert mount.proc.wait(timeout=30) == 0
    cancelled = [line for line in mount.log_text().splitlines() if "was cancelled: the mount is stopping" in line]
    assert cancelled and all(line.count("/rest/v0/vdis/") == 1 for line in cancelled), cancelled
    assert out.read_bytes() == data[:len(out.read_bytes())]
    reset_faults(sim)


# ---- 5xx and dropped connections -------------------------------------------------------------------------

def test_5xx_bursts_and_dropped_connections_on_gets_are_retried(rsim, make_mount, tmp_path):
    data, vdi, sim, mount, src = disk_on_a_mount(rsim, make_mount, "retried", 4, "--attr-ttl", "300")
    vm = first_vm(sim)
    for knob in ("http_5xx_next", "reset_next_gets"):
        started = live_count(mount)
        set_faults(sim, **{knob: 2})
        assert sim.request("POST", "/_sim/close-websockets", b"")[0] == 204
        # Through JSON-RPC, which the REST faults do not touch; the mount sees it in its re-read.
        trio.run(functools.partial(rpc, sim, "vm.set", {"id": vm["id"], "name_label": f"after-{knob}"}))
        wait_live_again(mount, started)
        wait_for(lambda k=knob: meta(mount, f"vms/{vm['id']}")["name_label"] == f"after-{k}", 10,
                 f"the re-read through {knob}")
        assert set_faults(sim)[knob] == 0, "the faults were used up"
    assert mount.log_text().count("retrying") >= 4
    # An export whose start answers 5xx is retried, and so is one whose connection drops after the headers,
    # before any byte of the body (it was EIO: nothing was delivered, so trying again is safe; helper 41);
    # three drops in a row are EIO.
    set_faults(sim, http_5xx_next=2)
    assert run("cp", str(src), str(tmp_path / "5xx.raw")).returncode == 0
    assert (tmp_path / "5xx.raw").read_bytes() == data
    for n in (1, 2):
        set_faults(sim, reset_next_gets=n)
        assert run("cp", str(src), str(tmp_path / "dropped.raw")).returncode == 0
        assert (tmp_path / "dropped.raw").read_bytes() == data
    set_faults(sim, reset_next_gets=3)
    dropped = run("cp", str(src), str(tmp_path / "dropped3.raw"))
    assert dropped.returncode != 0 and "Input/output error" in dropped.stderr
    ended = [line for line in mount.log_text().splitlines() if "ended early: the connection closed after 0" in line]
    assert ended and all(line.count("/rest/v0/vdis/") == 1 for line in ended), ended  # the export named once
    assert run("cp", str(src), str(tmp_path / "after.raw")).returncode == 0
    assert (tmp_path / "after.raw").read_bytes() == data
    assert_listing_matches(mount, sim)


def test_a_5xx_on_an_upload_is_never_retried(rsim, make_mount, tmp_path):
    sim = rsim.sim
    mount = make_mount(sim)
    sr = writable_sr(sim)
    src = tmp_path / "once.raw"
    src.write_bytes(pattern_bytes(2 * MiB, 5))
    reset_stats(sim)
    set_faults(sim, http_5xx_next=1)
    failed = run("cp", str(src), str(mount / f"srs/{sr}/import/once.raw"))
    assert failed.returncode != 0 and "Input/output error" in failed.stderr
    assert changes_sent(stats(sim)) == {"POST /rest/v0/srs/{id}/vdis": 1}, "an upload is sent once, never again"
    assert not vdi_ids(sim, "once") and os.listdir(mount / f"srs/{sr}/import") == []
    assert run("cp", str(src), str(mount / f"srs/{sr}/import/once.raw")).returncode == 0
    assert len(vdi_ids(sim, "once")) == 1


# ---- the token -------------------------------------------------------------------------------------------

async def test_an_expired_token_is_eacces_with_one_log_line_and_a_new_token_in_the_file_recovers(
        rsim, make_mount, tmp_path):
    sim = rsim.sim
    data = pattern_bytes(2 * MiB, 6)
    vdi = import_raw(sim, data, "token")
    token_file = tmp_path / "token"
    token_file.write_text(sim.token + "\n")
    token_file.chmod(0o600)
    mount = make_mount(sim, "--token-file", str(token_file), env={"XOFS_TOKEN": ""})
    src = mount / "vdis" / f"{vdi}.raw"
    wait_for(src.exists, 10, "the disk on the mount")
    vm = first_vm(sim)
    expire_token(sim, sim.token)
    for _ in range(3):
        with pytest.raises(PermissionError):
            src.read_bytes()
    refusals = [line for line in mount.log_text().splitlines() if "refuses the token" in line]
    assert len(refusals) == 1, refusals
    # A new token, as `xofs login` or an administrator would make it, written where the mount reads it.
    new = await rpc(sim, "token.create", {"description": "rotated"},
                    sign_in={"email": "admin@admin.net", "password": "admin"})
    token_file.write_text(new + "\n")
    assert await trio.to_thread.run_sync(src.read_bytes) == data
    sim.token = new  # the test's own requests too
    rename_vm(sim, vm["id"], "after-rotation")
    await trio.to_thread.run_sync(lambda: wait_for(
        lambda: meta(mount, f"vms/{vm['id']}")["name_label"] == "after-rotation", 60, "events after the rotation"))


# ---- the daemon killed -----------------------------------------------------------------------------------

def test_a_daemon_killed_mid_import_leaves_no_mount_no_vdi_and_the_next_start_cleans_its_spool(
        rsim, make_mount, tmp_path):
    sim = rsim.sim
    state = tmp_path / "mount-state"
    mount = make_mount(sim, env={"XOFS_STATE_DIR": str(state)})
    sr = writable_sr(sim)
    src = tmp_path / "killed.raw"
    src.write_bytes(pattern_bytes(16 * MiB, 7))
    set_faults(sim, import_bytes_per_second=2 * MiB)
    cp = subprocess.Popen(["cp", str(src), str(mount / f"srs/{sr}/import/killed.raw")], stderr=subprocess.PIPE)
    wait_for(lambda: vdi_ids(sim, "killed"), 20, "the upload to begin")
    spools = list(state.rglob("*.spool"))
    assert spools, "the import is spooled under the state directory"
    mount.proc.kill()
    mount.proc.wait(10)
    killed = time.monotonic()
    assert cp.wait(30) != 0
    wait_for(lambda: not is_mounted(mount.mountpoint), 30, "auto_unmount to remove the dead mount")
    record("faults", "daemon killed mid-import", unmounted_after_s=round(time.monotonic() - killed, 1))
    wait_for(lambda: not vdi_ids(sim, "killed"), 30, "XO to drop the VDI of the cut upload")
    assert all(p.exists() for p in spools), "the dead daemon's spool is still there"
    reset_faults(sim)
    again = make_mount(sim, env={"XOFS_STATE_DIR": str(state)})
    assert not any(p.exists() for p in spools), "the next start removes the dead daemon's spools"
    assert os.listdir(again / f"srs/{sr}/import") == []
    assert not vdi_ids(sim, "killed")


# ---- the spool directory full ----------------------------------------------------------------------------

@pytest.fixture
def small_spool(tmp_path):
    """An 8 MiB tmpfs to spool into (the test runs as root, as scripts/test does)."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run it as root (scripts/test does)")
    spool = tmp_path / "spoolfs"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(spool)], check=True)
    yield spool
    subprocess.run(["umount", "-l", str(spool)], check=False)


def test_a_full_spool_directory_fails_the_write_with_enospc_and_leaves_nothing(rsim, make_mount, tmp_path,
                                                                              small_spool):
    sim = rsim.sim
    mount = make_mount(sim, "--spool-dir", str(small_spool))
    sr = writable_sr(sim)
    src = tmp_path / "big.raw"
    src.write_bytes(pattern_bytes(32 * MiB, 8))
    reset_stats(sim)
    with open(src, "rb") as f, pytest.raises(OSError) as failure:
        with open(mount / f"srs/{sr}/import/big.raw", "wb") as out:
            while block := f.read(MiB):
                out.write(block)
    assert failure.value.errno == errno.ENOSPC, failure.value
    proc = run("cp", str(src), str(mount / f"srs/{sr}/import/big2.raw"))
    assert proc.returncode != 0 and "No space left on device" in proc.stderr
    assert changes_sent(stats(sim)) == {}, "nothing was uploaded"
    assert os.listdir(mount / f"srs/{sr}/import") == []
    assert [p for p in small_spool.rglob("*") if p.is_file()] == [], "nothing is left in the spool"
    assert "No space left on device" in mount.log_text() or "ENOSPC" in mount.log_text()
    # Room again: the same copy of a smaller file works without a remount.
    small = tmp_path / "small.raw"
    small.write_bytes(pattern_bytes(2 * MiB, 9))
    assert run("cp", str(small), str(mount / f"srs/{sr}/import/small.raw")).returncode == 0
    assert len(vdi_ids(sim, "small")) == 1
    mount.stop()
