"""json_schema at random, against a small checker of JSON Schema's own semantics (no
jsonschema dependency): documents generated from each sample schema match its regex in each
layout; strings sampled from the regex itself (walking Python's parse of it) are JSON that
the checker accepts; a mutated document that still matches is still valid. And the scan
that keeps every regex within guided_regex's subset."""

import datetime
import functools
import json
import random
import re
import uuid
from re import _constants as C  # Python's regex parser (3.11+): the sampler walks its tree
from re import _parser

import pytest
from json_schema_samples import SCHEMAS

from vllm_runner.sample.json_schema import ANY_DEPTH, schema_to_regex

REGEXES = {name: schema_to_regex(schema) for name, schema in SCHEMAS.items()}
# Characters the sampler picks from: ASCII (control characters too), a Unicode space, a line
# separator, Latin, a currency sign, a character beyond U+FFFF.
POOL = [chr(c) for c in range(0x80)] + list("\u00a0\u2028éß€😀")
PATTERN_POOL = [c for c in POOL if c >= " " and c != "\u2028"]
TEXT = list('abc xyz"\\/\n\té€😀\u2028')  # a generated string's characters


def resolve(ref: str, root: dict) -> object:
    target = root
    for part in ref[2:].split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return target


def is_type(v: object, name: str) -> bool:
    if name in ("integer", "number"):
        return type(v) in (int, float) and (name == "number" or float(v).is_integer())
    kinds = {"string": str, "boolean": bool, "null": type(None), "array": list, "object": dict}
    return type(v) is kinds[name]


def same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def time_ok(s: str) -> bool:
    m = re.fullmatch(r"(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-](\d\d):(\d\d))", s, re.ASCII)
    offset_ok = m is not None and (m[5] == "Z" or (int(m[6]) < 24 and int(m[7]) < 60))
    return offset_ok and int(m[1]) < 24 and int(m[2]) < 60 and int(m[3]) < 60


def date_ok(s: str) -> bool:
    try:
        return len(s) == 10 and datetime.date.fromisoformat(s) is not None
    except ValueError:
        return False


