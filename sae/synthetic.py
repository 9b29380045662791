"""Synthetic activations with a known ground-truth dictionary (for tests and benchmarks).

`n_features` true feature directions (random unit vectors) live in `d_in` dimensions, with
n_features > d_in (superposition). Each token activates each feature independently with its own
probability: Zipf-like, p_i ∝ 1 / (i + 1)^zipf_exponent, scaled so that the expected number of
active features per token is `mean_active`, plus `n_frequent` very frequent features firing with
probability `frequent_probability` (the dense "spike" real dictionaries show). Active features
take non-negative magnitudes uniform in [magnitude_min, magnitude_max]; x = Σ_i a_i d_i + offset
(+ optional Gaussian noise), where `offset` is a fixed mean vector (real activations are not
centred).

`SyntheticFeatures` is a batch source: `batches(start_step)` yields {hook_name: [batch_size, d_in]}
deterministically from (seed, step), so resuming at any step costs nothing.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class SyntheticFeatures:
    def __init__(self, d_in: int = 32, n_features: int = 128, *, batch_size: int = 1024,
                 mean_active: float = 4.0, zipf_exponent: float = 1.0, n_frequent: int = 2,
                 frequent_probability: float = 0.25, magnitude_min: float = 0.5, magnitude_max: float = 1.5,
                 offset_norm: float = 1.0, noise_std: float = 0.0, seed: int = 0,
                 hook_name: str = "synthetic", dtype: torch.dtype = torch.float32):
        if n_frequent > n_features:
            raise ValueError("n_frequent must not exceed n_features")
        self.d_in, self.n_features, self.batch_size = d_in, n_features, batch_size
        self.magnitude_min, self.magnitude_max = magnitude_min, magnitude_max
        self.noise_std, self.seed, self.hook_name, self.dtype = noise_std, seed, hook_name, dtype
        g = torch.Generator().manual_seed(seed)
        features = torch.randn(n_features, d_in, generator=g)
        self.features = features / features.norm(dim=1, keepdim=True)  # [n, d_in], unit rows
        offset = torch.randn(d_in, generator=g)
        self.offset = offset / offset.norm() * offset_norm
        n_zipf = n_features - n_frequent
        zipf = 1.0 / torch.arange(1, n_zipf + 1, dtype=torch.float64) ** zipf_exponent
        budget = max(mean_active - n_frequent * frequent_probability, 1e-3)
        zipf = (zipf * budget / zipf.sum()).clamp(max=1.0)
        prob = torch.cat([torch.full((n_frequent,), frequent_probability, dtype=torch.float64), zipf])
        perm = torch.randperm(n_features, generator=g)  # frequent features at random ids
        self.probabilities = prob[perm].float()  # [n] firing probability of each true feature

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x [n, d_in], codes [n, n_features]) drawn with `generator`."""
        fires = torch.rand(n, self.n_features, generator=generator) < self.probabilities
        mags = torch.empty(n, self.n_features).uniform_(self.magnitude_min, self.magnitude_max, generator=generator)
        codes = mags * fires
        x = codes @ self.features + self.offset
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(n, self.d_in, generator=generator)
        return x.to(self.dtype), codes

    def batch(self, step: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        return self.sample(self.batch_size, g)[0]

    def batches(self, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        step = start_step
        while True:
            yield {self.hook_name: self.batch(step)}
            step += 1

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.batches(0)


def feature_recovery(true_features: Tensor, W_dec: Tensor) -> Tensor:
    """For each true feature, the max cosine similarity with any learned decoder row -> [n_true]."""
    t = true_features / true_features.norm(dim=1, keepdim=True)
    w = W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (t @ w.T).max(dim=1).values


def fvu(dictionary, x: Tensor) -> float:
    """Σ‖x - x̂‖² / Σ‖x - x̄‖² (centred, as in METRICS.md) on raw activations x."""
    with torch.no_grad():
        x_hat = dictionary(x)
        return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())


class SyntheticTranscoding:
    """Two hooks driven by the same sparse codes, each through its own known dictionary: the input
    x_in = codes @ F_in + offset_in [d_in] and the output x_out = codes @ F_out + offset_out [d_out].
    With `n_dense` > 0, x_in also carries n_dense dimensions of dense Gaussian noise z (after the
    feature dimensions, independent of the codes, std `dense_std`) and x_out adds z @ linear [n_dense, d_out]: the
    part only a linear (skip) path can carry, whose least-squares map from x_in is exactly
    `linear` on those dimensions. A batch source like `SyntheticFeatures`, yielding
    {input_hook: x_in, output_hook: x_out}."""

    def __init__(self, d_in: int = 32, d_out: int = 24, n_features: int = 128, *, n_dense: int = 0,
                 dense_std: float = 0.3, input_hook: str = "in", output_hook: str = "out", seed: int = 0,
                 batch_size: int = 1024, **codes_kwargs):
        # F_in, offset_in and the firing probabilities
        self.codes = SyntheticFeatures(d_in - n_dense, n_features, seed=seed, batch_size=batch_size, **codes_kwargs)
        self.d_in, self.d_out, self.n_dense, self.dense_std, self.seed = d_in, d_out, n_dense, dense_std, seed
        self.input_hook, self.output_hook, self.batch_size = input_hook, output_hook, batch_size
        g = torch.Generator().manual_seed(seed + 7919)
        features_out = torch.randn(n_features, d_out, generator=g)
        self.features_in = torch.cat([self.codes.features, torch.zeros(n_features, n_dense)], dim=1)  # [n, d_in]
        self.features_out = features_out / features_out.norm(dim=1, keepdim=True)  # [n, d_out], unit rows
        offset = torch.randn(d_out, generator=g)
        self.offset_out = offset / offset.norm()
        self.linear = torch.randn(n_dense, d_out, generator=g) / max(n_dense, 1) ** 0.5  # [n_dense, d_out]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x_in [n, d_in], x_out [n, d_out]) of the same n tokens."""
        x_feat, codes = self.codes.sample(n, generator)
        z = torch.randn(n, self.n_dense, generator=generator) * self.dense_std
        x_out = codes @ self.features_out + self.offset_out + z @ self.linear
        return torch.cat([x_feat.float(), z], dim=1).to(x_feat.dtype), x_out.to(x_feat.dtype)

    def batches(self, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        step = start_step
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
            x_in, x_out = self.sample(self.batch_size, g)
            yield {self.input_hook: x_in, self.output_hook: x_out}
            step += 1

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.batches(0)
