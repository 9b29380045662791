"""Merging the shard lists that the ranks of a distributed harvest keep in files of their own.

During a distributed harvest, rank r lists the shards it wrote in ``manifest.rank-<r>.json``;
rank 0 moves them into ``manifest.json`` at the end, and so does any later harvest at its start
(so an interrupted distributed harvest resumes with any number of processes).
"""

from __future__ import annotations

import logging
import re

from sae.cache.manifest import MANIFEST, Manifest
from sae.cache.shards import shard_ok
from sae.errors import CacheError

log = logging.getLogger(__name__)

RANK_MANIFEST = re.compile(r"^manifest\.rank-(\d+)\.json$")


def rank_manifest_file(rank: int) -> str:
    return f"manifest.rank-{rank:05d}.json"


def merge_rank_manifests(m: Manifest, verify: str = "quick") -> bool:
    """Move the shards listed by the ranks of a distributed harvest into `m` (then delete their
    lists). A shard failing verification is left out (it will be re-harvested). True if any."""
    found = sorted(p for p in m.cache_dir.iterdir() if RANK_MANIFEST.match(p.name))
    if not found:
        return False
    have = {s.index for s in m.shards}
    for path in found:
        try:
            part = Manifest.load(m.cache_dir, path.name)
        except CacheError as e:
            log.warning("%s; its shards will be re-harvested", e)
            continue
        if part.identity != m.identity or part.contexts_per_shard != m.contexts_per_shard:
            raise CacheError(f"{path} belongs to another harvest than {m.cache_dir / MANIFEST}; "
                             f"delete {m.cache_dir} to re-harvest")
        for s in part.shards:
            if s.index in have:
                continue
            if verify != "none" and not shard_ok(m, s, full=(verify == "full")):
                continue
            m.shards.append(s)
            have.add(s.index)
    m.shards.sort(key=lambda s: s.index)
    m.save()
    for path in found:
        path.unlink(missing_ok=True)
    return True
