"""The harvest: every hook's activations over a token tensor, computed and written shard by shard.

Resumable at any point (even SIGKILL): a shard is written to a temp name, fsynced and renamed, and
only then listed in the manifest, so a harvest run again continues with the first shard not listed,
re-harvests the listed ones that fail verification and removes stray temp files.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from sae import distributed as dist
from sae.cache.capture import ActivationCapture
from sae.cache.manifest import (FORMAT, MANIFEST, Manifest, ShardInfo, check_identity, full_identity,
                                shard_file)
from sae.cache.merge import merge_rank_manifests, rank_manifest_file
from sae.cache.shards import ACT_PREFIX, shard_ok, with_sums, write_shard
from sae.dtypes import dtype_name, parse_dtype
from sae.errors import CacheError
from sae.progress import token_bar

log = logging.getLogger(__name__)


def harvest(model: Any, tokens: torch.Tensor, keep_mask: torch.Tensor, hook_names: Sequence[str],
            cache_dir: str | os.PathLike, *, identity: Mapping[str, Any],
            dtype: torch.dtype | str = torch.float32, contexts_per_shard: int | None = None,
            shard_bytes: int = 256 << 20, batch_contexts: int = 32, progress: bool = True,
            verify: str = "quick", distributed: bool = False) -> Manifest:
    """Harvest the activations of every hook in `hook_names` over `tokens` into `cache_dir`.

    One forward pass per `batch_contexts` contexts serves all hooks and stops after the last one.
    Resumes a partial cache with the same identity, re-harvests shards that fail verification
    (`verify`: 'quick' = size + header, 'full' = also sha256), returns at once when the cache is
    already complete, and refuses (CacheError) a cache made for anything else.

    tokens: LongTensor[n_contexts, T]; keep_mask: BoolTensor[n_contexts, T] (False = excluded).
    identity: JSON-able description of the model and data (name, dataset spec, model dtype, ...);
    hooks, cache dtype, shapes and sha256 of tokens and keep_mask are added to it.
    dtype: the cache dtype, float32, bfloat16 or float16 (or an alias such as bf16).
    contexts_per_shard: default, as many as fit in `shard_bytes` (256 MiB).
    distributed: every rank of an initialised torch.distributed group calls harvest with the same
    arguments and a `cache_dir` they share; the shards still missing are split between the ranks
    (each writes its own shards and lists them in its own `manifest.rank-<r>.json`), and rank 0
    merges the lists into the one `manifest.json` at the end (and at the start of any later
    harvest, single-process or not, so an interrupted distributed harvest resumes either way).
    """
    t_start = time.perf_counter()
    tokens, keep_mask = _checked_tokens(tokens, keep_mask)
    cache_dtype = parse_dtype(dtype, "cache dtype", CacheError)
    ident = full_identity(identity, tokens, keep_mask, list(hook_names), cache_dtype)
    cache_dir = Path(cache_dir)
    rank, world = (dist.rank(), dist.world_size()) if distributed else (0, 1)

    with ActivationCapture(model, hook_names) as cap:
        m = _open_on_every_rank(
            lambda: _prepare(cap, tokens, keep_mask, cache_dir, ident, cache_dtype, contexts_per_shard,
                             shard_bytes, verify),
            cache_dir, ident, rank, world)
        if m.complete:
            return m
        todo, done_tokens = _share_of_rank(m, rank, world)
        with token_bar(tokens.numel(), _bar_title(cap.hook_names), initial=done_tokens,
                       enabled=progress and rank == 0) as bar:
            # every rank moves at about the same pace: rank 0's bar counts for all of them
            _write_shards(cap, m, tokens, keep_mask, todo, batch_contexts,
                          on_batch=lambda n_contexts: bar.update(n_contexts * m.context_size * world))
    if world > 1:
        m = _merge_ranks(cache_dir, rank)
    return _finish(m, rank, world, t_start)


# ---- the steps ---------------------------------------------------------------------------------


def _checked_tokens(tokens: torch.Tensor, keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and keep_mask on the CPU, keep_mask as bool; ValueError/CacheError for bad shapes."""
    if tokens.dim() != 2 or keep_mask.shape != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and keep_mask {tuple(keep_mask.shape)} "
                         f"must both be [n_contexts, context_size]")
    if tokens.shape[0] == 0:
        raise CacheError("no contexts to harvest (the token tensor is empty)")
    return tokens.cpu(), keep_mask.cpu().to(torch.bool)


