"""Placement feature_sharded (sae/sharding.py; gloo, 2 and 4 CPU ranks launched by
torch.distributed.run): every architecture's gathered dictionary equals one process's, on 2 and 4
feature shards and on a 2 × 2 mesh (2 feature shards × 2 data groups); a killed run resumes
bit-identically with the same layout and is refused with another; bad layouts stop train.py
with one line before any work; the saved dictionary evaluated sharded (eval/sharded.py) gives
one process's metrics.

The ranks run tests/dist_worker.py (the 6 dictionaries of tests/test_distributed.py plus a ReLU
whose strong L1 makes it resample features every 4 steps; 24 steps of 128 rows, a checkpoint
every 8 steps). Three launches in all (launches are the slow part)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import sae
from dist_worker import heldout_batches
from test_distributed import REPO, launch, single, weights

from eval.__main__ import main as eval_main
from eval.evaluate import evaluate_dictionaries
from eval.metrics import ReconstructionAccumulator
from sae import checkpoint as ckpt
from sae import sharding
from sae.dictionaries import get_architecture, parse_dictionary_config
from sae.config import load_run_config
from sae.errors import ConfigError, UserError
from sae.formats import feature_shards
from sae.loading import load_dictionary
from sae.means import read_mean
from sae.models import load_model
from sae.text import keep_mask, load_contexts

NAMES = ["topk", "batchtopk", "relu", "jumprelu", "gated", "matryoshka", "transcoder", "resample"]
MESH_NAMES = ["topk", "batchtopk", "matryoshka", "transcoder", "resample"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    r = single("train", out, "none+resample")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """2 ranks: 2 feature shards (and a dictionary that diverges at once), then the same without
    it, saved as feature shards, with rank 1 SIGKILLing itself when it draws step 13 (checkpoints
    at steps 8 and 16), which ends the launch."""
    out = tmp_path_factory.mktemp("two")
    r = launch("train", out, "sharded2=feature_sharded+resample+boom,killed=feature_sharded+resample+files", 13, 1)
    assert r.returncode != 0 and ("SIGKILL" in r.stderr or "-9" in r.stderr), r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    """4 ranks: 4 feature shards, then a 2 × 2 mesh (feature_shards 2: 2 data groups) with the
    dictionaries whose selections and resampling span both (MESH_NAMES: a shorter launch)."""
    out = tmp_path_factory.mktemp("four")
    r = launch("train", out, "sharded4=feature_sharded+resample,mesh=feature_sharded@2+resample-relu-jumprelu-gated",
               nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("run", ["two:sharded2", "four:sharded4", "four:mesh"])
def test_gathered_dictionary_equals_one_process(request, one_process, run):
    fixture, name = run.split(":")
    out = request.getfixturevalue({"two": "two_ranks", "four": "four_ranks"}[fixture]) / name
    names = MESH_NAMES if name == "mesh" else NAMES
    a, b = weights(one_process, names), weights(out, names)
    for n in names:
        assert set(a[n]) == set(b[n])
        for k, w in a[n].items():
            rel = float((b[n][k] - w).norm() / w.norm().clamp_min(1e-12))
            # measured: <= 6e-7 (summation order of the partial decodes and gradients)
            assert rel < 1e-5, f"{run} {n}/{k}: relative difference {rel:.1e}"
    one_cfg = json.loads((one_process / "resample" / "cfg.json").read_text())
    cfg = json.loads((out / "resample" / "cfg.json").read_text())
    assert cfg["features_resampled"] == one_cfg["features_resampled"] > 0  # every shard's counted
    assert cfg["d_sae"] == 48 and cfg["tokens_trained"] == 24 * 128
    assert not (out / ckpt.CHECKPOINT_DIR).exists()  # every shard's checkpoints removed at the end
    if name == "sharded2":  # the diverged one left on both ranks; the others trained on as without it
        boom = json.loads((out / "boom" / "cfg.json").read_text())
        assert boom["status"] == "diverged" and boom["divergence"]["step"] == 1 and boom["d_sae"] == 48
        returned = json.loads((out / "returned-0.json").read_text())  # what train_dictionaries hands back
        assert returned["boom"] == [48, "diverged"] and returned["topk"] == [48, None]  # the whole, not a shard


def test_killed_run_is_refused_with_another_layout_and_resumes_identically_with_its_own(two_ranks):
    killed = two_ranks / "killed"
    member = ckpt.member_dir(killed, "topk")
    assert sorted(p.name for p in member.iterdir()) == ["features-000-of-002", "features-001-of-002"]
    with pytest.raises(ConfigError, match="written by 2 feature shards, this run has 4 feature shards"):
        sharding.refuse_other_layout(member, sharding.layout_for(4, 0, None), "topk")
    with pytest.raises(ConfigError, match="written by 2 feature shards, this run has whole dictionaries"):
        sharding.refuse_other_layout(member, None, "topk")  # what data_parallel or one process checks
    sharding.refuse_other_layout(member, sharding.layout_for(2, 1, None), "topk")  # its own: resumes
    r = launch("train", killed, "feature_sharded+resample+files")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(killed / f"start-{i}.txt").read_text() for i in (0, 1)] == ["8", "8"]
    assert "topk: resumes at step 8" in r.stdout
    a, b = weights(two_ranks / "sharded2", NAMES), weights(killed, NAMES)
    for n in NAMES:
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), f"{n}/{k}: the resumed run differs from the uninterrupted one"
    assert not (killed / ckpt.CHECKPOINT_DIR).exists()


def test_layouts_that_do_not_fit(tmp_path):
    assert sharding.layout_for(4, 3, 2) == sharding.Layout(data_groups=2, feature_shards=2, data_index=1,
                                                           feature_index=1)
    with pytest.raises(ConfigError, match="feature_shards 3 does not divide the 4 ranks"):
        sharding.layout_for(4, 0, 3)
    cfgs = [parse_dictionary_config({"architecture": "topk", "d_sae": 48, "k": 4}),
            parse_dictionary_config({"architecture": "relu", "expansion_factor": 3})]
    sharding.check_widths(cfgs, ["a", "b"], {None: 16}, 4)  # 48 features each
    with pytest.raises(ConfigError, match="dictionary 'b': d_sae 36 is not divisible by the 8 feature shards"):
        sharding.check_widths(cfgs, ["a", "b"], 12, 8)


RUN = """
run_name: bad
output_dir: {out}
model: {model}
hooks: [blocks.0.hook_resid_post]
data: {{source: {text}, context_size: 16}}
train_tokens: 2048
distributed: {{placement: feature_sharded, feature_shards: 3}}
dictionaries:
  - {{name: topk, architecture: topk, k: 4, d_sae: 64}}
