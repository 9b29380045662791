"""The one registry of dictionary architectures: a new architecture is one file that
subclasses `SparseDictionary` and decorates it with `@register`."""

from __future__ import annotations

from typing import Any

from sae.errors import ConfigError, did_you_mean

ARCHITECTURES: dict[str, type] = {}


def register(cls: type) -> type:
    name = cls.architecture
    if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
        raise RuntimeError(f"architecture {name!r} registered twice")
    ARCHITECTURES[name] = cls
    return cls


def get_architecture(name: str) -> type:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}{did_you_mean(name, ARCHITECTURES)}; "
                          f"known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def parse_dictionary_config(raw: dict[str, Any]):
    """Validate a dictionary's config dict with its architecture's own Config class."""
    if "architecture" not in raw:
        raise ConfigError("a dictionary needs an `architecture` key "
                          f"(one of {', '.join(sorted(ARCHITECTURES))})")
    return get_architecture(raw["architecture"]).Config.model_validate(raw)
