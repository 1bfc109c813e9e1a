"""Running `xofs mount` as a daemon: detaching once the mount is live, logging, systemd readiness, stack dumps.

- `detach(serve)`: fork; the child runs the mount and reports through a pipe (`ready()` once the mount is
  live, or the one line saying why it is not); the parent waits for that and exits 0, or 1 with the line.
  From then on the child's standard streams point at /dev/null: nothing reaches the terminal any more.
- `LogSetup`: a file, syslog (the journal, under systemd), or standard error. A file and syslog get every
  line from the start (a failed start leaves its retries there; the terminal still gets one line). On
  standard error the lines below WARNING are held back until `go_live()` and written then, so a failed
  start in the foreground says one line, not a log of retries.
- `notify_systemd`: `READY=1` and `STOPPING=1` on `$NOTIFY_SOCKET`, for `Type=notify` units (the protocol is
  one datagram on a Unix socket; no library needed).
- `StackDumps`: `kill -USR1 <pid>` writes every thread's Python stack and every trio task to the log file.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import logging.handlers
import os
import signal
import socket
import stat
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import trio

from xofs.log_lines import OneLineFormatter

log = logging.getLogger("xofs")

NOISY_LOGGERS = ("httpx", "httpcore", "trio-websocket", "hpack")
TRIO_DIR = os.path.dirname(trio.__file__) + os.sep
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A log file may be shared by several mounts (their state directory is): each line names its daemon's pid,
# which `xofs status` shows beside the mount point, as syslog's lines do.
FILE_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class StartupError(Exception):
    """Something that keeps the mount from starting; its message is the one line the user sees."""


class Reporter:
    """Tells whoever waits for the mount (the parent of a detached daemon, or the terminal) how it went."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.detached = fd is not None

    def ready(self, warnings: list[str] | None = None) -> None:
        """The mount is live; `warnings` go to the terminal of the command that started a detached daemon
        (a daemon in the foreground has logged them there already)."""
        self._send("\n".join(["ok", *(warnings or [])]))
        if self.detached:  # the terminal is the parent's: the daemon writes nothing there any more
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.close(devnull)

    def failed(self, message: str) -> None:
        if self.fd is None:
            print(message, file=sys.stderr)
        else:
            self._send(message)

    def _send(self, message: str) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, message.encode())
            except BrokenPipeError:  # the command that started the daemon was killed: the mount stays
                log.warning("the command that started this mount is gone; the mount stays up")
            os.close(self.fd)
            self.fd = None


