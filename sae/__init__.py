"""sae: sparse autoencoders (sparse dictionaries) on transformer activations."""

import importlib

__version__ = "0.1.0"

# sae.load, sae.load_run (sae/loading.py), sae.splice and sae.feature_activations (sae/splicing.py)
# are imported on first use: every `import sae.x` runs this file first, and importing them here
# would make each one pay for torch (~3 s on 2 cores), e.g. train.py's usage errors.
_LAZY = {
    "load": ("sae.loading", "load"),
    "load_run": ("sae.loading", "load_run"),
    "splice": ("sae.splicing", "splice"),
    "feature_activations": ("sae.splicing", "feature_activations"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
