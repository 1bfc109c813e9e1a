"""No log a mount of this test session wrote holds a token (or a cookie header carrying one).

Every token the tests hand out starts with `SECRET_PREFIX`, so a grep finds any of them. The check runs
when this test runs (pytest runs files in name order: most suites are done by then) and once more when the
whole session ends, through the teardown of a session fixture, so that later suites are covered too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operate_support import SECRET_PREFIX
from tests.support import DEFAULT_TOKEN

MOUNT_LOG = re.compile(r"(^|[.-])mount\d*\.log$|^xofs(-stacks)?\.log$")
LEAKS = re.compile(re.escape(SECRET_PREFIX) + r"|" + re.escape(DEFAULT_TOKEN) + r"|authenticationToken=")


def mount_logs(base: Path) -> list[Path]:
    return [p for p in base.rglob("*.log") if MOUNT_LOG.search(p.name) and p.is_file()]


def leaks(base: Path) -> list[str]:
    found = []
    for path in mount_logs(base):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if LEAKS.search(line):
                found.append(f"{path}:{number}: {line[:300]}")
    return found


@pytest.fixture(scope="session")
def checked_again_at_the_end(tmp_path_factory) -> Iterator[Path]:
    base = tmp_path_factory.getbasetemp()
    yield base
    found = leaks(base)
    assert not found, "mount logs hold a token:\n" + "\n".join(found)


def test_no_mount_log_holds_a_token(checked_again_at_the_end, make_mount, sim):
    mount = make_mount(sim, "--log-level", "DEBUG")  # at least one log, at the most talkative level
    (mount.mountpoint / "vms").iterdir()
    mount.stop()
    assert mount.log_text()
    logs = mount_logs(checked_again_at_the_end)
    assert mount.log_path in logs
    found = leaks(checked_again_at_the_end)
    assert not found, "mount logs hold a token:\n" + "\n".join(found)
