"""Activation cache: harvest == run_with_cache, resume, corruption, identity, shuffled reader, streaming."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformer_lens.model_bridge import TransformerBridge

import sae.cache as sc
from cache_helpers import fail_after_shards
from sae.cache import (SUM_PREFIX, TOKEN_INDEX, CacheReader, Manifest, ShuffledBatches, StreamingSource,
                       harvest, load_shard, open_cache, scatter_read, to_device, verify_cache, verify_shard)
from sae.cache.shards import write_shard
from sae.dictionaries import parse_dictionary_config
from sae.errors import CacheError, HookError
from sae.means import means_from_cache
from sae.models import stop_layer
from sae.synthetic import fvu
from sae.trainer import train_dictionaries

REPO = Path(__file__).resolve().parents[1]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.hook_mlp_out",
         "blocks.1.hook_resid_post"]
N_CTX, T, CPS, BC = 60, 16, 8, 4  # contexts, context length, contexts per shard, batch contexts
IDENT = {"model": "tiny", "dataset": "random", "model_dtype": "float32"}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return TransformerBridge.boot_transformers(str(tiny_model_dir), device="cpu")


def make_tokens(n_ctx: int = N_CTX, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 40, (n_ctx, T), generator=g)
    tokens[:, 0] = 1  # BOS
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    pad = torch.rand(n_ctx, T, generator=g) < 0.1  # some padding / special tokens
    tokens[pad] = 3
    keep[pad] = False
    return tokens, keep


@pytest.fixture(scope="module")
def data():
    return make_tokens()


@pytest.fixture(scope="module")
def cache(model, data, tmp_path_factory) -> Manifest:
    tokens, keep = data
    return harvest(model, tokens, keep, HOOKS, tmp_path_factory.mktemp("cache") / "c",
                   identity=IDENT, contexts_per_shard=CPS, batch_contexts=BC, progress=False)


def all_rows(m: Manifest) -> dict[str, torch.Tensor]:
    shards = [load_shard(m, i) for i in range(m.n_shards)]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def shard_bytes(m: Manifest) -> list[bytes]:
    return [m.shard_path(s).read_bytes() for s in m.shards]


# ------------------------------------------------------------------------------------ harvest


def test_harvest_equals_run_with_cache(model, data, cache):
    tokens, keep = data
    assert cache.complete and cache.n_shards == 8 and cache.n_tokens == int(keep.sum())
    assert cache.d_in == {h: 32 for h in HOOKS}
    got = all_rows(cache)
    plain = load_file(str(cache.shard_path(0)))  # shards are plain safetensors files
    assert torch.equal(plain["acts." + HOOKS[0]], load_shard(cache, 0)[HOOKS[0]])
    assert torch.equal(got["tokens"], tokens.to(torch.int32))
    assert torch.equal(got["keep_mask"], keep)
    for b0 in range(0, N_CTX, BC):  # the same batches the harvest ran
        _, ref = model.run_with_cache(tokens[b0:b0 + BC], names_filter=HOOKS)
        r0 = int(keep[:b0].sum())
        k = int(keep[b0:b0 + BC].sum())
        for h in HOOKS:
            assert torch.equal(got[h][r0:r0 + k], ref[h][keep[b0:b0 + BC]]), (h, b0)


def test_harvest_non_block_hooks_and_bf16(model, data, tmp_path, capsys):
    tokens, keep = data
    hooks = ["hook_embed", "ln_final.hook_normalized", "blocks.0.attn.hook_z"]
    m = harvest(model, tokens[:12], keep[:12], hooks, tmp_path / "c", identity=IDENT,
                dtype="bf16", contexts_per_shard=5, batch_contexts=BC, progress=True)
    err = capsys.readouterr().err
    assert "harvest 3 hooks" in err and "tok/s" in err and "192/192" in err  # the progress bar
    assert m.dtype == "bfloat16" and m.d_in["blocks.0.attn.hook_z"] == 4 * 8
    got = all_rows(m)
    for b0 in range(0, 12, BC):
        _, ref = model.run_with_cache(tokens[b0:b0 + BC], names_filter=hooks)
        r0, k = int(keep[:b0].sum()), int(keep[b0:b0 + BC].sum())
        for h in hooks:
            want = ref[h].reshape(*ref[h].shape[:2], -1)[keep[b0:b0 + BC]].to(torch.bfloat16)
            assert got[h].dtype == torch.bfloat16
            assert torch.equal(got[h][r0:r0 + k], want), h


def test_harvest_stops_after_last_hooked_layer(model, data, tmp_path):
    tokens, keep = data
    assert stop_layer(["blocks.0.hook_resid_post"], len(model.blocks)) == 1
    assert stop_layer(["blocks.1.hook_resid_post"], len(model.blocks)) is None  # last block: nothing to cut
    assert stop_layer(["hook_embed"], len(model.blocks)) == 0
    assert stop_layer(["ln_final.hook_normalized", "blocks.0.hook_mlp_out"], len(model.blocks)) is None
    fired = Counter()

    def count(t, *, hook):
        fired[hook.name] += 1
        return t

    with model.hooks(fwd_hooks=[("blocks.1.hook_in", count), ("unembed.hook_in", count),
                                ("blocks.0.hook_mlp_out", count)]):
        harvest(model, tokens[:8], keep[:8], ["blocks.0.hook_resid_mid"], tmp_path / "c",
                identity=IDENT, batch_contexts=BC, progress=False)
    # the block-0 MLP comes after hook_resid_mid: nothing after the hook ran (probe + 2 batches)
    assert fired == Counter(), fired
    with model.hooks(fwd_hooks=[("unembed.hook_in", count)]):
        harvest(model, tokens[:8], keep[:8], ["blocks.1.hook_resid_post"], tmp_path / "d",
                identity=IDENT, batch_contexts=BC, progress=False)
    assert fired == Counter(), fired  # the unembedding never runs


def test_unknown_hook_is_named(model, data, tmp_path):
    tokens, keep = data
    with pytest.raises(HookError, match=r"blocks\.0\.hook_resid_postt.*did you mean.*blocks\.0\.hook_resid_post"):
        harvest(model, tokens, keep, ["blocks.0.hook_resid_postt"], tmp_path / "c", identity=IDENT)


def test_resume_after_injected_failure_equals_uninterrupted(model, data, cache, tmp_path, monkeypatch):
    tokens, keep = data
    with monkeypatch.context() as patched:
        fail_after_shards(3, patched.setattr)
        with pytest.raises(RuntimeError, match="injected"):
            harvest(model, tokens, keep, HOOKS, tmp_path / "c", identity=IDENT, contexts_per_shard=CPS,
                    batch_contexts=BC, progress=False)
    partial = Manifest.load(tmp_path / "c")
    assert not partial.complete and [s.index for s in partial.shards] == [0, 1, 2]
    with pytest.raises(CacheError, match="incomplete.*run the harvest again"):
        open_cache(tmp_path / "c")
    m = harvest(model, tokens, keep, HOOKS, tmp_path / "c", identity=IDENT, batch_contexts=BC,
                progress=False)
    assert m.complete
    assert [vars(s) for s in m.shards] == [vars(s) for s in cache.shards]  # same files, same sha256
    assert shard_bytes(m) == shard_bytes(cache)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    from transformer_lens.model_bridge import TransformerBridge
    import sae.cache as sc
    from sae.cache import harvest
    orig = sc.ActivationCapture.run
    def slow(self, t):
        time.sleep(0.05)
        return orig(self, t)
    sc.ActivationCapture.run = slow
    model = TransformerBridge.boot_transformers({model!r}, device="cpu")
    tokens, keep = torch.load({data!r})
    harvest(model, tokens, keep, {hooks!r}, {out!r}, identity={ident!r}, contexts_per_shard={cps},
            batch_contexts=1, progress=False)
""")


