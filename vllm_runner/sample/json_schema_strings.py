"""JSON strings for ``json_schema.py``: lengths, ``format``s, and ``pattern``s turned into
the JSON text of the strings they match.

The regex of a string matches its JSON text (quotes and escapes included), not its decoded
value, so a pattern is rewritten set by set: a character JSON writes plain stays itself,
'"' and '\\' become their escapes, and control characters (which JSON holds only as escapes)
are left out, a narrowing. The output stays in ``guided_regex``'s subset (see
``json_schema_parts.py``); a pattern outside it is refused, never approximated.
"""

import re

from vllm_runner.sample.json_schema_parts import CHAR, HEX, atom, counts, escape, fail, repeat

# Formats: RFC 3339 dates (years 0001-9999, as Python's datetime, which validators use, has
# them; February 29 in leap years only) and times (no leap second; an upper-case T and Z),
# RFC 4122's text form of a UUID, and a simple email address (dot-separated atoms of
# letters, digits and _%+- before the @, two or more labels after it).
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_DAY = "(?:0[1-9]|1[0-9]|2[0-8])"  # of any month; then 29, 30, 31
_MONTH_DAY = f"(?:(?:0[1-9]|1[0-2])-{_DAY}|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = f"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP}-02-29)"
_HOUR, _MINUTE = "(?:[01][0-9]|2[0-3])", "[0-5][0-9]"
_TIME = rf"{_HOUR}:{_MINUTE}:{_MINUTE}(?:\.[0-9]+)?(?:Z|[+\-]{_HOUR}:{_MINUTE})"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?"
_ATOM = r"[a-zA-Z0-9_%+\-]+"
FORMATS = {
    "date-time": f"{_DATE}T{_TIME}",
    "date": _DATE,
    "time": _TIME,
    "uuid": "-".join(f"{HEX}{{{n}}}" for n in (8, 4, 4, 4, 12)),
    "email": rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+",
}


def string_regex(schema: dict, path: str) -> str:
    """A string: any, of ``minLength``..``maxLength`` characters (an escape counts as one), a
    ``format``, or a ``pattern`` (one of these three: a regex cannot intersect them)."""
    lo, hi = counts(schema, path, "minLength", "maxLength")
    shapes = [k for k in ("pattern", "format") if k in schema]
    lengths = [k for k in ("minLength", "maxLength") if k in schema]
    if shapes and (lengths or len(shapes) == 2):
        other = shapes[1] if len(shapes) == 2 else lengths[0]
        raise fail(path, other, f"together with {shapes[0]!r} is not supported")
    if "format" in schema:
        name = schema["format"]
        if name not in FORMATS:
            raise fail(path, "format", f"{name!r} is not supported (only {', '.join(FORMATS)})")
        return f'"{FORMATS[name]}"'
    if "pattern" in schema:
        return f'"{pattern_regex(schema["pattern"], path)}"'
    return f'"{repeat(CHAR, lo, hi)}"'


