"""`relu`: the standard sparse autoencoder, f = ReLU((x - b_dec) W_enc + b_enc), with an L1 penalty.

Two recipes (`recipe:` key), each a row of `RECIPES`:

* `classic` (Towards Monosemanticity, dictionary_learning's standard trainer): loss
  ‖x - x̂‖² + λ Σ_i f_i; decoder rows kept at unit norm by projection; optional dead-feature
  resampling every `resample_every_tokens` (see `SparseDictionary.resample`).
* `april2024` (Anthropic, "Circuits Updates, April 2024"): loss ‖x - x̂‖² + λ Σ_i f_i ‖W_dec,i‖,
  no norm constraint, decoder rows initialised at norm 0.1, λ warmed up over the first 5% of
  training, no resampling.

‖x - x̂‖² is summed over dimensions and averaged over tokens, in normalised units
(E‖x‖² = d_in when `normalize_activations` is on), so λ means the same at every d_in.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor

from sae.dictionaries.base import BatchShards, TrainStep, penalty_warmup, width_scaled_lr
from sae.dictionaries.elementwise import (ElementwiseConfig, ElementwiseDictionary, Pairs, at_least_float32,
                                          pair_counts, sse_per_token)
from sae.dictionaries.registry import register


class Recipe(NamedTuple):
    l1_coefficient: float  # default λ
    sparsity_warmup_fraction: float  # default λ warm-up
    normalize_decoder: bool  # default: decoder rows kept at unit norm
    decoder_init_norm: float  # norm of the decoder rows at initialisation (encoder = decoder transpose)
    lr_at_16k: float  # default learning rate at 16,384 features (falls as 1/√d_sae)
    l1_times_decoder_norm: bool  # penalty Σ f_i ‖W_dec,i‖ instead of Σ f_i


RECIPES = {
    "classic": Recipe(l1_coefficient=1.0, sparsity_warmup_fraction=0.0, normalize_decoder=True,
                      decoder_init_norm=1.0, lr_at_16k=1.25e-3, l1_times_decoder_norm=False),
    "april2024": Recipe(l1_coefficient=5.0, sparsity_warmup_fraction=0.05, normalize_decoder=False,
                        decoder_init_norm=0.1, lr_at_16k=1.25e-3, l1_times_decoder_norm=True),
}
# The config fields a recipe gives a default to (left out or null: the recipe's value).
RECIPE_FIELDS = ("l1_coefficient", "sparsity_warmup_fraction", "normalize_decoder")


class ReLUConfig(ElementwiseConfig):
    architecture: Literal["relu"] = "relu"
    recipe: Literal["classic", "april2024"] = "classic"
    l1_coefficient: float | None = Field(None, ge=0)  # None: the recipe's (classic 1.0, april2024 5.0)
    sparsity_warmup_fraction: float | None = Field(None, ge=0, le=1)  # None: the recipe's (0, 0.05)
    normalize_decoder: bool | None = None  # None: the recipe's (classic True, april2024 False)
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

    @model_validator(mode="after")
    def _resolve_recipe_defaults(self) -> "ReLUConfig":
        # Re-resolved at every validation (assignments included), so a field its author left out
        # follows a later change of recipe. Written into __dict__ (setattr would validate again),
        # and a field given as null counts as left out (see `as_written`).
        recipe = RECIPES[self.recipe]
        for key in RECIPE_FIELDS:
            if key not in self.model_fields_set or getattr(self, key) is None:
                self.__dict__[key] = getattr(recipe, key)
                self.model_fields_set.discard(key)
        return self


@register
class ReLUDictionary(ElementwiseDictionary):
    architecture = "relu"
    Config = ReLUConfig
    cfg: ReLUConfig

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.cfg.recipe]

    def init_decoder_norm(self) -> float:
        return self.recipe.decoder_init_norm

    def init_encoder_norm(self) -> float:
        if self.cfg.encoder_init_norm is not None:
            return self.cfg.encoder_init_norm
        return self.init_decoder_norm()

    def default_lr(self) -> float:
        # both recipes: 1.25e-3 / √(d_sae / 16384) (the old 1e-3 classic, 5e-5 april2024 trained far
        # too slowly: benchmarks/quality_ablations.py relu); `lr:` sets any value
        return width_scaled_lr(self.recipe.lr_at_16k, self.d_sae_total)

    @classmethod
    def default_b_enc_lr_scale(cls, cfg: ReLUConfig, d_in: int) -> float:
        # With E‖x‖² = d_in a feature's pre-activation, and so the threshold -b_enc must learn, is
        # O(√(d_in / L0)), while a weight entry is O(1/√d_in): at one lr b_enc crawled, and L0 fell
        # late and slowly. √d_in gives both the same relative step (benchmarks/quality_ablations.py
        # relu: FVU 8-43 % lower at equal L0, medium ground truth, at the default lr and at 1e-3).
        # Raw activations have no known scale: 1 there.
        return math.sqrt(d_in) if cfg.normalize_activations else 1.0

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

    # ---- training: dense or sparse step (sae.dictionaries.elementwise), the same loss ----------
    def touched(self, pre: Tensor) -> Tensor:
        # the ReLU's output and gradient vanish elsewhere (NaN counts too: it must reach the loss)
        return (pre <= 0).logical_not_()


    def dense_loss(self, xs: Tensor, ys: Tensor, pre: Tensor, progress: float, shards: BatchShards) -> TrainStep:
        f = self.activation(pre)
        x_hat = self.decode_dense(f, self.W_dec, self.decoder_offset(xs), shards)
        return self._loss(x_hat, ys, at_least_float32(f).sum(dim=0), progress, shards, f=f)  # f >= 0

    def sparse_loss(self, xs: Tensor, ys: Tensor, pre: Tensor, pairs: Pairs, progress: float,
                    shards: BatchShards) -> TrainStep:
        vals = self.activation(self.selected(xs, pre, pairs))
        x_hat = self.decode_pairs(vals, pairs, self.W_dec, self.decoder_offset(xs), shards)
        return self._loss(x_hat, ys, self.per_feature_sum(at_least_float32(vals), pairs), progress, shards,
                          counts=pair_counts(vals, pairs.cols, self.d_sae))

    def _loss(self, x_hat: Tensor, xs: Tensor, f_sum: Tensor, progress: float, shards: BatchShards,
              f: Tensor | None = None, counts: Tensor | None = None) -> TrainStep:
        """‖x - x̂‖² + λ·L1 per token, from x̂ and f_sum [d_sae] = Σ over the batch's tokens of f."""
        sse = sse_per_token(x_hat, xs)
        if self.recipe.l1_times_decoder_norm:
            f_sum = f_sum * self.W_dec.norm(dim=1)
        l1 = shards.feature_sum(f_sum.sum()) / xs.shape[0]
        lam = self.cfg.l1_coefficient * penalty_warmup(progress, self.cfg.sparsity_warmup_fraction)
        return TrainStep(loss=sse + lam * l1, x_hat=x_hat, f=f, feature_counts=counts,
                         metrics={"sse": sse.detach(), "l1_penalty": l1.detach()})
