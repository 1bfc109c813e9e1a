"""Helpers of the hardening suite (`tests/test_hardening_*.py`) and of `scripts/reliability`.

- the simulator's fault knobs and statistics (`/_sim/`), and what reached XO besides reads;
- a simulator that can be restarted on the same port with the same seed and state (`RestartableSim`);
- what a daemon holds (`DaemonProbe`: memory, file descriptors, threads, from /proc);
- figures for `docs/reliability.md`: `record()` appends one JSON line to `$XOFS_RELIABILITY_OUT`, which
  `scripts/reliability` sets; `scaled()` lets that script ask for bigger numbers than CI runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trio_websocket import open_websocket_url

from tests.support import SimProcess

MiB = 1 << 20


# ---- the simulator's knobs -------------------------------------------------------------------------------

def sim_post(sim: SimProcess, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    status, _, answer = sim.request("POST", path, data, {"Content-Type": "application/json"})
    return status, json.loads(answer) if answer.strip() else None


def set_faults(sim: SimProcess, **knobs: Any) -> dict:
    status, answer = sim_post(sim, "/_sim/faults", knobs)
    assert status == 200, answer
    return answer


def reset_faults(sim: SimProcess) -> None:
    status, _, body = sim.request("DELETE", "/_sim/faults")
    assert status == 200, body


def stats(sim: SimProcess) -> dict:
    return sim.get_json("/_sim/stats")


def reset_stats(sim: SimProcess) -> None:
    assert sim_post(sim, "/_sim/stats/reset")[0] == 204


def changes_sent(counts: dict) -> dict[str, int]:
    """The requests in `/_sim/stats` that could change something in XO (anything but GET and HEAD)."""
    return {route: n for route, n in counts["routes"].items() if not route.startswith(("GET ", "HEAD "))}


def send_frames(sim: SimProcess, frames: list[str]) -> int:
    """Raw text frames on every open JSON-RPC websocket; how many sockets got them."""
    status, answer = sim_post(sim, "/_sim/websocket-frames", {"frames": frames})
    assert status == 200, answer
    return answer["sockets"]


def all_frame(kind: str, items: dict) -> str:
    """An `all` notification, as XO sends it."""
    return json.dumps({"jsonrpc": "2.0", "method": "all", "params": {"type": kind, "items": items}})


def expire_token(sim: SimProcess, token: str) -> None:
    assert sim_post(sim, "/_sim/expire-token", {"token": token})[0] == 204


async def rpc(sim: SimProcess, method: str, params: dict | None = None, *,
              sign_in: dict | None = None) -> Any:
    """One JSON-RPC call on a fresh socket, signed in with `sign_in` (default: the simulator's token)."""
    async with open_websocket_url(sim.url.replace("http", "ws", 1) + "/api/") as ws:
        calls = [("session.signIn", sign_in or {"token": sim.token}), (method, params or {})]
        result = None
        for n, (name, args) in enumerate(calls, 1):
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": n, "method": name, "params": args}))
            while True:
                message = json.loads(await ws.get_message())
                if message.get("id") == n:
                    break
            assert "error" not in message, message
            result = message["result"]
        return result


def first_vm(sim: SimProcess, power_state: str = "Halted") -> dict:
    return sim.get_json(f"/rest/v0/vms?fields=id,name_label,power_state&filter=power_state:{power_state}")[0]


def rename_vm(sim: SimProcess, vm_id: str, name: str) -> None:
    status, _, body = sim.request("PATCH", f"/rest/v0/vms/{vm_id}", json.dumps({"nameLabel": name}).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 204, body


def vdi_ids(sim: SimProcess, name_label: str | None = None) -> set[str]:
    vdis = sim.get_json("/rest/v0/vdis?fields=id,name_label")
    return {v["id"] for v in vdis if name_label is None or v["name_label"] == name_label}


class RestartableSim:
    """A simulator with a state directory that can be stopped and started again on the same port, with the
    same seed and state, as a restarted XO would come back. Always stopped by `close()`."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.args = [*args, "--state-dir", str(tmp / "sim-state")]
        self.log_path = tmp / "sim.log"
        self.sim = SimProcess(args=self.args, log_path=self.log_path).start()
        self.port = self.sim.port

    @property
    def url(self) -> str:
        return self.sim.url

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (a clean restart) or SIGKILL (a crash)."""
        proc = self.sim.proc
        if kill and proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.sim.stop()

    def start(self, timeout: float = 30.0) -> SimProcess:
        """Start again on the same port (the kernel may hold it briefly after a kill: retried)."""
        deadline = time.monotonic() + timeout
        while True:
            cmd = [sys.executable, "-m", "xofs", "sim", "--port", str(self.port), "--token", self.sim.token,
                   *self.args]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.log_path, "ab"), text=True)  # noqa: SIM115
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.startswith("xofs sim listening on "):
                self.sim.proc = proc
                return self.sim
            proc.wait(10)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulator did not come back on port {self.port}: {line!r}")
            time.sleep(0.5)

    def close(self) -> None:
        self.sim.stop()


