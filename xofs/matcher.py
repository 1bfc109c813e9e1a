"""XO's filter language (the npm package complex-matcher), evaluated with JavaScript's semantics.

xo-server filters objects with complex-matcher in REST `?filter=` and in `xo.getAllObjects({filter})`. The
simulator must answer those exactly as XO does, and the mount builds such filters, so this module is a clean
Python implementation of complex-matcher as xo-server 5.207.2 runs it (version 1.1.1: a comparison coerces
its operand the way JavaScript's `>` does, where 0.7 only compared numbers).

"JavaScript's semantics" here means:
- the expression is read as UTF-16 code units, like a JS string, so error positions count code units;
- numbers are parsed like JS's `+string` (hex, `Infinity`, exponents) and printed like `String(number)`;
- property access works on JSON values as in JS: own keys, `length` and indexes of arrays and strings,
  and members inherited from the prototypes (`toString`, `constructor`, ...);
- comparisons convert their operand like JS (`null` is 0, `"5"` is 5, `[5]` is 5, `true` is 1);
- regular expressions follow V8 (Node 20, as xo-server uses): its syntax in non-unicode mode with the
  Annex B extensions, its error messages, JS case folding and UTF-16 matching. They run on Python's `re`
  where both engines agree, and on a small backtracking engine written after the ECMAScript algorithm where
  they do not (variable-width lookbehind, back references to groups in loops or negative lookarounds);
  that engine and the UTF-16 helpers live in xofs.jsregex.

Known deviations: members inherited from prototypes are opaque truthy values whose own properties (a
function's `name`, `length`, ...) read as undefined; case mapping and identifier tables are Python's (Unicode
14.0 for Python 3.11) where Node uses ICU's (Unicode 17.0 in Node 20.20), so characters assigned or re-cased
since differ; both engines backtrack, but V8 prunes some catastrophic patterns (a repeat of a repeat
before text the subject lacks) that Python's re explores exponentially; and the fallback engine recurses
per iteration, so such a pattern on a long string can exhaust Python's stack where V8 would not.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import ge, gt, le, lt

from xofs.jsregex import JS_SPACES, JsRegExp, Needle, RegexError, escape_reg_exp, from_utf16, utf16

__all__ = [
    "MatcherSyntaxError", "Node", "Null", "And", "Or", "Not", "Comparison", "Property", "TruthyProperty",
    "StringNode", "NumberOrString", "GlobPattern", "RegExpNode", "parse", "compile_filter",
]


class MatcherSyntaxError(ValueError):
    """An expression complex-matcher refuses; `message` is its own wording, which XO returns in a 400 body."""

    def __init__(self, message: str, expression: str) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression


# ===================================================================================================
# JavaScript values: what a property access, a truth test and a numeric conversion give on JSON values.


class _Undefined:
    """JS `undefined`: what reading a missing property gives (distinct from JSON `null`, Python None)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "undefined"


_UNDEFINED = _Undefined()


@dataclass(frozen=True)
class _Inherited:
    """A member a JS value inherits from its prototype, such as `toString`: truthy, equal to no term."""

    name: str


_OBJECT_MEMBERS = frozenset(
    "constructor __defineGetter__ __defineSetter__ hasOwnProperty __lookupGetter__ __lookupSetter__"
    " isPrototypeOf propertyIsEnumerable toString valueOf toLocaleString __proto__".split())
_ARRAY_MEMBERS = _OBJECT_MEMBERS | frozenset(
    "at concat copyWithin fill find findIndex findLast findLastIndex lastIndexOf pop push reverse shift"
    " unshift slice sort splice includes indexOf join keys entries values forEach filter flat flatMap map"
    " every some reduce reduceRight toReversed toSorted toSpliced with".split())
