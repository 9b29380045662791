"""benchmarks/quality.py hands every library the same Matryoshka groups, each in its own form: our
`group_sizes` fractions, SAELens's cumulative `matryoshka_widths` (benchmarks/peer_common.py) and
dictionary_learning's `group_fractions` (it floors each group but the last, which takes the rest)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
from peer_common import nested_widths  # noqa: E402

from sae.dictionaries import parse_dictionary_config  # noqa: E402


def dictionary_learning_group_sizes(fractions: list[float], d_sae: int) -> list[int]:
    """How dictionary_learning's MatryoshkaBatchTopKTrainer 0.1.0 turns group_fractions into sizes."""
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    return [*sizes, d_sae - sum(sizes)]


@pytest.mark.parametrize("size", ["full", "medium", "quick"])
def test_every_library_gets_the_same_matryoshka_groups(size):
    args = quality.parse_args(["--size", size, "--architectures", "matryoshka"])
    d_sae = quality.d_sae_for(quality.SIZES[size][0])
    ours = quality.our_runs(args, d_sae)[0]
    config = parse_dictionary_config(ours.config)
    our_ends = list(itertools.accumulate(config.resolve_group_sizes(d_sae)))
    assert len(our_ends) == 4 and our_ends[-1] == d_sae

    peers = {peer: quality.peer_runs(args, peer) for peer in ("sae-lens", "dictionary-learning")}
    for peer, runs in peers.items():
        assert [r.config["architecture"] for r in runs] == ["matryoshka_batchtopk"] * 3, peer
        fractions = runs[0].config["group_fractions"]
        widths = (nested_widths(fractions, d_sae) if peer == "sae-lens"
                  else list(itertools.accumulate(dictionary_learning_group_sizes(fractions, d_sae))))
        assert widths == our_ends, f"{peer}: groups end at {widths}, ours at {our_ends}"


def test_peer_sweeps_without_a_base_config_send_only_the_architecture_and_knob():
    args = quality.parse_args(["--size", "medium", "--architectures", "topk"])
    runs = quality.peer_runs(args, "sae-lens")
    assert [r.config for r in runs] == [{"architecture": "topk", "k": k} for k in (4, 8, 16)]
