"""Helpers of the `test_operate_*` tests: running xofs's commands, detached daemons, systemd's socket.

A detached daemon is not a child of the test, so `Daemon` finds its pid in the mount's status file and
makes sure, whatever happens, that it is gone and the mount point unmounted at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.support import (
    SimProcess,
    force_unmount,
    is_mounted,
    wait_for,
)

SECRET_PREFIX = "xofs-test-token-"  # every token the tests make starts so (DEFAULT_TOKEN too)
BIN = Path(sys.executable).parent


def xofs(*args: str, env: dict[str, str] | None = None, timeout: float = 60, input: str | None = None,
         clean_env: bool = False) -> subprocess.CompletedProcess:
    """`xofs ARGS` in a subprocess; `clean_env` leaves XOFS_TOKEN out of the inherited environment."""
    base = {k: v for k, v in os.environ.items() if not (clean_env and k == "XOFS_TOKEN")}
    return subprocess.run([sys.executable, "-m", "xofs", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout, input=input)


def mount_helper(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`mount.xofs ARGS`, the console script mount(8) runs for fstab entries of type xofs."""
    base = {k: v for k, v in os.environ.items() if k != "XOFS_TOKEN"}
    return subprocess.run([str(BIN / "mount.xofs"), *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)




def status_of(mountpoint: Path) -> dict:
    return json.loads((mountpoint / ".xofs" / "status.json").read_bytes())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Daemon:
    """A detached `xofs mount` (or `mount.xofs`) the test started: its pid, and a sure way to end it."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.pid: int | None = None

    def attach(self) -> int:
        """Read the daemon's pid from the live mount's status file."""
        self.pid = status_of(self.mountpoint)["pid"]
        return self.pid

    def wait_gone(self, timeout: float = 15) -> None:
        assert self.pid is not None
        wait_for(lambda: not alive(self.pid), timeout, f"daemon {self.pid} to exit")
        wait_for(lambda: not is_mounted(self.mountpoint), timeout, "the mount to go away")

    def cleanup(self) -> None:
        if self.pid is not None and alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            try:
                wait_for(lambda: not alive(self.pid), 10, "the daemon to stop")
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)
        force_unmount(self.mountpoint)


class NotifySocket:
    """The datagram socket systemd gives a `Type=notify` service in $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float = 30) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def rest(sim: SimProcess, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    status, _, data = sim.request(method, path, json.dumps(body).encode() if body is not None else None,
                                  {"Content-Type": "application/json"} if body is not None else None)
    return status, data


def rename_vm(sim: SimProcess, vm_id: str, name: str) -> None:
    status, body = rest(sim, "PATCH", f"/rest/v0/vms/{vm_id}", {"nameLabel": name})
    assert status == 204, body


def halted_vm(sim: SimProcess) -> str:
    return sim.get_json("/rest/v0/vms?fields=id&filter=power_state:Halted")[0]["id"]


def meta(mountpoint: Path, path: str) -> dict:
    return json.loads((mountpoint / path / "meta.json").read_bytes())


TROUBLESHOOTING = Path(__file__).parent.parent / "docs" / "troubleshooting.md"
_PLACEHOLDER = re.compile(r"…|\b(?:URL|FILE|DIR|NAME|VALUE|HOST|USER|SOURCE)\b|[0-9]+(?:\.[0-9]+)?")


def troubleshooting_messages() -> list[re.Pattern[str]]:
    """The messages docs/troubleshooting.md is keyed by (its headings' code spans), as patterns: `…` and
    the placeholders (URL, FILE, DIR…) stand for anything, numbers for any number."""
    patterns = []
    for heading in TROUBLESHOOTING.read_text().splitlines():
        if not heading.startswith("### "):
            continue
        for double, single in re.findall(r"``(.+?)``|`([^`]+)`", heading):
            parts, last = [], 0
            for m in _PLACEHOLDER.finditer(double or single):
                parts += [re.escape((double or single)[last:m.start()]), "[0-9.]+" if m[0][0].isdigit() else ".+?"]
                last = m.end()
            parts.append(re.escape((double or single)[last:]))
            patterns.append(re.compile("".join(parts)))
    return patterns


_ERRNO_WORDS = {re.escape(os.strerror(n)) for n in range(1, 134)}  # as troubleshooting_messages writes them


def documented(line: str) -> bool:
    """Whether the log line is one docs/troubleshooting.md explains by its own words: a heading that names
    only an errno's text (`Permission denied`) matches many a line, and does not count here."""
    return any(p.search(line) for p in troubleshooting_messages() if p.pattern not in _ERRNO_WORDS)


def assert_documented(line: str) -> None:
    """The message a user saw is one docs/troubleshooting.md explains."""
    assert documented(line), f"not in docs/troubleshooting.md: {line}"


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path
