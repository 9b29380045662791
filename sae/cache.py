"""On-disk activation cache: harvest once, verify, resume, read back.

Layout of a cache directory::

    manifest.json              what the cache is (identity), its layout and its complete shards
    shard_00000.safetensors    contexts [0, C) of the token tensor
    shard_00001.safetensors    contexts [C, 2C) ...

Each shard holds, for its C contexts of length T:

- ``tokens``   int32 [C, T]   the token ids (so features can be traced back to text)
- ``keep_mask`` bool [C, T]   False for excluded tokens (BOS, padding, specials)
- ``acts.<hook>`` [n_kept, d_in] per hook point, in the cache dtype: one row per KEPT token, in
  row-major order of ``keep_mask`` (row r is the r-th True of ``keep_mask.flatten()``), so
  excluded tokens are never stored and never served. `token_positions` recovers (context, pos).

``manifest.json`` (written atomically after every shard) records the identity (everything that must
match for reuse: the caller's model/dataset spec plus the hook names, cache dtype, context length,
number of contexts and sha256 of the token tensor and of the keep mask), d_in per hook, the shard
size, and for every shard fully written: file name, byte size, sha256, context range and kept-token
count, plus ``complete``.

Guarantees:

- One forward pass per batch of contexts serves every hook point; the pass stops right after the
  last hook fires (the bridge's ``StopAtLayerException``, the mechanism behind ``stop_at_layer``), so
  layers past the deepest hook (and the unembedding) never run.
- Resumable: a shard file is written to a temp name, fsynced and renamed, and only then listed in
  the manifest. Kill the harvest at any point (even SIGKILL) and run it again: it continues with the
  first shard not listed, so no token is duplicated or missing. Stray temp files are removed.
- A truncated or corrupt shard is detected (byte size and safetensors header on every open; sha256
  too with ``verify="full"``) and named in a `CacheError`. Running the harvest again re-harvests
  exactly the shards that fail verification (safe: a shard is a pure function of its contexts).
- A cache whose identity differs from the run's is never reused: `CacheError` names the differing
  fields and says what to do.

Reading: `sae.cache_reader.CacheReader` (shuffled batches) and `load_shard` (one shard, in order).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from sae.errors import CacheError, HookError
from sae.models import check_hooks, stop_layer
from sae.io import atomic_path, read_json, sha256_file, write_json
from sae.progress import token_bar

log = logging.getLogger(__name__)

FORMAT = "sae-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
ACT_PREFIX = "acts."

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}

# Keys of the identity that harvest adds itself (the caller's identity must not contradict them).
_OWN_IDENTITY_KEYS = ("hooks", "cache_dtype", "context_size", "n_contexts",
                      "tokens_sha256", "keep_mask_sha256")


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' | 'bfloat16' | 'float16' for a torch dtype or an alias ('fp32', 'bf16', ...)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CacheError(f"cache dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
        dtype = DTYPES[dtype]
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise CacheError(f"cache dtype {name!r} is not supported; use float32, bfloat16 or float16")
    return name


def shard_file(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


# --------------------------------------------------------------------------------------------
# Manifest


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
    dtype: str
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
        return DTYPES[self.dtype]

    def shard_path(self, shard: ShardInfo | int) -> Path:
        return self.cache_dir / (shard.file if isinstance(shard, ShardInfo) else shard_file(shard))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.contexts_per_shard
        return start, min(self.n_contexts, start + self.contexts_per_shard)

    def bytes_per_token(self) -> int:
        return sum(self.d_in.values()) * DTYPES[self.dtype].itemsize

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


# --------------------------------------------------------------------------------------------
# Identity


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of a CPU tensor."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{str(t.dtype)}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy())
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    from sae.io import _json_default
    return json.loads(json.dumps(obj, default=_json_default))


def full_identity(identity: Mapping[str, Any], tokens: torch.Tensor, keep_mask: torch.Tensor,
                  hook_names: Sequence[str], dtype: torch.dtype | str) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# Shard files: header parsing, verification, reading


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
    for name, (dt, shape) in _expected_tensors(m, s).items():
        meta = header.get(name)
        if meta is None or _ST_DTYPES.get(meta["dtype"]) != dt or list(meta["shape"]) != shape:
            raise CacheError(f"shard {path} does not hold the expected tensor {name} {shape} "
                             f"{str(dt).removeprefix('torch.')} (found {meta}); run the harvest "
                             f"again to re-harvest it")
    if full:
        digest = sha256_file(path)
        if digest != s.sha256:
            raise CacheError(f"shard {path} fails its checksum (sha256 {digest[:12]}…, the manifest "
                             f"says {s.sha256[:12]}…): it is corrupt; run the harvest again to "
                             f"re-harvest it (or delete the file)")
    return header, data_start


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


def _read_into(f, offset: int, dest: torch.Tensor) -> None:
    """Read dest.nbytes bytes at `offset` of open raw file `f` straight into `dest` (CPU, contiguous)."""
    if dest.numel() == 0:
        return
    view = memoryview(dest.view(torch.uint8).numpy()).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CacheError(f"shard {f.name} ended early; it is truncated: run the harvest again")
        done += n


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
            _read_into(f, data_start + b0, dest)
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


def token_positions(keep_mask: torch.Tensor, context_start: int = 0) -> torch.Tensor:
    """Global token index (context * T + pos) of each activation row of a shard: LongTensor[n_kept]."""
    n_ctx, T = keep_mask.shape
    flat = torch.nonzero(keep_mask.reshape(-1), as_tuple=True)[0]
    return flat + context_start * T


# --------------------------------------------------------------------------------------------
# Capturing activations from a TransformerBridge


class _StopForward(Exception):
    pass


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class ActivationCapture:
    """Hooks on `hook_names` for the lifetime of a `with` block; `run(tokens)` returns each hook's
    activations [batch, pos, d_in] (trailing dims flattened), exactly the tensors `run_with_cache`
    stores, and stops the forward as soon as the last of them has fired."""

    def __init__(self, model: Any, hook_names: Sequence[str]):
        check_hooks(model, list(hook_names))
        self.model = model
        self.hook_names = list(hook_names)
        self.stop_at_layer = stop_layer(hook_names, len(model.blocks) if hasattr(model, "blocks") else None)
        self.device = _model_device(model)
        self._got: dict[str, torch.Tensor] = {}
        self._ctx = None

    def _make_hook(self, name: str) -> Callable:
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def hook(tensor: Any, *, hook: Any) -> Any:
            t = tensor[0] if isinstance(tensor, tuple) else tensor
            self._got[name] = t.detach()
            if len(self._got) == len(self.hook_names):
                # Everything captured: end the forward here (the bridge catches this exception,
                # the same one its own stop_at_layer raises, and returns normally).
                raise StopAtLayerException(t)
            return tensor
        return hook

    def __enter__(self) -> "ActivationCapture":
        self._ctx = self.model.hooks(fwd_hooks=[(h, self._make_hook(h)) for h in self.hook_names])
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(*exc)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self._ctx is not None, "use ActivationCapture inside a `with` block"
        self._got = {}
        tokens = tokens.to(self.device)
        self.model(tokens, stop_at_layer=self.stop_at_layer, return_type=None)
        missing = [h for h in self.hook_names if h not in self._got]
        if missing:
            raise HookError(f"hook point(s) {missing} did not fire during the forward pass (a hook "
                            f"that needs an opt-in such as use_attn_result, or one that this "
                            f"architecture does not run); choose other hook points")
        b, p = tokens.shape
        out = {}
        for h in self.hook_names:
            t = self._got[h]
            if t.dim() < 3 or tuple(t.shape[:2]) != (b, p):
                raise HookError(f"hook point {h!r} gives shape {tuple(t.shape)}, not [batch, pos, ...]: "
                                f"only per-token activations can be cached")
            out[h] = t.reshape(b, p, -1)
        self._got = {}
        return out

    def kept_rows(self, tokens: torch.Tensor, keep_mask: torch.Tensor,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{hook: [n_kept, d_in]} for kept tokens, row-major over (context, pos), on the model's device."""
        acts = self.run(tokens)
        flat = keep_mask.to(self.device).reshape(-1)
        return {h: a.reshape(-1, a.shape[-1])[flat].to(dtype or a.dtype) for h, a in acts.items()}