"""


def test_train_py_refuses_a_layout_that_does_not_fit_the_ranks_before_any_work(tiny_model_dir, tiny_text_file,
                                                                                tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(RUN).format(out=tmp_path / "runs", model=tiny_model_dir, text=tiny_text_file))
    r = launch(config, script=REPO / "train.py")
    assert r.returncode != 0
    message = ("train.py: error: distributed.feature_shards 3 does not divide the 2 ranks: give a divisor "
               "of the number of processes (each data group holds every feature once)")
    assert r.stderr.count(message) == 2  # one per rank (their lines may run together in the pipe)
    assert "exitcode  : 2" in r.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # nothing written


def test_sharded_evaluation_equals_one_process_on_the_saved_dictionary(two_ranks):
    """Each saved (gathered) dictionary loads and prunes like any other, and its reconstruction
    metrics computed by 2 ranks holding a shard each (eval.sharded, written by the worker) equal
    those of the whole dictionary in this process."""
    out = two_ranks / "sharded2"
    sharded = json.loads((out / "eval-sharded.json").read_text())
    assert set(sharded) == set(NAMES)
    for name in NAMES:
        d = load_dictionary(out / name)
        hook, input_hook = d.metadata["hook_name"], d.metadata.get("input_hook")
        acc = ReconstructionAccumulator(d.d_out, d.d_sae)
        for x, y in zip(heldout_batches(input_hook or hook), heldout_batches(hook)):
            f = d.encode(x)
            acc.update(y, d.decode(f, x), f)
        whole = acc.result()
        for key in ("l0", "l1", "fvu", "mse", "cossim", "dead", "frac_alive"):
            assert sharded[name][key] == pytest.approx(whole[key], rel=1e-5, abs=1e-9), (name, key)
        assert whole["fvu"] > 0 and whole["l0"] > 0, (name, whole["fvu"], whole["l0"])  # not all zeros
        assert d.pruned(torch.arange(0, 48, 2)).d_sae == 24


def test_saved_as_feature_shards_loads_and_evaluates_as_the_one_file(two_ranks):
    """The resumed run saved every dictionary as 2 feature shards + an index (no sae.safetensors);
    sae.load reads them into the very dictionary the uninterrupted run saved as one file, and the
    sharded evaluation that read each rank's features from the shards gives the same metrics."""
    killed, whole = two_ranks / "killed", two_ranks / "sharded2"
    for name in NAMES:
        files = sorted(p.name for p in (killed / name).glob("sae*"))
        assert files == ["sae-00001-of-00002.safetensors", "sae-00002-of-00002.safetensors",
                         "sae.safetensors.index.json"], files
        a, b = sae.load(killed / name), sae.load(whole / name)
        assert (a.d_sae, a.architecture, a.metadata["hook_name"]) == (48, b.architecture, b.metadata["hook_name"])
        for key, w in b.weights().items():
            assert torch.equal(a.weights()[key], w), (name, key)
    assert json.loads((killed / "eval-sharded.json").read_text()) == json.loads((whole / "eval-sharded.json").read_text())


