"""Worker of benchmarks/quality.py: trains SAELens dictionaries on the ground-truth batches.

Run with the SAELens environment's python (benchmarks/.venvs/sae-lens), never imported by the
library: `python peer_saelens.py request.json`. Every run uses SAELens's own defaults (its
SAETrainer: Adam, constant lr 3e-4, gradient clipping at 1, no activation normalisation) except
the sparsity knob, d_sae and, when the request gives one, the lr. Writes <out_dir>/<name>.pt
({"W_dec", "x_hat", "l0"} on the held-out tokens) and <name>.json (lr, seconds) per run.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_common import Request, nested_widths, save_result  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedTrainingSAE,  # noqa: E402
                           GatedTrainingSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig,
                           MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
                           StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                           TopKTrainingSAEConfig)
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

ARCHITECTURES = {  # our request's name -> (training SAE class, its config class)
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig),
    "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
}


DEFAULT_LR = dataclasses.fields(SAETrainerConfig)[[f.name for f in dataclasses.fields(SAETrainerConfig)].index("lr")].default


def build(run: dict, d_in: int, d_sae: int):
    cls, config_cls = ARCHITECTURES[run["architecture"]]
    knobs = {k: v for k, v in run.items() if k not in ("name", "architecture")}
    if "group_fractions" in knobs:  # its Matryoshka takes the cumulative widths of the groups
        knobs["matryoshka_widths"] = nested_widths(knobs.pop("group_fractions"), d_sae)
    return cls(config_cls(d_in=d_in, d_sae=d_sae, **knobs))


def train(sae, request: Request) -> float:
    """Fit with SAELens's trainer; returns the lr used."""
    spec = request.truth.spec
    lr = request.lr if request.lr is not None else DEFAULT_LR
    cfg = SAETrainerConfig(total_training_samples=request.steps * spec.batch_size,
                           train_batch_size_samples=spec.batch_size, lr=lr, lr_end=lr,  # constant
                           logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=request.batch_iterator(),
                         save_checkpoint_fn=lambda path: None)
    trainer.fit()
    return cfg.lr


def inference_model(sae) -> SAE:
    """The trained SAE as SAELens saves it for use (BatchTopK becomes JumpReLU with its threshold)."""
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device="cpu")


def main() -> None:
    request = Request.read(sys.argv[1])
    heldout = request.truth.heldout()
    for run in request.runs:
        start = request.clock()
        sae = build(run, request.truth.spec.d_in, request.d_sae)
        lr = train(sae, request)
        model = inference_model(sae)
        with torch.no_grad():
            f = model.encode(heldout)
            x_hat = model.decode(f)
        save_result(request, run, model.W_dec, x_hat, (f != 0).sum(-1), lr, start)


if __name__ == "__main__":
    main()
