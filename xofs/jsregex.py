"""JavaScript regular expressions (V8, without the `u` flag) and UTF-16 strings, for xofs.matcher.

complex-matcher evaluates `/…/` terms with the JS engine of xo-server (Node 20). This module parses such a
pattern with V8's syntax and error messages, and runs it on Python's `re` where both engines agree, or on a
small backtracking engine written after the ECMAScript algorithm where they do not. Strings are handled as
UTF-16 code units, as JS sees them. See xofs.matcher's docstring for the known deviations.
"""

from __future__ import annotations

import functools
import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# What JS counts as white space (String.prototype.trim, Number("…")).
JS_SPACES = "".join(map(chr, range(0x2000, 0x200B))) + "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff"


# ===================================================================================================
# UTF-16: JS strings are sequences of 16-bit code units; Python strings of code points.

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _surrogates(match: re.Match[str]) -> str:
    offset = ord(match[0]) - 0x10000
    return chr(0xD800 + (offset >> 10)) + chr(0xDC00 + (offset & 0x3FF))


def utf16(text: str) -> str:
    """`text` with every character beyond U+FFFF split into its two surrogates: one char per code unit."""
    if text.isascii() or not _ASTRAL.search(text):
        return text
    return _ASTRAL.sub(_surrogates, text)


def from_utf16(units: str) -> str:
    """Back from code units to a Python string: surrogate pairs join, lone surrogates stay."""
    return units.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Needle:
    """JS `text.toLowerCase().indexOf(word.toLowerCase()) !== -1`, for one word and many texts."""

    lowered: str
    units: str | None  # the word in code units, when it holds a lone surrogate that may pair in a text

    @classmethod
    def of(cls, word: str) -> Needle:
        lowered = word.lower()
        return cls(lowered, utf16(lowered) if _SURROGATE.search(lowered) else None)

    def found_in(self, text: str) -> bool:
        if self.units is None:
            return self.lowered in text.lower()
        return self.units in utf16(text.lower())


# ===================================================================================================
# Regular expressions, as V8 parses and runs them without the `u` flag.
#
# Patterns and subjects are handled as UTF-16 code units (see `utf16`). Character sets are sorted lists of
# inclusive (low, high) code-unit ranges. With the `i` flag, JS compares characters after
# "Canonicalize" (upper-casing that never maps a non-ASCII character to ASCII): we canonicalize the subject
# once, and replace each character set by the set of canonical forms of its members.

_Ranges = tuple[tuple[int, int], ...]
_MAX_UNIT = 0xFFFF
_MAX_CAPTURES = 1 << 16
_DIGITS: _Ranges = ((0x30, 0x39),)
_WORD: _Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_LINE_TERMINATORS: _Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))


def _normalize(ranges: Iterable[tuple[int, int]]) -> _Ranges:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return tuple(merged)


def _complement(ranges: _Ranges) -> _Ranges:
    result, start = [], 0
    for low, high in ranges:
        if low > start:
            result.append((start, low - 1))
        start = high + 1
    if start <= _MAX_UNIT:
        result.append((start, _MAX_UNIT))
    return tuple(result)


_SPACES: _Ranges = _normalize((ord(c), ord(c)) for c in JS_SPACES)
_CLASS_ESCAPES: dict[str, _Ranges] = {
    "d": _DIGITS, "D": _complement(_DIGITS), "s": _SPACES, "S": _complement(_SPACES),
    "w": _WORD, "W": _complement(_WORD),
}
_DOT = _complement(_LINE_TERMINATORS)


@functools.cache
def _case_table() -> tuple[dict[int, int], list[int], list[int]]:
    """JS Canonicalize for every code unit it changes; those units, sorted; and those of them that are
    also the canonical form of some other unit (the rest never occur in a canonicalized subject)."""
    table = {}
    for unit in range(_MAX_UNIT + 1):
        upper = chr(unit).upper()
        if len(upper) == 1 and upper != chr(unit) and not (unit >= 128 and ord(upper) < 128):
            table[unit] = ord(upper)
    images = set(table.values())
    return table, sorted(table), sorted(unit for unit in table if unit in images)


def _canonicalize(units: str) -> str:
    if units.isascii():
        return units.upper()
    return units.translate(_case_table()[0])


