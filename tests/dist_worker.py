"""What each rank runs in tests/test_distributed.py (launched by torch.distributed.run, gloo, CPU).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py TASK OUT_DIR [ARGS]

(ARGS count from 1 after OUT_DIR.)

TASK harvest MODEL_DIR [FAIL_RANK]: harvests the tiny model (tokens from `harvest_tokens`) into
OUT_DIR/cache with `distributed=True`; rank FAIL_RANK fails after writing its first shard.

TASK train PLACEMENT [DIE_AT_STEP DIE_RANK]: trains CONFIGS on synthetic batches; PLACEMENT is none,
data_parallel, dictionary_per_rank, feature_sharded (`feature_sharded@F`: F feature shards, the
other ranks data-parallel groups), or several comma-separated runs, one after the other, each
`NAME=PLACEMENT` into OUT_DIR/NAME. A placement may end in edits of the sweep: `+boom` adds a
dictionary whose huge lr makes it diverge, `-gated` leaves that one out (`data_parallel-gated+boom`);
`+files` saves feature_sharded dictionaries as feature shards (saved_as: feature_shards).
Rank DIE_RANK SIGKILLs itself when it draws step DIE_AT_STEP (of the last run). Each rank records
the step its batches started from in start-<rank>.txt (to show a relaunch resumed) and the names
of the dictionaries it trained in trained-<rank>.txt. A feature_sharded run then evaluates each
saved dictionary sharded again (eval.sharded on `heldout_batches`): rank 0 writes
eval-sharded.json ({name: metrics}).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from cache_helpers import fail_after_shards
from eval.sharded import reconstruction_metrics
from sae import distributed, sharding
from sae.dictionaries import parse_dictionary_config
from sae.synthetic import SyntheticFeatures
from sae.trainer import train_dictionaries

BATCH = 128
TOTAL_TOKENS = 24 * BATCH
COMMON = {"d_sae": 48, "dead_after_tokens": 4 * BATCH, "lr_warmup_fraction": 0.1}
CONFIGS = [
    {"name": "topk", "architecture": "topk", "k": 3, "aux_k": 8, "hook_name": "hook.a"},
    # BatchTopK's selection over the whole batch turns the float-order differences of 1 and 2 ranks
    # into flipped selections at its capped default lr (2e-2 at this width): a set lr keeps the
    # comparison about the maths (tests/test_distributed.py's thread-sharded test checks the
    # selection itself exactly)
    {"name": "batchtopk", "architecture": "batchtopk", "k": 3, "lr": 4e-3, "hook_name": "hook.b"},
    # ReLU's b_enc steps at √d_in (4) times its lr: at the capped 2e-2 the float-order differences
    # flip features across 0 (2.6e-6 in W_enc after 24 steps); 5e-3 keeps b_enc's step at 2e-2
    {"name": "relu", "architecture": "relu", "l1_coefficient": 3.0, "resample_every_tokens": 8 * BATCH,
     "lr": 5e-3, "hook_name": "hook.a"},
    # JumpReLU's threshold steps on the count of pre-activations inside its window: at the capped
    # 2e-2 a float-order difference moved one across an edge on another CPU (threshold 4.2e-5 apart)
    {"name": "jumprelu", "architecture": "jumprelu", "lr": 4e-3, "hook_name": "hook.b"},
    {"name": "gated", "architecture": "gated", "hook_name": "hook.a"},
    {"name": "matryoshka", "architecture": "matryoshka_batchtopk", "k": 3, "group_sizes": [8, 16, 24],
     "lr": 4e-3, "hook_name": "hook.b"},
    {"name": "transcoder", "architecture": "topk", "k": 3, "input_hook": "hook.a", "hook_name": "hook.b",
     "skip_connection": True},
]


# lr 1e30: one Adam step moves weights by ~1e30, whose squares overflow float32 (inf, then NaN)
BOOM = {"name": "boom", "architecture": "relu", "l1_coefficient": 3.0, "lr": 1e30,
        "hook_name": "hook.b"}


# a strong L1 silences features within a few steps: they are resampled every 4 steps
RESAMPLE = {"name": "resample", "architecture": "relu", "l1_coefficient": 30.0, "resample_every_tokens": 4 * BATCH,
            "resample_dead_tokens": 2 * BATCH, "hook_name": "hook.a"}


def configs(edits: str = ""):
    """CONFIGS edited as `edits` says: '+boom' adds BOOM, '+resample' RESAMPLE, '-NAME' leaves NAME out."""
    chosen = list(CONFIGS) + [BOOM] * ("+boom" in edits) + [RESAMPLE] * ("+resample" in edits)
    left_out = {e.split("+")[0] for e in edits.split("-")[1:]}
    return [parse_dictionary_config({**COMMON, **c}) for c in chosen if c["name"] not in left_out]


def split_placement(spec: str) -> tuple[str, str]:
    """'data_parallel-gated+boom' -> ('data_parallel', '-gated+boom')."""
    for i, ch in enumerate(spec):
        if ch in "+-":
            return spec[:i], spec[i:]
    return spec, ""


class Source:
    """Two hook points of synthetic activations; kills this rank at step `die_at` if asked."""

    def __init__(self, out_dir: str, die_at: int = -1, die_rank: int = -1):
        self.a = SyntheticFeatures(d_in=16, n_features=40, batch_size=BATCH, seed=3)
        self.b = SyntheticFeatures(d_in=16, n_features=40, batch_size=BATCH, seed=4)
        self.out_dir, self.die_at, self.die_rank = out_dir, die_at, die_rank

    def batches(self, start_step: int = 0):
        with open(os.path.join(self.out_dir, f"start-{distributed.rank()}.txt"), "w") as f:
            f.write(str(start_step))
        i = start_step
        while True:
            if i == self.die_at and distributed.rank() == self.die_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            yield {"hook.a": self.a.batch(i), "hook.b": self.b.batch(i)}
            i += 1


def heldout_batches(hook: str) -> list[torch.Tensor]:
    """Two batches of the hook's synthetic activations that no training step draws."""
    features = SyntheticFeatures(d_in=16, n_features=40, batch_size=BATCH, seed=3 if hook == "hook.a" else 4)
    return [features.batch(1000 + i) for i in range(2)]