WIDE_RUN = """
run_name: wide
output_dir: {out}
model: {model}
hooks: [blocks.0.hook_resid_post, blocks.1.hook_mlp_out]
data: {{source: {text}, context_size: 16}}
train_tokens: 2048
eval_tokens: 128
harvest: {{contexts_per_shard: 16}}
train: {{batch_size: 128}}
distributed: {{placement: feature_sharded, saved_as: feature_shards}}
dictionaries:
  - {{name: topk, architecture: topk, k: 4, d_sae: 64, hook_name: blocks.0.hook_resid_post}}
  - {{name: relu, architecture: relu, d_sae: 64, l1_coefficient: 0.3, hook_name: blocks.1.hook_mlp_out}}
  - {{name: skip, architecture: topk, k: 4, d_sae: 64, input_hook: blocks.0.hook_resid_post,
      hook_name: blocks.1.hook_mlp_out, skip_connection: true}}
"""


def test_train_py_saves_feature_shards_and_evaluates_them_sharded_as_one_process_would(tiny_model_dir, tiny_text_file,
                                                                                        tmp_path):
    """train.py under torchrun with saved_as: feature_shards: each rank writes its features (no
    sae.safetensors anywhere), the two ranks evaluate together, and eval.json (loss recovered, KL,
    FVU, L0, frequencies) equals one process's evaluation of the whole dictionary that sae.load
    reads from the shards, on the same held-out tokens."""
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(WIDE_RUN).format(out=tmp_path / "runs", model=tiny_model_dir,
                                                       text=tiny_text_file))
    r = launch(config, script=REPO / "train.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("2 ranks each holding a shard of their features") == 1
    run_dir = tmp_path / "runs" / "wide"
    run, _ = load_run_config(config)
    model = load_model(str(tiny_model_dir), device="cpu")
    tokens = load_contexts(run.data, model.tokenizer, "heldout", run.eval_tokens)
    keep = keep_mask(tokens, model.tokenizer, run.data.exclude_tokens)
    names = ["topk", "relu", "skip"]
    assert not list(run_dir.glob("*/sae.safetensors"))
    whole = {n: sae.load(run_dir / n) for n in names}
    means = {n: read_mean(run_dir / n) for n in names}
    one = evaluate_dictionaries(model, whole, tokens, keep, train_means=means, progress=False)
    for n in names:
        sharded = json.loads((run_dir / n / "eval.json").read_text())
        assert sharded["d_sae"] == 64 and sharded["tokens_evaluated"] == one[n]["tokens_evaluated"] > 0
        for key in ("fvu", "l0", "l1", "mse", "cossim", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "dead", "dense_1e-1"):
            assert sharded[key] == pytest.approx(one[n][key], rel=1e-5, abs=1e-6), (n, key)
        # ratios of small CE differences on the tiny model (ce_mean - ce_clean ~ 0.02) amplify the
        # partial decodes' summation order: measured within 3e-4 relative
        for key in ("loss_recovered", "loss_recovered_mean_ablation", "kl_recovered"):
            assert sharded[key] == pytest.approx(one[n][key], rel=1e-3), (n, key)
        assert sharded["fvu"] < 1 and sharded["loss_recovered"] > 0.1, (n, sharded["fvu"], sharded["loss_recovered"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["name"] for row in summary["dictionaries"]] == names
    # the command line does the same from the saved folders
    before = json.loads((run_dir / "skip" / "eval.json").read_text())
    (run_dir / "skip" / "eval.json").unlink()
    r = launch("eval", "evaluate", run_dir / "skip", "--feature-sharded", "--tokens", "128", "--no-progress",
               script="-m")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((run_dir / "skip" / "eval.json").read_text())
    assert again.pop("mean_ablation_source") == "activation_mean.safetensors (training tokens)"  # the CLI says
    assert again == before
    assert r.stdout.count("loss_recovered") <= 1 and "skip" in r.stdout  # rank 0 alone prints the table


def test_a_prune_block_is_refused_with_feature_shards(tmp_path, tiny_model_dir, tiny_text_file):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(WIDE_RUN).format(out=tmp_path / "runs", model=tiny_model_dir,
                                                       text=tiny_text_file) + "prune: {dictionaries: [relu], max_frequency: [0.1]}\n")
    with pytest.raises(UserError, match="prune: kills features of whole dictionaries, and distributed.saved_as: "
                                        "feature_shards never holds one in a process"):
        load_run_config(config)


def test_feature_sharded_evaluation_needs_torchrun(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eval_main(["evaluate", str(tmp_path), "--feature-sharded"])
    assert e.value.code == 2
    assert "--feature-sharded splits each dictionary's features over the ranks of torchrun" in capsys.readouterr().err


def test_feature_shard_files_read_whole_or_by_range_and_a_missing_one_is_named(tmp_path):
    """The feature-shards layout written by hand from a whole dictionary (a JumpReLU: its threshold
    is per-feature too): sae.load gives it back exactly, any feature range reads only what it
    needs, and a missing shard file is one line naming it."""
    d = get_architecture("jumprelu")(parse_dictionary_config({"architecture": "jumprelu", "d_sae": 12}), 5)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    folder = d.save(tmp_path / "whole")
    w = d.weights()
    shard = tmp_path / "shards"
    for i, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12)]):
        tensors = {k: (t[lo:hi] if dim == 0 else t[:, lo:hi]) for k, t in w.items()
                   if (dim := d.feature_dims.get(k)) is not None}
        feature_shards.write_shard(shard, i, 3, {**tensors, **({"b_dec": w["b_dec"]} if i == 0 else {})})
    feature_shards.write_index(shard, 12, d.feature_dims, 3)
    (shard / "cfg.json").write_text((folder / "cfg.json").read_text())
    loaded = sae.load(shard)
    for k, t in w.items():
        assert torch.equal(loaded.weights()[k], t), k
    part = feature_shards.read_features(shard, lo=3, hi=9)
    assert torch.equal(part["W_enc"], w["W_enc"][:, 3:9]) and torch.equal(part["threshold"], w["threshold"][3:9])
    assert torch.equal(part["b_dec"], w["b_dec"])
    one_file = feature_shards.read_features(folder, d.feature_dims, 3, 9)
    assert all(torch.equal(one_file[k], part[k]) for k in part)
    (shard / "sae-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match="sae-00002-of-00003.safetensors: missing .one of the 3 feature shards"):
        sae.load(shard)
    d.save(shard)  # a one-file save over it replaces the shards (else the index would still be read)
    assert sorted(p.name for p in shard.glob("sae*")) == ["sae.safetensors"]
    assert all(torch.equal(sae.load(shard).weights()[k], t) for k, t in w.items())


def _save_shard(cfg, feature_index: int, folder: Path, seed: float) -> None:
    """Feature shard `feature_index` of 2 of dictionary cfg saved into folder, as that rank would."""
    shards = sharding.MeshShards(None, sharding.Layout(1, 2, 0, feature_index)).for_width(cfg.resolve_d_sae(5))
    d = sharding.build_shard(cfg, 5, shards, "d")
    with torch.no_grad():
        for p in d.parameters():
            p.fill_(seed)
    sharding.save_feature_shards(d, cfg, shards, folder, writes=True)


def test_a_resave_killed_between_shard_files_leaves_no_index_over_mixed_shards(tmp_path, monkeypatch):
    """Re-saving feature shards first drops the index: a save killed after rewriting one shard file
    leaves a folder without weights (which retrains), never the old index over old and new shards."""
    cfg = parse_dictionary_config({"architecture": "relu", "d_sae": 8})
    folder = tmp_path / "d"
    _save_shard(cfg, 1, folder, 1.0)
    _save_shard(cfg, 0, folder, 1.0)  # rank 0's save writes the index: the folder is whole
    assert feature_shards.has_weights(folder) and float(sae.load(folder).W_dec.sum()) == 8 * 5
    real_write = feature_shards.write_shard
    _save_shard(cfg, 1, folder, 2.0)  # the re-save: shard 2 rewritten...
    monkeypatch.setattr(feature_shards, "write_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # ...and killed before shard 1's
        _save_shard(cfg, 0, folder, 2.0)
    monkeypatch.setattr(feature_shards, "write_shard", real_write)
    assert not feature_shards.has_weights(folder)
    assert sorted(p.name for p in folder.glob("sae*")) == ["sae-00001-of-00002.safetensors",
                                                           "sae-00002-of-00002.safetensors"]


@pytest.mark.parametrize("text, reason", [('{"layout": "feature_shards", "d_sae": 8', "Expecting"),
                                          ('{"layout": "feature_shards", "d_sae": 8, "feature_dims": {}}', "shards: Field required"),
                                          ('[1, 2]', "the file: Input should be a valid dictionary"),
                                          ('{"layout": "feature_shards", "d_sae": 8, "feature_dims": {}, "shards": []}',
                                           "do not cover")])
def test_a_malformed_index_is_one_line_naming_it(tmp_path, text, reason):
    cfg = parse_dictionary_config({"architecture": "relu", "d_sae": 8})
    folder = tmp_path / "d"
    _save_shard(cfg, 1, folder, 1.0)
    _save_shard(cfg, 0, folder, 1.0)
    (folder / feature_shards.INDEX_FILE).write_text(text)
    with pytest.raises(UserError, match=reason) as e:
        sae.load(folder)
    assert str(e.value).startswith(str(folder / feature_shards.INDEX_FILE)) and "\n" not in str(e.value)


def test_resampling_when_only_one_shard_has_dead_features(tmp_path):
    """The shard without dead features still takes part in the resampling's collectives (it
    returned early and left the other waiting in a mismatched all-reduce: gloo aborted)."""
    r = launch("resample_one_shard", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "resampled-0.txt").read_text() == ""
    assert (tmp_path / "resampled-1.txt").read_text() == "2 5"
