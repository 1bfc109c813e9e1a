"""XO's filter language (xofs.matcher): each construct on objects a real XO returned, syntax errors in
complex-matcher's words, and a differential test against the real npm package run by node.

The reference is `tests/js/compare_matcher.js`, started once per module and fed one JSON line per
expression; hypothesis draws expressions from complex-matcher's grammar (with JavaScript regular
expressions inside) and from raw punctuation, and every answer, its parse error, its canonical string and
the objects it matches, must be the same in Python and in JavaScript.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import require_tool
from xofs.matcher import (
    And,
    Comparison,
    GlobPattern,
    MatcherSyntaxError,
    Not,
    NumberOrString,
    Or,
    Property,
    RegExpNode,
    StringNode,
    TruthyProperty,
    compile_filter,
    parse,
)

REAL_XO = Path("/work/shared/reference/real-xo/rest")
JS_DIR = Path(__file__).parent / "js"
REFERENCE_SCRIPT = JS_DIR / "compare_matcher.js"

VMS: list[dict] = json.loads((REAL_XO / "vms.fields-star.body").read_text())
VDIS: list[dict] = json.loads((REAL_XO / "vdis.fields-star.body").read_text())

# Values real XO objects do not happen to hold but JSON can: JS conversions and Unicode at their edges.
EDGE_OBJECTS: list[dict] = [
    {
        "name_label": "Café Ωμέγα 𐐀 Straße", "count": 18446744073709551615, "spaced": " 12 ", "yes": True,
        "no": False, "nothing": None, "nested": [1, [2, "3"], {"k": "v", "deep": [True, None]}], "empty": [],
        "blank": {}, "zero": 0, "negative": -0.0, "tiny": 1.5e-7, "huge": 1e21, "hex": "0x1F", "lines": "a\nb",
        "tricky": {"toString": "not callable"}, "weird key": "x", 'quo"te': "y", "0": "zero key",
        "astral": "😀", "emoji 😀": "key with astral", "ǅ": "titlecase",
    },
    {"name_label": "WEB-02 backup", "tags": ["web", "ENV=Prod"], "size": "2147483648", "flags": [0, "", None]},
]
OBJECTS = VMS + VDIS + EDGE_OBJECTS


def names(expression: str, objects: list[dict]) -> list[str]:
    keep = compile_filter(expression)
    return [o["name_label"] for o in objects if keep(o)]


def syntax_error(expression: str) -> str:
    with pytest.raises(MatcherSyntaxError) as caught:
        parse(expression)
    assert caught.value.expression == expression
    assert str(caught.value) == caught.value.message
    return caught.value.message


# ---------------------------------------------------------------------------------------------------
# Each construct, on the objects a real xo-server 5.207.2 returned.


def test_words_are_case_insensitive_substrings() -> None:
    assert names("name_label:WEB", VMS) == ["web-01"]
    assert names("power_state:run", VMS) == ["web-01"]
    assert names("name_label:01", VMS) == ["web-01", "db-01", "app-01", "test-01"]
    assert names('name_description:"web frontend"', VMS) == ["web-01"]


def test_the_recorded_sr_filter_selects_what_xo_returned() -> None:
    recorded = json.loads((REAL_XO / "vdis.filter-sr.body").read_text())
    assert names("$SR:bc78c87f-de43-590f-acb4-caf0ee4f852a", VDIS) == [v["name_label"] for v in recorded]


def test_dollar_properties_and_uuids_need_no_quotes() -> None:
    node = parse("$pool:2a120cd5-4bd3-5f65-a9e5-870ec709e44a")
    assert node == Property("$pool", StringNode("2a120cd5-4bd3-5f65-a9e5-870ec709e44a"))
    assert len(names(str(node), VMS + VDIS)) == len(VMS) + len(VDIS)


def test_bare_terms_search_every_value_recursively() -> None:
    assert names("10.0.12.34", VMS) == ["web-01"]  # inside the `addresses` object
    assert names("6.1.0-31-AMD64", VMS) == ["web-01", "test-01"]  # os_version.uname, two levels down
    assert names('"ENV=prod"', VMS) == ["web-01"]  # an element of `tags`
    assert names("tags:web", OBJECTS) == ["web-01", "WEB-02 backup"]


def test_numbers_match_equal_numbers_or_as_substrings() -> None:
    assert names("CPUs:number:2", VMS) == ["web-01", "app-01"]
    assert parse("2147483648") == NumberOrString("2147483648")
    assert names("memory:size:2147483648", VMS) == ["web-01", "app-01"]
    assert names("size:2147483648", OBJECTS) == ["spare disk", "WEB-02 backup"]  # a number, then a string
    assert names("size:0x80000000", VDIS) == ["spare disk"]  # JS reads hexadecimal
    assert names("size:2.147483648e9", VDIS) == ["spare disk"]
    assert names("xenTools:version:9.4", VMS) == ["web-01", "test-01"]
    assert names("videoram:8 CPUs:max:8", VMS) == ["db-01"]
    assert names("count:18446744073709551615", OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]  # equal as doubles
    assert names("count:18446744073709551616", OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]


def test_globs_are_unanchored_and_case_insensitive() -> None:
    assert parse("name_label:web*01") == Property("name_label", GlobPattern("web*01"))
    assert names("name_label:WEB*1", VMS) == ["web-01"]
    assert names("name_label:*-0*", VMS) == ["web-01", "db-01", "app-01", "test-01"]
    assert names("lines:a*b", OBJECTS) == []  # `*` does not cross a line break
    assert names("name_label:*root", VDIS) == ["web-01 root", "db-01 root", "app-01 root", "test-01 root"]


def test_regular_expressions_are_javascript_ones() -> None:
    assert names("name_label:/^web-01$/", VMS) == ["web-01"]
    assert names("name_label:/^WEB/", VMS) == []
    assert names("name_label:/^WEB/i", VMS) == ["web-01"]
    assert names("tags:/^env=prod$/", VMS) == ["web-01"]
    assert names(r"name_label:/^\w+-\d{2}$/", VMS) == ["web-01", "db-01", "app-01", "test-01"]
    assert names("name_label:/(?<=w.*)b/", VMS) == ["web-01"]  # variable-width lookbehind
    # The last iteration (b) resets group 1, so \1 matches the empty string; Python's re would keep "w".
    assert names(r"name_label:/^(?:(w)|e|b)+\1-/", VMS) == ["web-01"]
    assert names(r"name_label:/^(w)e\1?b/", VMS) == ["web-01"]


def test_regular_expressions_fold_case_like_javascript() -> None:
    long_s, kelvin = "\u017f", "\u212a"
    objects = [{"name_label": n} for n in ("straße", long_s, kelvin, "Ω", "ǅ")]
    assert names("name_label:/s/i", objects) == ["straße"]  # ſ is not s in JS, unlike Python's re.I
    assert names("name_label:/k/i", objects) == []  # nor is the Kelvin sign k
    assert names("name_label:/ω/i", objects) == ["Ω"]
    assert names("name_label:/ǆ/i", objects) == ["ǅ"]  # both upper-case to Ǆ
    assert names(r"name_label:/^\w$/i", objects) == []  # \w stays ASCII


def test_regular_expressions_see_utf16_code_units() -> None:
    assert names("astral:/^.$/", EDGE_OBJECTS) == []
    assert names("astral:/^..$/", EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]
    assert names("astral:length:2", EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]


def test_not_or_and_groups() -> None:
    assert names("type:VM !power_state:halted", VMS) == ["web-01", "app-01", "test-01"]
    assert names("|(name_label:web name_label:db)", VMS) == ["web-01", "db-01"]
    assert names("!(power_state:running power_state:halted) !app", VMS) == ["web-01", "db-01", "test-01"]
    assert names("!(power_state:running name_label:web)", VMS) == ["db-01", "app-01", "test-01"]
    assert names("!|(power_state:running power_state:halted)", VMS) == ["app-01", "test-01"]
    assert parse("|(a)") == StringNode("a") and parse("(a)") == StringNode("a")


def test_truthy_properties_follow_javascript() -> None:
    assert names("auto_poweron?", VMS) == []  # false
    assert names("high_availability?", VMS) == []  # ""
    assert names("startDelay?", VMS) == []  # 0
    assert names("VTPMs?", VMS) == ["web-01", "db-01", "app-01", "test-01"]  # [] is truthy
    assert names("blockedOperations?", VMS) == ["web-01", "db-01", "app-01", "test-01"]  # so is {}
    assert names("os_version?", VMS) == ["web-01", "test-01"]  # missing elsewhere
    assert names("nothing?", EDGE_OBJECTS) == names("missing?", EDGE_OBJECTS) == []
    assert names("toString?", VMS) == ["web-01", "db-01", "app-01", "test-01"]  # inherited from Object


def test_comparisons_convert_like_javascript_operators() -> None:
    assert names("memory:size:>=2147483648", VMS) == ["web-01", "db-01", "app-01"]
    assert names("size:<2e9", VDIS) == ["test-01 root", "debian-12.9.0-amd64-netinst.iso"]
    assert names("os_version:major:>11", VMS) == ["web-01", "test-01"]  # "12" converts to 12
    # Booleans compare as 1 and 0 (complex-matcher >= 1.0, which xo-server 5.207.2 runs).
    assert names("isFirmwareSupported:>0 auto_poweron:<1 auto_poweron:>=0", VMS) == [v["name_label"] for v in VMS]
    assert names("missing:>=0", VMS) == []  # undefined is NaN
    assert names("nothing:>=0 nothing:<=0", EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]  # null is 0
    assert names("VTPMs:<=0 VTPMs:>=0", VMS[:1]) == ["web-01"]  # [] is ""
    assert names("spaced:>11", EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]  # " 12 " trims to 12
    assert names("hex:>30", EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]
    assert names("blank:>0", EDGE_OBJECTS) == names("blank:<=0", EDGE_OBJECTS) == []  # {} is NaN
    with pytest.raises(TypeError, match="Cannot convert object to primitive value"):
        compile_filter("tricky:>0")(EDGE_OBJECTS[0])


def test_properties_chain_through_length_and_indexes() -> None:
    assert names("snapshots:length:>0", VMS) == ["web-01"]
    assert names("name_label:length:6", VMS) == ["web-01", "app-01"]
    assert names("tags:0:env", VMS) == ["web-01"]
    assert names("tags:01:env", VMS) == []  # not a canonical index
    assert names("memory:static:1:>2e9", VMS) == ["web-01", "db-01", "app-01"]
    assert names("memory:static:0:<1e9", VMS) == ["test-01"]
    assert names("other:base_template_name:length:>18", VMS) == []
    assert names('"0":zero', EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]


def test_quoted_strings_take_any_character_with_escapes() -> None:
    assert parse(r'"a \"quoted\" \\ word"') == StringNode('a "quoted" \\ word')
    assert names('"weird key":x', EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]
    assert names(r'"quo\"te":y', EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]
    assert names('"emoji 😀":astral', EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]
    assert parse('"unterminated') == StringNode("unterminated")  # complex-matcher needs no closing quote


def test_unicode_letters_are_raw_string_characters() -> None:
    assert parse("name_label:café") == Property("name_label", StringNode("café"))
    assert names("name_label:ΩΜΈΓΑ", EDGE_OBJECTS) == ["Café Ωμέγα 𐐀 Straße"]
    assert names("name_label:STRASSE", EDGE_OBJECTS) == []  # lower-casing, not case folding
    with pytest.raises(MatcherSyntaxError):
        parse("name_label:𐐀")  # a letter outside the BMP is two code units, neither of them a letter


def test_canonical_strings() -> None:
    cases = {
        "  type:VM   !power_state:halted ": "type:VM !power_state:halted",
        "|( a  b )": "|(a b)",
        "a (b c) ((d))": "a (b c) d",
        'name_label:"My VM"': 'name_label:"My VM"',
        '"12"': '"12"',
        "12": "12",
        '"a\\"b\\\\"': '"a\\"b\\\\"',
        "size:>=1e3": "size:>=1000",
        "x:<0x10": "x:<16",
        "x:>1e21": "x:>1e+21",
        "x:>.0000001": "x:>1e-7",
        "x:>-0": "x:>0",
        "/a\\/b/i": "/a\\/b/i",
        "//": "/(?:)/",
        "/abc/g": "/abc/ g",
        "memory:dynamic:1:>2e9": 'memory:dynamic:"1":>2000000000',
        '"a b":c': '"a b":c',
        "x:/\n/": "x:/\\n/",  # V8 escapes a line terminator in `source`
        "auto_poweron?": "auto_poweron?",
        '"a b"?': '"a b"?',
        "!!a": "!!a",
        "": "",
    }
    assert {expression: str(parse(expression)) for expression in cases} == cases


def test_nodes_and_caching() -> None:
    assert parse("a !b") == And((StringNode("a"), Not(StringNode("b"))))
    assert parse("|(a b)") == Or((StringNode("a"), StringNode("b")))
    assert parse("x:>=5") == Property("x", Comparison(">=", 5.0))
    assert parse("x?") == TruthyProperty("x")
    assert parse("/a/i") == RegExpNode("a", "i")
    assert parse("name_label:web") is parse("name_label:web")
    assert names("", VMS) == ["web-01", "db-01", "app-01", "test-01"]


# ---------------------------------------------------------------------------------------------------
# Syntax errors, in complex-matcher's (and V8's) words.


@pytest.mark.parametrize(("expression", "message"), [
    ("name_label:", "parse error: expected end of input at position 10"),
    ("type:VM (a b", "parse error: expected end of input at position 8"),
    ("a )", "parse error: expected end of input at position 2"),
    ("|(a", "parse error: expected end of input at position 0"),
    ("a:b,c", "parse error: expected end of input at position 3"),
    ('"abc\\', "parse error: expected end of input at position 0"),
    ("😀 a", "parse error: expected end of input at position 0"),
    ("a 😀", "parse error: expected end of input at position 2"),
    ("é 😀", "parse error: expected end of input at position 2"),
    ("😀😀:x", "parse error: expected end of input at position 0"),
    ("a b 𐐀", "parse error: expected end of input at position 4"),
    ("size:>big", "value must be a number"),
    ("<1_000", "value must be a number"),
    ("(a <x)", "value must be a number"),
    ("/(/", "Invalid regular expression: /(/: Unterminated group"),
    ("/x/ /[/i", "Invalid regular expression: /[/i: Unterminated character class"),
    ("/a**/", "Invalid regular expression: /a**/: Nothing to repeat"),
    ("/)/", "Invalid regular expression: /)/: Unmatched ')'"),
    ("/a{2,1}/", "Invalid regular expression: /a{2,1}/: numbers out of order in {} quantifier"),
    ("/[z-a]/", "Invalid regular expression: /[z-a]/: Range out of order in character class"),
    ("/(?<=a)+/", "Invalid regular expression: /(?<=a)+/: Invalid quantifier"),
    ("/(?x)/", "Invalid regular expression: /(?x)/: Invalid group"),
    ("/(?<a>.)(?<a>.)/", "Invalid regular expression: /(?<a>.)(?<a>.)/: Duplicate capture group name"),
    ("/(?<a>.)\\k<b>/", "Invalid regular expression: /(?<a>.)\\k<b>/: Invalid named capture referenced"),
    ("/a\\\\/ x", "parse error: expected end of input at position 0"),
])
def test_syntax_errors(expression: str, message: str) -> None:
    assert syntax_error(expression) == message


def test_a_regex_ends_at_the_first_slash_no_backslash_precedes() -> None:
    # complex-matcher only looks at the previous character, and accepts a pattern that runs to the end of
    # the expression when its last character is such a slash.
    assert str(parse("/\\/")) == "/\\//"
    assert str(parse("/a\\\\/")) == "/a\\\\\\//"
    assert names("os_version:/\\/", VMS) == ["web-01", "test-01"]  # "Debian GNU/Linux 12"


def test_syntax_errors_are_value_errors_that_carry_the_expression() -> None:
    with pytest.raises(ValueError, match="position 3"):
        compile_filter("a:b)")


# ---------------------------------------------------------------------------------------------------
# The real complex-matcher, as the reference.


class Reference:
    """`node tests/js/compare_matcher.js`, kept running: one JSON line in, one JSON line out."""

    def __init__(self) -> None:
        node = require_tool("node")
        if not (JS_DIR / "node_modules" / "complex-matcher" / "package.json").exists():
            pytest.fail("complex-matcher is not installed in tests/js/node_modules: run scripts/setup "
                        "(or: cd tests/js && npm install)")
        self.process = subprocess.Popen([node, str(REFERENCE_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, encoding="utf-8")
        self.objects = json.dumps(OBJECTS)

    def answer(self, expression: str) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f'{{"expression": {json.dumps(expression)}, "objects": {self.objects}}}\n')
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the reference exited ({self.process.poll()})"
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # node exits at the end of its input
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    ref = Reference()
    try:
        yield ref
    finally:
        ref.close()


def python_answer(expression: str) -> dict:
    """What compare_matcher.js says about `expression`, computed by xofs.matcher."""
    try:
        node = parse(expression)
    except MatcherSyntaxError as error:
        return {"error": error.message}
    reply: dict = {"string": str(node)}
    try:
        reply["matches"] = [index for index, obj in enumerate(OBJECTS) if node.match(obj)]
    except TypeError as error:
        reply["matchError"] = str(error)
    return reply


def assert_same(reference: Reference, expression: str) -> None:
    assert python_answer(expression) == reference.answer(expression), expression


CORPUS = r"""
power_state:Running
type:VM !power_state:halted
$SR:bc78c87f-de43-590f-acb4-caf0ee4f852a
|(name_label:web name_label:db)
tags:/^env=prod$/
usage:>=1e9
auto_poweron?
name_label:web*01
snapshots:length:>0
(a b
"abc\
foo:"abc\
/a\/
/abc/g
/[/]/
0x1F
-0
Infinity
.
"12"
memory:size:>1e9
spaced:>4
nested:>4
nothing:>=0
empty:<=0
blank:>0
yes:>0
count:18446744073709551615
count:>18446744073709551614
astral:length:2
astral:0:/^\ud83d$/
constructor?
__proto__?
tags:length:2
flags:0:0
flags:1?
=
!
()
|()
/(?<=web-)0/
/(?<=w.*)01/
/(?<!a+)b/
/(?<=(a)|b)c/
/^(?:(w)|e|b)+\1-/
/(a)\1/
/\1(a)/
/(a\1)/
/\2(a)(b)/
/(?<n>w)\k<n>/
/\k<n>(?<n>w)/
/(?<n>w)\k/
/\k/
/[\k]/
/(?<a>x)[\k]/
/\8/
/\18/
/\012/
/\400/
/\cA/
/\c1/
/[\c1]/
/[\c_]/
/\x4/
/\u004/
/\u{41}/
/a{,2}/
/x{1/
/}/
/]/
/[]/
/[^]/
/[\d-z]/
/[a-\d]/
/[a-]/
/[\b]/
/^*/
/\b+/
/(?=a)*/
/(?=a){2}/
/(?/
/[\/
/\s/
/É/i
/ſ/i
/k/i
/()*\1x/
/(?!(a))\1/
/(?<a>.)\k<a>/i
/[^a-z]/i
/[\W]/i
/\p{L}/
/(?<$x>.)/
/(?<\u0061>w)\k<a>/
/(?<a\u{62}>w)/
/(?<1>w)/
/(?<a/
/a{2147483648}/
/(?<=\1(a))b/
/(?<=(a)\1)b/
/(?<=^|,)b/
/e.*e/
/\k<a>(?<a>)/
name_label:𐐀
"ǅ":titlecase
ǅ
/ǅ/i
/Ǆ/i
/ǆ/i
"""


def test_a_corpus_of_corner_cases_agrees_with_complex_matcher(reference: Reference) -> None:
    expressions = [line for line in CORPUS.splitlines() if line]
    differences = [e for e in expressions if python_answer(e) != reference.answer(e)]
    assert differences == []


# --- Expressions drawn from the grammar --------------------------------------------------------------


def _vocabulary() -> tuple[list[str], list[str]]:
    """Property names and words found in the objects, for expressions that match something."""
    keys: set[str] = set()
    words: set[str] = set()

    def visit(value: object) -> None:
        if isinstance(value, dict):
            keys.update(value)
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str):
            words.update(w for w in re.split(r"[^\w.$-]+", value) if w)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            words.add(repr(value))

    visit(OBJECTS)
    keys.update(["length", "0", "1", "missing"])
    return sorted(keys - set(INHERITED)), sorted(words)


# Members JS values inherit (`toString` is one on every value but the edge object that has its own) are
# functions whose own properties xofs.matcher does not model, a documented deviation: expressions read them
# only last in a chain, where they are faithful. All of them are spelt with letters and `_`.
INHERITED = ["constructor", "toString", "valueOf", "hasOwnProperty", "__proto__", "at", "map", "trim", "toFixed"]


KEYS, WORDS = _vocabulary()
SPACE = st.sampled_from([" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "\ufeff", ""])
NUMBERS = st.sampled_from([
    "0", "1", "2", "4", "8", "12", "-1", "1e3", "1E9", "2147483648", "0x1F", "0X1f", "0b101", "0o17", ".5",
    "5.", "1.e3", "1.5e-7", "Infinity", "-Infinity", "infinity", "1e21", "1_000", "12abc", "abc", "-", ".",
    "$", "NaN", "9007199254740993", "-0", "0x", "1e", "--1", "4.94e-324", "1.7976931348623157e308", "2e308",
]) | st.integers(-10, 10**12).map(str) | st.floats(allow_nan=False, allow_infinity=False).map(repr)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def words(draw: st.DrawFn) -> str:
    word = draw(st.sampled_from(WORDS) | st.sampled_from(["é", "Ω", "ǅ", "ß", "ſ", "K", "a", "web", "01"]))
    start = draw(st.integers(0, len(word)))
    piece = word[start:start + draw(st.integers(1, len(word) + 1))] or word
    return draw(st.sampled_from([piece, piece.upper(), piece.lower()]))


@st.composite
def globs(draw: st.DrawFn) -> str:
    word = draw(words())
    cut = draw(st.integers(0, len(word)))
    return draw(st.sampled_from([word[:cut] + "*" + word[cut:], "*" + word, word + "*", "*", word + "**"]))


def property_names(last: bool = False) -> st.SearchStrategy[str]:
    """Names for `name:term`; with `last`, also inherited members, for `name?` and `name:value`."""
    name = st.sampled_from(KEYS)
    unusual = st.text(max_size=4).filter(lambda text: not re.fullmatch("[A-Za-z_]+", text))
    names = name | name.map(quote) | unusual.map(quote)
    return names | st.sampled_from(INHERITED) if last else names


QUOTED = (st.text(max_size=8) | words() | st.sampled_from(["", "12", " 12 ", "\ud83d", "😀", 'a"b', "a\\"])
          ).map(quote) | st.sampled_from(['"abc', '"a\\', '"'])

REGEX_ATOMS = st.sampled_from([
    "a", "b", "e", "w", "W", "E", "0", "1", "-", "_", "=", " ", "é", "É", "ſ", "K", "ǅ", "Ǆ", ".", "^", "$",
    r"\d", r"\D", r"\w", r"\W", r"\s", r"\S", r"\b", r"\B", r"\.", r"\-", r"\/", r"\x41", r"\x4", r"\u0062",
    r"\u{62}", r"\cA", r"\c1", r"\c", r"\0", r"\01", r"\1", r"\2", r"\8", r"\k<n>", r"\k", r"\n", r"\t",
    "[a-z]", "[^a-z]", r"[\d-]", "[e-w]", "[]", "[^]", r"[\b]", r"[\W]", "[z-a]", r"[\c1]", r"[\k]", "[",
    "{", "}", "]", "{2}", "(", ")", "|", "*", "\\", "\ud83d", "😀",
])
QUANTIFIERS = st.sampled_from(["", "", "", "*", "+", "?", "{2}", "{1,}", "{0,2}", "*?", "+?", "??", "{2,1}",
                               "{,2}", "{1"])
GROUP_OPENERS = st.sampled_from(["(", "(?:", "(?<n>", "(?<m>", "(?=", "(?!", "(?<=", "(?<!", "(?", "(?<"])


def regex_patterns() -> st.SearchStrategy[str]:
    """Patterns from JS regex syntax, valid or not. A repeated group holds no repeat itself: nested
    repeats backtrack exponentially on a failing subject, which V8 often cuts short and Python's re does not
    (a difference of speed, not of answers, that would only make these tests time out)."""
    repeated = "*+{"
    atom = st.builds(lambda a, q: (a + q, bool(q)), REGEX_ATOMS, QUANTIFIERS)

    def group(opener: str, inner: tuple[str, bool], quantifier: str) -> tuple[str, bool]:
        body, has_repeat = inner
        if has_repeat and any(c in quantifier for c in repeated):
            quantifier = ""
        return f"{opener}{body}){quantifier}", has_repeat or bool(quantifier)

    def extend(inner: st.SearchStrategy[tuple[str, bool]]) -> st.SearchStrategy[tuple[str, bool]]:
        return (st.lists(inner, min_size=2, max_size=4).map(
                    lambda parts: ("".join(p for p, _ in parts), any(r for _, r in parts)))
                | st.builds(group, GROUP_OPENERS, inner, QUANTIFIERS)
                | st.builds(lambda a, b: (f"{a[0]}|{b[0]}", a[1] or b[1]), inner, inner))

    return st.recursive(atom, extend, max_leaves=6).map(lambda pattern: pattern[0])


REGEXES = st.builds(lambda p, f: f"/{p}/{f}", regex_patterns(), st.sampled_from(["", "", "i", "g"]))
VALUES = words() | globs() | NUMBERS | QUOTED | REGEXES
COMPARISONS = st.builds(str.__add__, st.sampled_from(["<", "<=", ">", ">=", "> ", "=<"]), NUMBERS)


def terms() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        spaced = st.lists(inner, min_size=1, max_size=3).flatmap(
            lambda items: st.lists(SPACE, min_size=len(items), max_size=len(items)).map(
                lambda spaces: "".join(s + i for s, i in zip(spaces, items, strict=True))))
        return (st.builds(lambda p, s, t: f"{p}{s}:{s}{t}", property_names(), SPACE, inner)
                | st.builds(lambda s, t: f"!{s}{t}", SPACE, inner)
                | spaced.map(lambda t: f"({t})")
                | st.builds(lambda s, t: f"|{s}({t})", SPACE, spaced))

    leaves = (VALUES | COMPARISONS | property_names(last=True).map(lambda p: p + "?")
              | st.builds(lambda p, v: f"{p}:{v}", property_names(last=True), VALUES | COMPARISONS))
    return st.recursive(leaves, extend, max_leaves=8)


EXPRESSIONS = st.lists(st.tuples(SPACE, terms()), max_size=4).map(lambda ts: "".join(s + t for s, t in ts))
PUNCTUATION = st.text(alphabet='()|!<>=:?"\\/ *aZé0.-_$\t{}[]^+😀', max_size=14)

DIFFERENTIAL = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@DIFFERENTIAL
@given(expression=EXPRESSIONS)
def test_grammar_expressions_agree_with_complex_matcher(reference: Reference, expression: str) -> None:
    assert_same(reference, expression)


@DIFFERENTIAL
@given(pattern=regex_patterns(), flags=st.sampled_from(["", "i"]), field=st.sampled_from(["", "name_label:"]))
def test_regular_expressions_agree_with_complex_matcher(
        reference: Reference, pattern: str, flags: str, field: str) -> None:
    assert_same(reference, f"{field}/{pattern}/{flags}")


@DIFFERENTIAL
@given(expression=PUNCTUATION)
def test_random_punctuation_agrees_with_complex_matcher(reference: Reference, expression: str) -> None:
    assert_same(reference, expression)


@DIFFERENTIAL
@given(name=property_names(last=True), comparison=COMPARISONS, value=VALUES)
def test_comparisons_and_values_agree_with_complex_matcher(
        reference: Reference, name: str, comparison: str, value: str) -> None:
    assert_same(reference, f"{name}:{comparison} {name}:{value} {value}")
