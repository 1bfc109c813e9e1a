"""xofs.client.upload through `RestClient.import_vdi`, against `xofs sim` (plain HTTP and `--tls`): what is
imported is what is exported back, XO's refusals are the same errors, a cancelled upload leaves nothing."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.support import SimProcess, require_tool, set_faults, wait_for
from xofs.client.rest import RestClient
from xofs.client.upload import BLOCK, DROP_EVERY, DROP_LAG
from xofs.errors import XoError

MiB = 1 << 20


def user_sr(sim: SimProcess) -> dict:
    srs = [sim.get_json(href) for href in sim.get_json("/rest/v0/srs")]
    return next(s for s in srs if s["content_type"] == "user" and s["size"] - s["usage"] > 256 * MiB)


def vdis_on(sim: SimProcess, sr_id: str) -> dict[str, str]:
    """id -> name_label of the VDIs on an SR."""
    vdis = sim.get_json("/rest/v0/vdis?fields=id,name_label,$SR")
    return {v["id"]: v["name_label"] for v in vdis if v["$SR"] == sr_id}


async def exported_sha256(client: RestClient, vdi: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    n = 0
    async with await client.open_export(f"vdis/{vdi}.raw") as response:
        while data := await response.receive():
            digest.update(data)
            n += len(data)
    return digest.hexdigest(), n


def random_disk(path: Path, size: int) -> bytes:
    """A disk image whose every block differs (half random, half zeros, so sparse handling shows)."""
    data = bytearray(size)
    for start in range(0, size, 2 * MiB):
        data[start:start + MiB] = os.urandom(len(data[start:start + MiB]))
    path.write_bytes(data)
    return bytes(data)


async def import_and_check(client: RestClient, sr_id: str, image: Path, content: bytes, *, raw: bool) -> str:
    """Import `image`, check the progress reports and that the VDI exports back as `content` (zero-padded)."""
    progress: list[int] = []
    vdi = await client.import_vdi(sr_id, image, name_label=f"upload {image.name}", name_description="by test",
                                  raw=raw, progress=progress.append)
    size = image.stat().st_size
    assert progress == [min(n, size) for n in range(BLOCK, size + BLOCK, BLOCK)]
    obj = await client.get_object("vdis", vdi)
    assert obj["name_label"] == f"upload {image.name}" and obj["$SR"] == sr_id
    sha, n = await exported_sha256(client, vdi)
    assert n == obj["size"] >= len(content)
    assert sha == hashlib.sha256(content + bytes(n - len(content))).hexdigest()
    return vdi


@pytest.mark.timeout(180)
async def test_raw_and_vhd_imports_export_back_the_same_content(fresh_sim, tmp_path):
    qemu_img = require_tool("qemu-img")
    sr = user_sr(fresh_sim)
    raw = tmp_path / "disk.raw"
    content = random_disk(raw, 9 * MiB + 512)  # not a whole number of blocks: the last progress is short
    vhd = tmp_path / "disk.vhd"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "vpc", str(raw), str(vhd)], check=True)
    client = RestClient(fresh_sim.url, fresh_sim.token)
    before = vdis_on(fresh_sim, sr["id"])
    made = {await import_and_check(client, sr["id"], raw, content, raw=True),
            await import_and_check(client, sr["id"], vhd, content, raw=False)}
    await client.aclose()
    assert set(vdis_on(fresh_sim, sr["id"])) == set(before) | made and len(made) == 2


def cached_bytes(fincore: str, path: Path) -> int:
    """How much of `path` the page cache holds (util-linux's fincore)."""
    out = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip())


