"""No silent coercion into specs: a value must already have the type its field declares.

Pydantic's lax mode turns `group_size: true` into group size 1, `bits: "4"` into 4, `act_order: "yes"` or
`1` into True and accepts `nan` / `inf` for any float, so a recipe can mean something other than what it
says without an error. Strict mode would also refuse what JSON and YAML cannot express (a list for a
tuple field), so instead every Spec runs `refuse_coercion` before validation: it walks the field's
annotation and names the first value whose type is wrong, or a float that is not finite, or an integer
no 64-bit register holds (seeds and sizes end up in torch and numpy). Ranges and everything else are left
to the fields' own constraints.
"""
from __future__ import annotations

import math
import numbers
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

_INT64 = (-(2**63), 2**63 - 1)
_UNIONS = (Union, types.UnionType)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _show(value: Any) -> str:
    name = {bool: "boolean", str: "string", float: "number", int: "integer", type(None): "null",
            list: "list", tuple: "list", dict: "mapping"}.get(type(value), type(value).__name__)
    return f"{name} {_short(value)}" if not isinstance(value, (list, tuple, dict)) else name


def type_problem(value: Any, annotation: Any) -> str | None:
    """Why `value` is not of type `annotation` as written (None: acceptable, or a type this does not judge)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_problem(value, args[0])
    if origin in _UNIONS:
        problems = [type_problem(value, a) for a in args]
        if any(p is None for p in problems):
            return None
        return next(p for p in problems if not p.startswith("expected null"))
    if annotation is type(None):
        return None if value is None else f"expected null, got {_show(value)}"
    if annotation is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {_show(value)}"
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers are integers
            return f"expected an integer, got {_show(value)}"
        if not _INT64[0] <= int(value) <= _INT64[1]:
            return f"integer {_short(value)} is out of the 64-bit range"
        return None
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"expected a number, got {_show(value)}"
        if isinstance(value, numbers.Integral):
            return None if _INT64[0] <= int(value) <= _INT64[1] else f"number {_short(value)} is out of range"
        return None if math.isfinite(value) else f"must be a finite number, got {value!r}"
    if origin is Literal:
        # Only the literal values' own types: "4" for Literal[4] or True for Literal[1] is a coercion.
        if any(type(value) is type(a) and value == a for a in args):
            return None
        return f"expected one of {', '.join(repr(a) for a in args)}, got {_show(value)}"
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            pairs = zip(value, args)  # fixed length: pydantic reports a wrong length itself
        else:
            pairs = ((v, args[0] if args else Any) for v in value)
        for i, (v, a) in enumerate(pairs):
            if (p := type_problem(v, a)) is not None:
                return f"item {i}: {p}"
        return None
    return None  # str, nested models (they check themselves), anything else: pydantic decides


def refuse_coercion(cls: type[BaseModel], data: Any) -> Any:
    """A `model_validator(mode="before")` body: raise ValueError naming the field of the first value a
    lax validation would coerce; otherwise return `data` unchanged."""
    if not isinstance(data, dict):
        return data
    for name, value in data.items():
        field = cls.model_fields.get(name) if isinstance(name, str) else None
        if field is None:
            continue  # unknown keys: extra="forbid" names them
        if (problem := type_problem(value, field.annotation)) is not None:
            raise ValueError(f"{name}: {problem}")
    return data


def int_in(lo: int, hi: int):
    """An argparse `type`: a whole number in lo..hi; anything else is a one-line usage error (exit 2)
    naming the range, before a spec, a server or a model is touched."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {_short(text)}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{_short(value)} is out of range {lo}..{hi}")
        return value

    return parse
