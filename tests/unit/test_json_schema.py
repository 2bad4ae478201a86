"""json_schema: a schema -> a regex whose whole matches are the documents it allows. For
schemas shaped like real requests, valid documents match in each layout (compact, spaced,
indented); invalid ones do not (a missing required property, a wrong type, an extra
property, a wrong enum value, a string too long, a bad escape, a trailing comma, whitespace
at the ends); integer and number ranges, patterns and dates exactly; the exact regexes of
small schemas; the whitespace bound. (Refusals: test_json_schema_refusals.py; documents at
random and the subset scan: test_json_schema_random.py.)"""

import datetime
import itertools
import json
import re

import pytest
from json_schema_samples import SCHEMAS

from vllm_runner.sample.json_schema import WHITESPACE, schema_to_regex
from vllm_runner.sample.json_schema_parts import CHAR

REGEXES = {name: re.compile(schema_to_regex(schema)) for name, schema in SCHEMAS.items()}


def layouts(value: object) -> list[str]:
    """Compact, json.dumps' default spacing, and indented by 2 (newlines between tokens)."""
    return [
        json.dumps(value, separators=(",", ":"), ensure_ascii=False),
        json.dumps(value, ensure_ascii=False),
        json.dumps(value, indent=2, ensure_ascii=False),
    ]


