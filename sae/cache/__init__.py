"""On-disk activation cache: harvest once, verify, resume, read back in shuffled batches.

A cache directory::

    manifest.json              identity, layout and the list of complete shards    (manifest.py)
    shard_00000.safetensors    contexts [0, C) of the token tensor                  (shards.py)
    shard_00001.safetensors    contexts [C, 2C) ...   (each with its activations' float64 sums)

Modules: `manifest` (the manifest and the cache's identity), `shards` (shard files: write, verify,
read), `capture` (activations of several hooks from one forward pass), `harvesting` (the harvest
loop), `merge` (a distributed harvest's per-rank shard lists), `reader` (shuffled batches from
the cache, or straight from the model), `scatter_read` (shard rows read straight into their
shuffled places), `device_feed` (batches copied to the GPU a step ahead).
"""

from sae.cache.capture import ActivationCapture
from sae.cache.device_feed import to_device
from sae.cache.harvesting import harvest
from sae.cache.manifest import MANIFEST, Manifest, ShardInfo, check_identity, full_identity
from sae.cache.reader import TOKEN_INDEX, CacheReader, ShuffledBatches, StreamingSource
from sae.cache.shards import (ACT_PREFIX, SUM_PREFIX, load_shard, open_cache, read_shard_tensors,
                              shard_sums, token_positions, verify_cache, verify_shard)

__all__ = [
    "ACT_PREFIX", "MANIFEST", "SUM_PREFIX", "TOKEN_INDEX", "ActivationCapture", "CacheReader", "Manifest",
    "ShardInfo", "ShuffledBatches", "StreamingSource", "check_identity", "full_identity", "harvest",
    "load_shard", "open_cache", "read_shard_tensors", "shard_sums", "to_device", "token_positions",
    "verify_cache", "verify_shard",
]
