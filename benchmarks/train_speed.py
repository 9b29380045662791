"""Training throughput of the trainer's step, next to the machine's matmul ceiling.

For each dictionary (default: d_in=512, d_sae=4096, batch 4096):
  - relu (L1, dense step), topk k=32 with the sparse kernels, topk k=32 with `sparse: false`;
  - tokens/s of `train_dictionaries` steps (warm-up and the data-dependent init excluded by
    timing two run lengths and taking the difference);
  - achieved GFLOP/s, counting the matmul work the step really needs (dense: 5 matmuls of
    B·d_in·d_sae; sparse TopK: the dense encoder forward plus O(B·k·d_in) for the rest), and that
    as a fraction of the fp32 matmul ceiling measured here (best of the step's three shapes).

    python benchmarks/train_speed.py                 # CPU (or CUDA when present)
    python benchmarks/train_speed.py --device cuda --batch 16384 --autocast bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.dictionaries import parse_dictionary_config  # noqa: E402
from sae.trainer import train_dictionaries  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(batch: int, d_in: int, d_sae: int, device: torch.device, dtype: torch.dtype,
                   seconds: float = 2.0) -> float:
    """Best GFLOP/s over the three matmul shapes of a dense step (each B·d_in·d_sae multiply-adds):
    x @ W_enc [B,d_in]x[d_in,d_sae], f @ W_dec [B,d_sae]x[d_sae,d_in], xᵀ @ g [d_in,B]x[B,d_sae]."""
    shapes = [(batch, d_in, d_sae), (batch, d_sae, d_in), (d_in, batch, d_sae)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def step_seconds(raw: dict, data: list[torch.Tensor], steps: tuple[int, int], device: torch.device,
                 autocast: torch.dtype | None) -> float:
    """Seconds per training step: (time of n2 steps - time of n1 steps) / (n2 - n1)."""
    times = []
    for n in steps:
        cfg = parse_dictionary_config(dict(raw))
        batch = data[0].shape[0]
        sync(device)
        t = time.perf_counter()
        train_dictionaries(data[:n], [cfg], total_tokens=n * batch, device=device, progress=False,
                           autocast_dtype=autocast, log_every=10**9)
        sync(device)
        times.append(time.perf_counter() - t)
    return (times[1] - times[0]) / (steps[1] - steps[0])


def useful_gflop(raw: dict, batch: int, d_in: int, d_sae: int) -> float:
    dense = 2 * batch * d_in * d_sae
    if raw["architecture"] == "topk" and raw.get("sparse", True):
        # the dense encoder forward (to select the top k), then on the k selected only: decoder
        # forward and backward, encoder backward (AuxK runs only on dead latents: none here)
        return (dense + 3 * 2 * batch * raw["k"] * d_in) / 1e9
    # forward: encoder and decoder; backward: decoder input and weight gradients, encoder weight
    # gradient (the activations need no gradient)
    return 5 * dense / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, nargs=2, default=(3, 15), help="two run lengths (steps) to difference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    args = p.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    B, d_in, d_sae = args.batch, args.d_in, args.d_sae

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(B, d_in, generator=g).to(device) for _ in range(max(args.steps))]
    ceiling = matmul_ceiling(B, d_in, d_sae, device, torch.bfloat16 if autocast else torch.float32)
    print(f"device {device}, threads {torch.get_num_threads()}, d_in={d_in} d_sae={d_sae} batch={B}")
    print(f"matmul ceiling (best of the step's 3 shapes, {'bf16' if autocast else 'fp32'}): {ceiling:.1f} GFLOP/s\n")

    runs = {
        "relu (L1, dense)": {"architecture": "relu", "d_sae": d_sae, "l1_coefficient": 1.0},
        f"topk k={args.k} (sparse kernels)": {"architecture": "topk", "d_sae": d_sae, "k": args.k},
        f"topk k={args.k} (dense, sparse: false)": {"architecture": "topk", "d_sae": d_sae, "k": args.k,
                                                    "sparse": False},
    }
    print(f"{'dictionary':<36} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>8} {'% ceiling':>9}")
    results = {}
    for name, raw in runs.items():
        sec = step_seconds(raw, data, tuple(args.steps), device, autocast)
        gflops = useful_gflop(raw, B, d_in, d_sae) / sec
        results[name] = sec
        print(f"{name:<36} {sec:8.3f} {B / sec:10,.0f} {gflops:8.1f} {100 * gflops / ceiling:8.0f}%")
    names = list(results)
    print(f"\ntopk sparse vs relu dense step: {results[names[0]] / results[names[1]]:.2f}x faster; "
          f"vs topk dense: {results[names[2]] / results[names[1]]:.2f}x faster")


if __name__ == "__main__":
    main()