_STRING_MEMBERS = _OBJECT_MEMBERS | frozenset(
    "anchor at big blink bold charAt charCodeAt codePointAt concat endsWith fontcolor fontsize fixed"
    " includes indexOf isWellFormed italics lastIndexOf link localeCompare match matchAll normalize padEnd"
    " padStart repeat replace replaceAll search slice small split strike sub substr substring sup"
    " startsWith toWellFormed trim trimStart trimLeft trimEnd trimRight toLocaleLowerCase"
    " toLocaleUpperCase toLowerCase toUpperCase".split())
_NUMBER_MEMBERS = _OBJECT_MEMBERS | frozenset("toExponential toFixed toPrecision".split())

_INDEX = re.compile(r"0|[1-9][0-9]*")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_double(value: int | float) -> float:
    """The double JS holds for a JSON number: big integers round, as JSON.parse rounds them."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _get(value: object, key: str) -> object:
    """`value[key]` in JS, for a JSON value (the caller has excluded null and undefined)."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        members = _OBJECT_MEMBERS
    elif isinstance(value, list):
        if key == "length":
            return len(value)
        if _INDEX.fullmatch(key) and int(key) < len(value):
            return value[int(key)]
        members = _ARRAY_MEMBERS
    elif isinstance(value, str):
        units = utf16(value)
        if key == "length":
            return len(units)
        if _INDEX.fullmatch(key) and int(key) < len(units):
            return from_utf16(units[int(key)])
        members = _STRING_MEMBERS
    elif isinstance(value, bool):
        members = _OBJECT_MEMBERS
    elif _is_number(value):
        members = _NUMBER_MEMBERS
    else:
        return _UNDEFINED
    return _Inherited(key) if key in members else _UNDEFINED


def _truthy(value: object) -> bool:
    """JS `!!value`: `[]` and `{}` are true, `0`, `""`, `null`, `false`, NaN and undefined are false."""
    if value is None or value is _UNDEFINED:
        return False
    if isinstance(value, _Inherited | list | dict):
        return True
    return bool(value) and value == value  # NaN is falsy


