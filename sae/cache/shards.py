"""Shard files: writing one, checking one (size, header, sha256) or a whole cache, reading one back.

A shard is a plain safetensors file (``safetensors.torch.load_file`` reads it) with, for its C
contexts of length T: ``tokens`` int32 [C, T], ``keep_mask`` bool [C, T] and per hook
``acts.<hook>`` [n_kept, d_in] in the cache dtype, then per hook ``sum.<hook>`` float64 [d_in], the
sum of its rows as stored (so the mean over the training tokens needs no pass over the activations;
caches harvested before these sums existed lack them, and `shard_sums` computes them instead).
Row r of the activations is the r-th True of ``keep_mask.flatten()``: excluded tokens are never
stored; `token_positions` recovers their place.
The header is written deterministically, so a shard is a pure function of its contexts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from sae.cache.manifest import Manifest, ShardInfo, check_identity
from sae.cache.scatter_read import read_into
from sae.dtypes import dtype_name
from sae.errors import CacheError
from sae.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

ACT_PREFIX = "acts."
SUM_PREFIX = "sum."

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def with_sums(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard's tensors followed by ``sum.<hook>``: each hook's rows summed in float64 [d_in]."""
    acts = {name[len(ACT_PREFIX):]: t for name, t in tensors.items() if name.startswith(ACT_PREFIX)}
    return {**tensors, **{SUM_PREFIX + h: t.sum(0, dtype=torch.float64) for h, t in acts.items()}}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[int, str]:
    """Write a safetensors file atomically, with a deterministic header (keys in the given order),
    hashing it while writing; (bytes, sha256)."""
    header: dict[str, Any] = {"__metadata__": meta}
    off = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    h = hashlib.sha256()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for chunk in (struct.pack("<Q", len(hb)), hb):
                f.write(chunk)
                h.update(chunk)
            for t in tensors.values():
                if t.numel():
                    buf = t.contiguous().view(torch.uint8).numpy()
                    f.write(buf)
                    h.update(buf)
    return 8 + len(hb) + off, h.hexdigest()


