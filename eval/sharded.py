"""Evaluating a dictionary too wide for one device, each rank holding a shard of its features
(under torchrun, sae.sharding): every metric of METRICS.md, equal to what one process computes
with the whole dictionary.

    shards = sharding.make_mesh(sharding.layout_for(world, rank, None), device)
    shard = sharding.load_shard_of("runs/big/topk", shards, device)   # reads only its features
    results = evaluate_shards(model, {"topk": shard}, shards, tokens, keep, train_means)  # eval.json's numbers
    metrics = reconstruction_metrics(shard, activations, shards)      # from activations alone

`ShardView` shows the evaluator (eval.evaluate) a shard as the whole dictionary: `encode` gives
this shard's columns of the whole dictionary's f (TopK: each row's top k of the whole, from every
shard's candidates), `decode` the whole x̂ (the partial decodes summed over the shards), and its
accumulator adds the per-feature sums (L0, L1, firing counts) of the shards up when read. Every
rank runs the same model forwards on the same tokens and so makes the same collectives in the same
order; loss recovered, KL and CE come out as in one process. Killing features (prune, ablations)
needs the whole dictionary: load it in one process (`sae.load` reads the feature shards too).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from eval.evaluate import EvalResult, evaluate_dictionaries
from eval.evaluate import reconstruction_metrics as eval_reconstruction
from eval.metrics import ReconstructionAccumulator
from sae import distributed as dist
from sae import sharding
from sae.dictionaries.base import SparseDictionary


class ShardedAccumulator(ReconstructionAccumulator):
    """One feature shard's accumulator: f holds this shard's features; the per-feature sums are
    added up over the shards (a collective) when the result or the frequencies are read."""

    def __init__(self, d_out: int, shard: SparseDictionary, shards: sharding.MeshShards):
        super().__init__(d_out, shard.d_sae, shard.W_enc.device)
        self.shards, self.d_sae_total, self._merged = shards, shard.d_sae_total, False

    def _merge(self) -> None:
        if self._merged:
            return
        self.sum_l0 = self.shards.feature_sum(self.sum_l0)
        self.sum_l1 = self.shards.feature_sum(self.sum_l1)
        self.fire_count = self.shards.feature_gather(self.fire_count)
        self.d_sae, self._merged = self.d_sae_total, True

    def result(self) -> dict[str, Any]:
        self._merge()
        return super().result()

    def frequency(self) -> Tensor:
        self._merge()
        return super().frequency()


class ShardView:
    """A feature shard of a dictionary, seen as the whole dictionary (every other attribute is
    the shard's: metadata, d_in, W_enc, cfg, ...)."""

    def __init__(self, shard: SparseDictionary, shards: sharding.MeshShards):
        self.shard = shard
        self.shards = shards.for_width(shard.d_sae_total, shard.metadata.get("name", ""))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shard, name)

    @property
    def d_sae(self) -> int:
        return self.shard.d_sae_total

    def encode(self, x: Tensor) -> Tensor:
        """f [..., this shard's d_sae]: its columns of the whole dictionary's encoding of x."""
        lead = x.shape[:-1]
        return sharding.encode_shard(self.shard, x.reshape(-1, x.shape[-1]), self.shards).reshape(*lead, -1)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """x̂ [..., d_out] of the whole dictionary (x: the raw input, for a skip connection)."""
        lead = f.shape[:-1]
        flat_x = None if x is None else x.reshape(-1, x.shape[-1])
        return sharding.decode_shard(self.shard, f.reshape(-1, f.shape[-1]), self.shards, flat_x).reshape(*lead, -1)

    def reconstruction_accumulator(self) -> ShardedAccumulator:
        return ShardedAccumulator(int(getattr(self.shard, "d_out", self.shard.d_in)), self.shard, self.shards)


@torch.no_grad()
def evaluate_shards(model, shards_of: Mapping[str, SparseDictionary], shards: sharding.MeshShards,
                    tokens: Tensor, keep_mask: Tensor, train_means: Mapping[str, Tensor],
                    progress: bool = True, **kwargs: Any) -> dict[str, EvalResult]:
    """`eval.evaluate.evaluate_dictionaries` of the whole dictionaries whose shards this rank holds
    (name -> shard, `sharding.load_shard_of`), on the same tokens on every rank (a collective);
    every rank gets the same results (rank 0 writes them: `eval.outputs.write_all`)."""
    views = {name: ShardView(shard, shards) for name, shard in shards_of.items()}
    return evaluate_dictionaries(model, views, tokens, keep_mask, train_means=train_means,
                                 progress=progress and dist.is_main(), **kwargs)


def reconstruction_metrics(shard: SparseDictionary, activations: Tensor, shards: sharding.MeshShards,
                           targets: Tensor | None = None, batch_size: int = 4096) -> dict[str, Any]:
    """The reconstruction metrics of the whole dictionary on activations [n, d_in] (raw units, kept
    tokens only, the same on every rank; a transcoder's prediction is compared with `targets`
    [n, d_out]) from this rank's `shard` of it: `eval.evaluate.reconstruction_metrics` of its
    ShardView (a collective)."""
    metrics, _ = eval_reconstruction(ShardView(shard, shards), activations, batch_size, targets)
    return metrics
