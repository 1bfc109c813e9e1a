"""What every benchmark script prints and measures the same way."""

from __future__ import annotations

import os
import subprocess
import threading
import time


def report(name: str, value: str, goal: str, ok: bool | None) -> None:
    """One figure per line: what, how much, the goal, and whether it was met (None: no goal)."""
    verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
    print(f"{name:<58} {value:>22}   goal: {goal}{verdict}", flush=True)


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) a process has used so far, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str] | str, shell: bool = False) -> float:
    """Seconds a command takes; its output is thrown away, its failure raises."""
    start = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


class Sampler:
    """Calls `sample()` every 50 ms in a thread while the `with` block runs (peaks of memory, disk use)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.05)
