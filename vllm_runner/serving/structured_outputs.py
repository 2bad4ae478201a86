"""The kinds of structured output the OpenAI routes take, as the sampling fields that do
them: OpenAI's ``response_format`` (JSON mode, a JSON schema) and vLLM's
``structured_outputs`` (a choice list, a regex, a JSON schema, a grammar or JSON mode); the
other kinds are left for the routes' refusal of unsupported fields."""

from typing import Any


def json_mode(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with OpenAI's ``response_format`` of ``{"type": "json_object"}`` as
    ``json_object``, and of ``{"type": "json_schema", "json_schema": {"name": ..., "schema":
    {...}}}`` as ``guided_json`` (other formats stay, for ``refuse_unsupported``)."""
    value = data.get("response_format")
    if isinstance(value, dict):  # a model in vLLM: its nulls are defaults
        value = {k: v for k, v in value.items() if v is not None}
    rest = {k: v for k, v in data.items() if k != "response_format"}
    if value == {"type": "json_object"}:
        return {**rest, "json_object": True}
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        return data
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if set(value) != {"type", "json_schema"} or schema is None:
        raise ValueError(
            'response_format: a json_schema format is {"type": "json_schema", '
            f'"json_schema": {{"name": ..., "schema": {{...}}}}}}, got {value!r}'[:400]
        )
    if data.get("guided_json") is not None:
        raise ValueError("guided_json: give it or response_format json_schema, not both")
    if data.get("structured_outputs") is not None:
        raise ValueError(
            "structured_outputs cannot be combined with response_format json_schema, got "
            f"{data['structured_outputs']!r}"[:400]
        )
    return {**rest, "guided_json": schema}


# vLLM's structured_outputs kinds taken, besides json_object: the sampling field each sets
_FIELDS = {
    "choice": ("guided_choice", "a choice list"),
    "regex": ("guided_regex", "a regex"),
    "json": ("guided_json", "a JSON schema"),
    "grammar": ("guided_grammar", "a grammar"),
}


def structured_choice(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with vLLM's ``structured_outputs`` of ``{"choice": [...]}`` as
    ``guided_choice``, of ``{"regex": "..."}`` as ``guided_regex``, of ``{"json": {...}}`` (a
    JSON schema) as ``guided_json``, of ``{"grammar": "..."}`` (EBNF / GBNF) as
    ``guided_grammar``, or of ``{"json_object": true}`` as ``json_object`` (the
    kinds of structured output this server implements; the others are refused)."""
    spec = data.get("structured_outputs")
    if spec is None:
        return data
    if not isinstance(spec, dict):
        raise ValueError(f"structured_outputs must be an object, got {spec!r}")
    kinds = {k: v for k, v in spec.items() if v not in (None, False)}
    if len(kinds) != 1 or not (kinds.keys() & _FIELDS or kinds.get("json_object") is True):
        raise ValueError(
            "structured_outputs: only one choice list, regex, json schema, grammar or "
            f"json_object true is supported by this server, got {kinds or spec!r}"
        )
    rest = {k: v for k, v in data.items() if k != "structured_outputs"}
    if "json_object" in kinds:
        return {**rest, "json_object": True}
    [(kind, value)] = kinds.items()
    name, what = _FIELDS[kind]
    if data.get("json_object"):  # (response_format's, after json_mode): named as sent
        raise ValueError(
            f"structured_outputs: {what} cannot be combined with JSON mode "
            f"(response_format json_object), got {spec!r}"
        )
    if data.get(name) is not None:
        raise ValueError(f"{name}: give it or structured_outputs.{kind}, not both")
    return {**rest, name: value}
