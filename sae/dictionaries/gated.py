"""`gated`: Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated
Sparse Autoencoders").

Two paths share the encoder directions:
  π_gate = (x - b_dec) W_enc + b_enc                       (W_enc = W_gate, b_enc = b_gate)
  π_mag  = (x - b_dec) (W_enc ⊙ exp(r_mag)) + b_mag
  f      = 1[π_gate > 0] ⊙ ReLU(π_mag)

Loss: ‖x - x̂‖² + λ Σ_i ReLU(π_gate)_i ‖W_dec,i‖ + ‖x - x̂_frozen(ReLU(π_gate))‖², the last
term (the auxiliary loss) decoding the gate activations with a frozen copy of the decoder so
that the gate path learns to reconstruct. Decoder rows at unit norm by default (then the norm
weighting is 1). Saved tensors: W_enc, b_enc, r_mag, b_mag, W_dec, b_dec. Both pre-activations
are unchanged by folding the input scale, so r_mag and b_mag need no folding.

The gate's bias b_enc starts (and restarts at resampling) at `b_gate_init` (-1; 0 is the old
default): in normalised units a unit direction's projection of a token has std about 1, so with
b_enc 0 every gate opened on half the tokens at init and the L1 had to pull each bias down at
about lr per step. On the ground truth of benchmarks/quality.py (medium) -1 lowers FVU by 3-5 %
at equal L0 at 128 steps and raises MMCS (README "Dictionary quality").
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


class GatedConfig(ElementwiseConfig):
    architecture: Literal["gated"] = "gated"
    l1_coefficient: float = Field(1.0, ge=0)
    sparsity_warmup_fraction: float = Field(0.05, ge=0, le=1)
    normalize_decoder: bool = True
    # initial b_enc (the gate's bias), in normalised pre-activation units; 0 before it was a setting
    b_gate_init: float = Field(-1.0, json_schema_extra={"absent_means": 0.0})


@register
class GatedDictionary(ElementwiseDictionary):
    architecture = "gated"
    Config = GatedConfig
    cfg: GatedConfig
    feature_dims = {**SparseDictionary.feature_dims, "r_mag": 0, "b_mag": 0}

    def __init__(self, cfg, d_in, metadata=None, d_out=None):
        super().__init__(cfg, d_in, metadata, d_out)
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    def reset_parameters(self, first_feature: int = 0) -> None:
        super().reset_parameters(first_feature)
        with torch.no_grad():
            self.b_enc.fill_(self.cfg.b_gate_init)

    def default_lr(self) -> float:
        # was 1e-3: ~10x too slow (benchmarks/quality_ablations.py gated)
        return width_scaled_lr(2.5e-3, self.d_sae_total)

    def weights(self) -> dict[str, Tensor]:
        w = super().weights()
        return {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "r_mag": self.r_mag, "b_mag": self.b_mag,
                "W_dec": w["W_dec"], "b_dec": w["b_dec"], **({"W_skip": w["W_skip"]} if "W_skip" in w else {})}

    def _fold_centre_extra(self, centre: Tensor) -> None:
        self.b_mag.sub_(centre @ (self.W_enc * torch.exp(self.r_mag)))

    def _resample_extra(self, ids: Tensor) -> None:
        self.b_enc[ids] = self.cfg.b_gate_init
        self.r_mag[ids] = 0.0
        self.b_mag[ids] = 0.0

    def _paths(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag) for normalised input xs."""
        xc = xs - self.b_pre
        gate = xc @ self.W_enc + self.b_enc
        mag = xc @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag
        return gate, mag

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError("a gated dictionary needs both paths; use encode()")

    def encode(self, x: Tensor) -> Tensor:
        gate, mag = self._paths(self.scale_input(x))
        kill = self.kill_mask
        if kill is not None and self.kill_mode == "before":
            gate = gate.masked_fill(kill, -torch.inf)
        f = (gate > 0).to(mag.dtype) * torch.relu(mag)
        if kill is not None:
            f = f.masked_fill(kill, 0.0)
        return f

    # ---- training: dense or sparse step (sae.dictionaries.elementwise), the same loss ----------
    # Both paths are computed from one projection s = (x - b_dec) W_enc (no b_enc):
    # π_gate = s + b_enc and π_mag = s ⊙ exp(r_mag) + b_mag (the column scaling moved past the matmul).
    def training_pre_acts(self, xs: Tensor) -> Tensor:
        return torch.addmm(-(self.b_pre @ self.W_enc), xs, self.W_enc)

    def touched(self, pre: Tensor) -> Tensor:
        # every term (f, the L1 on ReLU(π_gate), the auxiliary loss) vanishes, with its gradients,
        # unless π_gate = s + b_enc > 0, which implies s > -b_enc (NaN counts too: it must reach the loss)
        return (pre <= -self.b_enc.to(pre.dtype)).logical_not_()

    def dense_loss(self, xs: Tensor, ys: Tensor, pre: Tensor, progress: float, shards: BatchShards) -> TrainStep:
        gate, mag = pre + self.b_enc, pre * torch.exp(self.r_mag) + self.b_mag
        f = (gate > 0).to(mag.dtype) * torch.relu(mag)
        gate_act = torch.relu(gate)
        offset = self.decoder_offset(xs)
        x_hat = self.decode_dense(f, self.W_dec, offset, shards)
        x_hat_gate = self.decode_dense(gate_act, self.W_dec.detach(), offset.detach(), shards)
        return self._loss(x_hat, x_hat_gate, ys, at_least_float32(gate_act).sum(dim=0), progress, shards, f=f)

    def sparse_loss(self, xs: Tensor, ys: Tensor, pre: Tensor, pairs: Pairs, progress: float,
                    shards: BatchShards) -> TrainStep:
        s = self.selected(xs, pre, pairs, b_enc=self.b_enc.detach())  # b_enc enters through gate
        cols = pairs.cols
        gate, mag = s + self.b_enc[cols], s * torch.exp(self.r_mag)[cols] + self.b_mag[cols]
        vals = (gate > 0).to(mag.dtype) * torch.relu(mag)
        gate_act = torch.relu(gate)
        offset = self.decoder_offset(xs)
        x_hat = self.decode_pairs(vals, pairs, self.W_dec, offset, shards)
        x_hat_gate = self.decode_pairs(gate_act, pairs, self.W_dec.detach(), offset.detach(), shards)
        gate_sum = self.per_feature_sum(at_least_float32(gate_act), pairs)
        return self._loss(x_hat, x_hat_gate, ys, gate_sum, progress, shards,
                          counts=pair_counts(vals, cols, self.d_sae))

    def _loss(self, x_hat: Tensor, x_hat_gate: Tensor, xs: Tensor, gate_sum: Tensor, progress: float,
              shards: BatchShards, f: Tensor | None = None, counts: Tensor | None = None) -> TrainStep:
        """‖x - x̂‖² + λ·L1 + aux per token; gate_sum [d_sae] = Σ over tokens of ReLU(π_gate)."""
        sse = sse_per_token(x_hat, xs)
        if not self.unit_norm_decoder:
            gate_sum = gate_sum * self.W_dec.norm(dim=1)
        l1 = shards.feature_sum(gate_sum.sum()) / xs.shape[0]
        aux = sse_per_token(x_hat_gate, xs)
        lam = self.cfg.l1_coefficient * penalty_warmup(progress, self.cfg.sparsity_warmup_fraction)
        return TrainStep(loss=sse + lam * l1 + aux, x_hat=x_hat, f=f, feature_counts=counts,
                         metrics={"sse": sse.detach(), "l1_penalty": l1.detach(), "aux_loss": aux.detach()})