def _open_on_every_rank(prepare: Callable[[], Manifest], cache_dir: Path, ident: dict[str, Any],
                        rank: int, world: int) -> Manifest:
    """Rank 0 runs `prepare` (the directory and the manifest); the other ranks wait for it, then
    load the manifest it saved. An error on rank 0 is raised on every rank."""
    if rank != 0:
        failed = dist.broadcast_object(None)
        if failed is not None:
            raise CacheError(f"rank 0 could not prepare the cache: {failed}")
        m = Manifest.load(cache_dir)
        check_identity(m, ident)
        return m
    error: Exception | None = None
    try:
        m = prepare()
    except Exception as e:  # noqa: BLE001 - re-raised after telling the other ranks
        error = e
    if world > 1:
        dist.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    return m


def _prepare(cap: ActivationCapture, tokens: torch.Tensor, keep_mask: torch.Tensor, cache_dir: Path,
             ident: dict[str, Any], dtype: torch.dtype, contexts_per_shard: int | None,
             shard_bytes: int, verify: str) -> Manifest:
    """Open (verify, resume) or create the cache's manifest; it is saved before returning."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    has_manifest = (cache_dir / MANIFEST).exists()
    _clean_dir(cache_dir, has_manifest)
    if has_manifest:
        m = _reopen(cap, tokens, cache_dir, ident, verify)
        if m.complete:
            return m
    else:
        m = _create(cap, tokens, keep_mask, cache_dir, ident, dtype, contexts_per_shard, shard_bytes)
    m.save()
    if contexts_per_shard and contexts_per_shard != m.contexts_per_shard:
        log.info("resuming %s with its own contexts_per_shard=%d", cache_dir, m.contexts_per_shard)
    return m


def _clean_dir(cache_dir: Path, has_manifest: bool) -> None:
    for p in cache_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)  # a write interrupted before its rename
        elif not has_manifest and not re.fullmatch(r"shard_\d{5}\.safetensors", p.name):
            raise CacheError(f"{cache_dir} is not empty and holds no {MANIFEST} ({p.name} is in "
                             f"it); refusing to write an activation cache there: choose a new or "
                             f"empty directory")


def _reopen(cap: ActivationCapture, tokens: torch.Tensor, cache_dir: Path, ident: dict[str, Any],
            verify: str) -> Manifest:
    """The cache's manifest with the shards of an interrupted distributed harvest merged in and
    the shards that fail verification left out (they will be re-harvested)."""
    m = Manifest.load(cache_dir)
    check_identity(m, ident)
    merge_rank_manifests(m, verify)
    good = [s for s in m.shards if shard_ok(m, s, full=(verify == "full"))]
    if len(good) != len(m.shards) or (m.complete and len(good) != m.n_shards):
        m.shards, m.complete = good, False
        m.save()
    if m.complete:
        return m
    d_in = cap.d_in(tokens)
    if d_in != m.d_in:
        raise CacheError(f"activation cache {cache_dir} holds d_in {m.d_in} but the model gives "
                         f"{d_in}: it was made with another model; use another cache "
                         f"directory, or delete {cache_dir} to re-harvest")
    return m


def _create(cap: ActivationCapture, tokens: torch.Tensor, keep_mask: torch.Tensor, cache_dir: Path,
            ident: dict[str, Any], dtype: torch.dtype, contexts_per_shard: int | None,
            shard_bytes: int) -> Manifest:
    """A new manifest, once the model has given the widths and the disk has room for the cache."""
    n_ctx, T = tokens.shape
    d_in = cap.d_in(tokens)
    bytes_per_context = T * sum(d_in.values()) * dtype.itemsize
    m = Manifest(cache_dir=cache_dir, identity=ident, hooks=sorted(cap.hook_names), d_in=d_in,
                 dtype=dtype_name(dtype), context_size=T, n_contexts=n_ctx,
                 contexts_per_shard=contexts_per_shard or max(1, shard_bytes // max(1, bytes_per_context)),
                 n_tokens_expected=int(keep_mask.sum()))
    need = m.n_tokens_expected * m.bytes_per_token() + tokens.numel() * 5
    free = shutil.disk_usage(cache_dir).free
    if need > free:
        raise CacheError(f"the activation cache needs about {need / 1e9:.1f} GB and only "
                         f"{free / 1e9:.1f} GB are free at {cache_dir}; free some space, "
                         f"use a smaller dtype (bfloat16) or fewer tokens")
    return m


def _share_of_rank(m: Manifest, rank: int, world: int) -> tuple[list[int], int]:
    """The missing shards this rank writes, and the tokens already harvested (for the progress
    bar). With several ranks, `m` becomes this rank's own list (rank 0 merges them)."""
    done = {s.index for s in m.shards}
    todo = [i for i in range(m.n_shards) if i not in done][rank::world]
    done_contexts = sum(c1 - c0 for c0, c1 in map(m.shard_range, done))
    if world > 1:
        m.shards = []
        m.manifest_file = rank_manifest_file(rank)
    return todo, done_contexts * m.context_size


def _bar_title(hook_names: Sequence[str]) -> str:
    return f"harvest {len(hook_names)} hook{'s' * (len(hook_names) > 1)}"


