"""Our format: a folder with cfg.json + sae.safetensors, as `SparseDictionary.save` writes it (or
+ the feature shards of a dictionary too wide for one process: sae/formats/feature_shards.py).

cfg.json: `format_version`, `architecture`, `d_in`, `d_sae`, `dtype`, `hyperparameters` (the
architecture's Config) and, beside them at the top level, the metadata (model_name, hook_name,
dataset, tokens_trained, pruning, ...). Every file this library has written is version 1; a
newer version is refused with a line that says to upgrade. When the format changes, bump
FORMAT_VERSION (sae/dictionaries/base.py) and read the older versions here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae import io
from sae.dictionaries.base import CFG_FILE, FORMAT_VERSION
from sae.errors import UserError
from sae.formats import Imported, feature_shards

_NOT_METADATA = ("format_version", "architecture", "d_in", "d_sae", "d_out", "dtype", "hyperparameters")


def detect(directory: Path) -> bool:
    return (directory / CFG_FILE).is_file() and feature_shards.has_weights(directory)


def check_version(cfg: dict[str, Any], where: Path) -> None:
    """A UserError unless cfg.json has a format_version this library reads."""
    version = cfg.get("format_version")
    if version is None:
        raise UserError(f"{where}: no format_version; not a dictionary cfg.json written by this library")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{where}: format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise UserError(f"{where}: format_version {version} was written by a newer version of this library "
                        f"(this one reads versions up to {FORMAT_VERSION}); upgrade it: pip install -U sae-dict")


def read(directory: Path, with_tensors: bool = True) -> Imported:
    """The folder's dictionary (with_tensors False: its cfg.json alone, tensors {})."""
    where = directory / CFG_FILE
    cfg = io.read_json(where)
    check_version(cfg, where)
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise UserError(f"{where}: no {key!r}; not a dictionary cfg.json")
    return Imported(architecture=cfg["architecture"], d_in=cfg["d_in"], d_sae=cfg["d_sae"],
                    tensors=feature_shards.read_features(directory) if with_tensors else {},
                    hyperparameters=cfg.get("hyperparameters") or {},
                    metadata={k: v for k, v in cfg.items() if k not in _NOT_METADATA}, dtype=cfg.get("dtype"),
                    d_out=cfg.get("d_out"))
