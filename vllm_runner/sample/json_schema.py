"""JSON Schema -> a regular expression whose whole matches are the JSON documents this
compiler allows for the schema, for ``guided_regex`` (the approach structured-output
libraries take for schemas that do not recurse: a regex cannot count brackets).

Every match validates against the schema (but see oneOf); where a regex cannot follow JSON
Schema, the compiler narrows what it allows, and says so here:
- an object's properties come in the schema's order; one not in ``required`` may be absent.
  ``additionalProperties`` absent or false: only the listed properties (what a model given
  properties is asked for; keys it invents would be enforced by nothing). With no
  ``properties``: any string keys to the ``additionalProperties`` schema (any value when
  absent or true), at most ``maxProperties`` of them. Keys are written as themselves.
- a value the schema leaves open (``{}``, ``true``, an array's missing ``items``) is any JSON
  value with at most ANY_DEPTH levels of brackets.
- ``oneOf`` is compiled as ``anyOf``: exact when its schemas exclude each other (different
  types, a distinguishing ``const``), but a document that two of them match passes.
- ``enum`` / ``const`` values are matched as json.dumps writes them compactly, no whitespace.
- strings: no ``\\u`` escape of a surrogate (a character beyond U+FFFF is written as
  itself); a ``pattern`` matches the whole string, and no control character. Numbers with
  bounds: integer bounds only, no exponent.
- whitespace: a run of WHITESPACE where RFC 8259 allows it, none at the document's ends.
Anything else is refused with a SchemaError naming the keyword, its JSON pointer in the
schema and the limit: unknown keywords, recursive ``$ref``s, ``uniqueItems``, ``allOf`` of
several schemas, keywords beside a ``$ref`` / ``anyOf`` / ``enum``, so that no part of a
schema is silently not enforced. Annotations (ANNOTATIONS) are ignored. A schema whose regex
would pass MAX_REGEX_CHARS, or that nests past Python's stack, is refused too.
"""

import json

from vllm_runner.sample.json_grammar import MAX_WHITESPACE
from vllm_runner.sample.json_schema_parts import (
    NUMBER,
    STRING,
    SchemaError,
    alt,
    counts,
    escape,
    fail,
    literal,
    number_regex,
    optional,
    pointer,
    repeat,
)
from vllm_runner.sample.json_schema_strings import string_regex

__all__ = ["ANY_DEPTH", "MAX_REGEX_CHARS", "WHITESPACE", "SchemaError", "schema_to_regex"]

# NOTE: a bounded run, as JSON mode's MAX_WHITESPACE (the same 16 bytes, so that both modes
# accept the same layout): pretty-printing fits (a newline and 15 spaces of indentation), but
# a model cannot write whitespace forever. A single optional space would be a smaller DFA but
# refuse the newlines models write when they indent JSON.
WHITESPACE = rf"[ \t\n\r]{{0,{MAX_WHITESPACE}}}"
# Levels of brackets in a value the schema leaves open: [[1]] and {"a": {"b": 1}} fit,
# [[[1]]] does not. Its regex grows fourfold a level (an array and an object each write the
# inner value twice): 1.3k, 5.6k, 23k characters at depths 1, 2, 3.
ANY_DEPTH = 2
# NOTE: a regex's length, checked as it grows: a small schema can expand without bound (n
# optional properties write n^2 members, a $def used twice a level doubles a level, anyOf
# copies its schemas), which cost minutes and gigabytes before regex_dfa's state limits were
# reached. Twice the routes' guided_regex limit; the compiler's regexes have about an NFA
# state a character, so a longer one would pass regex_nfa's MAX_NFA_STATES anyway.
MAX_REGEX_CHARS = 1 << 17
ANNOTATIONS = frozenset(("title", "description", "examples", "default", "$schema", "$id",
                         "$comment", "readOnly", "writeOnly", "deprecated"))  # fmt: skip
_NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties", "minProperties", "maxProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": _NUMERIC,
    "integer": _NUMERIC,
    "boolean": (),
    "null": (),
}
_ALONE = ("$ref", "anyOf", "oneOf", "allOf")  # keywords that take no siblings here
_DEFS = ("$defs", "definitions")  # read through $ref, not compiled in place
_KNOWN = frozenset(
    (*ANNOTATIONS, *_DEFS, *_ALONE, "type", "enum", "const", "nullable")
    + tuple(k for keywords in _TYPE_KEYWORDS.values() for k in keywords)
)


def schema_to_regex(schema: dict | bool, whitespace: str = WHITESPACE) -> str:
    """The regex of the JSON documents ``schema`` allows (see the module's docstring);
    ``whitespace``: the regex of one run of whitespace between tokens. SchemaError (a
    ValueError) for what it cannot enforce, or past the limits (see the module's docstring)."""
    ws = whitespace if "|" not in whitespace else f"(?:{whitespace})"
    try:
        return _Compiler(schema, ws).value(schema, "#")
    except RecursionError:  # (the compiler and its helpers recurse per level of nesting)
        raise SchemaError(
            "the schema at # nests too deeply to compile (past Python's recursion limit)"
        ) from None


def _is_type(value: object, name: str) -> bool:
    """Whether a JSON value has the JSON Schema type ``name`` (1.0 is an integer)."""
    if name in ("integer", "number") and type(value) in (int, float):
        return name == "number" or float(value).is_integer()
    kinds = {"string": str, "boolean": bool, "null": type(None), "array": list, "object": dict}
    return type(value) is kinds.get(name)


