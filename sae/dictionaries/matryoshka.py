"""`matryoshka_batchtopk`: Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders"): the features are split into consecutive groups
(`group_sizes`), and the loss scores the reconstruction of every nested prefix of groups (the first
group alone, the first two, ..., the whole dictionary), so that each prefix is a dictionary of its
own: the first groups learn general features, the later ones refine them instead of absorbing
them.

* Loss: the mean over the prefixes of each prefix's batch FVU, ‖x - x̂_prefix‖² / Σ‖x - x̄‖², every
  prefix weighted the same (the paper's and dictionary_learning's equal weights; the mean rather
  than the sum keeps the loss at BatchTopK's scale, so `aux_coefficient`, `grad_clip` and `lr`
  mean what they mean there: one group is exactly BatchTopK), plus BatchTopK's AuxK on the
  residual of the whole dictionary.
* Everything else is BatchTopK's (`BatchTopKDictionary`): the top k·batch selection of the whole
  batch in training (so all prefixes decode the same selected latents, as in both peers), the
  learned threshold at inference, sparse kernels (one `embedding_bag` decodes every group of
  every token), unit-norm decoder, data-parallel shards.
* `group_sizes`: whole numbers summing to d_sae, or fractions of d_sae summing to 1 (group
  boundaries at round(cumulative fraction · d_sae)).

Pruning keeps the group boundaries consistent: each group shrinks by its killed features (a group
whose every feature is killed disappears), and the kept features must stay in group order.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from sae.dictionaries.base import DictionaryConfig, width_scaled_lr
from sae.dictionaries.batchtopk import BatchTopKConfig, BatchTopKDictionary
from sae.dictionaries.registry import register


class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    architecture: Literal["matryoshka_batchtopk"] = "matryoshka_batchtopk"  # type: ignore[assignment]
    # whole numbers summing to d_sae, or fractions of d_sae summing to 1; groups in prefix order
    group_sizes: list[int | float] = Field(min_length=1)
    # Adam with momentum, as before TopK and BatchTopK dropped it: not measured on nested groups
    adam_betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("group_sizes")
    @classmethod
    def _sizes_or_fractions(cls, sizes: list[int | float]) -> list[int | float]:
        if all(isinstance(s, int) for s in sizes):
            if min(sizes) < 1:
                raise ValueError(f"group_sizes {sizes}: every group needs at least 1 feature")
        elif all(isinstance(s, float) for s in sizes):
            if min(sizes) <= 0 or not math.isclose(sum(sizes), 1.0, abs_tol=1e-6):
                raise ValueError(f"group_sizes {sizes} as fractions of d_sae must be positive and sum to 1 "
                                 f"(they sum to {sum(sizes):g})")
        else:
            raise ValueError(f"group_sizes {sizes}: give whole numbers summing to d_sae or fractions summing "
                             f"to 1, not a mix")
        return sizes

    def check_for_width(self, d_in: int) -> None:
        super().check_for_width(d_in)
        self.resolve_group_sizes(self.resolve_d_sae(d_in))

    def resolve_group_sizes(self, d_sae: int) -> list[int]:
        """The number of features in each group at width d_sae; ValueError when they do not fit."""
        if all(isinstance(s, int) for s in self.group_sizes):
            if sum(self.group_sizes) != d_sae:
                raise ValueError(f"group_sizes {self.group_sizes} sum to {sum(self.group_sizes)}, not d_sae={d_sae}; "
                                 f"make them sum to d_sae, or give fractions of it that sum to 1")
            return list(self.group_sizes)
        ends = [round(c * d_sae) for c in itertools.accumulate(self.group_sizes[:-1])] + [d_sae]
        sizes = [b - a for a, b in zip([0, *ends[:-1]], ends)]
        if min(sizes) < 1:
            raise ValueError(f"group_sizes {self.group_sizes} leave a group empty at d_sae={d_sae} ({sizes})")
        return sizes


@register
class MatryoshkaBatchTopKDictionary(BatchTopKDictionary):
    architecture = "matryoshka_batchtopk"
    Config = MatryoshkaBatchTopKConfig
    cfg: MatryoshkaBatchTopKConfig

    @property
    def group_sizes(self) -> list[int]:
        """Features in each group, in prefix order (they sum to d_sae; a feature shard's, to the whole
        dictionary's)."""
        return self.cfg.hyperparameters.resolve_group_sizes(self.d_sae_total)

    def prefix_ends(self) -> list[int]:
        return list(itertools.accumulate(self.group_sizes))

    def default_lr(self) -> float:
        # Gao et al.'s 2e-4 law, not BatchTopK's ten times more: at that lr the nested groups
        # recover the ground truth of tests/test_trainer.py less well (mean max cosine 0.939 < 0.95)
        return width_scaled_lr(2e-4, self.d_sae_total)

    def group_of(self, feature_ids: Tensor) -> Tensor:
        """The group index of each feature id (same shape)."""
        ends = torch.tensor(self.prefix_ends()[:-1], dtype=torch.long, device=feature_ids.device)
        return torch.bucketize(feature_ids, ends, right=True)

    def _pruned_config(self, keep_ids: Tensor) -> DictionaryConfig:
        """Each group shrunk to its kept features (empty groups dropped); the kept features must
        not go back to an earlier group, or the prefixes would no longer be prefixes."""
        groups = self.group_of(keep_ids.cpu())
        if bool((groups.diff() < 0).any()):
            raise ValueError("a Matryoshka dictionary's kept features must stay in group order "
                             "(keep_ids must not go back to an earlier group; sort them)")
        sizes = torch.bincount(groups, minlength=len(self.group_sizes))
        return super()._pruned_config(keep_ids).model_copy(update={"group_sizes": [int(s) for s in sizes if s > 0]})
