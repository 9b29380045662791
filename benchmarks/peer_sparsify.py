"""Worker of benchmarks/quality.py: trains EleutherAI sparsify (PyPI `eai-sparsify`) TopK
dictionaries on the ground-truth batches.

Run with that environment's python (benchmarks/.venvs/eai-sparsify):
`python peer_sparsify.py request.json`. sparsify's Trainer reads activations from a language
model through hooks, so this worker runs the part of its step that concerns one dictionary with
the TrainConfig defaults: `SparseCoder` (TopK, unit-norm decoder), loss = the batch FVU, no AuxK
(auxk_alpha 0), b_dec set to the first batch's mean, the decoder renormalised before each
forward and its gradient's parallel component removed, optimizer "signum" (schedule-free SignSGD,
momentum 0.95, lr 5e-3 / sqrt(num_latents / 2^14)), evaluated with the schedule-free averaged
weights (`optimizer.eval()`, as its trainer does before saving).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from schedulefree import ScheduleFreeWrapper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_common import Request, save_result  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.sign_sgd import SignSGD  # noqa: E402


def default_lr(num_latents: int) -> float:
    return 5e-3 / (num_latents / 2**14) ** 0.5  # sparsify's "signum" default


def train(sae: SparseCoder, request: Request, lr: float) -> ScheduleFreeWrapper:
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    optimizer.train()
    for step, x in enumerate(request.batch_iterator()):
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.eval()  # the averaged weights, as sparsify saves them
    return optimizer


def main() -> None:
    request = Request.read(sys.argv[1])
    heldout = request.truth.heldout()
    for run in request.runs:
        if run["architecture"] != "topk":
            raise SystemExit(f"peer_sparsify.py: sparsify trains TopK only, not {run['architecture']!r}")
        start = request.clock()
        torch.manual_seed(0)
        sae = SparseCoder(request.truth.spec.d_in, SparseCoderConfig(num_latents=request.d_sae, k=int(run["k"])))
        lr = request.lr if request.lr is not None else default_lr(sae.num_latents)
        train(sae, request, lr)
        with torch.no_grad():
            top_acts, top_indices, _ = sae.encode(heldout)
            x_hat = sae.decode(top_acts, top_indices)
        save_result(request, run, sae.W_dec, x_hat, (top_acts != 0).sum(-1), lr, start)


if __name__ == "__main__":
    main()
