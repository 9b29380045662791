"""The GPU path in one command, one table: the CUDA tests, then the training step of every
architecture at a realistic size, the sparse TopK step against the dense one, the cache reader to
the GPU, and a harvest, a training run and an evaluation on a tiny model, all on the GPU.

    python benchmarks/gpu_check.py                        # one CUDA GPU (under 8 minutes on an H200)
    python benchmarks/gpu_check.py --device cpu --tiny    # every check at a tiny size (seconds)
    python benchmarks/gpu_check.py --device cpu --tiny --d-in 576 --d-sae 9216 --batch 4096 --k 64

Rows (targets from issue 13, in this benchmark, not in the tests):
  - cuda tests: `pytest -m cuda` (tests/test_cuda.py and the CUDA tests of other files);
  - bf16 matmul: an 8192^3 bf16 product, and one of the steps' encoder shape (4096 x 2048 x 65,536),
    the ceiling the steps are set against;
  - step <architecture>: the trainer's step (loss, backward, decoder projection, clipping, Adam) at
    d_in 2048, d_sae 65,536, batch 4096, bf16 autocast, k 64 (relu-family: biases set so that L0 is
    64, as in a trained dictionary): tokens/s, TFLOP/s counted as the dense step's 12 B d_in d_sae
    (so a sparse step can pass the ceiling), that as % of the bf16 matmul, peak GPU memory. Target:
    the dense step at >= 50% of the matmul;
  - topk sparse vs dense at k 32, 64, 128: tokens/s of each, the ratio (target >= 3x at k 64);
  - reader to GPU: a bf16 cache of 1M tokens at d_in 2048 read shuffled to the GPU, alone and
    feeding a stand-in step as long as the TopK k 64 step (slowdown 1.00: copies hidden), against
    that step's tokens/s (target: the reader never the bottleneck);
  - tiny model: harvest to a bf16 cache, train TopK from it under autocast, evaluate, on the device.

Exits 1 when a check failed (its row says why); the other rows still run. On a machine without the
library's dependencies, carry wheels (`make wheels`, README "The GPU check").
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

from conftest import make_tiny_model  # noqa: E402  (the tests' tiny random Llama)
from harvest import read_to_device, synthetic_cache  # noqa: E402
from train_speed import calibrated_slot, step_timing  # noqa: E402

import sae.dictionaries  # noqa: E402,F401  (registers every architecture)
from eval.evaluate import evaluate_dictionaries  # noqa: E402
from sae.cache import CacheReader, harvest  # noqa: E402
from sae.means import means_from_cache  # noqa: E402
from sae.models import load_model  # noqa: E402
from sae.trainer import train_dictionaries  # noqa: E402


class Sizes(NamedTuple):
    d_in: int
    d_sae: int
    batch: int
    k: int
    ks: tuple[int, ...]  # the sparse-vs-dense TopK rows
    steps: int  # timed steps per row (after one warm-up)
    matmul: int  # n of the n x n x n bf16 product
    read_tokens: int


FULL = Sizes(d_in=2048, d_sae=65536, batch=4096, k=64, ks=(32, 64, 128), steps=5, matmul=8192,
             read_tokens=1_000_000)
TINY = Sizes(d_in=64, d_sae=512, batch=256, k=8, ks=(4, 8, 16), steps=1, matmul=256, read_tokens=20_000)
ARCHITECTURES = {
    "relu (classic)": {"architecture": "relu"},
    "relu (april2024)": {"architecture": "relu", "recipe": "april2024"},
    "topk": {"architecture": "topk"},
    "batchtopk": {"architecture": "batchtopk"},
    "matryoshka_batchtopk": {"architecture": "matryoshka_batchtopk", "group_sizes": [0.125, 0.375, 0.5]},
    "jumprelu": {"architecture": "jumprelu"},
    "gated": {"architecture": "gated"},
}
TOPK_STYLE = ("topk", "batchtopk", "matryoshka_batchtopk")


class Row(NamedTuple):
    check: str
    result: str
    detail: str = ""
    ok: bool | None = None  # None: a measurement with no pass/fail
    seconds: float | None = None  # a step's seconds, for the rows that time one


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> str:
    return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""


def reset_peak(device: torch.device) -> None:
    gc.collect()  # the last row's dictionary and Adam state (GiBs at full size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- the checks: each returns rows ---------------------------------------------------------------


def cuda_tests(device: torch.device, run_tests: bool) -> list[Row]:
    """`pytest -m cuda` in a subprocess; its summary line."""
    if device.type != "cuda" or not run_tests:
        return [Row("cuda tests", "not run", "no CUDA device" if device.type != "cuda" else "--no-tests")]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(REPO / "tests")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else done.stderr.strip()[-200:]
    failed = [ln.split(" - ")[0] for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return [Row("cuda tests (pytest -m cuda)", summary, "; ".join(failed)[:300], done.returncode == 0)]


def matmul_tflops(m: int, k: int, n: int, device: torch.device, repeats: int = 10) -> float:
    """TFLOP/s of an [m, k] @ [k, n] bf16 product (after three warm-ups)."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e12


