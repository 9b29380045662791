"""Shuffled batch sources for the trainer: from an activation cache on disk, or straight from the model.

Both implement the trainer's batch-source protocol::

    source.batches(start_step=0) -> Iterator[dict[hook_name, Tensor[batch_size, d_in]]]
    source.tokens_per_epoch, source.d_in, source.hooks

How the shuffle works (the same for both sources). The kept tokens live in *chunks* (a cache shard,
or a block of contexts for the streaming source). Epoch e draws a random order of the chunks from
(seed, e) and cuts it into groups of `group_chunks` chunks; a group is loaded into one in-memory
mixing buffer and its rows are served in a random permutation drawn from (seed, e, group). So a batch
mixes tokens from every context of several shards (all of them when the cache fits the buffer),
every kept token is served exactly once per epoch, and epochs differ. Batches are consecutive
`batch_size` rows of that endless stream (a batch may straddle two groups or two epochs).

Because the chunk sizes are known up front, `batches(start_step)` jumps to step k by arithmetic: it
loads only the group that holds row k * batch_size and yields exactly what an uninterrupted
iteration would have yielded from step k on.

The disk reader loads the next group on a background thread while the current one is served and
reads each shard with one sequential read per tensor straight into the mixing buffer.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import os
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from sae.cache.capture import ActivationCapture
from sae.cache.manifest import Manifest
from sae.cache.shards import ACT_PREFIX, open_cache, read_shard_tensors, token_positions, verify_shard
from sae.errors import CacheError

TOKEN_INDEX = "token_index"  # key of the optional per-row global token index (context * T + pos)

Group = dict[str, torch.Tensor]  # {hook: [rows, d_in], TOKEN_INDEX: [rows]}


def _use_count(t: torch.Tensor) -> int | None:
    """References to t's storage (tensors and views), or None if torch cannot tell us."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except Exception:
        return None


def _unreferenced(t: torch.Tensor) -> bool:
    # held by: the pool's tensor itself, plus the temporary storage object made to ask
    c = _use_count(t)
    return c is not None and c <= 2


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *key])))