# JS WhiteSpace and LineTerminator: what `\s` matches and what `+string` trims.
_DECIMAL_LITERAL = re.compile(r"[+-]?(?:Infinity|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_RADIX_LITERAL = re.compile(r"0(?:([xX])[0-9a-fA-F]+|([oO])[0-7]+|([bB])[01]+)")


def _string_to_number(text: str) -> float:
    """JS `+text`: NaN unless the whole string (spaces trimmed) is a JS numeric literal."""
    text = text.strip(JS_SPACES)
    if not text:
        return 0.0
    if _DECIMAL_LITERAL.fullmatch(text):
        return float(text)
    radix = _RADIX_LITERAL.fullmatch(text)
    if radix:
        base = 16 if radix[1] else 8 if radix[2] else 2
        return _as_double(int(text[2:], base))
    return math.nan


def _number_to_string(number: float) -> str:
    """JS `String(number)`: shortest round-trip digits, exponent form from 1e21 and below 1e-6."""
    if number != number:
        return "NaN"
    if number == 0:
        return "0"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    if number < 0:
        return "-" + _number_to_string(-number)
    mantissa, _, exponent = repr(float(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip("0")
    if len(digits) <= point <= 21:
        return digits + "0" * (point - len(digits))
    if 0 < point <= 21:
        return f"{digits[:point]}.{digits[point:]}"
    if -6 < point <= 0:
        return "0." + "0" * -point + digits
    sign = "+" if point >= 1 else "-"
    head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{head}e{sign}{abs(point - 1)}"


def _primitive_string(value: object) -> str:
    """JS `String(value)` for a JSON value, as `Array.prototype.join` and ToPrimitive produce it."""
    if value is None or value is _UNDEFINED:
        return ""  # what join gives for null and undefined elements
    if isinstance(value, bool):
        return "true" if value else "false"
    if _is_number(value):
        return _number_to_string(_as_double(value))
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(map(_primitive_string, value))
    if isinstance(value, dict) and "toString" in value:
        # A JSON `toString` key shadows the inherited method with a value JS cannot call.
        raise TypeError("Cannot convert object to primitive value")
    if isinstance(value, dict):
        return "[object Object]"
    return f"function {getattr(value, 'name', '')}() {{ [native code] }}"


def _to_number(value: object) -> float:
    """The number JS's relational operators compare a JSON value as (ToPrimitive, then ToNumber)."""
    if value is None:
        return 0.0
    if value is _UNDEFINED:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if _is_number(value):
        return _as_double(value)
    return _string_to_number(_primitive_string(value))


def _values(value: object) -> Iterable[object]:
    """What lodash `some` visits: array elements or own values of a plain object; nothing otherwise."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return value.values()
    return ()


# ===================================================================================================
# The matcher's nodes.


def _is_raw_string_char(char: str) -> bool:
    """Digits, `_-.$` and any character with case, as complex-matcher tests one JS "character"."""
    return "0" <= char <= "9" or char in "_-.$" or char.upper() != char or char.lower() != char


def _format_string(value: str) -> str:
    """How complex-matcher writes a string back: bare if it can be, quoted otherwise and if numeric."""
    if not math.isnan(_string_to_number(value)):
        return f'"{value}"'
    if all(map(_is_raw_string_char, value)):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Node:
    """A parsed expression: `match` tests a JSON-like value, `str()` writes the canonical expression."""

    def match(self, value: object) -> bool:
        raise NotImplementedError

    def _format(self, nested: bool) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self._format(False)


@dataclass(frozen=True)
class Null(Node):
    """The empty expression: matches everything."""

    def match(self, value: object) -> bool:
        return True

    def _format(self, nested: bool) -> str:
        return ""


def _terms(children: tuple[Node, ...]) -> str:
    return " ".join(child._format(True) for child in children)


@dataclass(frozen=True)
class And(Node):
    children: tuple[Node, ...]

    def match(self, value: object) -> bool:
        return all(child.match(value) for child in self.children)

    def _format(self, nested: bool) -> str:
        return f"({_terms(self.children)})" if nested else _terms(self.children)


@dataclass(frozen=True)
class Or(Node):
    children: tuple[Node, ...]

    def match(self, value: object) -> bool:
        return any(child.match(value) for child in self.children)

    def _format(self, nested: bool) -> str:
        return f"|({_terms(self.children)})"


@dataclass(frozen=True)
class Not(Node):
    child: Node

    def match(self, value: object) -> bool:
        return not self.child.match(value)

    def _format(self, nested: bool) -> str:
        return "!" + self.child._format(True)


_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "<": lt, "<=": le, ">": gt, ">=": ge,
}


@dataclass(frozen=True)
class Comparison(Node):
    """`<`, `<=`, `>`, `>=` against a number; the value is converted as JS's operators convert it.

    `match` raises TypeError where JS throws (an object whose `toString` key hides the method)."""

    operator: str
    value: float

    def match(self, value: object) -> bool:
        return _COMPARATORS[self.operator](_to_number(value), self.value)

    def _format(self, nested: bool) -> str:
        return self.operator + _number_to_string(self.value)


@dataclass(frozen=True)
class Property(Node):
    """`name:child`: the child applied to the value's property."""

    name: str
    child: Node

    def match(self, value: object) -> bool:
        return value is not None and value is not _UNDEFINED and self.child.match(_get(value, self.name))

    def _format(self, nested: bool) -> str:
        return f"{_format_string(self.name)}:{self.child._format(True)}"


@dataclass(frozen=True)
class TruthyProperty(Node):
    """`name?`: the property is truthy in JS."""

    name: str

    def match(self, value: object) -> bool:
        return value is not None and value is not _UNDEFINED and _truthy(_get(value, self.name))

    def _format(self, nested: bool) -> str:
        return _format_string(self.name) + "?"


@dataclass(frozen=True)
class StringNode(Node):
    """A quoted or plain word: case-insensitive substring of a string, searched through arrays and objects."""

    value: str
    _needle: Needle = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_needle", Needle.of(self.value))

    def match(self, value: object) -> bool:
        if isinstance(value, str):
            return self._needle.found_in(value)
        return any(map(self.match, _values(value)))

    def _format(self, nested: bool) -> str:
        return _format_string(self.value)


@dataclass(frozen=True)
class NumberOrString(Node):
    """A bare word that reads as a JS number: equal to that number, or a substring as StringNode."""

    value: str
    number: float = field(init=False, repr=False)
    _needle: Needle = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "number", _string_to_number(self.value))
        object.__setattr__(self, "_needle", Needle.of(self.value))

    def match(self, value: object) -> bool:
        if _is_number(value) and _as_double(value) == self.number:  # type: ignore[arg-type]
            return True
        if isinstance(value, str):
            return self._needle.found_in(value)
        return any(map(self.match, _values(value)))

    def _format(self, nested: bool) -> str:
        return self.value


class _RegExpSearch(Node):
    """Shared by globs and regular expressions: a JS RegExp test on strings, searched through containers."""

    _regexp: JsRegExp

    def match(self, value: object) -> bool:
        if isinstance(value, str):
            return self._regexp.test(value)
        return any(map(self.match, _values(value)))


@dataclass(frozen=True)
class GlobPattern(_RegExpSearch):
    """A bare word with `*`: any run of characters but line breaks, matched case-insensitively anywhere."""

    value: str
    _regexp: JsRegExp = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = ".*".join(map(escape_reg_exp, self.value.split("*")))
        object.__setattr__(self, "_regexp", JsRegExp(utf16(pattern), "i"))

    def _format(self, nested: bool) -> str:
        return self.value


@dataclass(frozen=True)
class RegExpNode(_RegExpSearch):
    """`/pattern/` or `/pattern/i`: a JavaScript regular expression, tested anywhere in strings.

    Constructing one raises MatcherSyntaxError where `new RegExp` throws."""

    pattern: str
    flags: str = ""
    _regexp: JsRegExp = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            regexp = JsRegExp(utf16(self.pattern), self.flags)
        except RegexError as error:
            raise MatcherSyntaxError(error.args[0], f"/{self.pattern}/{self.flags}") from None
        object.__setattr__(self, "_regexp", regexp)

    def _format(self, nested: bool) -> str:
        return str(self._regexp)


def _make_and(children: list[Node]) -> Node:
    return children[0] if len(children) == 1 else And(tuple(children))


def _make_or(children: list[Node]) -> Node:
    return children[0] if len(children) == 1 else Or(tuple(children))


# ===================================================================================================
# The parser: complex-matcher's grammar, alternatives tried in its order, positions in code units.

_Result = tuple[Node, int] | None


class _Parser:
    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.src = utf16(expression)

    def parse(self) -> Node:
        terms, pos = self.terms(self.whitespace(0))
        if pos < len(self.src):
            raise MatcherSyntaxError(f"parse error: expected end of input at position {pos}", self.expression)
        return _make_and(terms) if terms else Null()

    def terms(self, pos: int) -> tuple[list[Node], int]:
        found = []
        while (result := self.term(pos)) is not None:
            node, pos = result
            found.append(node)
        return found, pos

    def whitespace(self, pos: int) -> int:
        """`\\s*` from `pos`, which must not be past the end."""
        while pos < len(self.src) and self.src[pos] in JS_SPACES:
            pos += 1
        return pos

    def term(self, pos: int) -> _Result:
        result = self.term_body(pos)
        if result is None or result[1] > len(self.src):
            return None  # `\\s*` fails one past the end, where a final `"...\\` leaves the parser
        return result[0], self.whitespace(result[1])

    def term_body(self, pos: int) -> _Result:
        src = self.src
        if src.startswith("(", pos):
            children, end = self.terms(self.whitespace(pos + 1))
            if children and src.startswith(")", end):
                return _make_and(children), end + 1
        if src.startswith("|", pos):
            start = self.whitespace(pos + 1)
            if src.startswith("(", start):
                children, end = self.terms(self.whitespace(start + 1))
                if children and src.startswith(")", end):
                    return _make_or(children), end + 1
        if src.startswith("!", pos):
            child = self.term(self.whitespace(pos + 1))
            if child is not None:
                return Not(child[0]), child[1]
        if src.startswith(("<", ">"), pos):
            comparison = self.comparison(pos)
            if comparison is not None:
                return comparison
        name = self.property_name(pos)
        if name is not None and name[1] <= len(src):
            after = self.whitespace(name[1])
            if src.startswith(":", after):
                child = self.term(self.whitespace(after + 1))
                if child is not None:
                    return Property(name[0], child[0]), child[1]
            if src.startswith("?", name[1]):
                return TruthyProperty(name[0]), name[1] + 1
        return self.value(pos)

    def comparison(self, pos: int) -> _Result:
        end = pos + (2 if self.src.startswith("=", pos + 1) else 1)
        raw = self.raw_string(end, glob=False)
        if raw is None:
            return None
        number = _string_to_number(raw[0])
        if math.isnan(number):
            raise MatcherSyntaxError("value must be a number", self.expression)
        return Comparison(self.src[pos:end], number), raw[1]

    def property_name(self, pos: int) -> tuple[str, int] | None:
        return self.quoted_string(pos) or self.raw_string(pos, glob=False)

    def value(self, pos: int) -> _Result:
        quoted = self.quoted_string(pos)
        if quoted is not None:
            return StringNode(quoted[0]), quoted[1]
        regex = self.regex(pos)
        if regex is not None:
            return regex
        raw = self.raw_string(pos, glob=True)
        if raw is None:
            return None
        text, end = raw
        if not math.isnan(_string_to_number(text)):
            return NumberOrString(text), end
        return (GlobPattern(text) if "*" in text else StringNode(text)), end

    def raw_string(self, pos: int, glob: bool) -> tuple[str, int] | None:
        end = pos
        while end < len(self.src) and (_is_raw_string_char(self.src[end]) or glob and self.src[end] == "*"):
            end += 1
        return (from_utf16(self.src[pos:end]), end) if end > pos else None

    def quoted_string(self, pos: int) -> tuple[str, int] | None:
        """`"..."` with `\\` escaping any character; like complex-matcher, it needs no closing quote."""
        src = self.src
        if not src.startswith('"', pos):
            return None
        pos += 1
        chars = []
        while pos < len(src):
            char = src[pos]
            pos += 1
            if char == '"':
                break
            if char == "\\":
                char = src[pos:pos + 1]  # a final backslash escapes nothing, and ends one past the end
                pos += 1
            chars.append(char)
        return from_utf16("".join(chars)), pos

    def regex(self, pos: int) -> _Result:
        """`/pattern/` and an optional `i`: the pattern ends at the first `/` that no `\\` precedes."""
        src = self.src
        if not src.startswith("/", pos):
            return None
        pos += 1
        chars: list[str] = []
        char, escaped = "", False
        while pos < len(src):
            char = src[pos]
            pos += 1
            if char == "/" and not escaped:
                break
            escaped = char == "\\"
            chars.append(char)
        if char != "/":
            return None
        flags = "i" if src.startswith("i", pos) else ""
        return RegExpNode(from_utf16("".join(chars)), flags), pos + len(flags)


# ===================================================================================================
# Public entry points.


@functools.lru_cache(maxsize=1024)
def parse(expression: str) -> Node:
    """The node for `expression`; raises MatcherSyntaxError with complex-matcher's message."""
    try:
        return _Parser(expression).parse()
    except MatcherSyntaxError as error:
        raise MatcherSyntaxError(error.message, expression) from None


def compile_filter(expression: str) -> Callable[[dict], bool]:
    """A predicate for `filter=expression`, as XO's `createPredicate()` gives it."""
    return parse(expression).match
