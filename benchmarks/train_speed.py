"""Training throughput of the trainer's step: the sparse ReLU-family step against the dense one.

The element-wise architectures (relu with both recipes, jumprelu, gated) take a sparse step when
few (token, feature) pairs are touched (`sparse: auto`, sae/dictionaries/elementwise.py); TopK
always does. Each row times the trainer's own step (loss, backward, decoder projection, gradient
clipping, Adam, dead-feature tracking) on a dictionary whose biases (JumpReLU: thresholds) are set
so that every feature fires on L0/d_sae of the tokens, as in a trained dictionary; lr is 1e-7
so that the L0 stays put while it is timed. Reported: tokens/s of the dense step (`sparse: false`),
of the sparse step (`sparse: true`), their ratio, and TopK with k = L0 beside them.

    python benchmarks/train_speed.py                        # widths 4x 16x 64x of d_in 512, L0 64
    python benchmarks/train_speed.py --widths 16 --l0 32 150
    python benchmarks/train_speed.py --crossover            # the density where sparse stops paying
    python benchmarks/train_speed.py --device cuda --batch 16384 --autocast bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.dictionaries import parse_dictionary_config  # noqa: E402
from sae.dictionaries.base import WHOLE_BATCH  # noqa: E402
from sae.trainer import DEFAULT_HOOK, Trainer  # noqa: E402

ARCHITECTURES = {
    "relu (classic)": {"architecture": "relu"},
    "relu (april2024)": {"architecture": "relu", "recipe": "april2024"},
    "jumprelu": {"architecture": "jumprelu"},
    "gated": {"architecture": "gated"},
}
TIMING_LR = 1e-7  # steps cost the same at any lr; this one keeps the calibrated L0 while timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def calibrated_slot(raw: dict, x: torch.Tensor, l0: float):
    """The trainer's slot for `raw`, initialised from x, with each feature firing on l0/d_sae of x."""
    trainer = Trainer([parse_dictionary_config({**raw, "lr": TIMING_LR})], total_tokens=x.shape[0],
                      device=x.device, progress=False)
    batch = {DEFAULT_HOOK: x}
    # the trainer's own set-up, without its loop (whose first step would fire on half)
    slot = trainer._build(batch, trainer.names)[0]
    trainer._init_from_data(slot, batch)
    d = slot.dictionary
    with torch.no_grad():
        xs = d.scale_input(x)
        projection = (xs - d.b_dec) @ d.W_enc  # [B, d_sae] pre-activations without b_enc
        fires = max(1, round(x.shape[0] * l0 / d.d_sae))  # tokens per feature
        cut = projection.kthvalue(x.shape[0] - fires, dim=0).values  # [d_sae]
        if hasattr(d, "threshold") and raw["architecture"] == "jumprelu":
            d.threshold.copy_(cut.clamp_min(0))
        elif raw["architecture"] in ("relu", "gated"):  # TopK-style ones select by rank: left alone
            d.b_enc.copy_(-cut)
    return slot


class Timing(NamedTuple):
    """Seconds per step (the fastest of the timed steps: the least disturbed by other processes),
    by the wall clock and in CPU time of this process (all its threads), and the mean L0."""
    wall: float
    cpu: float
    l0: float


