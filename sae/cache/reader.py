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

The disk reader prepares the next group on a background thread while the current one is served:
each shard is read front to back, in large sequential reads, straight into the rows of the mixing
buffer where its tokens go in the shuffled order (`scatter_read`), on a few I/O threads; so a group
costs one pass over its bytes, like a plain read of its files. So that the first epoch costs what
the later ones do, the mixing buffers are allocated (and pinned when CUDA is available) and touched
once, when the reader is made, on 2 MB pages where Linux allows (rows written at random places then
cost a TLB entry per 2 MB, not per 4 kB), and reused: batches are views into them, in the cache
dtype; a batch still referenced by the caller is never overwritten.
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
from sae.cache.scatter_read import advise_huge_pages, read_file_rows_into
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
    [sum rows]} with the chunks' rows concatenated in the given order (a subclass may instead
    override `_shuffled`, which puts a group's rows straight into their shuffled places)."""

    def __init__(self, chunk_rows: Sequence[int], load_group: Callable[[list[int]], Group] | None,
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
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.prefetch = prefetch
        self.with_index = with_index
        self._buffer_dtype = out_dtype  # the mixing buffers' dtype; batches are converted if it differs
        self._lock = threading.Lock()
        self._pool: list[Group] = []

    # -- the plan: which chunks form which group, in which row order -------------------------

    def epoch_groups(self, epoch: int) -> list[list[int]]:
        order = _rng(self.seed, epoch, 0, 0).permutation(len(self.chunk_rows)).tolist()
        g = self.group_chunks
        return [order[i:i + g] for i in range(0, len(order), g)]

    def group_permutation(self, epoch: int, group: int, n_rows: int) -> torch.Tensor:
        """Row i of the shuffled group is row perm[i] of its chunks' rows, concatenated."""
        return torch.from_numpy(_rng(self.seed, epoch, 1, group).permutation(n_rows))

    def steps_per_epoch(self) -> float:
        return self.tokens_per_epoch / self.batch_size

    def max_group_rows(self) -> int:
        """An upper bound on the rows of any group (its largest chunks)."""
        return sum(sorted(self.chunk_rows, reverse=True)[:self.group_chunks])

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
        """A group's rows in its shuffled order, in one buffer: batches are then contiguous slices
        of it, without a copy."""
        epoch, gi, chunks = item
        perm = self.group_permutation(epoch, gi, sum(self.chunk_rows[c] for c in chunks))
        with self._lock:  # one group at a time per source: the buffer pool is not thread-safe
            return self._shuffled(chunks, perm)

    def _shuffled(self, chunks: list[int], perm: torch.Tensor) -> Group:
        """Load the chunks, then gather their rows in the order `perm` (on the rows' device)."""
        raw = self._load_group(chunks)
        src0 = raw[self.hooks[0]]
        out = self._alloc(len(perm), src0.device)
        for h in self.hooks:
            src, dest = raw[h], out[h]
            p = perm.to(src.device)
            if src.dtype == dest.dtype:
                torch.index_select(src, 0, p, out=dest)
            else:
                dest.copy_(src.index_select(0, p))
        if TOKEN_INDEX in raw:
            out[TOKEN_INDEX] = raw[TOKEN_INDEX].index_select(0, perm.to(raw[TOKEN_INDEX].device))
        return out

    def _new_buffers(self, n: int, device: torch.device) -> Group:
        pin = self.pin_memory and device.type == "cpu"
        group = {h: torch.empty((n, self.d_in[h]), dtype=self._buffer_dtype, device=device, pin_memory=pin)
                 for h in self.hooks}
        if not pin:  # (pinned memory is already mapped and locked: too late to ask for huge pages)
            for t in group.values():
                advise_huge_pages(t)
        return group

    def _alloc(self, n: int, device: torch.device) -> Group:
        """Mixing buffers for a group of n rows. On the CPU, a buffer from an earlier group is reused
        once nothing references it any more (no batch, no view of one): freshly allocated memory
        costs page faults (and pinning) that would cost more than reading the group. (CUDA memory
        comes from torch's caching allocator, which reuses blocks itself.)"""
        if device.type != "cpu":
            return self._new_buffers(n, device)
        for g in self._pool:
            if g[self.hooks[0]].shape[0] >= n and all(_unreferenced(g[h]) for h in self.hooks):
                return {h: g[h][:n] for h in self.hooks}
        g = self._new_buffers(n, device)
        if _use_count(g[self.hooks[0]]) is None:
            return g
        self._pool = [p for p in self._pool if not all(_unreferenced(p[h]) for h in self.hooks)][-3:]
        self._pool.append(g)
        # Hand out views, never the pool's own tensors: a group held only as the returned dict
        # (prefetched, or a batch straddling groups, before any batch view exists) must count
        # as referenced, or the loader thread would overwrite it while it is being served.
        return {h: g[h][:n] for h in self.hooks}

    def _reserve(self, count: int) -> None:
        """Allocate `count` CPU mixing buffers of the largest group now, and touch every page, so
        that the first epoch runs as fast as the later ones."""
        n = self.max_group_rows()
        for _ in range(count):
            g = self._new_buffers(n, torch.device("cpu"))
            for t in g.values():
                t.zero_()
            self._pool.append(g)

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
                    yield {k: self._out(g[k][a:b]) for k in keys}
                else:  # a batch straddling two groups (or epochs)
                    yield {k: self._out(self._cat([g[k][a:b] for g, a, b in parts])) for k in keys}
        finally:
            if pool:
                try:
                    pool.shutdown(wait=False, cancel_futures=True)
                except Exception:  # at interpreter exit the executor's module may be gone
                    pass

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        """A batch tensor in out_dtype (converted here, by the consumer, only when the buffers
        hold another dtype)."""
        return x.to(self.out_dtype) if x.is_floating_point() and x.dtype != self.out_dtype else x

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


def _io_threads() -> int:
    """Threads that read shards into the mixing buffers: enough to outrun one sequential reader
    (a row copy to a random place costs more than a sequential one), not more than the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


class CacheReader(ShuffledBatches):
    """Shuffled batches from an activation cache on disk (see the module docstring).

    cache_dir: a complete cache (harvested by `sae.cache.harvest`).
    batch_size, seed: rows per batch, shuffle seed (same seed = same batches).
    hooks: a subset of the cache's hooks (default all); every batch has the same token rows for each.
    buffer_bytes: size of one mixing buffer in the cache dtype (default 1 GiB), or buffer_shards:
        shards per mixing buffer. The whole cache is shuffled globally when it fits in one. Memory
        use is 3x buffer_bytes, allocated when the reader is made: the buffer being served, the
        next one (prefetched), and one that a batch still held by the caller may reference.
    identity: if given, the full identity the cache must have (CacheError naming the differences).
    verify: 'quick' (sizes + headers, default), 'full' (sha256 of every shard now), 'none'.
    out_dtype: dtype of the returned batches; default the cache dtype (then batches are views of the
        mixing buffer; another dtype costs a conversion of each batch, better done on the device).
    pin_memory: page-locked buffers, for non-blocking copies to the GPU; default when CUDA is available.
    with_index: also return TOKEN_INDEX, the global token index (context * T + pos) of each row.
    io_threads: threads reading shards (default: up to 4, no more than the cores).
    """

    def __init__(self, cache_dir: str | os.PathLike, *, batch_size: int, seed: int = 0,
                 hooks: Sequence[str] | None = None, buffer_bytes: int = 1 << 30,
                 buffer_shards: int | None = None, identity: Mapping[str, Any] | None = None,
                 verify: str = "quick", out_dtype: torch.dtype | None = None,
                 pin_memory: bool | None = None, prefetch: bool = True, with_index: bool = False,
                 io_threads: int | None = None):
        m = open_cache(cache_dir, identity=identity, verify=verify)
        self.manifest: Manifest = m
        hooks = list(hooks or m.hooks)
        unknown = [h for h in hooks if h not in m.hooks]
        if unknown:
            raise CacheError(f"activation cache {m.cache_dir} has no hook point(s) {unknown}; it holds "
                             f"{m.hooks}")
        self._headers: dict[int, tuple[dict, int]] = {}
        per_chunk = m.bytes_per_token() * m.n_tokens_expected / max(1, len(m.shards))
        per_chunk *= sum(m.d_in[h] for h in hooks) / sum(m.d_in.values())
        super().__init__([s.n_tokens for s in m.shards], None, hooks,
                         {h: m.d_in[h] for h in hooks}, batch_size=batch_size, seed=seed,
                         group_chunks=_group_chunks_for(per_chunk, buffer_bytes, buffer_shards),
                         out_dtype=out_dtype or m.torch_dtype,
                         pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                         prefetch=prefetch, with_index=with_index)
        self._buffer_dtype = m.torch_dtype
        self.io_threads = int(io_threads or _io_threads())
        self._io = cf.ThreadPoolExecutor(max_workers=max(1, self.io_threads - 1),
                                         thread_name_prefix="shard-reader")
        self._reserve(3 if prefetch else 2)

    def _header(self, i: int) -> tuple[dict, int]:
        if i not in self._headers:
            self._headers[i] = verify_shard(self.manifest, self.manifest.shards[i])
        return self._headers[i]

    def _shuffled(self, chunks: list[int], perm: torch.Tensor) -> Group:
        """Read the chunks' rows straight into their places in a mixing buffer: row r of the
        group goes to row dest[r], where perm[dest[r]] = r."""
        n = len(perm)
        out = self._alloc(n, torch.device("cpu"))
        dest = np.empty(n, dtype=np.int64)  # numpy: these small index steps need no thread pool
        dest[perm.numpy()] = np.arange(n)
        tasks, index_parts, row = [], [], 0
        for c in chunks:
            k = self.manifest.shards[c].n_tokens
            tasks += self._read_tasks(c, out, dest[row:row + k])
            if self.with_index:
                index_parts.append(self._token_index(c).numpy())
            row += k
        self._run_tasks(tasks)
        if self.with_index:
            index = np.empty(n, dtype=np.int64)
            index[dest] = np.concatenate(index_parts)
            out[TOKEN_INDEX] = torch.from_numpy(index)
        return out

    def _run_tasks(self, tasks: list[tuple]) -> None:
        """Run the reads on io_threads threads, this one included, each taking the next piece as
        it becomes free (so a thread that the OS runs late delays the group by one piece at most);
        return once every read has ended, raising the first error."""
        queue = iter(tasks)
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    task = next(queue, None)
                if task is None:
                    return
                read_file_rows_into(*task)

        futures = [self._io.submit(drain) for _ in range(min(self.io_threads, len(tasks)) - 1)]
        try:
            drain()
        finally:
            cf.wait(futures)  # no read may still write into the buffer once it is handed out
        for f in futures:
            f.result()

    def _read_tasks(self, c: int, out: Group, dest: np.ndarray) -> list[tuple]:
        """(path, byte offset, buffer, destination rows) for pieces of about 16 MB of shard c."""
        header, start = self._header(c)
        path = self.manifest.shard_path(self.manifest.shards[c])
        tasks = []
        for h in self.hooks:
            b0, b1 = header[ACT_PREFIX + h]["data_offsets"]
            row_bytes = out[h][0].numel() * out[h].element_size()
            if (b1 - b0) != len(dest) * row_bytes:
                raise CacheError(f"shard {path}: tensor {ACT_PREFIX + h} does not match the manifest")
            step = max(1, (16 << 20) // row_bytes)
            for r in range(0, len(dest), step):
                tasks.append((path, start + b0 + r * row_bytes, out[h], dest[r:r + step]))
        return tasks

    def _token_index(self, c: int) -> torch.Tensor:
        s = self.manifest.shards[c]
        header, start = self._header(c)
        mask = read_shard_tensors(self.manifest.shard_path(s), header, start, ["keep_mask"])["keep_mask"]
        return token_positions(mask, s.context_start)


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
