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
    trainer._build(batch)  # the trainer's own set-up, without its loop (whose first step would fire on half)
    trainer._init_from_data(batch)
    slot = trainer.slots[0]
    d = slot.dictionary
    with torch.no_grad():
        xs = d.scale_input(x)
        projection = (xs - d.b_dec) @ d.W_enc  # [B, d_sae] pre-activations without b_enc
        fires = max(1, round(x.shape[0] * l0 / d.d_sae))  # tokens per feature
        cut = projection.kthvalue(x.shape[0] - fires, dim=0).values  # [d_sae]
        if hasattr(d, "threshold") and raw["architecture"] == "jumprelu":
            d.threshold.copy_(cut.clamp_min(0))
        elif raw["architecture"] != "topk":
            d.b_enc.copy_(-cut)
    return slot


def step_seconds(slot, x: torch.Tensor, steps: int, autocast: torch.dtype | None) -> tuple[float, float]:
    """(median seconds per step over `steps` after one warm-up step, mean L0 of the timed steps)."""
    times, l0 = [], []
    for i in range(steps + 1):
        sync(x.device)
        t = time.perf_counter()
        slot.step(x, i, 10**6, autocast, WHOLE_BATCH)
        sync(x.device)
        times.append(time.perf_counter() - t)
        window = slot.tracker.window
        l0.append(float(window.counts.sum()) / window.tokens)
        window.restart()
    return statistics.median(times[1:]), statistics.mean(l0[1:])


def timed(raw: dict, x: torch.Tensor, l0: float, args) -> tuple[float, float]:
    slot = calibrated_slot(raw, x, l0)
    result = step_seconds(slot, x, args.steps, args.autocast)
    del slot  # free the dictionary and its Adam state before the next one
    return result


def dense_and_sparse(raw: dict, x: torch.Tensor, l0: float, args) -> tuple[float, float, float]:
    """(dense seconds/step, sparse seconds/step, L0 measured in the sparse steps)."""
    dense, _ = timed({**raw, "sparse": False}, x, l0, args)
    sparse, measured_l0 = timed({**raw, "sparse": True}, x, l0, args)
    return dense, sparse, measured_l0


def width_table(x: torch.Tensor, args) -> None:
    B, d_in = x.shape
    print(f"{'dictionary':<18} {'width':>5} {'d_sae':>6} {'L0':>6} {'dense tok/s':>12} {'sparse tok/s':>13} "
          f"{'sparse/dense':>12}")
    for width in args.widths:
        d_sae = width * d_in
        for l0 in args.l0:
            for name, raw in ARCHITECTURES.items():
                dense, sparse, measured = dense_and_sparse({**raw, "d_sae": d_sae}, x, l0, args)
                print(f"{name:<18} {width:>4}x {d_sae:>6} {measured:6.1f} {B / dense:12,.0f} {B / sparse:13,.0f} "
                      f"{dense / sparse:11.2f}x", flush=True)
            k = round(l0)
            sec, measured = timed({"architecture": "topk", "k": k, "d_sae": d_sae}, x, l0, args)
            print(f"{f'topk k={k}':<18} {width:>4}x {d_sae:>6} {measured:6.1f} {'':>12} {B / sec:13,.0f}", flush=True)


def crossover(x: torch.Tensor, args) -> None:
    """relu (classic) dense and sparse steps over a range of densities (L0 / d_sae); the density at
    which the sparse step stops being faster is what `sparse_max_density` should be."""
    B, d_in = x.shape
    d_sae = args.widths[0] * d_in
    print(f"relu (classic), d_sae={d_sae}\n{'density':>8} {'L0':>7} {'dense tok/s':>12} {'sparse tok/s':>13} "
          f"{'sparse/dense':>12}")
    points = []
    for density in args.densities:
        dense, sparse, measured = dense_and_sparse({"architecture": "relu", "d_sae": d_sae}, x, density * d_sae, args)
        points.append((measured / d_sae, dense / sparse))
        print(f"{measured / d_sae:8.3f} {measured:7.1f} {B / dense:12,.0f} {B / sparse:13,.0f} {dense / sparse:11.2f}x",
              flush=True)
    for (d0, r0), (d1, r1) in zip(points, points[1:]):
        if r0 >= 1 > r1:  # interpolate the ratio linearly in log-density
            t = (r0 - 1) / (r0 - r1)
            print(f"\ncrossover (sparse = dense) at density ~{d0 * (d1 / d0) ** t:.3f}")
            return
    print("\nno crossover in this range")


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
    args = p.parse_args()
    args.autocast = torch.bfloat16 if args.autocast == "bf16" else None
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"device {device}, threads {torch.get_num_threads()}, d_in={args.d_in} batch={args.batch}, "
          f"median of {args.steps} steps\n")
    if args.crossover:
        crossover(x, args)
    else:
        width_table(x, args)


if __name__ == "__main__":
    main()