def step_timing(slot, x: torch.Tensor, steps: int, autocast: torch.dtype | None) -> Timing:
    """Time `steps` trainer steps after one warm-up step."""
    wall, cpu, l0 = [], [], []
    for i in range(steps + 1):
        sync(x.device)
        t, c = time.perf_counter(), time.process_time()
        slot.step(x, i, 10**6, autocast, WHOLE_BATCH)
        sync(x.device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        window = slot.tracker.window
        l0.append(float(window.counts.sum()) / window.tokens)
        window.restart()
    return Timing(min(wall[1:]), min(cpu[1:]), statistics.mean(l0[1:]))


def timed(raw: dict, x: torch.Tensor, l0: float, args) -> Timing:
    slot = calibrated_slot(raw, x, l0)
    result = step_timing(slot, x, args.steps, args.autocast)
    del slot  # free the dictionary and its Adam state before the next one
    return result


HEADER = (f"{'dense tok/s':>12} {'sparse tok/s':>13} {'sparse/dense':>12}   "
          f"{'dense tok/CPU-s':>15} {'sparse tok/CPU-s':>16} {'sparse/dense':>12}")


def compared(B: int, dense: Timing | None, sparse: Timing) -> str:
    """The HEADER's columns: tokens/s by the wall clock, then per CPU-second, and the ratios."""
    if dense is None:  # TopK has no dense row here
        return f"{'':>12} {B / sparse.wall:13,.0f} {'':>12}   {'':>15} {B / sparse.cpu:16,.0f}"
    return (f"{B / dense.wall:12,.0f} {B / sparse.wall:13,.0f} {dense.wall / sparse.wall:11.2f}x   "
            f"{B / dense.cpu:15,.0f} {B / sparse.cpu:16,.0f} {dense.cpu / sparse.cpu:11.2f}x")


def dense_and_sparse(raw: dict, x: torch.Tensor, l0: float, args) -> tuple[Timing, Timing]:
    return timed({**raw, "sparse": False}, x, l0, args), timed({**raw, "sparse": True}, x, l0, args)


def width_table(x: torch.Tensor, args) -> None:
    B, d_in = x.shape
    print(f"{'dictionary':<18} {'width':>5} {'d_sae':>6} {'L0':>6} {HEADER}")
    for width in args.widths:
        d_sae = width * d_in
        for l0 in args.l0:
            for name, raw in ARCHITECTURES.items():
                dense, sparse = dense_and_sparse({**raw, "d_sae": d_sae}, x, l0, args)
                print(f"{name:<18} {width:>4}x {d_sae:>6} {sparse.l0:6.1f} {compared(B, dense, sparse)}", flush=True)
            k = round(l0)
            topk = timed({"architecture": "topk", "k": k, "d_sae": d_sae}, x, l0, args)
            print(f"{f'topk k={k}':<18} {width:>4}x {d_sae:>6} {topk.l0:6.1f} {compared(B, None, topk)}", flush=True)


def crossover(x: torch.Tensor, args) -> None:
    """relu (classic) dense and sparse steps over a range of densities (L0 / d_sae); the density at
    which the sparse step stops being faster is what `sparse_max_density` should be."""
    B, d_in = x.shape
    d_sae = args.widths[0] * d_in
    print(f"relu (classic), d_sae={d_sae}\n{'density':>8} {'L0':>7} {HEADER}")
    points = []
    for density in args.densities:
        dense, sparse = dense_and_sparse({"architecture": "relu", "d_sae": d_sae}, x, density * d_sae, args)
        points.append((sparse.l0 / d_sae, dense.wall / sparse.wall, dense.cpu / sparse.cpu))
        print(f"{sparse.l0 / d_sae:8.3f} {sparse.l0:7.1f} {compared(B, dense, sparse)}", flush=True)
    for clock, column in (("wall clock", 1), ("CPU time", 2)):
        print(f"crossover by {clock}: {crossing(points, column)}")


def crossing(points: list[tuple[float, ...]], column: int) -> str:
    """Where the ratio in `column` first falls below 1 (linear in log-density between points)."""
    for p0, p1 in zip(points, points[1:]):
        (d0, r0), (d1, r1) = (p0[0], p0[column]), (p1[0], p1[column])
        if r0 >= 1 > r1:
            return f"density ~{d0 * (d1 / d0) ** ((r0 - 1) / (r0 - r1)):.3f}"
    return "none in this range"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--widths", type=int, nargs="+", default=[4, 16, 64], help="d_sae / d_in")
    p.add_argument("--l0", type=float, nargs="+", default=[64.0], help="features firing per token")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up step)")
    p.add_argument("--crossover", action="store_true", help="relu dense vs sparse over --densities")
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.02, 0.04, 0.08, 0.16, 0.32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.autocast = torch.bfloat16 if args.autocast == "bf16" else None
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"device {device}, threads {torch.get_num_threads()}, d_in={args.d_in} batch={args.batch}, "
          f"fastest of {args.steps} steps\n")
    if args.crossover:
        crossover(x, args)
    else:
        width_table(x, args)


if __name__ == "__main__":
    main()
