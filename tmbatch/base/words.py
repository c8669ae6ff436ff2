"""Values inside messages, in English: the people who read them write JSON, not Python.

`repr()` and type names leak the implementation ("a int", "None", "[0, 4]"); these say the
same thing the way the input file or the command line spells it.
"""

from __future__ import annotations

from typing import Any

import orjson

_JSON_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),  # before int: a bool is an int to Python, not to JSON
    ((int, float), "a number"),
    (str, "a string"),
    ((list, tuple), "an array"),
    (dict, "an object"),
)


def json_type(value: Any) -> str:
    """The JSON type of a parsed value, with its article: "null", "a number", "an array"."""
    if value is None:
        return "null"
    for types, name in _JSON_TYPES:
        if isinstance(value, types):
            return name
    return "a value of an unknown type"


def json_text(value: Any, limit: int = 100) -> str:
    """The value as JSON text (what the user wrote), cut to `limit` characters."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def setting(value: Any) -> str:
    """An option's value as the command line spells it: not set, on/off, 0/4, 'name'."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple) and len(value) == 2 and all(
            isinstance(v, int) for v in value):
        return f"{value[0]}/{value[1]}"  # a shard
    if isinstance(value, str):
        return f"'{value}'"
    return json_text(value)


def millis(value: float | None) -> str:
    """Milliseconds for a person: "12.5 ms", or "n/a" when nothing was measured."""
    return "n/a" if value is None else f"{value:g} ms"
