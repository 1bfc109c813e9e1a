"""The object cache keeps one copy of each string value, of fields several objects hold, and of the empty
dict and list, without changing what it returns: every object stays equal, value for value, to what XO
sent."""

from __future__ import annotations

import copy

import orjson

from xofs.cache import ObjectCache, valid_object


def pool() -> dict:
    return {"id": "p1", "type": "pool", "name_label": "pool one", "tags": [], "other_config": {}}


def vm(n: int, **fields: object) -> dict:
    # json-made strings, so equal values start out as distinct objects, as orjson leaves them
    return orjson.loads(orjson.dumps({
        "id": f"vm-{n}", "type": "VM", "name_label": f"web-{n}", "power_state": "Running", "$pool": "p1",
        "tags": [], "blockedOperations": {}, "memory": {"dynamic": [1, 2], "size": 2}, "snapshots": [],
        "other": {"base_template_name": "Debian Bookworm 12"}, **fields}))


def loaded(objects: list[dict]) -> ObjectCache:
    cache = ObjectCache()
    cache.share_values(objects)
    cache.replace_all(objects)
    return cache


def test_equal_string_values_are_one_object_and_objects_stay_equal():
    objects = [pool(), vm(1), vm(2, tags=["web", "prod"])]
    expected = copy.deepcopy(objects)
    cache = loaded(objects)
    one, two = cache.get("vm-1"), cache.get("vm-2")
    assert [cache.get(o["id"]) for o in expected] == expected
    assert orjson.dumps(two) == orjson.dumps(expected[2])
    assert one["power_state"] is two["power_state"]
    assert one["$pool"] is two["$pool"] is cache.get("p1")["id"]
    assert one["other"]["base_template_name"] is two["other"]["base_template_name"]
    assert one["tags"] is two["snapshots"] is cache.get("p1")["tags"]  # the one empty list
    assert one["blockedOperations"] is cache.get("p1")["other_config"]  # the one empty dict


def test_events_share_what_the_last_full_read_learned():
    cache = loaded([pool(), vm(1)])
    changed = vm(1, power_state="Halted", name_label="brand new name")
    cache.apply("enter", {"vm-1": changed})
    assert cache.get("vm-1") == vm(1, power_state="Halted", name_label="brand new name")
    assert cache.get("vm-1")["$pool"] is cache.get("p1")["id"]
    assert cache.get("vm-1")["tags"] is cache.get("p1")["tags"]


def test_a_full_read_forgets_the_strings_of_objects_that_are_gone():
    cache = loaded([pool(), vm(1), vm(2, power_state="Paused")])
    again = [pool(), vm(1)]
    cache.share_values(again)
    changes = cache.replace_all(again)
    assert [(c.obj_id, c.new) for c in changes] == [("vm-2", None)]
    assert "Paused" not in cache._strings and "web-2" not in cache._strings
    assert cache._strings["Running"] is cache.get("vm-1")["power_state"]


def test_objects_never_shared_still_load():
    cache = ObjectCache()
    objects = [pool(), vm(1)]
    cache.replace_all(objects)  # without share_values: nothing shared, nothing lost
    assert cache.get("vm-1") == vm(1)


def test_fields_several_objects_hold_are_one_object_equal_as_json():
    cache = loaded([pool(), vm(1), vm(2), vm(3, memory={"dynamic": [1.0, 2], "size": 2}),
                    vm(4, memory={"dynamic": [True, 2], "size": 2}), vm(5, other={"base_template_name": "x"})])
    one, two, three, four = (cache.get(f"vm-{n}") for n in range(1, 5))
    assert one["memory"] is two["memory"] and one["other"] is two["other"]
    assert three["memory"] is not one["memory"] and four["memory"] is not one["memory"]  # equal in Python only
    assert orjson.dumps(three["memory"]) == b'{"dynamic":[1.0,2],"size":2}'
    assert orjson.dumps(four["memory"]) == b'{"dynamic":[true,2],"size":2}'
    assert cache.get("vm-5")["other"] == {"base_template_name": "x"}
    cache.apply("enter", {"vm-6": vm(6)})
    assert cache.get("vm-6")["memory"] is one["memory"]  # an event's object shares what the full read learned


def test_an_event_with_a_size_no_file_can_have_is_refused():
    """A size out of the kernel's range made every stat EIO (with a traceback each, or no log line)."""
    vdi = {"id": "0c7f0d5e-1111-4222-8333-944455556666", "type": "VDI", "size": 1 << 70}
    assert valid_object(vdi) == f"size is {1 << 70}, out of range"
    assert valid_object({**vdi, "size": -1}) == "size is -1, out of range"
    assert valid_object({**vdi, "size": 8 << 30}) is None
    assert valid_object({**vdi, "type": "SR", "size": -1}) is None  # XAPI's unknown size of an SR
