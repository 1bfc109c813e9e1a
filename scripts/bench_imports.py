"""Benchmark of imports: `cp` of a 2 GiB dynamic VHD into an import directory against `curl -T` of the
same file to the same endpoint, in the same run, plus the daemon's memory while it copies.

Run through `scripts/bench imports`. Prints one line per figure with its goal (issue 5): cp at least 0.7x
the speed of curl, daemon memory under 100 MB above idle. The spool needs the image's size in free space
under the state directory while a copy runs; this prints how much it used.

The simulator's side of an import is mostly kernel time (it writes the upload to its disk), and on a
virtual machine that time swings from run to run by a factor of two or more (measured: the same curl
upload 4.6 s, then 9.7 s, with the simulator's system time doubling). So cp and curl take turns, ROUNDS
times each, every new VDI is deleted after its run, and the best time of each is compared; every time is
printed too.
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
ROUNDS = 3


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


def upload_started(log: str, name: str) -> float | None:
    """When the daemon began the upload of `name` (its "importing …" log line), as a Unix time."""
    for line in log.splitlines():
        if "xofs.imports: importing" in line and f"/{name} " in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def delete_vdi(sim: SimProcess, label: str) -> None:
    """Delete the VDI the run made, so that every run starts from the same simulator state."""
    for vdi in sim.get_json("/rest/v0/vdis?fields=id,name_label"):
        if vdi["name_label"] == label:
            status, _, body = sim.request("DELETE", f"/rest/v0/vdis/{vdi['id']}")
            if status not in (200, 204):
                raise RuntimeError(f"cannot delete the benchmark's VDI {vdi['id']}: {status} {body[:200]!r}")


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
        idle = rss_mb(mount.proc.pid)
        curls: list[float] = []
        cps: list[tuple[float, float | None]] = []  # (time, seconds until the upload began)
        with PeakWatcher(mount.proc.pid, state) as watch:
            for n in range(ROUNDS):
                for turn in ("cp", "curl") if n % 2 == 0 else ("curl", "cp"):
                    subprocess.run(["sync"], check=True)
                    start, start_wall = time.perf_counter(), time.time()
                    if turn == "curl":
                        subprocess.run(["curl", "-sf", "-o", "/dev/null", "-b", f"authenticationToken={sim.token}",
                                        "-X", "POST", "-T", str(vhd),
                                        f"{sim.url}/rest/v0/srs/{sr}/vdis?name_label=bench-curl&raw=false"],
                                       check=True)
                        curls.append(time.perf_counter() - start)
                        delete_vdi(sim, "bench-curl")
                    else:
                        name = f"bench-cp-{n}.vhd"
                        subprocess.run(["cp", str(vhd), str(mount.mountpoint / f"srs/{sr}/import/{name}")],
                                       check=True)
                        took = time.perf_counter() - start
                        started = upload_started(mount.log_text(), name)
                        cps.append((took, None if started is None else started - start_wall))
                        delete_vdi(sim, f"bench-cp-{n}")
        size = vhd.stat().st_size
        t_curl, (t_cp, lead) = min(curls), min(cps)
        report("curl -T of the VHD to POST /srs/<id>/vdis, best of 3", f"{size / t_curl / 1e6:.0f} MB/s "
               f"({t_curl:.1f} s; all: {', '.join(f'{t:.1f}' for t in curls)})", "baseline", None)
        report("cp into /srs/<id>/import/, until cp returns, best of 3", f"{size / t_cp / 1e6:.0f} MB/s "
               f"({t_cp:.1f} s; all: {', '.join(f'{t:.1f}' for t, _ in cps)})", "", None)
        report("cp speed / curl speed", f"{t_curl / t_cp:.2f}x", ">= 0.7x", t_curl / t_cp >= 0.7)
        if lead is not None:
            report("  the best cp's upload began after", f"{lead:.1f} s", "", None)
        report("daemon memory above idle during the copies", f"{watch.peak_rss - idle:.0f} MB", "< 100 MB",
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
