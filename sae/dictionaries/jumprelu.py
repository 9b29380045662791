"""`jumprelu`: JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"):
f_i = pre_i · H(pre_i - θ_i) with a learned per-feature threshold θ, trained with an L0 penalty.

The step function has no useful gradient; θ gets straight-through estimates with a rectangle
kernel of width `bandwidth` ε:

* ∂JumpReLU(z)/∂θ ≈ -(θ/ε) · K((z - θ)/ε),  ∂JumpReLU(z)/∂z = H(z - θ);
* ∂H(z - θ)/∂θ ≈ -(1/ε) · K((z - θ)/ε),  K(u) = 1 for |u| < 1/2, else 0.

With `ste_to_input` (Anthropic's variant; SAELens's `jumprelu_ste_to_input`) the kernel terms
reach z as well, with the opposite sign to θ's (+(θ/ε)·K and +(1/ε)·K), so the L0 term pulls
pre-activations near θ down and trains the encoder towards sparsity; without it (DeepMind's, the
paper's) the L0 term trains θ alone and the encoder learns from the reconstruction only.

Loss: ‖x - x̂‖² (summed over dimensions, mean over tokens, normalised units)
+ λ(progress) · L0, with λ = `l0_coefficient` warmed up over `sparsity_warmup_fraction`.
θ is kept ≥ 0 after each step. The threshold is saved as `threshold` [d_sae], in
pre-activation units: folding the input scale leaves pre-activations unchanged
((x - b/s)(s·W_enc) = (s·x - b) W_enc), so the threshold needs no folding.

Defaults (issue 12; benchmarks/quality_ablations.py jumprelu, README "Dictionary quality"): θ starts
at 0.7 and decoder rows are free (`threshold_init: 0.1, normalize_decoder: true` are the old
ones). In normalised units (E‖x‖² = d_in) a unit direction's projection of a token has std about
1, so at θ 0.1 every latent fired on ~45 % of the tokens at init (at 0.7 on ~20 %), and Adam moves
θ by about lr per step: the thresholds stayed far below that interference for most of a short
run, many latents fired on most tokens and the dense true features were split across them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from sae.dictionaries.base import BatchShards, SparseDictionary, TrainStep, penalty_warmup, width_scaled_lr
from sae.dictionaries.elementwise import (ElementwiseConfig, ElementwiseDictionary, Pairs, at_least_float32,
                                          pair_counts, sse_per_token)
from sae.dictionaries.registry import register


class JumpReLUConfig(ElementwiseConfig):
    architecture: Literal["jumprelu"] = "jumprelu"
    l0_coefficient: float = Field(0.1, ge=0)
    sparsity_warmup_fraction: float = Field(0.05, ge=0, le=1)
    bandwidth: float = Field(0.05, gt=0)  # ε of the rectangle kernel, in normalised pre-activation units
    # in normalised units, where a unit direction's projection has std ~1 (0.1 before 2026-12-01:
    # checkpoints and cfg.json files from then say so, and writing it resumes them)
    threshold_init: float = Field(0.7, ge=0)
    ste_to_input: bool = False  # the threshold's pseudo-gradients reach the pre-activations too
    normalize_decoder: bool = False  # True before 2026-12-01


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = (theta / eps) * _rectangle((z - theta) / eps) * g  # [B, d_sae]
        g_z = g * (z > theta).to(g.dtype)
        if ctx.ste_to_input:
            g_z = g_z + ste
        return g_z, (-ste).sum_to_size(theta.shape).to(theta.dtype), None, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        ste = (1.0 / ctx.bandwidth) * _rectangle((z - theta) / ctx.bandwidth) * g  # [B, d_sae]
        g_z = ste if ctx.ste_to_input else torch.zeros_like(z)
        return g_z, (-ste).sum_to_size(theta.shape).to(theta.dtype), None, None


def jumprelu(z: Tensor, theta: Tensor, bandwidth: float, ste_to_input: bool = False) -> Tensor:
    return _JumpReLU.apply(z, theta, bandwidth, ste_to_input)


def heaviside_step(z: Tensor, theta: Tensor, bandwidth: float, ste_to_input: bool = False) -> Tensor:
    return _Step.apply(z, theta, bandwidth, ste_to_input)


@register
class JumpReLUDictionary(ElementwiseDictionary):
    architecture = "jumprelu"
    Config = JumpReLUConfig
    cfg: JumpReLUConfig
    feature_dims = {**SparseDictionary.feature_dims, "threshold": 0}

    def __init__(self, cfg, d_in, metadata=None, d_out=None):
        super().__init__(cfg, d_in, metadata, d_out)
        self.threshold = nn.Parameter(torch.full((self.d_sae,), float(cfg.threshold_init)))

    def default_lr(self) -> float:
        # was 7e-4: ~10x too slow (benchmarks/quality_ablations.py jumprelu)
        return width_scaled_lr(1.75e-3, self.d_sae_total)

    def weights(self) -> dict[str, Tensor]:
        return {**super().weights(), "threshold": self.threshold}

    def activation(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold).to(pre.dtype)

    def _resample_extra(self, ids: Tensor) -> None:
        self.threshold[ids] = self.cfg.threshold_init

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=0.0)

    # ---- training: dense or sparse step (sae.dictionaries.elementwise), the same loss ----------
    def touched(self, pre: Tensor) -> Tensor:
        # f and its gradients vanish unless pre > θ, and θ's pseudo-derivatives (of f and of the L0
        # term) unless |pre - θ| < ε/2: pre > θ - ε holds for both, with margin for rounding
        # (NaN counts too: it must reach the loss)
        return (pre <= self.threshold.to(pre.dtype) - self.cfg.bandwidth).logical_not_()

    # The threshold's comparisons and pseudo-gradients run in float32 even under bf16 autocast: in
    # bf16 they biased θ low (L0 2-3% above the float32 run's on the same data, tests/test_bf16.py).
    def dense_loss(self, xs: Tensor, ys: Tensor, pre: Tensor, progress: float, shards: BatchShards) -> TrainStep:
        pre, theta = at_least_float32(pre), self.threshold
        f = jumprelu(pre, theta, self.cfg.bandwidth, self.cfg.ste_to_input)
        x_hat = self.decode_dense(f, self.W_dec, self.decoder_offset(xs), shards)
        l0 = shards.feature_sum(at_least_float32(self._step(pre, theta)).sum(dim=-1).mean())
        return self._loss(x_hat, ys, l0, progress, f=f)

    def sparse_loss(self, xs: Tensor, ys: Tensor, pre: Tensor, pairs: Pairs, progress: float,
                    shards: BatchShards) -> TrainStep:
        z = at_least_float32(self.selected(xs, pre, pairs))
        theta = self.threshold[pairs.cols]
        vals = jumprelu(z, theta, self.cfg.bandwidth, self.cfg.ste_to_input)
        x_hat = self.decode_pairs(vals, pairs, self.W_dec, self.decoder_offset(xs), shards)
        l0 = shards.feature_sum(at_least_float32(self._step(z, theta)).sum()) / pairs.n_rows
        return self._loss(x_hat, ys, l0, progress, counts=pair_counts(vals, pairs.cols, self.d_sae))

    def _step(self, z: Tensor, theta: Tensor) -> Tensor:
        return heaviside_step(z, theta, self.cfg.bandwidth, self.cfg.ste_to_input)

    def _loss(self, x_hat: Tensor, xs: Tensor, l0: Tensor, progress: float, f: Tensor | None = None,
              counts: Tensor | None = None) -> TrainStep:
        sse = sse_per_token(x_hat, xs)
        lam = self.cfg.l0_coefficient * penalty_warmup(progress, self.cfg.sparsity_warmup_fraction)
        return TrainStep(loss=sse + lam * l0, x_hat=x_hat, f=f, feature_counts=counts,
                         metrics={"sse": sse.detach(), "l0": l0.detach()})
