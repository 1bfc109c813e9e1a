"""Third-party view plugins that are broken, slow or greedy: the mount stays up, the rest of the tree works,
and the log says which plugin and why (once, not at every access)."""

from __future__ import annotations

import errno
import logging
import time
from importlib.metadata import EntryPoint

import pytest

import xofs.views
from tests.test_tree import real_objects, vm_named, walk
from xofs.cache import ObjectCache
from xofs.tree import ROOT_INODE, InvalidateEntry, Tree, ViewFailed
from xofs.views import Dir, Export, File, Link, Rendered, TypeSnapshot, load_views


class Flaky:
    """Lists `ok`; raises, or answers no mapping, once the first VM is renamed `mode`."""

    name = "flaky"

    def __init__(self, vm_id: str = "") -> None:
        self.vm_id = vm_id

    def children(self, ctx, path):
        label = ctx.get(self.vm_id)["name_label"] if self.vm_id else ""
        if label == "raise":
            raise RuntimeError("a bug in the plugin")
        if label == "list":
            return ["x"]
        return {"ok": Dir()} if path == () else {}


class BadEntries:
    name = "bad-entries"

    def children(self, ctx, path):
        return {"fine": File(Rendered("x", lambda obj: b"")), "a/b": Dir(), "": Dir(), "..": Dir(),
                "n" * 256: Dir(), "not-a-node": "text", "weird-content": File("text"), "ok-link": Link("fine"),
                "a\ud800": Dir()}

    def lookup(self, ctx, path, name):
        return "not a node"


class Slow:
    name = "slow"

    def children(self, ctx, path):
        time.sleep(1.2)
        return {}


def make_tree(*views) -> Tree:
    cache = ObjectCache()
    cache.replace_all(real_objects())
    return Tree(cache, {**load_views(), **{v.name: v for v in views}})


def test_a_view_that_raises_fails_its_directory_with_eio_logged_once_and_recovers(caplog):
    tree = make_tree()
    web = vm_named(tree, "web-01")
    tree.views["flaky"] = Flaky(web["id"])
    ok = walk(tree, "flaky", "ok")
    tree.cache.apply("enter", {web["id"]: {**web, "name_label": "raise"}})
    for _ in range(3):
        with pytest.raises(ViewFailed) as failed:
            tree.children(("flaky", "ok"))
        assert failed.value.errno == 5 and "view /flaky failed to list /flaky/ok" in failed.value.describe()
    # Once, with the cause on the line itself (what `xofs status` shows) and the traceback after it.
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "view /flaky failed to list /flaky/ok: RuntimeError: a bug in the plugin"]
    assert caplog.text.count("Traceback") == 1
    assert walk(tree, "vms", web["id"], "meta.json")  # the rest of the tree is untouched
    tree.cache.apply("enter", {web["id"]: web})  # the view lists again: so does the directory
    assert tree.children(ok.path) == {}


@pytest.mark.parametrize("mode", ["raise", "list"])
def test_a_view_that_breaks_on_an_event_does_not_stop_the_event_handling(mode, caplog):
    """A VM rename arrives while the view's listing is kept: recomputing it raises, or answers a list (which
    `dict()` could not take): the entries are gone, with their kernel entries invalidated; nothing escapes
    into the event feed (which would end the daemon)."""
    tree = make_tree()
    web = vm_named(tree, "web-01")
    tree.views["flaky"] = Flaky(web["id"])
    walk(tree, "flaky", "ok")
    renamed = {**web, "name_label": mode}
    out = tree.on_changes(tree.cache.apply("enter", {web["id"]: renamed}))
    flaky_dir = walk(tree, "flaky")
    assert InvalidateEntry(flaky_dir.ino, "ok") in out
    with pytest.raises(ViewFailed):
        tree.children(("flaky",))
    assert "view /flaky failed to list /flaky" in caplog.text


def test_entries_the_kernel_would_refuse_are_left_out_with_one_warning_each(caplog):
    tree = make_tree(BadEntries())
    for _ in range(2):
        assert set(tree.children(("bad-entries",))) == {"fine", "ok-link"}
        tree._drop_listing(("bad-entries",))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 7, warnings
    assert "view /bad-entries lists 'a\\ud800' in /bad-entries, left out: a lone surrogate in it, which no file " \
        "name can hold" in warnings
    assert "view /bad-entries lists 'a/b' in /bad-entries, left out: '/' or NUL in it" in warnings
    assert "view /bad-entries lists 'not-a-node' in /bad-entries, left out: a str, not a Dir, File or Link" in warnings
    parent = tree.lookup(ROOT_INODE, "bad-entries")
    assert tree.lookup(parent.ino, "unlisted") is None  # a lookup that answers no node: no such entry
    assert "answered a lookup of /bad-entries/unlisted with no node" in caplog.text


