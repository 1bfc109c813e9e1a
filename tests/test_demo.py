"""scripts/demo: it mounts the simulator, prints the tour, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
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
        vm_line = next(line for line in out if "meta.json" in line)
        meta = vm_line.split("cat ", 1)[1].split(" |")[0]
        assert Path(meta).read_bytes().startswith(b"{")
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
