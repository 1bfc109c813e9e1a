"""`xofs login` against servers that are not what the URL says: every failure is one line, at once, in the
words `xofs mount` uses, and documented in docs/troubleshooting.md."""

from __future__ import annotations

import functools
import http.server
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operate_support import assert_documented, xofs
from tests.support import SimProcess, require_tool

QUICK = 10.0  # a failure that needs no waiting comes within this many seconds (the old wait was 30 s)


def login(url: str, tmp_path: Path, *args: str, timeout: float = QUICK + 10) -> tuple[int, str, float]:
    """`xofs login URL admin@admin.net --password-stdin ARGS` with the simulator's password; returns its exit
    status, its standard error and how long it took."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XOFS_TOKEN": ""}
    start = time.monotonic()
    proc = xofs("login", url, "admin@admin.net", "--password-stdin", *args, input="admin\n", env=env,
                timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - start


def one_documented_line(code: int, stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1, stderr
    assert_documented(lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory) -> Iterator[tuple[SimProcess, Path]]:
    """`xofs sim --tls` and the self-signed certificate it made."""
    require_tool("openssl")
    base = tmp_path_factory.mktemp("tls")
    sim = SimProcess(args=["--seed", "4", "--tls", "--state-dir", str(base / "state")],
                     log_path=base / "sim.log").start()
    yield sim, base / "state" / "tls" / "cert.pem"
    sim.stop()


@pytest.fixture
def plain_web_server(tmp_path) -> Iterator[str]:
    """A web server that is not XO (`python -m http.server`): it answers 404 with an HTML page to /api/."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_https_to_a_plain_http_server_fails_at_once_as_the_mount_does(sim, tmp_path):
    """The TLS handshake's failure used to be lost inside trio_websocket: login waited 30 s, then said only
    that nothing answered."""
    url = sim.url.replace("http://", "https://")
    code, stderr, took = login(url, tmp_path)
    line = one_documented_line(code, stderr)
    assert took < QUICK, f"took {took:.1f} s: {line}"
    assert line.startswith("xofs login: cannot reach XO at wss://127.0.0.1:")
    assert line.endswith(": TLS error: WRONG_VERSION_NUMBER (the server does not speak TLS there: "
                         "is the URL http://?)")
    (tmp_path / "mnt").mkdir()
    mount = xofs("mount", url, str(tmp_path / "mnt"), "--foreground", env={"XOFS_TOKEN": sim.token}, timeout=30)
    assert "TLS error: WRONG_VERSION_NUMBER (the server does not speak TLS there: is the URL http://?)" \
        in mount.stderr, mount.stderr  # the same words
    assert not (tmp_path / "config").exists()


@pytest.mark.timeout(60)
def test_an_unknown_certificate_is_refused_at_once_and_a_trusted_one_signs_in(tls_sim, tmp_path):
    sim, cafile = tls_sim
    code, stderr, took = login(sim.url, tmp_path)
    line = one_documented_line(code, stderr)
    assert took < QUICK, f"took {took:.1f} s: {line}"
    assert "cannot reach XO at wss://127.0.0.1:" in line
    assert line.endswith("TLS certificate verification failed: self-signed certificate (for a private CA or XOA's "
                         "self-signed certificate: --ca-file FILE)"), line  # as `xofs mount` says it (QA)
    code, stderr, _ = login(sim.url, tmp_path, "--ca-file", str(cafile), "--token-file", str(tmp_path / "t"))
    assert code == 0, stderr
    token = (tmp_path / "t").read_text().strip()
    request = urllib.request.Request(sim.url + "/rest/v0/vms?fields=id&limit=1",
                                     headers={"Cookie": f"authenticationToken={token}"})
    with urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cafile=cafile)) as resp:
        assert resp.status == 200


@pytest.mark.timeout(60)
def test_a_refused_websocket_upgrade_says_so_without_the_page(plain_web_server, tmp_path):
    code, stderr, took = login(plain_web_server, tmp_path)
    line = one_documented_line(code, stderr)
    assert took < QUICK, f"took {took:.1f} s: {line}"
    assert line == f"xofs login: cannot reach XO at {plain_web_server.replace('http', 'ws')}/api/: " \
                   "websocket upgrade refused with HTTP 404"
    assert "<" not in stderr and "server" not in stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("url", ["ftp://xo.example.org", "xo.example.org", "https://", "file:///etc/passwd"])
def test_a_url_that_is_not_http_is_refused_in_one_line(url, tmp_path):
    code, stderr, _ = login(url, tmp_path)
    line = one_documented_line(code, stderr)
    assert line == f"xofs login: {url!r} is not an http(s) URL of an XO server"
    assert "Traceback" not in stderr


@pytest.mark.timeout(60)
def test_credentials_in_the_url_are_refused_and_never_repeated(sim, tmp_path):
    host = sim.url.split("://", 1)[1]
    for userinfo in ("admin%40admin.net:admin@", "admin@", ":admin@"):
        code, stderr, _ = login(f"http://{userinfo}{host}", tmp_path)
        line = one_documented_line(code, stderr)
        assert line.startswith("xofs login: credentials in the URL are refused"), line
        assert "admin@admin.net" not in line and ":admin" not in line
    assert not (tmp_path / "config").exists()
