"""What the element-wise architectures (ReLU, JumpReLU, Gated) share: a training step that is
dense or sparse, chosen per batch, with the same maths either way.

Their activations are sparse like TopK's: a trained dictionary fires L0 of d_sae features per
token. The encoder forward stays dense (every feature's pre-activation is needed to know which
fire); each architecture then names its *touched* (token, feature) pairs, those whose output or
gradient can be non-zero (ReLU: pre > 0; JumpReLU: pre above θ or inside its pseudo-derivative's
band; Gated: gate > 0), and the sparse step decodes, and back-propagates into the encoder and
decoder through, only those pairs (the kernels of `sae.sparse_ops`), so its cost beyond the encoder
forward is O(pairs · d_in) instead of four more O(batch · d_sae · d_in) matmuls.

Config (`ElementwiseConfig`):

* `sparse: auto` (default) takes the sparse step when the touched pairs are at most
  `sparse_max_density` of the batch's batch·d_sae entries, else the dense one; `true` always
  sparse, `false` always dense (the plain formulation; the tests compare the two).
* `sparse_max_density` (default 0.05): below the density at which the sparse step stops paying,
  which on CPU falls with the width (about 0.2 at 4× d_in, 0.14 at 16×, 0.08 at 64×:
  `python benchmarks/train_speed.py --crossover`, README, training speed); a GPU's differs:
  measure it there with the same command. Trained dictionaries sit far below (L0 / d_sae), so
  it mostly decides the first steps, when half the features fire.

Each data-parallel rank chooses for its own shard (the maths is the same either way). Host syncs:
`auto` and `true` read one number per step (the count of touched pairs: a sparse step's shapes
depend on it); `false` reads nothing.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from sae import sparse_ops
from sae.dictionaries.base import WHOLE_BATCH, BatchShards, DictionaryConfig, SparseDictionary, TrainStep


class ElementwiseConfig(DictionaryConfig):
    sparse: Literal["auto"] | bool = "auto"  # sparse training step: auto (by density), true, false
    sparse_max_density: float = Field(0.05, gt=0, le=1)  # auto: sparse when touched pairs <= this fraction


class Pairs(NamedTuple):
    """The touched (token, feature) pairs of a batch, row-major."""
    rows: Tensor  # [n] token of each pair, ascending
    cols: Tensor  # [n] feature of each pair
    n_rows: int  # tokens in the batch


def touched_pairs(touched: Tensor, sparse: Literal["auto"] | bool, max_density: float) -> Pairs | None:
    """The pairs of the mask touched [B, d_sae], or None when the step should be dense."""
    if sparse is False:
        return None
    n = int(touched.count_nonzero())  # one host read; nonzero needs the count anyway
    if sparse == "auto" and n > max_density * touched.numel():
        return None
    # on a GPU, nonzero_static with the known count does not wait for the device a second time
    idx = touched.nonzero() if touched.device.type == "cpu" else torch.nonzero_static(touched, size=n)
    rows, cols = idx.unbind(1)
    return Pairs(rows, cols, touched.shape[0])


def pair_counts(vals: Tensor, cols: Tensor, d_sae: int) -> Tensor:
    """[d_sae] tokens on which each feature fired, from the values vals [n] of the pairs."""
    fired = (vals.detach() != 0).to(torch.long)
    return torch.zeros(d_sae, dtype=torch.long, device=vals.device).index_add_(0, cols, fired)


class ElementwiseDictionary(SparseDictionary):
    """A dictionary whose activation acts on each pre-activation alone; its `training_loss` runs
    `dense_loss` or `sparse_loss` (see the module docstring)."""

    Config = ElementwiseConfig
    cfg: ElementwiseConfig

    def training_loss(self, x: Tensor, progress: float, dead_mask: Tensor | None,
                      shards: BatchShards = WHOLE_BATCH) -> TrainStep:
        xs = self.scale_input(x)
        pre = self.training_pre_acts(xs)
        pairs = None
        if self.cfg.sparse is not False:
            pairs = touched_pairs(self.touched(pre.detach()), self.cfg.sparse, self.cfg.sparse_max_density)
        if pairs is None:
            return self.dense_loss(xs, pre, progress, shards)
        # the dense pre's graph is dropped: gradients flow through `selected` below
        return self.sparse_loss(xs, pre.detach(), pairs, progress, shards)

    def training_pre_acts(self, xs: Tensor) -> Tensor:
        """[B, d_sae] the encoder's output on normalised xs [B, d_in], with autograd (one matmul)."""
        return torch.addmm(self.b_enc - self.b_dec @ self.W_enc, xs, self.W_enc)

    def touched(self, pre: Tensor) -> Tensor:
        """[B, d_sae] bool: the pairs whose output or gradient can be non-zero (a superset is exact)."""
        raise NotImplementedError

    def dense_loss(self, xs: Tensor, pre: Tensor, progress: float, shards: BatchShards) -> TrainStep:
        """The loss from the dense pre [B, d_sae]; `shards` sums what feature shards hold in part
        (the decode, the penalties: `decode_dense`, `BatchShards.feature_sum`)."""
        raise NotImplementedError

    def sparse_loss(self, xs: Tensor, pre: Tensor, pairs: Pairs, progress: float, shards: BatchShards) -> TrainStep:
        """The dense_loss's value and gradients from the touched pairs alone (pre is detached)."""
        raise NotImplementedError

    # ---- the sparse step's parts ------------------------------------------------------------
    def selected(self, xs: Tensor, pre: Tensor, pairs: Pairs, b_enc: Tensor | None = None) -> Tensor:
        """[n] pre[rows, cols] with gradients to W_enc, b_dec and b_enc (the given b_enc: pass a
        detached one when pre holds no b_enc) touching only the pairs' encoder columns."""
        b_enc = self.b_enc if b_enc is None else b_enc
        return sparse_ops.selected_pre_acts(pre[pairs.rows, pairs.cols], xs, self.W_enc, b_enc, self.b_dec,
                                            pairs.rows, pairs.cols)

    def decode_pairs(self, vals: Tensor, pairs: Pairs, W_dec: Tensor, b_dec: Tensor,
                     shards: BatchShards = WHOLE_BATCH) -> Tensor:
        """[B, d_in] x̂ = f @ W_dec + b_dec for the f whose only non-zeros are vals [n] at the pairs
        (feature shards: the sum of their partial decodes, then b_dec)."""
        partial = sparse_ops.sparse_decode(vals, pairs.rows, pairs.cols, W_dec, pairs.n_rows)
        return shards.feature_sum(partial) + shards.once(b_dec)

    @staticmethod
    def decode_dense(f: Tensor, W_dec: Tensor, b_dec: Tensor, shards: BatchShards = WHOLE_BATCH) -> Tensor:
        """[B, d_in] x̂ = f @ W_dec + b_dec (feature shards: the sum of their partial decodes, then b_dec)."""
        return shards.feature_sum(f @ W_dec) + shards.once(b_dec)

    def per_feature_sum(self, vals: Tensor, pairs: Pairs) -> Tensor:
        """[d_sae] Σ over tokens of f, for f's non-zeros vals [n] at the pairs (differentiable)."""
        return torch.zeros(self.d_sae, dtype=vals.dtype, device=vals.device).index_add(0, pairs.cols, vals)


def at_least_float32(t: Tensor) -> Tensor:
    """t in float32, or in its own dtype when wider (losses of low-precision steps sum in float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sse_per_token(x_hat: Tensor, xs: Tensor) -> Tensor:
    """‖x - x̂‖² summed over dimensions, mean over tokens, in at least float32."""
    return (at_least_float32(x_hat) - at_least_float32(xs)).pow(2).sum(dim=-1).mean()
