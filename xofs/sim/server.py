"""`xofs sim`: the simulator's process: command line, one ASGI app on hypercorn's trio worker, clean exit.

The app sends a websocket upgrade to exactly `/api/` to the JSON-RPC handler, and every HTTP request to the
REST app (`xofs.sim.rest.make_rest_app`). A websocket on any other path is never accepted: like a real XO, the
server leaves the client waiting until it gives up (no upgrade handler matches there).

HTTP requests under `/rest/v0/events` go to the REST event stream (`xofs.sim.sse`) first. With `--tls-cert`
and `--tls-key`, or `--tls` (a self-signed certificate, see `xofs.sim.tls`), it serves HTTPS and `wss:`.

When it is ready the process prints one line on stdout, `xofs sim listening on http(s)://HOST:PORT`; logs go
to stderr. SIGTERM, SIGINT or SIGHUP (its terminal closed) stops it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from xofs.malloc import tune_malloc
from xofs.sim.faults import Faults
from xofs.sim.http_send import send_as_node_does
from xofs.sim.jsonrpc import load_methods_info
from xofs.sim.jsonrpc import serve as serve_jsonrpc
from xofs.sim.model import SimModel, new_token
from xofs.sim.rest import make_rest_app
from xofs.sim.sse import PREFIX as SSE_PREFIX
from xofs.sim.sse import SseApp
from xofs.sim.state import StateMismatch
from xofs.sim.tls import TlsSetupError, self_signed

log = logging.getLogger("xofs.sim")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080); 0 picks a free one")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN",
                        help="accept this authentication token (repeatable), as well as $XOFS_TOKEN (which, unlike "
                        "an argument, other users cannot read in ps); one is generated if neither is given")
    parser.add_argument("--vms", type=int, default=12, help="number of VMs in the inventory (default 12)")
    parser.add_argument("--seed", type=int, default=1,
                        help="inventory seed: same seed, same objects and ids (default 1)")
    parser.add_argument("--state-dir", type=Path, help="keep changes (imports, renames, deletions, tokens) here")
    parser.add_argument("--churn", type=float, default=0.0, metavar="RATE",
                        help="metric-style updates of running VMs, about RATE events per second")
    parser.add_argument("--legacy", action="store_true", help="answer REST like XO before 5.111 (legacy router)")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM; with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a self-signed certificate, made in "
                        "<state dir>/tls/ (or a temporary directory); its path is printed on stderr")


def run(ns: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokens = list(ns.token)
    if os.environ.get("XOFS_TOKEN"):
        tokens.append(os.environ["XOFS_TOKEN"])
        print("xofs sim: accepting the token in $XOFS_TOKEN", file=sys.stderr, flush=True)
    if not tokens:
        tokens.append(new_token())
        print(f"xofs sim: demo token {tokens[0]}", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as cleanup:
        # Made only for --tls without a state dir: a simulator killed with SIGKILL (tests do) leaves it behind.
        def scratch() -> Path:
            return Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="xofs-sim-tls-")))

        try:
            tls = _tls_files(ns, scratch)
            model = SimModel(seed=ns.seed, vms=ns.vms, state_dir=ns.state_dir, tokens=tokens, legacy=ns.legacy)
        except (StateMismatch, TlsSetupError) as error:
            print(f"xofs sim: {error}", file=sys.stderr)
            return 2
        return _run_model(ns, model, tls)


def _tls_files(ns: argparse.Namespace, scratch: Callable[[], Path]) -> tuple[Path, Path] | None:
    """(certificate, key) to serve HTTPS with, or None for plain HTTP; `scratch()` makes a temporary
    directory for a self-signed certificate when there is no state dir."""
    if bool(ns.tls_cert) != bool(ns.tls_key):
        raise TlsSetupError("--tls-cert and --tls-key go together")
    if ns.tls_cert:
        return ns.tls_cert, ns.tls_key
    if not ns.tls:
        return None
    cert, key = self_signed(ns.state_dir / "tls" if ns.state_dir else scratch(), host=ns.host)
    print(f"xofs sim: self-signed certificate {cert} (trust it with: xofs mount --ca-file {cert})",
          file=sys.stderr, flush=True)
    return cert, key


def _run_model(ns: argparse.Namespace, model: SimModel, tls: tuple[Path, Path] | None) -> int:
    # The inventory lives as long as the process: keep the garbage collector from walking it again and
    # again (with 10,000 VMs the first big listing otherwise stalls for more than half a second).
    gc.freeze()
    tune_malloc()  # its 1 MiB export chunks come from the heap, not from an mmap each
    try:
        trio.run(serve, model, ns.host, ns.port, ns.churn, tls)
    finally:
        model.close()
    return 0


def make_app(model: SimModel, rest_app: ASGIApp) -> ASGIApp:
    """The one ASGI app: `/api/` websockets to JSON-RPC, HTTP to REST (the event stream's paths to it first),
    anything else left waiting."""
    methods_info = load_methods_info()
    events = SseApp(model, rest_app)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if scope.get("raw_path", scope["path"].encode()) == b"/api/" and not scope.get("query_string"):
                await serve_jsonrpc(model, methods_info, receive, send)
            else:
                while (await receive())["type"] != "websocket.disconnect":
                    pass
        elif scope["type"] == "http":
            path = scope["path"].lower()
            if path == SSE_PREFIX or path.startswith(SSE_PREFIX + "/"):
                await events(scope, receive, send)
            else:
                await rest_app(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    return app


def load_rest_app(model: SimModel) -> ASGIApp:
    """The REST v0 app (with its `/_sim/` fault knobs) for this model."""
    return make_rest_app(model, Faults())


def hypercorn_config(bind: str, tls: tuple[Path, Path] | None = None) -> Config:
    """Hypercorn's settings for serving the app at `bind` (`host:port`) as xo-server's Node server serves."""
    config = Config()
    config.bind = [bind]
    if tls is not None:
        config.certfile, config.keyfile = str(tls[0]), str(tls[1])
    config.accesslog = None
    config.include_server_header = False  # xo-server (Express) sends no Server header
    # Node writes `Date` after the app's headers and before `Connection`: the app writes it there
    # (`rest_http.tail_headers`). Hypercorn would add `date` at the very end, in lower case.
    config.include_date_header = False
    # xo-server listens with Node's `https.createServer` (@vates/http-server-plus): HTTP/1.1 only, and no
    # ALPN answer. Hypercorn would offer h2, which curl takes: a client would then meet HTTP/2 here only.
    config.alpn_protocols = []
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    # Node's HTTP server serves any number of requests on a connection (`maxRequestsPerSocket` 0); hypercorn
    # would close each after its 1000th, a failure a long-lived client never meets with a real XO.
    config.keep_alive_max_requests = 2**62
    config.websocket_ping_interval = None
    return config


async def serve(model: SimModel, host: str, port: int, churn: float,
                tls: tuple[Path, Path] | None = None) -> None:
    config = hypercorn_config(f"{host}:{port}", tls)
    send_as_node_does()
    stop = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: model.run(churn=churn, task_status=task_status))
            app = make_app(model, load_rest_app(model))
            binds = await nursery.start(lambda task_status: hypercorn_serve(
                app, config, shutdown_trigger=shutdown_trigger, task_status=task_status))
            print(f"xofs sim listening on {binds[0]}", flush=True)
            log.info("%d objects, %d VMs; user admin@admin.net / admin", len(model.all_objects()),
                     len(model.by_type("VM")))
            async for signum in signals:
                log.info("got %s, stopping", signal.Signals(signum).name)
                stop.set()
                model.close_all_sockets()
                break
            with trio.move_on_after(3):
                while len(nursery.child_tasks) > 1:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