def evaluate_sharded(out_dir: str, feature_shards: int | None) -> None:
    """Each saved dictionary of out_dir evaluated with every rank holding a shard of it."""
    shards = sharding.make_mesh(sharding.layout_for(distributed.world_size(), distributed.rank(), feature_shards),
                                torch.device("cpu"))
    results = {}
    for c in [*CONFIGS, RESAMPLE]:
        folder = os.path.join(out_dir, c["name"])
        if os.path.isdir(folder):
            shard = sharding.load_shard_of(folder, shards)
            x_out = torch.cat(heldout_batches(c["hook_name"]))
            x_in = torch.cat(heldout_batches(c["input_hook"])) if "input_hook" in c else x_out  # a transcoder's
            results[c["name"]] = reconstruction_metrics(shard, x_in, shards, targets=x_out)
    if distributed.is_main():
        with open(os.path.join(out_dir, "eval-sharded.json"), "w") as f:
            json.dump(results, f)


HARVEST_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
HARVEST_IDENTITY = {"model": "tiny", "dataset": "random"}


def harvest_tokens(n_ctx: int = 40, T: int = 16):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 40, (n_ctx, T), generator=g)
    tokens[:, 0] = 1
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    keep &= torch.rand(n_ctx, T, generator=g) > 0.1
    return tokens, keep


