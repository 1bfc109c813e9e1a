"""Shared fixtures: a simulator per session (read-only tests), fresh ones and real mounts per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import DEFAULT_TOKEN, MountProcess, SimProcess, cleanup_all


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