UUID = "123e4567-e89b-42d3-a456-426614174000"
VALID = {
    "person": [
        {"name": "Ann", "age": 30},
        {"name": 'Zoë "Z" O\'Neil/€😀', "age": 0, "email": "zoe.o+x@mail.example.org"},
        {"name": "\n" * 20, "age": 150},  # 20 characters, each an escape
    ],
    "products": [
        [{"id": UUID, "name": "Dune", "price": 9.5, "category": "book", "in_stock": True}],
        [
            {"id": UUID, "name": "x", "price": 0, "category": "toy", "tags": [], "in_stock": False},
            {
                "id": UUID.upper(),
                "name": "Tea",
                "price": 120,
                "category": "food",
                "tags": ["green", "loose"],
                "size": {"width": 1.5, "height": -2e-3},
                "in_stock": True,
            },
        ],  # fmt: skip
    ],
    "weather_call": [
        {"location": "Paris, France", "unit": "celsius", "days": None},
        {"location": "", "unit": "fahrenheit", "days": 14},
    ],
    "optional_everywhere": [  # every subset of the optional a, b, d around the required c, e
        {
            k: v
            for k, v in {"a": -1, "b": True, "c": "xyz", "d": None, "e": 0}.items()
            if k in "ce" or k in keep
        }
        for n in range(4)
        for keep in itertools.combinations("abd", n)
    ],  # fmt: skip
    "all_optional": [
        {k: 1 for k in keep} for n in range(4) for keep in itertools.combinations("xyz", n)
    ],
    "pydantic_order": [
        {"customer": {"street": "1 Main St", "zip": "02134"}, "status": "paid"},
        {
            "customer": {"street": "", "zip": "99999"},
            "ship_to": None,
            "note": "leave at door",
            "status": "open",
        },
        {
            "customer": {"street": "a", "zip": "00000"},
            "ship_to": {"street": "b", "zip": "12345"},
            "note": None,
            "status": "shipped",
        },
    ],  # fmt: skip
    "event": [
        {
            "id": UUID,
            "at": "2024-02-29T23:59:59.123456Z",
            "day": "2000-02-29",
            "time": "00:00:00+05:30",
            "contact": "a@b.co",
            "code": "ABC-12",
        },
        {
            "id": UUID,
            "at": "1999-12-31T12:00:00-08:00",
            "day": "2023-04-30",
            "time": "10:20:30Z",
            "contact": "first.last_1%x@sub.example-host.com",
            "code": "XYZ-1234",
        },
    ],  # fmt: skip
    "ranges": [
        {
            "percent": 0,
            "delta": -19,
            "year": 1900,
            "below": -5,
            "score": 0,
            "temp": -50,
            "price": 0.01,
        },
        {
            "percent": 100,
            "delta": 999,
            "year": 123456,
            "below": -99999,
            "score": 1.0,
            "temp": 60.0,
            "price": 1,
        },
        {
            "percent": 42,
            "delta": 0,
            "year": 2024,
            "below": -6,
            "score": 0.999,
            "temp": -49.5,
            "price": 12345.678,
        },
    ],  # fmt: skip
    "point": [[1, 2], [1.5, -2, "label"]],
    "row": [["a", 1, 2], ["", -1, 0, 3]],
    "scores": [{}, {"a": 1}, {"a": 1, "b": -2, "a c": 3}],
    "choices": [
        {"kind": "shape", "shape": {"r": 1.5}, "level": 2.5, "text": 'ab"\\y'},
        {"kind": "shape", "shape": [1, -2], "level": None, "text": 'a""\\\\'},
        {"kind": "shape", "shape": {"r": 0}, "level": True, "text": 'a\\"\\"'},
    ],
    "anything": [
        {},
        {"meta": {"a": [1, 2.5]}, "list": [[1], {"x": "y"}, None, "s"]},
        {"meta": "s", "list": []},
    ],
}
INVALID = {
    "person": [
        '{"name":"Ann"}',  # age is required
        '{"name":"Ann","age":"30"}',  # a string, not an integer
        '{"name":"Ann","age":151}',
        '{"name":"Ann","age":-1}',
        '{"name":"Ann","age":1.5}',
        '{"name":"Ann","age":3,"x":1}',  # a property not listed
        '{"name":"' + "a" * 21 + '","age":3}',
        '{"name":"","age":3}',  # minLength 1
        '{"name":"a\\x","age":3}',  # no such escape
        '{"name":"a\\u12g4","age":3}',
        '{"name":"\\ud83d\\ude00","age":3}',  # no surrogate escapes
        '{"name":"a\nb","age":3}',  # a raw control character
        '{"name":"Ann","age":3,}',  # a trailing comma
        '{"age":3,"name":"Ann"}',  # properties come in the schema's order
        '{"name":"Ann","age":3,"email":"nobody"}',
        ' {"name":"Ann","age":3}',  # whitespace at the document's ends
        '{"name":"Ann","age":3}\n',
        '{"name":"Ann",' + " " * 17 + '"age":3}',  # more whitespace than a run holds
    ],
    "products": [
        "[]",
        '[{"id":"' + UUID + '","name":"x","price":1,"category":"car","in_stock":true}]',
        '[{"id":"' + UUID[:-1] + '","name":"x","price":1,"category":"toy","in_stock":true}]',
        '[{"id":"' + UUID + '","name":"x","price":-1,"category":"toy","in_stock":true}]',
        '[{"id":"' + UUID + '","name":"x","price":1e3,"category":"toy","in_stock":true}]',
        '[{"id":"' + UUID + '","name":"x","price":1,"category":"toy","tags":["a","b","c","d"],'
        '"in_stock":true}]',
        '[{"id":"' + UUID + '","name":"x","price":1,"category":"toy","tags":["123456789"],'
        '"in_stock":true}]',
        '[{"id":"' + UUID + '","name":"x","price":1,"category":"toy","size":{"width":1},'
        '"in_stock":true}]',
        '[{"id":"' + UUID + '","name":"x","price":1,"category":"toy","in_stock":1}]',
        "["
        + ",".join(
            ['{"id":"' + UUID + '","name":"x","price":1,"category":"toy","in_stock":true}'] * 4
        )
        + "]",  # fmt: skip
    ],
    "weather_call": [
        '{"location":"Paris","unit":"celsius"}',
        '{"location":"Paris","unit":"kelvin","days":1}',
        '{"location":"Paris","unit":"celsius","days":0}',
        '{"location":"Paris","unit":"celsius","days":15}',
        '{"location":"Paris","unit":"celsius","days":"1"}',
    ],
    "optional_everywhere": [
        '{"a":1,"b":true,"d":null,"e":1}',  # c is required
        '{"c":"x"}',
        '{,"c":"x","e":1}',
        '{"c":"x",,"e":1}',
        '{"c":"x","e":1,}',
        '{"c":"abcd","e":1}',
        '{"c":"x","c":"y","e":1}',
    ],
    "all_optional": ["{,}", '{"x":1,}', '{,"x":1}', '{"x":1,,"z":1}', '{"x":1 "y":1}'],
    "pydantic_order": [
        '{"customer":{"street":"a","zip":"1234"},"status":"paid"}',
        '{"customer":{"street":"a","zip":"12345"},"status":"closed"}',
        '{"customer":{"street":"a"},"status":"paid"}',
        '{"customer":null,"status":"paid"}',
        '{"customer":{"street":"a","zip":"12345"},"note":1,"status":"paid"}',
    ],
    "event": [
        e.replace('"' + good + '"', '"' + bad + '"')
        for e in [json.dumps(VALID["event"][1], separators=(",", ":"))]
        for good, bad in [
            ("2023-04-30", "2023-02-29"),
            ("2023-04-30", "2023-04-31"),
            ("10:20:30Z", "24:00:00Z"),
            ("10:20:30Z", "10:20:30"),
            ("1999-12-31T12:00:00-08:00", "1999-12-31 12:00:00Z"),
            (UUID, UUID.replace("-", "")),
            ("first.last_1%x@sub.example-host.com", "a@localhost"),
            ("XYZ-1234", "XY-12"),
            ("XYZ-1234", "XYZ-12345"),
        ]
    ],  # fmt: skip
    "point": ["[1]", '[1,2,"a",3]', '[1,"a"]', "[1,2,3]", "[,1,2]"],
    "row": ['["a",1]', '["a",1,2,3,4]', "[1,2,3]", '["a","b",1]', '["a",1,2,]'],
    "scores": ['{"a":1,"b":2,"c":3,"d":4}', '{"a":"1"}', '{"a":1,}', "{a:1}"],
    "choices": [
        '{"kind":"shape","shape":{"r":1},"level":3,"text":"ab\\"\\\\y"}',
        '{"kind":"shape","shape":{"r":1},"level":"2.5","text":"ab\\"\\\\y"}',
        '{"kind":"form","shape":{"r":1},"level":1,"text":"ab\\"\\\\y"}',
        '{"kind":"shape","shape":[1],"level":1,"text":"ab\\"\\\\y"}',
        '{"kind":"shape","shape":{"r":1},"level":1,"text":"ab\\"\\\\x"}',
        '{"kind":"shape","shape":{"r":1},"level":1,"text":"ab\\"\\y"}',  # a bare backslash
        '{"kind":"shape","shape":{"r":1},"level":1,"text":"a\\n\\"\\\\y"}',  # '.' is no line end
        '{"kind":"shape","shape":{"r":1},"level":1,"text":"a\u2028\\"\\\\y"}',  # (ECMA's)
        '{"kind":"shape","shape":{"r":1},"level":1.0,"text":"ab\\"\\\\y"}',  # enums as dumped
    ],
    "anything": ['{"meta":[[[1]]]}', '{"list":[[[[]]]]}', '{"list":{}}', '{"meta":{"a":{"b":[]}}}'],
}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in VALID.items() for v in vs])
def test_valid_documents_match_in_each_layout(name: str, value: object) -> None:
    for text in layouts(value):
        assert REGEXES[name].fullmatch(text), text


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, ts in INVALID.items() for t in ts])
def test_invalid_documents_do_not_match(name: str, text: str) -> None:
    assert REGEXES[name].fullmatch(text) is None