FORMAT_OK = {
    "date": date_ok,
    "time": time_ok,
    "date-time": lambda s: "T" in s and date_ok(s.split("T")[0]) and time_ok(s.split("T")[1]),
    "uuid": lambda s: (
        re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", s.lower()) is not None
        and str(uuid.UUID(s)) == s.lower()
    ),
    "email": lambda s: re.fullmatch(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+", s) is not None,
}


def check(v: object, s: object, root: dict) -> bool:
    """Whether ``v`` is valid against ``s`` by JSON Schema (draft 2020-12) for the keywords
    the compiler takes; patterns by Python's re, standing in for ECMA-262 (they agree on the
    POOL's characters)."""
    if isinstance(s, bool):
        return s
    if "$ref" in s and not check(v, resolve(s["$ref"], root), root):
        return False
    if s.get("nullable") and v is None:
        return True
    tests = [
        "type" not in s
        or any(is_type(v, t) for t in ([s["type"]] if isinstance(s["type"], str) else s["type"])),
        "enum" not in s or any(same(v, e) for e in s["enum"]),
        "const" not in s or same(v, s["const"]),
        "anyOf" not in s or any(check(v, x, root) for x in s["anyOf"]),
        "oneOf" not in s or sum(check(v, x, root) for x in s["oneOf"]) == 1,
        "allOf" not in s or all(check(v, x, root) for x in s["allOf"]),
    ]
    if isinstance(v, dict):
        props, extra = s.get("properties", {}), s.get("additionalProperties", True)
        tests += [
            all(k in v for k in s.get("required", [])),
            all(check(x, props.get(k, extra), root) for k, x in v.items()),
            s.get("minProperties", 0) <= len(v) <= s.get("maxProperties", len(v)),
        ]
    if isinstance(v, list):
        prefix, items = s.get("prefixItems", []), s.get("items", True)
        tests += [
            all(check(x, prefix[i] if i < len(prefix) else items, root) for i, x in enumerate(v)),
            s.get("minItems", 0) <= len(v) <= s.get("maxItems", len(v)),
        ]
    if isinstance(v, str):
        tests += [
            s.get("minLength", 0) <= len(v) <= s.get("maxLength", len(v)),
            "pattern" not in s or re.search(s["pattern"], v) is not None,
            "format" not in s or FORMAT_OK[s["format"]](v),
        ]
    if type(v) in (int, float):
        tests += [
            v >= s.get("minimum", v),
            v <= s.get("maximum", v),
            "exclusiveMinimum" not in s or v > s["exclusiveMinimum"],
            "exclusiveMaximum" not in s or v < s["exclusiveMaximum"],
        ]
    return all(tests)


def any_value(rng: random.Random, depth: int) -> object:
    kinds = ["s", "n", "b", "z"] + ["a", "o"] * (depth > 0)
    kind = rng.choice(kinds)
    if kind in "ao":
        values = [any_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
        return (
            values if kind == "a" else {rng.choice(TEXT) + str(i): x for i, x in enumerate(values)}
        )
    return {
        "s": "".join(rng.choices(TEXT, k=3)),
        "n": rng.choice([0, -7, 2.5, 1e-3, 12345678]),
        "b": rng.random() < 0.5,
        "z": None,
    }[kind]


def generated_string(s: dict, rng: random.Random) -> str:
    fmt = s.get("format")
    if fmt == "date":
        return datetime.date.fromordinal(rng.randint(1, 3652059)).isoformat()
    if fmt == "time":
        hms = ":".join(f"{rng.randrange(n):02}" for n in (24, 60, 60))
        return hms + rng.choice(["", ".5", ".123456789"]) + rng.choice(["Z", "+05:30", "-23:59"])
    if fmt == "date-time":
        return (
            generated_string({"format": "date"}, rng)
            + "T"
            + generated_string({"format": "time"}, rng)
        )
    if fmt == "uuid":
        text = str(uuid.UUID(int=rng.getrandbits(128)))
        return text.upper() if rng.random() < 0.3 else text
    if fmt == "email":
        return (
            rng.choice(["a", "first.last", "x+y_1%z"]) + "@" + rng.choice(["ex.com", "a-b.c.org"])
        )
    if "pattern" in s:  # no control characters (left out of patterns) or ECMA's line ends
        return sample(s["pattern"].strip("^$"), rng, PATTERN_POOL)
    lo = s.get("minLength", 0)
    return "".join(rng.choices(TEXT, k=rng.randint(lo, min(s.get("maxLength", lo + 6), lo + 6))))


# Keywords that say what a value is; without one, a schema leaves the value open.
SHAPING = ("type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "properties", "items")


def generate(s: object, rng: random.Random, root: dict) -> object:
    """A valid value of ``s`` as the compiler allows it (properties in the schema's order)."""
    if s is True or not any(k in s for k in SHAPING):
        return any_value(rng, ANY_DEPTH)
    if "$ref" in s:
        return generate(resolve(s["$ref"], root), rng, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            return generate(rng.choice(s[key]), rng, root)
    if "enum" in s or "const" in s:
        values = s["enum"] if "enum" in s else [s["const"]]
        types = s.get("type", ["string", "number", "boolean", "null", "array", "object"])
        return rng.choice([v for v in values if check(v, {"type": types}, root)])
    kind = s["type"] if isinstance(s["type"], str) else rng.choice(s["type"])
    if kind == "object" and "properties" in s:
        return {
            k: generate(x, rng, root)
            for k, x in s["properties"].items()
            if k in s.get("required", []) or rng.random() < 0.5
        }
    if kind == "object":
        n = rng.randint(0, s.get("maxProperties", 3))
        return {f"k{i}": generate(s.get("additionalProperties", True), rng, root) for i in range(n)}
    if kind == "array":
        prefix, items = s.get("prefixItems", []), s.get("items", True)
        most = len(prefix) if items is False else s.get("maxItems", len(prefix) + 3)
        n = rng.randint(s.get("minItems", 0), min(most, s.get("minItems", 0) + 3))
        return [generate(prefix[i] if i < len(prefix) else items, rng, root) for i in range(n)]
    if kind in ("integer", "number"):
        lo = s.get("minimum", s.get("exclusiveMinimum", -1001) + 1)
        hi = s.get("maximum", s.get("exclusiveMaximum", max(lo, 0) + 1001) - 1)
        if kind == "integer" or rng.random() < 0.3:
            return rng.randint(lo, hi)
        return rng.choice([lo, hi, round(rng.uniform(lo, hi), 3)])
    if kind == "string":
        return generated_string(s, rng)
    return rng.random() < 0.5 if kind == "boolean" else None


def layouts(value: object) -> list[str]:
    return [
        json.dumps(value, separators=(",", ":"), ensure_ascii=False),
        json.dumps(value, ensure_ascii=False),
        json.dumps(value, indent=2, ensure_ascii=False),
    ]


@functools.cache
def parsed(regex: str) -> list:
    return list(_parser.parse(regex))


def sample(regex: str, rng: random.Random, pool: list[str] = POOL) -> str:
    """A random string that ``regex`` matches, from Python's parse of it."""
    out: list[str] = []
    emit(parsed(regex), rng, out, pool)
    return "".join(out)


CATEGORIES = {
    C.CATEGORY_DIGIT: lambda c: c in "0123456789",
    C.CATEGORY_WORD: lambda c: c.isascii() and (c.isalnum() or c == "_"),
}


def in_class(items: list, c: str) -> bool:
    negated = items[0][0] is C.NEGATE
    hit = any(
        (op is C.LITERAL and ord(c) == av)
        or (op is C.RANGE and av[0] <= ord(c) <= av[1])
        or (op is C.CATEGORY and CATEGORIES[av](c))
        for op, av in items
    )
    return hit != negated


MEMBERS: dict[tuple, list[str]] = {}  # (a class of a cached parse, a pool) -> its members


def members(op: object, av: object, pool: list[str]) -> list[str]:
    """The characters of ``pool`` that a class (or one character but ``av``, or any but a
    newline) matches."""
    key = (id(av) if op is C.IN else (op, av), id(pool))
    if key not in MEMBERS:
        cls = (
            av if op is C.IN else [(C.NEGATE, None), (C.LITERAL, av if op is C.NOT_LITERAL else 10)]
        )
        MEMBERS[key] = [c for c in pool if in_class(cls, c)]
    return MEMBERS[key]


def emit(items: list, rng: random.Random, out: list[str], pool: list[str]) -> None:
    for op, av in items:
        if op is C.LITERAL:
            out.append(chr(av))
        elif op in (C.IN, C.NOT_LITERAL, C.ANY):
            out.append(rng.choice(members(op, av, pool)))
        elif op is C.BRANCH:
            emit(rng.choice(av[1]), rng, out, pool)
        elif op is C.SUBPATTERN:
            emit(av[3], rng, out, pool)
        elif op is C.MAX_REPEAT:
            lo, hi, sub = av
            for _ in range(rng.randint(lo, min(hi, lo + rng.choice([0, 1, 3])))):
                emit(sub, rng, out, pool)
        else:
            raise AssertionError(f"the sampler has no case for {op}")


@pytest.mark.parametrize("name", SCHEMAS)
def test_generated_documents_match_in_each_layout(name: str) -> None:
    rng, regex, schema = random.Random(name), re.compile(REGEXES[name]), SCHEMAS[name]
    for _ in range(60):
        value = generate(schema, rng, schema)
        assert check(value, schema, schema), value  # (the generator's own check)
        for text in layouts(value):
            assert regex.fullmatch(text), text


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_match_is_a_valid_document(name: str) -> None:
    rng, regex, schema = random.Random(name), re.compile(REGEXES[name]), SCHEMAS[name]
    for _ in range(1000):
        text = sample(REGEXES[name], rng)
        assert regex.fullmatch(text), text  # (the sampler's own check)
        assert check(json.loads(text), schema, schema), text


def mutate(value: object, rng: random.Random) -> object:
    """``value`` with one random change somewhere: a key dropped or added, an item added or
    dropped, a leaf replaced by another value."""
    if isinstance(value, dict) and value and rng.random() < 0.6:
        key = rng.choice(list(value))
        if rng.random() < 0.3:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: mutate(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.6:
        i = rng.randrange(len(value))
        return value[:i] + [mutate(value[i], rng)] + value[i + 1 :]
    if isinstance(value, dict | list) and rng.random() < 0.5:
        extra = any_value(rng, 0)
        return {**value, "zz": extra} if isinstance(value, dict) else [*value, extra]
    return rng.choice([None, True, 0, -1, 151, 1.5, 1e9, "", "x" * 30, "open", [], {}, [1, 2]])


@pytest.mark.parametrize("name", SCHEMAS)
def test_mutated_documents_match_only_when_still_valid(name: str) -> None:
    rng, regex, schema = random.Random(name), re.compile(REGEXES[name]), SCHEMAS[name]
    refused = 0
    for _ in range(300):
        value = mutate(generate(schema, rng, schema), rng)
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if regex.fullmatch(text):
            assert check(value, schema, schema), text
        refused += not check(value, schema, schema)
    assert refused > 0  # the mutations do break documents


ALLOWED_ESCAPES = set('.\\[](){}|*+?^$-/"ntrfvdDwWsS')


def outside_subset(regex: str) -> str | None:
    """The first construct of ``regex`` outside guided_regex's subset, or None: lookaround,
    named groups, flags, lazy quantifiers, anchors, backreferences, other escapes."""
    i, in_class = 0, False
    while i < len(regex):
        c, nxt = regex[i], regex[i + 1 : i + 2]
        if c == "\\":
            size = {"x": 4, "u": 6}.get(nxt, 2)
            if nxt not in ALLOWED_ESCAPES and not re.fullmatch(
                "[xu][0-9a-fA-F]+", regex[i + 1 : i + size]
            ):
                return regex[i : i + 2]
            i += size
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class, i = True, i + 1 + (nxt == "^")
            continue
        elif c == "(" and nxt == "?" and regex[i + 2 : i + 3] != ":":
            return regex[i : i + 3]
        elif c in "*+?}" and nxt == "?" and not (c == "?" and regex[i - 1 : i] == "("):
            return c + nxt
        elif c in "^$":
            return c
        i += 1
    return None


def test_every_regex_stays_in_the_subset() -> None:
    extra = [schema_to_regex(s) for s in ({}, {"type": "string", "pattern": "^[^\\s]\\S.\\w$"})]
    for regex in [*REGEXES.values(), *extra]:
        assert outside_subset(regex) is None
    bad = {"a(?=b)": "(?=", "(?!a)": "(?!", "(?<=a)b": "(?<", "(?P<n>a)": "(?P", "(?i)a": "(?i",
           "a*?": "*?", "a+?": "+?", "a??": "??", "a{2}?": "}?", "\\ba": "\\b", "^a": "^",
           "a$": "$", "(a)\\1": "\\1", "\\Aa": "\\A"}  # fmt: skip
    assert {r: outside_subset(r) for r in bad} == bad
    assert outside_subset('[\\^$(?=]\\x1f\\u00e9(?:a)?\\"') is None  # in a class they are chars
