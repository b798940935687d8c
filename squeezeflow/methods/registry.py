"""Which methods exist: each method file registers its config class, its method class and its preset
parser beside the algorithm (`@register(RTNConfig, presets=parse, examples=(...))`), the way torchao
registers one handler per config. Third-party methods register the same way from their own module,
found through the `squeezeflow.methods` entry point group (`[project.entry-points."squeezeflow.methods"]
mine = "my_package.my_method"`): importing the module is what registers it.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Callable

from ..errors import BadInput

ENTRY_POINT_GROUP = "squeezeflow.methods"


@dataclass(frozen=True)
class Registration:
    name: str                                   # the config's `method` discriminator
    config: type                                # a config.Spec subclass with `method: Literal[name]`
    method: type                                # a WeightMethod or LayerRemoval subclass
    presets: Callable[[str], list | None] | None  # preset name -> method configs, or None if not its preset
    examples: tuple[str, ...]                   # preset names offered in help and the UI dropdown


_REGISTRY: dict[str, Registration] = {}
_plugins_loaded = False


def register(config: type, *, presets: Callable[[str], list | None] | None = None, examples: tuple[str, ...] = ()):
    """Class decorator: `method_cls` runs configs of type `config`. Registering a name twice with a
    different class is an error (two plugins must not silently replace each other)."""
    name = config.model_fields["method"].default

    def decorate(method_cls: type) -> type:
        old = _REGISTRY.get(name)
        if old is not None and (old.method.__qualname__, old.method.__module__) != (method_cls.__qualname__,
                                                                                    method_cls.__module__):
            raise ValueError(f"method {name!r} is already registered by {old.method.__module__}")
        method_cls.name = name
        _REGISTRY[name] = Registration(name, config, method_cls, presets, tuple(examples))
        return method_cls

    return decorate


def load_plugins() -> None:
    """Import every module the `squeezeflow.methods` entry point group names (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is named, not a traceback
            raise BadInput(f"method plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}") from None


def registrations() -> dict[str, Registration]:
    load_plugins()
    return dict(_REGISTRY)


def config_class(name: str) -> type:
    regs = registrations()
    if name not in regs:
        raise BadInput(f"unknown method {name!r}; known: {', '.join(sorted(regs))}")
    return regs[name].config


def get_method(config):
    """The method object that runs `config` (a registered config instance)."""
    return registrations()[config.method].method(config)


def parse_preset(name: str) -> list | None:
    """The method configs of preset `name` from the first registered parser that knows it, else None."""
    for reg in registrations().values():
        if reg.presets is not None and (configs := reg.presets(name)) is not None:
            return configs
    return None


def preset_examples() -> tuple[str, ...]:
    return tuple(e for reg in registrations().values() for e in reg.examples)
