"""scripts/demo: it mounts the simulator, prints the tour, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import force_unmount, is_mounted

TOP = Path(__file__).parent.parent


@pytest.mark.timeout(180)
def test_demo_mounts_tours_and_cleans_up_on_ctrl_c():
    proc = subprocess.Popen([str(TOP / "scripts" / "demo")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "XOFS_DEMO_VMS": "6"})
    mnt = None
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            match = re.search(r"is mounted on (\S+)", line)
            if match:
                mnt = match.group(1)
            if "Press Ctrl-C" in line:
                break
        text = "".join(out)
        assert mnt and is_mounted(mnt), text
        assert f"  cd {mnt}\n" in out, text
        # Every command of the tour works as printed, from the mount (the ones that copy whole disks and
        # import aside: the export and import tests cover those).
        tour = [m.group(1) for line in out if (m := re.match(r"  (\S.*?)\s+# ", line))]
        assert any(cmd.startswith("cat vms/") for cmd in tour) and len(tour) >= 8, text
        for cmd in tour:
            if cmd.startswith(("cp ", "qemu-img create")):
                continue
            run = subprocess.run(["bash", "-c", cmd], cwd=mnt, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and run.stdout.strip(), (cmd, run.stdout, run.stderr)
            if cmd.startswith("cat "):
                assert run.stdout.startswith("{"), run.stdout
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rest = proc.communicate(timeout=60)[0]
        assert "demo: done" in rest, rest
        assert not is_mounted(mnt)
        assert not Path(mnt).exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if mnt:
            force_unmount(mnt)


@pytest.mark.timeout(180)
def test_an_impatient_second_ctrl_c_still_cleans_up():
    proc = subprocess.Popen([str(TOP / "scripts" / "demo")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "XOFS_DEMO_VMS": "2"})
    mnt = None
    try:
        for line in proc.stdout:
            match = re.search(r"is mounted on (\S+)", line)
            if match:
                mnt = match.group(1)
            if "Press Ctrl-C" in line:
                break
        assert mnt and is_mounted(mnt)
        for _ in range(3):  # the second and third land while it cleans up
            with contextlib.suppress(ProcessLookupError):  # unless it is done already
                os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)
        rest = proc.communicate(timeout=60)[0]
        assert "demo: done" in rest, rest
        assert not is_mounted(mnt)
        assert not Path(mnt).parent.exists()  # the work directory, with the logs and the simulator's state
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if mnt:
            force_unmount(mnt)
