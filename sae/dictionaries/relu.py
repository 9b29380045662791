"""`relu`: the standard sparse autoencoder, f = ReLU((x - b_dec) W_enc + b_enc), with an L1 penalty.

Two recipes (`recipe:` key):

* `classic` (Towards Monosemanticity, dictionary_learning's standard trainer): loss
  ‖x - x̂‖² + λ Σ_i f_i; decoder rows kept at unit norm by projection (the gradient component
  parallel to each row is removed before the step, rows renormalised after it); optional
  dead-feature resampling every `resample_every_tokens` (see `SparseDictionary.resample`).
* `april2024` (Anthropic, "Circuits Updates, April 2024"): loss ‖x - x̂‖² + λ Σ_i f_i ‖W_dec,i‖,
  no norm constraint, decoder rows initialised at norm 0.1, λ warmed up over the first
  `sparsity_warmup_fraction` of training (default 5%), no resampling.

‖x - x̂‖² is summed over dimensions and averaged over tokens, in normalised units
(E‖x‖² = d_in when `normalize_activations` is on), so λ means the same at every d_in.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from sae.dictionaries.base import DictionaryConfig, SparseDictionary, TrainStep, width_scaled_lr
from sae.dictionaries.registry import register


class ReLUConfig(DictionaryConfig):
    architecture: Literal["relu"] = "relu"
    recipe: Literal["classic", "april2024"] = "classic"
    l1_coefficient: float | None = Field(None, ge=0)  # None: 1.0 (classic) or 5.0 (april2024)
    sparsity_warmup_fraction: float | None = Field(None, ge=0, le=1)  # None: 0 (classic) or 0.05 (april2024)
    normalize_decoder: bool | None = None  # None: True for classic, False for april2024
    encoder_init_norm: float | None = Field(None, gt=0)  # None: the decoder's init norm (1 classic, 0.1 april2024)
    # Dead-feature resampling (classic recipe); None = off. A feature is resampled when it has
    # not fired for `resample_dead_tokens` (None: half the resampling period), or, with
    # `resample_min_frequency`, when it fired on fewer than that fraction of the tokens since the
    # last resampling: the dual of pruning high-frequency features (`prune.max_frequency`).
    resample_every_tokens: int | None = Field(None, gt=0)
    resample_dead_tokens: int | None = Field(None, ge=1)
    resample_min_frequency: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _check_recipe(self) -> "ReLUConfig":
        if self.recipe == "april2024" and self.resample_every_tokens is not None:
            raise ValueError("the april2024 recipe does not resample; remove resample_every_tokens")
        if self.resample_min_frequency is not None and self.resample_every_tokens is None:
            raise ValueError("resample_min_frequency needs resample_every_tokens (how often to resample)")
        return self


def penalty_warmup(progress: float, fraction: float) -> float:
    """Linear 0 -> 1 over the first `fraction` of training (1 throughout when fraction = 0)."""
    return 1.0 if fraction <= 0 else min(1.0, progress / fraction)


@register
class ReLUDictionary(SparseDictionary):
    architecture = "relu"
    Config = ReLUConfig
    cfg: ReLUConfig

    @property
    def april(self) -> bool:
        return self.cfg.recipe == "april2024"

    @property
    def l1_coefficient(self) -> float:
        if self.cfg.l1_coefficient is not None:
            return self.cfg.l1_coefficient
        return 5.0 if self.april else 1.0

    @property
    def warmup_fraction(self) -> float:
        if self.cfg.sparsity_warmup_fraction is not None:
            return self.cfg.sparsity_warmup_fraction
        return 0.05 if self.april else 0.0

    @property
    def unit_norm_decoder(self) -> bool:
        return (not self.april) if self.cfg.normalize_decoder is None else self.cfg.normalize_decoder

    def init_decoder_norm(self) -> float:
        return 0.1 if self.cfg.recipe == "april2024" else 1.0

    def init_encoder_norm(self) -> float:
        if self.cfg.encoder_init_norm is not None:
            return self.cfg.encoder_init_norm
        return self.init_decoder_norm()

    def default_lr(self) -> float:
        # both recipes: 1.25e-3 / √(d_sae / 16384); the old 1e-3 (classic) and 5e-5 (april2024)
        # trained far too slowly (benchmarks/quality_ablations.py relu); twice this loses feature
        # recovery in long runs (tests/test_trainer.py); `lr:` sets any value
        return width_scaled_lr(1.25e-3, self.d_sae)

    def resample_every_tokens(self) -> int | None:
        return self.cfg.resample_every_tokens

    def resample_min_frequency(self) -> float | None:
        return self.cfg.resample_min_frequency

    def resample_dead_tokens(self) -> int | None:
        if self.cfg.resample_every_tokens is None:
            return None
        return self.cfg.resample_dead_tokens or self.cfg.resample_every_tokens // 2

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, x: Tensor, progress: float, dead_mask: Tensor | None) -> TrainStep:
        xs = self.scale_input(x)
        f = self.activation(torch.addmm(self.b_enc - self.b_dec @ self.W_enc, xs, self.W_enc))
        x_hat = f @ self.W_dec + self.b_dec
        sse = (x_hat.float() - xs.float()).pow(2).sum(dim=-1).mean()
        if self.april:
            l1 = (f.float() * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        else:
            l1 = f.float().sum(dim=-1).mean()  # f >= 0
        lam = self.l1_coefficient * penalty_warmup(progress, self.warmup_fraction)
        loss = sse + lam * l1
        return TrainStep(loss=loss, x_hat=x_hat, f=f, metrics={"sse": sse.detach(), "l1_penalty": l1.detach()})