def _write_shards(cap: ActivationCapture, m: Manifest, tokens: torch.Tensor, keep_mask: torch.Tensor,
                  todo: list[int], batch_contexts: int, on_batch: Callable[[int], None]) -> None:
    """Compute the shards `todo`; each is written while the next is computed, and listed in `m`."""
    with _ShardWriter(m) as writer:
        for index in todo:
            writer.submit(index, _compute_shard(cap, m, tokens, keep_mask, index, batch_contexts, on_batch))


def _compute_shard(cap: ActivationCapture, m: Manifest, tokens: torch.Tensor, keep_mask: torch.Tensor,
                   index: int, batch_contexts: int, on_batch: Callable[[int], None]
                   ) -> dict[str, torch.Tensor]:
    """Shard `index`'s tensors in file order: tokens, keep_mask, then each hook's kept rows
    [n_kept, d_in] in the cache dtype. `on_batch(n_contexts)` follows the forward passes."""
    c0, c1 = m.shard_range(index)
    counts = keep_mask[c0:c1].sum(1).tolist()
    dtype = m.torch_dtype
    acts = {h: torch.empty((int(sum(counts)), m.d_in[h]), dtype=dtype) for h in cap.hook_names}
    row = 0
    for b0 in range(c0, c1, batch_contexts):
        b1 = min(c1, b0 + batch_contexts)
        rows = cap.kept_rows(tokens[b0:b1], keep_mask[b0:b1], dtype)
        k = int(sum(counts[b0 - c0:b1 - c0]))
        for h, r in rows.items():
            acts[h][row:row + k].copy_(r)
        row += k
        on_batch(b1 - b0)
    return {"tokens": tokens[c0:c1].to(torch.int32), "keep_mask": keep_mask[c0:c1],
            **{ACT_PREFIX + h: acts[h] for h in cap.hook_names}}


def _write_with_sums(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[int, str]:
    # summed here, on the writer's thread, so the sums cost the forward passes nothing
    return write_shard(path, with_sums(tensors), meta)


class _ShardWriter:
    """Writes shards (with their activation sums) on a background thread while the next one is
    computed, one in flight at a time (bounded memory), and lists each in the manifest (saved)
    once it is on disk. Leaving the
    `with` block waits for the shard in flight, on an error too (it is kept if it lands)."""

    def __init__(self, m: Manifest):
        self.m = m
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: tuple[int, int, cf.Future] | None = None  # index, kept tokens, the write

    def submit(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.finish()
        c0, c1 = self.m.shard_range(index)
        meta = {"format": FORMAT, "shard": str(index), "context_start": str(c0),
                "n_contexts": str(c1 - c0), "dtype": self.m.dtype}
        write = self._pool.submit(_write_with_sums, self.m.shard_path(index), tensors, meta)
        self._pending = (index, int(tensors["keep_mask"].sum()), write)

    def finish(self) -> None:
        """Wait for the shard in flight, if any, and list it in the manifest."""
        if self._pending is None:
            return
        (index, n_tokens, write), self._pending = self._pending, None
        nbytes, digest = write.result()
        c0, c1 = self.m.shard_range(index)
        self.m.shards.append(ShardInfo(index=index, file=shard_file(index), bytes=nbytes, sha256=digest,
                                       context_start=c0, n_contexts=c1 - c0, n_tokens=n_tokens))
        self.m.shards.sort(key=lambda s: s.index)
        self.m.save()

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.finish()
            else:
                try:
                    self.finish()
                except Exception:  # noqa: BLE001 - the error already under way is the one to report
                    pass
        finally:
            self._pool.shutdown(wait=True)


def _merge_ranks(cache_dir: Path, rank: int) -> Manifest:
    """Once every rank has written its shards, rank 0 merges their lists into manifest.json."""
    dist.barrier()
    if rank == 0:
        m = Manifest.load(cache_dir)
        merge_rank_manifests(m, verify="none")
        m.save()
    dist.barrier()
    return Manifest.load(cache_dir)


def _finish(m: Manifest, rank: int, world: int, t_start: float) -> Manifest:
    """Check that every shard is listed and mark the cache complete (rank 0 saves it)."""
    if len(m.shards) != m.n_shards or m.n_tokens != m.n_tokens_expected:
        raise CacheError(f"harvest of {m.cache_dir} ended with {len(m.shards)} of {m.n_shards} shards; "
                         f"run it again to finish")
    if rank == 0:
        m.complete = True
        m.info["harvest_seconds_last_run"] = round(time.perf_counter() - t_start, 3)
        if world > 1:
            m.info["harvest_ranks_last_run"] = world
        m.save()
    if world > 1:
        dist.barrier()
        m = Manifest.load(m.cache_dir)
    return m
