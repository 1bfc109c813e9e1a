"""Shared fixtures: a simulator per session (read-only tests), fresh ones and real mounts per test."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.support import DEFAULT_TOKEN, MountProcess, SimProcess, cleanup_all, kill_mount_daemons

# How long before pytest-timeout fails a test the watchdog kills the mount daemons, seconds.
WATCHDOG_LEAD = 5.0


@pytest.fixture(autouse=True)
def fuse_watchdog(request) -> Iterator[None]:
    """A deadlocked FUSE daemon must fail one test, not hang the run.

    A test blocked in a system call on a hung mount cannot be interrupted by pytest-timeout's signal (the
    kernel keeps waiting for the daemon's answer). So shortly before the test's timeout, every mount daemon
    still alive is killed: the kernel then fails the pending requests (ENOTCONN), `auto_unmount` removes the
    mount, the blocked call returns, and the test fails and cleans up like any other.
    """
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout") or 0)
    if timeout <= 0:
        yield
        return
    timer = threading.Timer(max(timeout - WATCHDOG_LEAD, 1.0), kill_mount_daemons,
                            kwargs={"reason": f"{request.node.nodeid} ran into its {timeout:.0f} s timeout"})
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.fixture(scope="session")
def sim(tmp_path_factory) -> Iterator[SimProcess]:
    """A shared simulator (seed 1, default inventory). Tests that change XO must use `fresh_sim`."""
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    proc = SimProcess(args=["--seed", "1"], log_path=log).start()
    yield proc
    proc.stop()


@pytest.fixture
def fresh_sim(tmp_path) -> Iterator[SimProcess]:
    """A simulator of its own for a test that changes things."""
    proc = SimProcess(args=["--seed", "7", "--state-dir", str(tmp_path / "sim-state")],
                      log_path=tmp_path / "sim.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def make_mount(tmp_path) -> Iterator:
    """Factory: make_mount(sim, *extra_args) -> a live MountProcess, unmounted after the test whatever happens."""
    mounts: list[MountProcess] = []

    def _make(server: SimProcess, *extra: str, env: dict[str, str] | None = None) -> MountProcess:
        n = len(mounts)
        env = {"XOFS_STATE_DIR": str(tmp_path / f"state{n}"), **(env or {})}
        m = MountProcess(server.url, tmp_path / f"mnt{n}", token=server.token, extra=list(extra),
                         env=env, log_path=tmp_path / f"mount{n}.log")
        mounts.append(m)
        return m.start()

    yield _make
    for m in mounts:
        m.stop()


@pytest.fixture
def token() -> str:
    return DEFAULT_TOKEN


def pytest_sessionfinish(session, exitstatus) -> None:
    cleanup_all()