def _canonical_image(ranges: _Ranges) -> _Ranges:
    """The canonical forms of a set's members: what a canonicalized subject character is compared with.

    Members that Canonicalize changes are replaced by their canonical form, except that those no unit
    canonicalizes to are left in place too: they never occur in a canonicalized subject, and keeping them
    keeps ranges whole (`.` stays three ranges instead of a thousand)."""
    table, movers, reachable = _case_table()
    image: list[tuple[int, int]] = []
    for low, high in ranges:
        start = low
        for unit in reachable[bisect_left(reachable, low):bisect_right(reachable, high)]:
            if start < unit:
                image.append((start, unit - 1))
            start = unit + 1
        if start <= high:
            image.append((start, high))
        image.extend((table[unit], table[unit]) for unit in movers[bisect_left(movers, low):bisect_right(movers, high)])
    return _normalize(image)


# --- Syntax tree -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Set:
    """One character from `ranges` (or, when `negated`, from outside them)."""

    ranges: _Ranges
    negated: bool = False


@dataclass(frozen=True)
class _Assertion:
    kind: str  # "^", "$", "b" (word boundary) or "B"


@dataclass(frozen=True)
class _Group:
    body: object
    index: int | None  # capture number, None for (?:)


@dataclass(frozen=True)
class _Look:
    body: object
    behind: bool
    negative: bool


@dataclass(frozen=True)
class _BackReference:
    index: int


@dataclass(frozen=True)
class _Repeat:
    body: object
    min: int
    max: int | None  # None: unbounded
    greedy: bool


@dataclass(frozen=True)
class _Sequence:
    items: tuple[object, ...]


@dataclass(frozen=True)
class _Alternation:
    alternatives: tuple[object, ...]


_EMPTY = _Sequence(())


def _widths(node: object) -> tuple[int, float]:
    """The least and greatest number of characters `node` can match (inf when unbounded)."""
    if isinstance(node, _Set):
        return 1, 1
    if isinstance(node, _Assertion | _Look):
        return 0, 0
    if isinstance(node, _BackReference | _NamedReference):
        return 0, math.inf
    if isinstance(node, _Group):
        return _widths(node.body)
    if isinstance(node, _Repeat):
        low, high = _widths(node.body)
        top = math.inf if node.max is None else node.max
        return low * node.min, 0 if top == 0 or high == 0 else high * top
    if isinstance(node, _Sequence):
        pairs = [_widths(item) for item in node.items]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    pairs = [_widths(item) for item in node.alternatives]  # type: ignore[attr-defined]
    return min(p[0] for p in pairs), max(p[1] for p in pairs)


def _children(node: object) -> tuple[object, ...]:
    if isinstance(node, _Group | _Look | _Repeat):
        return (node.body,)
    if isinstance(node, _Sequence):
        return node.items
    if isinstance(node, _Alternation):
        return node.alternatives
    return ()


def _walk(node: object) -> Iterable[object]:
    yield node
    for child in _children(node):
        yield from _walk(child)


# --- Parser --------------------------------------------------------------------------------------------


class RegexError(Exception):
    """A V8 regular-expression syntax error; the argument is V8's wording."""