@pytest.mark.parametrize(
    ("schema", "lo", "hi"),
    [({"minimum": 0, "maximum": 150}, 0, 150),
     ({"minimum": -1234, "maximum": -7}, -1234, -7),
     ({"exclusiveMinimum": -10.5, "maximum": 99.9}, -10, 99),
     ({"minimum": 95}, 95, None),
     ({"exclusiveMaximum": 3}, None, 2),
     ({"minimum": 1000, "maximum": 12345}, 1000, 12345),
     ({"minimum": 7, "maximum": 7}, 7, 7),
     ({"minimum": -5, "exclusiveMinimum": -3, "maximum": 8, "exclusiveMaximum": 100}, -2, 8)],
)  # fmt: skip
def test_integer_ranges_are_exact(schema: dict, lo: int | None, hi: int | None) -> None:
    regex = re.compile(schema_to_regex({"type": "integer", **schema}))
    for v in [*range(-1300, 13000), 10**6, -(10**6), 10**20, -(10**20)]:
        inside = (lo is None or v >= lo) and (hi is None or v <= hi)
        assert bool(regex.fullmatch(str(v))) == inside, v
    assert regex.fullmatch("01") is None and regex.fullmatch("+1") is None


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [({"minimum": -2, "maximum": 1}, ["1", "1.0", "1.000", "0", "0.25", "-0", "-0.5", "-2.00"],
      ["1.01", "2", "-2.01", "-3", "1e0", ".5", "01", "1.", "-"]),
     ({"exclusiveMinimum": 0, "exclusiveMaximum": 1}, ["0.5", "0.001", "0.999"],
      ["0", "0.0", "0.000", "1", "1.0", "-0.5", "-0"]),
     ({"exclusiveMaximum": 0}, ["-0.5", "-1", "-0.01", "-123.4"], ["", "0", "-0", "-0.0", "0.5"]),
     ({"minimum": 1, "exclusiveMinimum": 1, "exclusiveMaximum": 3, "maximum": 3}, ["1.5", "2.9"],
      ["1", "1.0", "3", "3.0"]),
     ({"exclusiveMinimum": -2, "maximum": 0}, ["-1.99", "-0", "0", "-1", "0.000"],
      ["-2", "-2.0", "0.1", "1"]),
     ({"minimum": 5}, ["5", "5.5", "10", "123456.789"], ["4.999", "-5", "5e1"])],
)  # fmt: skip
def test_bounded_numbers(schema: dict, good: list[str], bad: list[str]) -> None:
    """Integer bounds: a bound itself with a fraction of zeros where it is included, with one
    not all zeros past an excluded lower bound; no exponent; -0 only where negatives are."""
    regex = re.compile(schema_to_regex({"type": "number", **schema}))
    assert [t for t in good if not regex.fullmatch(t)] == []
    assert [t for t in bad if regex.fullmatch(t)] == []


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [("^\\S\\s.$", ["a b", "a\u00a0!", 'é "'], ["  b", "\u00a0 b", "a\u2028\u2028", "a b\u2028"]),
     ("[^a-c]\\d\\D\\w\\W", ["d1x_!", '"2"_ ', "\\3\\a-"], ["a1x_!", "d٣x_!", "d1xé!", "d11_!"]),
     ("a\\$", ["a$"], ["a", "a$$"]),  # an escaped '$', no anchor
     ("^a\\\\$", ["a\\"], ["a", "a\\$"]),  # an escaped '\', then the anchor
     ("(ab|c)+[\\]\\-]?", ["ab", "cabc]", "c-"], ["", "abab]]", "b"])],
)  # fmt: skip
def test_patterns_match_the_decoded_string_as_a_whole(
    pattern: str, good: list[str], bad: list[str]
) -> None:
    """ECMA-262's classes (\\s with the Unicode spaces, '.' without the line ends), a '"' and
    a '\\' written as their escapes, an escaped '$' kept."""
    regex = re.compile(schema_to_regex({"type": "string", "pattern": pattern}))
    assert [t for t in good if not regex.fullmatch(json.dumps(t, ensure_ascii=False))] == []
    assert [t for t in bad if regex.fullmatch(json.dumps(t, ensure_ascii=False))] == []