@pytest.mark.timeout(120)
async def test_an_upload_drops_the_pages_it_has_sent_from_the_page_cache(fresh_sim):
    """A spool is read once: its pages well behind the upload leave the page cache, its content stays."""
    fincore = require_tool("fincore")
    sr = user_sr(fresh_sim)
    # Under /var/tmp: a tmpfs (Debian 13's /tmp) keeps its pages whatever the advice.
    with tempfile.TemporaryDirectory(prefix="xofs-test-", dir="/var/tmp") as tmp:
        fs_type = subprocess.run(["stat", "-f", "-c", "%T", tmp], check=True, capture_output=True,
                                 text=True).stdout.strip()
        assert fs_type != "tmpfs", "this test needs /var/tmp on a disk file system, not a tmpfs"
        image = Path(tmp) / "disk.raw"
        content = random_disk(image, 128 * MiB)
        with open(image, "rb") as f:
            os.fsync(f.fileno())
        assert cached_bytes(fincore, image) == 128 * MiB, "the page cache did not keep a file just written"
        client = RestClient(fresh_sim.url, fresh_sim.token)
        await import_and_check(client, sr["id"], image, content, raw=True)
        await client.aclose()
        wait_for(lambda: cached_bytes(fincore, image) <= DROP_LAG + DROP_EVERY, what="the pages to leave")
        assert image.read_bytes() == content


@pytest.mark.timeout(120)
async def test_xapi_failure_is_the_xo_error_and_leaves_no_vdi(fresh_sim, tmp_path):
    sr = user_sr(fresh_sim)
    image = tmp_path / "disk.raw"
    random_disk(image, 8 * MiB)
    before = vdis_on(fresh_sim, sr["id"])
    set_faults(fresh_sim, fail_next_import=True)
    client = RestClient(fresh_sim.url, fresh_sim.token)
    with pytest.raises(XoError) as info:
        await client.import_vdi(sr["id"], image, name_label="doomed", name_description=None, raw=True)
    await client.aclose()
    assert type(info.value) is XoError and info.value.status == 500
    assert info.value.xo_message == "500 Internal Server Error"
    assert vdis_on(fresh_sim, sr["id"]) == before


@pytest.mark.timeout(120)
async def test_refusal_before_the_body_is_read_is_the_xo_error(fresh_sim, tmp_path):
    """XO checks a VHD's footer copy in its first 512 bytes (the simulator then reads the rest anyway)."""
    qemu_img = require_tool("qemu-img")
    sr = user_sr(fresh_sim)
    fixed = tmp_path / "fixed.vhd"
    subprocess.run([qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(fixed), "64M"],
                   check=True)
    before = vdis_on(fresh_sim, sr["id"])
    client = RestClient(fresh_sim.url, fresh_sim.token)
    started = time.monotonic()
    with pytest.raises(XoError) as info:
        await client.import_vdi(sr["id"], fixed, name_label="fixed", name_description=None, raw=False)
    await client.aclose()
    assert time.monotonic() - started < 20
    assert type(info.value) is XoError and info.value.status == 500
    assert "footer" in info.value.xo_message.lower() or "fixed" in info.value.xo_message.lower(), info.value
    assert vdis_on(fresh_sim, sr["id"]) == before


@pytest.mark.parametrize("then_close", [False, True])
async def test_answer_before_the_body_is_read_is_the_xo_error_not_a_broken_pipe(nursery, tmp_path, then_close):
    """A server that answers after 512 bytes and then reads no more (keeping the connection open, or closing
    it): with a body far larger than the socket buffers, the answer is still read and the sending stops."""
    refusal = json.dumps({"error": "invalid footer checksum 0"}).encode()

    async def handle(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 512:
            received += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(refusal), refusal))
        if then_close:
            await stream.aclose()
        else:
            await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    image = tmp_path / "big.vhd"
    random_disk(image, 64 * MiB)
    client = RestClient(f"http://127.0.0.1:{port}", "t")
    progress: list[int] = []
    with trio.fail_after(10), pytest.raises(XoError) as info:
        await client.import_vdi("sr", image, name_label="d", name_description=None, raw=False,
                                progress=progress.append)
    await client.aclose()
    assert type(info.value) is XoError and info.value.status == 500
    assert info.value.xo_message == "invalid footer checksum 0"
    assert not progress or progress[-1] < 64 * MiB


