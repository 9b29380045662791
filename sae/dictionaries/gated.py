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
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from sae.dictionaries.base import (WHOLE_BATCH, BatchShards, DictionaryConfig, SparseDictionary, TrainStep,
                                   penalty_warmup, width_scaled_lr)
from sae.dictionaries.registry import register


class GatedConfig(DictionaryConfig):
    architecture: Literal["gated"] = "gated"
    l1_coefficient: float = Field(1.0, ge=0)
    sparsity_warmup_fraction: float = Field(0.05, ge=0, le=1)
    normalize_decoder: bool = True


@register
class GatedDictionary(SparseDictionary):
    architecture = "gated"
    Config = GatedConfig
    cfg: GatedConfig
    feature_dims = {**SparseDictionary.feature_dims, "r_mag": 0, "b_mag": 0}

    def __init__(self, cfg, d_in, metadata=None):
        super().__init__(cfg, d_in, metadata)
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    def default_lr(self) -> float:
        # was 1e-3: ~10x too slow (benchmarks/quality_ablations.py gated)
        return width_scaled_lr(2.5e-3, self.d_sae)

    def weights(self) -> dict[str, Tensor]:
        w = super().weights()
        return {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "r_mag": self.r_mag, "b_mag": self.b_mag,
                "W_dec": w["W_dec"], "b_dec": w["b_dec"]}

    def _resample_extra(self, ids: Tensor) -> None:
        self.r_mag[ids] = 0.0
        self.b_mag[ids] = 0.0

    def _paths(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag) for normalised input xs."""
        xc = xs - self.b_dec
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

    def training_loss(self, x: Tensor, progress: float, dead_mask: Tensor | None,
                      shards: BatchShards = WHOLE_BATCH) -> TrainStep:
        xs = self.scale_input(x)
        gate, mag = self._paths(xs)
        f = (gate > 0).to(mag.dtype) * torch.relu(mag)
        x_hat = f @ self.W_dec + self.b_dec
        sse = (x_hat.float() - xs.float()).pow(2).sum(dim=-1).mean()
        gate_act = torch.relu(gate)
        if self.unit_norm_decoder:
            l1 = gate_act.float().sum(dim=-1).mean()
        else:
            l1 = (gate_act.float() * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        x_hat_gate = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x_hat_gate.float() - xs.float()).pow(2).sum(dim=-1).mean()
        lam = self.cfg.l1_coefficient * penalty_warmup(progress, self.cfg.sparsity_warmup_fraction)
        return TrainStep(loss=sse + lam * l1 + aux, x_hat=x_hat, f=f,
                         metrics={"sse": sse.detach(), "l1_penalty": l1.detach(), "aux_loss": aux.detach()})
