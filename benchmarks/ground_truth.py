"""Synthetic activations with a known dictionary, for `benchmarks/quality.py` and its peer workers.

Depends on torch alone, so a peer library's environment (benchmarks/.venvs/<peer>) imports it by
path and draws exactly the batches our trainer draws: every batch is a function of (seed, step).

The setting (issue 12): `n_features` unit-norm random directions in `d_in` dimensions (4,096 in 512:
max pairwise |cos| about 0.23); `n_dense` dense features firing on `dense_min`..`dense_max` of the
tokens, the rest Zipf-distributed, p_i ∝ 1 / (i + zipf_offset)^zipf_exponent, scaled so that the
expected number of active features per token is `true_l0`; magnitudes Exp(1); Gaussian noise of
std `noise_std` per dimension; no mean offset. The held-out set is drawn from its own generator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

HOOK = "synthetic"


@dataclass(frozen=True)
class GroundTruthSpec:
    d_in: int = 512
    n_features: int = 4096
    n_dense: int = 8
    dense_min: float = 0.1  # firing probabilities of the dense features, evenly spaced in [min, max]
    dense_max: float = 0.3
    true_l0: float = 30.0  # expected active features per token, dense ones included
    zipf_exponent: float = 1.0
    zipf_offset: float = 100.0  # keeps the commonest Zipf feature (7.5%) below the dense ones
    noise_std: float = 0.02
    batch_size: int = 4096
    heldout_tokens: int = 16384
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GroundTruth:
    """The true dictionary and a deterministic stream of batches drawn from it."""

    def __init__(self, spec: GroundTruthSpec):
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        features = torch.randn(spec.n_features, spec.d_in, generator=g, dtype=torch.float64)
        self.features = (features / features.norm(dim=1, keepdim=True)).float()  # [n_features, d_in]
        probabilities = self._probabilities().float()
        perm = torch.randperm(spec.n_features, generator=g)  # dense features at random ids
        self.probabilities = probabilities[perm]  # [n_features]
        self.dense_ids = torch.argsort(perm)[: spec.n_dense].sort().values  # ids whose p came first

    def _probabilities(self) -> Tensor:
        s = self.spec
        dense = torch.linspace(s.dense_min, s.dense_max, s.n_dense, dtype=torch.float64)
        ranks = torch.arange(1, s.n_features - s.n_dense + 1, dtype=torch.float64)
        zipf = (ranks + s.zipf_offset) ** -s.zipf_exponent
        budget = s.true_l0 - float(dense.sum())
        if budget <= 0:
            raise ValueError(f"true_l0 {s.true_l0} leaves nothing for the Zipf features after the dense ones")
        zipf = (zipf * budget / zipf.sum()).clamp(max=1.0)
        return torch.cat([dense, zipf])

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """x [n, d_in]: Σ_i a_i d_i + noise, a_i ~ Exp(1) on the features that fire."""
        fires = torch.rand(n, self.spec.n_features, generator=generator) < self.probabilities
        rows, cols = fires.nonzero(as_tuple=True)  # row-major: rows ascending
        magnitudes = torch.empty(cols.numel()).exponential_(1.0, generator=generator)
        offsets = torch.searchsorted(rows, torch.arange(n))
        x = F.embedding_bag(cols, self.features, offsets, mode="sum", per_sample_weights=magnitudes)
        return x + self.spec.noise_std * torch.randn(n, self.spec.d_in, generator=generator)

    def batch(self, step: int) -> Tensor:
        """Training batch `step` [batch_size, d_in]; the same in every environment."""
        g = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + step + 1)
        return self.sample(self.spec.batch_size, g)

    def heldout(self) -> Tensor:
        """The held-out tokens [heldout_tokens, d_in] (a generator no training batch uses)."""
        g = torch.Generator().manual_seed(self.spec.seed * 1_000_003 - 1)
        return self.sample(self.spec.heldout_tokens, g)

    # the batch-source protocol of sae.trainer
    def batches(self, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        step = start_step
        while True:
            yield {HOOK: self.batch(step)}
            step += 1

    def max_abs_cos(self) -> float:
        """Largest |cos| between two distinct true features."""
        gram = self.features @ self.features.T
        gram.fill_diagonal_(0.0)
        return float(gram.abs().max())


def reconstruction_metrics(x: Tensor, x_hat: Tensor, l0_per_token: Tensor) -> dict[str, float]:
    """FVU (centred, METRICS.md), L0 and MSE on the held-out tokens."""
    x, x_hat = x.double(), x_hat.double()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    return {"l0": float(l0_per_token.double().mean()), "fvu": float(fvu),
            "mse": float((x - x_hat).pow(2).mean())}


def recovery(true_features: Tensor, W_dec: Tensor) -> Tensor:
    """[n_true]: each true feature's best cosine with a decoder row (W_dec [d_sae, d_in])."""
    w = W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (true_features @ w.T).max(dim=1).values