def test_a_slow_view_is_named_in_the_log_once(caplog):
    tree = make_tree(Slow())
    for _ in range(2):
        tree.children(("slow",))
        tree._drop_listing(("slow",))
    assert caplog.text.count("view /slow took 1.2 s to list /slow, and the whole mount waited") == 1


# ---- loading ---------------------------------------------------------------------------------------------

class Hijack:
    name = "vms"

    def children(self, ctx, path):
        return {"HIJACKED": Dir()}


class NoName:
    def children(self, ctx, path):
        return {}


class NumberName(NoName):
    name = 42


class SlashName(NoName):
    name = "a/b"


def third_party(monkeypatch, tmp_path, **eps: str) -> None:
    """`entry_points` as xofs sees it, with these third-party entry points (no distribution) added."""
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = xofs.views.entry_points

    def fake(group):
        added = [EntryPoint(name, value, group) for name, value in eps.items()]
        return [*added, *real(group=group)]  # the third-party ones first, as a directory may list them

    monkeypatch.setattr(xofs.views, "entry_points", fake)


def test_broken_plugins_are_left_out_and_builtins_keep_their_names(monkeypatch, tmp_path, caplog):
    third_party(monkeypatch, tmp_path, hijack=f"{__name__}:Hijack", noname=f"{__name__}:NoName",
                number=f"{__name__}:NumberName", slash=f"{__name__}:SlashName", exits="exits_at_import:X",
                flaky=f"{__name__}:Flaky")
    views = load_views()
    assert type(views["vms"]).__module__ == "xofs.views.builtin" and "flaky" in views
    assert not {"a/b", 42} & set(views)
    assert ("two view plugins want /vms; keeping xofs: vms = xofs.views.builtin:VmsView, ignoring hijack = "
            "tests.test_view_plugins:Hijack") in caplog.text
    # Each on one line with its cause: `xofs status` keeps only a record's first line, not its traceback.
    lines = caplog.text.splitlines()
    for ep, cause in (("noname", "AttributeError: "), ("number", "TypeError: its name 42"),
                      ("slash", "TypeError: its name 'a/b'"), ("exits", "SystemExit: 3")):
        assert any(f"view plugin {ep} = " in line and f"failed to load; its directory is left out: {cause}" in line
                   for line in lines), (ep, cause)


def test_what_was_logged_once_is_bounded(monkeypatch):
    """A plugin that keeps answering new bad names must not grow the daemon's memory without end."""
    import xofs.tree

    class Churning:
        name = "churning"
        calls = 0

        def children(self, ctx, path):
            Churning.calls += 1
            return {f"bad/{Churning.calls}-{i}": Dir() for i in range(10)}

    monkeypatch.setattr(xofs.tree, "FAILED_KEPT", 25)
    tree = make_tree(Churning())
    for _ in range(10):
        assert tree.children(("churning",)) == {}
        tree._drop_listing(("churning",))
    assert len(tree._failed) <= 25


# ---- render functions, through the filesystem object ----------------------------------------------------

def _fails(render_error):
    def render(obj):
        raise render_error
    return render


class _Unhashable:
    """A render function that is an object with `__call__` (a plugin may well write one), not hashable."""

    __hash__ = None

    def __call__(self, obj):
        return bytearray(b"made by a callable")


class BadRenders:
    """Files whose render function is broken the ways a plugin's author breaks one, beside a good one."""

    name = "bad-renders"

    def children(self, ctx, path):
        vm = next(iter(ctx.of_type("VM")))
        return {"good.txt": File(Rendered(vm, lambda obj: obj["name_label"].encode())),
                "callable.txt": File(Rendered(vm, _Unhashable())),
                "raises.txt": File(Rendered(vm, _fails(KeyError("nme_label")))),
                "exits.txt": File(Rendered(vm, _fails(SystemExit(4)))),
                "str.txt": File(Rendered(vm, lambda obj: obj["name_label"]))}


class BadSnapshot:
    """A file at the top of the mount, rendered from every VM, whose render function raises."""

    name = "bad-snapshot.txt"
    node = File(TypeSnapshot("VM", _fails(ValueError("no"))))

    def children(self, ctx, path):
        return None


