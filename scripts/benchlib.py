"""What every benchmark script prints and measures the same way."""

from __future__ import annotations

import subprocess
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


def timed(cmd: list[str] | str, shell: bool = False) -> float:
    """Seconds a command takes; its output is thrown away, its failure raises."""
    start = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start
