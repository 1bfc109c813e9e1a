"""Load: 16 exports and 8 imports at once, `find` and `ls -l` in a loop, 200 events a second of churn.

For a bounded time (40 s in CI, which has 15 minutes for everything; `scripts/reliability` runs it longer
through `$XOFS_RELIABILITY_LOAD_SECONDS`): no deadlock (every worker finishes, the mount answers at the end),
every copy byte-exact (exports hashed against XO's own bytes, imports read back from XO, then deleted in
XO so that the object count stays level), the daemon's memory bounded, and its file descriptors and
threads back where they started once the load is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hardening_support import (
    DaemonProbe,
    MiB,
    import_raw,
    pattern_bytes,
    record,
    scaled,
    writable_sr,
)
from tests.support import MountProcess, SimProcess, wait_for

pytestmark = pytest.mark.mount

SECONDS = scaled("load_seconds", 40)
EXPORTERS, IMPORTERS = 16, 8
DISK_SIZE = 8 * MiB
IMPORT_SIZE = 4 * MiB


@dataclass
class Tally:
    """What the workers did, and every way it went wrong (all must stay empty)."""

    exports: int = 0
    export_bytes: int = 0
    imports: int = 0
    import_bytes: int = 0
    bytes_lost: int = 0
    walks: int = 0
    slowest_walk: float = 0.0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def run(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def exporter(mount: MountProcess, files: list[tuple[Path, str]], n: int, deadline: float, tally: Tally) -> None:
    i = n
    while time.monotonic() < deadline:
        path, expected = files[i % len(files)]
        i += 1
        proc = run("sha256sum", str(path))
        if proc.returncode != 0:
            tally.fail(f"sha256sum {path}: {proc.stderr.strip()}")
        elif proc.stdout.split()[0] != expected:
            tally.fail(f"{path}: the bytes differ from XO's")
        else:
            with tally.lock:
                tally.exports += 1
                tally.export_bytes += path.stat().st_size


def importer(sim: SimProcess, mount: MountProcess, sr: str, scratch: Path, n: int, deadline: float,
             tally: Tally) -> None:
    """Copy a new image in, read its VDI back from XO, then delete the VDI in XO (so that the number of
    objects, and with it the cost of a walk, stays level however long the load runs)."""
    i = 0
    while time.monotonic() < deadline:
        name = f"load-{n}-{i}"
        i += 1
        data = pattern_bytes(IMPORT_SIZE, 1000 * n + i)
        src = scratch / f"{name}.raw"
        src.write_bytes(data)
        proc = run("cp", str(src), str(mount / f"srs/{sr}/import/{name}.raw"))
        src.unlink()
        if proc.returncode != 0:
            tally.fail(f"cp {name}: {proc.stderr.strip()}")
            continue
        try:
            vdi = os.getxattr(mount / f"srs/{sr}/import/{name}.raw", "user.xo.vdi").decode()
        except OSError as err:
            tally.fail(f"{name}: no VDI after the copy: {err}")
            continue
        code, _, body = sim.request("GET", f"/rest/v0/vdis/{vdi}.raw")
        with tally.lock:
            tally.imports += 1
            tally.import_bytes += len(data)
            if code != 200 or body != data:
                tally.bytes_lost += len(data)
                tally.failures.append(f"{name}: VDI {vdi} does not hold what was copied in")
        if sim.request("DELETE", f"/rest/v0/vdis/{vdi}")[0] != 204:
            tally.fail(f"{name}: VDI {vdi} could not be deleted")


def walker(mount: MountProcess, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        began = time.monotonic()
        for cmd in (["find", str(mount.mountpoint), "-path", "*/import", "-prune", "-o", "-print"],
                    ["ls", "-l", str(mount / "vms"), str(mount / "vdis"), str(mount / "by-name" / "vms")]):
            proc = run(*cmd, timeout=60)
            # The importers delete their VDIs in XO meanwhile: an entry listed, then gone before the walk
            # reaches it, is what any live filesystem does. Any other error is a failure.
            errors = [line for line in proc.stderr.splitlines() if not line.endswith("No such file or directory")]
            if errors or (proc.returncode != 0 and not proc.stderr):
                tally.fail(f"{cmd[0]}: {errors[:3]}")
        with tally.lock:
            tally.walks += 1
            tally.slowest_walk = max(tally.slowest_walk, time.monotonic() - began)


def status(mount: MountProcess) -> dict:
    return json.loads((mount / ".xofs" / "status.json").read_bytes())


@pytest.mark.timeout(SECONDS + 240)
def test_exports_imports_walks_and_churn_at_once(tmp_path, make_mount):
    sim = SimProcess(args=["--seed", "3", "--churn", "200", "--state-dir", str(tmp_path / "sim-state")],
                     log_path=tmp_path / "sim.log").start()
    try:
        disks = [import_raw(sim, pattern_bytes(DISK_SIZE, 100 + k), f"load-src-{k}") for k in range(4)]
        expected = {}
        for vdi in disks:
            for fmt in ("raw", "vhd"):
                code, _, body = sim.request("GET", f"/rest/v0/vdis/{vdi}.{fmt}")
                assert code == 200
                expected[(vdi, fmt)] = hashlib.sha256(body).hexdigest()
        mount = make_mount(sim, "--max-exports", str(EXPORTERS), "--max-uploads", str(IMPORTERS))
        files = [(mount / "vdis" / f"{vdi}.{fmt}", digest) for (vdi, fmt), digest in expected.items()]
        wait_for(lambda: all(p.exists() for p, _ in files), 10, "the disks on the mount")
        sr = writable_sr(sim)
        probe = DaemonProbe(mount.proc.pid)
        before = probe.snapshot()
        feed_before = status(mount)["feed"]
        tally = Tally()
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        peak = before["rss"]
        samples: list[int] = []  # resident memory every tenth of the run, to see whether it levels off
        began = time.monotonic()
        deadline = began + SECONDS
        with ThreadPoolExecutor(EXPORTERS + IMPORTERS + 1) as pool:
            jobs = [pool.submit(exporter, mount, files, n, deadline, tally) for n in range(EXPORTERS)]
            jobs += [pool.submit(importer, sim, mount, sr, scratch, n, deadline, tally) for n in range(IMPORTERS)]
            jobs.append(pool.submit(walker, mount, deadline, tally))
            while not all(j.done() for j in jobs):
                rss = probe.rss()
                peak = max(peak, rss)
                if time.monotonic() - began >= len(samples) * SECONDS / 10 and len(samples) < 10:
                    samples.append(rss >> 20)
                assert time.monotonic() < deadline + 180, "a worker is stuck: deadlock?"
                time.sleep(0.5)
            for job in jobs:
                job.result()
        took = time.monotonic() - began
        assert tally.failures == [], tally.failures[:10]
        assert tally.bytes_lost == 0
        assert tally.exports >= EXPORTERS and tally.imports >= IMPORTERS and tally.walks >= 1
        # The mount still answers at once, and the import directory forgot the VDIs deleted in XO.
        assert run("ls", str(mount / "vms"), timeout=10).returncode == 0
        wait_for(lambda: os.listdir(mount / f"srs/{sr}/import") == [], 30, "the deleted imports to be forgotten")
        # What the daemon holds goes back to where it was once the load is gone (idle HTTP connections
        # and trio's idle worker threads take a few seconds to go).
        wait_for(lambda: probe.snapshot()["fds"] <= before["fds"] + 2, 30, "the file descriptors to be released")
        wait_for(lambda: probe.threads() <= before["threads"] + 1, 30, "the worker threads to end")
        after = probe.snapshot()
        assert peak - before["rss"] < 400 * MiB, f"memory grew by {(peak - before['rss']) >> 20} MiB under load"
        feed = status(mount)["feed"]
        assert feed["connected"] and feed["reconnects"] == feed_before["reconnects"], feed
        record("load", f"{EXPORTERS} exports, {IMPORTERS} imports, find and ls -l, churn 200/s",
               seconds=round(took, 1), exports=tally.exports, export_bytes=tally.export_bytes,
               imports=tally.imports, import_bytes=tally.import_bytes, walks=tally.walks,
               slowest_walk_s=round(tally.slowest_walk, 1),
               event_notifications=feed["events"] - feed_before["events"],
               rss_before_mib=before["rss"] >> 20, rss_peak_mib=peak >> 20, rss_after_mib=after["rss"] >> 20,
               rss_every_tenth_mib=samples,
               fds_before=before["fds"], fds_after=after["fds"], threads_before=before["threads"],
               threads_after=after["threads"], bytes_lost=tally.bytes_lost, failures=len(tally.failures))
    finally:
        sim.stop()
