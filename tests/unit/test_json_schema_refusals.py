"""json_schema's refusals: what it cannot enforce (unknown keywords, recursion, keywords
beside a $ref / anyOf / enum, bounds it cannot write, patterns outside the subset) is a
SchemaError whose message names the keyword, its JSON pointer in the schema and the limit,
so that no part of a schema is silently not enforced."""

import pytest

from vllm_runner.sample.json_schema import SchemaError, schema_to_regex

NODE = {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}
A_B = {"A": {"$ref": "#/$defs/B"}, "B": {"type": "array", "items": {"$ref": "#/$defs/A"}}}
NO_SIBLINGS = "(move it into the schemas it names)"
# (schema, the pointer of the refused keyword, the reason)
REFUSED = [
    ({"type": "strin"}, "#/type", "'strin' is not a type name or a non-empty list of them"),
    ({"type": "string", "minimum": 1}, "#/minimum", "does not apply to type 'string'"),
    ({"properties": {"a/b~c": {"foo": 1}}}, "#/properties/a~1b~0c/foo",
     "is not a supported keyword (it would not be enforced)"),
    ({"items": {"uniqueItems": True}}, "#/items/uniqueItems",
     "is supported only as false (a regex cannot compare items)"),
    ({"items": [{}]}, "#/items",
     "as a list (a tuple, before 2020-12) is not supported: use 'prefixItems'"),
    ({"minItems": 3, "maxItems": 2}, "#/maxItems", "2 is below minItems 3: no value fits"),
    ({"prefixItems": [{}], "items": False, "minItems": 2}, "#/minItems",
     "2 is more than the 1 items allowed ('items' is false)"),
    ({"maxLength": 1.5}, "#/maxLength", "must be a non-negative integer, not 1.5"),
    ({"format": "hostname"}, "#/format",
     "'hostname' is not supported (only date-time, date, time, uuid, email)"),
    ({"format": "date", "maxLength": 10}, "#/maxLength", "together with 'format' is not supported"),
    ({"pattern": "a", "format": "date"}, "#/format", "together with 'pattern' is not supported"),
    ({"pattern": "(?=a)b"}, "#/pattern", "'(?=a)b': '(?=' is not supported"),
    ({"pattern": "(?P<x>a)"}, "#/pattern", "'(?P<x>a)': '(?P' is not supported"),
    ({"pattern": "a*?"}, "#/pattern", "'a*?': lazy and possessive quantifiers are not supported"),
    ({"pattern": "a\\bc"}, "#/pattern", "'a\\\\bc': the escape '\\\\b' is not supported"),
    ({"pattern": "(a)\\1"}, "#/pattern", "'(a)\\\\1': the escape '\\\\1' is not supported"),
    ({"pattern": "a^b"}, "#/pattern", "'a^b': '^' is supported only at its ends"),
    ({"pattern": "a{x"}, "#/pattern", "'a{x': the '{' at 1 repeats nothing"),
    ({"pattern": "*a"}, "#/pattern", "'*a': the '*' at 0 repeats nothing"),
    ({"pattern": "[a"}, "#/pattern", "'[a': a '[' has no ']'"),
    ({"pattern": "(a"}, "#/pattern", "'(a': missing ), unterminated subpattern at position 0"),
    ({"pattern": "a\\n"}, "#/pattern",
     "'a\\\\n': a part matches only control characters, which JSON escapes"),
    ({"pattern": "[\\Da]"}, "#/pattern",
     "'[\\\\Da]': a negated escape (\\D, \\W, \\S) inside a class is not supported"),
    ({"pattern": "[z-a]"}, "#/pattern",
     "'[z-a]': a class range is not from a character to a later one"),
    ({"pattern": 5}, "#/pattern", "must be a string, not 5"),
    ({"type": "number", "minimum": 0.5}, "#/minimum", "0.5: a number takes only integer bounds"),
    ({"type": "number", "minimum": 1, "exclusiveMaximum": 1}, "#/exclusiveMaximum",
     "no number is from 1 to 1 (excluded)"),
    ({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 5}, "#/exclusiveMaximum",
     "no integer is from 5 to 4"),
    ({"type": "integer", "multipleOf": 5}, "#/multipleOf",
     "5 is not supported (only 1, of an integer)"),
    ({"type": "integer", "minimum": "0"}, "#/minimum", "must be a finite number, not '0'"),
    ({"properties": {"a": {}}, "additionalProperties": True}, "#/additionalProperties",
     "is supported only as false beside 'properties' (absent means false here)"),
    ({"properties": {"a": {}}, "required": ["b"]}, "#/required",
     "names 'b', which is not in 'properties'"),
    ({"properties": {"a": {}}, "minProperties": 1}, "#/minProperties",
     "1 is more than the 0 required properties (only a count every object meets)"),
    ({"properties": {"a": {}, "b": {}}, "maxProperties": 1}, "#/maxProperties",
     "1 is less than the 2 properties (only a count every object meets)"),
    ({"additionalProperties": {"type": "integer"}, "required": ["a"]}, "#/required",
     "is not supported without 'properties' (a regex cannot tell keys apart)"),
    ({"$defs": {"Node": NODE}, "$ref": "#/$defs/Node"}, "#/$defs/Node/properties/next/$ref",
     "'#/$defs/Node' recurses (#/$defs/Node -> #/$defs/Node): a regex cannot nest without bound"),
    ({"$defs": A_B, "$ref": "#/$defs/A"}, "#/$defs/B/items/$ref", "'#/$defs/A' recurses "
     "(#/$defs/A -> #/$defs/B -> #/$defs/A): a regex cannot nest without bound"),
    ({"$ref": "#/$defs/Missing"}, "#/$ref", "'#/$defs/Missing' names no schema"),
    ({"$ref": "https://x.org/s.json"}, "#/$ref",
     "'https://x.org/s.json': only '#/$defs/...' and '#/definitions/...'"),
    ({"$ref": "#/$defs/A", "type": "object", "$defs": {"A": {}}}, "#/type",
     f"beside '$ref' is not supported {NO_SIBLINGS}"),
    ({"anyOf": [{}], "maxLength": 3}, "#/maxLength",
     f"beside 'anyOf' is not supported {NO_SIBLINGS}"),
    ({"anyOf": []}, "#/anyOf", "must be a non-empty list of schemas, not []"),
    ({"allOf": [{}, {}]}, "#/allOf",
     "has 2 schemas: only one is supported (a regex cannot intersect schemas)"),
    ({"oneOf": [{}, {"x": 1}]}, "#/oneOf/1/x",
     "is not a supported keyword (it would not be enforced)"),
    ({"enum": ["a"], "const": "a"}, "#/const", "beside 'enum' is not supported"),
    ({"enum": ["a"], "maxLength": 3}, "#/maxLength", "beside 'enum' is not supported"),
    ({"type": "integer", "enum": ["a"]}, "#/enum", "has no value of type 'integer'"),
    ({"const": float("nan")}, "#/const",
     "nan is no JSON value (Out of range float values are not JSON compliant)"),
    ({"nullable": "yes"}, "#/nullable", "must be true or false, not 'yes'"),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "where", "reason"), REFUSED)
def test_refusals_name_the_keyword_its_place_and_the_limit(
    schema: dict, where: str, reason: str
) -> None:
    keyword = where.rsplit("/", 1)[1].replace("~1", "/").replace("~0", "~")
    with pytest.raises(SchemaError) as info:
        schema_to_regex(schema)
    assert str(info.value) == f"{keyword!r} at {where}: {reason}"


@pytest.mark.parametrize(
    ("schema", "message"),
    [(False, "the schema at # is false: no value fits"),
     ({"prefixItems": [{}, 3]}, "the schema at #/prefixItems/1 is 3: not a schema")],
)  # fmt: skip
def test_refused_schemas(schema: object, message: str) -> None:
    with pytest.raises(SchemaError) as info:
        schema_to_regex(schema)
    assert str(info.value) == message
