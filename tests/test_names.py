"""The name mapping: every label gives a safe, unique, stable file name (docs/semantics.md, "Names")."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from xofs.names import NAME_MAX, safe_name, unique_names

ids = st.uuids().map(str)
labels = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["", ".", "..", "...", ".hidden", "a/b", "a\0b", "x" * 400, "é" * 200, "web", "web~"]),
)


def check_safe(name: str) -> None:
    assert name not in ("", ".", "..")
    assert "/" not in name and "\0" not in name
    assert not name.startswith(".")
    assert len(name.encode("utf-8")) <= NAME_MAX
    assert all(ord(c) >= 0x20 and ord(c) != 0x7F for c in name)
    name.encode("utf-8")  # no lone surrogates


@given(st.lists(st.tuples(ids, labels), max_size=30, unique_by=lambda t: t[0]), st.sampled_from(["", ".vhd"]))
def test_names_are_safe_unique_and_order_independent(items, extension):
    names = unique_names(items, extension)
    assert set(names) == {i for i, _ in items}
    assert len(set(names.values())) == len(items)
    for name in names.values():
        check_safe(name)
        assert name.endswith(extension)
    assert unique_names(list(reversed(items)), extension) == names


@given(labels)
def test_a_label_alone_keeps_its_readable_form(label):
    obj_id = str(uuid.uuid4())
    (name,) = unique_names([(obj_id, label)]).values()
    check_safe(name)
    base = safe_name(label)
    if len(base.encode()) <= NAME_MAX:
        assert name == base


def test_documented_mapping():
    assert safe_name("a/b") == "a／b"
    assert safe_name("nul\0") == "nul␀"
    assert safe_name("tab\t") == "tab␉"
    assert safe_name(".") == "．"
    assert safe_name("..") == "．."
    assert safe_name(".bashrc") == "．bashrc"
    assert safe_name("") == "unnamed"
    assert safe_name(None) == "unnamed"


def test_duplicates_all_get_a_short_uuid_suffix():
    a, b, c = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002", "c" * 36
    names = unique_names([(a, "web"), (b, "web"), (c, "db")])
    assert names == {a: "web~aaaaaaaa", b: "web~bbbbbbbb", c: "db"}


def test_long_names_are_cut_on_a_character_boundary_with_a_suffix():
    obj_id = "12345678-0000-4000-8000-000000000000"
    (name,) = unique_names([(obj_id, "é" * 300)], ".vhd").values()
    assert name.endswith("~12345678.vhd")
    assert len(name.encode()) <= NAME_MAX
