"""Sparse kernels for training dictionaries whose activations are sparse, in pure PyTorch (CPU and GPU).

A TopK dictionary keeps k of d_sae latents per token, and a trained ReLU, JumpReLU or Gated one
fires on a few dozen (sae/dictionaries/elementwise.py), so most of a dense training step is
wasted work: the decoder multiplies mostly zeros, and the encoder's weight gradient
`xᵀ · ∂L/∂pre` is a [d_in, batch] × [batch, d_sae] product of an almost empty matrix. Here the
selected (or active) latents are kept as coordinate lists (`rows`, `cols`, `vals`: token,
feature, activation), and

* `sparse_decode` computes `x̂[r] = Σ vals · W_dec[cols]` as an `embedding_bag` (no dense
  [batch, d_sae] tensor), whose backward touches only the selected decoder rows;
* `selected_pre_acts` gives the selected pre-activations (computed without autograd by the
  dense encoder matmul) a gradient path whose backward touches only the selected encoder
  columns.

The encoder backward groups the coordinates by feature (a stable sort) and sums with
`embedding_bag`, so the work is O(n_selected · d_in) instead of O(batch · d_sae · d_in), with no
[n_selected, d_in] intermediate. Gradients equal the dense path's up to summation order
(tests/test_architectures.py and tests/test_sparse_training.py check this against autograd on
the dense formulations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

def _offsets(sorted_groups: Tensor, n_groups: int) -> Tensor:
    """Start offset of each group in a sorted group-id vector (empty groups allowed)."""
    counts = torch.bincount(sorted_groups, minlength=n_groups)
    return torch.cumsum(counts, 0) - counts


def grouped_sum(src: Tensor, src_idx: Tensor, group: Tensor, weights: Tensor, n_groups: int) -> Tensor:
    """out[g] = Σ_{m : group[m] = g} weights[m] · src[src_idx[m]]  ->  [n_groups, d]."""
    order = torch.argsort(group, stable=True)
    g_sorted = group[order]
    return F.embedding_bag(src_idx[order], src, _offsets(g_sorted, n_groups), mode="sum",
                           per_sample_weights=weights[order].to(src.dtype))


def sparse_decode(vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """x̂[r] = Σ_{m : rows[m] = r} vals[m] · W_dec[cols[m]]  ->  [n_rows, d_in] (no bias).

    `rows` must be sorted ascending (as a row-major selection gives). Differentiable in `vals`
    and `W_dec`; PyTorch's own `embedding_bag` backward already touches only the selected rows
    (and computes the `vals` gradient as fused row dot products).
    """
    return F.embedding_bag(cols, W_dec, _offsets(rows, n_rows), mode="sum",
                           per_sample_weights=vals.to(W_dec.dtype))


class _SelectedPreActs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        ctx.dtypes = (x.dtype, W_enc.dtype, b_enc.dtype, b_dec.dtype)
        return values.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        x_dt, W_dt, be_dt, bd_dt = ctx.dtypes
        g = g.to(W_enc.dtype)
        d_sae = W_enc.shape[1]
        g_x = g_W = g_be = g_bd = None
        per_feature = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[2]:
            x_c = (x.to(W_enc.dtype) - b_dec.to(W_enc.dtype)).contiguous()
            g_W = grouped_sum(x_c, rows, cols, g, d_sae).T.to(W_dt)
        if ctx.needs_input_grad[3]:
            g_be = per_feature.to(be_dt)
        if ctx.needs_input_grad[4]:
            g_bd = -(W_enc @ per_feature).to(bd_dt)
        if ctx.needs_input_grad[1]:
            g_x = grouped_sum(W_enc.T.contiguous(), cols, rows, g, x.shape[0]).to(x_dt)
        return None, g_x, g_W, g_be, g_bd, None, None


def selected_pre_acts(values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                      rows: Tensor, cols: Tensor) -> Tensor:
    """The pre-activations `((x - b_dec) @ W_enc + b_enc)[rows, cols]`, given their `values`
    (computed without autograd), with gradients to `W_enc`, `b_enc`, `b_dec` (and `x`) that
    touch only the selected encoder columns."""
    return _SelectedPreActs.apply(values, x, W_enc, b_enc, b_dec, rows, cols)


def dense_pre_acts_no_grad(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """(x - b_dec) @ W_enc + b_enc without autograd (one matmul; b_dec folded into the bias)."""
    with torch.no_grad():
        return torch.addmm(b_enc - b_dec @ W_enc, x, W_enc)
