"""Several processes (torch.distributed, gloo, 2 CPU ranks launched by torch.distributed.run):
data-parallel training equals one process, dictionary-per-rank trains each dictionary once, a
diverging dictionary leaves without changing (or hanging) the others, a killed sweep rerun
without one dictionary resumes the rest (dictionary per rank: on another number of processes), a
distributed harvest writes the same cache as one process, and `torchrun train.py CONFIG.yaml`
runs the same YAML (evaluated afterwards without it; a finished run with one dictionary added
trains only that one).

The ranks run tests/dist_worker.py (synthetic batches: 6 dictionaries of every architecture on
two hook points and a skip transcoder from one to the other, 24 steps of 128 rows, a checkpoint
every 8 steps; `+boom` adds an eighth whose huge lr makes it diverge)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from dist_worker import run_harvest

from sae import checkpoint as ckpt
from sae import distributed
from sae.cache import TOKEN_INDEX, CacheReader
from sae.config import load_run_config
from sae.dictionaries import get_architecture, parse_dictionary_config
from sae.dictionaries.base import WHOLE_BATCH, BatchShards
from sae.dictionaries.batchtopk import batch_topk_flat, whole_batch_top
from sae.dictionaries.topk import batch_variance
from sae.distributed import free_port
from sae.formats import feature_shards
from sae.io import load_tensors
from pipeline import run_experiment
from sae.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
NAMES = ["topk", "batchtopk", "relu", "jumprelu", "gated", "matryoshka", "transcoder"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": "", "LOGLEVEL": "WARNING"}


def launch(*args: str, script: Path = WORKER, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--monitor-interval", "0.2",
           str(script), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)


def single(*args: str, script: Path = WORKER) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def weights(out_dir: Path, names=NAMES) -> dict[str, dict[str, torch.Tensor]]:
    return {n: feature_shards.read_features(out_dir / n) for n in names}  # one file or feature shards


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    r = single("train", out, "none")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One launch (launches are the slow part) training, one after the other: data parallel,
    dictionary per rank, both again with a diverging extra dictionary, and data parallel again
    with rank 1 SIGKILLing itself when it draws step 13 (checkpoints at steps 8 and 16), which
    ends the launch."""
    out = tmp_path_factory.mktemp("two")
    r = launch("train", out, "data_parallel=data_parallel,dictionary_per_rank=dictionary_per_rank,"
               "diverged_dp=data_parallel+boom,diverged_pr=dictionary_per_rank+boom,killed=data_parallel", 13, 1)
    assert r.returncode != 0  # the kill
    assert "SIGKILL" in r.stderr or "-9" in r.stderr, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def data_parallel(two_ranks) -> Path:
    return two_ranks / "data_parallel"


def assert_same_weights(a: Path, b: Path, names=NAMES) -> None:
    wa, wb = weights(a, names), weights(b, names)
    for name in names:
        assert set(wa[name]) == set(wb[name])
        for k in wa[name]:
            assert torch.equal(wa[name][k], wb[name][k]), f"{name}/{k} differs between {a.name} and {b.name}"


def test_data_parallel_matches_one_process(one_process, data_parallel):
    a, b = weights(one_process), weights(data_parallel)
    for name in NAMES:
        assert set(a[name]) == set(b[name])
        for k in a[name]:
            diff = (a[name][k] - b[name][k]).abs().max().item()
            # measured: <= 1.2e-7 (summation order only); slicing without whole-batch statistics
            # (TopK variance, BatchTopK selection, dead-feature counts) is off by >1e-3
            assert diff < 2e-6, f"{name}/{k}: 2 ranks differ from 1 process by {diff:.2e}"
    # every rank trained every dictionary; one copy written, checkpoints gone
    for r in (0, 1):
        assert (data_parallel / f"trained-{r}.txt").read_text().split() == sorted(NAMES)
    assert not (data_parallel / ckpt.CHECKPOINT_DIR).exists()
    cfg = json.loads((data_parallel / "topk" / "cfg.json").read_text())
    assert cfg["tokens_trained"] == 24 * 128


