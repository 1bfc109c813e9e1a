"""The syncer's full reads while no event feed is live (`--poll-interval`), at the syncer itself.

Through a real mount: `tests/test_hardening_faults.py` (a feed kept down by silent websockets).
"""

from __future__ import annotations

import logging
import os
import re

import pytest
import trio

from tests.hardening_support import DaemonProbe
from xofs.cache import COLLECTIONS, ObjectCache
from xofs.errors import XoError
from xofs.fs import Freshness
from xofs.sync import Syncer
from xofs.tree import Tree
from xofs.views import load_views

VM_ID = "0b1c2d3e-0000-4000-8000-000000000001"
INTERVAL = 0.5


class FakeXo:
    """Answers every collection; `vm_name` is what the one VM is called now. Counts full reads (one
    `collection("vms")` each) and the most collection requests ever running at once."""

    def __init__(self) -> None:
        self.vm_name = "first"
        self.reads = 0
        self.running = 0
        self.most_running = 0
        self.fail: XoError | None = None
        self.delay = 0.0

    async def collection(self, coll: str, **kwargs: object) -> list[dict]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if coll == "vms":
                self.reads += 1
            await trio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            if coll != "vms":
                return []
            return [{"id": VM_ID, "type": "VM", "name_label": self.vm_name, "power_state": "Halted"}]
        finally:
            self.running -= 1


def make_syncer(xo: FakeXo, interval: float = INTERVAL) -> tuple[Syncer, ObjectCache]:
    cache = ObjectCache()
    syncer = Syncer(xo, cache, Tree(cache, load_views()), Freshness(), invalidate=lambda out: None,  # type: ignore[arg-type]
                    poll_interval=interval)
    return syncer, cache


def name_of(cache: ObjectCache) -> str | None:
    vm = cache.get(VM_ID)
    return None if vm is None else vm["name_label"]


async def live_syncer() -> tuple[FakeXo, Syncer, ObjectCache]:
    """A syncer whose feed is live, XO read once."""
    xo = FakeXo()
    syncer, cache = make_syncer(xo)
    syncer.feed_state("connected")
    await syncer.load()
    return xo, syncer, cache


@pytest.fixture
def no_share(monkeypatch):
    """Polls every interval however long a read takes (each full read runs the cyclic collector over the
    whole test process, whose duration would otherwise set the pace)."""
    monkeypatch.setattr("xofs.sync.POLL_SHARE", 0)


async def test_while_the_feed_is_down_xo_is_read_again_every_interval_and_never_while_it_is_live(caplog,
                                                                                                 no_share):
    caplog.set_level(logging.INFO, "xofs.sync")
    xo, syncer, cache = await live_syncer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer.poll_while_down)
        xo.vm_name = "renamed"
        await trio.sleep(3 * INTERVAL)
        assert xo.reads == 1 and name_of(cache) == "first", "read while the feed was live"
        syncer.feed_state("disconnected", "a test")
        await trio.sleep(INTERVAL / 2)
        assert xo.reads == 1, "read at once at the loss (a feed back soon re-reads everything itself)"
        await trio.sleep(INTERVAL)
        assert xo.reads == 2 and name_of(cache) == "renamed"
        await trio.sleep(3 * INTERVAL)
        assert 4 <= xo.reads <= 6, f"{xo.reads - 2} reads in 3 intervals"
        assert syncer.polls == xo.reads - 1
        syncer.feed_state("connected")
        settled = xo.reads
        await trio.sleep(3 * INTERVAL)
        assert xo.reads == settled, "read again once the feed was live"
        nursery.cancel_scope.cancel()
    announced = [r.getMessage() for r in caplog.records if "re-reading XO's objects every" in r.getMessage()]
    assert len(announced) == 1 and re.fullmatch(
        r"XO event feed down for [01] s: re-reading XO's objects every 0.5 s until it is back", announced[0])


async def test_a_loss_noticed_after_a_silence_counts_from_the_silence(no_share):
    """QA helper 48: a socket that fell silent is taken for lost only when a keepalive call goes unanswered
    (up to 2 x --keepalive later), and the first re-read came a whole interval after that: a change made
    as it fell silent showed 90 s later by default. The silence counts towards the interval now."""
    xo, syncer, cache = await live_syncer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer.poll_while_down)
        await trio.sleep(2 * INTERVAL)  # live a while: the last full read is older than an interval
        xo.vm_name = "renamed"
        syncer.feed_state("disconnected", "no answer to the keepalive call", quiet_for=INTERVAL)
        await trio.sleep(INTERVAL / 4)
        assert xo.reads == 2 and name_of(cache) == "renamed"
        nursery.cancel_scope.cancel()


