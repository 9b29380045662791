"""`batchtopk`: BatchTopK (Bussmann et al. 2024): in training the top k·batch pre-activations of
the whole batch are kept (a token may use more or fewer than k latents); at inference
(`module.eval()`) a learned threshold replaces the batch selection:
f_i = pre_i if pre_i > threshold else 0.

The threshold is the mean of the smallest selected positive activation of each training batch
over the last `threshold_window` of training (an exponential moving average, `threshold_beta`,
once the window holds more than 1/(1-beta) batches; before the window, the latest batch's value),
saved as `threshold` [d_sae] (one value repeated, so the file reads like a JumpReLU dictionary's
and slices like one when pruned), in pre-activation units (which folding leaves unchanged).
Averaged over the whole run (`threshold_window: 1`, the old default) it lags a threshold that
falls as training goes: on benchmarks/quality.py's ground truth at k=8 the inference L0 was 6.5
at 128 steps and 6.8 at 1280; over the last fifth, 8.1 and 8.2, and FVU 0.312 against 0.332
(`quality_ablations.py batchtopk`).
Loss, AuxK, unit-norm decoder, sparse kernels and lr are TopK's (`TopKStyleDictionary`); Adam's β1 is 0.

Killing features: at inference the threshold acts on each latent alone, so "before" and "after"
give identical outputs and a pruned dictionary just drops the killed latents (no shadow encoder).
In training mode the batch selection is shared: "before" frees slots for other latents.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from sae.dictionaries.base import BatchShards
from sae.dictionaries.registry import register
from sae.dictionaries.topk import TopKConfig, TopKStyleDictionary


class BatchTopKConfig(TopKConfig):
    architecture: Literal["batchtopk"] = "batchtopk"  # type: ignore[assignment]
    threshold_beta: float = Field(0.999, ge=0, lt=1)
    threshold_window: float = Field(0.2, gt=0, le=1)  # the last fraction of training the threshold averages
    adam_betas: tuple[float, float] = (0.0, 0.999)  # β1 0 measured better than 0.9 here; TopK's 0.5 not measured


def batch_topk_flat(pre: Tensor, n: int) -> Tensor:
    """Flat indices (ascending) of the n largest entries of pre [B, d].

    On CPU a per-row top-m pre-filter (m = 4·n/B) makes this several times faster; it is exact
    (checked: when some row might hold more than m of the winners, the full selection runs).
    """
    B, d = pre.shape
    n = min(n, B * d)
    m = min(d, 4 * max(1, -(-n // B)))
    if pre.device.type == "cpu" and m < d:
        v, i = pre.topk(m, dim=1, sorted=False)
        top, pos = v.flatten().topk(n, sorted=False)
        if not bool((v.min(dim=1).values >= top.min()).any()):
            flat = (torch.arange(B, device=pre.device)[:, None] * d + i).flatten()[pos]
            return flat.sort().values
    return pre.flatten().topk(n, sorted=False).indices.sort().values


def batch_topk_threshold(values: Tensor, n: int, shards: BatchShards) -> Tensor:
    """The n-th largest of the whole batch's values, given this shard's `values` (any shape; the
    candidates of every feature shard and every batch shard)."""
    flat = values.detach().flatten()
    local = flat.topk(min(n, flat.numel()), sorted=False).values
    # every shard sends the same number of candidates (padded with -inf)
    count = int(shards.max(torch.tensor([local.numel()])).item())
    if local.numel() < count:
        local = torch.cat([local, local.new_full((count - local.numel(),), -torch.inf)])
    local = shards.gather(shards.feature_gather(local))
    return local.topk(min(n, local.numel()), sorted=False).values.min()


def whole_batch_top(pre: Tensor, n_per_row: int, shards: BatchShards) -> Tensor:
    """Flat indices (ascending) into this shard's pre [B, d] of its entries among the top
    n_per_row · (rows of every shard) of the whole batch."""
    B = pre.shape[0]
    if shards.count == 1 and shards.feature_count == 1:
        return batch_topk_flat(pre, n_per_row * B)
    cut = batch_topk_threshold(pre, n_per_row * B * shards.count, shards)
    return (pre.flatten() >= cut).nonzero().flatten()


@register
class BatchTopKDictionary(TopKStyleDictionary):
    architecture = "batchtopk"
    Config = BatchTopKConfig
    cfg: BatchTopKConfig
    feature_dims = {**TopKStyleDictionary.feature_dims, "threshold": 0}

    def __init__(self, cfg, d_in, metadata=None, d_out=None):
        super().__init__(cfg, d_in, metadata, d_out)
        # -1: not yet estimated (the first training batch sets it).
        self.register_buffer("threshold", torch.full((self.d_sae,), -1.0))
        # Batches of the window averaged into the threshold so far (checkpointed, not part of the
        # saved weights).
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def weights(self) -> dict[str, Tensor]:
        return {**super().weights(), "threshold": self.threshold}

    def activation(self, pre: Tensor) -> Tensor:
        if not self.training:
            return torch.where((pre > self.threshold) & (pre > 0), pre, torch.zeros_like(pre))
        flat_pre = pre.reshape(-1, pre.shape[-1])
        idx = batch_topk_flat(flat_pre, self.cfg.k * flat_pre.shape[0])
        out = torch.zeros_like(flat_pre).flatten()
        out[idx] = torch.relu(flat_pre.flatten()[idx])
        return out.view_as(pre)

    def _select(self, xs: Tensor, pre: Tensor, shards: BatchShards,
                progress: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """The whole batch's top k·B (valid where positive); also folds the smallest positive
        selected activation of the whole batch into the inference threshold."""
        flat = whole_batch_top(pre, self.cfg.k, shards)
        rows, cols = flat // self.d_sae, flat % self.d_sae
        selected = pre[rows, cols]
        valid = selected > 0
        inf = selected.new_full((1,), torch.inf)  # a feature shard may hold none of the selection
        smallest = torch.cat([torch.where(valid, selected, torch.inf), inf]).min().reshape(1)
        in_window = progress >= 1.0 - self.cfg.threshold_window
        self._update_threshold(shards.min(shards.feature_gather(smallest).min()), in_window)
        return rows, cols, valid

    @torch.no_grad()
    def _update_threshold(self, smallest: Tensor, in_window: bool) -> None:
        """EMA with the warm-up of a running mean, beta_eff = min(beta, n / (n + 1)), n the window's
        batches so far (0 before the window: each batch replaces the threshold)."""
        n = self.threshold_updates.to(torch.float32)
        beta = torch.clamp(n / (n + 1), max=self.cfg.threshold_beta)
        t = self.threshold
        new = beta * t + (1 - beta) * smallest
        ok = torch.isfinite(new)  # a batch with no positive selection leaves it as it was
        t.copy_(torch.where(ok, new, t))
        if in_window:
            self.threshold_updates += ok.all().to(torch.long)
