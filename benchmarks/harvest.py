"""Harvest and cache-read throughput.

Prints, on the same tokens:
  - bare forward: the model's forward to the same layer (stop_at_layer), no hooks, tokens/s;
  - harvest: `sae.cache.harvest` (forward + capture + write shards + manifest), tokens/s and its
    overhead over the bare forward (target < 10%);
  - streaming source: `StreamingSource` batches straight from the model, tokens/s;
  - plain read: reading every shard file sequentially into memory, MB/s and tokens/s;
  - cache reader: one epoch of shuffled batches from `CacheReader`, MB/s and tokens/s (target:
    near the plain read).

Tokens are random ids (throughput does not depend on the text). Usage:

    python benchmarks/harvest.py --model smollm2-135m --hook blocks.3.hook_resid_post --tokens 65536
    python benchmarks/harvest.py --model /path/to/hf_folder --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.cache import CacheReader, StreamingSource, harvest  # noqa: E402
from sae.models import load_model, model_device, stop_layer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", action="append", help="hook point (repeatable); default blocks.3.hook_resid_post")
    ap.add_argument("--tokens", type=int, default=1 << 16)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-contexts", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="cache dtype")
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--read-batch", type=int, default=4096)
    ap.add_argument("--contexts-per-shard", type=int, default=None)
    ap.add_argument("--buffer-shards", type=int, default=None, help="shards per mixing buffer (default: by bytes)")
    ap.add_argument("--cache-dir", default=None, help="where to harvest (default: a temp dir, removed)")
    ap.add_argument("--repeat", type=int, default=2, help="harvest runs (alternating with bare ones)")
    ap.add_argument("--quick", action="store_true", help="8192 tokens, for a smoke run")
    a = ap.parse_args()
    hooks = a.hook or ["blocks.3.hook_resid_post"]
    n_tokens = 8192 if a.quick else a.tokens
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    t = time.perf_counter()
    model = load_model(a.model, device=device, dtype=a.model_dtype)
    dev = model_device(model)
    print(f"model {a.model} on {dev} ({a.model_dtype}), loaded in {time.perf_counter() - t:.1f}s; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    T = a.context_size
    n_ctx = max(1, n_tokens // T)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(0, vocab, (n_ctx, T))
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    tokens[:, 0] = bos if bos is not None else 0
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    n_tok = tokens.numel()
    stop = stop_layer(hooks, len(model.blocks))
    bc = a.batch_contexts
    print(f"hooks {hooks}; {n_ctx} contexts x {T} = {n_tok} tokens; batches of {bc} contexts; "
          f"stop_at_layer={stop}")

    def bare() -> float:
        with torch.no_grad():
            model(tokens[:bc].to(dev), stop_at_layer=stop, return_type=None)  # warm-up
            sync(dev)
            t0 = time.perf_counter()
            for b0 in range(0, n_ctx, bc):
                model(tokens[b0:b0 + bc].to(dev), stop_at_layer=stop, return_type=None)
            sync(dev)
            return time.perf_counter() - t0

    root = Path(a.cache_dir) if a.cache_dir else Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    rows = []
    try:
        t_bares, t_harvs = [bare()], []
        for rep in range(a.repeat):  # alternate, so that both see the same load of a shared machine
            cdir = root / "cache"
            shutil.rmtree(cdir, ignore_errors=True)
            t0 = time.perf_counter()
            m = harvest(model, tokens, keep, hooks, cdir, identity={"model": a.model, "bench": True},
                        dtype=a.dtype, contexts_per_shard=a.contexts_per_shard, batch_contexts=bc,
                        progress=False)
            sync(dev)
            t_harvs.append(time.perf_counter() - t0)
            t_bares.append(bare())
        t_b, t_harv = min(t_bares), min(t_harvs)
        rows.append((f"bare forward (best of {len(t_bares)})", n_tok / t_b, None,
                     "runs: " + ", ".join(f"{n_tok / t:,.0f}" for t in t_bares)))
        rows.append((f"harvest -> cache (best of {len(t_harvs)})", n_tok / t_harv, None,
                     f"overhead {100 * (t_harv / t_b - 1):+.1f}% vs bare; runs: "
                     + ", ".join(f"{n_tok / t:,.0f}" for t in t_harvs)))

        src = StreamingSource(model, tokens, keep, hooks, batch_size=a.read_batch,
                              contexts_per_chunk=m.contexts_per_shard, batch_contexts=bc)
        n_b = max(1, src.tokens_per_epoch // a.read_batch)
        t0 = time.perf_counter()
        it = src.batches()
        for _ in range(n_b):
            next(it)
        sync(dev)
        t_s = time.perf_counter() - t0
        rows.append(("streaming source (1 epoch)", src.tokens_per_epoch / t_s, None,
                     "model forward + capture + shuffle, no disk"))
        del it, src

        files = [m.shard_path(s) for s in m.shards]
        total_bytes = sum(f.stat().st_size for f in files)
        kept = m.n_tokens
        buf = bytearray(max(f.stat().st_size for f in files))
        reads = []
        for _ in range(3):  # the first pass also warms the page cache for the reader below
            t0 = time.perf_counter()
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    fh.readinto(buf)
            reads.append(time.perf_counter() - t0)
        t_read = min(reads)
        rows.append(("plain sequential file read", kept / t_read, total_bytes / t_read / 1e6,
                     f"best of 3; {len(files)} shards, {total_bytes / 1e6:.0f} MB, page cache warm"))

        r = CacheReader(cdir, batch_size=a.read_batch, seed=0, buffer_shards=a.buffer_shards)
        N, B = r.tokens_per_epoch, a.read_batch
        it = r.batches()
        epochs = []
        served = 0
        for e in range(3):
            t0 = time.perf_counter()
            while served < (e + 1) * N - B:
                next(it)
                served += B
            epochs.append(time.perf_counter() - t0)
        t_r = min(epochs[1:])
        for name, t in (("cache reader, 1st epoch", epochs[0]), ("cache reader, later epochs", t_r)):
            rows.append((name, N / t, N * m.bytes_per_token() / t / 1e6,
                         f"shuffled, batch {B}, {r.group_chunks} of {len(files)} shard(s) per mixing "
                         f"buffer; {t / t_read:.1f}x the plain read's time"))
    finally:
        if not a.cache_dir:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'':34s} {'tokens/s':>12s} {'MB/s':>9s}")
    for name, tps, mbs, note in rows:
        print(f"{name:34s} {tps:12,.0f} {'' if mbs is None else f'{mbs:9,.0f}':>9s}  {note}")


if __name__ == "__main__":
    main()
