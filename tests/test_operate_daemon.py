"""The mount as a daemon: systemd readiness, a detached daemon's log, syslog, stack dumps, stopping with
imports under way."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.operate_support import Daemon, NotifySocket, assert_documented, rest, status_of, wait_for, xofs
from tests.support import MountProcess, SimProcess, force_unmount, is_mounted, set_faults
from tests.test_imports import make_raw, make_vhd, sr_ids, vdis


def foreground(sim: SimProcess, mnt: Path, tmp_path: Path, *extra: str, env: dict[str, str]) -> subprocess.Popen:
    mnt.mkdir(exist_ok=True)
    log = open(tmp_path / "foreground.mount.log", "ab")  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, "-m", "xofs", "mount", sim.url, str(mnt), "--foreground", *extra],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state"),
                                 **env})


def test_systemd_hears_ready_once_the_mount_is_live_and_stopping_at_the_end(sim, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    mnt = tmp_path / "mnt"
    proc = foreground(sim, mnt, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        message = notify.receive(30)
        assert "READY=1" in message.splitlines() and f"MAINPID={proc.pid}" in message.splitlines()
        assert is_mounted(mnt) and "vms" in os.listdir(mnt)  # ready means usable
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.receive(15).splitlines()
        assert proc.wait(15) == 0
        assert not is_mounted(mnt)
        # On the terminal, what was logged before the mount was live comes out once it is, in order.
        output = (tmp_path / "foreground.mount.log").read_text()
        assert "INFO xofs.sync: XO event feed connected" in output.split("INFO xofs: mounted")[0], output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        force_unmount(mnt)
        notify.close()


def test_a_failed_start_says_why_in_one_line_and_never_claims_ready(sim, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"NOTIFY_SOCKET": str(notify.path), "XOFS_STATE_DIR": str(tmp_path / "state")}
    try:
        for args, token, words in [
            ([], "wrong-token", "401"),
            (["--foreground"], "wrong-token", "401"),
            (["--syslog", "--syslog-socket", str(tmp_path / "no-such-socket")], sim.token, "cannot log to syslog"),
            (["--ca-file", str(tmp_path / "missing.pem")], sim.token, "cannot read the CA file"),
        ]:
            proc = xofs("mount", sim.url, str(mnt), *args, env={**env, "XOFS_TOKEN": token})
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode != 0 and len(lines) == 1 and words in lines[0], (args, proc.stderr)
            assert_documented(lines[0])
            assert not is_mounted(mnt)
            if not args:  # detached, logging to the state dir: the reason is in the log too
                assert lines[0].removeprefix("xofs: ") in (tmp_path / "state" / "xofs.log").read_text()
        notify.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            notify.sock.recv(4096)
    finally:
        force_unmount(mnt)
        notify.close()


def test_the_detached_daemon_logs_to_its_file_dumps_stacks_and_stops_with_umount(sim, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.mount.log"
    daemon = Daemon(mnt)
    try:
        proc = xofs("mount", sim.url, str(mnt), "--log-file", str(log),
                    env={"XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")})
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
        pid = daemon.attach()
        text = log.read_text()
        assert pid != os.getpid() and "INFO xofs: mounted" in text
        # Lines from before the mount was live are kept, in order.
        assert "INFO xofs.sync: XO event feed connected" in text.split("INFO xofs: mounted")[0], text
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: "most recent call first" in log.read_text(), 10, "the stack dump in the log")
        # then a time stamp and trio's tasks, each with where it waits
        wait_for(lambda: "the trio tasks" in log.read_text(), 10, "the trio tasks in the log")
        tasks = log.read_text().split("the trio tasks")[1]
        assert "- xofs.client.events.EventFeed._read_frames: _read_frames (events.py:" in tasks, tasks
        assert "_traps.py" not in tasks
        os.kill(pid, signal.SIGUSR1)  # and again
        wait_for(lambda: log.read_text().count("the trio tasks") == 2, 10, "a second dump")
        assert is_mounted(mnt)  # the dump did not disturb the mount
        subprocess.run(["umount", str(mnt)], check=True)
        daemon.wait_gone()
        assert "unmounted" in log.read_text()
    finally:
        daemon.cleanup()


def test_the_daemon_can_log_to_syslog(sim, tmp_path):
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(tmp_path / "log.sock"))
    syslog.settimeout(30)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = Daemon(mnt)
    try:
        proc = xofs("mount", sim.url, str(mnt), "-o", f"syslog,syslog_socket={tmp_path / 'log.sock'}",
                    env={"XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")})
        assert proc.returncode == 0, proc.stderr
        pid = daemon.attach()
        lines = []
        while not any("mounted" in line for line in lines):
            lines.append(syslog.recv(65536).decode())
        mounted = next(line for line in lines if "mounted" in line)
        # <priority>ident[pid]: LEVEL logger: message, with priority = facility daemon (3) * 8 + info (6)
        assert mounted.startswith(f"<30>xofs[{pid}]: INFO xofs: mounted {sim.url}"), mounted
        assert not (tmp_path / "state" / "xofs.log").exists()
        assert xofs("umount", str(mnt)).returncode == 0
        daemon.wait_gone()
    finally:
        daemon.cleanup()
        syslog.close()


def spools_left(state: Path) -> list[Path]:
    return [p for p in (state / "spool").rglob("*") if p.is_file()] if (state / "spool").exists() else []


def start_slow_import(sim: SimProcess, mount: MountProcess, tmp_path: Path, name: str,
                      latency_ms: int = 3000) -> subprocess.Popen:
    """A `cp` into an import directory whose upload XO takes 3 s to answer; returns once it is uploading."""
    make_raw(tmp_path / "disk.raw", 2 << 20)
    set_faults(sim, latency_ms=latency_ms)
    target = mount.mountpoint / "srs" / sr_ids(sim)[0] / "import" / name
    cp = subprocess.Popen(["cp", str(tmp_path / "disk.raw"), str(target)], stderr=subprocess.PIPE)
    wait_for(lambda: any(t["phase"] == "uploading" for t in status_of(mount.mountpoint)["transfers"]), 10,
             "the upload to start")
    return cp


def test_stopping_lets_a_running_import_finish(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim, "--import-wait", "20")
    cp = start_slow_import(fresh_sim, mount, tmp_path, "finishing.raw")
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(30) == 0
    cp.wait(10)
    log = mount.log_text()
    assert log.index("got SIGTERM") < log.index("imported /srs/") < log.index("unmounted")
    assert [v["name_label"] for v in vdis(fresh_sim, name_label="finishing")] == ["finishing"]
    assert spools_left(Path(mount.env["XOFS_STATE_DIR"])) == []


def test_stopping_gives_up_at_once_the_upload_that_follows_a_file_being_written(fresh_sim, make_mount, tmp_path):
    """QA: SIGTERM with a VHD half written (its upload following the writer) while a cp waited in close()
    for its own upload: the first was given up only after 20 s without a write, saying it would be
    "uploaded when it is closed". No write reaches a stopping mount: it is given up at once."""
    image, _ = make_vhd(tmp_path, size=8 << 20)
    make_raw(tmp_path / "disk.raw", 2 << 20)
    mount = make_mount(fresh_sim, "--import-wait", "20", "--max-uploads", "3")  # one slot kept for closes
    target = mount.mountpoint / "srs" / sr_ids(fresh_sim)[0] / "import"
    set_faults(fresh_sim, import_bytes_per_second=100_000)  # the cp's upload takes 20 s
    # Started before the test opens its own file: a fork closing an inherited descriptor is a FUSE flush.
    cp = subprocess.Popen(["cp", str(tmp_path / "disk.raw"), str(target / "slow.raw")], stderr=subprocess.PIPE)
    wait_for(lambda: any(t["phase"] == "uploading" for t in status_of(mount.mountpoint)["transfers"]), 10,
             "the cp's upload to start")
    fd = os.open(target / "half.vhd", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert os.write(fd, image[:len(image) // 2]) == len(image) // 2
        wait_for(lambda: vdis(fresh_sim, name_label="half"), 10, "the upload that follows the writer")
        stopped = time.monotonic()
        mount.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "the mount is stopping while the file is being written); nothing is uploaded"
                 in mount.log_text(), 5, "the upload to be given up")
        # Given up only once the FUSE loop ended, it would have waited for the rest of the cp's 20 s upload.
        assert time.monotonic() - stopped < 5, "given up only once the FUSE loop ended"
        mount.proc.send_signal(signal.SIGTERM)  # the cp's upload need not finish: a second signal cuts it
        assert mount.proc.wait(30) == 0
        cp.wait(10)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert "it is uploaded when it is closed" not in mount.log_text()
    # The simulator reads what the cut upload had sent at its throttled rate (100 kB/s) before it sees the
    # end: 0 to 4 s here, longer on a busy machine (10 s were once too few in CI, the machine fully loaded).
    wait_for(lambda: vdis(fresh_sim, name_label="half") == [], 30, "XO to destroy the VDI it began")
    assert spools_left(Path(mount.env["XOFS_STATE_DIR"])) == []


def test_stopping_cuts_an_import_that_takes_longer_than_the_wait_and_leaves_nothing(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim, "-o", "import_wait=0.5")
    cp = start_slow_import(fresh_sim, mount, tmp_path, "cut.raw")
    set_faults(fresh_sim, latency_ms=None)  # the upload under way still takes its 3 s; the clean-up will not
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(30) == 0
    cp.wait(10)
    log = mount.log_text()
    assert "cancelling the unfinished import upload of /srs/" in log and "/import/cut.raw" in log
    for words in ("requests still under way after", "cancelling the unfinished import upload of"):
        assert_documented(next(line for line in log.splitlines() if words in line))
    assert vdis(fresh_sim, name_label="cut") == []
    assert spools_left(Path(mount.env["XOFS_STATE_DIR"])) == []


@pytest.mark.parametrize("events", ["jsonrpc", "sse"])
async def test_a_feed_that_refuses_the_token_fails_the_start_with_one_clear_error(fresh_sim, tmp_path, events):
    """The REST API took the token, then it stopped working before the event feed signed in with it."""
    from xofs.mount import MountOptions, assemble, startup_error_in

    parts = assemble(fresh_sim.url, fresh_sim.token, MountOptions(state_dir=tmp_path, events=events))
    await parts.client.current().check()
    assert rest(fresh_sim, "POST", "/_sim/expire-token", {"token": fresh_sim.token})[0] == 204
    with pytest.raises(BaseExceptionGroup) as caught:  # raised in the services' nursery
        async with parts.running():
            pass
    err = startup_error_in(caught.value)
    assert err is not None and str(err).startswith("the event feed refused the token from the token given: XO ")


def test_a_second_signal_stops_at_once_and_leaves_nothing(fresh_sim, make_mount, tmp_path):
    """The first SIGTERM (or Ctrl-C) waits for the import under way; an impatient second one cuts it now, and
    the mount still stops cleanly (the default action of the signal would kill the daemon)."""
    mount = make_mount(fresh_sim, "--import-wait", "20")
    cp = start_slow_import(fresh_sim, mount, tmp_path, "impatient.raw", latency_ms=6000)
    set_faults(fresh_sim, latency_ms=None)  # the upload under way still takes its 6 s
    mount.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "got SIGTERM: unmounting" in mount.log_text(), 10, "the first signal's log line")
    again = time.monotonic()
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(30) == 0
    assert time.monotonic() - again < 4  # neither the upload's 6 s nor the 20 s wait
    assert cp.wait(10) != 0  # the copy whose import was cut fails
    log = mount.log_text()
    line = next(line for line in log.splitlines() if "got SIGTERM again" in line)
    assert "impatient.raw" in line
    assert_documented(line)
    assert "cancelling the unfinished import upload of /srs/" in log and "unmounted" in log
    assert not is_mounted(mount.mountpoint)
    assert vdis(fresh_sim, name_label="impatient") == []
    assert spools_left(Path(mount.env["XOFS_STATE_DIR"])) == []


async def _bug() -> None:
    raise RuntimeError("a bug")


async def _bug_in_a_task() -> None:
    import trio

    async with trio.open_nursery() as nursery:  # comes out as an exception group
        nursery.start_soon(_bug)


@pytest.mark.parametrize("serve", [_bug, _bug_in_a_task])
def test_a_bug_that_ends_the_daemon_is_logged_as_critical_once(serve, caplog, capsys):
    """A detached daemon's stderr goes nowhere: its log must say why it died, once; a start-up error is
    no bug (one line, exit status 1)."""
    import argparse

    from xofs.daemon import Reporter, StartupError
    from xofs.mount import Mount

    mount = Mount.__new__(Mount)  # what `run` needs of it, without a server
    mount.args, mount.logs = argparse.Namespace(url="http://xo.example"), None
    mount._serve = lambda reporter: serve()
    with pytest.raises((RuntimeError, BaseExceptionGroup)):
        mount.run(Reporter(None))
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert [r.getMessage() for r in critical] == ["xofs stops on an unexpected error"]
    assert "RuntimeError: a bug" in caplog.text

    async def refused(reporter: Reporter) -> None:
        raise StartupError("XO said no")

    caplog.clear()
    mount._serve = refused
    assert mount.run(Reporter(None)) == 1
    assert capsys.readouterr().err == "xofs: cannot mount http://xo.example: XO said no\n"
    assert not [r for r in caplog.records if r.levelname == "CRITICAL"]


def test_the_detached_daemon_leaves_its_directory_and_keeps_relative_paths_working(sim, tmp_path):
    """A daemon that kept the directory it was started from would keep that filesystem busy (an
    unmountable USB stick); relative paths given to it must still work afterwards."""
    (tmp_path / "mnt").mkdir()
    (tmp_path / "token").write_text(sim.token)
    (tmp_path / "token").chmod(0o600)
    (tmp_path / "searches").write_text("power_state:Running\n")
    daemon = Daemon(tmp_path / "mnt")
    env = {k: v for k, v in os.environ.items() if k != "XOFS_TOKEN"}
    env.update(XOFS_STATE_DIR="state", XOFS_SAVED_SEARCHES="searches")
    try:
        proc = subprocess.run([sys.executable, "-m", "xofs", "mount", sim.url, "mnt", "--token-file", "token"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        pid = daemon.attach()
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert os.listdir(tmp_path / "mnt" / "search") == ["power_state:Running"]  # read after the chdir
        log = (tmp_path / "state" / "xofs.log").read_text()
        assert f" [{pid}] INFO xofs: mounted {sim.url} on {tmp_path / 'mnt'} " in log, log  # which mount
        assert f"credentials from the token file {tmp_path / 'token'})" in log, log  # read again on a 401
        assert xofs("umount", str(tmp_path / "mnt")).returncode == 0
        daemon.wait_gone()
    finally:
        daemon.cleanup()


def test_a_view_plugin_that_failed_to_load_is_named_on_the_terminal(sim, tmp_path):
    """A detached `xofs mount` said nothing and exited 0 when a plugin failed to load: its directory was
    silently missing (QA helper 49). The mount still goes on without it; the terminal now says so."""
    site = tmp_path / "site"
    (site / "broken-0.1.dist-info").mkdir(parents=True)
    (site / "broken_view.py").write_text("raise ImportError('a module it needs is missing')\n")
    (site / "broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (site / "broken-0.1.dist-info" / "entry_points.txt").write_text("[xofs.views]\nbroken = broken_view:View\n")
    (tmp_path / "mnt").mkdir()
    daemon = Daemon(tmp_path / "mnt")
    try:
        proc = subprocess.run([sys.executable, "-m", "xofs", "mount", sim.url, str(tmp_path / "mnt")],
                              env={**os.environ, "XOFS_TOKEN": sim.token, "XOFS_STATE_DIR": str(tmp_path / "state"),
                                   "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        daemon.attach()
        assert proc.stderr == ("xofs: warning: view plugin broken: broken = broken_view:View failed to load; its "
                               "directory is left out (the log says why)\n")
        assert_documented(proc.stderr.strip())
        assert "vms" in os.listdir(tmp_path / "mnt") and "broken" not in os.listdir(tmp_path / "mnt")
        assert xofs("umount", str(tmp_path / "mnt")).returncode == 0
        daemon.wait_gone()
    finally:
        daemon.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_xo_is_slow_to_answer_calls_the_start_off(fresh_sim, tmp_path, signum):
    """The daemon lives in a session of its own, so Ctrl-C reached only the waiting command: it printed a
    traceback, and the daemon went on, mounted, then died writing to the closed pipe. SIGTERM (`timeout 60
    xofs mount …`) left the daemon to mount later, holding the caller's output open meanwhile."""
    set_faults(fresh_sim, latency_ms=3000)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "xofs", "mount", fresh_sim.url, str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # see run_on_terminal
                            env={**os.environ, "XOFS_TOKEN": fresh_sim.token,
                                 "XOFS_STATE_DIR": str(tmp_path / "state")})
    try:
        # the daemon is forked (its log exists) and signing in, held back by the latency
        wait_for(lambda: (tmp_path / "state" / "xofs.log").exists(), 20, "the daemon to start")
        time.sleep(0.3)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
        assert (proc.returncode, out, err) == (128 + signum, "", "xofs: interrupted: the mount was not made\n")
        assert_documented(err.strip())
        set_faults(fresh_sim, latency_ms=0)
        time.sleep(1)
        assert not is_mounted(mnt)
        daemons = subprocess.run(["pgrep", "-f", f"xofs mount {fresh_sim.url} {mnt}"], capture_output=True)
        assert daemons.stdout == b""
        assert "CRITICAL" not in (tmp_path / "state" / "xofs.log").read_text()
    finally:
        proc.kill()
        set_faults(fresh_sim, latency_ms=0)
        force_unmount(mnt)


