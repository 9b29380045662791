"""Failure injection for the harvest tests (in this process, or in a rank of tests/dist_worker.py)."""

from __future__ import annotations

import itertools
from typing import Any, Callable

from sae.cache import harvesting


def fail_after_shards(n_shards: int, patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make the harvest raise, as a crash would, when it is about to compute its (n+1)-th shard
    (the shards already computed are still written). `patch`: e.g. pytest's monkeypatch.setattr."""
    compute, calls = harvesting._compute_shard, itertools.count()

    def failing(*args, **kwargs):
        if next(calls) >= n_shards:
            raise RuntimeError(f"injected failure after {n_shards} shards")
        return compute(*args, **kwargs)

    patch(harvesting, "_compute_shard", failing)
