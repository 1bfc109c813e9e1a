"""scripts/demo: it mounts the simulator, prints the tour, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.support import force_unmount, is_mounted

TOP = Path(__file__).parent.parent


class Demo:
    """`scripts/demo` in a session of its own (as in a terminal, where Ctrl-C reaches its whole group), read
    up to its tour; `stop` (a SIGKILL of the group) and an unmount whatever happened."""

    def __init__(self, vms: int, token: str | None = None) -> None:
        self.proc = subprocess.Popen([str(TOP / "scripts" / "demo")], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "XOFS_DEMO_VMS": str(vms),
                                          **({"XOFS_DEMO_TOKEN": token} if token else {})})
        self.mnt: str | None = None
        self.out: list[str] = []

    def read_tour(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)
            match = re.search(r"is mounted on (\S+)", line)
            if match:
                self.mnt = match.group(1)
            if "Press Ctrl-C" in line:
                break
        text = "".join(self.out)
        assert self.mnt and is_mounted(self.mnt), text
        return self.mnt

    def ctrl_c(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # unless it is done already
            os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self) -> None:
        """What it printed after the tour says it is done, and it left no mount and no work directory."""
        rest = self.proc.communicate(timeout=60)[0]
        assert "demo: done" in rest, rest
        assert self.mnt and not is_mounted(self.mnt)
        assert not Path(self.mnt).parent.exists()  # the work directory, with the logs and the simulator's state

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.mnt:
            force_unmount(self.mnt)


@pytest.mark.timeout(180)
def test_demo_mounts_tours_and_cleans_up_on_ctrl_c():
    demo = Demo(vms=6)
    try:
        mnt = demo.read_tour()
        text = "".join(demo.out)
        assert f"  cd {mnt}\n" in demo.out, text
        # Every command of the tour works as printed, from the mount (the ones that copy whole disks and
        # import aside: the export and import tests cover those).
        tour = [m.group(1) for line in demo.out if (m := re.match(r"  (\S.*?)\s+# ", line))]
        assert any(cmd.startswith("cat vms/") for cmd in tour) and len(tour) >= 8, text
        for cmd in tour:
            if cmd.startswith(("cp ", "qemu-img create")):
                continue
            run = subprocess.run(["bash", "-c", cmd], cwd=mnt, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and run.stdout.strip(), (cmd, run.stdout, run.stderr)
            if cmd.startswith("cat "):
                assert run.stdout.startswith("{"), run.stdout
        demo.ctrl_c()  # what Ctrl-C in a terminal does
        demo.finish()
    finally:
        demo.stop()


@pytest.mark.timeout(180)
def test_a_sigterm_while_a_shell_sits_in_the_mount_still_cleans_up():
    # The tour says `cd` into the mount: fusermount3 -u fails there (busy), and the demo waited for ever.
    demo = Demo(vms=2)
    sitting = None
    try:
        mnt = demo.read_tour()
        sitting = subprocess.Popen(["sleep", "120"], cwd=mnt)
        os.kill(demo.proc.pid, signal.SIGTERM)  # the script alone
        demo.finish()
    finally:
        if sitting is not None:
            sitting.kill()
            sitting.wait()
        demo.stop()


@pytest.mark.timeout(180)
def test_an_impatient_second_ctrl_c_still_cleans_up():
    # A random token starts with "-" one time in 64: the simulator took it for an option and did not start.
    demo = Demo(vms=2, token="-Dash-first-token_urlsafe-can-make-this-0123456")
    try:
        demo.read_tour()
        for _ in range(3):  # the second and third land while it cleans up
            demo.ctrl_c()
            time.sleep(0.05)
        demo.finish()
    finally:
        demo.stop()


@pytest.mark.timeout(180)
def test_closing_its_terminal_cleans_up():
    """The terminal goes away (a window closed, an ssh session dropped): the kernel sends SIGHUP to the
    demo and every process of its group, and each later write to the terminal fails. It used to die of the
    SIGHUP, leaving the simulator, the mount and the work directory behind."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:  # runs in the child after setsid(): the pty becomes its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([str(TOP / "scripts" / "demo")], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=controlling_terminal,
                            env={**os.environ, "XOFS_DEMO_VMS": "2"})
    os.close(slave)
    mnt = None
    try:
        out = b""
        while b"Press Ctrl-C" not in out:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the demo's side of the terminal closed
                data = b""
            assert data, out.decode(errors="replace")
            out += data
        match = re.search(rb"is mounted on (\S+)", out)
        assert match, out.decode(errors="replace")
        mnt = match.group(1).decode()
        assert is_mounted(mnt)
        os.close(master)  # the hang-up
        master = -1
        proc.wait(timeout=60)
        assert not is_mounted(mnt)
        assert not Path(mnt).parent.exists()  # the work directory, with the logs and the simulator's state
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if mnt:
            force_unmount(mnt)
