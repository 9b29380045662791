"""Sparse dictionary architectures. Importing this package registers all of them."""

from sae.dictionaries.base import DictionaryConfig, SparseDictionary, TrainStep  # noqa: F401
from sae.dictionaries.registry import (ARCHITECTURES, get_architecture, load_dictionary,  # noqa: F401
                                       parse_dictionary_config, register)

# Each import registers one architecture (a new architecture: one file, one line here).
from sae.dictionaries import relu, topk, batchtopk, jumprelu, gated  # noqa: E402,F401
