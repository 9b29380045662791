"""`topk`: f = TopK_k(pre-activations), then ReLU (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"), with the AuxK loss on dead latents; and `TopKStyleDictionary`, what TopK
and BatchTopK share:

* Loss: ‖x - x̂‖² / Σ‖x - x̄‖² over the batch (the batch FVU), plus `aux_coefficient` (1/32) ×
  the AuxK loss: the residual e = x - x̂ is reconstructed from the top `aux_k` (default d_in/2)
  pre-activations of the dead latents (silent for `dead_after_tokens`), scaled by
  min(n_dead / aux_k, 1), normalised by the same variance. An architecture that scores nested
  prefixes of its features (`prefix_ends`, Matryoshka) takes the mean of each prefix's batch FVU
  instead; TopK and BatchTopK score one prefix, the whole dictionary.
* Decoder rows at unit norm (projection), lr default 2e-3 / √(d_sae / 16384): ten times Gao et
  al.'s 2e-4, which trains far too slowly on the ground truth of benchmarks/quality.py (128
  steps, k=8: FVU 0.508 against 0.202; 1280 steps: 0.137 against 0.122).
* Adam with less momentum: TopK β1 0.5, BatchTopK β1 0 (`adam_betas: [0.9, 0.999]` is the old
  default, which Matryoshka keeps; the ReLU family keeps 0.9; a skip connection's W_skip keeps
  it too, `skip_adam_betas`). On the ground truth of benchmarks/quality.py (medium size,
  k=4/8/16) β1 0 lowers TopK's FVU by 9-14 % at 128 steps and 3-11 % at 1280 (three seeds, MMCS
  +0.02-0.07) and β1 0.5 does within 1-3 % of that; on SmolLM2's residual stream (`make demo`'s
  TopK, two seeds) β1 0.5 gives FVU 0.093 where 0.9 gives 0.095 and 0 gives 0.099-0.100.
* Training decodes only the selected latents with the kernels of `sae.sparse_ops`
  (`sparse: true`, the default); `sparse: false` runs the dense formulation (same maths).

Killing features (`set_killed`), the two meanings of the METRICS page:

* mode "before": killed latents are masked to -inf before the selection, another latent takes
  the slot, L0 stays k;
* mode "after": the top k is chosen among all latents, then killed ones are zeroed (L0 drops).

A pruned dictionary (`pruned(keep_ids, "after")`) keeps the killed latents' encoder columns as a
*shadow encoder* (`W_enc_shadow [d_in, n_killed]`, `b_enc_shadow [n_killed]`, saved in
sae.safetensors): their pre-activations compete for the top-k slots but produce no output, so
the pruned dictionary encodes exactly like the original with the kill mask in mode "after".
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from sae import sparse_ops
from sae.dictionaries.base import (WHOLE_BATCH, BatchShards, DictionaryConfig, KillMode, SparseDictionary,
                                   TrainStep, width_scaled_lr)
from sae.dictionaries.registry import register


class TopKConfig(DictionaryConfig):
    architecture: Literal["topk"] = "topk"
    # less momentum: better at both budgets measured (module docstring), likely because a latent's
    # gradient comes only from the tokens it is selected for, and momentum moves it on stale ones
    adam_betas: tuple[float, float] = (0.5, 0.999)
    k: int = Field(32, ge=1)
    aux_k: int | None = Field(None, ge=1)  # None: d_in // 2
    aux_coefficient: float = Field(1.0 / 32, ge=0)
    normalize_decoder: bool = True
    sparse: bool = True  # sparse decoder / encoder backward in training (same maths as dense)

    @model_validator(mode="after")
    def _k_fits(self) -> "TopKConfig":
        if self.d_sae is not None:  # the width is known without the model
            self.check_for_width(1)
        return self

    def check_for_width(self, d_in: int) -> None:
        super().check_for_width(d_in)
        d_sae = self.resolve_d_sae(d_in)
        for key in ("k", "aux_k"):
            value = getattr(self, key)
            if value is not None and value > d_sae:
                raise ValueError(f"{key}={value} is more than d_sae={d_sae} features")


def _row_major_coords(idx: Tensor) -> tuple[Tensor, Tensor]:
    """[B, k] column indices of a per-row selection -> flat (rows, cols), rows ascending."""
    B, k = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(k)
    return rows, idx.reshape(-1)


def _group_bags(rows: Tensor, cols: Tensor, ends: list[int]) -> Tensor:
    """Each selected pair's bag row·P + g, g the group of features (between two prefix ends) its col
    lies in. `sparse_decode` needs the bags ascending: the pairs in row-major order and, when
    P > 1, cols ascending within a row (BatchTopK's selection is)."""
    if len(ends) == 1:
        return rows
    return rows * len(ends) + torch.bucketize(cols, cols.new_tensor(ends[:-1]), right=True)


def top_per_row(pre: Tensor, k: int, shards: BatchShards) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's top k of the whole dictionary, from this feature shard's pre [B, d] (every
    shard's per-row top k gathered, the top k of those kept): flat (rows, cols, mine), rows
    ascending, mine marking the winners of this shard (cols local; clamped to 0 where not mine)."""
    B, d = pre.shape
    vals, idx = pre.topk(min(k, d), dim=1, sorted=False)
    # one gather: values and whole-dictionary ids as float64 (exact for both)
    local = torch.stack([vals.double(), (idx + shards.feature_lo).double()], dim=-1)[None]
    every = shards.feature_gather(local).permute(1, 0, 2, 3).reshape(B, -1, 2)  # [B, F·k', 2]
    _, pos = every[..., 0].topk(min(k, every.shape[1]), dim=1, sorted=False)
    winners = every[..., 1].gather(1, pos).long() - shards.feature_lo
    rows, cols = _row_major_coords(winners)
    mine = (cols >= 0) & (cols < d)
    return rows, torch.where(mine, cols, 0), mine


def batch_variance(x: Tensor, shards: BatchShards) -> Tensor:
    """Σ over the whole batch of ‖x - x̄‖² (x̄ the whole batch's mean), from this shard's x [rows, d]."""
    if shards.count == 1:
        return (x - x.mean(dim=0)).pow(2).sum()
    with torch.no_grad():  # sums over the shards in float64
        n = shards.sum(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        mean = (shards.sum(x.double().sum(dim=0)) / n).to(x.dtype)
        return shards.sum((x - mean).pow(2).sum().double()).to(x.dtype)


class TopKStyleDictionary(SparseDictionary):
    """A dictionary whose training keeps a selected set of (token, latent) pairs (`_select`) and
    decodes only those; the loss is the batch FVU (of each scored prefix of features, averaged)
    plus AuxK on the dead latents."""

    Config = TopKConfig
    cfg: TopKConfig

    def default_lr(self) -> float:
        return width_scaled_lr(2e-3, self.d_sae_total)

    def prefix_ends(self) -> list[int]:
        """Ascending widths of the nested prefixes of features whose reconstructions the loss
        scores, the last d_sae (in the whole dictionary's feature ids, a feature shard's too): here
        only the whole dictionary."""
        return [self.d_sae_total]

    @property
    def aux_k(self) -> int:
        return self.cfg.aux_k if self.cfg.aux_k is not None else max(1, self.d_in // 2)

    def training_loss(self, x: Tensor, progress: float, dead_mask: Tensor | None,
                      shards: BatchShards = WHOLE_BATCH, target: Tensor | None = None) -> TrainStep:
        xs, ys = self.training_io(x, target)
        with torch.no_grad():
            pre = sparse_ops.dense_pre_acts_no_grad(xs, self.W_enc, self.b_enc, self.b_pre).float()
            rows, cols, valid = self._select(xs, pre, shards, progress)
        x_hats, counts, l0 = self._decode_selected(xs, pre, rows, cols, valid, shards)
        return self._loss(xs, ys, x_hats, pre, counts, l0, dead_mask, shards)

    def _select(self, xs: Tensor, pre: Tensor, shards: BatchShards,
                progress: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """The latents kept for this shard, from its detached pre-activations pre [B, d_sae], at
        `progress` (0 to 1) through training: flat (rows, cols, valid), rows ascending; the kept
        pairs with valid False decode to 0."""
        raise NotImplementedError

    def _decode_selected(self, xs, pre, rows, cols, valid, shards: BatchShards = WHOLE_BATCH):
        """Each scored prefix's x̂ from the selected (rows, cols): returns (x_hats [B, P, d_out],
        feature counts, mean L0); x_hats[:, -1] is the whole dictionary's (every prefix's includes
        b_dec and the skip path; feature shards: the sum of their partial decodes)."""
        B, ends, lo = xs.shape[0], self.prefix_ends(), shards.feature_lo
        if self.cfg.sparse:
            vals = sparse_ops.selected_pre_acts(pre[rows, cols], xs, self.W_enc, self.b_enc, self.b_pre,
                                                rows, cols)
            vals = torch.relu(vals) * valid
            bags = _group_bags(rows, cols + lo, ends)
            parts = sparse_ops.sparse_decode(vals, bags, cols, self.W_dec, B * len(ends)).view(B, len(ends), -1)
        else:
            pre_g = torch.addmm(self.b_enc - self.b_pre @ self.W_enc, xs, self.W_enc)
            vals = torch.relu(pre_g[rows, cols]) * valid
            f = torch.zeros_like(pre_g).index_put_((rows, cols), vals, accumulate=True)
            groups = [(min(max(a - lo, 0), self.d_sae), min(max(b - lo, 0), self.d_sae))
                      for a, b in zip([0, *ends[:-1]], ends)]  # this shard's part of each group
            parts = torch.stack([f[:, a:b] @ self.W_dec[a:b] for a, b in groups], dim=1)
        x_hats = shards.feature_sum(parts).cumsum(dim=1) + shards.once(self.decoder_offset(xs)).unsqueeze(-2)
        fired = (vals.detach() > 0).to(xs.dtype)
        counts = torch.zeros(self.d_sae, dtype=xs.dtype, device=xs.device).index_add_(0, cols, fired)
        return x_hats, counts, shards.feature_sum(fired.sum()) / B

    def _loss(self, xs, ys, x_hats, pre, counts, l0, dead_mask, shards: BatchShards) -> TrainStep:
        """xs [B, d_in] the encoder's input, ys [B, d_out] the target (xs for an autoencoder)."""
        err = ys.float()[:, None] - x_hats.float()  # [B, P, d_out]
        sse = err.pow(2).sum(dim=(0, 2))  # [P]
        variance = batch_variance(ys.float(), shards).clamp_min(1e-12)
        fvu = sse / variance
        loss = fvu.mean()  # every prefix weighs the same
        metrics = {"fvu": fvu[-1].detach(), "sse": (sse[-1] / xs.shape[0]).detach(), "l0": l0}
        if len(fvu) > 1:
            metrics["prefix_fvu"] = loss.detach()
        if dead_mask is not None and self.cfg.aux_coefficient > 0:
            aux = self._aux_loss(xs, err[:, -1].detach(), pre, dead_mask, variance, shards)
            if aux is not None:
                loss = loss + self.cfg.aux_coefficient * aux
                metrics["aux_loss"] = aux.detach()
        # each shard holds its part of the sums, and the gradients are averaged over the shards
        loss = loss * shards.count
        return TrainStep(loss=loss, x_hat=x_hats[:, -1], f=None, metrics=metrics, feature_counts=counts)

    def _aux_loss(self, xs, e, pre, dead_mask, variance, shards: BatchShards = WHOLE_BATCH) -> Tensor | None:
        """AuxK: reconstruct the residual e from the top aux_k dead latents' pre-activations."""
        picked = self._top_dead(pre, dead_mask) if shards.feature_count == 1 else \
            self._top_dead_of_shards(pre, dead_mask, shards)
        if picked is None:
            return None
        rows, cols, scale = picked
        valid = dead_mask[cols]
        vals = sparse_ops.selected_pre_acts(pre[rows, cols].masked_fill(~valid, 0.0), xs, self.W_enc,
                                            self.b_enc, self.b_pre, rows, cols)
        vals = torch.relu(vals) * valid
        e_hat = shards.feature_sum(sparse_ops.sparse_decode(vals, rows, cols, self.W_dec, xs.shape[0]))
        return scale * (e - e_hat.float()).pow(2).sum() / variance

    def _top_dead(self, pre: Tensor, dead_mask: Tensor):
        """Each row's top aux_k dead latents as flat (rows, cols) and the AuxK scale
        min(n_dead / aux_k, 1); None when no latent is dead (known on CPU only). Pairs of rows
        with fewer dead latents than slots have dead_mask[cols] False."""
        if pre.device.type == "cpu":  # host syncs cost nothing on CPU: skip the work when none is dead
            dead_ids = dead_mask.nonzero().flatten()
            n_dead = dead_ids.numel()
            if n_dead == 0:
                return None
            _, sub = pre[:, dead_ids].topk(min(self.aux_k, n_dead), dim=1, sorted=False)
            rows, cols = _row_major_coords(dead_ids[sub])
            return rows, cols, min(n_dead / self.aux_k, 1.0)
        # no host sync: masked selection over all latents
        masked = pre.masked_fill(~dead_mask, -torch.inf)
        _, idx = masked.topk(min(self.aux_k, self.d_sae), dim=1, sorted=False)
        rows, cols = _row_major_coords(idx)
        return rows, cols, (dead_mask.sum() / self.aux_k).clamp(max=1.0)

    def _top_dead_of_shards(self, pre: Tensor, dead_mask: Tensor, shards: BatchShards):
        """`_top_dead` over the whole dictionary from this feature shard's pre and dead_mask: the
        pairs of this shard among each row's top aux_k dead latents (cols of others' clamped to
        0, dead_mask[cols] False there too by masking), None when no latent of any shard is dead."""
        n_dead = int(shards.feature_sum(dead_mask.sum()))  # every shard reads the same count
        if n_dead == 0:
            return None
        rows, cols, mine = top_per_row(pre.masked_fill(~dead_mask, -torch.inf), self.aux_k, shards)
        cols = torch.where(mine & dead_mask[cols], cols, -1)
        keep = cols >= 0  # pairs of this shard only (the dead_mask lookup below must be valid)
        return rows[keep], cols[keep], min(n_dead / self.aux_k, 1.0)


@register
class TopKDictionary(TopKStyleDictionary):
    architecture = "topk"

    def __init__(self, cfg, d_in, metadata=None, d_out=None):
        super().__init__(cfg, d_in, metadata, d_out)
        # Optional shadow encoder of killed latents (pruned in mode "after"); buffers, never trained.
        self.register_buffer("W_enc_shadow", None)
        self.register_buffer("b_enc_shadow", None)

    def max_active(self) -> int:
        return self.cfg.k

    # ---- shadow encoder ---------------------------------------------------------------------
    @property
    def n_shadow(self) -> int:
        return 0 if self.W_enc_shadow is None else self.W_enc_shadow.shape[1]

    def set_shadow(self, W: Tensor | None, b: Tensor | None) -> None:
        """Install (or remove, with None) the shadow encoder."""
        if W is None:
            self.W_enc_shadow = self.b_enc_shadow = None
            return
        if W.shape[0] != self.d_in or b is None or b.shape != (W.shape[1],):
            raise ValueError("shadow encoder must be W [d_in, n], b [n]")
        self.register_buffer("W_enc_shadow", W.detach().to(self.W_enc).clone())
        self.register_buffer("b_enc_shadow", b.detach().to(self.b_enc).clone())

    def shadow_pre_acts(self, xs: Tensor) -> Tensor | None:
        """Pre-activations of the shadow latents for normalised input xs (None without shadow)."""
        if self.W_enc_shadow is None:
            return None
        return (xs - self.b_pre) @ self.W_enc_shadow + self.b_enc_shadow

    def weights(self) -> dict[str, Tensor]:
        w = super().weights()
        if self.W_enc_shadow is not None:
            w["W_enc_shadow"] = self.W_enc_shadow
            w["b_enc_shadow"] = self.b_enc_shadow
        return w

    def prepare_for_weights(self, tensors: dict[str, Tensor]) -> None:
        if "W_enc_shadow" in tensors:
            self.set_shadow(tensors["W_enc_shadow"], tensors["b_enc_shadow"])
        else:
            self.set_shadow(None, None)

    def _fold_extra(self, scale: float) -> None:
        if self.W_enc_shadow is not None:
            self.W_enc_shadow.mul_(scale)

    def _fold_centre_extra(self, centre: Tensor) -> None:
        if self.W_enc_shadow is not None:
            self.b_enc_shadow.sub_(centre @ self.W_enc_shadow)

    @torch.no_grad()
    def pruned(self, keep_ids: Tensor, mode: KillMode = "after") -> SparseDictionary:
        new = super().pruned(keep_ids, mode)
        if mode == "after":
            keep = torch.as_tensor(keep_ids, dtype=torch.long, device=self.W_enc.device).flatten()
            killed = torch.ones(self.d_sae, dtype=torch.bool, device=keep.device)
            killed[keep] = False
            W_sh, b_sh = self.W_enc[:, killed], self.b_enc[killed]
            if self.W_enc_shadow is not None:
                W_sh = torch.cat([self.W_enc_shadow, W_sh], dim=1)
                b_sh = torch.cat([self.b_enc_shadow, b_sh])
            if W_sh.shape[1] > 0:
                new.set_shadow(W_sh, b_sh)
        return new

    # ---- inference ------------------------------------------------------------------------
    def _topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return pre.topk(min(self.cfg.k, pre.shape[-1]), dim=-1, sorted=False)

    def encode(self, x: Tensor) -> Tensor:
        xs = self.scale_input(x)
        pre = (xs - self.b_pre) @ self.W_enc + self.b_enc
        kill = self.kill_mask
        if kill is not None and self.kill_mode == "before":
            pre = pre.masked_fill(kill, -torch.inf)
        shadow = self.shadow_pre_acts(xs)
        full = pre if shadow is None else torch.cat([pre, shadow], dim=-1)
        vals, idx = self._topk(full)
        f = torch.zeros_like(full).scatter_(-1, idx, torch.relu(vals))[..., : self.d_sae]
        if kill is not None:
            f = f.masked_fill(kill, 0.0)
        return f

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = self._topk(pre)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    # ---- training -------------------------------------------------------------------------
    def _select(self, xs: Tensor, pre: Tensor, shards: BatchShards,
                progress: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's top k among its latents and its shadow latents (which are not valid: they
        take a slot and decode to nothing; their cols are clamped to 0)."""
        if shards.feature_count > 1:  # feature shards train without a shadow encoder
            return top_per_row(pre, self.cfg.k, shards)
        shadow = self.shadow_pre_acts(xs)
        full = pre if shadow is None else torch.cat([pre, shadow.float()], dim=-1)
        _, idx = self._topk(full)
        rows, cols = _row_major_coords(idx)
        valid = cols < self.d_sae
        return rows, torch.where(valid, cols, 0), valid
