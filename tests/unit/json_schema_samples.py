"""Schemas shaped like real structured-output requests, shared by the json_schema tests: a
person, a product list (nested objects, enums, formats), OpenAI function-call arguments in
strict mode, optional properties in every position, pydantic's Optional (anyOf with null)
and models ($defs), string formats, integer and number ranges, tuples, maps, patterns."""

PERSON = {
    "title": "Person",
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age"],
}

PRODUCTS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 3,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string", "minLength": 1},
            "price": {"type": "number", "minimum": 0},
            "category": {"enum": ["book", "food", "toy"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "size": {
                "type": "object",
                "properties": {"width": {"type": "number"}, "height": {"type": "number"}},
                "required": ["width", "height"],
                "additionalProperties": False,
            },
            "in_stock": {"type": "boolean"},
        },
        "required": ["id", "name", "price", "category", "in_stock"],
        "additionalProperties": False,
    },
}

# OpenAI function calling, strict mode: every property required, null for "not given".
WEATHER_CALL = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": ["integer", "null"], "minimum": 1, "maximum": 14},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}

# Optional properties first, between required ones, and last.
OPTIONAL_EVERYWHERE = {
    "type": "object",
    "properties": {
        "a": {"type": "integer"},
        "b": {"type": "boolean"},
        "c": {"type": "string", "maxLength": 3},
        "d": {"type": "null"},
        "e": {"type": "integer"},
    },
    "required": ["c", "e"],
}

ALL_OPTIONAL = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}, "z": {"type": "integer"}},
}

# pydantic: class Order(BaseModel): customer: Address; note: str | None = None; status: Status
PYDANTIC_ORDER = {
    "$defs": {
        "Address": {
            "properties": {
                "street": {"title": "Street", "type": "string"},
                "zip": {"title": "Zip", "type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "zip"],
            "title": "Address",
            "type": "object",
        },
        "Status": {"enum": ["open", "paid", "shipped"], "title": "Status", "type": "string"},
    },
    "properties": {
        "customer": {"$ref": "#/$defs/Address"},
        "ship_to": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Note"},
        "status": {"$ref": "#/$defs/Status"},
    },
    "required": ["customer", "status"],
    "title": "Order",
    "type": "object",
}

EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "at": {"type": "string", "format": "date-time"},
        "day": {"type": "string", "format": "date"},
        "time": {"type": "string", "format": "time"},
        "contact": {"type": "string", "format": "email"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2,4}$"},
    },
    "required": ["id", "at", "day", "time", "contact", "code"],
}

RANGES = {
    "type": "object",
    "properties": {
        "percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "delta": {"type": "integer", "exclusiveMinimum": -20, "exclusiveMaximum": 1000},
        "year": {"type": "integer", "minimum": 1900},
        "below": {"type": "integer", "maximum": -5},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "temp": {"type": "number", "minimum": -50, "maximum": 60},
        "price": {"type": "number", "exclusiveMinimum": 0},
    },
    "required": ["percent", "delta", "year", "below", "score", "temp", "price"],
}

POINT = {
    "type": "array",
    "prefixItems": [{"type": "number"}, {"type": "number"}, {"type": "string"}],
    "items": False,
    "minItems": 2,
}

# A header then 2 or 3 numbers: minItems and maxItems reach past prefixItems.
ROW = {"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"},
       "minItems": 3, "maxItems": 4}  # fmt: skip

SCORES = {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3}

CHOICES = {
    "type": "object",
    "properties": {
        "kind": {"const": "shape"},
        "shape": {
            "oneOf": [
                {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]},
                {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            ]
        },
        "level": {"enum": [1, 2.5, "high", True, None]},
        "text": {"type": "string", "pattern": '^a."\\\\[^x]$'},  # a, any, a quote, \, not x
    },
    "required": ["kind", "shape", "level", "text"],
    "additionalProperties": False,
}

ANYTHING = {"type": "object", "properties": {"meta": {}, "list": {"type": "array"}}}

SCHEMAS = {
    "person": PERSON,
    "products": PRODUCTS,
    "weather_call": WEATHER_CALL,
    "optional_everywhere": OPTIONAL_EVERYWHERE,
    "all_optional": ALL_OPTIONAL,
    "pydantic_order": PYDANTIC_ORDER,
    "event": EVENT,
    "ranges": RANGES,
    "point": POINT,
    "row": ROW,
    "scores": SCORES,
    "choices": CHOICES,
    "anything": ANYTHING,
}
