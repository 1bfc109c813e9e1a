"""`xofs mount` and `xofs umount`: the command line and the life of a mount.

Start-up checks everything that can fail before anything is mounted (options, credentials, mount point,
server, TLS, token) and says what went wrong in one line. Then the cache is filled, the mount goes live,
and one trio nursery owns every background task (event feed, export and import work). Without
`--foreground` the daemon detaches once the mount is live (`xofs.daemon`) and the command exits 0, or
non-zero with the reason; under systemd (`Type=notify`) READY=1 goes out once mounted.

SIGTERM, SIGINT, SIGHUP (the terminal of `--foreground` closed; libfuse's filesystems stop on it too),
`fusermount3 -u` or `umount` end it: the mount goes away first, so no new work can come;
running imports get `--import-wait` seconds to finish (what is cut is logged), exports are cancelled, the
spools cleaned. SIGUSR1 writes every thread's stack to the log. Options are in `xofs.options`, where the
credentials come from in `xofs.credentials`, the status file in `xofs.status`.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyfuse3
import trio

from xofs import status
from xofs.cache import Change, ObjectCache
from xofs.client.auth import ssl_context
from xofs.client.rest import RestClient
from xofs.credentials import (
    CredentialError,
    Credentials,
    OncePerMinute,
    Redactor,
    RotatingClient,
    choose_source,
)
from xofs.daemon import LogSetup, Reporter, StackDumps, StartupError, detach, notify_systemd
from xofs.errors import XoAuthError, XofsError, with_tls_hint
from xofs.exports import ExportManager
from xofs.feeds import FeedRunner
from xofs.fs import Freshness, XoFS
from xofs.imports import ImportManager
from xofs.invalidator import Invalidator
from xofs.malloc import tune_malloc
from xofs.options import OptionError, add_arguments, pin_paths, resolve
from xofs.proc_mounts import is_mounted, resolve_parent
from xofs.sync import Syncer
from xofs.tree import Tree
from xofs.views import load_views

log = logging.getLogger("xofs")

# SIGHUP too: `--foreground` in a terminal that closes (an ssh session that drops) would otherwise die of
# it, cutting the uploads under way instead of giving them the import wait.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FEED_START_WAIT = 15.0  # seconds the event feed gets at start before the mount is served from a plain load
# A read of an export fails once some of its bytes came but not all within this many read timeouts
# (`ExportManager.read_deadline`). Twice: a pause the socket's read timeout lets pass never fails a read by
# itself, even one that began just before it; only a stream that trickles does (under 1 MiB in 120 s).
READ_DEADLINE_TIMES = 2
INSECURE_WARNING = ("WARNING: --insecure: the TLS certificate of {url} is NOT checked; anyone between this "
                    "machine and XO can read the token and every byte of data (use --ca-file instead)")
CLEAR_WARNING = ("WARNING: {url} is plain HTTP: anyone between this machine and XO can read the token and every "
                 "byte of data (use https://)")


def transport_warning(url: str, insecure: bool) -> str | None:
    """The warning a mount's start gives about how its token travels, if it should give one: `--insecure`,
    or plain HTTP to another machine (to this one, as the simulator runs, nothing is on the way)."""
    if insecure:
        return INSECURE_WARNING.format(url=url)
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname in (None, "localhost"):
        return None
    try:
        if ipaddress.ip_address(parts.hostname).is_loopback:
            return None
    except ValueError:
        pass  # a host name: not this machine, as far as the URL says
    return CLEAR_WARNING.format(url=url)


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the XO server, e.g. https://xo.example.org")
    p.add_argument("mountpoint", type=Path, help="the directory to mount it on (what it holds is hidden while mounted)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay attached to the terminal")
    add_arguments(p)


def add_umount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", type=Path, help="where an xofs mount is (refused while a program is inside it)")


def run_umount(args: argparse.Namespace) -> int:
    if not is_mounted(args.mountpoint, "fuse.xofs"):
        what = "is not an xofs mount" if os.path.lexists(args.mountpoint) else "does not exist"
        print(f"xofs umount: {args.mountpoint} {what}", file=sys.stderr)
        return 1
    target = resolve_parent(args.mountpoint)  # fusermount3 refuses a symbolic link to the mount point
    proc = subprocess.run(["fusermount3", "-u", str(target)], stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        said = proc.stderr.strip() or "fusermount3 failed"
        if "busy" in said:  # fusermount3: failed to unmount DIR: Device or resource busy
            said += f" (a program still has a file or its directory there: fuser -vm {args.mountpoint} lists them)"
        print(f"xofs umount: {said}", file=sys.stderr)
    return proc.returncode


def run_mount(args: argparse.Namespace, *, sloppy: bool = False, fake: bool = False) -> int:
    """`xofs mount`; `sloppy` drops unknown `-o` words, `fake` stops after the checks (mount(8)'s -s, -f)."""
    try:
        fuse_flags = resolve(args, sloppy=sloppy)
        pin_paths(args, os.environ)
        args.url = check_url(args.url)
        verify = tls_verify(args)
        credentials = Credentials(args.url.rstrip("/"), choose_source(args.url, token_file=args.token_file,
                                                                      basic_file=args.basic_file),
                                  verify=verify, mountpoint=os.path.abspath(args.mountpoint))
        credentials.read()
        check_mountpoint(args.mountpoint)
    except (OptionError, CredentialError, StartupError) as err:
        print(f"xofs: {err}", file=sys.stderr)
        return 2
    if fake:
        return 0
    # What the daemon writes (its log, the spools, the import records) is its user's alone: the log names the
    # XO account, VMs and disks (helper 47). The modes the mount shows are `--umask`'s, not this.
    os.umask(0o077)
    mount = Mount(args, credentials, fuse_flags, verify)
    try:
        make_directories(mount.options)
    except StartupError as err:
        print(f"xofs: {err}", file=sys.stderr)
        return 2
    warning = transport_warning(args.url, args.insecure)
    if warning and not (args.foreground and args.log_file is None and not args.syslog):
        print("xofs: " + warning, file=sys.stderr)  # the log may not be seen
    if args.foreground:
        try:
            mount.setup_logging(detached=False)
        except StartupError as err:
            print(f"xofs: {err}", file=sys.stderr)
            return 2
        return mount.run(Reporter(None))
    return detach(mount.run, lambda: mount.setup_logging(detached=True))


def check_url(url: str) -> str:
    """The URL, its scheme in lower case (`HTTPS://xo` took the event feed down), or StartupError."""
    if url != url.strip():  # urlsplit drops the spaces, and the URL the daemon uses would not be the one checked
        raise StartupError(f"{url!r} is not an http(s) URL of an XO server (it has spaces around it)")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is no number from 0 to 65535
    except ValueError:
        raise StartupError(f"{url!r} is not an http(s) URL of an XO server "
                           "(its port is no number from 0 to 65535)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StartupError(f"{url!r} is not an http(s) URL of an XO server")
    if parts.username or parts.password:
        raise StartupError("credentials in the URL are refused (every user can read command lines): "
                           "use --token-file or XOFS_TOKEN")
    return parts.scheme + url[len(parts.scheme):]


def tls_verify(args: argparse.Namespace) -> bool | str:
    """How to check XO's certificate: the system CAs (True), a CA file (its path), or not at all (False)."""
    if args.insecure and args.ca_file:
        raise StartupError("--insecure and --ca-file contradict each other: pick one")
    if args.insecure:
        return False
    if args.ca_file:
        path = str(args.ca_file)
        try:
            with open(path, "rb"):  # the reason (missing, no permission), and a directory is refused here
                pass
            ssl_context(path)  # the certificates themselves: a DER file or a key file took the daemon down
        except IsADirectoryError:
            raise StartupError(f"the CA file {path} is a directory: give the PEM file of the CA") from None
        except OSError as err:
            if isinstance(err, ssl.SSLError):
                raise StartupError(f"the CA file {path} holds no PEM certificate that OpenSSL takes "
                                   f"({err.reason or err}): give the CA's certificate in PEM "
                                   "(openssl x509 -inform DER -in FILE -out FILE.pem converts a DER one)") from None
            raise StartupError(f"cannot read the CA file {path}: {err.strerror}") from None
        return path
    return True


def make_directories(options: MountOptions) -> None:
    """The state and spool directories, made now (0700) so that one that cannot be (a file there, no
    permission) fails the start in one line, not the daemon later."""
    for flag, path in (("--state-dir", options.state_dir), ("--spool-dir", options.spool_dir)):
        if path is None:
            continue
        if path.exists() and not path.is_dir():
            raise StartupError(f"{flag} {path} is not a directory")
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StartupError(f"cannot make the directory {path} ({flag}): {err.strerror}") from None


def check_mountpoint(path: Path) -> None:
    if is_mounted(path):  # first: a stat of a hung mount would hang
        raise StartupError(f"{path} is already a mount point (unmount it first: fusermount3 -u {path})")
    if not path.exists():
        raise StartupError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise StartupError(f"mount point {path} is not a directory")


def state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return args.state_dir
    if os.environ.get("XOFS_STATE_DIR"):
        return Path(os.environ["XOFS_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "xofs"


def fuse_init(fs: XoFS, mountpoint: Path, options: set[str]) -> None:
    """`pyfuse3.init`, with what libfuse and `fusermount3` write on stderr (why a mount failed) in the
    startup error, so that a log file or syslog gets it too, not only a terminal that may be gone."""
    with tempfile.TemporaryFile() as said:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        refused: RuntimeError | None = None
        try:
            pyfuse3.init(fs, str(mountpoint), options)
        except RuntimeError as err:
            refused = err
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        words = " ".join(said.read().decode("utf-8", "replace").split())
    if refused is not None:
        raise StartupError(f"the kernel refused the mount on {mountpoint}: {words or refused}")
    if words:  # libfuse's warnings on a mount that worked
        log.warning("FUSE on %s: %s", mountpoint, words)


def fuse_options(args: argparse.Namespace, flags: set[str]) -> set[str]:
    """`fsname` is the URL, as in fstab, so that `mount -a` sees the entry as mounted already."""
    url = args.url
    fsname = url if url.isascii() and not any(c in url for c in ", \\") else "xofs"
    options = {f"fsname={fsname}", "subtype=xofs", "auto_unmount", "default_permissions", *flags}
    if args.read_only:
        options.add("ro")
    if args.allow_other:
        options.add("allow_other")
    return options


@dataclass
class MountOptions:
    """Everything that shapes a mount besides the server and the credentials."""

    state_dir: Path
    spool_dir: Path | None = None
    spool_size: int = 8 << 30
    attr_ttl: float = 60.0
    fallback_ttl: float = 1.0
    read_only: bool = False
    max_exports: int = 4
    readahead: int = 8 << 20
    max_uploads: int = 2
    import_wait: float = 30.0
    verify: bool | str = True
    events: str = "jsonrpc"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    keepalive: float = 30.0
    poll_interval: float = 30.0
    uid: int | None = None
    gid: int | None = None
    umask: int = 0o077

    @classmethod
    def from_args(cls, args: argparse.Namespace, verify: bool | str = True) -> MountOptions:
        umask = args.umask if args.umask is not None else 0o022 if args.allow_other else 0o077
        return cls(state_dir=state_dir(args), spool_dir=args.spool_dir, spool_size=args.spool_size,
                   attr_ttl=args.attr_ttl, fallback_ttl=args.fallback_ttl, read_only=args.read_only,
                   max_exports=args.max_exports, readahead=args.readahead, max_uploads=args.max_uploads,
                   import_wait=args.import_wait, verify=verify, events=args.events,
                   connect_timeout=args.connect_timeout, read_timeout=args.read_timeout, keepalive=args.keepalive,
                   poll_interval=args.poll_interval, uid=args.uid, gid=args.gid, umask=umask)

    def public(self) -> dict:
        """The options as the status file shows them (nothing secret is among them)."""
        tls = "not checked (--insecure)" if self.verify is False else \
            "system CAs" if self.verify is True else f"CA file {self.verify}"
        return {"read_only": self.read_only, "uid": self.uid, "gid": self.gid, "umask": f"{self.umask:03o}",
                "attr_ttl": self.attr_ttl, "fallback_ttl": self.fallback_ttl,
                "poll_interval": self.poll_interval, "max_exports": self.max_exports,
                "readahead": self.readahead, "max_uploads": self.max_uploads, "spool_size": self.spool_size,
                "import_wait": self.import_wait, "tls": tls}


@dataclass
class Parts:
    """A mount's pieces, wired together; `running()` runs their background work."""

    url: str
    credentials: Credentials
    client: RotatingClient
    cache: ObjectCache
    tree: Tree
    fs: XoFS
    syncer: Syncer
    feeds: FeedRunner
    exports: ExportManager
    imports: ImportManager
    invalidator: Invalidator
    plugins_failed: list[str]  # the view plugins that failed to load (logged), for the terminal

    @asynccontextmanager
    async def running(self, *, load_only: bool = False) -> AsyncIterator[trio.Nursery]:
        """Start the services, fill the cache (from the event feed, or with one plain load), yield the
        nursery that owns them, and stop everything on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.exports.run)
                await nursery.start(self.imports.run)
                nursery.start_soon(self.syncer.relist_when_due)
                if load_only:
                    await self.syncer.load()
                else:
                    await self._start_feed(nursery)
                    nursery.start_soon(self.syncer.poll_while_down)
                try:
                    yield nursery
                finally:
                    self._say_what_is_cut()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    async def _start_feed(self, nursery: trio.Nursery) -> None:
        try:
            with trio.fail_after(FEED_START_WAIT):
                await nursery.start(self.feeds.run)
        except trio.TooSlowError:
            # The REST API works but the event feed does not (yet): serve from a plain load with short
            # kernel cache lifetimes while the feed keeps trying.
            log.warning("XO event feed not available after %.0f s; serving from one load of every collection, "
                        "with kernel caches of %.0f s until the feed is up", FEED_START_WAIT,
                        self.fs.freshness.fallback_ttl)
            await self.syncer.load()
            nursery.start_soon(self.feeds.run)
        except XoAuthError as err:
            raise StartupError(f"the event feed refused the token from {self.credentials.describe()}: "
                               f"{err.describe()}") from None

    def _say_what_is_cut(self) -> None:
        cut = self.exports.cut_by_stop if self.exports.cut_by_stop is not None else self.exports.under_way()
        if cut:
            log.info("stopping: %d export read(s) cancelled: %s", len(cut), ", ".join(sorted(cut)))


def assemble(url: str, credentials: str | Credentials, options: MountOptions) -> Parts:
    """Build and wire every piece of a mount (nothing runs yet, nothing is mounted). `credentials` may be
    a plain token (kept as it is) or `Credentials` (read again when XO refuses the token)."""
    url = url.rstrip("/")
    if isinstance(credentials, str):
        credentials = Credentials.given(url, credentials)
    pool = max(16, options.max_exports + options.max_uploads + 4)

    def make_client(token: str) -> RestClient:
        return RestClient(url, token, max_connections=pool, connect_timeout=options.connect_timeout,
                          read_timeout=options.read_timeout, verify=options.verify)

    client = RotatingClient(credentials, make_client)
    cache = ObjectCache()
    freshness = Freshness(connected_ttl=options.attr_ttl, fallback_ttl=options.fallback_ttl)
    invalidator = Invalidator()
    spool = options.spool_dir or options.state_dir / "spool"
    server_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    # The services need to reach the filesystem's invalidation queue, which exists only once the
    # filesystem does: they get a late-bound callback.
    fs_ref: list[XoFS] = []
    exports = ExportManager(client, cache, spool_dir=spool / "exports", spool_limit=options.spool_size,
                            max_exports=options.max_exports, readahead=options.readahead,
                            on_size_known=lambda export: fs_ref[0].export_size_known(export),
                            on_bounds_changed=lambda obj_id: fs_ref[0].export_bounds_changed(obj_id),
                            read_deadline=READ_DEADLINE_TIMES * options.read_timeout)
    imports = ImportManager(client, cache, state_dir=options.state_dir, spool_dir=spool / "imports",
                            server_key=server_key, max_uploads=options.max_uploads, read_only=options.read_only,
                            notify=lambda sr_id, names: fs_ref[0].import_entries_changed(sr_id, names),
                            shutdown_wait=options.import_wait)
    plugins_failed: list[str] = []
    tree = Tree(cache, load_views(failed=plugins_failed), imports)
    fs = XoFS(tree, exports=exports, imports=imports, invalidator=invalidator, freshness=freshness,
              read_only=options.read_only, uid=options.uid, gid=options.gid, umask=options.umask)
    fs_ref.append(fs)

    def on_changes(changes: list[Change]) -> None:
        exports.on_changes(changes)
        imports.on_changes(changes)

    syncer = Syncer(client, cache, tree, freshness, fs.apply_invalidations, on_changes=on_changes,
                    poll_interval=options.poll_interval)
    feeds = FeedRunner(options.events, url, credentials, syncer, verify=options.verify,
                       connect_timeout=options.connect_timeout, keepalive=options.keepalive)
    imports.xapi_tasks = feeds.xapi_tasks  # what tells an import under way from what a failed one left
    return Parts(url, credentials, client, cache, tree, fs, syncer, feeds, exports, imports, invalidator,
                 plugins_failed)


class Mount:
    """One `xofs mount` run: logging, the trio run, and reporting how the start went."""

    def __init__(self, args: argparse.Namespace, credentials: Credentials, fuse_flags: set[str],
                 verify: bool | str) -> None:
        self.args = args
        self.credentials = credentials
        self.fuse_flags = fuse_flags
        self.options = MountOptions.from_args(args, verify)
        self.errors = status.RecentErrors()
        self.logs: LogSetup | None = None
        self.stack_dumps: StackDumps | None = None

    def setup_logging(self, *, detached: bool) -> None:
        args = self.args
        log_file = args.log_file or (self.options.state_dir / "xofs.log" if detached else None)
        self.logs = LogSetup(args.log_level, log_file=None if args.syslog else log_file,
                             syslog_socket=args.syslog_socket if args.syslog else None,
                             filters=lambda: [Redactor(self.credentials), OncePerMinute()], extra=[self.errors])
        self.stack_dumps = StackDumps(self.logs.stream, self.options.state_dir / "xofs-stacks.log")

    def run(self, reporter: Reporter) -> int:
        if not tune_malloc():
            log.debug("malloc thresholds left as they are (not glibc)")
        try:
            trio.run(self._serve, reporter)
        except (Exception, BaseExceptionGroup) as exc:
            err = startup_error_in(exc)
            if err is None:
                # A bug that ends the daemon: into its log too (a detached daemon's stderr goes nowhere).
                log.critical("xofs stops on an unexpected error", exc_info=exc)
                raise
            message = f"xofs: cannot mount {self.args.url}: {err}"
            if self.logs is not None and self.logs.held is None:  # a file or syslog: the reason goes there too
                log.error("%s", message.removeprefix("xofs: "))
            reporter.failed(message)
            return 1
        return 0

    async def _serve(self, reporter: Reporter) -> None:
        args, credentials = self.args, self.credentials
        warning = transport_warning(args.url, args.insecure)
        if warning:
            log.warning(warning)
        try:
            await credentials.load()
        except CredentialError as err:
            raise StartupError(str(err)) from None
        parts = assemble(args.url, credentials, self.options)
        await _check_server(parts)
        status.register(status.MountState(
            parts.url, str(os.path.abspath(args.mountpoint)), feed_kind=lambda: parts.feeds.kind,
            credentials=credentials.describe(), syncer=parts.syncer, cache=parts.cache,
            transfer_sources=[parts.exports.transfers, parts.imports.transfers], errors=self.errors,
            options=self.options.public()))
        # The stopper lives in a nursery of its own, around the services: it still catches signals while they
        # stop (a second stop signal then ends the waits; the default action would kill the process).
        async with trio.open_nursery() as signals:
            if self.stack_dumps is not None:
                await signals.start(self.stack_dumps.run)
            async with parts.running():
                parts.fs.warm()
                fuse_scope = trio.CancelScope()
                stopper = _Stopper(parts, self.options.import_wait, fuse_scope)
                # The stop signals are caught from before the mount exists: one sent as soon as the mount
                # shows in /proc/mounts must unmount cleanly, not kill the process. (Nothing below yields
                # until pyfuse3.main runs, so the stopper cannot act on a half-made mount.)
                await signals.start(stopper.run)
                fuse_init(parts.fs, args.mountpoint, fuse_options(args, self.fuse_flags))
                try:
                    parts.invalidator.start()
                    with fuse_scope:
                        if self.logs is not None:
                            self.logs.go_live()
                        log.info("mounted %s on %s (%d objects, %s events, credentials from %s)", parts.url,
                                 args.mountpoint, len(parts.cache), parts.feeds.kind, credentials.describe())
                        notify_systemd(f"READY=1\nMAINPID={os.getpid()}\n"
                                       f"STATUS=mounted {parts.url} on {args.mountpoint}")
                        reporter.ready([f"xofs: warning: view plugin {plugin} failed to load; its directory is "
                                        "left out (the log says why)" for plugin in parts.plugins_failed])
                        await pyfuse3.main()
                    stopper.fuse_done()
                finally:
                    notify_systemd("STOPPING=1")
                    parts.invalidator.stop()
                    pyfuse3.close(unmount=True)
            signals.cancel_scope.cancel()
        # The mount is gone and the services stopped: a late signal must not make a clean stop look killed.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        status.register(None)
        log.info("unmounted %s", args.mountpoint)


def startup_error_in(exc: BaseException) -> StartupError | None:
    """The `StartupError` that `exc` is, or the one a group of only those holds (raised within the
    services' nursery, it comes out wrapped); None for anything else."""
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(StartupError)
        if matched is None or rest is not None:
            return None
        exc = matched
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
    return exc if isinstance(exc, StartupError) else None


async def _check_server(parts: Parts) -> None:
    """The one request that tells, before anything is mounted, whether XO answers and takes the token."""
    try:
        await parts.client.current().check()
    except XoAuthError as err:
        await parts.client.aclose()
        raise StartupError(f"{err.describe()}: XO refuses the token from {parts.credentials.describe()}") from None
    except XofsError as err:
        await parts.client.aclose()
        verify = parts.credentials.verify
        words = with_tls_hint(err.describe(), verify if isinstance(verify, str) else None)
        if parts.url.startswith("http://") and "disconnected without sending a response" in words:
            words += " (a TLS port, answered in plain HTTP? then the URL is https://)"
        raise StartupError(words) from None


class _Stopper:
    """SIGTERM, SIGINT or SIGHUP: end the FUSE loop, giving the requests under way (a `cp` waiting in close() for
    its upload) the import wait; then whatever is left of that wait goes to the uploads themselves."""

    def __init__(self, parts: Parts, wait: float, fuse_scope: trio.CancelScope) -> None:
        self.parts = parts
        self.wait = wait
        self.fuse_scope = fuse_scope
        self.deadline: float | None = None
        self.done = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled (once the services have stopped): the first signal starts the stop, any later
        one ends its waits at once."""
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            task_status.started()
            signum = await anext(signals)
            uploads = self._under_way()
            log.info("got %s: unmounting%s", signal.Signals(signum).name,
                     f"; waiting up to {self.wait:g} s for {len(uploads)} import(s) to finish" if uploads else "")
            self.deadline = trio.current_time() + self.wait
            pyfuse3.terminate()
            self.parts.exports.stop_starting()
            self.parts.imports.stop_writers()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cut_after_the_wait)
                async for signum in signals:
                    cut = self._under_way()
                    log.warning("got %s again: stopping now%s", signal.Signals(signum).name,
                                f"; imports cut: {', '.join(cut)}" if cut else "")
                    self.fuse_scope.cancel()
                    self.parts.imports.stop_waiting()

    async def _cut_after_the_wait(self) -> None:
        await trio.sleep(self.wait)
        if not self.done:
            cut = self._under_way()
            log.warning("stopping: requests still under way after %g s are cut%s", self.wait,
                        f" (imports: {', '.join(cut)})" if cut else "")
            self.fuse_scope.cancel()

    def _under_way(self) -> list[str]:
        return sorted(t["path"] for t in self.parts.imports.transfers() if t["phase"] != "writing")

    def fuse_done(self) -> None:
        """The FUSE loop ended: running uploads get what is left of the wait (all of it after an unmount)."""
        self.done = True
        if self.deadline is not None:
            self.parts.imports.shutdown_wait = max(0.0, self.deadline - trio.current_time())