def test_dictionary_per_rank_trains_each_once_and_saves_all(one_process, two_ranks):
    tmp_path = two_ranks / "dictionary_per_rank"
    mine = [set((tmp_path / f"trained-{r}.txt").read_text().split()) for r in (0, 1)]
    assert mine[0] and mine[1] and not (mine[0] & mine[1])  # each dictionary on exactly one rank
    assert mine[0] | mine[1] == set(NAMES)
    # each rank trained its own on the whole batch stream: exactly what one process computes
    assert_same_weights(one_process, tmp_path)
    assert not (tmp_path / ckpt.CHECKPOINT_DIR).exists()


@pytest.fixture(scope="module")
def one_process_with_boom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_boom")
    r = single("train", out, "none+boom")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("placement", ["dp", "pr", "one"])
def test_a_diverging_dictionary_leaves_and_the_others_finish_as_without_it(request, two_ranks, placement):
    """An eighth dictionary with a huge lr diverges: the other seven have the weights of the same
    sweep without it (one process, data parallel, dictionary per rank), the launch went on to its
    later runs (no rank hung on a collective of the diverged one), and its folder holds its last
    good weights with status: diverged."""
    if placement == "one":
        out, expected = request.getfixturevalue("one_process_with_boom"), request.getfixturevalue("one_process")
    else:
        out = two_ranks / f"diverged_{placement}"
        expected = two_ranks / "data_parallel" if placement == "dp" else request.getfixturevalue("one_process")
    assert_same_weights(expected, out)
    cfg = json.loads((out / "boom" / "cfg.json").read_text())
    assert cfg["status"] == "diverged" and cfg["hyperparameters"]["lr"] == 1e30
    assert cfg["divergence"]["step"] == 1 and cfg["divergence"]["loss_tail"][-1][1] in ("nan", "inf")
    assert cfg["divergence"]["restored_step"] == 0 and cfg["tokens_trained"] == 0
    boom = load_tensors(out / "boom" / "sae.safetensors")
    assert all(torch.isfinite(t).all() for t in boom.values())
    ranks = (0,) if placement == "one" else (0, 1)
    assert set().union(*((out / f"trained-{r}.txt").read_text().split() for r in ranks)) == {*NAMES, "boom"}
    assert not (out / ckpt.CHECKPOINT_DIR).exists()


@pytest.fixture(scope="module")
def resumed(two_ranks) -> tuple[Path, subprocess.CompletedProcess]:
    """A second launch: the killed data-parallel sweep again without `gated`, then a
    dictionary-per-rank sweep that rank 1 SIGKILLs at step 13 (ending the launch)."""
    for name in NAMES:  # rank 1 died drawing step 13: every dictionary's last checkpoint is step 8
        assert ckpt.latest_path(ckpt.member_dir(two_ranks / "killed", name)).name == "checkpoint-0000000008.pt"
    assert not (two_ranks / "killed" / "topk").exists()
    r = launch("train", two_ranks, "killed=data_parallel-gated,killed_pr=dictionary_per_rank", 13, 1)
    assert r.returncode != 0 and ("SIGKILL" in r.stderr or "-9" in r.stderr), r.stderr[-3000:]
    return two_ranks, r


def test_killed_sweep_rerun_without_a_dictionary_resumes_the_rest(resumed, data_parallel):
    two_ranks, r = resumed
    tmp_path = two_ranks / "killed"
    # both ranks resumed at step 8 and ended where the uninterrupted 2-rank run ends
    assert [(tmp_path / f"start-{r}.txt").read_text() for r in (0, 1)] == ["8", "8"]
    kept = [n for n in NAMES if n != "gated"]
    assert_same_weights(data_parallel, tmp_path, kept)
    for name in kept:
        assert f"{name}: resumes at step 8" in r.stdout
    # the left-out dictionary's checkpoint is kept (and said so), not trained, not removed
    assert not (tmp_path / "gated").exists()
    assert ckpt.latest_path(ckpt.member_dir(tmp_path, "gated")).name == "checkpoint-0000000008.pt"
    assert "kept the checkpoints of gated (not in this run)" in r.stdout


