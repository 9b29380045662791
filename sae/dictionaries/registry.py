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
    """Load a dictionary folder as the trainer and evaluator use it: a SparseDictionary whose
    `cfg` is its plain pydantic Config.

    Our format (any format_version this library reads) and every format `sae.load` imports
    (SAELens, dictionary_learning, sparsify) are accepted, so `python -m eval` works on all of
    them; `sae.load` (sae/loading.py) is the user-facing loader, with the SAEBench-style `cfg` view.
    """
    from pathlib import Path

    from sae.errors import UserError
    from sae.loading import detect_format, load

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not found; give a dictionary folder (cfg.json + sae.safetensors)")
    if detect_format(directory) is None:
        inside = sorted(p.name for p in directory.iterdir() if p.is_dir() and detect_format(p) is not None)
        if inside:
            raise UserError(f"{directory} holds several dictionaries ({', '.join(inside)}); give their folders, "
                            f"e.g. {directory / inside[0]}")
        raise UserError(f"{directory}: not a dictionary folder (no cfg.json + sae.safetensors, SAELens "
                        f"cfg.json + sae_weights.safetensors, or dictionary_learning ae.pt)")
    dictionary = load(directory, device=device, dtype=dtype)
    dictionary.cfg = dictionary.cfg.hyperparameters
    for p in dictionary.parameters():
        p.requires_grad_(True)  # as the trainer made it; sae.load freezes them for analysis
    return dictionary
