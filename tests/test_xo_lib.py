"""XO's own client library, xo-lib 0.9.0 (node), against the simulator: sign in, fetch, receive an event.

xo-lib is what xo-cli and other XO tools are built on; if it works against `xofs sim`, the websocket path,
the JSON-RPC framing, the sign-in and the `all` notifications are what XO's own code expects.
`tests/js/xo_lib_client.js` does the node side and prints JSON lines this test reads.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from tests.support import require_tool
from tests.test_sim_jsonrpc import find_vm, rpc

JS_DIR = Path(__file__).parent / "js"


def read_line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, f"xo_lib_client.js printed nothing; stderr: {proc.stderr.read()[-2000:]}"
    return json.loads(line)


@pytest.mark.timeout(60)
async def test_xo_lib_signs_in_fetches_and_gets_an_event(fresh_sim):
    node = require_tool("node")
    if not (JS_DIR / "node_modules" / "xo-lib").is_dir():
        pytest.fail("tests/js/node_modules/xo-lib is missing: run scripts/setup (npm install in tests/js)")
    proc = subprocess.Popen([node, "xo_lib_client.js", fresh_sim.url, fresh_sim.token], cwd=JS_DIR,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = await trio.to_thread.run_sync(read_line, proc)
        assert ready["event"] == "ready", ready
        assert ready["version"] == "5.207.2"
        assert ready["user"]["email"] == "admin@admin.net" and ready["user"]["permission"] == "admin"
        names = sorted(vm["name_label"] for vm in ready["vms"])
        assert len(names) == 12 and {"web-01", "db-01", "app-01", "test-01"} <= set(names)
        assert ready["notificationsBeforeChange"] == 0  # no initial snapshot after sign-in

        async with rpc(fresh_sim.url, token=fresh_sim.token) as peer:
            web = await find_vm(peer, "web-01")
            await peer.call("vm.set", {"id": web["id"], "name_label": "renamed-for-xo-lib"})

        event = await trio.to_thread.run_sync(read_line, proc)
        assert event["event"] == "notification", event
        assert event["method"] == "all" and event["params"]["type"] == "enter"
        assert event["params"]["items"][web["id"]]["name_label"] == "renamed-for-xo-lib"
        assert await trio.to_thread.run_sync(lambda: proc.wait(20)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