async def test_a_broken_render_function_fails_its_file_only(sim, tmp_path, monkeypatch, caplog):
    """QA: a render function that returned a str ended the daemon (pyfuse3 takes only bytes); one that
    raised failed the listing of its directory, or of the mount's top for a file there, with a traceback at
    every access. Now that file fails with EIO, is left out of the listing, and its traceback is logged once."""
    from tests.drivers import DirectDriver
    from xofs.mount import MountOptions, assemble

    third_party(monkeypatch, tmp_path, **{"bad-renders": f"{__name__}:BadRenders",
                                          "bad-snapshot": f"{__name__}:BadSnapshot"})
    parts = assemble(sim.url, sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        drv = DirectDriver(parts.fs)
        assert "vms" in await drv.listdir("/") and "bad-snapshot.txt" not in await drv.listdir("/")
        for _ in range(2):
            assert await drv.listdir("/bad-renders") == ["callable.txt", "good.txt"]
            for name, why in (("raises.txt", "raised KeyError: 'nme_label'"), ("str.txt", "returned str, not bytes"),
                              ("exits.txt", "raised SystemExit: 4")):
                with pytest.raises(OSError) as failed:
                    await drv.read(f"/bad-renders/{name}")
                assert failed.value.errno == errno.EIO
                assert why in caplog.text
        assert await drv.read("/bad-renders/callable.txt") == b"made by a callable"
        name = await drv.read("/bad-renders/good.txt")
        assert name and (await drv.stat("/bad-renders/good.txt")).size == len(name)
        with pytest.raises(OSError) as failed:
            await drv.stat("/bad-snapshot.txt")
        assert failed.value.errno == errno.EIO
        assert caplog.text.count("Traceback") == 2  # raises.txt's and the snapshot's, each once
        assert "render function tests.test_view_plugins._fails.<locals>.render raised ValueError: no" in caplog.text


# ---- plugins that exit, answer ill-typed nodes, or hold up the start (QA helper 49) -----------------------

class Exits:
    """Lists `ok`; once the first VM is renamed `exit`, its listing and lookups call sys.exit."""

    name = "exits"

    def __init__(self, vm_id: str = "") -> None:
        self.vm_id = vm_id

    def _maybe_exit(self, ctx):
        if self.vm_id and ctx.get(self.vm_id)["name_label"] == "exit":
            raise SystemExit(9)

    def children(self, ctx, path):
        self._maybe_exit(ctx)
        return {"ok": Dir()} if path == () else {}

    def lookup(self, ctx, path, name):
        self._maybe_exit(ctx)
        raise RuntimeError(f"no lookup of {name}")


def test_a_plugin_that_exits_fails_its_directory_not_the_daemon(caplog):
    """SystemExit (a plugin's `sys.exit`) and KeyboardInterrupt in a view's code ended the daemon, even
    from an XO event with no one using the mount; a lookup that raised said ENOENT. Now each is EIO for
    that directory or file, logged once with its cause."""
    tree = make_tree()
    web = vm_named(tree, "web-01")
    tree.views["exits"] = Exits(web["id"])
    walk(tree, "exits", "ok")
    parent = tree.lookup(ROOT_INODE, "exits")
    for _ in range(2):
        with pytest.raises(ViewFailed) as failed:
            tree.lookup(parent.ino, "unlisted")
        assert failed.value.errno == errno.EIO
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "view /exits failed to look up /exits/unlisted: RuntimeError: no lookup of unlisted"]
    out = tree.on_changes(tree.cache.apply("enter", {web["id"]: {**web, "name_label": "exit"}}))
    assert InvalidateEntry(parent.ino, "ok") in out
    with pytest.raises(ViewFailed):
        tree.children(("exits",))
    assert "view /exits failed to list /exits: SystemExit: 9" in caplog.text


class FieldsAsStr:
    name = "fields-as-str"

    def children(self, ctx, path):
        return {vm_id: Dir() for vm_id in ctx.of_type("VM", fields=("name_label"))}


def test_fields_given_as_a_str_fail_the_listing_with_a_clear_cause(caplog):
    """`fields=("name_label")` is a str: taken letter by letter it never matched a change, and the listing
    silently never followed XO again."""
    tree = make_tree(FieldsAsStr())
    with pytest.raises(ViewFailed):
        tree.children(("fields-as-str",))
    assert ("TypeError: of_type('VM', fields='name_label'): fields must be a tuple of field names, such as "
            "('name_label',)") in caplog.text