class CalledOff(Exception):
    """A signal told the command waiting for the daemon to give up the start."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _called_off(signum: int, frame: object) -> None:
    raise CalledOff(signum)


def detach(serve: Callable[[Reporter], int], prepare: Callable[[], None]) -> int:
    """Fork; the parent returns 0 once the child says the mount is live, or prints why not and returns 1.

    The child leaves the current directory for `/`, calls `prepare()` (logging to a file or syslog) and then
    `serve(reporter)`, and exits.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        # Ctrl-C, `timeout 60 xofs mount …`, a closed terminal; not a signal the caller ignores (`&` in a script)
        calls_off = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
        before = {signum: signal.signal(signum, _called_off) for signum in calls_off}
        try:
            with os.fdopen(read_fd, "rb") as pipe:
                message = pipe.read().decode("utf-8", "replace").strip()
        except CalledOff as why:  # XO slow to answer, say: the start is called off
            for signum in calls_off:  # a second signal must not cut the clean-up short
                signal.signal(signum, signal.SIG_IGN)
            os.kill(pid, signal.SIGTERM)  # it stops as on any SIGTERM, unmounting if it got that far
            os.waitpid(pid, 0)
            print("xofs: interrupted: the mount was not made", file=sys.stderr)
            return 128 + why.signum
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)
        first, _, warnings = message.partition("\n")
        if first == "ok":
            if warnings:
                print(warnings, file=sys.stderr)
            return 0
        print(message or "xofs: the mount daemon died before the mount was live", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()
    os.chdir("/")  # not to keep busy the filesystem it was started from (every path is absolute: `pin_paths`)
    reporter = Reporter(write_fd)
    code = 1
    try:
        prepare()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
        code = serve(reporter)
    except StartupError as err:
        reporter.failed(f"xofs: {err}")
    finally:
        os._exit(code)


class HeldUntilLive(logging.Filter):
    """Holds back the records below WARNING (the last `limit` of them) until `release`."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.held: deque[logging.LogRecord] = deque(maxlen=limit)
        self.live = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.live or record.levelno >= logging.WARNING:
            return True
        self.held.append(record)
        return False

    def release(self, handler: logging.Handler) -> None:
        """Let everything through from now on, and write what was held to `handler` (through its filters
        again: they pass the records below WARNING that they passed before)."""
        self.live = True
        while self.held:
            handler.handle(self.held.popleft())


class LogSetup:
    """The daemon's log: one output handler, plus any extra handlers (the status file's recent errors)."""

    def __init__(self, level: str, *, log_file: Path | None = None, syslog_socket: Path | None = None,
                 filters: Callable[[], list[logging.Filter]] = list,
                 extra: Sequence[logging.Handler] = ()) -> None:
        self.level = logging.getLevelName(level.upper())
        if syslog_socket is not None:
            # SysLogHandler ignores a socket it cannot connect to (and would lose every line): check first.
            try:
                if not stat.S_ISSOCK(os.stat(syslog_socket).st_mode):
                    raise StartupError(f"cannot log to syslog at {syslog_socket}: not a socket")
            except OSError as err:
                raise StartupError(f"cannot log to syslog at {syslog_socket}: {err.strerror}") from None
            handler: logging.Handler = logging.handlers.SysLogHandler(
                str(syslog_socket), facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(OneLineFormatter("xofs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
        elif log_file is not None:
            try:
                log_file.parent.mkdir(parents=True, exist_ok=True)
                # reopened when logrotate (or anyone) moved it away: SIGHUP stops a mount, as SIGTERM does
                handler = logging.handlers.WatchedFileHandler(log_file)
            except OSError as err:
                raise StartupError(f"cannot write the log file {log_file}: {err.strerror}") from None
            handler.setFormatter(OneLineFormatter(FILE_FORMAT))
        else:
            handler = logging.StreamHandler()
            handler.setFormatter(OneLineFormatter(FORMAT))
        self.handler = handler
        # Where SIGUSR1 dumps stacks: the log file, or standard error in the foreground (not syslog).
        self.stream: IO[str] | None = getattr(handler, "stream", None) if syslog_socket is None else None
        root = logging.getLogger()
        for old in root.handlers[:]:
            root.removeHandler(old)
        for h in [handler, *extra]:
            for f in filters():  # each handler its own: some filters keep state
                h.addFilter(f)
            root.addHandler(h)
        # On the terminal only warnings are shown until the mount is live, so that a failed start says one
        # line, not a retry log; the rest comes out once it is live. A file or syslog gets it all at once.
        self.held: HeldUntilLive | None = None
        if syslog_socket is None and log_file is None:
            self.held = HeldUntilLive()
            handler.addFilter(self.held)
        root.setLevel(self.level)
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)

    def go_live(self) -> None:
        if self.held is not None:
            self.held.release(self.handler)


def notify_systemd(message: str) -> bool:
    """Send `message` (`READY=1`, `STOPPING=1`, `STATUS=…`) to systemd if it started us; False if not."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        log.warning("cannot notify systemd on %s: %s", os.environ["NOTIFY_SOCKET"], err.strerror)
        return False
    return True


class StackDumps:
    """`kill -USR1 <pid>`: every thread's Python stack, then (once trio's loop gets to it) a time stamp and
    every trio task with the line it waits at, to `stream` (the log file), else to `fallback`.

    The threads' stacks come from faulthandler's C handler, so they are written even when the one Python
    thread that answers the kernel is stuck; the tasks need that thread, and follow when it runs again. The
    signal is ignored, not fatal, before and after `run`."""

    def __init__(self, stream: IO[str] | None, fallback: Path) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # what faulthandler gives back when unregistered
        self.stream = stream
        if stream is None:
            try:
                fallback.parent.mkdir(parents=True, exist_ok=True)
                self.stream = open(fallback, "a")  # noqa: SIM115 - kept open for as long as the process lives
            except OSError as err:
                log.warning("SIGUSR1 will not dump stacks: cannot open %s: %s", fallback, err.strerror)
                return
        faulthandler.register(signal.SIGUSR1, file=self.stream, all_threads=True)

    @property
    def path(self) -> Path | None:
        name = getattr(self.stream, "name", None)
        return Path(name) if isinstance(name, str) else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """For as long as the trio run lasts: faulthandler first, then trio's receiver (chained)."""
        if self.stream is None:
            task_status.started()
            return
        faulthandler.unregister(signal.SIGUSR1)  # back to SIG_IGN
        with trio.open_signal_receiver(signal.SIGUSR1) as received:
            faulthandler.register(signal.SIGUSR1, file=self.stream, all_threads=True, chain=True)
            task_status.started()
            try:
                async for _ in received:
                    self.stream.write(tasks_report())
                    self.stream.flush()
            finally:
                faulthandler.unregister(signal.SIGUSR1)  # back to trio's handler, which the receiver removes


def tasks_report() -> str:
    """A time stamp and the tree of trio tasks, each with where it waits (innermost call last; trio's own
    frames left out)."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    lines = [f"SIGUSR1 at {stamp}: the threads' stacks are above; the trio tasks (innermost call last):"]

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = [f"{f.f_code.co_name} ({Path(f.f_code.co_filename).name}:{lineno})"
                  for f, lineno in task.iter_await_frames() if not f.f_code.co_filename.startswith(TRIO_DIR)]
        lines.append(f"{'  ' * depth}- {task.name}: {' > '.join(frames) or 'in trio'}")
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines) + "\n"
