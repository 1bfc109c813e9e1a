"""TLS: the simulator serves HTTPS with a self-signed certificate, as XOA does; the mount checks it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest

from tests.operate_support import assert_documented, halted_vm, meta, rename_vm, status_of, wait_for, xofs
from tests.support import SimProcess, is_mounted, require_tool
from tests.test_exports import disk_bytes, import_raw
from xofs.sim.tls import self_signed


class HttpsSim(SimProcess):
    """A simulator behind TLS; its requests trust its certificate."""

    cafile: str = ""

    def request(self, method, path, body=None, headers=None, token="default"):
        hdrs = dict(headers or {})
        hdrs.setdefault("Cookie", f"authenticationToken={self.token}")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=hdrs)
        context = ssl.create_default_context(cafile=self.cafile)
        try:
            with urllib.request.urlopen(req, timeout=60, context=context) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory) -> Iterator[HttpsSim]:
    """`xofs sim --tls`: the certificate it makes lands in <state dir>/tls/."""
    require_tool("openssl")
    base = tmp_path_factory.mktemp("tls")
    sim = HttpsSim(args=["--seed", "4", "--tls", "--state-dir", str(base / "state")], log_path=base / "sim.log")
    sim.start()
    sim.cafile = str(base / "state" / "tls" / "cert.pem")
    yield sim
    sim.stop()


def test_the_simulator_serves_https_with_the_certificate_it_made(tls_sim):
    assert tls_sim.url.startswith("https://127.0.0.1:")
    assert "self-signed certificate" in tls_sim.log_path.read_text()
    assert tls_sim.get_json("/rest/v0/vms?fields=id&limit=1")
    with pytest.raises(urllib.error.URLError) as refused:  # and nobody trusts it by default
        urllib.request.urlopen(tls_sim.url + "/rest/v0/ping", timeout=10)
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)


def test_the_simulator_speaks_http_1_1_only_as_xo_does(tls_sim):
    """xo-server's HTTPS is Node's `https` module: no ALPN, so a client that offers h2 (curl does) gets
    HTTP/1.1. The simulator's server offered h2, and curl's exports went through HTTP/2 there."""
    context = ssl.create_default_context(cafile=tls_sim.cafile)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", tls_sim.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() is None
            tls.sendall(b"GET /rest/v0/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert tls.recv(64).startswith(b"HTTP/1.1 200")
    curl = require_tool("curl")
    out = subprocess.run([curl, "-sS", "--cacert", tls_sim.cafile, "-o", "/dev/null", "-w", "%{http_version}",
                          f"{tls_sim.url}/rest/v0/ping"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "1.1", out.stdout + out.stderr


def test_an_unknown_certificate_is_refused_with_the_way_out(tls_sim, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in ([], ["--foreground"]):
        proc = xofs("mount", tls_sim.url, str(mnt), *args,
                    env={"XOFS_TOKEN": tls_sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr
        assert "TLS certificate verification failed" in lines[0] and "--ca-file" in lines[0]
        assert_documented(lines[0])
        assert not is_mounted(mnt)
    # A CA file given, but not the one that signed XO's certificate: no advice to give one (helper 44)
    other_ca = str(tmp_path / "other-ca.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key"),
                    "-out", other_ca, "-subj", "/CN=another CA", "-days", "1"], check=True, capture_output=True)
    proc = xofs("mount", tls_sim.url, str(mnt), "--foreground", "--ca-file", other_ca,
                env={"XOFS_TOKEN": tls_sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert f"(checked against --ca-file {other_ca}: is it the CA that signed XO's certificate" in lines[0]
    assert_documented(lines[0])


def test_a_ca_file_that_holds_no_pem_certificate_is_refused_in_one_line(tls_sim, tmp_path):
    """A DER certificate, a key or an empty file as --ca-file took the daemon down ("the mount daemon died
    before the mount was live"), and `xofs login` printed a traceback (helper 47)."""
    der = tmp_path / "ca.der"
    subprocess.run(["openssl", "x509", "-in", tls_sim.cafile, "-outform", "DER", "-out", str(der)], check=True)
    (tmp_path / "empty.pem").write_text("")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"XOFS_TOKEN": tls_sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")}
    cases = [(der, "holds no PEM certificate"), (tmp_path / "empty.pem", "holds no PEM certificate"),
             (tmp_path, "is a directory"), (tmp_path / "missing.pem", "No such file or directory")]
    for ca, words in cases:
        for command in (["mount", tls_sim.url, str(mnt), "--foreground"],
                        ["login", tls_sim.url, "admin@admin.net", "--password-stdin"]):
            proc = xofs(*command, "--ca-file", str(ca), env=env, input="admin\n")
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode != 0 and len(lines) == 1 and words in lines[0], (command, proc.stderr)
            assert_documented(lines[0].replace("xofs login: ", "xofs: "))
    assert not is_mounted(mnt)


def test_with_its_ca_file_everything_works_over_tls(tls_sim, make_mount):
    mount = make_mount(tls_sim, "--ca-file", tls_sim.cafile, "--attr-ttl", "300")
    assert status_of(mount.mountpoint)["options"]["tls"] == f"CA file {tls_sim.cafile}"
    vm = halted_vm(tls_sim)
    assert meta(mount.mountpoint, f"vms/{vm}")["id"] == vm  # listings over HTTPS
    vdi = tls_sim.get_json("/rest/v0/vdis?fields=id&limit=1")[0]["id"]
    with open(mount.mountpoint / "vdis" / f"{vdi}.raw", "rb") as f:  # an export over TLS (its start)
        data = f.read(4 << 20)
    context = ssl.create_default_context(cafile=tls_sim.cafile)
    req = urllib.request.Request(f"{tls_sim.url}/rest/v0/vdis/{vdi}.raw",
                                 headers={"Cookie": f"authenticationToken={tls_sim.token}"})
    with urllib.request.urlopen(req, timeout=60, context=context) as resp:
        assert len(data) == 4 << 20 and data == resp.read(4 << 20)
    rename_vm(tls_sim, vm, "renamed-over-wss")  # the event feed over wss://
    wait_for(lambda: meta(mount.mountpoint, f"vms/{vm}")["name_label"] == "renamed-over-wss", 10, "the event")


def test_whole_exports_over_tls_copy_exactly(tls_sim, make_mount, tmp_path):
    """`cp` of whole exports over HTTPS (the client reads them through an `ssl.SSLSocket`), in the
    simulator's framing and in a real XO's 64 KiB chunks, byte for byte what curl downloads."""
    curl = require_tool("curl")
    vdi = import_raw(tls_sim, disk_bytes(12 << 20 | 4096, 5), "over-tls")
    mount = make_mount(tls_sim, "--ca-file", tls_sim.cafile)
    wait_for(lambda: (mount.mountpoint / "vdis" / f"{vdi}.vhd").exists(), 10, "the imported disk")

    def sha(path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for fmt, chunk in (("raw", None), ("vhd", None), ("vhd", 65536)):
        status, _, body = tls_sim.request("POST", "/_sim/faults", json.dumps({"export_chunk_bytes": chunk}).encode(),
                                          {"Content-Type": "application/json"})
        assert status == 200, body
        want = tmp_path / f"curl.{fmt}"
        subprocess.run([curl, "-sSf", "--cacert", tls_sim.cafile, "-b", f"authenticationToken={tls_sim.token}",
                        "-o", str(want), f"{tls_sim.url}/rest/v0/vdis/{vdi}.{fmt}"], check=True, timeout=60)
        got = tmp_path / f"cp.{fmt}"
        result = subprocess.run(["cp", str(mount.mountpoint / "vdis" / f"{vdi}.{fmt}"), str(got)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert sha(got) == sha(want), (fmt, chunk)
    tls_sim.request("POST", "/_sim/faults", b'{"export_chunk_bytes": null}', {"Content-Type": "application/json"})


def test_the_sse_feed_over_tls(tls_sim, make_mount):
    mount = make_mount(tls_sim, "--ca-file", tls_sim.cafile, "--events", "sse")
    feed = status_of(mount.mountpoint)["feed"]
    assert feed["kind"] == "sse" and feed["connected"]


def test_insecure_mounts_but_warns_at_every_start(tls_sim, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "insecure.mount.log"
    proc = xofs("mount", tls_sim.url, str(mnt), "-o", f"insecure,log_file={log}",
                env={"XOFS_TOKEN": tls_sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")})
    try:
        assert proc.returncode == 0, proc.stderr
        assert "--insecure: the TLS certificate of" in proc.stderr and "is NOT checked" in proc.stderr
        assert_documented(proc.stderr.strip())
        assert "is NOT checked" in log.read_text()
        assert "vms" in os.listdir(mnt)
        assert status_of(mnt)["options"]["tls"] == "not checked (--insecure)"
    finally:
        pid = status_of(mnt)["pid"] if is_mounted(mnt) else None
        xofs("umount", str(mnt))
        if pid:
            wait_for(lambda: not os.path.exists(f"/proc/{pid}/cmdline") or
                     not open(f"/proc/{pid}/cmdline").read(), 15, "the daemon to exit")
    proc = xofs("mount", tls_sim.url, str(mnt), "--insecure", "--ca-file", tls_sim.cafile,
                env={"XOFS_TOKEN": tls_sim.token})
    assert proc.returncode != 0 and "contradict" in proc.stderr


def test_a_given_certificate_and_key(tmp_path):
    require_tool("openssl")
    cert, key = self_signed(tmp_path / "tls")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    sim = HttpsSim(args=["--tls-cert", str(cert), "--tls-key", str(key)], log_path=tmp_path / "sim.log")
    sim.cafile = str(cert)
    try:
        sim.start()
        assert sim.url.startswith("https://") and sim.get_json("/rest/v0/ping")["result"] == "pong"
    finally:
        sim.stop()


def test_the_hint_after_a_refused_certificate_fits_the_case():
    """An expired certificate was answered with questions about the CA file (helper 47)."""
    from xofs.errors import with_tls_hint

    failed = "cannot reach XO at URL: TLS certificate verification failed: "
    assert with_tls_hint(failed + "self-signed certificate").endswith("--ca-file FILE)")
    assert "(checked against --ca-file ca.pem:" in with_tls_hint(failed + "unable to get local issuer", "ca.pem")
    for expired in (with_tls_hint(failed + "certificate has expired"),
                    with_tls_hint(failed + "certificate has expired", "ca.pem")):
        assert expired.endswith("(XO's certificate is out of its dates: renew it on XO, or check this machine's "
                                "clock)")
        assert_documented("xofs: cannot mount URL: " + expired.replace("URL:", "URL/rest/v0/vms:"))
    assert with_tls_hint("connection refused") == "connection refused"


def test_the_event_feed_says_why_xos_certificate_is_refused(tls_sim, tmp_path):
    """trio-websocket turns a refused certificate into a connect timeout: a certificate changed on XO looked
    like a firewall in the log (`timed out connecting after 10 s`), while REST said why (helper 47)."""
    import trio

    from xofs.client.events import EventFeed

    other_ca = str(tmp_path / "other-ca.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key"),
                    "-out", other_ca, "-subj", "/CN=another CA", "-days", "1"], check=True, capture_output=True)
    reasons: list[str] = []

    class Sink:
        async def resync(self) -> None:
            pass

        def apply(self, kind: str, items: dict) -> None:
            pass

        def feed_state(self, state: str, detail: str = "", quiet_for: float = 0.0) -> None:
            pass

        def session_failed(self, reason: str, refused: bool) -> None:
            reasons.append(reason)

    async def follow() -> None:
        feed = EventFeed(tls_sim.url, tls_sim.token, Sink(), verify=other_ca, connect_timeout=1)
        with trio.move_on_after(10):
            while not reasons:
                with trio.move_on_after(3):
                    await feed.run()

    trio.run(follow)
    assert reasons and reasons[0].startswith("TLS certificate verification failed"), reasons


def test_plain_http_to_xos_tls_port_says_the_url_is_https(tls_sim, tmp_path):
    """It said only "Server disconnected without sending a response." (helper 47)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = xofs("mount", tls_sim.url.replace("https://", "http://"), str(mnt), "--foreground",
                env={"XOFS_TOKEN": tls_sim.token, "XOFS_STATE_DIR": str(tmp_path / "state")})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].endswith("(a TLS port, answered in plain HTTP? then the URL is https://)"), lines[0]
    assert_documented(lines[0])


def test_plain_http_to_another_machine_is_warned_about():
    """The token went in clear to an `http://` XO without a word, while --insecure is warned about (helper 47)."""
    from xofs.mount import transport_warning

    assert transport_warning("http://xo.example.org", insecure=False) == (
        "WARNING: http://xo.example.org is plain HTTP: anyone between this machine and XO can read the token "
        "and every byte of data (use https://)")
    assert_documented("xofs: " + transport_warning("http://10.0.0.5:8080", insecure=False))
    for here in ("http://127.0.0.1:8080", "http://localhost", "http://[::1]:80", "https://xo.example.org"):
        assert transport_warning(here, insecure=False) is None, here
    assert "--insecure" in transport_warning("https://xo.example.org", insecure=True)