@pytest.mark.timeout(120)
async def test_cancelled_upload_stops_at_once_and_leaves_no_vdi(fresh_sim, tmp_path):
    sr = user_sr(fresh_sim)
    image = tmp_path / "disk.raw"
    random_disk(image, 64 * MiB)
    before = vdis_on(fresh_sim, sr["id"])
    set_faults(fresh_sim, import_bytes_per_second=4 * MiB)  # a slow XAPI: the upload is caught midway
    client = RestClient(fresh_sim.url, fresh_sim.token)
    progress: list[int] = []
    with trio.CancelScope() as scope:
        def report(sent: int) -> None:
            progress.append(sent)
            if sent >= 4 * MiB:
                scope.cancel()

        await client.import_vdi(sr["id"], image, name_label="cancelled", name_description=None, raw=True,
                                progress=report)
    assert scope.cancelled_caught and 4 * MiB <= progress[-1] < 64 * MiB
    seen_during = "cancelled" in vdis_on(fresh_sim, sr["id"]).values()
    deadline = time.monotonic() + 20
    while vdis_on(fresh_sim, sr["id"]) != before and time.monotonic() < deadline:
        await trio.sleep(0.2)
    await client.aclose()
    assert vdis_on(fresh_sim, sr["id"]) == before, f"left behind (seen while uploading: {seen_during})"


@pytest.fixture
def tls_sim(tmp_path) -> Iterator[tuple[SimProcess, Path]]:
    """A simulator serving HTTPS with its self-signed certificate: (simulator, certificate)."""
    require_tool("openssl")
    state = tmp_path / "tls-sim-state"
    proc = SimProcess(args=["--seed", "7", "--tls", "--state-dir", str(state)],
                      log_path=tmp_path / "tls-sim.log").start()
    yield proc, state / "tls" / "cert.pem"
    proc.stop()


@pytest.mark.timeout(180)
async def test_tls_import_exports_back_the_same_content_and_refusals_map(tls_sim, tmp_path):
    sim, cert = tls_sim
    assert sim.url.startswith("https://")
    client = RestClient(sim.url, sim.token, verify=str(cert))
    srs = [await client.get_object("srs", s["id"]) for s in await client.collection("srs", fields="id")]
    sr = next(s for s in srs if s["content_type"] == "user" and s["size"] - s["usage"] > 256 * MiB)
    raw = tmp_path / "disk.raw"
    content = random_disk(raw, 6 * MiB + 512)
    await import_and_check(client, sr["id"], raw, content, raw=True)
    vdis = {v["id"] for v in await client.collection("vdis", fields="id")}
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as http:
        resp = await http.post(f"{sim.url}/_sim/faults", json={"fail_next_import": True},
                               headers={"Cookie": f"authenticationToken={sim.token}"})
    assert resp.status_code == 200, resp.text
    with pytest.raises(XoError) as info:
        await client.import_vdi(sr["id"], raw, name_label="doomed", name_description=None, raw=True)
    assert type(info.value) is XoError and info.value.xo_message == "500 Internal Server Error"
    assert {v["id"] for v in await client.collection("vdis", fields="id")} == vdis
    await client.aclose()


@pytest.mark.timeout(60)
async def test_the_answer_timeout_starts_at_the_last_byte(nursery, tmp_path):
    """A body that takes longer to go out than the answer timeout is fine; an answer that does not come within
    the timeout after the last byte fails the upload, saying so."""
    from xofs.client.export import HttpTarget
    from xofs.client.upload import upload_file
    from xofs.errors import XoUnreachable

    size = 4 * MiB

    async def handle(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(65536)
        slow_reader = received.split(b" ", 2)[1] == b"/slow-reader"
        body = len(received.split(b"\r\n\r\n", 1)[1])
        while body < size:
            if slow_reader:
                await trio.sleep(0.03)  # 64 receives at least: 2 s or more for the whole body
            body += len(await stream.receive_some(65536))
        if slow_reader:
            await stream.send_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    image = tmp_path / "disk.raw"
    random_disk(image, size)

    def target(path: str) -> HttpTarget:
        return HttpTarget("http", "127.0.0.1", port, path, [("Host", f"127.0.0.1:{port}")])

    response = await upload_file(target("/slow-reader"), "POST", image, size, ssl_context=None, connect_timeout=5,
                                 send_timeout=5, answer_timeout=1)
    assert response.status == 201
    await response.aclose()
    started = time.monotonic()
    with pytest.raises(XoUnreachable) as info:
        await upload_file(target("/never-answers"), "POST", image, size, ssl_context=None, connect_timeout=5,
                          send_timeout=5, answer_timeout=1)
    assert "did not answer within 1 s after the last byte" in info.value.describe()
    assert time.monotonic() - started < 5