class ShuffledBatches:
    """The shuffling/batching engine shared by `CacheReader` and `StreamingSource`.

    chunk_rows[i]: kept-token rows of chunk i. load_group(chunk_ids) -> {hook: [sum rows, d], TOKEN_INDEX:
    [sum rows]} with the chunks' rows concatenated in the given order."""

    def __init__(self, chunk_rows: Sequence[int], load_group: Callable[[list[int]], Group],
                 hooks: Sequence[str], d_in: Mapping[str, int], *, batch_size: int, seed: int,
                 group_chunks: int, out_dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                 prefetch: bool = True, with_index: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, not {seed}")
        self.chunk_rows = [int(r) for r in chunk_rows]
        self.tokens_per_epoch = sum(self.chunk_rows)
        if self.tokens_per_epoch == 0:
            raise CacheError("no kept tokens to serve (every token is excluded by the keep mask)")
        self._load_group = load_group
        self.hooks = list(hooks)
        self.d_in = dict(d_in)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_chunks = max(1, min(int(group_chunks), len(self.chunk_rows)))
        self.out_dtype = out_dtype
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self.with_index = with_index
        self._lock = threading.Lock()
        self._pool: list[Group] = []

    # -- the plan: which chunks form which group, in which row order -------------------------

    def epoch_groups(self, epoch: int) -> list[list[int]]:
        order = _rng(self.seed, epoch, 0, 0).permutation(len(self.chunk_rows)).tolist()
        g = self.group_chunks
        return [order[i:i + g] for i in range(0, len(order), g)]

    def group_permutation(self, epoch: int, group: int, n_rows: int) -> torch.Tensor:
        return torch.from_numpy(_rng(self.seed, epoch, 1, group).permutation(n_rows))

    def steps_per_epoch(self) -> float:
        return self.tokens_per_epoch / self.batch_size

    # -- iteration -----------------------------------------------------------------------------

    def _group_seq(self, epoch: int, group: int) -> Iterator[tuple[int, int, list[int]]]:
        while True:
            groups = self.epoch_groups(epoch)
            for gi in range(group, len(groups)):
                yield epoch, gi, groups[gi]
            epoch, group = epoch + 1, 0

    def batches(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches; `start_step=k` yields what step k of an uninterrupted run would."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, not {start_step}")
        offset = start_step * self.batch_size
        epoch, pos = divmod(offset, self.tokens_per_epoch)
        groups = self.epoch_groups(epoch)
        sizes = np.cumsum([sum(self.chunk_rows[c] for c in g) for g in groups]).tolist()
        gi = bisect.bisect_right(sizes, pos)
        skip = pos - (sizes[gi - 1] if gi else 0)
        return self._iterate(self._group_seq(epoch, gi), skip)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches(0)

    def _prepare(self, item: tuple[int, int, list[int]]) -> Group:
        """Load a group and gather it once into a buffer in its shuffled row order (output dtype,
        pinned if asked): batches are then contiguous slices of it, without a copy."""
        epoch, gi, chunks = item
        with self._lock:  # loaders may reuse staging memory: one group at a time per source
            raw = self._load_group(chunks)
            n = raw[self.hooks[0]].shape[0]
            perm = self.group_permutation(epoch, gi, n)
            dev = raw[self.hooks[0]].device
            out = self._alloc(n, dev)
            for h in self.hooks:
                src, dest = raw[h], out[h]
                p = perm.to(src.device)
                if src.dtype == self.out_dtype:
                    torch.index_select(src, 0, p, out=dest)
                else:
                    dest.copy_(src.index_select(0, p))
            if TOKEN_INDEX in raw:
                out[TOKEN_INDEX] = raw[TOKEN_INDEX].index_select(0, perm.to(raw[TOKEN_INDEX].device))
            return out

    def _alloc(self, n: int, device: torch.device) -> Group:
        """Output buffers for a group of n rows. On the CPU without pinning, a buffer from an earlier
        group is reused once nothing references it any more (no batch, no view of one): freshly
        allocated memory costs page faults that would halve the reader's speed. (Pinned and CUDA
        memory come from torch's caching allocators, which reuse blocks themselves.)"""
        if device.type == "cpu" and not self.pin_memory:
            for g in self._pool:
                if g[self.hooks[0]].shape[0] >= n and all(_unreferenced(g[h]) for h in self.hooks):
                    return {h: g[h][:n] for h in self.hooks}
        pin = self.pin_memory and device.type == "cpu"
        g = {h: torch.empty((n, self.d_in[h]), dtype=self.out_dtype, device=device, pin_memory=pin)
             for h in self.hooks}
        if device.type == "cpu" and not self.pin_memory and _use_count(g[self.hooks[0]]) is not None:
            self._pool = [p for p in self._pool if not all(_unreferenced(p[h]) for h in self.hooks)][-3:]
            self._pool.append(g)
            # Hand out views, never the pool's own tensors: a group held only as the returned dict
            # (prefetched, or a batch straddling groups, before any batch view exists) must count
            # as referenced, or the loader thread would overwrite it while it is being served.
            return {h: g[h][:n] for h in self.hooks}
        return g

    def _iterate(self, seq: Iterator[tuple[int, int, list[int]]], skip: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
        # With prefetch, one worker thread loads (and shuffles) group g+1 while group g is served.
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="group-loader") if self.prefetch else None
        keys = self.hooks + ([TOKEN_INDEX] if self.with_index else [])

        def submit(item):
            return pool.submit(self._prepare, item) if pool else item

        def result(x) -> Group:
            return x.result() if pool else self._prepare(x)

        try:
            nxt = submit(next(seq))
            buf: Group | None = None
            n = cursor = 0
            while True:
                parts: list[tuple[Group, int, int]] = []
                need = self.batch_size
                while need:
                    if buf is None or cursor == n:
                        buf = result(nxt)
                        nxt = submit(next(seq))  # start on the following group now
                        n = buf[self.hooks[0]].shape[0]
                        cursor, skip = skip, 0  # skip < group size (see batches())
                        if n == 0:  # a group whose tokens are all excluded
                            continue
                    take = min(need, n - cursor)
                    parts.append((buf, cursor, cursor + take))
                    cursor += take
                    need -= take
                if len(parts) == 1:  # the usual case: a view, no copy
                    g, a, b = parts[0]
                    yield {k: g[k][a:b] for k in keys}
                else:  # a batch straddling two groups (or epochs)
                    yield {k: self._cat([g[k][a:b] for g, a, b in parts]) for k in keys}
        finally:
            if pool:
                try:
                    pool.shutdown(wait=False, cancel_futures=True)
                except Exception:  # at interpreter exit the executor's module may be gone
                    pass

    def _cat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        x0 = xs[0]
        pin = self.pin_memory and x0.device.type == "cpu" and x0.is_floating_point()
        out = torch.empty((sum(len(x) for x in xs), *x0.shape[1:]), dtype=x0.dtype, device=x0.device,
                          pin_memory=pin)
        return torch.cat(xs, out=out)


def _group_chunks_for(bytes_per_chunk: float, buffer_bytes: int, buffer_chunks: int | None) -> int:
    if buffer_chunks is not None:
        return max(1, int(buffer_chunks))
    return max(1, int(buffer_bytes // max(1.0, bytes_per_chunk)))


class CacheReader(ShuffledBatches):
    """Shuffled batches from an activation cache on disk (see the module docstring).

    cache_dir: a complete cache (harvested by `sae.cache.harvest`).
    batch_size, seed: rows per batch, shuffle seed (same seed = same batches).
    hooks: a subset of the cache's hooks (default all); every batch has the same token rows for each.
    buffer_bytes: size of one mixing buffer in the output dtype (default 1 GiB), or buffer_shards:
        shards per mixing buffer. The whole cache is shuffled globally when it fits in one. Memory
        use is about 4x buffer_bytes: the buffer being served, the next one (prefetched), one
        that a batch still held by the caller may reference, and a staging copy as stored on disk.
    identity: if given, the full identity the cache must have (CacheError naming the differences).
    verify: 'quick' (sizes + headers, default), 'full' (sha256 of every shard now), 'none'.
    out_dtype: dtype of the returned batches (float32). pin_memory: default when CUDA is available.
    with_index: also return TOKEN_INDEX, the global token index (context * T + pos) of each row.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, batch_size: int, seed: int = 0,
                 hooks: Sequence[str] | None = None, buffer_bytes: int = 1 << 30,
                 buffer_shards: int | None = None, identity: Mapping[str, Any] | None = None,
                 verify: str = "quick", out_dtype: torch.dtype = torch.float32,
                 pin_memory: bool | None = None, prefetch: bool = True, with_index: bool = False):
        m = open_cache(cache_dir, identity=identity, verify=verify)
        self.manifest: Manifest = m
        hooks = list(hooks or m.hooks)
        unknown = [h for h in hooks if h not in m.hooks]
        if unknown:
            raise CacheError(f"activation cache {m.cache_dir} has no hook point(s) {unknown}; it holds "
                             f"{m.hooks}")
        self._headers: dict[int, tuple[dict, int]] = {}
        self._staging: Group | None = None
        bytes_per_row = sum(m.d_in[h] for h in hooks) * out_dtype.itemsize
        per_chunk = bytes_per_row * m.n_tokens_expected / max(1, len(m.shards))
        super().__init__([s.n_tokens for s in m.shards], self._load, hooks,
                         {h: m.d_in[h] for h in hooks}, batch_size=batch_size, seed=seed,
                         group_chunks=_group_chunks_for(per_chunk, buffer_bytes, buffer_shards),
                         out_dtype=out_dtype,
                         pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                         prefetch=prefetch, with_index=with_index)

    def _header(self, i: int) -> tuple[dict, int]:
        if i not in self._headers:
            self._headers[i] = verify_shard(self.manifest, self.manifest.shards[i])
        return self._headers[i]

    def _load(self, chunks: list[int]) -> Group:
        m = self.manifest
        n = sum(m.shards[c].n_tokens for c in chunks)
        if self._staging is None or self._staging[self.hooks[0]].shape[0] < n:
            self._staging = {h: torch.empty((n, m.d_in[h]), dtype=m.torch_dtype) for h in self.hooks}
        buf: Group = {h: self._staging[h][:n] for h in self.hooks}  # reused: loads are serialised
        idx = []
        row = 0
        for c in chunks:
            s = m.shards[c]
            header, start = self._header(c)
            k = s.n_tokens
            names = [ACT_PREFIX + h for h in self.hooks] + ["keep_mask"]
            got = read_shard_tensors(m.shard_path(s), header, start, names,
                                     {ACT_PREFIX + h: buf[h][row:row + k] for h in self.hooks})
            idx.append(token_positions(got["keep_mask"], s.context_start))
            row += k
        buf[TOKEN_INDEX] = torch.cat(idx)
        return buf


class StreamingSource(ShuffledBatches):
    """Shuffled batches computed on the fly from the model, never touching disk.

    Same protocol, keep-mask rules and shuffle as `CacheReader`: the contexts are cut into chunks of
    `contexts_per_chunk` (use the cache's contexts_per_shard to reproduce a CacheReader's batches),
    a mixing buffer holds `buffer_chunks` chunks (default: as many as fit in `buffer_bytes`) of
    activations computed on the model's device, and batches come out on that device.
    Resuming at `start_step` recomputes only the buffer that holds that step.
    """

    def __init__(self, model: Any, tokens: torch.Tensor, keep_mask: torch.Tensor,
                 hook_names: Sequence[str], *, batch_size: int, seed: int = 0,
                 contexts_per_chunk: int = 64, buffer_bytes: int = 1 << 30,
                 buffer_chunks: int | None = None, batch_contexts: int = 32,
                 out_dtype: torch.dtype = torch.float32, with_index: bool = False):
        if tokens.dim() != 2 or keep_mask.shape != tokens.shape:
            raise ValueError("tokens and keep_mask must both be [n_contexts, context_size]")
        self.model = model
        self.tokens = tokens.cpu()
        self.keep_mask = keep_mask.cpu().to(torch.bool)
        self.contexts_per_chunk = int(contexts_per_chunk)
        self.batch_contexts = int(batch_contexts)
        self._capture = ActivationCapture(model, hook_names)
        with self._capture as cap:
            probe = cap.run(self.tokens[:1])
        d_in = {h: int(a.shape[-1]) for h, a in probe.items()}
        n_ctx, T = self.tokens.shape
        self._ranges = [(c, min(n_ctx, c + self.contexts_per_chunk))
                        for c in range(0, n_ctx, self.contexts_per_chunk)]
        rows = [int(self.keep_mask[a:b].sum()) for a, b in self._ranges]
        itemsize = probe[hook_names[0]].element_size()
        per_chunk = sum(d_in.values()) * itemsize * (sum(rows) / len(rows))
        super().__init__(rows, self._load, list(hook_names), d_in, batch_size=batch_size,
                         seed=seed, group_chunks=_group_chunks_for(per_chunk, buffer_bytes, buffer_chunks),
                         out_dtype=out_dtype, pin_memory=False, prefetch=False, with_index=with_index)

    def _load(self, chunks: list[int]) -> Group:
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        idx = []
        with self._capture as cap:
            for c in chunks:
                a, b = self._ranges[c]
                for b0 in range(a, b, self.batch_contexts):
                    b1 = min(b, b0 + self.batch_contexts)
                    for h, r in cap.kept_rows(self.tokens[b0:b1], self.keep_mask[b0:b1]).items():
                        parts[h].append(r)
                idx.append(token_positions(self.keep_mask[a:b], a))
        dev = cap.device
        buf: Group = {h: torch.cat(p) if p else torch.empty((0, self.d_in[h]), device=dev)
                      for h, p in parts.items()}
        buf[TOKEN_INDEX] = torch.cat(idx).to(dev)
        return buf