def read_header(path: str | os.PathLike, expected_size: int | None = None) -> tuple[dict, int]:
    """(safetensors header, byte offset of the data) or CacheError naming the file and the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} is impossible for a {size}-byte file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CacheError(f"shard {path} is missing; run the harvest again to re-harvest it") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise CacheError(f"shard {path} is corrupt ({e}); run the harvest again to re-harvest it "
                         f"(or delete the file)") from None
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end != size:
        raise CacheError(f"shard {path} is truncated or corrupt ({size} bytes on disk, its header "
                         f"describes {data_start + end}); run the harvest again to re-harvest it")
    if expected_size is not None and size != expected_size:
        raise CacheError(f"shard {path} has {size} bytes, the manifest says {expected_size}; it is "
                         f"truncated or corrupt: run the harvest again to re-harvest it")
    return header, data_start


# ---- verification ------------------------------------------------------------------------------


def _expected_tensors(m: Manifest, s: ShardInfo) -> dict[str, tuple[torch.dtype, list[int]]]:
    exp = {"tokens": (torch.int32, [s.n_contexts, m.context_size]),
           "keep_mask": (torch.bool, [s.n_contexts, m.context_size])}
    for h in m.hooks:
        exp[ACT_PREFIX + h] = (m.torch_dtype, [s.n_tokens, m.d_in[h]])
    return exp


def verify_shard(m: Manifest, s: ShardInfo, full: bool = False) -> tuple[dict, int]:
    """Check size, header (names, dtypes, shapes) and with `full` the sha256; return the header."""
    path = m.shard_path(s)
    header, data_start = read_header(path, expected_size=s.bytes)
    optional = {SUM_PREFIX + h: (torch.float64, [m.d_in[h]]) for h in m.hooks}
    for name, (dt, shape) in {**_expected_tensors(m, s), **optional}.items():
        meta = header.get(name)
        if meta is None and name in optional:
            continue
        if meta is None or _ST_DTYPES.get(meta["dtype"]) != dt or list(meta["shape"]) != shape:
            raise CacheError(f"shard {path} does not hold the expected tensor {name} {shape} "
                             f"{dtype_name(dt)} (found {meta}); run the harvest "
                             f"again to re-harvest it")
    if full:
        digest = sha256_file(path)
        if digest != s.sha256:
            raise CacheError(f"shard {path} fails its checksum (sha256 {digest[:12]}…, the manifest "
                             f"says {s.sha256[:12]}…): it is corrupt; run the harvest again to "
                             f"re-harvest it (or delete the file)")
    return header, data_start


def shard_ok(m: Manifest, s: ShardInfo, full: bool = False) -> bool:
    """`verify_shard` as a test: a shard that fails is logged as one to re-harvest."""
    try:
        verify_shard(m, s, full)
        return True
    except CacheError as e:
        log.warning("%s; re-harvesting it", e)
        return False


def verify_cache(cache_dir: str | os.PathLike, verify: str = "quick") -> Manifest:
    """Check every listed shard ('quick': sizes and headers; 'full': also sha256; 'none')."""
    if verify not in ("none", "quick", "full"):
        raise ValueError(f"verify must be 'none', 'quick' or 'full', not {verify!r}")
    m = Manifest.load(cache_dir)
    if verify != "none":
        bad: list[tuple[ShardInfo, CacheError]] = []
        for s in m.shards:
            try:
                verify_shard(m, s, full=(verify == "full"))
            except CacheError as e:
                bad.append((s, e))
        if len(bad) == 1:
            raise bad[0][1]
        if bad:
            names = ", ".join(s.file for s, _ in bad)
            raise CacheError(f"{len(bad)} shards of {m.cache_dir} fail verification ({names}); run "
                             f"the harvest again to re-harvest them. First problem: {bad[0][1]}")
    return m


def open_cache(cache_dir: str | os.PathLike, *, identity: Mapping[str, Any] | None = None,
               verify: str = "quick", allow_incomplete: bool = False) -> Manifest:
    """Load and verify a cache for reading. `identity` (optional): the full identity it must have.

    'quick' verification (the default) checks every shard's byte size and safetensors header, which
    costs two small reads per shard and catches truncation; 'full' also checks sha256 (reads every
    byte: about as long as one epoch over the cache)."""
    m = verify_cache(cache_dir, verify)
    if identity is not None:
        check_identity(m, identity)
    if not m.complete and not allow_incomplete:
        raise CacheError(f"activation cache {m.cache_dir} is incomplete ({len(m.shards)} of "
                         f"{m.n_shards} shards): run the harvest again to finish it")
    return m


# ---- reading -----------------------------------------------------------------------------------


def read_shard_tensors(path: str | os.PathLike, header: dict, data_start: int,
                       names: Iterable[str], out: Mapping[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Read the named tensors of a shard (parsed `header`) into `out[name]` (preallocated, e.g. a
    slice of a mixing buffer) or into new tensors. One seek + one read per tensor, no extra copy."""
    result = {}
    with open(path, "rb", buffering=0) as f:
        for name in names:
            meta = header[name]
            dt = _ST_DTYPES[meta["dtype"]]
            dest = out[name] if out is not None and name in out else torch.empty(meta["shape"], dtype=dt)
            b0, b1 = meta["data_offsets"]
            if dest.dtype != dt or dest.numel() * dest.element_size() != b1 - b0:
                raise CacheError(f"shard {path}: tensor {name} does not match the manifest")
            read_into(f, data_start + b0, dest)
            result[name] = dest
    return result


def load_shard(m: Manifest, index: int, hooks: Sequence[str] | None = None,
               verify: bool = False) -> dict[str, torch.Tensor]:
    """One shard in text order: {'tokens', 'keep_mask', '<hook>': [n_kept, d_in], ...}."""
    s = m.shards[index] if m.shards[index].index == index else next(x for x in m.shards if x.index == index)
    header, data_start = verify_shard(m, s, full=verify)
    hooks = list(hooks or m.hooks)
    t = read_shard_tensors(m.shard_path(s), header, data_start,
                           ["tokens", "keep_mask"] + [ACT_PREFIX + h for h in hooks])
    return {"tokens": t["tokens"], "keep_mask": t["keep_mask"],
            **{h: t[ACT_PREFIX + h] for h in hooks}}


def shard_sums(m: Manifest, s: ShardInfo, hooks: Sequence[str]) -> dict[str, torch.Tensor]:
    """{hook: float64 [d_in]}, the sum of the shard's rows: the recorded sums, or (in a cache
    harvested before they were recorded) the activations read and summed."""
    header, data_start = verify_shard(m, s)
    path = m.shard_path(s)
    if all(SUM_PREFIX + h in header for h in hooks):
        t = read_shard_tensors(path, header, data_start, [SUM_PREFIX + h for h in hooks])
        return {h: t[SUM_PREFIX + h] for h in hooks}
    t = read_shard_tensors(path, header, data_start, [ACT_PREFIX + h for h in hooks])
    return {h: t[ACT_PREFIX + h].sum(0, dtype=torch.float64) for h in hooks}


def token_positions(keep_mask: torch.Tensor, context_start: int = 0) -> torch.Tensor:
    """Global token index (context * T + pos) of each activation row of a shard: LongTensor[n_kept]."""
    n_ctx, T = keep_mask.shape
    flat = torch.nonzero(keep_mask.reshape(-1), as_tuple=True)[0]
    return flat + context_start * T