async def test_a_failed_read_is_logged_and_tried_again_and_the_cache_is_kept(caplog, no_share):
    caplog.set_level(logging.INFO, "xofs.sync")
    xo = FakeXo()
    syncer, cache = make_syncer(xo)
    await syncer.load()
    syncer.feed_state("disconnected", "a test")
    xo.fail = XoError(503, "Service Unavailable")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer.poll_while_down)
        await trio.sleep(2.5 * INTERVAL)
        assert xo.reads >= 2 and name_of(cache) == "first"
        xo.fail, xo.vm_name = None, "after the failure"
        await trio.sleep(1.5 * INTERVAL)
        assert name_of(cache) == "after the failure"
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "re-reading" in r.getMessage()]
    assert warnings and all(w == "re-reading XO's objects while the event feed is down: XO answered 503: Service "
                                 "Unavailable; trying again in 0.5 s" for w in warnings), warnings


async def test_no_reads_with_an_interval_of_0():
    xo = FakeXo()
    syncer, _ = make_syncer(xo, interval=0)
    await syncer.load()
    syncer.feed_state("disconnected", "a test")
    with trio.move_on_after(1):
        await syncer.poll_while_down()
        assert xo.reads == 1  # it returned at once
        return
    pytest.fail("poll_while_down waited with an interval of 0")


async def test_full_reads_never_overlap():
    """A poll's read that ends after the reconnected feed's re-read would put older objects over newer ones."""
    xo = FakeXo()
    syncer, cache = make_syncer(xo)
    xo.delay = 0.2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer.load)
        await trio.sleep(0.05)
        xo.vm_name = "newer"
        nursery.start_soon(syncer.load)
    assert xo.most_running == len(COLLECTIONS)
    assert name_of(cache) == "newer"


async def test_polls_wait_at_least_ten_times_as_long_as_a_read_takes():
    """A read of 10,000 VMs takes seconds of CPU: with a short interval it would become most of the work."""
    xo = FakeXo()
    syncer, _ = make_syncer(xo, interval=0.1)
    xo.delay = 0.3
    await syncer.load()
    syncer.feed_state("disconnected", "a test")
    with trio.move_on_after(5):
        await syncer.poll_while_down()
    # Each read takes 0.3 s or more, then a pause of 3 s or more: one or two in 5 s, not a dozen.
    assert 1 <= xo.reads - 1 <= 2, xo.reads


async def test_a_poll_that_waited_for_the_reconnected_feeds_re_read_reads_nothing():
    """A poll due while the reconnected feed re-read everything waited for that read, then read again once
    the feed was live: its answer, older than the events applied meanwhile, undid them (QA: a rename lost
    for as long as no other event came)."""
    xo = FakeXo()
    syncer, cache = make_syncer(xo)
    await syncer.load()
    syncer.feed_state("disconnected", "a test")
    xo.delay = 0.2

    async def reconnect() -> None:  # as `Reconnector.follow`: live right after the re-read
        await syncer.resync()
        syncer.feed_state("connected")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconnect)
        await trio.sleep(0.05)
        nursery.start_soon(syncer._poll, 1.0)  # due meanwhile: it waits for the re-read
    assert xo.reads == 2 and syncer.polls == 0


async def test_a_failed_read_does_not_stretch_the_next_poll():
    """Only a read that succeeded sets the pace: one that failed after timeouts (three tries of 60 s with
    the defaults) put the next poll half an hour away."""
    xo = FakeXo()
    syncer, _ = make_syncer(xo, interval=0.2)
    await syncer.load()
    syncer.feed_state("disconnected", "a test")
    xo.fail, xo.delay = XoError(503, "Service Unavailable"), 0.3
    with trio.move_on_after(3):
        await syncer.poll_while_down()
    # The pace is still that of the first read (which runs the collector over the test process, so its
    # duration varies), not ten times the failed reads' 0.3 s.
    assert syncer._took < 0.3 and syncer.poll_failures >= 1 and syncer.polls == 0, syncer.poll_failures


