"""The pieces ``json_schema.py`` builds regexes from: the helpers that join regexes, the
errors, literals, JSON strings and numbers, and integer / number ranges written exactly.

Everything here writes only the subset ``guided_regex`` compiles: literal characters, the
escapes of metacharacters, ``\\xXX``, classes with ranges, groups, ``|`` and greedy
quantifiers; no anchors, lookaround, lazy quantifiers or backreferences. No helper returns a
regex with a top-level ``|``, so that any two concatenate.
"""

import json
import math
import sys

from vllm_runner.sample.regex_parse import MAX_REPEAT

_FLOAT_MAX = int(sys.float_info.max)  # the largest bound taken (a float's)
_META = frozenset(".^$*+?()[]{}|\\")
HEX = "[0-9a-fA-F]"
# One character of a JSON string: a plain one (no quote, backslash or control character, as
# RFC 8259 says) or an escape. NOTE: no \u escape of a surrogate, which would take two
# escapes for one character (and minLength count it twice): a character beyond U+FFFF is
# written as itself.
_BMP = f"(?:[0-9a-cA-CefEF]{HEX}{{3}}|[dD][0-7]{HEX}{{2}})"  # 4 hex digits, no surrogate
CHAR = rf'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u{_BMP})'
STRING = f'"{CHAR}*"'
_NATURAL = "(?:0|[1-9][0-9]*)"
INTEGER = f"-?{_NATURAL}"
_FRACTION = r"(?:\.[0-9]+)?"
NUMBER = rf"{INTEGER}{_FRACTION}(?:[eE][+\-]?[0-9]+)?"


class SchemaError(ValueError):
    """A schema, or a part of one, this compiler does not turn into a regex. The message names
    the keyword, where it is (a JSON pointer into the schema) and the limit."""


def pointer(path: str, key: str) -> str:
    """``path`` (a JSON pointer, ``#`` the root) extended by ``key``, escaped as RFC 6901."""
    return f"{path}/{key.replace('~', '~0').replace('/', '~1')}"


def fail(path: str, keyword: str, reason: str) -> SchemaError:
    return SchemaError(f"{keyword!r} at {pointer(path, keyword)}: {reason}")


def escape(text: str) -> str:
    """``text`` as a regex matching it literally (metacharacters and control characters
    escaped; ``re.escape`` would write escapes such as ``\\#`` outside the subset)."""
    return "".join(
        "\\" + c if c in _META else f"\\x{ord(c):02x}" if ord(c) < 0x20 else c for c in text
    )


def literal(value: object, path: str, keyword: str) -> str:
    """The regex of a JSON value as json.dumps writes it compactly (non-ASCII unescaped)."""
    try:
        return escape(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise fail(path, keyword, f"{value!r} is no JSON value ({e})") from None


def _atom_end(r: str, i: int) -> int:
    """The index just past the atom of ``r`` at ``i``: an escape, a class, a group, or one
    character (inside a group, ``|`` and quantifiers count as one)."""
    if r[i] == "\\":
        return i + {"x": 4, "u": 6}.get(r[i + 1], 2)
    if r[i] in "[(":
        close, i = "]" if r[i] == "[" else ")", i + 1
        while r[i] != close:
            i = i + 2 if r[i] == "\\" else _atom_end(r, i) if close == ")" else i + 1
    return i + 1


def atom(r: str) -> str:
    """``r`` as one atom that a quantifier applies to as a whole."""
    return r if r and _atom_end(r, 0) == len(r) else f"(?:{r})"


def _branches(r: str) -> list[str]:
    """The alternatives of ``r`` if it is one non-capturing group, else ``[r]``."""
    if not r.startswith("(?:") or _atom_end(r, 0) != len(r):
        return [r]
    out, start, i = [], 3, 3
    while i < len(r) - 1:
        if r[i] == "|":
            out.append(r[start:i])
            start = i + 1
        i = i + 1 if r[i] == "|" else _atom_end(r, i)
    out.append(r[start:-1])
    return out


def alt(parts: list[str]) -> str:
    """The alternation of ``parts`` (nested alternations flattened, duplicates once), grouped
    when there are several."""
    unique = list(dict.fromkeys(b for part in parts for b in _branches(part)))
    return unique[0] if len(unique) == 1 else "(?:" + "|".join(unique) + ")"


def repeat(r: str, lo: int, hi: int | None) -> str:
    """``r`` from ``lo`` to ``hi`` times (``None``: no bound)."""
    if not r or hi == 0:
        return ""
    if lo == hi == 1:
        return r
    short = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
    bound = f"{{{lo}}}" if lo == hi else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
    return atom(r) + (short or bound)


def optional(r: str) -> str:
    return repeat(r, 0, 1)


def _count(schema: dict, path: str, keyword: str, default: int | None) -> int | None:
    """A non-negative integer keyword (minLength, maxItems, ...), ``default`` when absent;
    at most MAX_REPEAT, the count a regex repeat takes."""
    value = schema.get(keyword, default)
    if keyword in schema and (type(value) is not int or value < 0):
        raise fail(path, keyword, f"must be a non-negative integer, not {value!r}")
    if keyword in schema and value > MAX_REPEAT:
        raise fail(path, keyword, f"{value} is above {MAX_REPEAT} (the limit)")
    return value


def counts(schema: dict, path: str, low: str, high: str) -> tuple[int, int | None]:
    lo, hi = _count(schema, path, low, 0), _count(schema, path, high, None)
    if hi is not None and lo > hi:
        raise fail(path, high, f"{hi} is below {low} {lo}: no value fits")
    return lo, hi


def _digits(lo: str, hi: str) -> str:
    """The decimal strings from ``lo`` to ``hi``, of one length (leading zeros kept)."""
    if lo == hi:
        return lo
    if lo[0] == hi[0]:
        return lo[0] + _digits(lo[1:], hi[1:])
    n = len(lo) - 1
    low_full, high_full = lo[1:] == "0" * n, hi[1:] == "9" * n
    first, last = int(lo[0]) + (not low_full), int(hi[0]) - (not high_full)
    parts = [] if low_full else [lo[0] + _digits(lo[1:], "9" * n)]
    if first <= last:
        head = str(first) if first == last else f"[{first}-{last}]"
        parts.append(head + repeat("[0-9]", n, n))
    if not high_full:
        parts.append(hi[0] + _digits("0" * n, hi[1:]))
    return alt(parts)


def _naturals(lo: int, hi: int | None) -> str:
    """The integers from ``lo`` to ``hi`` (``None``: no bound), 0 <= lo <= hi, no sign."""
    if lo == 0 and hi is None:
        return _NATURAL
    parts = []
    for n in range(len(str(lo)), len(str(hi if hi is not None else lo)) + 1):
        low, high = max(lo, 10 ** (n - 1) if n > 1 else 0), 10**n - 1
        high = high if hi is None else min(hi, high)
        if low <= high:
            parts.append(_digits(str(low), str(high)))
    if hi is None:  # any more digits than ``lo`` has
        parts.append("[1-9]" + repeat("[0-9]", len(str(lo)), None))
    return alt(parts)


def _signed(lo: int | None, lo_open: bool, hi: int | None, hi_open: bool, magnitudes) -> str:
    """The values from ``lo`` to ``hi`` (``None``: no bound; ``_open``: the bound itself
    excluded) as the non-negative ones, then a minus sign before the magnitudes of the
    negative ones (and of zero, where 0 is in range: -0 is 0). ``magnitudes(a, a_open, b,
    b_open)`` writes those from a to b."""
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_open):
        least, least_open = (lo, lo_open) if lo is not None and lo >= 0 else (0, False)
        parts.append(magnitudes(least, least_open, hi, hi_open))
    if lo is None or lo < 0:
        least, least_open = (-hi, hi_open) if hi is not None and hi <= 0 else (0, False)
        parts.append("-" + magnitudes(least, least_open, None if lo is None else -lo, lo_open))
    return alt(parts)


