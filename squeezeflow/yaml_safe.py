"""Loading a small YAML file a user wrote (a recipe) so that what we run is exactly what they wrote.

PyYAML's safe_load already refuses Python objects; it still lets through what makes a recipe mean something
else than it says, or makes loading itself the attack:
- a key given twice (the last one silently wins: `bits: 4 ... bits: 8`);
- aliases (`*name`), the means of "billion laughs" expansion bombs, and `<<` merges built on them; a
  recipe is a few lines and needs neither;
- nesting deep enough to exhaust the recursive composer (RecursionError, a traceback);
- non-string keys (they reach `Recipe(**data)` as a TypeError);
- files that are not regular files (a FIFO hangs, /dev/zero never ends) or larger than `max_bytes`.
All of these are refused with one line naming the file and, for YAML problems, the line and column.

Floats are resolved as YAML 1.2 does: `1e-5` is a number, not the string PyYAML's YAML 1.1 rules make it
(a string would then be refused by the specs' no-coercion rule).
"""
from __future__ import annotations

import os
import re

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from .errors import BadInput
from .safe_read import read_regular_file

MAX_RECIPE_BYTES = 1 << 20   # a recipe is a few hundred bytes; a MiB is generous and still cheap to parse
MAX_DEPTH = 32               # recipe nesting is 3-4 levels (recipe, methods, method, base)

_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
                               |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases, merges, duplicate or non-string keys, and with a nesting limit."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, f"alias *{event.anchor} is not allowed (write the value out)",
                                event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[str, yaml.Mark] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConstructorError(None, None, "merge keys (<<) are not allowed", key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise ConstructorError(None, None, f"keys must be strings, got {key!r}", key_node.start_mark)
                if key in seen:
                    raise ConstructorError(None, None, f"duplicate key {key!r} (first given at line "
                                           f"{seen[key].line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def load_yaml_file(path: str | os.PathLike, max_bytes: int = MAX_RECIPE_BYTES, what: str = "YAML file"):
    """The data in a YAML file, loaded by StrictLoader. BadInput when the file is not a readable regular
    file of at most max_bytes or not UTF-8; yaml.YAMLError (with a problem_mark) for YAML problems."""
    data = read_regular_file(path, what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
