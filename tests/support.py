"""Processes the tests drive: the simulator and real kernel mounts, each always stopped and unmounted.

Every mount a test makes goes through `MountProcess`, whose `stop()` unmounts even when the daemon is
hung; `cleanup_all()` runs at session end (and on a pytest-timeout) for anything a test left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from xofs.proc_mounts import is_mounted

DEFAULT_TOKEN = "xofs-test-token-0123456789abcdefghijklmnopq"  # 43 characters, like a real XO token

_live: list[SimProcess | MountProcess] = []

# The Debian package that provides each tool the tests run.
TOOL_PACKAGES = {
    "qemu-img": "qemu-utils", "xva-img": "xva-img", "rsync": "rsync", "getfattr": "attr",
    "setfattr": "attr", "fusermount3": "fuse3", "tree": "tree", "pv": "pv", "zstd": "zstd",
    "gio": "libglib2.0-bin", "node": "nodejs", "curl": "curl", "tar": "tar", "fincore": "util-linux-extra",
}


def missing(path: os.PathLike | str) -> bool:
    """Whether `lstat` says ENOENT (any other error is raised). The kernel answers from its cached entry
    until the daemon's invalidation worker drops it, a moment after a listing stopped showing the name: wait
    for this, not for the listing, where the kernel's copy is what is checked."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    return False


async def eventually(check, what: str, timeout: float = 10.0) -> None:
    """`wait_for` inside a trio test: poll `check()` until it is true, without blocking the test's loop."""
    import trio

    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"waited {timeout:g} s for {what}")


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (OSErrors count as not yet); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def set_faults(sim: SimProcess, **knobs: object) -> None:
    """Set the simulator's fault knobs (docs/simulator.md); None clears one."""
    status, _, body = sim.request("POST", "/_sim/faults", json.dumps(knobs).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200, body


def require_tool(name: str) -> str:
    """The path of a tool the test needs; a missing tool fails the test with what to install."""
    path = shutil.which(name)
    if path is None:
        import pytest

        pkg = TOOL_PACKAGES.get(name, name)
        pytest.fail(f"{name} is not installed: apt-get install {pkg} (scripts/test installs it as root)")
    return path


@dataclass
class SimProcess:
    """`xofs sim` in a subprocess, on a free port of 127.0.0.1."""

    args: list[str] = field(default_factory=list)
    token: str = DEFAULT_TOKEN
    url: str = ""
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 30.0) -> SimProcess:
        cmd = [sys.executable, "-m", "xofs", "sim", "--port", "0", "--token", self.token, *self.args]
        stderr = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        _live.append(self)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("xofs sim listening on ") or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.url = line.strip().rsplit(" ", 1)[1]
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, token: str | None = "default"):
        """A plain urllib request; returns (status, headers, body bytes). Never raises on HTTP errors."""
        hdrs = dict(headers or {})
        if token == "default":
            token = self.token
        if token is not None:
            hdrs.setdefault("Cookie", f"authenticationToken={token}")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def get_json(self, path: str):
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self in _live:
            _live.remove(self)


def force_unmount(path: str | Path) -> None:
    """Unmount, lazily if need be; never raises (used in cleanup)."""
    for cmd in (["fusermount3", "-u", str(path)], ["fusermount3", "-uz", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)


MOUNTED = " mounted "  # in the daemon's INFO line once the mount is live ("… xofs.mount: mounted URL on PATH …")


@dataclass
class MountProcess:
    """`xofs mount --foreground` in a subprocess; live once /proc/mounts lists the mountpoint."""

    url: str
    mountpoint: Path
    token: str = DEFAULT_TOKEN
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    def spawn(self) -> MountProcess:
        """Start `xofs mount --foreground` without waiting for the mount (`start` waits)."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "XOFS_TOKEN": self.token, **self.env}
        cmd = [sys.executable, "-m", "xofs", "mount", self.url, str(self.mountpoint), "--foreground", *self.extra]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _live.append(self)
        return self

    def start(self, timeout: float = 30.0) -> MountProcess:
        """Spawn, then wait until /proc/mounts lists the mount and the daemon logged it live: the lines of
        its start below WARNING are held back until just after the kernel mounted it (xofs.daemon.LogSetup),
        and tests count "live" lines in the log."""
        mounted_before = self.log_text().count(MOUNTED)
        self.spawn()
        deadline = time.monotonic() + timeout
        quiet = [arg for arg in (*self.extra, self.env.get("XOFS_LOG_LEVEL", "")) if "WARNING" in arg.upper()
                 or "ERROR" in arg.upper() or "SYSLOG" in arg.upper()]
        logs_info = self.log_path is not None and not quiet
        while not is_mounted(self.mountpoint) or (logs_info and self.log_text().count(MOUNTED) == mounted_before):
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"xofs mount exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mount not live after {timeout}s: {self.log_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> int | None:
        """Unmount and wait for the daemon; returns its exit status (None if it had to be killed)."""
        rc = None
        if is_mounted(self.mountpoint):
            try:
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=20)
            except subprocess.TimeoutExpired:
                pass  # a hung daemon: killed below
        if self.proc:
            try:
                rc = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        force_unmount(self.mountpoint)
        if self in _live:
            _live.remove(self)
        return rc

    def __truediv__(self, other: str) -> Path:
        return self.mountpoint / other


def kill_mount_daemons(reason: str = "") -> None:
    """SIGKILL every mount daemon a test started (the watchdog's last resort), then make sure no mount stays."""
    for thing in list(_live):
        if isinstance(thing, MountProcess) and thing.proc and thing.proc.poll() is None:
            print(f"\nwatchdog: killing the xofs daemon of {thing.mountpoint}: {reason}", file=sys.stderr)
            thing.proc.kill()
    for thing in list(_live):
        if isinstance(thing, MountProcess):
            force_unmount(thing.mountpoint)


def cleanup_all() -> None:
    for thing in list(reversed(_live)):
        try:
            thing.stop()
        except Exception:  # noqa: BLE001 - cleanup must go on for the rest
            pass