def test_a_feed_that_never_came_up_is_not_lost_and_is_said_once(caplog):
    """A mount whose feed never connected logged "XO event feed lost" twice: at the first failure, and after
    the second feed the mount starts 15 s in."""
    caplog.set_level(logging.WARNING, "xofs.sync")
    syncer, _ = make_syncer(FakeXo())
    for state in ("connecting", "disconnected", "connecting", "disconnected"):
        syncer.feed_state(state, "no answer to session.signIn within 1 s")
    syncer.feed_state("connected")
    syncer.feed_state("disconnected", "the socket closed")
    assert [r.getMessage() for r in caplog.records] == [
        "XO event feed not connected (no answer to session.signIn within 1 s): retrying; kernel caches last 1 s "
        "meanwhile",
        "XO event feed lost (the socket closed): reconnecting; kernel caches last 1 s meanwhile"]


async def test_a_costly_listing_put_off_by_a_burst_is_computed_when_due_without_another_event():
    """The tree puts off a costly listing touched again soon after it was computed (`Tree.on_changes`);
    `relist_when_due` computes it at its due time and hands the invalidations on, with no event after."""
    import time

    from xofs.views import Link

    class SlowNames:
        name = "slow"

        def children(self, ctx, path):
            time.sleep(0.005)
            return {vm["name_label"]: Link(f"../vms/{i}") for i, vm in ctx.of_type("VM", ("name_label",)).items()}

    cache = ObjectCache()
    tree = Tree(cache, {**load_views(), "slow": SlowNames()})
    sent: list = []
    syncer = Syncer(FakeXo(), cache, tree, Freshness(), invalidate=sent.extend)  # type: ignore[arg-type]
    vm = {"id": VM_ID, "type": "VM", "name_label": "first", "power_state": "Halted"}
    syncer.apply("enter", {VM_ID: vm})
    assert tree.children(("slow",)) and tree.lookup(1, "slow") is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer.relist_when_due)
        syncer.apply("enter", {VM_ID: {**vm, "name_label": "second"}})  # within ten times its cost: put off
        assert "first" in tree.children(("slow",))
        with trio.fail_after(2):
            while "second" not in tree.children(("slow",)):
                await trio.sleep(0.01)
        assert tree.next_due() is None
        assert any(getattr(inv, "name", None) == "first" for inv in sent)
        nursery.cancel_scope.cancel()


async def test_a_listing_put_off_later_but_due_sooner_is_not_kept_waiting():
    """Two costly listings: one costing 50 ms put off first (due in about half a second), then one costing
    5 ms (due in about 50 ms). The second is computed when it is due, not when the first is."""
    import time

    from xofs.views import Link

    def slow_view(name: str, seconds: float, field: str):
        class View:
            def children(self, ctx, path):
                time.sleep(seconds)
                return {f"{vm[field]}-{i}": Link(f"../vms/{i}") for i, vm in ctx.of_type("VM", (field,)).items()}

        view = View()
        view.name = name
        return view

    cache = ObjectCache()
    tree = Tree(cache, {**load_views(), "slow": slow_view("slow", 0.05, "name_label"),
                        "quick": slow_view("quick", 0.005, "name_description")})
    syncer = Syncer(FakeXo(), cache, tree, Freshness(), invalidate=lambda out: None)  # type: ignore[arg-type]
    vm = {"id": VM_ID, "type": "VM", "name_label": "a", "name_description": "a", "power_state": "Halted"}
    syncer.apply("enter", {VM_ID: vm})
    tree.children(("slow",))
    tree.children(("quick",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer.relist_when_due)
        vm = {**vm, "name_label": "b"}
        syncer.apply("enter", {VM_ID: vm})  # the slow one put off
        await trio.sleep(0.01)
        vm = {**vm, "name_description": "b"}
        syncer.apply("enter", {VM_ID: vm})  # the quick one put off, due sooner
        began = time.monotonic()
        with trio.fail_after(2):
            while f"b-{VM_ID}" not in tree.children(("quick",)):
                await trio.sleep(0.005)
        assert time.monotonic() - began < 0.3
        nursery.cancel_scope.cancel()


async def test_a_full_read_hands_the_heap_s_free_pages_back_to_the_system():
    """The parsed answers of a full read are freed among what the cache keeps: their pages stayed resident
    (15-20 MB with 10,000 VMs) until `malloc_trim`."""
    syncer, _ = make_syncer(FakeXo())
    blocks = [bytes(4000) + bytes([n % 256]) for n in range(20_000)]  # 80 MB from glibc's heap, not pymalloc
    kept = blocks[::50]  # what stays keeps the heap from shrinking at its top
    del blocks
    me = DaemonProbe(os.getpid())
    before = me.rss()
    await syncer.load()
    assert before - me.rss() > 40 << 20, (before, me.rss(), len(kept))
