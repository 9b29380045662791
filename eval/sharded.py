"""Reconstruction metrics of a dictionary too wide for one device, each rank holding a shard of
its features (under torchrun, sae.sharding): every METRICS.md reconstruction number (l0, l1, mse,
fvu, explained_variance, cossim, l2_ratio, relative_reconstruction_bias) and the feature
frequencies (dead, dense), equal to what one process computes with the whole dictionary.

    shards = sharding.make_mesh(sharding.layout_for(world, rank, None), device)
    shard = sharding.load_shard_of("runs/big/topk", shards, device)   # reads only its slices
    metrics = reconstruction_metrics(shard, batches, shards)          # the same on every rank

Each rank encodes every batch (TopK: the whole dictionary's top k per row, from every shard's
candidates), the partial decodes are summed, and the per-feature sums (L0, L1, firing counts)
are added up over the shards at the end. The downstream metrics (loss recovered, KL) are not
computed here: splice the x̂ of `sharding.decode_shard` into the model, or evaluate the saved
dictionary on one device when it fits.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from eval.metrics import ReconstructionAccumulator
from sae import sharding
from sae.dictionaries.base import SparseDictionary


@torch.no_grad()
def reconstruction_metrics(shard: SparseDictionary, batches: Iterable[Tensor],
                           shards: sharding.MeshShards) -> dict[str, Any]:
    """The reconstruction metrics of the whole dictionary over batches x [n, d_in] (raw units,
    kept tokens only; every rank the same batches) from this rank's `shard` of it."""
    acc = ReconstructionAccumulator(shard.d_in, shard.d_sae, shard.device)
    for x in batches:
        x = x.to(shard.device)
        f = sharding.encode_shard(shard, x, shards)
        acc.update(x, sharding.decode_shard(shard, f, shards), f)
    # the per-feature sums: every shard's part
    acc.sum_l0 = shards.feature_sum(acc.sum_l0)
    acc.sum_l1 = shards.feature_sum(acc.sum_l1)
    acc.fire_count = shards.feature_gather(acc.fire_count)
    acc.d_sae = shard.d_sae_total
    return acc.result()
