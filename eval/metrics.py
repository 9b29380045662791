"""Pure-tensor accumulators for every metric of METRICS.md (../shared/METRICS.md, mirrored in the
README), with no model in sight: feed them batches, read the numbers at the end.

Everything is accumulated as float64 *sums over tokens* (or over predicted positions) and
divided once at the end, so how the tokens are cut into batches never changes a number (up to
the float rounding of the model's own batched matmuls).

Conventions shared by every accumulator:
- Reconstruction and feature metrics take only the evaluated (kept) tokens: `x [n, d_in]`,
  `x_hat [n, d_in]`, `f [n, d_sae]`. The caller drops excluded tokens (BOS, padding, ...).
- Downstream metrics take full `[batch, pos]` logits/tokens plus the keep mask and use the
  *predicted positions*: the prediction made at position t of token t+1 counts iff both token
  t and token t+1 are kept (see `prediction_mask`). So a prediction made from BOS (where nothing
  is spliced and every run agrees) is dropped, and so is any prediction of a BOS or padding token.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

# The keys of eval.json that come from METRICS.md, in the order they are written.
RECONSTRUCTION_KEYS = ("l0", "l1", "mse", "sse_per_token", "fvu", "explained_variance", "cossim",
                       "l2_ratio", "relative_reconstruction_bias")
DOWNSTREAM_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "ce_delta", "loss_recovered",
                   "loss_recovered_mean_ablation", "kl_sae", "kl_zero", "kl_recovered")
FEATURE_KEYS = ("dead", "dense_1e-2", "dense_1e-1", "frac_alive")
METRIC_KEYS = RECONSTRUCTION_KEYS + DOWNSTREAM_KEYS + FEATURE_KEYS

_EPS = 1e-30  # only guards 0/0 in per-token ratios of all-zero vectors


def safe_ratio(num: float, den: float) -> float:
    """num/den, NaN when den is 0 (a metric that is undefined, e.g. loss recovered when the
    ablation does not change the loss); written as null in JSON."""
    if den == 0 or not math.isfinite(den) or not math.isfinite(num):
        return float("nan")
    return num / den


class ReconstructionAccumulator:
    """l0, l1, mse, sse_per_token, fvu (centred), explained_variance, cossim, l2_ratio,
    relative_reconstruction_bias, and the per-feature firing counts behind frequency/dead/dense.

    fvu's denominator Σ_t ‖x_t − x̄‖² (x̄ the mean over *all* evaluated tokens) is accumulated in
    one pass as Σ‖x − c‖² − n‖mean(x) − c‖² around a reference point c (the first batch's mean):
    exact algebra, and the shift keeps float64 free of cancellation when ‖x̄‖ ≫ the spread.
    """

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        self.d_in, self.d_sae = d_in, d_sae
        dev = torch.device(device)
        self.n = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.sum_l0 = torch.zeros((), dtype=torch.float64, device=dev)
        self.sum_l1 = torch.zeros((), dtype=torch.float64, device=dev)
        self.sse = torch.zeros((), dtype=torch.float64, device=dev)
        self.sum_cos = torch.zeros((), dtype=torch.float64, device=dev)
        self.sum_l2_ratio = torch.zeros((), dtype=torch.float64, device=dev)
        self.sum_xhat_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.sum_x_dot_xhat = torch.zeros((), dtype=torch.float64, device=dev)
        self.ref: Tensor | None = None  # c, [d_in] float64
        self.sum_xc = torch.zeros(d_in, dtype=torch.float64, device=dev)  # Σ (x − c)
        self.sum_xc_sq = torch.zeros((), dtype=torch.float64, device=dev)  # Σ ‖x − c‖²

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        """x, x_hat [n, d_in]; f [n, d_sae]; kept tokens only."""
        if x.shape[-1] != self.d_in or x_hat.shape != x.shape or f.shape != (x.shape[0], self.d_sae):
            raise ValueError(f"shapes x {list(x.shape)}, x_hat {list(x_hat.shape)}, f {list(f.shape)} "
                             f"do not fit d_in={self.d_in}, d_sae={self.d_sae}")
        n = x.shape[0]
        if n == 0:
            return
        x = x.to(torch.float64)
        x_hat = x_hat.to(torch.float64)
        fired = f != 0
        self.n += n
        self.fire_count += fired.sum(dim=0)
        self.sum_l0 += fired.sum(dtype=torch.float64)
        self.sum_l1 += f.to(torch.float64).abs().sum()
        self.sse += (x - x_hat).pow(2).sum()
        x_norm = x.norm(dim=-1)
        xhat_norm = x_hat.norm(dim=-1)
        dot = (x * x_hat).sum(dim=-1)
        self.sum_cos += (dot / (x_norm * xhat_norm).clamp_min(_EPS)).sum()
        self.sum_l2_ratio += (xhat_norm / x_norm.clamp_min(_EPS)).sum()
        self.sum_xhat_sq += xhat_norm.pow(2).sum()
        self.sum_x_dot_xhat += dot.sum()
        if self.ref is None:
            self.ref = x.mean(dim=0)
        xc = x - self.ref
        self.sum_xc += xc.sum(dim=0)
        self.sum_xc_sq += xc.pow(2).sum()

    def frequency(self) -> Tensor:
        """[d_sae] float32 on the CPU: fraction of evaluated tokens with f_i != 0."""
        if self.n == 0:
            return torch.zeros(self.d_sae)
        return (self.fire_count.double() / self.n).float().cpu()

    def total_variance(self) -> float:
        """Σ_t ‖x_t − x̄‖² over the evaluated tokens."""
        if self.n == 0:
            return float("nan")
        mean_c = self.sum_xc / self.n
        return float(self.sum_xc_sq - self.n * mean_c.pow(2).sum())

    def result(self) -> dict[str, Any]:
        n = self.n
        if n == 0:
            raise ValueError("no tokens were evaluated (every token excluded?)")
        fvu = safe_ratio(float(self.sse), self.total_variance())
        return {
            "l0": float(self.sum_l0) / n,
            "l1": float(self.sum_l1) / n,
            "mse": float(self.sse) / (n * self.d_in),
            "sse_per_token": float(self.sse) / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cossim": float(self.sum_cos) / n,
            "l2_ratio": float(self.sum_l2_ratio) / n,
            "relative_reconstruction_bias": safe_ratio(float(self.sum_xhat_sq), float(self.sum_x_dot_xhat)),
            **frequency_summary(self.frequency()),
            "tokens_evaluated": n,
        }


def prediction_mask(keep: Tensor) -> Tensor:
    """keep [batch, pos] bool -> [batch, pos-1] bool: the prediction made at position t (of token
    t+1) counts iff tokens t and t+1 are both kept."""
    return keep[:, :-1] & keep[:, 1:]


def token_log_probs(logits: Tensor) -> Tensor:
    """[batch, pos, vocab] logits -> float32 log-probabilities of the predicting positions
    [batch, pos-1, vocab]."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def token_ce(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """log_probs [batch, pos-1, vocab] (from `token_log_probs`), tokens [batch, pos] ->
    next-token cross-entropy [batch, pos-1]."""
    return -log_probs.gather(-1, tokens[:, 1:, None].to(log_probs.device)).squeeze(-1)


class CleanLogProbs(NamedTuple):
    """The clean run's log-probabilities [batch, pos-1, vocab] and their exp, computed once per
    batch for every KL against them."""

    log_probs: Tensor
    probs: Tensor

    @classmethod
    def of(cls, logits: Tensor) -> "CleanLogProbs":
        lp = token_log_probs(logits)
        return cls(lp, lp.exp())


def token_kl(clean: Tensor | CleanLogProbs, other_log_probs: Tensor) -> Tensor:
    """KL(p_clean ‖ p_other) per position, [batch, pos-1]; clean: its log-probabilities or a
    CleanLogProbs."""
    clean_lp, clean_p = clean if isinstance(clean, CleanLogProbs) else (clean, clean.exp())
    return (clean_p * (clean_lp - other_log_probs)).sum(-1)


class SumAccumulator:
    """Named float64 sums with a shared count: Σ over predicted positions of CE and KL."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, values: Tensor, mask: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(values.to(torch.float64)[mask].sum())
        self.counts[key] = self.counts.get(key, 0) + int(mask.sum())

    def mean(self, key: str) -> float:
        count = self.counts.get(key, 0)
        return self.sums[key] / count if count else float("nan")


def downstream_metrics(ce_clean: float, ce_sae: float, ce_zero: float, ce_mean: float,
                       kl_sae: float, kl_zero: float) -> dict[str, float]:
    """The downstream keys of METRICS.md from the four mean CEs and two mean KLs."""
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
        "ce_delta": ce_sae - ce_clean,
        "loss_recovered": safe_ratio(ce_zero - ce_sae, ce_zero - ce_clean),
        "loss_recovered_mean_ablation": safe_ratio(ce_mean - ce_sae, ce_mean - ce_clean),
        "kl_sae": kl_sae,
        "kl_zero": kl_zero,
        "kl_recovered": 1.0 - safe_ratio(kl_sae, kl_zero),
    }


def frequency_summary(frequency: Tensor) -> dict[str, float]:
    """dead, dense_1e-2, dense_1e-1 and frac_alive from a frequency tensor [d_sae]."""
    d_sae = frequency.numel()
    dead = int((frequency == 0).sum())
    return {"dead": dead, "dense_1e-2": int((frequency > 1e-2).sum()),
            "dense_1e-1": int((frequency > 1e-1).sum()), "frac_alive": 1.0 - dead / d_sae}


def jsonable(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