def _integers(lo: int, lo_open: bool, hi: int | None, hi_open: bool) -> str:
    return _naturals(lo + lo_open, None if hi is None else hi - hi_open)


def _decimals(lo: int, lo_open: bool, hi: int | None, hi_open: bool) -> str:
    """The decimals (no exponent) from ``lo`` to ``hi``: an integer part between them with
    any fraction, ``lo`` itself (when excluded) with a fraction not all zeros, ``hi`` itself
    (when included) with a fraction of zeros."""
    parts = [rf"{lo}\.[0-9]*[1-9][0-9]*"] if lo_open else []
    first = lo + lo_open
    if hi is None or first < hi:
        parts.append(_naturals(first, None if hi is None else hi - 1) + _FRACTION)
    if hi is not None and not hi_open:
        parts.append(rf"{hi}(?:\.0+)?")
    return alt(parts)


def _bounds(schema: dict, path: str, integer: bool) -> tuple[int | None, bool, int | None, bool]:
    """The least and greatest values allowed (``None``: no bound), each with whether it is
    excluded; an integer's as the integers within them (none excluded)."""
    lo = hi = None
    lo_open = hi_open = False
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        if key not in schema:
            continue
        v, exclusive = schema[key], key.startswith("exclusive")
        if type(v) not in (int, float) or (type(v) is float and not math.isfinite(v)):
            raise fail(path, key, f"must be a finite number, not {v!r}")
        if type(v) is int and abs(v) > _FLOAT_MAX:  # (its digits would be written one a call)
            digits = len(str(abs(v)))
            reason = f"must be a finite number within a float's range, not an integer of {digits}"
            raise fail(path, key, f"{reason} digits")
        if not integer and v != int(v):
            raise fail(path, key, f"{v!r}: a number takes only integer bounds")
        b, low = int(v), key.lower().endswith("minimum")
        if integer:  # the nearest integer within the bound, included
            beyond = math.floor(v) + 1 if low else math.ceil(v) - 1
            b, exclusive = beyond if exclusive else (math.ceil(v) if low else math.floor(v)), False
        if low and (lo is None or b > lo or (b == lo and exclusive)):
            lo, lo_open = b, exclusive
        elif not low and (hi is None or b < hi or (b == hi and exclusive)):
            hi, hi_open, high_key = b, exclusive, key
    if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_open or hi_open))):
        span = f"{lo}{' (excluded)' * lo_open} to {hi}{' (excluded)' * hi_open}"
        raise fail(path, high_key, f"no {'integer' if integer else 'number'} is from {span}")
    return lo, lo_open, hi, hi_open


def number_regex(schema: dict, path: str, integer: bool) -> str:
    """An integer or a number; with bounds, exactly the values within them (a bounded number
    has no exponent). ``multipleOf`` only as 1 for integers (what every integer is)."""
    if "multipleOf" in schema and not (integer and schema["multipleOf"] == 1):
        value = schema["multipleOf"]
        raise fail(path, "multipleOf", f"{value!r} is not supported (only 1, of an integer)")
    lo, lo_open, hi, hi_open = _bounds(schema, path, integer)
    if lo is None and hi is None:
        return INTEGER if integer else NUMBER
    return _signed(lo, lo_open, hi, hi_open, _integers if integer else _decimals)
