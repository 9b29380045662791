"""Sparse dictionary architectures. Importing this package registers all of them."""

from sae.dictionaries.base import DictionaryConfig, SparseDictionary, TrainStep  # noqa: F401
from sae.dictionaries.registry import ARCHITECTURES, get_architecture, parse_dictionary_config, register  # noqa: F401

# Each import registers one architecture (a new architecture: one file, one line here).
from sae.dictionaries import relu, topk, batchtopk, jumprelu, gated, matryoshka  # noqa: E402,F401
