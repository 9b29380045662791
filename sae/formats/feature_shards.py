"""Our format's second weights layout: a dictionary saved as feature shards, as a feature-sharded
run writes it with `distributed.saved_as: feature_shards` (no process ever holds it whole).

The folder holds cfg.json (the whole dictionary's, as always), `sae.safetensors.index.json` and
one `sae-<i>-of-<F>.safetensors` per feature shard (numbered from 1): shard i holds features
[lo_i, hi_i) of every per-feature tensor under its usual name (W_enc[:, lo:hi], W_dec[lo:hi],
b_enc[lo:hi], thresholds, ...), and the first one also the tensors the features share (b_dec,
W_skip, ...). The index:

    {"layout": "feature_shards", "d_sae": 8192, "feature_dims": {"W_enc": 1, "W_dec": 0, ...},
     "shards": [{"file": "sae-00001-of-00002.safetensors", "features": [0, 4096]}, ...]}

`read_features` reads the whole dictionary or any feature range from either layout (one
sae.safetensors, or shards), slice by slice, so that a rank loads only its own features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping

import torch
from pydantic import BaseModel, ValidationError
from safetensors import safe_open
from torch import Tensor

from sae import io
from sae.dictionaries.base import WEIGHTS_FILE
from sae.errors import UserError

INDEX_FILE = "sae.safetensors.index.json"
LAYOUT = "feature_shards"


class Shard(BaseModel):
    file: str
    features: tuple[int, int]  # [lo, hi) of the whole dictionary's features


class Index(BaseModel):
    """sae.safetensors.index.json."""
    layout: Literal["feature_shards"]
    d_sae: int
    feature_dims: dict[str, int]  # per-feature tensor -> the dimension holding its features
    shards: list[Shard]


def shard_file(index: int, count: int) -> str:
    """The file of feature shard `index` (from 0) of `count`."""
    return f"sae-{index + 1:05d}-of-{count:05d}.safetensors"


def has_weights(directory: Path) -> bool:
    """Whether a folder holds our weights in either layout."""
    return (directory / WEIGHTS_FILE).is_file() or (directory / INDEX_FILE).is_file()


def is_sharded(directory: Path) -> bool:
    return (directory / INDEX_FILE).is_file()


# ---- writing ------------------------------------------------------------------------------------------
def write_shard(directory: Path, index: int, count: int, tensors: Mapping[str, Tensor]) -> Path:
    """Write one feature shard's file (atomically); shard 0 also carries the shared tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shard_file(index, count)
    io.save_tensors(path, {k: v.detach().contiguous() for k, v in tensors.items()})
    return path


def write_index(directory: Path, d_sae: int, feature_dims: Mapping[str, int], count: int) -> None:
    """Write the index of `count` equal shards (once every shard's file is written), and remove
    what an earlier save of the folder in the other layout, or another shard count, left."""
    width = d_sae // count
    index = Index(layout=LAYOUT, d_sae=d_sae, feature_dims=dict(feature_dims),
                  shards=[Shard(file=shard_file(i, count), features=(i * width, (i + 1) * width)) for i in range(count)])
    io.write_json(directory / INDEX_FILE, index.model_dump(mode="json"))
    keep = {s.file for s in index.shards}
    for stale in [directory / WEIGHTS_FILE, *directory.glob("sae-*-of-*.safetensors")]:
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


def unlink_index(directory: Path) -> None:
    """Remove the index before shard files are rewritten: a save killed half-way then leaves no
    index over a mix of old and new shards, only a folder without weights (which retrains)."""
    (directory / INDEX_FILE).unlink(missing_ok=True)


def remove_shards(directory: Path) -> None:
    """Remove an earlier save's shards and index (the folder is now saved as one file)."""
    for stale in [directory / INDEX_FILE, *directory.glob("sae-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)


# ---- reading ------------------------------------------------------------------------------------------
def read_features(directory: Path, feature_dims: Mapping[str, int] | None = None, lo: int | None = None,
                  hi: int | None = None) -> dict[str, Tensor]:
    """Every tensor of the dictionary saved in `directory`, its per-feature ones cut to features
    [lo, hi) (None: all). feature_dims: where each per-feature tensor keeps its features (needed
    to cut a one-file dictionary; a sharded one's index says)."""
    if is_sharded(directory):
        return _read_sharded(directory, _index(directory), lo, hi)
    path = directory / WEIGHTS_FILE
    if lo is None and hi is None:
        return io.load_tensors(path)
    if feature_dims is None:
        raise ValueError("cutting a one-file dictionary to a feature range needs feature_dims")
    with safe_open(str(path), framework="pt") as f:
        return {key: _cut(f.get_slice(key), feature_dims.get(key), lo, hi) for key in f.keys()}


def _index(directory: Path) -> Index:
    path = directory / INDEX_FILE
    try:
        index = Index.model_validate(io.read_json(path))
    except (ValueError, ValidationError) as e:  # json.JSONDecodeError is a ValueError
        first = e.errors()[0] if isinstance(e, ValidationError) else None
        reason = f"{'.'.join(map(str, first['loc'])) or 'the file'}: {first['msg']}" if first else str(e)
        raise UserError(f"{path}: not a readable feature-shards index ({reason}); was the folder written by this "
                        f"library, and copied whole?") from None
    edges = [s.features for s in index.shards]
    if not edges or edges[0][0] != 0 or edges[-1][1] != index.d_sae or any(a[1] != b[0] for a, b in zip(edges, edges[1:])):
        raise UserError(f"{path}: the shards' feature ranges {edges} do not cover 0..{index.d_sae} in order")
    for s in index.shards:
        if not (directory / s.file).is_file():
            raise UserError(f"{directory / s.file}: missing (one of the {len(index.shards)} feature shards the index "
                            f"lists); copy the whole folder, every sae-*-of-*.safetensors with it")
    return index


def _read_sharded(directory: Path, index: Index, lo: int | None, hi: int | None) -> dict[str, Tensor]:
    """The shards' tensors over [lo, hi), concatenated along each tensor's feature dimension."""
    lo, hi = 0 if lo is None else lo, index.d_sae if hi is None else hi
    dims = index.feature_dims
    parts: dict[str, list[Tensor]] = {}
    for n, s in enumerate(index.shards):
        a, b = s.features
        if n and (b <= lo or a >= hi):
            continue  # the first shard is always opened: it holds the shared tensors
        with safe_open(str(directory / s.file), framework="pt") as f:
            for key in f.keys():
                if key not in dims:
                    parts.setdefault(key, []).append(f.get_tensor(key))
                elif b > lo and a < hi:
                    parts.setdefault(key, []).append(_cut(f.get_slice(key), dims[key], max(lo, a) - a, min(hi, b) - a))
    return {key: torch.cat(p, dim=dims[key]) if key in dims else p[0] for key, p in parts.items()}


def _cut(part, dim: int | None, lo: int | None, hi: int | None) -> Tensor:
    """A safetensors slice read whole (dim None) or over [lo, hi) of dimension dim (0 or 1)."""
    if dim is None:
        return part[:]
    return part[lo:hi] if dim == 0 else part[:, lo:hi]
