"""Recipes: an ordered list of method configs under one name, from a preset name or a YAML file.

The method configs are not listed here: each method registers its config class and preset parser beside
its algorithm (squeezeflow/methods, plugins through the `squeezeflow.methods` entry point), and a recipe
validates its `methods` through that registry by their `method` key. A config is dumped as its concrete
class, so `Recipe.model_dump(mode="json")` (cache keys, manifests) holds every field of every method.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BeforeValidator, Field, SerializeAsAny, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from . import methods
from .config import Spec, one_line
from .errors import BadInput
from .methods import registry


def _method_config(value):
    """One entry of `methods`: a mapping validated by the config class its `method` key registers, or an
    instance of a registered config class. Errors keep the location of a tagged union (methods.0.rtn.bits)."""
    if isinstance(value, dict):
        regs = registry.registrations()
        name = value.get("method")
        if name not in regs:
            expected = ", ".join(repr(n) for n in regs)
            if name is None:
                raise PydanticCustomError("union_tag_not_found",
                                          "each method needs a 'method' key, one of: {expected}", {"expected": expected})
            raise PydanticCustomError("union_tag_invalid", "Input tag {tag} found using 'method' does not match any of "
                                      "the expected tags: {expected}", {"tag": repr(name), "expected": expected})
        try:
            return regs[name].config.model_validate(value)
        except ValidationError as e:
            raise ValidationError.from_exception_data(e.title, [
                {"type": err["type"], "loc": (name, *err["loc"]), "input": err["input"],
                 **({"ctx": err["ctx"]} if "ctx" in err else {})} for err in e.errors()]) from None
    reg = registry.registrations().get(getattr(value, "method", None))
    if reg is None or not isinstance(value, reg.config):
        raise PydanticCustomError("method_config", "expected a method config (a mapping with a 'method' key), "
                                  "got {kind}", {"kind": type(value).__name__})
    return value


# The config of one registered method, serialized as its own class (not as the bare Spec).
MethodConfig = Annotated[SerializeAsAny[Spec], BeforeValidator(_method_config)]


class Recipe(Spec):
    """An ordered list of methods (structural ones first) under one name."""

    name: str
    methods: list[MethodConfig] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._:+-]*", v):  # '+' joins chained presets
            raise ValueError(f"recipe name {v!r} must be lowercase letters, digits, '.', '_', ':', '+' or '-'")
        return v


PRESET_EXAMPLES = registry.preset_examples()

# A recipe as flow parameters take it. The UI form offers PRESET_EXAMPLES in a dropdown (first tab) and a
# free string (second tab) for any other preset of the registered methods or a recipe YAML path; at runtime
# both are plain strings, and load_recipe() is what validates them.
RecipeSpec = Union[
    Annotated[Literal[PRESET_EXAMPLES], Field(title="Preset")],
    Annotated[str, Field(title="Other preset or recipe YAML path", min_length=1)],
]


def preset(name: str) -> Recipe:
    """A named preset: each method family parses its own (see the `parse_preset` docstrings under
    squeezeflow/methods, e.g. rtn-w4g64, gptq-w3g64-act, nowag-p2:4, quad-w4a4a8, rf8-eg, trsp-25), and
    '+' chains them, structural first (`trsp-25+gwq-w4g64`: remove blocks, then quantize the shallower
    model)."""
    if "+" in name:
        parts = name.split("+")
        if not all(parts):
            raise BadInput(f"recipe {name!r}: empty step in a '+' chain")
        return Recipe(name=name, methods=[m for part in parts for m in preset(part).methods])
    try:
        configs = registry.parse_preset(name)
    except ValidationError as e:
        raise BadInput(f"recipe {name!r}: {one_line(e)}") from None
    if configs is None:
        examples = registry.preset_examples()
        raise BadInput(f"unknown recipe {name!r}: use a preset such as {', '.join(examples)}, or a YAML file")
    return Recipe(name=name, methods=configs)


def load_recipe(spec: str) -> Recipe:
    """A preset name or a YAML file: {name: ..., methods: [{method: rtn, bits: 4, group_size: 64}]}."""
    try:
        if spec.endswith((".yaml", ".yml")):
            import yaml

            from .yaml_safe import load_yaml_file

            path = Path(spec)
            if not (path.exists() or path.is_symlink()):  # a FIFO or a loop: load_yaml_file names it
                raise BadInput(f"recipe file {spec!r} does not exist")
            try:
                data = load_yaml_file(path, what="recipe file")  # strict: no duplicate keys, aliases, huge files
            except yaml.YAMLError as e:  # one line: where and what, not the parser's multi-line excerpt
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise BadInput(f"recipe file {spec!r} is not valid YAML{where}: "
                               f"{getattr(e, 'problem', None) or e}") from None
            if not isinstance(data, dict):
                raise BadInput(f"recipe file {spec!r} must hold a mapping with 'name' and 'methods'")
            data.setdefault("name", path.stem.lower())
            return Recipe(**data)
        return preset(spec)
    except ValidationError as e:
        raise BadInput(f"recipe {spec!r}: {one_line(e)}") from None


__all__ = ["PRESET_EXAMPLES", "MethodConfig", "Recipe", "RecipeSpec", "load_recipe", "methods", "preset"]