def test_resume_after_sigkill_equals_uninterrupted(model, data, cache, tiny_model_dir, tmp_path):
    tokens, keep = data
    torch.save((tokens, keep), tmp_path / "data.pt")
    out = tmp_path / "c"
    script = KILL_SCRIPT.format(repo=str(REPO), model=str(tiny_model_dir), data=str(tmp_path / "data.pt"),
                                hooks=HOOKS, out=str(out), ident=IDENT, cps=CPS)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # kill it once at least 2 shards are listed, mid-shard
            if (out / "manifest.json").exists():
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
                    time.sleep(0.13)
                    break
            if proc.poll() is not None:
                pytest.fail(f"harvest subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = Manifest.load(out)
    assert not partial.complete and 2 <= len(partial.shards) < partial.n_shards
    (out / ".shard_00007.safetensors.abc123.tmp").write_bytes(b"half a shard")  # a stray temp file
    m = harvest(model, tokens, keep, HOOKS, out, identity=IDENT, batch_contexts=BC, progress=False)
    assert not list(out.glob(".*.tmp"))
    assert m.complete and m.n_tokens == int(keep.sum())
    for a, b in zip(all_rows(m).values(), all_rows(cache).values()):
        assert torch.equal(a, b)  # no duplicated or missing tokens, same activations


# ------------------------------------------------------------------------- corruption, identity


def copy_cache(m: Manifest, dest: Path) -> Path:
    shutil.copytree(m.cache_dir, dest)
    return dest


def test_corrupt_shard_detected_named_and_reharvested(model, data, cache, tmp_path):
    tokens, keep = data
    d = copy_cache(cache, tmp_path / "c")
    p = d / "shard_00003.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-100] ^= 0xFF  # a flipped byte in the activations: same size, wrong checksum
    p.write_bytes(bytes(raw))
    open_cache(d)  # 'quick' checks sizes and headers only
    with pytest.raises(CacheError, match=r"shard .*shard_00003\.safetensors fails its checksum.*re-harvest"):
        open_cache(d, verify="full")
    q = d / "shard_00005.safetensors"
    q.write_bytes(q.read_bytes()[:-10])  # truncated
    with pytest.raises(CacheError, match=r"shard_00005\.safetensors.*(truncated|corrupt)"):
        CacheReader(d, batch_size=8)
    with pytest.raises(CacheError, match=r"shard_00005"):
        verify_cache(d, "quick")
    (d / "shard_00001.safetensors").write_bytes(b"\x00" * 5)  # garbage header
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors is corrupt"):
        verify_shard(Manifest.load(d), Manifest.load(d).shards[1])
    with pytest.raises(CacheError, match=r"2 shards .* \(shard_00001.safetensors, shard_00005.safetensors\)"):
        open_cache(d)
    (d / "shard_00006.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard_00006\.safetensors is missing"):
        verify_shard(Manifest.load(d), Manifest.load(d).shards[6])
    # the harvest re-harvests exactly the shards that fail verification
    m = harvest(model, tokens, keep, HOOKS, d, identity=IDENT, batch_contexts=BC, progress=False,
                verify="full")
    assert m.complete and shard_bytes(m) == shard_bytes(cache)
    open_cache(d, verify="full")


@pytest.mark.parametrize("change, field", [
    ("model", "model"), ("hooks", "hooks"), ("tokens", "tokens_sha256"), ("keep", "keep_mask_sha256"),
    ("dtype", "cache_dtype"), ("dataset", "dataset"),
])
def test_identity_mismatch_refuses_reuse(model, data, cache, tmp_path, change, field):
    tokens, keep = data
    d = copy_cache(cache, tmp_path / "c")
    before = shard_bytes(cache)
    ident, hooks, dtype = dict(IDENT), list(HOOKS), "float32"
    if change == "model":
        ident["model"] = "other-model"
    elif change == "dataset":
        ident["dataset"] = "other-text"
    elif change == "hooks":
        hooks = hooks[:2]
    elif change == "tokens":
        tokens = tokens.clone()
        tokens[5, 5] += 1
    elif change == "keep":
        keep = keep.clone()
        keep[5, 5] = not keep[5, 5]
    elif change == "dtype":
        dtype = "bfloat16"
    with pytest.raises(CacheError) as e:
        harvest(model, tokens, keep, hooks, d, identity=ident, dtype=dtype, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{field}: cache has" in msg
    assert "another cache directory" in msg and "delete" in msg
    assert shard_bytes(Manifest.load(d)) == before  # untouched
    with pytest.raises(CacheError, match=field):
        CacheReader(d, batch_size=8, identity={**cache.identity, field: "x"})


def test_unsupported_cache_dtype_is_named_before_anything_is_written(model, data, tmp_path):
    tokens, keep = data
    with pytest.raises(CacheError, match="cache dtype 'float64' is not supported"):
        harvest(model, tokens, keep, HOOKS, tmp_path / "c", identity=IDENT, dtype=torch.float64)
    assert not (tmp_path / "c").exists()


def test_refuses_foreign_directory(model, data, tmp_path):
    tokens, keep = data
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty.*notes.txt"):
        harvest(model, tokens, keep, HOOKS, tmp_path / "c", identity=IDENT, progress=False)


def test_complete_cache_is_reused_without_forward(model, data, cache, monkeypatch):
    tokens, keep = data
    monkeypatch.setattr(sc.ActivationCapture, "run", lambda *a, **k: pytest.fail("recomputed"))
    m = harvest(model, tokens, keep, HOOKS, cache.cache_dir, identity=IDENT, progress=False)
    assert m.complete and [vars(s) for s in m.shards] == [vars(s) for s in cache.shards]


# ------------------------------------------------------------------------------------ reader


def take(it, n):
    return [next(it) for _ in range(n)]


def test_reader_covers_every_kept_token_once_per_epoch(cache, data):
    tokens, keep = data
    B = 64
    r = CacheReader(cache.cache_dir, batch_size=B, seed=3, buffer_shards=3, with_index=True)
    N = r.tokens_per_epoch
    assert N == int(keep.sum()) and r.d_in == cache.d_in and r.manifest is not None
    batches = take(r.batches(), (3 * N) // B + 1)  # three epochs and a bit (batches straddle epochs)
    idx = torch.cat([b[TOKEN_INDEX] for b in batches])
    kept = set(torch.nonzero(keep.reshape(-1)).flatten().tolist())
    epochs = [idx[e * N:(e + 1) * N] for e in range(3)]
    for ep in epochs:
        assert len(set(ep.tolist())) == N and set(ep.tolist()) == kept  # each kept token once
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # rows are the right activations: every served row equals the cached row for its token
    rows = all_rows(cache)
    where = {t: i for i, t in enumerate(torch.nonzero(keep.reshape(-1)).flatten().tolist())}
    for b in batches[:5]:
        sel = torch.tensor([where[t] for t in b[TOKEN_INDEX].tolist()])
        for h in HOOKS:
            assert b[h].shape == (B, 32) and b[h].dtype == torch.float32
            assert torch.equal(b[h], rows[h][sel])


def test_reader_deterministic_by_seed_and_mixes_shards(cache):
    def first(seed, n=6, **kw):
        return take(CacheReader(cache.cache_dir, batch_size=50, seed=seed, buffer_shards=3,
                                with_index=True, **kw).batches(), n)

    a, b, c = first(0), first(0, prefetch=False), first(1)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0][TOKEN_INDEX], c[0][TOKEN_INDEX])
    # shuffled across contexts and shards, not just within one
    for batch in a:
        ctx = batch[TOKEN_INDEX] // T
        assert len(set((ctx // CPS).tolist())) >= 2 and len(set(ctx.tolist())) >= 10


@pytest.mark.parametrize("start", [0, 1, 7, 11, 12, 25])
def test_reader_start_step_equals_continuing(cache, start):
    r = CacheReader(cache.cache_dir, batch_size=37, seed=5, buffer_shards=3, with_index=True)
    full = take(r.batches(), start + 4)
    resumed = take(r.batches(start_step=start), 4)  # 12 steps ≈ 1 epoch: crosses epoch boundaries
    for x, y in zip(full[start:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_reader_hook_subset_and_dtype(cache):
    r = CacheReader(cache.cache_dir, batch_size=16, hooks=[HOOKS[1]], out_dtype=torch.bfloat16,
                    pin_memory=False)
    b = next(r.batches())
    assert list(b) == [HOOKS[1]] and b[HOOKS[1]].dtype == torch.bfloat16
    with pytest.raises(CacheError, match="no hook point"):
        CacheReader(cache.cache_dir, batch_size=16, hooks=["blocks.5.hook_resid_post"])


# --------------------------------------------------------------------------------- streaming


def test_streaming_serves_same_tokens_as_disk_reader(model, data, cache):
    tokens, keep = data
    B = 64
    disk = CacheReader(cache.cache_dir, batch_size=B, seed=2, buffer_shards=3, with_index=True)
    s = StreamingSource(model, tokens, keep, HOOKS, batch_size=B, seed=2, contexts_per_chunk=CPS,
                        buffer_chunks=3, batch_contexts=BC, with_index=True)
    assert s.tokens_per_epoch == disk.tokens_per_epoch and s.d_in == disk.d_in
    n = disk.tokens_per_epoch // B
    got_d, got_s = take(disk.batches(), n), take(s.batches(), n)
    # same chunking and seed: the very same batches
    for x, y in zip(got_d, got_s):
        assert torch.equal(x[TOKEN_INDEX], y[TOKEN_INDEX])
        for h in HOOKS:
            assert torch.equal(x[h], y[h])
    # other chunking/buffer: still the same multiset of (token, activation) rows per epoch
    s2 = StreamingSource(model, tokens, keep, HOOKS, batch_size=B, seed=9, contexts_per_chunk=5,
                         buffer_chunks=2, batch_contexts=BC, with_index=True)
    N = s2.tokens_per_epoch
    got2 = take(s2.batches(), N // B + 1)
    idx2 = torch.cat([b[TOKEN_INDEX] for b in got2])[:N]
    idx_d = torch.cat([b[TOKEN_INDEX] for b in take(disk.batches(), N // B + 1)])[:N]
    assert sorted(idx2.tolist()) == sorted(idx_d.tolist())
    assert len(set(idx2.tolist())) == N
    rows = all_rows(cache)
    where = {t: i for i, t in enumerate(torch.nonzero(keep.reshape(-1)).flatten().tolist())}
    for b in got2[:3]:
        sel = torch.tensor([where[t] for t in b[TOKEN_INDEX].tolist()])
        for h in HOOKS:
            torch.testing.assert_close(b[h], rows[h][sel], rtol=1e-5, atol=1e-6)
    # resume
    resumed = take(s2.batches(start_step=5), 2)
    for x, y in zip(got2[5:7], resumed):
        assert torch.equal(x[TOKEN_INDEX], y[TOKEN_INDEX])
        for h in HOOKS:
            assert torch.equal(x[h], y[h])


def test_reader_never_overwrites_a_batch_still_held(cache):
    r = CacheReader(cache.cache_dir, batch_size=40, seed=4, buffer_shards=1, with_index=True)
    it = r.batches()
    held = [next(it) for _ in range(3)]
    copies = [{k: v.clone() for k, v in b.items()} for b in held]
    view = held[1][HOOKS[0]][5:]  # a view of a batch, the batch itself dropped
    vcopy = view.clone()
    del held[1]
    for _ in range(3 * r.tokens_per_epoch // 40):  # three epochs: buffers get reused meanwhile
        next(it)
    for b, c in zip(held, copies[::2]):
        assert all(torch.equal(b[k], c[k]) for k in b)
    assert torch.equal(view, vcopy)


def test_reader_never_reuses_a_group_that_is_still_held():
    """A group held only as the prepared dict (prefetched, or mid-way through a straddling batch)
    counts as in use: the pool hands out views, never its own tensors, so the loader thread cannot
    overwrite a group while it is served."""
    rows = [100, 100, 100]
    src = ShuffledBatches(rows, lambda ch: {"h": torch.randn(sum(rows[c] for c in ch), 8)}, ["h"],
                          {"h": 8}, batch_size=10, seed=0, group_chunks=1, prefetch=False)
    ptr = lambda g: g["h"].untyped_storage().data_ptr()  # noqa: E731
    held = src._prepare((0, 0, [0]))
    snapshot = held["h"].clone()
    other = src._prepare((0, 1, [1]))
    assert ptr(other) != ptr(held) and torch.equal(held["h"], snapshot)
    del held, other
    assert ptr(src._prepare((0, 2, [2]))) in {p["h"].untyped_storage().data_ptr() for p in src._pool}


@pytest.fixture(scope="module")
def bf16_cache(model, data, tmp_path_factory) -> Manifest:
    tokens, keep = data
    return harvest(model, tokens[:24], keep[:24], HOOKS[:2], tmp_path_factory.mktemp("bf16") / "c",
                   identity=IDENT, dtype="bf16", contexts_per_shard=CPS, batch_contexts=BC, progress=False)


def test_reader_serves_bf16_cache_in_its_dtype_or_converted(bf16_cache, data):
    m, keep = bf16_cache, data[1]
    rows = all_rows(m)
    where = {t: i for i, t in enumerate(torch.nonzero(keep[:24].reshape(-1)).flatten().tolist())}
    own = next(CacheReader(m.cache_dir, batch_size=32, seed=1, with_index=True).batches())
    f32 = next(CacheReader(m.cache_dir, batch_size=32, seed=1, with_index=True,
                           out_dtype=torch.float32).batches())
    sel = torch.tensor([where[t] for t in own[TOKEN_INDEX].tolist()])
    for h in HOOKS[:2]:
        assert own[h].dtype == torch.bfloat16 and torch.equal(own[h], rows[h][sel])
        assert f32[h].dtype == torch.float32 and torch.equal(f32[h], rows[h][sel].float())


def test_a_bf16_cache_trains_a_float32_and_a_bf16_autocast_step(bf16_cache):
    """bf16 batches straight from the reader train exactly as the reader's float32 conversion of
    them (the trainer widens them losslessly), and under bf16 autocast to about the same FVU."""
    def trained(out_dtype, autocast_dtype):
        # no prefetch thread: one left reading after training would read on into later tests
        reader = CacheReader(bf16_cache.cache_dir, batch_size=32, seed=2, hooks=[HOOKS[0]], out_dtype=out_dtype,
                             prefetch=False)
        cfg = parse_dictionary_config({"architecture": "topk", "k": 4, "d_sae": 64, "lr": 3e-3})
        return next(iter(train_dictionaries(reader, [cfg], total_tokens=32 * 30, autocast_dtype=autocast_dtype,
                                            progress=False).values()))
    own, widened, autocast = trained(None, None), trained(torch.float32, None), trained(None, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), widened.state_dict().values()))
    x = all_rows(bf16_cache)[HOOKS[0]].float()
    fvu_fp32, fvu_bf16 = fvu(own, x), fvu(autocast, x)
    # measured (2026-12-01, CPU): FVU 0.3764 float32, 0.3749 bf16 autocast
    assert fvu_fp32 < 0.5 and abs(fvu_bf16 - fvu_fp32) <= 0.02 * fvu_fp32, (fvu_fp32, fvu_bf16)


def test_reader_portable_read_path_serves_the_same_batches(cache, monkeypatch):
    """Where libc has no preadv (Windows), shards are read whole and copied into place."""
    def first(n=8):
        r = CacheReader(cache.cache_dir, batch_size=45, seed=7, buffer_shards=3, with_index=True)
        return take(r.batches(), n)

    fast = first()
    monkeypatch.setattr(scatter_read, "_PREADV", None)
    portable = first()
    for x, y in zip(fast, portable):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_scatter_read_finishes_rows_cut_by_short_reads(tmp_path, monkeypatch):
    rows = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)  # 24-byte rows
    path = tmp_path / "rows.bin"
    path.write_bytes(b"header!!" + rows.numpy().tobytes())
    real = scatter_read._PREADV
    calls, me = [], threading.get_ident()

    def short_preadv(fd, iov, count, offset):  # at most 1 iovec and 10 bytes per call
        one = (ctypes.c_uint64 * 2).from_address(iov)
        cut = (ctypes.c_uint64 * 2)(one[0], min(int(one[1]), 10))
        if threading.get_ident() == me:  # a reader thread another test left running reads too
            calls.append(offset)
        return real(fd, ctypes.addressof(cut), 1, offset)

    monkeypatch.setattr(scatter_read, "_PREADV", short_preadv)
    dest = torch.full((50, 6), -1.0)
    where = np.random.default_rng(0).permutation(50)[:40]
    with open(path, "rb", buffering=0) as f:
        scatter_read.read_rows_into(f, 8, dest, where)
    assert len(calls) == 40 and torch.equal(dest[torch.from_numpy(where)], rows)
    assert (dest[torch.from_numpy(np.setdiff1d(np.arange(50), where))] == -1).all()
    with pytest.raises(ValueError, match="dest_rows"):
        with open(path, "rb", buffering=0) as f:
            scatter_read.read_rows_into(f, 8, dest, np.array([3, 50]))
    with pytest.raises(CacheError, match="truncated"):
        with open(path, "rb", buffering=0) as f:
            scatter_read.read_rows_into(f, 8 + 24 * 30, dest, where)


def test_to_device_on_cpu_hands_batches_through():
    batches = [{"h": torch.randn(4, 3), TOKEN_INDEX: torch.arange(4)} for _ in range(3)]
    got = list(to_device(batches, "cpu"))
    assert all(a is b for a, b in zip(got, batches))
    meta = list(to_device(batches, "meta"))  # another device: a plain copy of every tensor
    assert [b["h"].device.type for b in meta] == ["meta"] * 3 and meta[0]["h"].shape == (4, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_reader_to_cuda_is_pinned_and_exact(cache):
    r = CacheReader(cache.cache_dir, batch_size=64, seed=3, buffer_shards=3)
    host = take(CacheReader(cache.cache_dir, batch_size=64, seed=3, buffer_shards=3).batches(), 12)
    assert r.pin_memory and next(r.batches())[HOOKS[0]].is_pinned()
    for want, got in zip(host, take(to_device(r.batches(), "cuda"), 12)):
        for h in HOOKS:
            assert got[h].is_cuda and torch.equal(got[h].cpu(), want[h])


# ----------------------------------------------------------------------------- activation sums


def test_harvest_records_sums_so_means_need_no_pass_over_activations(cache, tmp_path):
    rows = all_rows(cache)
    for s in cache.shards:
        plain = load_file(str(cache.shard_path(s)))
        for h in HOOKS:
            assert plain[SUM_PREFIX + h].dtype == torch.float64
            torch.testing.assert_close(plain[SUM_PREFIX + h], plain["acts." + h].double().sum(0))
    want = {h: rows[h].double().mean(0).float() for h in HOOKS}
    got = means_from_cache(cache.cache_dir, HOOKS[1:3])
    assert set(got) == set(HOOKS[1:3])
    for h in HOOKS[1:3]:
        torch.testing.assert_close(got[h], want[h], rtol=1e-6, atol=1e-7)
    # the activations are not read at all: scrambling them (same size) leaves the means as they were
    d = copy_cache(cache, tmp_path / "c")
    for s in cache.shards:
        raw = bytearray((d / s.file).read_bytes())
        header, start = verify_shard(cache, s)
        b0, b1 = header["acts." + HOOKS[1]]["data_offsets"]
        raw[start + b0:start + b1] = bytes(b1 - b0)
        (d / s.file).write_bytes(bytes(raw))
    assert all(torch.equal(a, b) for a, b in zip(means_from_cache(d, HOOKS[1:3]).values(), got.values()))


def strip_sums(m: Manifest) -> None:
    """Rewrite every shard as the harvest wrote them before sums were recorded."""
    for s in m.shards:
        tensors = {k: v for k, v in load_file(str(m.shard_path(s))).items() if not k.startswith(SUM_PREFIX)}
        meta = {"format": "sae-activation-cache", "shard": str(s.index), "context_start": str(s.context_start),
                "n_contexts": str(s.n_contexts), "dtype": m.dtype}
        s.bytes, s.sha256 = write_shard(m.shard_path(s), tensors, meta)
    m.save()


def test_cache_without_sums_still_works(model, data, cache, tmp_path):
    tokens, keep = data
    d = copy_cache(cache, tmp_path / "c")
    old = Manifest.load(d)
    strip_sums(old)
    assert SUM_PREFIX + HOOKS[0] not in load_file(str(old.shard_path(0)))
    open_cache(d, verify="full")
    got = means_from_cache(d, HOOKS)
    for h, x in means_from_cache(cache.cache_dir, HOOKS).items():
        torch.testing.assert_close(got[h], x, rtol=1e-6, atol=1e-7)
    a = take(CacheReader(d, batch_size=50, seed=2).batches(), 5)
    b = take(CacheReader(cache.cache_dir, batch_size=50, seed=2).batches(), 5)
    assert all(torch.equal(x[h], y[h]) for x, y in zip(a, b) for h in HOOKS)
    m = harvest(model, tokens, keep, HOOKS, d, identity=IDENT, batch_contexts=BC, progress=False)
    assert m.complete and shard_bytes(m) == shard_bytes(old)  # complete: reused as it is