# --------------------------------------------------------------------------------------------
# Harvest


def _default_contexts_per_shard(bytes_per_context: int, shard_bytes: int) -> int:
    return max(1, shard_bytes // max(1, bytes_per_context))


def _clean_dir(cache_dir: Path, has_manifest: bool) -> None:
    for p in cache_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)  # a write interrupted before its rename
        elif not has_manifest and not re.fullmatch(r"shard_\d{5}\.safetensors", p.name):
            raise CacheError(f"{cache_dir} is not empty and holds no {MANIFEST} ({p.name} is in "
                             f"it); refusing to write an activation cache there: choose a new or "
                             f"empty directory")


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[int, str]:
    """Write a safetensors file (readable by `safetensors.torch.load_file`) atomically, with a
    deterministic header (keys in the given order), hashing it while writing; (bytes, sha256)."""
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
                    buf = t.contiguous().view(torch.uint8).numpy() if t.dtype != torch.bool else t.contiguous().numpy()
                    f.write(buf)
                    h.update(buf)
    return 8 + len(hb) + off, h.hexdigest()


def harvest(model: Any, tokens: torch.Tensor, keep_mask: torch.Tensor, hook_names: Sequence[str],
            cache_dir: str | os.PathLike, *, identity: Mapping[str, Any],
            dtype: torch.dtype | str = torch.float32, contexts_per_shard: int | None = None,
            shard_bytes: int = 256 << 20, batch_contexts: int = 32, progress: bool = True,
            verify: str = "quick", distributed: bool = False,
            _fail_after_shards: int | None = None) -> Manifest:
    """Harvest the activations of every hook in `hook_names` over `tokens` into `cache_dir`.

    One forward pass per `batch_contexts` contexts serves all hooks and stops after the last one.
    Resumes a partial cache with the same identity, re-harvests shards that fail verification
    (`verify`: 'quick' = size + header, 'full' = also sha256), returns at once when the cache is
    already complete, and refuses (CacheError) a cache made for anything else.

    tokens: LongTensor[n_contexts, T]; keep_mask: BoolTensor[n_contexts, T] (False = excluded).
    identity: JSON-able description of the model and data (name, dataset spec, model dtype, ...);
    hooks, cache dtype, shapes and sha256 of tokens and keep_mask are added to it.
    contexts_per_shard: default, as many as fit in `shard_bytes` (256 MiB).
    distributed: every rank of an initialised torch.distributed group calls harvest with the same
    arguments and a `cache_dir` they share; the shards still missing are split between the ranks
    (each writes its own shards and lists them in its own `manifest.rank-<r>.json`), and rank 0
    merges the lists into the one `manifest.json` at the end (and at the start of any later
    harvest, single-process or not, so an interrupted distributed harvest resumes either way).
    """
    from sae import distributed as dist

    t_start = time.perf_counter()
    if tokens.dim() != 2 or keep_mask.shape != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and keep_mask {tuple(keep_mask.shape)} "
                         f"must both be [n_contexts, context_size]")
    if tokens.shape[0] == 0:
        raise CacheError("no contexts to harvest (the token tensor is empty)")
    tokens = tokens.cpu()
    keep_mask = keep_mask.cpu().to(torch.bool)
    hook_names = list(hook_names)
    dname = dtype_name(dtype)
    cdtype = DTYPES[dname]
    ident = full_identity(identity, tokens, keep_mask, hook_names, dname)
    cache_dir = Path(cache_dir)
    rank, world = (dist.rank(), dist.world_size()) if distributed else (0, 1)

    with ActivationCapture(model, hook_names) as cap:
        if rank == 0:  # only one process prepares the directory and the manifest
            error: Exception | None = None
            try:
                m = _prepare(cap, tokens, keep_mask, hook_names, cache_dir, ident, cdtype, dname,
                             contexts_per_shard, shard_bytes, verify)
            except Exception as e:  # noqa: BLE001 - re-raised after telling the other ranks
                error = e
            if world > 1:
                dist.broadcast_object(None if error is None else str(error))
            if error is not None:
                raise error
        else:
            failed = dist.broadcast_object(None)
            if failed is not None:
                raise CacheError(f"rank 0 could not prepare the cache: {failed}")
            m = Manifest.load(cache_dir)
            check_identity(m, ident)
        if m.complete:
            return m

        done = {s.index for s in m.shards}
        todo = [i for i in range(m.n_shards) if i not in done][rank::world]
        if world > 1:  # this rank lists its shards in its own file; rank 0 merges them below
            m.shards = []
            m.manifest_file = rank_manifest_file(rank)
        done_tokens = sum(_n_contexts(m, i) for i in done) * tokens.shape[1]
        _harvest_shards(cap, m, tokens, keep_mask, hook_names, cdtype, dname, todo, batch_contexts,
                        progress and rank == 0, done_tokens, world, _fail_after_shards)

    if world > 1:
        dist.barrier()
        if rank == 0:
            m = Manifest.load(cache_dir)
            _merge_rank_manifests(m, verify="none")
            m.save()
        dist.barrier()
        m = Manifest.load(cache_dir)
    if len(m.shards) != m.n_shards or m.n_tokens != m.n_tokens_expected:
        raise CacheError(f"harvest of {cache_dir} ended with {len(m.shards)} of {m.n_shards} shards; "
                         f"run it again to finish")
    if rank == 0:
        m.complete = True
        m.info["harvest_seconds_last_run"] = round(time.perf_counter() - t_start, 3)
        if world > 1:
            m.info["harvest_ranks_last_run"] = world
        m.save()
    if world > 1:
        dist.barrier()
        m = Manifest.load(cache_dir)
    return m


