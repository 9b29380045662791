"""Worker of benchmarks/quality.py: trains dictionary_learning (PyPI `dictionary-learning`)
dictionaries on the ground-truth batches.

Run with that environment's python (benchmarks/.venvs/dictionary-learning):
`python peer_dictionary_learning.py request.json`. Each trainer class keeps its own defaults
(lr, loss, initialisation, decoder constraint, AuxK, ...) except: the sparsity knob, d_sae, the
lr when the request gives one, and the step counts its defaults state in absolute steps (lr
warm-up 1000, sparsity warm-up 2000, threshold start 1000), which are capped at a tenth of the
run: a 1000-step warm-up would leave a 128-step run at an eighth of its lr throughout.
The loop is `trainer.update(step, x)` per batch, as its trainSAE does without normalisation.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dictionary_learning.trainers import (BatchTopKTrainer, GatedSAETrainer, JumpReluTrainer,  # noqa: E402
                                          StandardTrainer, TopKTrainer)
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer  # noqa: E402
from peer_common import Request, save_result  # noqa: E402

TRAINERS = {"standard": StandardTrainer, "topk": TopKTrainer, "batchtopk": BatchTopKTrainer,
            "jumprelu": JumpReluTrainer, "gated": GatedSAETrainer,
            "matryoshka_batchtopk": MatryoshkaBatchTopKTrainer}  # group_fractions from the request
STEP_COUNTS = ("warmup_steps", "sparsity_warmup_steps", "threshold_start_step")


def build(run: dict, request: Request):
    cls = TRAINERS[run["architecture"]]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in run.items() if k not in ("name", "architecture")}
    kwargs.update(steps=request.steps, activation_dim=request.truth.spec.d_in, dict_size=request.d_sae,
                  layer=0, lm_name="ground_truth", seed=0, device="cpu")
    for key in STEP_COUNTS:
        if key in params and params[key].default is not None:
            kwargs[key] = min(params[key].default, max(1, request.steps // 10))
    if request.lr is not None:
        kwargs["lr"] = request.lr
    return cls(**kwargs)


def decoder_rows(ae) -> torch.Tensor:
    """[d_sae, d_in] whichever layout the class keeps."""
    return ae.W_dec if hasattr(ae, "W_dec") else ae.decoder.weight.T


def encode(ae, x: torch.Tensor) -> torch.Tensor:
    if "use_threshold" in inspect.signature(ae.encode).parameters and "BatchTopK" in type(ae).__name__:
        return ae.encode(x, use_threshold=True)  # its inference mode
    return ae.encode(x)


def main() -> None:
    request = Request.read(sys.argv[1])
    heldout = request.truth.heldout()
    for run in request.runs:
        start = request.clock()
        trainer = build(run, request)
        for step, x in enumerate(request.batch_iterator()):
            trainer.update(step, x)
        ae = trainer.ae.eval()
        with torch.no_grad():
            f = encode(ae, heldout)
            x_hat = ae.decode(f)
        save_result(request, run, decoder_rows(ae), x_hat, (f != 0).sum(-1), trainer.lr, start)


if __name__ == "__main__":
    main()