# What a JSON string holds only as an escape: control characters, '"' and '\'.
_MUST_ESCAPE = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
_QUOTE_ESCAPES = {0x22: r'\\"', 0x5C: r"\\\\"}  # '"' and '\' as their JSON escapes
# \d \w \s and their capitals (the sets they leave out) as ECMA-262, JSON Schema's dialect,
# has them: \d and \w ASCII, \s also the Unicode spaces; '.' is all but the line ends.
_DIGITS = [(0x30, 0x39)]
_WORD = [*_DIGITS, (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACES = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
           (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
           (0xFEFF, 0xFEFF)]  # fmt: skip
_SETS = {"d": _DIGITS, "w": _WORD, "s": _SPACES}
_NEGATED = {"D": _DIGITS, "W": _WORD, "S": _SPACES}
_LINE_ENDS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]
_CLASS_META = frozenset("\\]^-[")
_HEXES = {"u": 6, "x": 4}  # an escape's length with its hex digits
_CONTROLS = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}
_QUANTIFIER = re.compile(r"[*+?]|\{([0-9]+)(,([0-9]*))?\}")


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _without(ranges: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` less the code points of ``cuts`` (sorted, disjoint)."""
    out = []
    for lo, hi in ranges:
        for cut_lo, cut_hi in cuts:
            if cut_lo <= hi and cut_hi >= lo:
                if cut_lo > lo:
                    out.append((lo, cut_lo - 1))
                lo = max(lo, cut_hi + 1)
        if lo <= hi:
            out.append((lo, hi))
    return out


def _class_char(code: int) -> str:
    c = chr(code)
    if c in _CLASS_META:
        return "\\" + c
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if 0x7F < code <= 0xFFFF else c


def _class(negated: bool, ranges: list[tuple[int, int]]) -> str:
    body = "".join(
        _class_char(lo) + ("" if lo == hi else "-" + _class_char(hi)) for lo, hi in _merged(ranges)
    )
    return f"[{'^' if negated else ''}{body}]"


def _encoded(negated: bool, ranges: list[tuple[int, int]]) -> str:
    """The JSON text of one character of a set (``negated``: all but ``ranges``): plain where
    JSON allows, '"' and '\\' as their escapes, control characters never (their escapes would
    need the set's every member spelled out; leaving them out only narrows)."""
    has = {code: negated != any(lo <= code <= hi for lo, hi in ranges) for code in _QUOTE_ESCAPES}
    plain = _without(_merged(ranges), _MUST_ESCAPE)
    if negated:
        alts = [_class(True, ranges + _MUST_ESCAPE)]
    elif _single(plain):
        alts = [escape(chr(plain[0][0]))]
    else:
        alts = [_class(False, plain)] if plain else []
    alts += [esc for code, esc in _QUOTE_ESCAPES.items() if has[code]]
    if not alts:
        raise ValueError("a part matches only control characters, which JSON escapes")
    return atom("|".join(alts))


def _escaped_set(text: str, i: int) -> tuple[bool, list, int]:
    """The set of the escape at ``text[i]`` (a backslash): (negated, ranges, index past it)."""
    e = text[i + 1 : i + 2]
    if e in _SETS or e in _NEGATED:
        return e in _NEGATED, _SETS.get(e) or _NEGATED[e], i + 2
    if e in _CONTROLS:
        code = _CONTROLS[e]
    elif e in _HEXES and re.fullmatch(f"{HEX}{{{_HEXES[e] - 2}}}", text[i + 2 : i + _HEXES[e]]):
        code = int(text[i + 2 : i + _HEXES[e]], 16)
    elif e and not e.isalnum() and e.isascii():  # an escaped punctuation character
        code = ord(e)
    else:
        raise ValueError(f"the escape {text[i : i + 2]!r} is not supported")
    return False, [(code, code)], i + _HEXES.get(e, 2)


def _char_class(text: str, i: int) -> tuple[bool, list, int]:
    """The class ``[...]`` at ``text[i]``: (negated, ranges, index past it)."""
    negated = text.startswith("^", i + 1)
    i += 1 + negated
    ranges: list[tuple[int, int]] = []
    start = i
    while i == start or text[i : i + 1] != "]":  # a ']' first is a member, as in Python
        if i >= len(text):
            raise ValueError("a '[' has no ']'")
        item_negated, item, i = _class_item(text, i)
        if item_negated:
            raise ValueError("a negated escape (\\D, \\W, \\S) inside a class is not supported")
        if _single(item) and text[i : i + 1] == "-" and text[i + 1 : i + 2] not in ("]", ""):
            _, end, i = _class_item(text, i + 1)
            if not _single(end) or end[0][0] < item[0][0]:
                raise ValueError("a class range is not from a character to a later one")
            item = [(item[0][0], end[0][0])]
        ranges += item
    return negated, ranges, i + 1


def _single(ranges: list[tuple[int, int]]) -> bool:
    return len(ranges) == 1 and ranges[0][0] == ranges[0][1]


def _class_item(text: str, i: int) -> tuple[bool, list, int]:
    if text[i] == "\\":
        return _escaped_set(text, i)
    return False, [(ord(text[i]), ord(text[i]))], i + 1


def pattern_regex(pattern: object, path: str) -> str:
    """The JSON text of the strings that ``pattern`` matches as a whole (JSON Schema searches
    for a match anywhere, which a whole match implies: a narrowing). ``^`` / ``$`` at its ends
    are dropped; each character set becomes its JSON text (``_encoded``). SchemaError for
    anything outside the subset: lookaround, lazy quantifiers, backreferences, anchors
    elsewhere, a ``{`` that is no quantifier."""
    if not isinstance(pattern, str):
        raise fail(path, "pattern", f"must be a string, not {pattern!r}")
    text = pattern[pattern.startswith("^") :]
    if re.search(r"(?<!\\)(\\\\)*\$\Z", text):  # an unescaped '$' at the end
        text = text[:-1]
    try:
        regex = _translate(text)
        re.compile(regex)
    except (ValueError, re.error) as e:
        raise fail(path, "pattern", f"{pattern!r}: {e}") from None
    return atom(regex) if regex else ""


def _translate(text: str) -> str:
    out, i, repeatable = [], 0, False
    while i < len(text):
        c = text[i]
        if c in "*+?{":
            quantifier = _QUANTIFIER.match(text, i)
            if quantifier is None or not repeatable:
                raise ValueError(f"the {c!r} at {i} repeats nothing")
            i = quantifier.end()
            if text[i : i + 1] in ("?", "+"):
                raise ValueError("lazy and possessive quantifiers are not supported")
            out.append(quantifier.group())
            repeatable = False
            continue
        if c == "(" and text.startswith("(?", i) and not text.startswith("(?:", i):
            construct = text[i : i + 3]  # lookaround, a named group, flags
            raise ValueError(f"{construct!r} is not supported")
        if c in "()|":
            step = 3 if text.startswith("(?:", i) else 1
            out.append(text[i : i + step])
            i, repeatable = i + step, c == ")"
            continue
        if c in "^$":
            raise ValueError(f"{c!r} is supported only at its ends")
        if c == "[":
            negated, ranges, i = _char_class(text, i)
        elif c == "\\":
            negated, ranges, i = _escaped_set(text, i)
        else:
            negated, ranges, i = c == ".", _LINE_ENDS if c == "." else [(ord(c), ord(c))], i + 1
        out.append(_encoded(negated, ranges))
        repeatable = True
    return "".join(out)