def matmul_rows(s: Sizes, device: torch.device) -> tuple[list[Row], float]:
    """The square product (the machine's figure) and the step's encoder shape (the ceiling the
    steps are set against: batch x d_in x d_sae)."""
    square = matmul_tflops(s.matmul, s.matmul, s.matmul, device)
    ceiling = matmul_tflops(s.batch, s.d_in, s.d_sae, device)
    return [Row(f"bf16 matmul {s.matmul}^3", f"{square:.3g} TFLOP/s"),
            Row(f"bf16 matmul {s.batch}x{s.d_in}x{s.d_sae}", f"{ceiling:.3g} TFLOP/s",
                "the steps' ceiling: their encoder's shape")], ceiling


def step_row(name: str, raw: dict, x: torch.Tensor, s: Sizes, ceiling: float) -> Row:
    """One architecture's trainer step under bf16 autocast."""
    device = x.device
    reset_peak(device)
    full = {**raw, "d_sae": s.d_sae, **({"k": s.k} if raw["architecture"] in TOPK_STYLE else {})}
    slot = calibrated_slot(full, x, float(s.k))
    t = step_timing(slot, x, s.steps, torch.bfloat16)
    del slot
    tflops = 12 * s.batch * s.d_in * s.d_sae / t.wall / 1e12
    sparse = {False: ", dense", True: ", sparse"}.get(raw.get("sparse"), "")
    dense_target = raw.get("sparse") is False and name == "relu (classic)"
    return Row(f"step {name}{sparse}", f"{s.batch / t.wall:,.0f} tok/s",
               f"{tflops:.3g} TFLOP/s = {100 * tflops / ceiling:.0f}% of matmul"
               f"{' (target >= 50%)' if dense_target else ''}; L0 {t.l0:.0f}; {peak_memory(device)}".rstrip("; "),
               tflops >= 0.5 * ceiling if dense_target and x.device.type == "cuda" else None, t.wall)


def step_rows(x: torch.Tensor, s: Sizes, ceiling: float) -> list[Row]:
    """Every architecture's step (relu-family: the sparse step, then the dense one)."""
    rows = []
    for name, raw in ARCHITECTURES.items():
        variants = [raw] if raw["architecture"] in TOPK_STYLE else [raw, {**raw, "sparse": False}]
        for v in variants:
            rows += guarded(f"step {name}", lambda: [step_row(name, v, x, s, ceiling)])  # noqa: B023 (called at once)
    return rows


def topk_sparse_vs_dense(x: torch.Tensor, s: Sizes) -> list[Row]:
    rows = []
    for k in s.ks:
        seconds = {}
        for sparse in (True, False):
            slot = calibrated_slot({"architecture": "topk", "k": k, "d_sae": s.d_sae, "sparse": sparse}, x, k)
            seconds[sparse] = step_timing(slot, x, s.steps, torch.bfloat16).wall
            del slot
        ratio = seconds[False] / seconds[True]
        rows.append(Row(f"topk k={k}: sparse vs dense step", f"{ratio:.2f}x",
                        f"sparse {s.batch / seconds[True]:,.0f} tok/s, dense {s.batch / seconds[False]:,.0f} tok/s"
                        + ("; target >= 3x" if k == 64 else ""),
                        ratio >= 3 if k == 64 else None))
    return rows


def reader_rows(device: torch.device, s: Sizes, step_seconds: float, work: Path) -> list[Row]:
    m = synthetic_cache(work / "read-cache", s.read_tokens, s.d_in, torch.bfloat16)
    alone = read_to_device(m.cache_dir, device, batch_size=s.batch)
    fed = read_to_device(m.cache_dir, device, batch_size=s.batch, step_ms=1e3 * step_seconds)
    step_rate = s.batch / step_seconds
    return [Row("reader to device (bf16 cache, shuffled)", f"{alone['tokens_per_s']:,.0f} tok/s",
                f"{m.n_tokens:,} tokens x {s.d_in}; {alone['tokens_per_s'] / step_rate:.1f}x the topk step's "
                f"{step_rate:,.0f} tok/s", alone["tokens_per_s"] >= step_rate),
            Row("reader feeding a topk-long step", f"slowdown {fed['slowdown']:.2f}",
                "1.00: the copies hide behind compute", fed["slowdown"] <= 1.10 if device.type == "cuda" else None)]