RANK_MANIFEST = re.compile(r"^manifest\.rank-(\d+)\.json$")


def rank_manifest_file(rank: int) -> str:
    return f"manifest.rank-{rank:05d}.json"


def _n_contexts(m: Manifest, index: int) -> int:
    c0, c1 = m.shard_range(index)
    return c1 - c0


def _merge_rank_manifests(m: Manifest, verify: str = "quick") -> bool:
    """Move the shards listed by the ranks of a distributed harvest into `m` (then delete their
    lists). A shard failing verification is left out (it will be re-harvested). True if any."""
    found = sorted(p for p in m.cache_dir.iterdir() if RANK_MANIFEST.match(p.name))
    if not found:
        return False
    have = {s.index for s in m.shards}
    for path in found:
        try:
            part = Manifest.load(m.cache_dir, path.name)
        except CacheError as e:
            log.warning("%s; its shards will be re-harvested", e)
            continue
        if part.identity != m.identity or part.contexts_per_shard != m.contexts_per_shard:
            raise CacheError(f"{path} belongs to another harvest than {m.cache_dir / MANIFEST}; "
                             f"delete {m.cache_dir} to re-harvest")
        for s in part.shards:
            if s.index in have:
                continue
            if verify != "none":
                try:
                    verify_shard(m, s, full=(verify == "full"))
                except CacheError as e:
                    log.warning("%s; re-harvesting it", e)
                    continue
            m.shards.append(s)
            have.add(s.index)
    m.shards.sort(key=lambda s: s.index)
    m.save()
    for path in found:
        path.unlink(missing_ok=True)
    return True