def test_dates_are_exactly_the_calendars() -> None:
    """Each month's days, February 29 in leap years (every 4th, not every 100th, every
    400th), years 0001-9999 (what Python's datetime, which validators use, takes)."""
    regex = re.compile(schema_to_regex({"type": "string", "format": "date"}))
    for year in (0, 1, 4, 100, 400, 1900, 1999, 2000, 2023, 2024, 2100, 9996, 9999):
        for month, day in itertools.product(range(14), range(33)):
            try:
                valid = datetime.date(year, month, day) is not None
            except ValueError:
                valid = False
            assert bool(regex.fullmatch(f'"{year:04}-{month:02}-{day:02}"')) == valid


def test_exact_regexes_of_small_schemas() -> None:
    assert schema_to_regex({"type": "integer", "minimum": 0, "maximum": 150}) == (
        "(?:[0-9]|[1-9][0-9]|1(?:[0-4][0-9]|50))"
    )
    assert schema_to_regex({"type": ["boolean", "null"]}) == "(?:true|false|null)"
    assert schema_to_regex({"type": "string", "maxLength": 2}) == f'"{CHAR}{{0,2}}"'
    typed = {"type": ["string", "null"], "enum": ["a", 1, None, True], "nullable": True}
    assert schema_to_regex(typed) == '(?:"a"|null)'  # values of the type only
    assert schema_to_regex({"enum": ["a.b", {"k": [1, None]}, 2]}) == (
        r'(?:"a\.b"|\{"k":\[1,null\]\}|2)'
    )
    two = {"properties": {"a": {"const": 1}, "b": {"const": 2}}, "required": ["b"]}
    assert schema_to_regex(two, whitespace="") == r'\{(?:"a":1,"b":2|"b":2)\}'
    assert schema_to_regex(two) == (
        rf'\{{{WHITESPACE}(?:"a"{WHITESPACE}:{WHITESPACE}1{WHITESPACE},{WHITESPACE}'
        rf'"b"{WHITESPACE}:{WHITESPACE}2{WHITESPACE}|"b"{WHITESPACE}:{WHITESPACE}2{WHITESPACE})\}}'
    )
    assert WHITESPACE == r"[ \t\n\r]{0,16}"


def test_a_whitespace_run_is_16_bytes_at_most_and_custom_whitespace() -> None:
    regex = re.compile(schema_to_regex(SCHEMAS["person"]))
    assert regex.fullmatch('{"name":"A",\n' + " " * 15 + '"age":1}')
    assert not regex.fullmatch('{"name":"A",\n' + " " * 16 + '"age":1}')
    compact = re.compile(schema_to_regex(SCHEMAS["person"], whitespace=""))
    assert compact.fullmatch('{"name":"A","age":1}')
    assert not compact.fullmatch('{"name":"A", "age":1}')
    either = re.compile(schema_to_regex(SCHEMAS["person"], whitespace=" ?|\n"))  # grouped
    assert either.fullmatch('{"name":"A",\n"age":1 }')
    assert not either.fullmatch('{"name":"A",  "age":1}')