def tiny_model_rows(device: torch.device, work: Path) -> list[Row]:
    """Harvest a bf16 cache from the tests' tiny model, train TopK from it, evaluate: on `device`."""
    model = load_model(str(make_tiny_model(work / "tiny-model")), device=device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 40, (64, 32), generator=g)
    tokens[:, 0] = 1  # BOS, not kept
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    t0 = time.perf_counter()
    m = harvest(model, tokens, keep, hooks, work / "tiny-cache", identity={"model": "tiny"}, dtype="bf16",
                contexts_per_shard=16, batch_contexts=16, progress=False)
    harvest_s = time.perf_counter() - t0
    reader = CacheReader(m.cache_dir, batch_size=128, seed=0, hooks=hooks[:1])
    cfg = sae.dictionaries.parse_dictionary_config({"architecture": "topk", "k": 4, "d_sae": 128, "lr": 3e-3})
    trained = train_dictionaries(reader, [cfg], total_tokens=128 * 40, device=device,
                                 autocast_dtype=torch.bfloat16, progress=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # caveats about the hooks are not this check's subject
        results = evaluate_dictionaries(model, trained, tokens, keep, train_means=means_from_cache(m.cache_dir, hooks),
                                        batch_size=16, progress=False)
    eval_s = time.perf_counter() - t0
    fvu = next(iter(results.values()))["fvu"]
    n_tok = int(keep.sum())
    return [Row("tiny model: harvest (bf16 cache)", f"{n_tok / harvest_s:,.0f} tok/s",
                f"{m.n_shards} shards, {m.n_tokens} tokens, 2 hooks", m.complete and m.n_tokens == n_tok),
            Row("tiny model: train topk from it + evaluate", f"{n_tok / eval_s:,.0f} tok/s evaluated",
                f"fvu {fvu:.3f} after 40 steps", 0 <= fvu < 1)]


# ---- the run ------------------------------------------------------------------------------------


def guarded(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """The check's rows, or one failed row naming the error (the other checks still run)."""
    t0 = time.perf_counter()
    try:
        rows = fn()
    except Exception as e:  # noqa: BLE001 - one failed check must not hide the others' figures
        traceback.print_exc()
        rows = [Row(name, "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"[:300], False)]
    print(f"[{time.perf_counter() - t0:6.1f}s] {name}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    """A Markdown table (it pastes into the README as it is)."""
    width = max(len(r.check) for r in rows)
    mark = {True: "ok", False: "FAIL", None: ""}
    lines = [f"| {'check':<{width}} | {'result':>24} |      | detail |",
             f"|{'-' * (width + 2)}|{'-' * 25}:|------|--------|"]
    lines += [f"| {r.check:<{width}} | {r.result:>24} | {mark[r.ok]:4} | {r.detail} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (seconds, any device)")
    ap.add_argument("--no-tests", action="store_true", help="skip `pytest -m cuda`")
    ap.add_argument("--work-dir", default=None, help="where the caches go (default: a temp dir, removed)")
    for field in ("d_in", "d_sae", "batch", "k", "steps", "read_tokens"):
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help="override the size's")
    a = ap.parse_args(argv)
    device, s = torch.device(a.device), TINY if a.tiny else FULL
    s = s._replace(**{f: getattr(a, f) for f in ("d_in", "d_sae", "batch", "k", "steps", "read_tokens")
                      if getattr(a, f) is not None})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=a.work_dir) as tmp:
        rows = guarded("cuda tests", lambda: cuda_tests(device, not a.no_tests))
        matmuls, ceiling = matmul_rows(s, device)
        rows += matmuls
        x = torch.randn(s.batch, s.d_in, generator=torch.Generator().manual_seed(0)).to(device)
        steps = step_rows(x, s, ceiling)
        rows += steps
        topk_s = next((r.seconds for r in steps if r.check == "step topk"), 0.01)
        rows += guarded("topk sparse vs dense", lambda: topk_sparse_vs_dense(x, s))
        del x
        rows += guarded("reader to device", lambda: reader_rows(device, s, topk_s, Path(tmp)))
        rows += guarded("tiny model", lambda: tiny_model_rows(device, Path(tmp)))
    print(f"\ngpu_check on {name} (torch {torch.__version__}), d_in {s.d_in}, d_sae {s.d_sae}, batch {s.batch}, "
          f"k {s.k}, bf16 autocast; {time.perf_counter() - t_start:.0f}s in all\n")
    print(table(rows), flush=True)
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
