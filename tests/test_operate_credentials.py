"""Where a mount's token comes from (file, environment, `xofs login`, xo-cli's configuration, Basic
credentials), refusing readable secret files, and a token rotated under a live mount."""

from __future__ import annotations

import errno
import json
import logging
import os
import pty
import select
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.operate_support import (
    SECRET_PREFIX,
    assert_documented,
    halted_vm,
    meta,
    rename_vm,
    rest,
    status_of,
    wait_for,
    write_private,
    xofs,
)
from tests.support import MountProcess, SimProcess, force_unmount, is_mounted
from xofs.credentials import Credentials, RotatingClient, redact

OTHER_TOKEN = SECRET_PREFIX + "rotated-0123456789abcdefghijklm"


def mount_clean(sim: SimProcess, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                name: str = "m") -> MountProcess:
    """A foreground mount whose environment has no XOFS_TOKEN (and a config home of its own)."""
    env = {"XOFS_TOKEN": "", "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XOFS_STATE_DIR": str(tmp_path / f"state-{name}"), **(env or {})}
    mount = MountProcess(sim.url, tmp_path / f"mnt-{name}", token="", extra=list(args), env=env,
                         log_path=tmp_path / f"{name}.mount.log")
    return mount.start()


def test_a_token_file_readable_by_others_is_refused(sim, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for mode in (0o644, 0o640, 0o604):
        token = write_private(tmp_path / "token", sim.token, mode)
        proc = xofs("mount", sim.url, str(mnt), "--foreground", "--token-file", str(token), clean_env=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr
        assert f"{token} is readable by its group or others (mode {mode:04o})" in lines[0]
        assert f"chmod 600 {token}" in lines[0]
        assert_documented(lines[0])
        assert sim.token not in proc.stderr
    token = write_private(tmp_path / "token", sim.token, 0o600)
    os.chown(token, 12345, 12345)  # its owner could put their token in it (helper 47)
    proc = xofs("mount", sim.url, str(mnt), "--foreground", "--token-file", str(token), clean_env=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines == [f"xofs: {token} belongs to another user (uid 12345); it holds a "
                                              f"secret: chown {os.getuid()} {token}"], proc.stderr
    assert_documented(lines[0])
    os.chown(token, os.getuid(), os.getgid())
    for mode in (0o620, 0o602):  # another user could put their token in it (helper 44)
        token = write_private(tmp_path / "token", sim.token, mode)
        proc = xofs("mount", sim.url, str(mnt), "--foreground", "--token-file", str(token), clean_env=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr
        assert f"{token} is writable by others (mode {mode:04o})" in lines[0] and f"chmod 600 {token}" in lines[0]
        assert_documented(lines[0])
    assert not is_mounted(mnt)


def test_a_token_of_more_than_one_line_is_refused_without_showing_it(sim, tmp_path):
    """A second line in the token file (a comment) or in XOFS_TOKEN went into the cookie header: refused
    there as "cannot reach XO", retried, and the whole token shown in the message and the log (helper 44)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    token = write_private(tmp_path / "token", f"{sim.token}\n# the token for the lab XO\n", 0o600)
    state = {"XOFS_STATE_DIR": str(tmp_path / "state")}
    for args, env, says in ((["--token-file", str(token)], state, f"{token} must hold one line, but it holds 2"),
                            ([], {**state, "XOFS_TOKEN": f"{sim.token}\nx"},
                             "XOFS_TOKEN is no XO token: it holds spaces, line breaks or control characters")):
        proc = xofs("mount", sim.url, str(mnt), "--foreground", *args, env=env, clean_env=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and says in lines[0], proc.stderr
        assert_documented(lines[0])
        assert sim.token not in proc.stderr
        log = tmp_path / "state" / "xofs.log"
        assert not log.exists() or sim.token not in log.read_text()
    assert not is_mounted(mnt)


def test_each_token_source_mounts(sim, tmp_path):
    token = write_private(tmp_path / "token", sim.token + "\n")
    by_file = mount_clean(sim, tmp_path, "--token-file", str(token), name="file")
    assert status_of(by_file.mountpoint)["credentials"] == f"the token file {token}"
    by_o = mount_clean(sim, tmp_path, "-o", f"token_file={token}", name="o")
    by_env = mount_clean(sim, tmp_path, env={"XOFS_TOKEN": sim.token}, name="env")
    assert status_of(by_env.mountpoint)["credentials"] == "$XOFS_TOKEN"
    # xo-cli's own configuration, as `xo-cli register` writes it (the server as the user typed it).
    xo_cli = tmp_path / "config" / "xo-cli" / "config.json"
    xo_cli.parent.mkdir(parents=True)
    xo_cli.write_text(json.dumps({"allowUnauthorized": False, "clientId": "x1", "server": sim.url + "/",
                                  "token": sim.token}))
    by_xo_cli = mount_clean(sim, tmp_path, name="xo-cli")
    assert status_of(by_xo_cli.mountpoint)["credentials"] == f"xo-cli's configuration {xo_cli}"
    for mount in (by_file, by_o, by_env, by_xo_cli):
        assert "vms" in os.listdir(mount.mountpoint)
        assert mount.stop() == 0
    # xo-cli registered with another server: its token is not sent to this one.
    xo_cli.write_text(json.dumps({"server": "https://xo.elsewhere.example", "token": sim.token}))
    proc = xofs("mount", sim.url, str(tmp_path / "mnt-file"), "--foreground", clean_env=True,
                env={"XDG_CONFIG_HOME": str(tmp_path / "config")})
    assert proc.returncode != 0 and "no XO token" in proc.stderr
    assert_documented(proc.stderr.strip())


def test_secrets_are_never_taken_from_the_command_line(sim, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    host = sim.url.split("://")[1]
    for args in (["-o", f"token={sim.token}"], ["-o", "allow_other,password=x"]):
        proc = xofs("mount", sim.url, str(mnt), "--foreground", *args)
        assert proc.returncode != 0 and "refused: a secret on the command line" in proc.stderr
        assert_documented(proc.stderr.strip())
    proc = xofs("mount", f"http://{sim.token}@{host}", str(mnt), "--foreground")
    assert proc.returncode != 0 and "credentials in the URL are refused" in proc.stderr
    assert_documented(proc.stderr.strip())
    assert sim.token not in proc.stderr


def run_on_terminal(args: list[str], answers: list[str], env: dict[str, str], timeout: float = 30) -> tuple[int, str]:
    """Run `xofs ARGS` on a pseudo-terminal (so getpass reads from it), typing each answer after a prompt;
    interrupted (SIGINT) if it still runs after `timeout` seconds."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session whose controlling terminal is the pty
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test run started in the background ignores it
        os.execve(sys.executable, [sys.executable, "-m", "xofs", *args], {**os.environ, **env})
    output = b""
    deadline = time.monotonic() + timeout
    pending = list(answers)
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
                if pending and output.rstrip().endswith(b":"):
                    os.write(fd, pending.pop(0).encode() + b"\n")
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:  # still going at the deadline: Ctrl-C, as a user would
            os.kill(pid, signal.SIGINT)
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_xofs_login_asks_the_password_on_the_terminal_and_stores_a_private_token(sim, tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XOFS_TOKEN": ""}
    code, output = run_on_terminal(["login", sim.url, "admin@admin.net"], ["admin"], env)
    assert code == 0, output
    assert "Password for admin@admin.net" in output and "admin\r\n" not in output  # not echoed
    stored = list((tmp_path / "config" / "xofs" / "tokens").iterdir())
    assert len(stored) == 1 and stat.S_IMODE(stored[0].stat().st_mode) == 0o600
    token = stored[0].read_text().strip()
    assert len(token) == 43 and token not in output
    assert sim.request("GET", "/rest/v0/vms?fields=id&limit=1", token=token)[0] == 200
    # Logging in again from the same machine reuses (and extends) the token of the same client id.
    code, _ = run_on_terminal(["login", sim.url, "admin@admin.net"], ["admin"], env)
    assert code == 0 and stored[0].read_text().strip() == token
    # `xofs mount URL DIR` finds it on its own.
    mount = mount_clean(sim, tmp_path, name="login")
    assert status_of(mount.mountpoint)["credentials"].startswith("the token `xofs login` stored in")
    assert "vms" in os.listdir(mount.mountpoint)
    mount.stop()
    assert token not in mount.log_text()


def test_xofs_login_failures_store_nothing(sim, tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = xofs("login", sim.url, "admin@admin.net", "--password-stdin", input="wrong\n", env=env)
    assert proc.returncode != 0 and "XO refused the sign-in of admin@admin.net: invalid credentials" in proc.stderr
    assert_documented(proc.stderr.strip())
    proc = xofs("login", sim.url, "admin@admin.net", input="admin\n", env=env)  # no terminal, no --password-stdin
    assert proc.returncode != 0 and "no terminal to ask the password on: use --password-stdin" in proc.stderr
    assert_documented(proc.stderr.strip())
    assert not (tmp_path / "config" / "xofs").exists()
    target = tmp_path / "etc" / "token"
    # XO refuses any sign-in of a user within 2 s of a failed one, with words it hides from a signed-out
    # socket: the line says what it most likely means (QA: "unknown error from the peer" looked like a fault)
    proc = xofs("login", sim.url, "admin@admin.net", "--password-stdin", input="admin\n", env=env)
    assert proc.returncode != 0 and "XO refused the sign-in of admin@admin.net: unknown error from the peer (XO " \
        "answers so a sign-in within 2 s of a failed one, as after a wrong password: wait a little and try " \
        "again)" in proc.stderr, proc.stderr
    assert_documented(proc.stderr.strip())
    time.sleep(2.1)
    proc = xofs("login", sim.url, "admin@admin.net", "--password-stdin", "--token-file", str(target),
                input="admin\n", env=env)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and stat.S_IMODE(target.parent.stat().st_mode) == 0o700


def test_basic_credentials_from_a_file(sim, tmp_path):
    basic = write_private(tmp_path / "basic", "admin@admin.net:admin\n")
    mount = mount_clean(sim, tmp_path, "--basic-file", str(basic), name="basic")
    assert status_of(mount.mountpoint)["credentials"] == f"the credentials file {basic}"
    assert "vms" in os.listdir(mount.mountpoint)
    vm = halted_vm(sim)
    assert meta(mount.mountpoint, f"vms/{vm}")["id"] == vm
    mount.stop()
    assert "admin@admin.net:admin" not in mount.log_text()
    write_private(basic, "admin@admin.net:wrong")
    proc = xofs("mount", sim.url, str(mount.mountpoint), "--foreground", "--basic-file", str(basic),
                clean_env=True, env={"XOFS_STATE_DIR": str(tmp_path / "state-basic")})
    assert proc.returncode != 0 and "XO refused the sign-in of admin@admin.net" in proc.stderr


@pytest.fixture
def two_token_sim(tmp_path):
    sim = SimProcess(args=["--seed", "11", "--token", OTHER_TOKEN, "--state-dir", str(tmp_path / "sim-state")],
                     log_path=tmp_path / "sim.log").start()
    yield sim
    sim.stop()


def first_raw_vdi(sim: SimProcess) -> str:
    return sim.get_json("/rest/v0/vdis?fields=id&limit=1")[0]["id"]


@pytest.mark.parametrize("events", ["jsonrpc", "sse"])
def test_a_token_written_after_the_old_one_stopped_working_brings_the_feed_back(two_token_sim, tmp_path, events):
    """Revoked first, replaced after: the feed read the file again only at the loss, then retried the
    revoked token for ever, and listings (which never ask XO) stayed as they were."""
    sim = two_token_sim
    token_file = write_private(tmp_path / "token", sim.token)
    mount = mount_clean(sim, tmp_path, "--token-file", str(token_file), "--events", events, "--keepalive", "1",
                        name=f"late-{events}")
    try:
        assert rest(sim, "POST", "/_sim/expire-token", {"token": sim.token})[0] == 204
        sim.token = OTHER_TOKEN  # the test's own calls
        assert rest(sim, "POST", "/_sim/close-websockets")[0] == 204  # and the event streams, which go on
        wait_for(lambda: not status_of(mount.mountpoint)["feed"]["connected"], 15, "the feed to be refused")
        time.sleep(1)  # a retry or two with the revoked token
        write_private(token_file, OTHER_TOKEN)
        vm = halted_vm(sim)
        rename_vm(sim, vm, "renamed-after-a-late-token")
        wait_for(lambda: meta(mount.mountpoint, f"vms/{vm}")["name_label"] == "renamed-after-a-late-token", 30,
                 "the rename, through the feed's new session")
        assert status_of(mount.mountpoint)["feed"]["reconnects"] == 1
    finally:
        mount.stop()
        force_unmount(mount.mountpoint)


def test_a_rotated_token_is_picked_up_and_a_refused_one_logged_once_a_minute(two_token_sim, tmp_path):
    sim = two_token_sim
    token_file = write_private(tmp_path / "token", sim.token)
    mount = mount_clean(sim, tmp_path, "--token-file", str(token_file), "--attr-ttl", "300", name="rot")
    try:
        vdi = first_raw_vdi(sim)
        raw = mount.mountpoint / "vdis" / f"{vdi}.raw"
        # The token is rotated: the file gets the new one, then the old one stops working.
        write_private(token_file, OTHER_TOKEN)
        assert rest(sim, "POST", "/_sim/expire-token", {"token": sim.token})[0] == 204
        with open(raw, "rb") as f:  # an export: XO answers 401, the file is read again, the read goes on
            assert len(f.read(1 << 20)) == 1 << 20
        wait_for(lambda: "a new token from the token file" in mount.log_text(), 5, "the rotation in the log")
        # The event feed was started again with the new token: changes keep arriving.
        sim.token = OTHER_TOKEN
        vm = halted_vm(sim)
        rename_vm(sim, vm, "after-rotation")
        wait_for(lambda: meta(mount.mountpoint, f"vms/{vm}")["name_label"] == "after-rotation", 15,
                 "an event after the rotation")
        assert status_of(mount.mountpoint)["feed"]["connected"]
        # Now the token is refused and the file holds no better one: EACCES, one log line however many reads.
        assert rest(sim, "POST", "/_sim/expire-token", {"token": OTHER_TOKEN})[0] == 204
        for _ in range(4):
            with pytest.raises(PermissionError) as refused:
                with open(raw, "rb") as f:
                    f.read(4096)
            assert refused.value.errno == errno.EACCES
        log = mount.log_text()
        assert log.count("XO refuses the token") == 1, log
        assert_documented(next(line for line in log.splitlines() if "XO refuses the token" in line))
        assert_documented(next(line for line in log.splitlines() if "a new token from" in line))
        assert sim.token not in log and OTHER_TOKEN not in log
    finally:
        mount.stop()
        force_unmount(mount.mountpoint)


def test_a_refused_token_is_logged_once_a_minute_by_each_part_of_the_daemon():
    """One line a minute in all hid an import's or a poll's first refusal behind a read's (helper 45)."""
    from xofs.credentials import REFUSED_MARK, OncePerMinute

    once = OncePerMinute()

    def line(name: str, at: float, op: str = "read") -> bool:
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, "%s %s: %s", (op, "/p", f"{REFUSED_MARK}"),
                                   None)
        record.created = at
        return once.filter(record)

    assert [line("xofs.fs", 0), line("xofs.fs", 30), line("xofs.imports", 31), line("xofs.sync", 32),
            line("xofs.imports", 50), line("xofs.fs", 61)] == [True, False, True, True, False, True]
    # reads and imports' closes both fail in xofs.fs: told apart by the operation (helper 46)
    assert [line("xofs.fs", 62, "flush"), line("xofs.fs", 63, "read"), line("xofs.fs", 64, "flush")] == \
        [True, False, False]


def test_xo_clis_configuration_writable_by_others_is_refused(sim, tmp_path):
    """It was read with no check at all, though xofs reads it again at every refusal (helper 46)."""
    config = tmp_path / "cfg" / "xo-cli" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"server": sim.url, "token": sim.token}))
    config.chmod(0o666)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = xofs("mount", sim.url, str(mnt), "--foreground", clean_env=True,
                env={"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XOFS_STATE_DIR": str(tmp_path / "state"),
                     "HOME": str(tmp_path)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines == [f"xofs: {config} is writable by others (mode 0666); they could put "
                                              f"their token in it: chmod 600 {config}"], proc.stderr
    assert_documented(lines[0])
    assert not is_mounted(mnt)


def test_log_lines_lose_the_secrets_and_keep_their_words():
    """A short Basic password (helper 45: `ex`) blanked every word it is part of (`<secret>ample.net`); it is
    now blanked where it stands as a word of its own, and a long secret wherever it appears."""
    assert redact("signing in to https://ex@example.net as admin", "ex") == (
        "signing in to https://<secret>@example.net as admin")
    assert redact("admin:ex@xo.lan", "ex") == "admin:<secret>@xo.lan"
    assert redact("a-ex_b ex. (ex)", "ex") == "a-<secret>_b <secret>. (<secret>)"
    assert redact("next expires", "ex") == "next expires"
    # A secret whose own edge is no letter or digit is blanked whatever touches that edge (helper 56).
    assert redact("a-x and ab%25", "-x") == "a<secret> and ab%25"
    assert redact("ab%25", "ab%") == "<secret>25"
    token = "k3J9xQ2mL8vP"
    assert redact(f"x{token}y and {token}", token) == "x<secret>y and <secret>"


async def test_a_replaced_tokens_client_is_closed_once_no_request_is_on_it():
    """Each token rotation kept the old client, and its pooled connections in CLOSE-WAIT, until the unmount
    (helper 55: 8 sockets per rotation). A request still on it finishes there first."""
    made: list = []

    class Client:
        def __init__(self, token: str) -> None:
            self.token, self.closed, self.gate = token, False, trio.Event()
            made.append(self)

        async def collection(self, coll: str) -> list[str]:
            if self.token == "old":
                await self.gate.wait()
            assert not self.closed, "a request on a closed client"
            return [self.token]

        async def aclose(self) -> None:
            self.closed = True

    credentials = Credentials.given("http://xo.test", "old")
    client = RotatingClient(credentials, Client)
    answers: list = []

    async def slow() -> None:
        answers.append(await client.collection("vms"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await trio.testing.wait_all_tasks_blocked()
        credentials._set("new")  # what a refusal and a new token in the file do
        assert await client.collection("vms") == ["new"]
        assert not made[0].closed  # the slow request is still on it
        made[0].gate.set()
    assert answers == [["old"]] and made[0].closed and not made[1].closed
    await client.aclose()
    assert made[1].closed