class _Compiler:
    """One schema's compilation: the root (where ``$ref``s point) and the references being
    expanded (a cycle among them would nest without bound)."""

    def __init__(self, root: dict | bool, ws: str) -> None:
        self.root, self.ws = root, ws
        self.expanding: list[str] = []
        self.refs: dict[str, str] = {}  # a compiled $ref's regex
        self.any = self._any(ANY_DEPTH)

    def value(self, schema: object, path: str) -> str:
        return self._fits(self._value(schema, path), path)

    def _fits(self, regex: str | int, path: str) -> str | int:
        """``regex`` (or a length so far) if within MAX_REGEX_CHARS; a SchemaError if not."""
        if (regex if isinstance(regex, int) else len(regex)) > MAX_REGEX_CHARS:
            raise SchemaError(
                f"the schema at {path} compiles to a regex of more than {MAX_REGEX_CHARS} "
                "characters (the limit): fewer optional properties, or smaller schemas where "
                "one is used many times, would fit"
            )
        return regex

    def _each(self, schemas: list, where: str) -> list[str]:
        """The regexes of ``schemas`` (at ``where``/i), their total length within the limit."""
        parts, total = [], 0
        for i, s in enumerate(schemas):
            parts.append(self.value(s, pointer(where, str(i))))
            total = self._fits(total + len(parts[-1]), where)
        return parts

    def _value(self, schema: object, path: str) -> str:
        if schema is True:
            return self.any
        if schema is False or not isinstance(schema, dict):
            what = "false: no value fits" if schema is False else f"{schema!r}: not a schema"
            raise SchemaError(f"the schema at {path} is {what}")
        for key in schema:
            if key not in _KNOWN:
                raise fail(path, key, "is not a supported keyword (it would not be enforced)")
        if schema.get("nullable", False) is not False:
            if schema["nullable"] is not True:
                raise fail(path, "nullable", f"must be true or false, not {schema['nullable']!r}")
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return alt([self.value(rest, path), "null"])
        active = [k for k in schema if k not in ANNOTATIONS and k not in _DEFS and k != "nullable"]
        for key in _ALONE:
            if key in schema:
                self._alone(active, key, path, allowed=())
                if key == "$ref":
                    return self._ref(schema[key], path)
                return self._any_of(schema, key, path)
        if "enum" in schema or "const" in schema:
            return self._literals(schema, active, path)
        types = self._types(schema, active, path)
        if not types:
            return self.any
        return alt([self._typed(name, schema, path) for name in types])

    def _alone(self, active: list[str], key: str, path: str, allowed: tuple[str, ...]) -> None:
        other = next((k for k in active if k != key and k not in allowed), None)
        if other is not None:
            hint = " (move it into the schemas it names)" if key in _ALONE else ""
            raise fail(path, other, f"beside {key!r} is not supported{hint}")

    def _ref(self, ref: object, path: str) -> str:
        """A ``$ref`` into the root's ``$defs`` / ``definitions``, compiled once."""
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise fail(path, "$ref", f"{ref!r}: only '#/$defs/...' and '#/definitions/...'")
        if ref in self.expanding:
            cycle = " -> ".join([*self.expanding[self.expanding.index(ref) :], ref])
            reason = "a regex cannot nest without bound"
            raise fail(path, "$ref", f"{ref!r} recurses ({cycle}): {reason}")
        if ref not in self.refs:
            target = self.root
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise fail(path, "$ref", f"{ref!r} names no schema")
                target = target[part]
            self.expanding.append(ref)
            self.refs[ref] = self.value(target, ref)
            self.expanding.pop()
        return self.refs[ref]

    def _any_of(self, schema: dict, key: str, path: str) -> str:
        """``anyOf`` / ``oneOf`` (as anyOf) / ``allOf`` of one schema: the alternation."""
        schemas = schema[key]
        if not isinstance(schemas, list) or not schemas:
            raise fail(path, key, f"must be a non-empty list of schemas, not {schemas!r}")
        if key == "allOf" and len(schemas) != 1:
            reason = "a regex cannot intersect schemas"
            raise fail(path, key, f"has {len(schemas)} schemas: only one is supported ({reason})")
        return alt(self._each(schemas, pointer(path, key)))

    def _literals(self, schema: dict, active: list[str], path: str) -> str:
        """``enum`` / ``const``: its values (of the schema's ``type``, if it has one)."""
        if "enum" in schema and "const" in schema:
            raise fail(path, "const", "beside 'enum' is not supported")
        key = "enum" if "enum" in schema else "const"
        self._alone(active, key, path, allowed=("type",))
        values = schema["enum"] if key == "enum" else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise fail(path, key, f"must be a non-empty list, not {values!r}")
        if "type" in schema:
            types = self._types({"type": schema["type"]}, ["type"], path)
            values = [v for v in values if any(_is_type(v, t) for t in types)]
            if not values:
                raise fail(path, key, f"has no value of type {schema['type']!r}")
        return alt([literal(v, path, key) for v in values])

    def _types(self, schema: dict, active: list[str], path: str) -> list[str]:
        """The types the schema allows: its ``type``, or those its keywords are about (a
        number covers the integers); each keyword must be about one of them."""
        if "type" not in schema:
            deduced = [t for t, keys in _TYPE_KEYWORDS.items() if any(k in schema for k in keys)]
            return [t for t in deduced if t != "integer"]
        given = schema["type"]
        types = [given] if isinstance(given, str) else given
        if not isinstance(types, list) or not types or any(t not in _TYPE_KEYWORDS for t in types):
            raise fail(path, "type", f"{given!r} is not a type name or a non-empty list of them")
        for key in active:
            if key != "type" and not any(key in _TYPE_KEYWORDS[t] for t in types):
                raise fail(path, key, f"does not apply to type {given!r}")
        return types

    def _typed(self, name: str, schema: dict, path: str) -> str:
        if name in ("integer", "number"):
            return number_regex(schema, path, integer=name == "integer")
        compile_type = {"object": self._object, "array": self._array, "string": string_regex}
        if name in compile_type:
            return compile_type[name](schema, path)
        return "(?:true|false)" if name == "boolean" else "null"

    def _members(self, member: str, lo: int, hi: int | None) -> str:
        """``lo``..``hi`` of ``member`` separated by commas, each followed by whitespace."""
        if hi == 0:
            return ""
        more = None if hi is None else hi - 1
        seq = member + self.ws + repeat(f",{self.ws}{member}{self.ws}", max(lo - 1, 0), more)
        return seq if lo > 0 else optional(seq)

    def _any(self, depth: int) -> str:
        scalars = [STRING, NUMBER, "true", "false", "null"]
        if depth == 0:
            return alt(scalars)
        inner, ws = self._any(depth - 1), self.ws
        array = rf"\[{ws}{self._members(inner, 0, None)}\]"
        obj = rf"\{{{ws}{self._members(STRING + ws + ':' + ws + inner, 0, None)}\}}"
        return alt([*scalars, array, obj])

    def _object(self, schema: dict, path: str) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise fail(path, "properties", f"must be an object of schemas, not {props!r}")
        extra = schema.get("additionalProperties", "properties" not in schema)
        if extra is not False and props:
            reason = "is supported only as false beside 'properties' (absent means false here)"
            raise fail(path, "additionalProperties", reason)
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            raise fail(path, "required", f"must be a list of property names, not {required!r}")
        lo, hi = counts(schema, path, "minProperties", "maxProperties")
        if extra is False:
            return self._listed(props, set(required), lo, hi, path)
        if required or lo:
            keyword = "required" if required else "minProperties"
            reason = "is not supported without 'properties' (a regex cannot tell keys apart)"
            raise fail(path, keyword, reason)
        value = self.value(extra, pointer(path, "additionalProperties"))
        member = STRING + self.ws + ":" + self.ws + value
        return rf"\{{{self.ws}{self._members(member, 0, hi)}\}}"

    def _listed(self, props: dict, required: set[str], lo: int, hi: int | None, path: str) -> str:
        """The listed properties in order, those not required optional: one alternative per
        first present property (it can only be one up to the first required one), each
        followed by the rest, which must each start with a comma."""
        names, ws = list(props), self.ws
        missing = sorted(required - set(names))
        if missing:
            raise fail(path, "required", f"names {missing[0]!r}, which is not in 'properties'")
        if lo > len(required):
            reason = f"{lo} is more than the {len(required)} required properties"
            raise fail(path, "minProperties", f"{reason} (only a count every object meets)")
        if hi is not None and hi < len(names):
            reason = f"{hi} is less than the {len(names)} properties"
            raise fail(path, "maxProperties", f"{reason} (only a count every object meets)")
        where = pointer(path, "properties")
        members, total = [], 0
        for name in names:
            value = self.value(props[name], pointer(where, name))
            members.append(
                escape(json.dumps(name, ensure_ascii=False)) + ws + ":" + ws + value + ws
            )
            total = self._fits(total + len(members[-1]), path)
        firsts, total = [], 0
        for i, name in enumerate(names):
            rest = ["," + ws + m if n in required else optional("," + ws + m)
                    for n, m in zip(names[i + 1 :], members[i + 1 :], strict=True)]  # fmt: skip
            firsts.append(members[i] + "".join(rest))
            total = self._fits(total + len(firsts[-1]), path)  # (n optional: n^2 members)
            if name in required:
                break
        body = alt(firsts) if firsts else ""
        return rf"\{{{ws}{body if required else optional(body)}\}}"

    def _array(self, schema: dict, path: str) -> str:
        """``prefixItems`` in order, then ``items``; ``minItems``..``maxItems`` of them."""
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        if not isinstance(prefix, list):
            raise fail(path, "prefixItems", f"must be a list of schemas, not {prefix!r}")
        if isinstance(items, list):
            reason = "as a list (a tuple, before 2020-12) is not supported: use 'prefixItems'"
            raise fail(path, "items", reason)
        if schema.get("uniqueItems", False) is not False:
            reason = "is supported only as false (a regex cannot compare items)"
            raise fail(path, "uniqueItems", reason)
        lo, hi = counts(schema, path, "minItems", "maxItems")
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
            if lo > hi:
                reason = f"{lo} is more than the {hi} items allowed ('items' is false)"
                raise fail(path, "minItems", reason)
        heads = self._each(prefix, pointer(path, "prefixItems"))
        item = self.value(items, pointer(path, "items")) if items is not False else ""
        ws = self.ws

        def rest(i: int) -> str:  # the items from index i on, item i after a comma if i > 0
            if hi is not None and i >= hi:
                return ""
            if i == len(heads):
                if i == 0:
                    return self._members(item, lo, hi)
                more = None if hi is None else hi - i
                return repeat(f",{ws}{item}{ws}", max(lo - i, 0), more)
            seq = ("," + ws if i else "") + heads[i] + ws + rest(i + 1)
            return seq if i < lo else optional(seq)

        return rf"\[{ws}{rest(0)}\]"