def _prepare(cap: ActivationCapture, tokens: torch.Tensor, keep_mask: torch.Tensor,
             hook_names: list[str], cache_dir: Path, ident: dict[str, Any], cdtype: torch.dtype,
             dname: str, contexts_per_shard: int | None, shard_bytes: int, verify: str) -> Manifest:
    """Open (verify, resume) or create the cache's manifest; it is saved before returning."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    has_manifest = (cache_dir / MANIFEST).exists()
    _clean_dir(cache_dir, has_manifest)
    n_ctx, T = tokens.shape
    if has_manifest:
        m = Manifest.load(cache_dir)
        check_identity(m, ident)
        _merge_rank_manifests(m, verify)  # shards of an interrupted distributed harvest
        good = []
        for s in m.shards:
            try:
                verify_shard(m, s, full=(verify == "full"))
                good.append(s)
            except CacheError as e:
                log.warning("%s; re-harvesting it", e)
        if len(good) != len(m.shards) or (m.complete and len(good) != m.n_shards):
            m.shards, m.complete = good, False
            m.save()
        if m.complete:
            return m
        probe = cap.run(tokens[:1])
        d_in = {h: int(a.shape[-1]) for h, a in probe.items()}
        if d_in != m.d_in:
            raise CacheError(f"activation cache {cache_dir} holds d_in {m.d_in} but the model gives "
                             f"{d_in}: it was made with another model; use another cache "
                             f"directory, or delete {cache_dir} to re-harvest")
    else:
        probe = cap.run(tokens[:1])
        d_in = {h: int(a.shape[-1]) for h, a in probe.items()}
        per_ctx = T * sum(d_in.values()) * cdtype.itemsize
        m = Manifest(cache_dir=cache_dir, identity=ident, hooks=sorted(hook_names), d_in=d_in,
                     dtype=dname, context_size=T, n_contexts=n_ctx,
                     contexts_per_shard=contexts_per_shard or _default_contexts_per_shard(per_ctx, shard_bytes),
                     n_tokens_expected=int(keep_mask.sum()))
        need = m.n_tokens_expected * m.bytes_per_token() + tokens.numel() * 5
        free = shutil.disk_usage(cache_dir).free
        if need > free:
            raise CacheError(f"the activation cache needs about {need / 1e9:.1f} GB and only "
                             f"{free / 1e9:.1f} GB are free at {cache_dir}; free some space, "
                             f"use a smaller dtype (bfloat16) or fewer tokens")
    m.save()
    if contexts_per_shard and contexts_per_shard != m.contexts_per_shard:
        log.info("resuming %s with its own contexts_per_shard=%d", cache_dir, m.contexts_per_shard)
    return m


def _harvest_shards(cap: ActivationCapture, m: Manifest, tokens: torch.Tensor, keep_mask: torch.Tensor,
                    hook_names: list[str], cdtype: torch.dtype, dname: str, todo: list[int],
                    batch_contexts: int, progress: bool, done_tokens: int, bar_scale: int,
                    _fail_after_shards: int | None) -> None:
    """Write the shards `todo`, listing each in `m` (saved) once it is on disk."""
    n_ctx, T = tokens.shape
    bar_desc = f"harvest {len(hook_names)} hook{'s' * (len(hook_names) > 1)}"
    writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    pending: tuple[int, int, int, int, cf.Future] | None = None

    def finish(p) -> None:
        i, c0, c1, n_tok, fut = p
        nbytes, digest = fut.result()
        m.shards.append(ShardInfo(index=i, file=shard_file(i), bytes=nbytes, sha256=digest,
                                  context_start=c0, n_contexts=c1 - c0, n_tokens=n_tok))
        m.shards.sort(key=lambda s: s.index)
        m.save()

    try:
        with token_bar(n_ctx * T, bar_desc, initial=done_tokens, enabled=progress) as bar:
            for n_written, i in enumerate(todo):
                if _fail_after_shards is not None and n_written >= _fail_after_shards:
                    raise RuntimeError(f"injected failure after {n_written} shards")
                c0, c1 = m.shard_range(i)
                km = keep_mask[c0:c1]
                counts = km.sum(1).tolist()
                n_tok = int(sum(counts))
                bufs = {h: torch.empty((n_tok, m.d_in[h]), dtype=cdtype) for h in hook_names}
                row = 0
                for b0 in range(c0, c1, batch_contexts):
                    b1 = min(c1, b0 + batch_contexts)
                    rows = cap.kept_rows(tokens[b0:b1], keep_mask[b0:b1], cdtype)
                    k = int(sum(counts[b0 - c0:b1 - c0]))
                    for h, r in rows.items():
                        bufs[h][row:row + k].copy_(r)
                    row += k
                    bar.update((b1 - b0) * T * bar_scale)  # distributed: every rank about alike
                tensors = {"tokens": tokens[c0:c1].to(torch.int32), "keep_mask": km,
                           **{ACT_PREFIX + h: bufs[h] for h in hook_names}}
                meta = {"format": FORMAT, "shard": str(i), "context_start": str(c0),
                        "n_contexts": str(c1 - c0), "dtype": dname}
                if pending is not None:
                    finish(pending)  # at most one shard in flight: bounded memory
                    pending = None
                fut = writer.submit(_write_shard, m.shard_path(i), tensors, meta)
                pending = (i, c0, c1, n_tok, fut)
            if pending is not None:
                finish(pending)
                pending = None
    finally:
        if pending is not None:  # an exception above: keep the shard being written if it lands
            try:
                finish(pending)
            except Exception:
                pass
        writer.shutdown(wait=True)