class IllTyped:
    """Nodes whose fields have the wrong types, each of which got past the node check."""

    name = "ill-typed"

    def children(self, ctx, path):
        vm = next(iter(ctx.of_type("VM")))
        return {
            "fine.xva": File(Export("vms", vm, "xva"), vm),
            "list-id": File(Rendered(vm, bytes), ["list"]),
            "str-size.raw": File(Export("vdis", vm, "raw", exact_size="10")),
            "negative-size.raw": File(Export("vdis", vm, "raw", exact_size=-5)),
            "bool-size.raw": File(Export("vdis", vm, "raw", exact_size=True)),
            "elsewhere.xva": File(Export("../../etc", vm, "xva")),
            "id-elsewhere.xva": File(Export("vms", f"../{vm}", "xva")),
            "fmt-elsewhere": File(Export("vms", vm, "xva?x=1")),
            "query-fragment": File(Export("vms", vm, "xva", "a=1#b")),
            "nul-link": Link("a\0b"),
            "long-link": Link("x" * 5000),
            "bogus-kind": Dir(kind="bogus"),
            "import-without-sr": Dir(kind="import"),
            "uncallable": File(Rendered(vm, "text")),
            "numbered": File(TypeSnapshot(42, bytes)),
        }


def test_nodes_with_ill_typed_fields_are_left_out_with_a_warning(caplog):
    """QA: an Export of `../../etc` sent XO a request for /etc/…, with the token; a list as obj_id or a
    str as exact_size failed the whole directory; a NUL in a link target cut it short silently."""
    tree = make_tree(IllTyped())
    assert set(tree.children(("ill-typed",))) == {"fine.xva"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 14, warnings
    for name, why in (
            ("list-id", "its obj_id is a list, not a str"),
            ("str-size.raw", "an Export whose exact_size '10' is no length"),
            ("negative-size.raw", "an Export whose exact_size -5 is no length"),
            ("elsewhere.xva", "an Export from '../../etc', not one of vdi-snapshots, vdis, vm-snapshots, "
                              "vm-templates, vms"),
            ("fmt-elsewhere", "an Export whose fmt 'xva?x=1' is not a plain"),
            ("nul-link", "a Link whose target is no path"),
            ("long-link", "a Link target over 4095 bytes"),
            ("bogus-kind", "a Dir of kind 'bogus', not 'plain' or 'import'"),
            ("import-without-sr", "an import Dir without the SR's id"),
            ("uncallable", "a Rendered whose render is not callable"),
            ("numbered", "a TypeSnapshot keyed by a value of type int, not a str")):
        assert any(w.startswith(f"view /ill-typed lists {name!r} in /ill-typed, left out: {why}")
                   for w in warnings), name


class Ghost:
    """A top-level directory listing the export of an object XO does not have."""

    name = "ghost"

    def children(self, ctx, path):
        return {"missing.xva": File(Export("vms", "no-such-id", "xva"))} if path == () else None


class Stalls:
    name = "stalls"
    listed = 0

    def children(self, ctx, path):
        Stalls.listed += 1
        time.sleep(1.2)
        return {}


async def test_third_party_views_do_not_hold_up_or_stop_the_start(sim, tmp_path, monkeypatch, caplog):
    """The start lists the top-level directories before the mount goes live: a plugin listing the export
    of an object XO does not have ended the daemon there, one that stalled held up `xofs mount` with an
    empty log. Only xofs's own views are listed then; a plugin's are at their first use."""
    from tests.drivers import DirectDriver
    from xofs.mount import MountOptions, assemble

    caplog.set_level(logging.INFO, "xofs.views")
    third_party(monkeypatch, tmp_path, ghost=f"{__name__}:Ghost", stalls=f"{__name__}:Stalls")
    parts = assemble(sim.url, sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        started = time.monotonic()
        parts.fs.warm()
        assert time.monotonic() - started < 1 and Stalls.listed == 0
        assert ("vms",) in parts.fs.tree._listings and ("ghost",) not in parts.fs.tree._listings
        drv = DirectDriver(parts.fs)
        assert await drv.listdir("/ghost") == []  # left out, as a file whose object XO dropped is
        with pytest.raises(OSError) as failed:
            await drv.stat("/ghost/missing.xva")
        assert failed.value.errno == errno.ENOENT
    assert "view plugin ghost = tests.test_view_plugins:Ghost loaded: /ghost" in caplog.text
