"""manifest.json: what a cache is (its identity), its layout, and the shards fully written so far.

The identity is everything that must match for a cache to be reused: the caller's description of
the model and data, plus what `full_identity` adds (hooks, cache dtype, shapes, sha256 of the tokens
and of the keep mask). A cache is never reused for a run whose identity differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from sae.dtypes import dtype_name, parse_dtype
from sae.errors import CacheError
from sae.io import _json_default, read_json, write_json

FORMAT = "sae-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"

# Keys of the identity that harvest adds itself (the caller's identity must not contradict them).
_OWN_IDENTITY_KEYS = ("hooks", "cache_dtype", "context_size", "n_contexts",
                      "tokens_sha256", "keep_mask_sha256")


def shard_file(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


@dataclass
class ShardInfo:
    index: int
    file: str
    bytes: int
    sha256: str
    context_start: int
    n_contexts: int
    n_tokens: int  # kept tokens = activation rows per hook


@dataclass
class Manifest:
    cache_dir: Path
    identity: dict[str, Any]
    hooks: list[str]
    d_in: dict[str, int]
    dtype: str  # the cache dtype's name: float32, bfloat16 or float16
    context_size: int
    n_contexts: int
    contexts_per_shard: int
    n_tokens_expected: int  # kept tokens over all contexts
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # free-form: timings, versions
    manifest_file: str = MANIFEST  # a rank's own list during a distributed harvest (not saved)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_contexts / self.contexts_per_shard)

    @property
    def n_tokens(self) -> int:
        """Kept tokens in the shards written so far (== n_tokens_expected when complete)."""
        return sum(s.n_tokens for s in self.shards)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, "cache dtype", CacheError)

    def shard_path(self, shard: ShardInfo | int) -> Path:
        return self.cache_dir / (shard.file if isinstance(shard, ShardInfo) else shard_file(shard))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.contexts_per_shard
        return start, min(self.n_contexts, start + self.contexts_per_shard)

    def bytes_per_token(self) -> int:
        return sum(self.d_in.values()) * self.torch_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "complete": self.complete,
            "identity": self.identity, "hooks": self.hooks, "d_in": self.d_in, "dtype": self.dtype,
            "context_size": self.context_size, "n_contexts": self.n_contexts,
            "contexts_per_shard": self.contexts_per_shard, "n_shards": self.n_shards,
            "n_tokens": self.n_tokens, "n_tokens_expected": self.n_tokens_expected,
            "info": self.info, "shards": [asdict(s) for s in self.shards],
        }

    def save(self) -> None:
        write_json(self.cache_dir / self.manifest_file, self.to_json())

    @classmethod
    def load(cls, cache_dir: str | os.PathLike, file: str = MANIFEST) -> "Manifest":
        cache_dir = Path(cache_dir)
        path = cache_dir / file
        if not path.is_file():
            raise CacheError(f"{cache_dir} is not an activation cache (no {MANIFEST}); harvest it first")
        try:
            d = read_json(path)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            if d.get("version") != VERSION:
                raise ValueError(f"version {d.get('version')!r}, this library reads {VERSION}")
            return cls(cache_dir=cache_dir, identity=d["identity"], hooks=list(d["hooks"]),
                       d_in={k: int(v) for k, v in d["d_in"].items()}, dtype=d["dtype"],
                       context_size=int(d["context_size"]), n_contexts=int(d["n_contexts"]),
                       contexts_per_shard=int(d["contexts_per_shard"]),
                       n_tokens_expected=int(d["n_tokens_expected"]),
                       shards=[ShardInfo(**s) for s in d["shards"]], complete=bool(d["complete"]),
                       info=d.get("info", {}))
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{path} is unreadable or not an activation-cache manifest ({e}); "
                             f"delete {cache_dir} to re-harvest") from None


# ---- identity ---------------------------------------------------------------------------------


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of a CPU tensor."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{str(t.dtype)}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """`obj` as it reads back from manifest.json (tuples as lists, dtypes as names, ...)."""
    return json.loads(json.dumps(obj, default=_json_default))


def full_identity(identity: Mapping[str, Any], tokens: torch.Tensor, keep_mask: torch.Tensor,
                  hook_names: Sequence[str], dtype: torch.dtype) -> dict[str, Any]:
    """The caller's identity plus what harvest adds: hooks, cache dtype, shapes and checksums."""
    own = {
        "hooks": sorted(hook_names),
        "cache_dtype": dtype_name(dtype),
        "context_size": int(tokens.shape[1]),
        "n_contexts": int(tokens.shape[0]),
        "tokens_sha256": tensor_sha256(tokens.to(torch.int64)),
        "keep_mask_sha256": tensor_sha256(keep_mask.to(torch.bool)),
    }
    ident = _jsonable(dict(identity))
    for k in _OWN_IDENTITY_KEYS:
        if k in ident and ident[k] != own[k]:
            raise ValueError(f"identity[{k!r}]={ident[k]!r} contradicts the data ({own[k]!r})")
    ident.update(own)
    return ident


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):
        s = repr(v[:12] + "…")
    return s if len(s) <= n else s[: n - 1] + "…"


def identity_diff(cached: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """['key: cache has X, run has Y', ...] for every key that differs."""
    out = []
    for k in sorted(set(cached) | set(wanted), key=lambda k: (k not in wanted, k)):
        a, b = cached.get(k, "<absent>"), wanted.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: cache has {_short(a)}, run has {_short(b)}")
    return out


def check_identity(manifest: Manifest, identity: Mapping[str, Any]) -> None:
    """Raise CacheError naming every differing field unless `identity` equals the manifest's."""
    diff = identity_diff(manifest.identity, _jsonable(dict(identity)))
    if diff:
        raise CacheError(
            f"activation cache {manifest.cache_dir} was made for a different run ({'; '.join(diff)}); "
            f"it is never reused for another one: use another cache directory, or delete "
            f"{manifest.cache_dir} to re-harvest")
