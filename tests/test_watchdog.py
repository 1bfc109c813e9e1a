"""A FUSE deadlock fails one test, does not hang the run, and leaves no mount behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TOP = Path(__file__).parent.parent


@pytest.mark.timeout(90)
def test_a_hung_daemon_fails_only_its_test_and_is_unmounted(tmp_path):
    # A hung daemon is simulated by stopping it (SIGSTOP): the test then blocks in listdir, in the kernel.
    (tmp_path / "test_hang.py").write_text(textwrap.dedent('''
        import os, signal
        import pytest

        @pytest.mark.timeout(12)
        def test_hangs(sim, make_mount, tmp_path):
            mount = make_mount(sim)
            (tmp_path.parent / "mountpoint").write_text(str(mount.mountpoint))
            os.kill(mount.proc.pid, signal.SIGSTOP)
            os.listdir(mount.mountpoint / "vms")

        def test_next_one_still_runs():
            assert True
    '''))
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "--basetemp", str(tmp_path / "base"), str(tmp_path / "test_hang.py")],
                          cwd=TOP, capture_output=True, text=True, timeout=80)
    elapsed = time.monotonic() - started
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert elapsed < 60
    mountpoint = (tmp_path / "base" / "mountpoint").read_text()
    with open("/proc/mounts") as mounts:
        assert mountpoint not in mounts.read()