# The "current character" once the pattern is exhausted: longer than one character, so that no membership
# test such as `char in "=!"` can hold for it.
_END = "<end>"
_OCTAL = "01234567"
_HEX = "0123456789abcdefABCDEF"
_CONTROL_ESCAPES = {"f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}


def _is_identifier_start(code_point: int) -> bool:
    char = chr(code_point)
    return char in "$_" or char.isidentifier()


def _is_identifier_part(code_point: int) -> bool:
    char = chr(code_point)
    return char in "$\u200c\u200d" or ("a" + char).isidentifier()


class _RegexParser:
    """V8's RegExp parser for patterns without the `u` flag, down to which error wins when several apply.

    `pos` indexes the current code unit. The structure follows V8's ParseDisjunction so that Annex B
    quirks (a lone `{` is a literal, `\\8` is "8", `\\1` is octal without enough groups) come out alike.
    """

    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.pos = 0
        self.captures_started = 0
        self.capture_count = 0  # total captures, once `scanned`
        self.scanned = False
        self.has_named = False
        self.names: dict[str, int] = {}
        self.named_references: list[tuple[str, list[int]]] = []

    @property
    def current(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else _END

    def peek(self) -> str:
        return self.src[self.pos + 1] if self.pos + 1 < len(self.src) else _END

    def parse(self) -> object:
        tree = self.disjunction((), nested=False)
        if self.named_references:
            for name, cell in self.named_references:
                if name not in self.names:
                    raise RegexError("Invalid named capture referenced")
                cell.append(self.names[name])
        return _resolve(tree)

    def disjunction(self, captures: tuple[tuple[int, str | None], ...], nested: bool) -> object:
        """Alternatives up to the closing `)` of the group being parsed (not consumed) or the end."""
        alternatives: list[object] = []
        items: list[object] = []
        while True:
            char = self.current
            if char == _END:
                if nested:
                    raise RegexError("Unterminated group")
                break
            if char == ")":
                if not nested:
                    raise RegexError("Unmatched ')'")
                break
            if char == "|":
                self.pos += 1
                alternatives.append(_sequence(items))
                items = []
                continue
            if char in "*+?":
                raise RegexError("Nothing to repeat")
            atom = self.term(captures)
            if isinstance(atom, _Assertion):
                items.append(atom)  # assertions take no quantifier: a following one is "Nothing to repeat"
                continue
            self.quantified(atom, items)
        alternatives.append(_sequence(items))
        return alternatives[0] if len(alternatives) == 1 else _Alternation(tuple(alternatives))

    def term(self, captures: tuple[tuple[int, str | None], ...]) -> object:
        """One atom or assertion; None stands for V8's "empty" atom, which swallows a quantifier."""
        char = self.current
        if char in "^$":
            self.pos += 1
            return _Assertion(char)
        if char == ".":
            self.pos += 1
            return _Set(_DOT)
        if char == "(":
            return self.group(captures)
        if char == "[":
            return self.character_class()
        if char == "\\":
            return self.atom_escape(captures)
        if char == "{" and self.interval() is not None:
            raise RegexError("Nothing to repeat")
        self.pos += 1
        return _Set(((ord(char), ord(char)),))

    def atom_escape(self, captures: tuple[tuple[int, str | None], ...]) -> object:
        following = self.peek()
        if following == _END:
            raise RegexError("\\ at end of pattern")
        if following in "123456789":
            index = self.back_reference_index()
            if index is not None:
                if any(index == number for number, _ in captures):
                    return None  # inside the group it names: nothing can have been captured yet
                return _BackReference(index)
            if following in "89":
                self.pos += 2
                return _Set(((ord(following), ord(following)),))
        if following in "0123456789":
            self.pos += 1
            return _literal(self.octal())
        if following in "bB":
            self.pos += 2
            return _Assertion(following)
        if following in _CLASS_ESCAPES:
            self.pos += 2
            return _Set(_CLASS_ESCAPES[following])
        if following == "k" and self.named_captures_exist(in_class=False):
            self.pos += 2
            return self.named_back_reference(captures)
        return _literal(self.character_escape(in_class=False))

    def quantified(self, atom: object, items: list[object]) -> None:
        """Reads a quantifier after `atom`, if any, and appends the result as V8's builder would."""
        char = self.current
        if char == "*":
            low, high = 0, None
        elif char == "+":
            low, high = 1, None
        elif char == "?":
            low, high = 0, 1
        elif char == "{" and (bounds := self.interval()) is not None:
            low, high = bounds
            if high is not None and high < low:
                raise RegexError("numbers out of order in {} quantifier")
        else:
            if atom is not None:
                items.append(atom)
            return
        if char != "{":
            self.pos += 1
        greedy = self.current != "?"
        if not greedy:
            self.pos += 1
        if atom is None:
            return
        if isinstance(atom, _Look) and atom.behind:
            raise RegexError("Invalid quantifier")
        if _widths(atom)[1] == 0:
            # V8 drops a quantified atom that can only match the empty string when it may repeat zero
            # times, and keeps it once otherwise (its captures then stay unset or are set once).
            if low:
                items.append(atom)
            return
        items.append(_Repeat(atom, low, high, greedy))

    def interval(self) -> tuple[int, int | None] | None:
        """`{n}`, `{n,}` or `{n,m}` at `pos` (consumed), or None with `pos` unchanged."""
        match = re.compile(r"\{([0-9]+)(?:(,)([0-9]*))?\}").match(self.src, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        cap = (1 << 31) - 1  # V8 saturates counts at kInfinity
        low = min(int(match[1]), cap)
        if not match[2]:
            return low, low
        return low, min(int(match[3]), cap) if match[3] else None

    def group(self, captures: tuple[tuple[int, str | None], ...]) -> object:
        self.pos += 1
        kind, name, behind, negative = "capture", None, False, False
        if self.current == "?":
            following = self.peek()
            if following == ":":
                kind = "group"
            elif following in "=!":
                kind, negative = "look", following == "!"
            elif following == "<":
                self.pos += 1
                if self.peek() in ("=", "!"):
                    kind, behind, negative = "look", True, self.peek() == "!"
                else:
                    self.has_named = True
                    name = ""
            else:
                raise RegexError("Invalid group")
            self.pos += 2 if name is None else 1
        if kind == "capture":
            if self.captures_started >= _MAX_CAPTURES:
                raise RegexError("Too many captures")
            self.captures_started += 1
            index = self.captures_started
            if name is not None:
                name = self.group_name()
            captures = (*captures, (index, name))
        body = self.disjunction(captures, nested=True)
        self.pos += 1  # the ")"
        if kind == "group":
            return _Group(body, None)
        if kind == "look":
            return _Look(body, behind, negative)
        if name is not None:
            if name in self.names:
                raise RegexError("Duplicate capture group name")
            self.names[name] = index
        return _Group(body, index)

    def group_name(self) -> str:
        """A capture group name up to `>`: a JS identifier, read in unicode mode as V8 does."""
        name: list[int] = []
        while True:
            code_point, end = self.code_point_at(self.pos)
            if code_point == ord("\\") and self.src.startswith("u", end):
                code_point, end = self.unicode_escape(end + 1)
            if code_point == ord("\\"):
                raise RegexError("Invalid capture group name")
            if not name:
                if code_point < 0 or not _is_identifier_start(code_point):
                    raise RegexError("Invalid capture group name")
            elif code_point == ord(">"):
                self.pos = end
                return "".join(map(chr, name))
            elif code_point < 0 or not _is_identifier_part(code_point):
                raise RegexError("Invalid capture group name")
            name.append(code_point)
            self.pos = end

    def code_point_at(self, pos: int) -> tuple[int, int]:
        """The code point at `pos` (a surrogate pair counts as one) and where it ends; -1 at the end."""
        if pos >= len(self.src):
            return -1, pos
        unit = ord(self.src[pos])
        if 0xD800 <= unit < 0xDC00 and pos + 1 < len(self.src) and 0xDC00 <= ord(self.src[pos + 1]) < 0xE000:
            return 0x10000 + ((unit - 0xD800) << 10) + ord(self.src[pos + 1]) - 0xDC00, pos + 2
        return unit, pos + 1

    def unicode_escape(self, pos: int) -> tuple[int, int]:
        """`{hex}` or `hex4` (pairing `\\uLEAD\\uTRAIL`) after a `\\u` in a group name."""
        braced = re.compile(r"\{([0-9a-fA-F]+)\}").match(self.src, pos)
        if braced and int(braced[1], 16) <= 0x10FFFF:
            return int(braced[1], 16), braced.end()
        four = re.compile(r"[0-9a-fA-F]{4}").match(self.src, pos)
        if four is None:
            raise RegexError("Invalid Unicode escape")
        value, end = int(four[0], 16), four.end()
        trail = re.compile(r"\\u([0-9a-fA-F]{4})").match(self.src, end)
        if 0xD800 <= value < 0xDC00 and trail and 0xDC00 <= int(trail[1], 16) < 0xE000:
            return 0x10000 + ((value - 0xD800) << 10) + int(trail[1], 16) - 0xDC00, trail.end()
        return value, end

    def named_back_reference(self, captures: tuple[tuple[int, str | None], ...]) -> object:
        if self.current != "<":
            raise RegexError("Invalid named reference")
        self.pos += 1
        name = self.group_name()
        if any(name == group_name for _, group_name in captures):
            return None
        cell: list[int] = []  # filled with the group number once the whole pattern is known
        self.named_references.append((name, cell))
        return _NamedReference(name, cell)

    def back_reference_index(self) -> int | None:
        """The group number of `\\N` at `pos` (consumed) if there are that many groups, else None."""
        start = self.pos
        digits = re.compile(r"[0-9]+").match(self.src, self.pos + 1)
        assert digits is not None
        value = 0
        for digit in digits[0]:
            value = value * 10 + int(digit)
            if value > _MAX_CAPTURES:
                return None
        self.pos = digits.end()
        if value > self.captures_started:
            if not self.scanned:
                self.scan_for_captures(in_class=False)
            if value > self.capture_count:
                self.pos = start
                return None
        return value

    def named_captures_exist(self, in_class: bool) -> bool:
        if not (self.has_named or self.scanned):
            self.scan_for_captures(in_class)
        return self.has_named

    def scan_for_captures(self, in_class: bool) -> None:
        """Counts the groups from `pos` on without parsing them, as V8 does to tell `\\N` from octal."""
        src, i, count = self.src, self.pos, self.captures_started
        if in_class:
            while i < len(src):
                i += 1
                if src[i - 1] == "\\":
                    i += 1
                elif src[i - 1] == "]":
                    break
        while i < len(src):
            char = src[i]
            i += 1
            if char == "\\":
                i += 1
            elif char == "[":
                depth = 0
                while i < len(src):
                    char = src[i]
                    i += 1
                    if char == "\\":
                        i += 1
                    elif char == "[":
                        depth += 1
                    elif char == "]":
                        if depth == 0:
                            break
                        depth -= 1
            elif char == "(":
                if src.startswith("?", i):
                    i += 1
                    if not src.startswith("<", i):
                        continue
                    i += 1
                    if src[i:i + 1] in ("=", "!"):
                        continue
                    self.has_named = True
                count += 1
        self.capture_count, self.scanned = count, True

    def character_class(self) -> _Set:
        self.pos += 1
        negated = self.current == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        if self.current == "]":
            self.pos += 1
            return _Set((), negated)
        while self.current not in (_END, "]"):
            first = self.class_atom(ranges)
            if self.current != "-":
                if first is not None:
                    ranges.append((first, first))
                continue
            self.pos += 1
            if self.current == _END:
                break
            if self.current == "]":
                ranges.extend(([(first, first)] if first is not None else []) + [(0x2D, 0x2D)])
                break
            second = self.class_atom(ranges)
            if first is None or second is None:
                # A class escape at either end makes the "-" a plain character (Annex B).
                ranges.extend((c, c) for c in (first, 0x2D, second) if c is not None)
                continue
            if first > second:
                raise RegexError("Range out of order in character class")
            ranges.append((first, second))
        if self.current == _END:
            raise RegexError("Unterminated character class")
        self.pos += 1
        return _Set(_normalize(ranges), negated)

    def class_atom(self, ranges: list[tuple[int, int]]) -> int | None:
        """One class member: its code unit, or None after adding a class escape (`\\d`...) to `ranges`."""
        char = self.current
        if char != "\\":
            self.pos += 1
            return ord(char)
        following = self.peek()
        if following == "b":
            self.pos += 2
            return 0x08
        if following == _END:
            raise RegexError("\\ at end of pattern")
        if following in _CLASS_ESCAPES:
            self.pos += 2
            ranges.extend(_CLASS_ESCAPES[following])
            return None
        return self.character_escape(in_class=True)

    def character_escape(self, in_class: bool) -> int:
        """The character a `\\` escape at `pos` stands for (V8's ParseCharacterEscape, Annex B)."""
        self.pos += 1
        char = self.current
        if char in _CONTROL_ESCAPES:
            self.pos += 1
            return _CONTROL_ESCAPES[char]
        if char == "c":
            letter = self.peek()
            if letter.isascii() and letter.isalpha() or in_class and letter in "0123456789_":
                self.pos += 2
                return ord(letter) & 0x1F
            return ord("\\")  # read as a backslash; the "c" is parsed next as itself
        if char == "0" and self.peek() not in "0123456789":
            self.pos += 1
            return 0
        if char in _OCTAL:
            return self.octal()
        if char in ("x", "u"):
            self.pos += 1
            value = self.hex_digits(2 if char == "x" else 4)
            return ord(char) if value is None else value
        self.pos += 1
        if char == "k" and self.named_captures_exist(in_class):
            raise RegexError("Invalid escape")
        return ord(char)

    def hex_digits(self, count: int) -> int | None:
        digits = self.src[self.pos:self.pos + count]
        if len(digits) < count or any(d not in _HEX for d in digits):
            return None
        self.pos += count
        return int(digits, 16)

    def octal(self) -> int:
        """Up to three octal digits whose value stays below 256 (Annex B LegacyOctalEscapeSequence)."""
        value = int(self.current)
        self.pos += 1
        if self.current in _OCTAL:
            value = value * 8 + int(self.current)
            self.pos += 1
            if value < 32 and self.current in _OCTAL:
                value = value * 8 + int(self.current)
                self.pos += 1
        return value


@dataclass(frozen=True)
class _NamedReference:
    """`\\k<name>` until the whole pattern is parsed; `cell` then holds the group number."""

    name: str
    cell: list[int] = field(compare=False)


def _literal(unit: int) -> _Set:
    return _Set(((unit, unit),))


def _sequence(items: list[object]) -> object:
    return items[0] if len(items) == 1 else _Sequence(tuple(items))


def _resolve(node: object) -> object:
    """The tree with named back references replaced by numbered ones."""
    if isinstance(node, _NamedReference):
        return _BackReference(node.cell[0])
    if isinstance(node, _Group):
        return _Group(_resolve(node.body), node.index)
    if isinstance(node, _Look):
        return _Look(_resolve(node.body), node.behind, node.negative)
    if isinstance(node, _Repeat):
        return _Repeat(_resolve(node.body), node.min, node.max, node.greedy)
    if isinstance(node, _Sequence):
        return _Sequence(tuple(map(_resolve, node.items)))
    if isinstance(node, _Alternation):
        return _Alternation(tuple(map(_resolve, node.alternatives)))
    return node


# --- Translation to Python's re ------------------------------------------------------------------------


def _python_class(ranges: _Ranges, negated: bool) -> str:
    if not ranges:
        return "[\\u0000-\\uffff]" if negated else "(?!)"
    body = "".join(f"\\u{lo:04x}" if lo == hi else f"\\u{lo:04x}-\\u{hi:04x}" for lo, hi in ranges)
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1] and not negated:
        return body
    return f"[{'^' if negated else ''}{body}]"


_PYTHON_ASSERTIONS = {"^": r"\A", "$": r"\Z", "b": r"(?a:\b)", "B": r"(?a:\B)"}


class _Translator:
    """Writes a tree as a Python pattern over canonicalized code units; groups are named `g<number>`."""

    def __init__(self, tree: object, ignore_case: bool) -> None:
        self.ignore_case = ignore_case
        self.groups = {node.index for node in _walk(tree) if isinstance(node, _Group) and node.index}
        self.written: set[int] = set()  # groups already closed, in pattern order

    def set(self, node: _Set) -> str:
        ranges = _canonical_image(node.ranges) if self.ignore_case else node.ranges
        return _python_class(ranges, node.negated)

    def emit(self, node: object) -> str:
        if isinstance(node, _Set):
            return self.set(node)
        if isinstance(node, _Assertion):
            return _PYTHON_ASSERTIONS[node.kind]
        if isinstance(node, _Group):
            body = self.emit(node.body)
            if not node.index:
                return f"(?:{body})"
            self.written.add(node.index)
            return f"(?P<g{node.index}>{body})"
        if isinstance(node, _Look):
            kind = f"(?{'<' if node.behind else ''}{'!' if node.negative else '='}"
            alternatives = _lookbehind_alternatives(node) if node.behind else None
            if alternatives:
                # Python needs one width per lookbehind: (?<=a|bc) becomes (?:(?<=a)|(?<=bc)).
                looks = [f"{kind}{self.emit(alternative)})" for alternative in alternatives]
                return "".join(looks) if node.negative else f"(?:{'|'.join(looks)})"
            return f"{kind}{self.emit(node.body)})"
        if isinstance(node, _BackReference):
            # JS: a reference to a group that has captured nothing matches the empty string. A group
            # written later (or dropped) has captured nothing yet: the loops that could have captured it
            # reset it in JS, and `_python_can_run` leaves those to the engine.
            name = f"g{node.index}"
            return f"(?({name})(?P={name}))" if node.index in self.written else ""
        if isinstance(node, _Repeat):
            high = "" if node.max is None else node.max
            return f"(?:{self.emit(node.body)}){{{node.min},{high}}}{'' if node.greedy else '?'}"
        if isinstance(node, _Sequence):
            return "".join(map(self.emit, node.items))
        return "|".join(map(self.emit, node.alternatives))  # type: ignore[attr-defined]


def _fixed_width(node: object) -> bool:
    low, high = _widths(node)
    return low == high


def _lookbehind_alternatives(node: _Look) -> tuple[object, ...] | None:
    """The alternatives of a lookbehind body (through non-capturing groups) when they differ in width."""
    body = node.body
    while isinstance(body, _Group) and body.index is None:
        body = body.body
    if isinstance(body, _Alternation) and not _fixed_width(body):
        return body.alternatives
    return None


def _python_can_run(tree: object) -> bool:
    """Whether Python's re gives JS's answer: not for variable-width or referencing lookbehinds, nor for
    references to groups JS resets (inside a repeat that can iterate twice, or a negative lookaround)."""
    referenced = {node.index for node in _walk(tree) if isinstance(node, _BackReference)}

    def fine(node: object, resets: bool) -> bool:
        if isinstance(node, _Look):
            if node.behind:
                parts = _lookbehind_alternatives(node) or (node.body,)
                if not all(map(_fixed_width, parts)) or any(
                        isinstance(n, _BackReference) for n in _walk(node.body)):
                    return False
            resets = resets or node.negative
        elif isinstance(node, _Group) and node.index in referenced and resets:
            return False
        elif isinstance(node, _Repeat):
            resets = resets or node.max is None or node.max >= 2
        return all(fine(child, resets) for child in _children(node))

    return fine(tree, False)


# --- Backtracking engine (the ECMAScript matcher semantics) ---------------------------------------------

# A continuation receives the position and captures reached and says whether the rest of the pattern
# matches from there; a matcher receives the subject, a position, captures and a continuation.
_Captures = tuple[tuple[int, int] | None, ...]
_Continuation = Callable[[int, _Captures], bool]
_Matcher = Callable[[str, int, _Captures, _Continuation], bool]


class _Engine:
    """Compiles a tree into matchers following ECMA-262's RegExp pattern semantics, both directions."""

    def __init__(self, tree: object, ignore_case: bool) -> None:
        self.translator = _Translator(tree, ignore_case)
        self.group_count = max(self.translator.groups, default=0)
        self.matcher = self.compile(tree, forward=True)

    def search(self, subject: str) -> bool:
        empty: _Captures = (None,) * (self.group_count + 1)
        return any(self.matcher(subject, start, empty, lambda _p, _c: True) for start in range(len(subject) + 1))

    def compile(self, node: object, forward: bool) -> _Matcher:
        if isinstance(node, _Set):
            return self.character(node, forward)
        if isinstance(node, _Assertion):
            return self.assertion(node.kind)
        if isinstance(node, _Group):
            return self.group(node, forward)
        if isinstance(node, _Look):
            return self.look(node)
        if isinstance(node, _BackReference):
            return self.back_reference(node.index, forward)
        if isinstance(node, _Repeat):
            return self.repeat(node, forward)
        if isinstance(node, _Sequence):
            items = [self.compile(item, forward) for item in node.items]
            return self.sequence(items if forward else items[::-1])
        alternatives = [self.compile(item, forward) for item in node.alternatives]  # type: ignore[attr-defined]
        return lambda s, pos, caps, k: any(m(s, pos, caps, k) for m in alternatives)

    def character(self, node: _Set, forward: bool) -> _Matcher:
        test = re.compile(self.translator.set(node)).match
        step = 1 if forward else -1

        def match(s: str, pos: int, caps: _Captures, k: _Continuation) -> bool:
            at = pos if forward else pos - 1
            return 0 <= at < len(s) and test(s, at) is not None and k(pos + step, caps)

        return match

    def assertion(self, kind: str) -> _Matcher:
        word = re.compile(_python_class(_WORD, False)).match

        def is_word(s: str, at: int) -> bool:
            return 0 <= at < len(s) and word(s, at) is not None

        def match(s: str, pos: int, caps: _Captures, k: _Continuation) -> bool:
            if kind == "^":
                holds = pos == 0
            elif kind == "$":
                holds = pos == len(s)
            else:
                holds = (is_word(s, pos - 1) != is_word(s, pos)) == (kind == "b")
            return holds and k(pos, caps)

        return match

    @staticmethod
    def sequence(items: list[_Matcher]) -> _Matcher:
        if not items:
            return lambda s, pos, caps, k: k(pos, caps)
        first, rest = items[0], _Engine.sequence(items[1:])
        return lambda s, pos, caps, k: first(s, pos, caps, lambda p, c: rest(s, p, c, k))

    def group(self, node: _Group, forward: bool) -> _Matcher:
        body, index = self.compile(node.body, forward), node.index
        if not index:
            return body

        def match(s: str, pos: int, caps: _Captures, k: _Continuation) -> bool:
            def captured(end: int, c: _Captures) -> bool:
                span = (pos, end) if forward else (end, pos)
                return k(end, c[:index] + (span,) + c[index + 1:])

            return body(s, pos, caps, captured)

        return match

    def look(self, node: _Look) -> _Matcher:
        body = self.compile(node.body, forward=not node.behind)

        def match(s: str, pos: int, caps: _Captures, k: _Continuation) -> bool:
            found: list[_Captures] = []
            matched = body(s, pos, caps, lambda _p, c: found.append(c) is None)
            if node.negative:
                return not matched and k(pos, caps)
            return matched and k(pos, found[0])

        return match

    @staticmethod
    def back_reference(index: int, forward: bool) -> _Matcher:
        def match(s: str, pos: int, caps: _Captures, k: _Continuation) -> bool:
            span = caps[index] if index < len(caps) else None
            if span is None:
                return k(pos, caps)
            text = s[span[0]:span[1]]
            start, end = (pos, pos + len(text)) if forward else (pos - len(text), pos)
            if start < 0 or end > len(s) or s[start:end] != text:
                return False
            return k(end if forward else start, caps)

        return match

    def repeat(self, node: _Repeat, forward: bool) -> _Matcher:
        if isinstance(node.body, _Set):
            return self.simple_repeat(node, forward)
        body = self.compile(node.body, forward)
        inner = [n.index for n in _walk(node.body) if isinstance(n, _Group) and n.index]

        def attempt(s: str, pos: int, caps: _Captures, k: _Continuation, low: int, high: float) -> bool:
            if high == 0:
                return k(pos, caps)

            def again(end: int, c: _Captures) -> bool:
                if low == 0 and end == pos:
                    return False  # an iteration past the minimum must consume something
                return attempt(s, end, c, k, max(low - 1, 0), high - 1)

            cleared = tuple(None if i in inner else span for i, span in enumerate(caps))
            if low:
                return body(s, pos, cleared, again)
            if node.greedy:
                return body(s, pos, cleared, again) or k(pos, caps)
            return k(pos, caps) or body(s, pos, cleared, again)

        top = math.inf if node.max is None else node.max
        return lambda s, pos, caps, k: attempt(s, pos, caps, k, node.min, top)

    def simple_repeat(self, node: _Repeat, forward: bool) -> _Matcher:
        """A repeated single character: the same answers as `repeat`, without recursing per character."""
        test = re.compile(self.translator.set(node.body)).match  # type: ignore[arg-type]
        step = 1 if forward else -1

        def match(s: str, pos: int, caps: _Captures, k: _Continuation) -> bool:
            count, at = 0, pos if forward else pos - 1
            while (node.max is None or count < node.max) and 0 <= at < len(s) and test(s, at):
                count, at = count + 1, at + step
            if count < node.min:
                return False
            counts = range(count, node.min - 1, -1) if node.greedy else range(node.min, count + 1)
            return any(k(pos + n * step, caps) for n in counts)

        return match


# --- The RegExp object ------------------------------------------------------------------------------------


def _escape_source(pattern: str) -> str:
    """RegExp.prototype.source as V8 writes it: `/` outside classes and line terminators escaped."""
    out, in_class, i = [], False, 0
    names = {"\n": "\\n", "\r": "\\r", "\u2028": "\\u2028", "\u2029": "\\u2029"}
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern) and pattern[i + 1] in names:
            i += 1  # the escaped line terminator is written as an escape sequence below
            continue
        if char == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if char == "/" and not in_class:
            out.append("\\/")
        else:
            in_class = (in_class or char == "[") and char != "]"
            out.append(names.get(char, char))
        i += 1
    return "".join(out) or "(?:)"


class JsRegExp:
    """`new RegExp(pattern, flags)` for flags "" or "i": its `source` and its `test`."""

    def __init__(self, pattern: str, flags: str) -> None:
        """`pattern` is in UTF-16 code units; raises RegexError with V8's message."""
        try:
            tree = _RegexParser(pattern).parse()
        except RegexError as error:
            raise RegexError(
                f"Invalid regular expression: /{from_utf16(pattern)}/{flags}: {error.args[0]}") from None
        self.source = from_utf16(_escape_source(pattern))
        self.flags = flags
        self.ignore_case = "i" in flags
        self._search = self._compile(tree)

    def _compile(self, tree: object) -> Callable[[str], bool]:
        if _python_can_run(tree):
            try:
                compiled = re.compile(_Translator(tree, self.ignore_case).emit(tree))
            except (re.error, OverflowError, RecursionError):
                pass  # a construct Python's re refuses: the engine below runs it
            else:
                return lambda units: compiled.search(units) is not None
        return _Engine(tree, self.ignore_case).search

    def test(self, text: str) -> bool:
        units = utf16(text)
        return self._search(_canonicalize(units) if self.ignore_case else units)

    def __str__(self) -> str:
        return f"/{self.source}/{self.flags}"


def escape_reg_exp(text: str) -> str:
    """lodash `escapeRegExp`."""
    return re.sub(r"[\\^$.*+?()[\]{}|]", r"\\\g<0>", text)