def test_dictionary_per_rank_checkpoints_resume_on_another_number_of_processes(resumed, one_process):
    """Rank 1 died at step 13; rank 0 was stopped by torchrun wherever it was (checkpoint 8 or
    16, or finished). One process resumes each dictionary from its own checkpoint (one pass per
    step they stopped at) and ends bit-identical to one uninterrupted process."""
    two_ranks, _ = resumed
    tmp_path = two_ranks / "killed_pr"
    assert ckpt.members_with_checkpoints(tmp_path)
    r = single("train", tmp_path, "none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumes at step" in r.stdout
    assert_same_weights(one_process, tmp_path)
    assert not (tmp_path / ckpt.CHECKPOINT_DIR).exists()


def test_distributed_harvest_equals_single_process_and_resumes(tiny_model_dir, tmp_path):
    # rank 1 fails after its first shard; rank 0 writes all of its own
    r = launch("harvest", tmp_path / "two", tiny_model_dir, 1)
    assert r.returncode != 0 and "injected failure" in r.stderr
    cache = tmp_path / "two" / "cache"
    partial = json.loads((cache / "manifest.json").read_text())
    assert not partial["complete"] and partial["shards"] == []
    rank_lists = sorted(p.name for p in cache.glob("manifest.rank-*.json"))
    assert rank_lists == ["manifest.rank-00000.json", "manifest.rank-00001.json"]
    assert len(json.loads((cache / rank_lists[1]).read_text())["shards"]) == 1
    written = {p.name for p in cache.glob("shard_*.safetensors")}
    assert len(written) == 6  # rank 0: shards 0, 2, 4, 6, 8; rank 1: shard 1
    mtimes = {n: (cache / n).stat().st_mtime_ns for n in written}
    # resume (here in this process: a distributed harvest resumes with any number of ranks);
    # and a single-process harvest from scratch as the reference
    m = run_harvest(str(tiny_model_dir), str(cache))
    assert {n: (cache / n).stat().st_mtime_ns for n in written} == mtimes  # kept, not redone
    assert m.complete
    run_harvest(str(tiny_model_dir), str(tmp_path / "one" / "cache"))
    one = json.loads((tmp_path / "one" / "cache" / "manifest.json").read_text())
    two = json.loads((cache / "manifest.json").read_text())
    assert two["complete"] and two["n_shards"] == 10 and len(two["shards"]) == 10
    assert not list(cache.glob("manifest.rank-*.json"))
    assert two["identity"] == one["identity"]
    # same shards, byte for byte (sha256), so the same tokens and activations
    assert [(s["index"], s["sha256"], s["n_tokens"]) for s in two["shards"]] == \
        [(s["index"], s["sha256"], s["n_tokens"]) for s in one["shards"]]
    rows = CacheReader(cache, batch_size=64, with_index=True, prefetch=False)
    idx = torch.cat([b[TOKEN_INDEX] for b, _ in zip(rows.batches(0), range(rows.tokens_per_epoch // 64))])
    assert idx.unique().numel() == idx.numel() == (rows.tokens_per_epoch // 64) * 64


RUN = """
run_name: dist
output_dir: {out}
model: {model}
hooks: [blocks.0.hook_resid_post, blocks.1.hook_mlp_out]
data: {{source: {text}, context_size: 16}}
train_tokens: 2048
eval_tokens: 128
harvest: {{contexts_per_shard: 16}}
train: {{batch_size: 128}}
eval: {{enabled: false}}
distributed: {{placement: dictionary_per_rank}}
dictionaries:
  - {{name: topk, architecture: topk, k: 4, d_sae: 64, hook_name: blocks.0.hook_resid_post}}
  - {{name: relu, architecture: relu, d_sae: 64, l1_coefficient: 0.3, hook_name: blocks.1.hook_mlp_out}}
  - {{name: topk2, architecture: topk, k: 2, d_sae: 32, hook_name: blocks.1.hook_mlp_out}}
"""


def test_torchrun_train_py_then_evaluate_without_it(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(RUN).format(out=tmp_path / "runs", model=tiny_model_dir, text=tiny_text_file))
    r = launch(config, script=REPO / "train.py")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "dist"
    manifest = json.loads((run_dir / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["info"]["harvest_ranks_last_run"] == 2
    for name in ("topk", "relu", "topk2"):
        assert (run_dir / name / "sae.safetensors").is_file() and (run_dir / name / "activation_mean.safetensors").is_file()
        assert not (run_dir / name / "eval.json").exists()
    assert not (run_dir / ckpt.CHECKPOINT_DIR).exists()
    assert r.stdout.count("saved 3 dictionaries") == 1  # rank 0 alone reports
    # evaluation afterwards, one process, same YAML: nothing is retrained
    run, dictionaries = load_run_config(config, ["eval.enabled=true"])
    results = run_experiment(run, dictionaries)
    assert set(results) == {"topk", "relu", "topk2"}
    assert "already trained" in capsys.readouterr().out
    # FVU measured on the 120 held-out tokens (CPU): trained topk 0.487, relu 0.474, topk2 0.649;
    # the same dictionaries untrained (lr 1e-12) 0.718, 0.839, 0.818; predicting the mean: 1
    bars = {"topk": 0.6, "relu": 0.6, "topk2": 0.75}
    for name, bar in bars.items():
        metrics = json.loads((run_dir / name / "eval.json").read_text())
        assert metrics["tokens_evaluated"] > 0 and 0 <= metrics["fvu"] < bar, (name, metrics["fvu"])
    # the finished run relaunched under torchrun: found complete, nothing trained or evaluated again
    r = launch(config, "eval.enabled=true", script=REPO / "train.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("is complete with this config") == 1 and "evaluating" not in r.stdout
    # ... and with one dictionary added: only that one is trained (on one of the ranks) and evaluated
    before = files_of(run_dir)
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(config.read_text() + ADDED)
    r = launch(bigger, "eval.enabled=true", script=REPO / "train.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(r.stdout.count(f"{n}: already trained, reused") == 1 for n in ("topk", "relu", "topk2"))
    assert "saved 1 dictionaries" in r.stdout and "evaluating 1 dictionaries" in r.stdout
    after = files_of(run_dir)
    changed = sorted(p for p in after if after[p] != before.get(p))
    assert {p.split("/")[0] for p in changed} == {"topk3", "config.yaml", "summary.md", "summary.json"}, changed
    assert (run_dir / "topk3" / "eval.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["name"] for row in summary["dictionaries"]] == ["topk", "relu", "topk2", "topk3"]


ADDED = "  - {name: topk3, architecture: topk, k: 3, d_sae: 32, hook_name: blocks.0.hook_resid_post}\n"


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, mtime)} of every file under folder but the cache."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "cache"}


def test_assignment_balances_the_ranks_largest_first():
    cfgs = [parse_dictionary_config({"architecture": "topk", "d_sae": d, "hook_name": h})
            for d, h in [(4096, "a"), (1024, "a"), (1024, "b"), (2048, "b"), (512, "a")]]
    owners = distributed.assign_dictionaries(cfgs, 2, {"a": 64, "b": 64})
    assert owners == distributed.assign_dictionaries(cfgs, 2, {"a": 64, "b": 64})  # deterministic
    load = [sum(c.d_sae for c, o in zip(cfgs, owners) if o == r) for r in (0, 1)]
    assert sorted(load) == [4096, 4608]  # largest first onto the least-loaded rank (8704 in all)
    assert distributed.assign_dictionaries(cfgs, 1) == [0] * 5
    # without a launcher: rank 0 of 1, and the trainer gives the losses the whole batch
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    trainer = Trainer(cfgs, total_tokens=64, progress=False, placement="data_parallel")
    assert trainer.placement is None and trainer.shards is WHOLE_BATCH


class ThreadShards(BatchShards):
    """`count` shards of a batch, each worked on by its own thread of this process; a reduction
    waits for every shard's value (what sae.distributed.RankShards does across processes)."""

    def __init__(self, index: int, board: list, barrier: threading.Barrier):
        self.count, self.index, self.board, self.barrier = len(board), index, board, barrier

    def _everyone(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.board[self.index] = t.detach().clone()
        self.barrier.wait()
        values = list(self.board)
        self.barrier.wait()  # nobody writes the next reduction's value before all have read this one
        return values

    def sum(self, t):
        return torch.stack(self._everyone(t)).sum(dim=0)

    def min(self, t):
        return torch.stack(self._everyone(t)).amin(dim=0)

    def max(self, t):
        return torch.stack(self._everyone(t)).amax(dim=0)

    def gather(self, t):
        return torch.cat(self._everyone(t))


def on_shards(fn, x: torch.Tensor, count: int) -> list:
    """fn(shard of x, shards) for each of `count` contiguous shards, concurrently, in shard order."""
    board, barrier = [None] * count, threading.Barrier(count, timeout=60)
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(fn, part, ThreadShards(i, board, barrier)) for i, part in enumerate(x.chunk(count))]
        return [f.result() for f in futures]


def test_whole_batch_statistics_from_shards_equal_the_whole_batchs():
    """What the losses compute from their shard and the reductions equals what one process
    computes from the whole batch: TopK's variance, BatchTopK's selection and threshold, and
    (gradients averaged over the shards) the gradients themselves."""
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(96, 16, generator=g) + 1
    whole = (x - x.mean(dim=0)).pow(2).sum()
    for part in on_shards(batch_variance, x, 3):
        torch.testing.assert_close(part, whole, rtol=1e-6, atol=0)
    pre = torch.randn(96, 40, generator=g)
    picked = on_shards(lambda p, shards: whole_batch_top(p, 4, shards), pre, 2)
    flat = torch.cat([picked[0], picked[1] + pre[:48].numel()])
    assert torch.equal(flat, batch_topk_flat(pre, 4 * 96))
    for arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        groups = {"group_sizes": [8, 16, 24]} if arch == "matryoshka_batchtopk" else {}
        cfg = parse_dictionary_config({"architecture": arch, "d_sae": 48, "k": 3, "aux_k": 6, **groups})
        reference = get_architecture(arch)(cfg, 16).train()
        with torch.no_grad():
            reference.b_dec.copy_(x.mean(dim=0))
        dead = torch.arange(48) % 4 == 0
        copies = [copy.deepcopy(reference) for _ in range(2)]

        def step(part, shards):
            d = copies[shards.index]
            d.training_loss(part, 0.5, dead, shards).loss.backward()
            return d

        shard_dicts = on_shards(step, x, 2)
        reference.training_loss(x, 0.5, dead).loss.backward()
        for name, p in reference.named_parameters():
            mean_grad = sum(d.get_parameter(name).grad for d in shard_dicts) / 2
            torch.testing.assert_close(mean_grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"{arch}.{name}")
        if arch != "topk":
            for d in shard_dicts:
                torch.testing.assert_close(d.threshold, reference.threshold, rtol=1e-6, atol=0)


def test_torchrun_train_py_data_parallel_equals_one_process(tiny_model_dir, tiny_text_file, tmp_path):
    """The default placement through train.py and the cache reader: 2 ranks, each training on its
    half of every batch, give the dictionaries one process gives (up to float summation order)."""
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(RUN).format(out=tmp_path / "runs", model=tiny_model_dir, text=tiny_text_file))
    r = launch(config, "distributed.placement=data_parallel", script=REPO / "train.py")
    assert r.returncode == 0, r.stderr[-3000:]
    one = subprocess.run([sys.executable, str(REPO / "train.py"), str(config), f"output_dir={tmp_path / 'one'}",
                          "distributed.placement=data_parallel"], env=_env(), capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("topk", "relu", "topk2"):
        two_w = load_tensors(tmp_path / "runs" / "dist" / name / "sae.safetensors")
        one_w = load_tensors(tmp_path / "one" / "dist" / name / "sae.safetensors")
        for key, w in one_w.items():
            rel = float((two_w[key] - w).norm() / w.norm().clamp_min(1e-12))
            assert rel < 1e-4, f"{name}.{key}: relative difference {rel:.2e}"


def test_a_rank_failing_in_a_block_makes_every_rank_raise(tmp_path):
    """sae.distributed.failing_together: rank 0 fails writing what the others would read; the other
    rank raises a one-line error saying so at once, instead of waiting at the next collective."""
    r = launch("fail_together", tmp_path, 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "raised-0.txt").read_text() == "OSError: disk full"
    assert (tmp_path / "raised-1.txt").read_text().startswith("UserError: the test's block: failed on 1 other rank(s)")