def test_stopping_names_a_file_still_being_written_into_an_import_directory(fresh_sim, make_mount):
    """A raw image a program was still writing when the mount stopped was dropped without a word in the log
    (helper 43)."""
    mount = make_mount(fresh_sim)
    sr = sr_ids(fresh_sim)[0]
    target = mount.mountpoint / "srs" / sr / "import" / "unfinished.raw"
    writer = open(target, "wb")  # noqa: SIM115 - closed after the daemon ends
    try:
        writer.write(os.urandom(1 << 20))
        writer.flush()
        mount.proc.send_signal(signal.SIGTERM)
        assert mount.proc.wait(30) == 0
    finally:
        with contextlib.suppress(OSError):  # the mount is gone
            writer.close()
    line = next(line for line in mount.log_text().splitlines() if "unfinished.raw" in line and "stopping" in line)
    assert f"/srs/{sr}/import/unfinished.raw is being written: it is not imported" in line, line
    assert_documented(line)
    assert vdis(fresh_sim, name_label="unfinished") == []


def test_why_fuse_refused_a_mount_is_in_the_startup_error(tmp_path):
    """libfuse and fusermount3 say why a mount failed on stderr only, which a detached daemon's log never
    sees: the start-up error (the line the user gets, and the log's) carries their words. Real libfuse,
    given an option value it cannot parse, refuses before anything is mounted."""
    script = (
        "import os, sys, pyfuse3\n"
        "from xofs.daemon import StartupError\n"
        "from xofs.mount import fuse_init\n"
        "try:\n"
        "    fuse_init(pyfuse3.Operations(), sys.argv[1], {'max_read=abc'})\n"
        "except StartupError as err:\n"
        "    print(err)\n"
        "print('stderr is back', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=30)
    assert proc.stdout == (f"the kernel refused the mount on {tmp_path}: fuse: invalid parameter in option "
                           "`max_read=abc'\n"), proc
    assert proc.stderr == "stderr is back\n"
    assert_documented(f"xofs: cannot mount http://xo.example: {proc.stdout.strip()}")
