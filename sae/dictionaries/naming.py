"""Dictionary names. A name is one folder of a run: the entry's `name` (or its architecture) plus
the settings that tell it apart from its siblings, e.g. `relu-l1_coefficient=3`."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

from sae.errors import ConfigError


def name_part(value: Any) -> str:
    """A setting's value as it appears in a name: floats in %g, lists comma-joined, and anything
    outside [A-Za-z0-9._-=,] replaced by '_' (so a name is one folder)."""
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ",".join(name_part(v) for v in value)
    else:
        text = str(value)
    return "".join(ch if ch.isalnum() or ch in "._-=," else "_" for ch in text)


def dictionary_name(base: str, settings: Iterable[tuple[str | None, Any]]) -> str:
    """`base` plus `-key=value` for each (key, value) setting; a None key adds the value alone
    (a hook point: `relu-l1_coefficient=3-blocks.3.hook_resid_post`)."""
    parts = [name_part(value) if key is None else f"{key}={name_part(value)}" for key, value in settings]
    return "-".join([base, *parts])


def check_unique(names: Sequence[str]) -> None:
    """ConfigError naming the repeated names: two dictionaries cannot share a folder."""
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise ConfigError(f"dictionary names must be unique; repeated: {', '.join(repeated)} "
                          "(give each dictionary a distinct `name:` or make the configs differ)")


def dictionary_names(configs: Sequence[Any]) -> list[str]:
    """Each DictionaryConfig's `name`, or its architecture plus the settings in which it differs
    from the other configs of that architecture (e.g. `relu-l1_coefficient=0.001`); unique."""
    # as written: recipe defaults a config resolves itself do not enter the name
    dumps = [c.as_written().model_dump(exclude={"name"}) for c in configs]
    names = []
    for cfg, dump in zip(configs, dumps):
        if cfg.name:
            names.append(cfg.name)
            continue
        same = [d for d in dumps if d["architecture"] == dump["architecture"]]
        keys = [k for k in dump if k != "architecture" and any(d.get(k) != dump[k] for d in same)]
        names.append(dictionary_name(cfg.architecture, [(k, dump[k]) for k in keys]))
    check_unique(names)
    return names
