"""x̄, the mean activation over training tokens: the mean-ablation baseline of METRICS.md (ce_mean).

Computed from the activation cache when a run has one, else from model forwards on training
text; kept in each dictionary's folder as activation_mean.safetensors ({"mean": [d_in] float32}).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from sae import io
from sae.cache import ActivationCapture, Manifest, shard_sums
from sae.errors import UserError

MEAN_FILE = "activation_mean.safetensors"
MEAN_TOKENS = 32_768  # training tokens for x̄ when there is neither a cache nor a mean file


def means_from_cache(cache_dir: str | Path, hooks: list[str]) -> dict[str, Tensor]:
    """hook -> x̄ [d_in] over every cached (training) token, from the float64 sums the harvest
    recorded in each shard (a cache harvested before they were recorded is read and summed)."""
    manifest = Manifest.load(cache_dir)
    totals = {h: torch.zeros(manifest.d_in[h], dtype=torch.float64) for h in hooks}
    for shard in manifest.shards:
        for h, total in shard_sums(manifest, shard, hooks).items():
            totals[h] += total
    count = sum(shard.n_tokens for shard in manifest.shards)
    return {h: (totals[h] / max(count, 1)).float() for h in hooks}


@torch.no_grad()
def means_from_model(model, hooks: Iterable[str], tokens: Tensor, keep_mask: Tensor,
                     batch_size: int = 8) -> dict[str, Tensor]:
    """hook -> x̄ [d_in] (float32, CPU) over the kept tokens of `tokens` [n_ctx, ctx], accumulated
    in float64. Pass *training*-split contexts (METRICS.md: x̄ from training tokens)."""
    hooks = sorted(set(hooks))
    totals = {h: torch.zeros((), dtype=torch.float64) for h in hooks}
    count = 0
    with ActivationCapture(model, hooks) as capture:
        for start in range(0, tokens.shape[0], batch_size):
            keep = keep_mask[start:start + batch_size]
            rows = capture.kept_rows(tokens[start:start + batch_size], keep)  # hook -> [n_kept, d_in]
            for h in hooks:
                totals[h] = totals[h] + rows[h].to(torch.float64).sum(dim=0)
            count += int(keep.sum())
    if count == 0:
        raise UserError("no kept tokens to compute the activation mean from")
    return {h: (totals[h] / count).float().cpu() for h in hooks}


def save_mean(folder: str | Path, mean: Tensor) -> None:
    io.save_tensors(Path(folder) / MEAN_FILE, {"mean": mean.contiguous()})


def read_mean(folder: str | Path) -> Tensor | None:
    """x̄ [d_in] from a dictionary folder, None when the folder has no mean file."""
    path = Path(folder) / MEAN_FILE
    if not path.is_file():
        return None
    tensors = io.load_tensors(path)
    if "mean" not in tensors:
        raise UserError(f"{path} has no tensor 'mean'; delete it to compute the mean again")
    return tensors["mean"].float()


def copy_mean(source_folder: str | Path, folder: str | Path) -> None:
    """Carry a dictionary's x̄ over to one derived from it (same hook, same training tokens)."""
    if (Path(source_folder) / MEAN_FILE).is_file():
        shutil.copyfile(Path(source_folder) / MEAN_FILE, Path(folder) / MEAN_FILE)
