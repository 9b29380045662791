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


def load_dictionary(directory, device="cpu", dtype=None):
    """Load our own format (cfg.json + sae.safetensors) from a directory.

    `sae.load` (sae/loading.py) is the user-facing loader that also handles runs and other
    formats; this is the minimal one the trainer and evaluator share.
    """
    from pathlib import Path

    from sae import io
    from sae.dictionaries.base import CFG_FILE, WEIGHTS_FILE
    from sae.errors import UserError

    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise UserError(f"{p}: not found; a dictionary directory holds {CFG_FILE} and {WEIGHTS_FILE}")
    cfg = io.read_json(cfg_path)
    cls = get_architecture(cfg["architecture"])
    hyper = dict(cfg.get("hyperparameters", {}))
    hyper["architecture"] = cfg["architecture"]
    hyper["d_sae"], hyper["expansion_factor"] = cfg["d_sae"], None
    metadata = {k: v for k, v in cfg.items()
                if k not in ("format_version", "architecture", "d_in", "d_sae", "dtype", "hyperparameters")}
    dictionary = cls(cls.Config.model_validate(hyper), cfg["d_in"], metadata=metadata)
    tensors = io.load_tensors(weights_path)
    dictionary.prepare_for_weights(tensors)
    dictionary.load_weights(tensors)
    dictionary.to(device=device, dtype=dtype) if dtype is not None else dictionary.to(device)
    return dictionary.eval()