# ---- the daemon ------------------------------------------------------------------------------------------

class DaemonProbe:
    """What a process holds, from /proc: resident memory, open file descriptors, threads."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss(self) -> int:
        """Resident memory, bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def fds(self) -> list[str]:
        """What each open descriptor points at (sockets, pipes, files, /dev/fuse)."""
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            except FileNotFoundError:  # closed meanwhile
                pass
        return out

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def snapshot(self) -> dict[str, int]:
        fds = self.fds()
        return {"rss": self.rss(), "fds": len(fds), "sockets": sum(f.startswith("socket:") for f in fds),
                "threads": self.threads()}


# ---- data ------------------------------------------------------------------------------------------------

def pattern_bytes(size: int, seed: int) -> bytes:
    """Disk-like content: hashed blocks with zero runs between them, different for every seed."""
    block = hashlib.sha256(f"xofs-hardening-{seed}".encode()).digest() * (64 * 1024 // 32)
    out = bytearray(size)
    for at in range(0, size, 256 * 1024):
        piece = block[: min(len(block), size - at)]
        out[at : at + len(piece)] = piece
    return bytes(out)


def import_raw(sim: SimProcess, data: bytes, name: str) -> str:
    """A VDI with this content on the first writable SR, made through REST (not the mount); its id."""
    srs = sim.get_json("/rest/v0/srs?fields=id,content_type,size,usage")
    sr = max((s for s in srs if s["content_type"] != "iso"), key=lambda s: s["size"] - s["usage"])["id"]
    status, _, body = sim.request("POST", f"/rest/v0/srs/{sr}/vdis?raw=true&name_label={name}", data,
                                  {"Content-Type": "application/octet-stream"})
    assert status in (200, 201), body
    return json.loads(body)["id"]


def writable_sr(sim: SimProcess) -> str:
    srs = sim.get_json("/rest/v0/srs?fields=id,content_type,size,usage")
    return max((s for s in srs if s["content_type"] != "iso"), key=lambda s: s["size"] - s["usage"])["id"]


# ---- figures for docs/reliability.md ----------------------------------------------------------------------

def scaled(name: str, ci: float) -> float:
    """`ci`, unless `scripts/reliability` asks for more through `$XOFS_RELIABILITY_<NAME>`."""
    return float(os.environ.get(f"XOFS_RELIABILITY_{name.upper()}", ci))


def record(section: str, name: str, **figures: Any) -> None:
    """One result for docs/reliability.md (kept only when `scripts/reliability` runs the suite)."""
    out = os.environ.get("XOFS_RELIABILITY_OUT")
    if out:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(out, "a") as f:
            f.write(json.dumps({"section": section, "name": name, "test": test, **figures}) + "\n")
