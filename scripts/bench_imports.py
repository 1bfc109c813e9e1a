"""Benchmark of imports: `cp` of a 2 GiB dynamic VHD into an import directory against `curl -T` of the
same file to the same endpoint, in the same run, plus the daemon's memory while it copies.

Run through `scripts/bench imports`. Prints one line per figure with its goal (issue 5): cp at least 0.7x
the speed of curl, daemon memory under 100 MB above idle. The spool needs the image's size in free space
under the state directory while a copy runs; this prints how much it used.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from scripts.benchlib import Sampler, report, rss_mb  # noqa: E402
from tests.support import MountProcess, SimProcess  # noqa: E402

SIZE = 2 << 30  # bytes of data in the VHD: a 2 GiB dynamic VHD, every block allocated


def make_vhd(work: Path) -> Path:
    """A dynamic VHD whose every block holds data that does not compress (so no byte is free)."""
    raw = work / "src.raw"
    with open(raw, "wb") as f:
        for _ in range(SIZE // (64 << 20)):
            f.write(os.urandom(64 << 20))
    vhd = work / "bench.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", str(raw), str(vhd)],
                   check=True)
    raw.unlink()
    return vhd


def upload_started(log: str) -> float | None:
    """When the daemon began the upload (its "importing …" log line), as a Unix time."""
    for line in log.splitlines():
        if "xofs.imports: importing" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


class PeakWatcher(Sampler):
    """Samples a process's RSS and the size of a directory tree while something runs."""

    def __init__(self, pid: int, spool: Path) -> None:
        super().__init__()
        self.pid, self.spool = pid, spool
        self.peak_rss = self.peak_spool = 0.0

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_mb(self.pid))
        used = sum(p.stat().st_blocks * 512 for p in self.spool.rglob("*.spool") if p.exists())
        self.peak_spool = max(self.peak_spool, used / 2**30)


def bench_imports(work: Path) -> None:
    print("== imports: cp of a 2 GiB dynamic VHD vs curl -T ==")
    vhd = make_vhd(work)
    sim = SimProcess(args=["--seed", "1", "--state-dir", str(work / "sim-state")], log_path=work / "sim.log").start()
    state = work / "state"
    mount = MountProcess(sim.url, work / "mnt", token=sim.token, log_path=work / "mount.log",
                         env={"XOFS_STATE_DIR": str(state), "XOFS_LOG_LEVEL": "INFO"})
    try:
        srs = sim.get_json("/rest/v0/srs?fields=id,size,usage,content_type")
        sr = max((s for s in srs if s["content_type"] != "iso"), key=lambda s: s["size"] - s["usage"])["id"]
        mount.start()
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        subprocess.run(["curl", "-sf", "-o", "/dev/null", "-b", f"authenticationToken={sim.token}", "-X", "POST",
                        "-T", str(vhd),
                        f"{sim.url}/rest/v0/srs/{sr}/vdis?name_label=bench-curl&raw=false"], check=True)
        t_curl = time.perf_counter() - start

        idle = rss_mb(mount.proc.pid)
        subprocess.run(["sync"], check=True)
        with PeakWatcher(mount.proc.pid, state) as watch:
            start, start_wall = time.perf_counter(), time.time()
            subprocess.run(["cp", str(vhd), str(mount.mountpoint / f"srs/{sr}/import/bench-cp.vhd")], check=True)
            t_cp, end_wall = time.perf_counter() - start, time.time()
        size = vhd.stat().st_size
        report("curl -T of the VHD to POST /srs/<id>/vdis", f"{size / t_curl / 1e6:.0f} MB/s ({t_curl:.1f} s)",
               "baseline", None)
        report("cp into /srs/<id>/import/, until cp returns", f"{size / t_cp / 1e6:.0f} MB/s ({t_cp:.1f} s)", "",
               None)
        report("cp speed / curl speed", f"{t_curl / t_cp:.2f}x", ">= 0.7x", t_curl / t_cp >= 0.7)
        started = upload_started(mount.log_text())
        if started is not None:
            report("  of which: writing the spool (until the upload starts)", f"{started - start_wall:.1f} s", "",
                   None)
            report("  of which: the upload, until XO answered", f"{end_wall - started:.1f} s", "", None)
        report("daemon memory above idle during the cp", f"{watch.peak_rss - idle:.0f} MB", "< 100 MB",
               watch.peak_rss - idle < 100)
        report("spool space used at the peak (the image's size)", f"{watch.peak_spool:.2f} GiB", "", None)
    finally:
        mount.stop()
        sim.stop()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xofs-bench-imports-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        bench_imports(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