def run_harvest(model_dir: str, cache_dir: str, fail_rank: int = -1):
    # imported here: the training workers need neither, and transformer_lens takes seconds to import
    from transformer_lens.model_bridge import TransformerBridge

    from sae.cache import harvest

    model = TransformerBridge.boot_transformers(model_dir, device="cpu")
    tokens, keep = harvest_tokens()
    if distributed.rank() == fail_rank:
        fail_after_shards(1)
    return harvest(model, tokens, keep, HARVEST_HOOKS, cache_dir, identity=HARVEST_IDENTITY,
                   contexts_per_shard=4, batch_contexts=4, progress=False,
                   distributed=distributed.is_distributed())


def resample_one_shard(out_dir: str) -> None:
    """Two feature shards of a ReLU dictionary, dead features on the second only: both must meet
    in the same collectives (the first has nothing to resample, but takes part in the norms)."""
    cfg = parse_dictionary_config({"architecture": "relu", "d_sae": 16})
    shards = sharding.make_mesh(sharding.layout_for(2, distributed.rank(), 2), torch.device("cpu")).for_width(16)
    d = sharding.build_shard(cfg, 8, shards, "relu")
    dead = torch.zeros(8, dtype=torch.bool)
    if distributed.rank() == 1:
        dead[[2, 5]] = True
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = d.resample(x, dead, torch.Generator().manual_seed(1), shards)
    with open(os.path.join(out_dir, f"resampled-{distributed.rank()}.txt"), "w") as f:
        f.write(" ".join(map(str, ids.tolist())))


def fail_together(out_dir: str, fail_rank: int) -> None:
    """Rank fail_rank fails inside a failing_together block; each rank records what it raised and
    then meets the others once more (a rank left waiting would time the test out instead)."""
    try:
        with distributed.failing_together("the test's block"):
            if distributed.rank() == fail_rank:
                raise OSError("disk full")
        raised = "nothing"
    except Exception as e:
        raised = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"raised-{distributed.rank()}.txt"), "w") as f:
        f.write(raised)
    distributed.barrier()


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    task, out_dir = argv[0], argv[1]
    os.makedirs(out_dir, exist_ok=True)
    distributed.init_from_env()
    if task == "train":
        die_at = int(argv[3]) if len(argv) > 3 else -1
        die_rank = int(argv[4]) if len(argv) > 4 else -1
        runs = argv[2].split(",")
        for i, run in enumerate(runs):  # several: one after the other, into OUT_DIR/<name>
            name, _, spec = run.rpartition("=")
            placement, edits = split_placement(spec)
            placement, _, feature_shards = placement.partition("@")
            out = out_dir if len(runs) == 1 else os.path.join(out_dir, name or placement)
            os.makedirs(out, exist_ok=True)
            last = i == len(runs) - 1  # the kill applies to the last run only
            source = Source(out, die_at if last else -1, die_rank if last else -1)
            result = train_dictionaries(source, configs(edits), total_tokens=TOTAL_TOKENS,
                                        out_dir=out, checkpoint_every_tokens=8 * BATCH, progress=False,
                                        placement=None if placement == "none" else placement,
                                        feature_shards=int(feature_shards) if feature_shards else None,
                                        saved_as="feature_shards" if "+files" in edits else "one_file")
            with open(os.path.join(out, f"trained-{distributed.rank()}.txt"), "w") as f:
                f.write("\n".join(sorted(result)))
            with open(os.path.join(out, f"returned-{distributed.rank()}.json"), "w") as f:
                json.dump({n: [d.d_sae, d.metadata.get("status")] for n, d in result.items()}, f)
            if placement == "feature_sharded":
                evaluate_sharded(out, int(feature_shards) if feature_shards else None)
    elif task == "resample_one_shard":
        resample_one_shard(out_dir)
    elif task == "fail_together":
        fail_together(out_dir, int(argv[2]))
    elif task == "harvest":
        run_harvest(argv[2], os.path.join(out_dir, "cache"), int(argv[3]) if len(argv) > 3 else -1)
    else:
        raise SystemExit(f"unknown task {task}")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
