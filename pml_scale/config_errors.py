"""pydantic's validation errors in the user's terms: the key path, where its value came from (file,
include or override), and what is accepted (the choices, the range, the type, the closest key).

Why a module of its own: the schema (``config``) is what a newcomer edits; the wording of its
errors is a separate concern that needs pydantic's and typing's internals.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Literal

from pydantic import BaseModel


def explain(root: type[BaseModel], tree: dict, origins: dict, loc: tuple, err: dict) -> str:
    """One pydantic error in the user's terms: key path, origin (``origins``: where each key path's
    value came from), what is accepted. ``tree`` is the nested dict that ``root`` failed to validate."""
    model, n = root, 1  # walk down to the model that holds the failing key
    while n < len(loc) and _is_model(model.model_fields.get(loc[n - 1])):
        model, n = model.model_fields[loc[n - 1]].annotation, n + 1
    origin = next((origins[loc[:k]] for k in range(n, 0, -1) if loc[:k] in origins), "the defaults")
    key = ".".join(loc[:n])
    if err["type"] == "extra_forbidden":
        return _unknown(".".join(loc[:n - 1]), loc[n - 1], list(model.model_fields), origin)
    field, value = model.model_fields[loc[n - 1]], tree
    for k in loc[:n]:
        value = value[k]
    if _is_model(field):
        return f"'{key}' is a section: give a mapping of its keys (from {origin}), got {value!r}"
    if isinstance(value, dict) and value and field.annotation is not dict:
        return f"'{key}' is a plain value, it has no key '{next(iter(value))}' (from {origin})"
    if err["type"] == "literal_error":
        accepted = ", ".join(str(v) for v in _literals(field.annotation))
    elif err["type"] == "value_error":
        accepted = str(err["ctx"]["error"])
    elif err["type"] in ("greater_than_equal", "less_than_equal", "less_than", "greater_than"):
        return f"{key}: {value!r} is out of range {_bounds(field.metadata)} (from {origin})"
    elif field.annotation is dict:
        return f"{key}: expected a mapping, got {value!r} (from {origin})"
    else:
        hint = " (use true or false)" if "bool" in _type_name(field.annotation) else ""
        return (f"{key}: expected {_type_name(field.annotation)}, got {value!r} "
                f"({type(value).__name__}) from {origin}{hint}")
    return f"{key}: {value!r} is not accepted (from {origin}); accepted values: {accepted}"


def _is_model(field) -> bool:
    return field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _literals(tp) -> list:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return [v for a in typing.get_args(tp) for v in _literals(a)]


def _unknown(path: str, key: str, valid: list[str], origin: str) -> str:
    prefix = f"{path}." if path else ""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    what = f"keys of '{path}'" if path else "sections of the config"
    return f"unknown key '{prefix}{key}' (from {origin}).{hint} Valid {what}: {', '.join(valid)}"


def _bounds(metadata: list) -> str:
    """``[lo, hi]`` / ``[lo, hi)`` / ``[lo, inf]`` from a field's ``ge``/``le``/``lt`` constraints."""
    def get(name):
        return next((getattr(m, name) for m in metadata if hasattr(m, name)), None)

    lo, le, lt = get("ge"), get("le"), get("lt")
    hi = lt if lt is not None else (le if le is not None else "inf")
    return f"[{lo}, {hi}{')' if lt is not None else ']'}"


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"list of {len(args)} {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))
