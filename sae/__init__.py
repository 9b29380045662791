"""sae: sparse autoencoders (sparse dictionaries) on transformer activations."""

__version__ = "0.1.0"

# Loading and splicing, imported on first use so that `import sae` stays cheap:
#   sae.load(path, device=..., dtype=...)          sae/loading.py
#   sae.splice(model, dictionaries, keep_error=...)  sae/splicing.py
#   sae.feature_activations(model, dictionaries, text)
_LAZY = {
    "load": ("sae.loading", "load"),
    "load_run": ("sae.loading", "load_run"),
    "splice": ("sae.splicing", "splice"),
    "feature_activations": ("sae.splicing", "feature_activations"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
