"""Harvest and cache-read throughput, every stage side by side in one run.

Prints, in tokens/s (and MB/s for the reads), with ratios:
  - bare forward: the model's forward to the hooked layer (stop_at_layer), no hooks;
  - harvest: `sae.cache.harvest` (forward + capture + shards with their sums + manifest) on the
    same tokens, and its overhead over the bare forward (target < 10%);
  - sequential read: every shard file read front to back into memory (the reference);
  - shuffled read, epoch 1 and epoch 2: `CacheReader` batches (target: >= 90% of the sequential
    read in both), after its start-up (verification, allocating and touching its buffers), which
    is timed apart;
  - read to device: the reader's batches through `sae.cache.to_device` and converted to float32
    on the training device, as the trainer takes them (CUDA when present, else the CPU).

The model stages run on `--tokens` random token ids (throughput does not depend on the text). The
read stages run on that harvested cache, or with `--read-tokens N` on a cache of N tokens of random
activations of the same width written for the purpose (kept in `--cache-dir` to be reused).

Every read stage (each of the two epochs included) starts from the same page-cache state, and the
table says how much of the cache was in memory at each start. `--page-cache cold` (the default)
evicts the shards (posix_fadvise DONTNEED) before each stage, so every stage reads the disk: the
case of the caches users train on (100M to 1B tokens are 115 GB to 1.2 TB at d_in 576 in bf16),
which never fit in memory (evicting measures it without a cache larger than memory). `--page-cache warm` reads the whole cache once, untimed, before each stage, so every stage
reads memory (the later epochs of a cache that fits in memory next to the reader's buffers).
Without a reset, the first stage left the shards in memory for the next, or the reader's buffers
pushed them out, so the stages were not compared from the same state. The epochs are timed on a
reader that does not prefetch: with a consumer that takes no time prefetching overlaps nothing,
and no read is then in flight across the reset between the epochs.

    python benchmarks/harvest.py --quick                          # a smoke run, a minute
    python benchmarks/harvest.py --tokens 65536                   # the model stages
    python benchmarks/harvest.py --no-model --read-tokens 10M --dtype bfloat16 --cache-dir /tmp/c10m
    python benchmarks/harvest.py --no-model --read-tokens 10M --dtype bfloat16 --cache-dir /tmp/c10m --page-cache warm

`read_to_device(cache_dir, device, ...)` is the reader-to-GPU measurement for other scripts (the
GPU check): tokens/s onto the device, and with `step_ms` how much a feed slows a step that takes
that long (1.00: the copies are hidden behind compute).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.cache import CacheReader, Manifest, ShardInfo, harvest, to_device  # noqa: E402
from sae.cache.manifest import shard_file  # noqa: E402
from sae.cache.shards import ACT_PREFIX, with_sums, write_shard  # noqa: E402
from sae.dtypes import dtype_name, parse_dtype  # noqa: E402
from sae.models import load_model, model_device, stop_layer  # noqa: E402

SYNTHETIC_HOOK = "blocks.3.hook_resid_post"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count(text: str) -> int:
    """'10M' -> 10_000_000, '64k' -> 64_000, '65536' -> 65536."""
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


# ---- the model stages ---------------------------------------------------------------------------


def random_tokens(model, n_tokens: int, context_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_ctx, T] random ids (BOS first, excluded by the keep mask) and the keep mask."""
    n_ctx = max(1, n_tokens // context_size)
    tokens = torch.randint(0, model.cfg.d_vocab, (n_ctx, context_size))
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    tokens[:, 0] = bos if bos is not None else 0
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    return tokens, keep


def bare_forward(model, tokens: torch.Tensor, stop: int | None, batch_contexts: int, dev) -> float:
    """Seconds for the plain forward to the hooked layer over every context."""
    with torch.no_grad():
        model(tokens[:batch_contexts].to(dev), stop_at_layer=stop, return_type=None)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        for b0 in range(0, tokens.shape[0], batch_contexts):
            model(tokens[b0:b0 + batch_contexts].to(dev), stop_at_layer=stop, return_type=None)
        sync(dev)
        return time.perf_counter() - t0


def model_stages(a, hooks: list[str], cache_dir: Path) -> tuple[list[tuple], Manifest, int]:
    """Rows for the bare forward and the harvest (alternated, so both see the same load of a
    shared machine); the harvested cache's manifest; the model's width at the first hook."""
    t = time.perf_counter()
    model = load_model(a.model, device=a.device, dtype=a.model_dtype)
    dev = model_device(model)
    tokens, keep = random_tokens(model, a.tokens, a.context_size)
    n_tok, bc = tokens.numel(), a.batch_contexts
    stop = stop_layer(hooks, len(model.blocks))
    print(f"model {a.model} on {dev} ({a.model_dtype}), loaded in {time.perf_counter() - t:.1f}s; hooks "
          f"{hooks}; {tokens.shape[0]} contexts x {a.context_size} = {n_tok} tokens; batches of {bc} "
          f"contexts; stop_at_layer={stop}")
    t_bares, t_harvs = [bare_forward(model, tokens, stop, bc, dev)], []
    for _ in range(a.repeat):
        shutil.rmtree(cache_dir, ignore_errors=True)
        t0 = time.perf_counter()
        m = harvest(model, tokens, keep, hooks, cache_dir, identity={"model": a.model, "bench": True},
                    dtype=a.dtype, contexts_per_shard=a.contexts_per_shard, batch_contexts=bc,
                    progress=False)
        sync(dev)
        t_harvs.append(time.perf_counter() - t0)
        t_bares.append(bare_forward(model, tokens, stop, bc, dev))
    t_b, t_h = min(t_bares), min(t_harvs)
    runs = lambda ts: "runs " + ", ".join(f"{n_tok / t:,.0f}" for t in ts)  # noqa: E731
    rows = [(f"bare forward to the hook (best of {len(t_bares)})", n_tok / t_b, None, "", runs(t_bares)),
            (f"harvest -> cache (best of {len(t_harvs)})", n_tok / t_h, None,
             f"{100 * (t_h / t_b - 1):+.1f}% time vs bare", runs(t_harvs))]
    return rows, m, m.d_in[hooks[0]]


# ---- a cache of any size ------------------------------------------------------------------------


def synthetic_cache(cache_dir: Path, n_tokens: int, d_in: int, dtype: torch.dtype,
                    context_size: int = 128, shard_bytes: int = 256 << 20) -> Manifest:
    """A complete cache of n_tokens random activations (one hook, width d_in), in the format the
    harvest writes (BOS excluded); reused when `cache_dir` already holds this one."""
    ident = {"synthetic": True, "n_tokens": n_tokens, "d_in": d_in, "dtype": dtype_name(dtype),
             "context_size": context_size}
    try:
        m = Manifest.load(cache_dir)
        if m.complete and m.identity == ident:
            return m
    except Exception:  # noqa: BLE001 - absent or another cache: write it anew
        pass
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    kept_per_ctx = context_size - 1
    n_ctx = -(-n_tokens // kept_per_ctx)
    m = Manifest(cache_dir=cache_dir, identity=ident, hooks=[SYNTHETIC_HOOK], d_in={SYNTHETIC_HOOK: d_in},
                 dtype=dtype_name(dtype), context_size=context_size, n_contexts=n_ctx,
                 contexts_per_shard=max(1, shard_bytes // (context_size * d_in * dtype.itemsize)),
                 n_tokens_expected=n_ctx * kept_per_ctx)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(m.n_shards):
        c0, c1 = m.shard_range(i)
        keep = torch.ones((c1 - c0, context_size), dtype=torch.bool)
        keep[:, 0] = False
        acts = torch.randn(((c1 - c0) * kept_per_ctx, d_in), generator=g).to(dtype)
        tensors = {"tokens": torch.zeros((c1 - c0, context_size), dtype=torch.int32), "keep_mask": keep,
                   ACT_PREFIX + SYNTHETIC_HOOK: acts}
        nbytes, digest = write_shard(m.shard_path(i), with_sums(tensors),
                                     {"format": "sae-activation-cache", "shard": str(i)})
        m.shards.append(ShardInfo(index=i, file=shard_file(i), bytes=nbytes, sha256=digest,
                                  context_start=c0, n_contexts=c1 - c0, n_tokens=len(acts)))
    m.complete = True
    m.save()
    print(f"wrote a synthetic cache of {m.n_tokens:,} tokens x {d_in} {m.dtype} ({m.n_shards} shards) "
          f"in {time.perf_counter() - t0:.0f}s")
    return m


# ---- the read stages ----------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process, every thread (on a shared machine, steadier than the wall clock)."""
    return time.process_time()


def resident(m: Manifest) -> float | None:
    """Fraction of the cache's bytes in the page cache (Linux mincore), None where unknown: a read
    from disk and a read from memory are different measurements."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        page, held, total = os.sysconf("SC_PAGE_SIZE"), 0, 0
        for s in m.shards:
            with open(m.shard_path(s), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                ok = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
                libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
                if not ok:
                    return None
                held += sum(b & 1 for b in bytes(vec)) * page
                total += pages * page
        return held / total
    except (OSError, AttributeError, ValueError):
        return None


def sequential_read(m: Manifest) -> tuple[float, float]:
    """(wall, CPU) seconds to read every shard file front to back into one reused buffer."""
    files = [m.shard_path(s) for s in m.shards]
    view = memoryview(bytearray(max(f.stat().st_size for f in files)))
    t0, c0 = time.perf_counter(), cpu_seconds()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0, cpu_seconds() - c0


def drop_from_page_cache(m: Manifest) -> None:
    """Evict the cache's shards from the page cache (posix_fadvise DONTNEED, after a flush: only
    clean pages can be dropped), so that the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("--page-cache cold needs posix_fadvise (Linux); use --page-cache warm")
    for s in m.shards:
        fd = os.open(m.shard_path(s), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def page_cache_reset(m: Manifest, state: str) -> Callable[[], float | None]:
    """A function that puts the cache's shards in the page-cache `state` ('cold': none of them in
    memory; 'warm': all, after one untimed sequential read) and returns the fraction resident."""
    def reset() -> float | None:
        drop_from_page_cache(m) if state == "cold" else sequential_read(m)
        return resident(m)
    return reset


def shuffled_epochs(r: CacheReader, reset: Callable[[], float | None], epochs: int = 2
                    ) -> list[tuple[float, float, float | None]]:
    """(wall, CPU) seconds of each of the reader's first epochs of shuffled batches, each after
    `reset` (its result, the fraction of the cache in memory, comes third). The reader must not
    prefetch: a group read in flight across the reset would start the next epoch ahead."""
    n, b, it, served, times = r.tokens_per_epoch, r.batch_size, r.batches(), 0, []
    for e in range(epochs):
        held = reset()
        t0, c0 = time.perf_counter(), cpu_seconds()
        while served + b <= (e + 1) * n:
            next(it)
            served += b
        times.append((time.perf_counter() - t0, cpu_seconds() - c0, held))
    return times


def read_to_device(cache_dir: str | Path, device: str | torch.device, *, batch_size: int = 4096,
                   batches: int | None = None, step_ms: float | None = None,
                   reader: CacheReader | None = None) -> dict[str, float]:
    """Reader to device: {'tokens_per_s': ...} for `batches` batches (default one epoch) arriving on
    `device` as float32, as the trainer takes them. With `step_ms`, each batch also feeds a stand-in
    training step (matmuls) of about that length on the device, timed against the same steps on one
    resident batch: 'slowdown' 1.00 means the transfers hide behind compute."""
    device = torch.device(device)
    r = reader or CacheReader(cache_dir, batch_size=batch_size, seed=0)
    n = batches or max(1, r.tokens_per_epoch // r.batch_size)
    step = _stand_in_step(r.d_in[r.hooks[0]], device, step_ms) if step_ms else (lambda x: None)
    feed = to_device(r.batches(), device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        x = next(feed)[r.hooks[0]].to(device, torch.float32, non_blocking=True)
        step(x)
    sync(device)
    fed = time.perf_counter() - t0
    out = {"tokens_per_s": n * r.batch_size / fed}
    if step_ms:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step(x)
        sync(device)
        out["slowdown"] = fed / (time.perf_counter() - t0)
    return out


def _stand_in_step(d_in: int, device: torch.device, step_ms: float):
    """x -> a few matmuls of x with a weight, sized to take about step_ms on `device`."""
    w = torch.randn(d_in, 4 * d_in, device=device)
    x0 = torch.randn(4096, d_in, device=device)

    def once(x):
        return (x @ w).relu_() @ w.T

    once(x0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        once(x0)
    sync(device)
    reps = max(1, round(step_ms / 1e3 / ((time.perf_counter() - t0) / 5)))
    return lambda x: [once(x) for _ in range(reps)]


def read_round(m: Manifest, a, device: torch.device) -> dict[str, tuple]:
    """One round of the read stages, each after the same page-cache reset: {stage: (wall s, CPU s,
    fraction of the cache in memory at its start)}; 'start-up' is the reader's construction."""
    reset, out = page_cache_reset(m, a.page_cache), {}
    held = reset()
    out["sequential file read"] = (*sequential_read(m), held)
    t0 = time.perf_counter()
    r = CacheReader(m.cache_dir, batch_size=a.read_batch, seed=0, buffer_shards=a.buffer_shards,
                    prefetch=False)
    out["start-up"] = (time.perf_counter() - t0, 0.0, None)
    for e, t in enumerate(shuffled_epochs(r, reset), 1):
        out[f"shuffled read, epoch {e}"] = t
    del r
    gc.collect()  # free its buffers before the next reader's
    r = CacheReader(m.cache_dir, batch_size=a.read_batch, seed=0, buffer_shards=a.buffer_shards)
    held = reset()
    t0, c0 = time.perf_counter(), cpu_seconds()
    read_to_device(m.cache_dir, device, reader=r)
    out[f"read to device ({device.type}, as float32)"] = (time.perf_counter() - t0, cpu_seconds() - c0, held)
    del r
    gc.collect()
    return out


def read_stages(m: Manifest, a, device: torch.device) -> list[tuple]:
    """Rows for the sequential read, shuffled epochs 1 and 2 and read to device: each the median
    of `a.read_repeat` rounds, every stage started from the same page-cache state."""
    runs: dict[str, list[tuple]] = {}
    for _ in range(a.read_repeat):
        for name, t in read_round(m, a, device).items():
            runs.setdefault(name, []).append(t)
    n, gb = m.n_tokens, m.n_tokens * m.bytes_per_token() / 1e9
    start = statistics.median(t[0] for t in runs.pop("start-up"))
    seq = statistics.median(t[0] for t in runs["sequential file read"])
    notes = {"sequential file read": f"{m.n_shards} shards, {gb * 1e3:,.0f} MB ({m.dtype}, d_in "
                                     f"{sum(m.d_in.values())})",
             "shuffled read, epoch 1": f"batch {a.read_batch}, reader start-up {start:.1f}s (apart)"}
    rows = []
    for name, ts in runs.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        spread = ", ".join(f"{n / t[0]:,.0f}" for t in ts)
        held = "/".join("?" if t[2] is None else f"{100 * t[2]:.0f}%" for t in ts)
        rows.append((name, n / wall, gb * 1e3 / wall, f"{seq / wall:.2f}x",
                     f"cpu {cpu / gb:.2f} s/GB; runs {spread}; in memory at start {held}; "
                     f"{notes.get(name, '')}".rstrip("; ")))
    return rows


# ---- the run ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", action="append", help="hook point (repeatable); default blocks.3.hook_resid_post")
    ap.add_argument("--tokens", type=count, default=1 << 16, help="tokens for the model stages")
    ap.add_argument("--read-tokens", type=count, default=None,
                    help="tokens of the cache for the read stages (e.g. 10M; default: the harvested cache)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-contexts", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="cache dtype")
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--read-batch", type=int, default=4096)
    ap.add_argument("--contexts-per-shard", type=int, default=None)
    ap.add_argument("--buffer-shards", type=int, default=None, help="shards per mixing buffer (default: by bytes)")
    ap.add_argument("--cache-dir", default=None, help="where the caches go (default: a temp dir, removed)")
    ap.add_argument("--repeat", type=int, default=2, help="harvest runs (alternating with bare ones)")
    ap.add_argument("--read-repeat", type=int, default=3, help="rounds of the read stages (medians shown)")
    ap.add_argument("--page-cache", choices=["cold", "warm"], default="cold",
                    help="the cache's state before every read stage: cold (evicted; default) or warm")
    ap.add_argument("--no-model", action="store_true", help="skip the model stages (needs --read-tokens)")
    ap.add_argument("--quick", action="store_true", help="8192 tokens, for a smoke run")
    a = ap.parse_args()
    hooks = a.hook or [SYNTHETIC_HOOK]
    a.tokens = 8192 if a.quick else a.tokens
    a.device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus{load}")
    root = Path(a.cache_dir) if a.cache_dir else Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    rows, d_in, m = [], 576, None
    try:
        if not a.no_model:
            rows, m, d_in = model_stages(a, hooks, root / "harvested")
        if a.read_tokens:
            m = synthetic_cache(root / f"synthetic-{a.read_tokens}-{d_in}-{dtype_name(a.dtype)}",
                                a.read_tokens, d_in, parse_dtype(a.dtype))
        if m is None:
            raise SystemExit("--no-model needs --read-tokens")
        rows += read_stages(m, a, torch.device(a.device))
    finally:
        if not a.cache_dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'':40s} {'tokens/s':>12s} {'MB/s':>9s} {'vs read':>8s}")
    for name, tps, mbs, ratio, note in rows:
        print(f"{name:40s} {tps:12,.0f} {'' if mbs is None else f'{mbs:9,.0f}':>9s} {ratio:>8s}  {note}")


if __name__ == "__main__":
    main()
