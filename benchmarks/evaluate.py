"""Evaluator throughput: evaluated tokens/s for 1, 3 and 10 dictionaries, full forwards against
running on from the hook, next to the bare forwards they are built from.

Prints, on the same tokens and per hook:
  - bare full forward: `model(tokens)`, tokens/s;
  - bare run-on: the layers after the hook, the final norm and the unembedding, from the clean
    activation there (`sae.partial_forward.continue_from`), one variant, tokens/s;
  - for n dictionaries (random TopK, d_sae 4 x d_in, k 32, as in `make demo`): evaluated tokens/s of
    `evaluate_dictionaries` with `full_forwards=True` (n + 3 full forwards per batch) and with the
    default run-on path, and the target: one full forward plus n + 2 run-ons per batch, from the
    two bare rates.

Tokens are random ids (throughput does not depend on the text). Usage:

    python benchmarks/evaluate.py   # smollm2-135m, blocks.3.hook_resid_post and blocks.3.hook_mlp_out
    python benchmarks/evaluate.py --model /path/to/hf_folder --hook blocks.10.hook_resid_post --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import sae.dictionaries  # noqa: E402,F401  (registers every architecture)
from eval.evaluate import evaluate_dictionaries  # noqa: E402
from harvest import random_tokens  # noqa: E402
from sae import partial_forward as P  # noqa: E402
from sae.dictionaries.registry import ARCHITECTURES  # noqa: E402
from sae.models import load_model, model_device  # noqa: E402

DICTIONARY_COUNTS = (1, 3, 10)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Rate:
    """Tokens per wall-clock second and per CPU second of this process (all its threads): on a
    shared machine the CPU-time rate is the one that does not depend on the other processes."""

    def __init__(self, n_tokens: int, wall_s: float, cpu_s: float):
        self.wall, self.cpu = n_tokens / wall_s, n_tokens / max(cpu_s, 1e-9)

    def __str__(self) -> str:
        return f"{_fmt(self.wall)} tok/s ({_fmt(self.cpu)} tok/CPU-s)"


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def timed(fn, n_tokens: int, device: torch.device) -> Rate:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return Rate(n_tokens, time.perf_counter() - t0, time.process_time() - c0)


def topk_dictionaries(n: int, d_in: int, hook: str, device: torch.device) -> dict:
    cls = ARCHITECTURES["topk"]
    return {f"topk{i}": cls(cls.Config(architecture="topk", d_sae=4 * d_in, k=32, seed=i), d_in,
                            metadata={"hook_name": hook}).to(device).eval() for i in range(n)}


def bare_full(model, batches) -> None:
    with torch.no_grad():
        for toks in batches:
            model(toks, return_type="logits")


def bare_run_on(model, site: P.HookSite, batches):
    """A function running on from the hook once per batch (the clean forwards it starts from are
    recorded here, outside the timing)."""
    recorded = []
    with torch.no_grad():
        for toks in batches:
            with P.recording(model, [site]) as rec:
                model(toks, return_type="logits")
            recorded.append(rec.captured(site))
    return lambda: [P.continue_from(model, site, c, c.activation) for c in recorded]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", action="append", help="hook point (repeatable); default blocks.3.hook_resid_post "
                                                    "and blocks.3.hook_mlp_out")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-contexts", type=int, default=8, help="contexts per forward (make demo: 8)")
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dictionaries", default=",".join(map(str, DICTIONARY_COUNTS)))
    ap.add_argument("--quick", action="store_true", help="256 tokens, 1 and 3 dictionaries: a smoke run")
    a = ap.parse_args()
    hooks = a.hook or ["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"]
    counts = [1, 3] if a.quick else [int(n) for n in a.dictionaries.split(",")]
    n_tokens = 256 if a.quick else a.tokens
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    t = time.perf_counter()
    model = load_model(a.model, device=device, dtype=a.model_dtype)
    dev = model_device(model)
    T, bc = a.context_size, a.batch_contexts
    tokens, keep = random_tokens(model, n_tokens, T)
    n_ctx = tokens.shape[0]
    batches = [tokens[i:i + bc].to(dev) for i in range(0, n_ctx, bc)]
    n_tok = tokens.numel()
    print(f"model {a.model} on {dev} ({a.model_dtype}, {len(model.blocks)} blocks), loaded in "
          f"{time.perf_counter() - t:.1f}s; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}; "
          f"{n_ctx} contexts x {T} = {n_tok} tokens in batches of {bc}")
    bare_full(model, batches[:1])  # warm-up
    full_rate = timed(lambda: bare_full(model, batches), n_tok, dev)
    print(f"\nbare full forward: {full_rate}")
    for hook in hooks:
        report_hook(model, hook, tokens, keep, batches, counts, full_rate, bc, dev)


def report_hook(model, hook: str, tokens, keep, batches, counts, full_rate: Rate, bc: int,
                dev: torch.device) -> None:
    n_tok = tokens.numel()
    site = P.locate(model, hook)
    run_on = timed(bare_run_on(model, site, batches), n_tok, dev)
    print(f"\n{hook} ({site.position} of block {site.layer}): bare run-on {run_on}, "
          f"{full_rate.cpu / run_on.cpu:.2f} of a full forward's CPU time")
    print(f"{'dictionaries':>12}  {'full forwards':>32}  {'run-on':>32}  {'speed-up':>8}  {'target':>14}  "
          f"{'run-on / target':>15}")
    d_in = model.cfg.d_model
    means = {hook: torch.zeros(d_in, device=dev)}
    for n in counts:
        dicts = topk_dictionaries(n, d_in, hook, dev)
        rates = {}
        for full in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a caveat about the hook is not the benchmark's subject
                rates[full] = timed(lambda: evaluate_dictionaries(
                    model, dicts, tokens, keep, train_means=means, batch_size=bc, progress=False,
                    full_forwards=full), n_tok, dev)
        target = 1 / (1 / full_rate.cpu + (n + 2) / run_on.cpu)  # tok/CPU-s
        print(f"{n:>12}  {str(rates[True]):>32}  {str(rates[False]):>32}  "
              f"{rates[False].cpu / rates[True].cpu:>7.2f}x  {_fmt(target):>6} tok/CPU-s  "
              f"{rates[False].cpu / target:>15.2f}")
    print("speed-up and target in CPU time; target: one full forward plus n + 2 run-ons per batch")


if __name__ == "__main__":
    main()
