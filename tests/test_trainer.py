"""The trainer: ground-truth recovery per architecture, sweeps in one pass, exact resume after
SIGKILL, divergence, outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import sae
from sae import checkpoint as ckpt
from sae.dictionaries import SparseDictionary, get_architecture, parse_dictionary_config
from sae.dictionaries.base import WHOLE_BATCH
from sae.errors import ConfigError, TrainingDiverged
from sae.io import load_tensors
from sae.loading import load_dictionary
from sae.synthetic import SyntheticFeatures, feature_recovery, fvu
from sae.trainer import IterableSource, Trainer, dictionary_names, lr_factor, train_dictionaries

REPO = Path(__file__).resolve().parents[1]


class CountingSource:
    """Wraps a batch source and counts `batches()` calls and batches drawn."""

    def __init__(self, inner):
        self.inner, self.calls, self.drawn = inner, 0, 0

    def batches(self, start_step=0):
        self.calls += 1
        for b in self.inner.batches(start_step):
            self.drawn += 1
            yield b


# ---- recovery of a known dictionary ------------------------------------------------------------
# One sweep trains every architecture from one stream (32 dims, 128 true features in
# superposition, Zipf-like frequencies + 2 features firing on 25% of tokens, ~4 active per token).
# Bars set from measurement (see the per-architecture numbers in the comments; bars leave a margin).
RECOVERY_CONFIGS = {
    "topk": {"architecture": "topk", "k": 4},
    "batchtopk": {"architecture": "batchtopk", "k": 4},
    "matryoshka": {"architecture": "matryoshka_batchtopk", "k": 4, "group_sizes": [0.125, 0.375, 0.5]},
    "relu": {"architecture": "relu", "l1_coefficient": 2.0},
    "relu_april": {"architecture": "relu", "recipe": "april2024", "l1_coefficient": 2.0, "lr": 3e-3},
    "jumprelu": {"architecture": "jumprelu", "l0_coefficient": 1.0},
    "gated": {"architecture": "gated", "l1_coefficient": 3.0},
}
# name: (min mean max-cosine, max FVU on held-out tokens); measured (2026-11-23, CPU; TopK-style
# 2026-12-01, after TopK's Adam β1 0.5, BatchTopK's β1 0 and end-of-training threshold) in comments
BARS = {
    "topk": (0.95, 0.20),  # 0.978, 0.137
    "batchtopk": (0.95, 0.20),  # 0.963, 0.102
    "matryoshka": (0.95, 0.20),  # 0.964, 0.157 (groups of 32, 96, 128)
    "relu": (0.93, 0.35),  # 0.982, 0.283
    "relu_april": (0.85, 0.40),  # 0.907, 0.262
    "jumprelu": (0.93, 0.20),  # 0.952, 0.101
    "gated": (0.93, 0.30),  # 0.940, 0.119
}
RECOVERY_TOKENS = 500_000


@pytest.fixture(scope="module")
def recovery_sweep():
    data = SyntheticFeatures(d_in=32, n_features=128, batch_size=1024, mean_active=4.0, seed=0)
    source = CountingSource(data)
    configs = [parse_dictionary_config({"name": n, "d_sae": 256, **c}) for n, c in RECOVERY_CONFIGS.items()]
    dictionaries = train_dictionaries(source, configs, total_tokens=RECOVERY_TOKENS, progress=False)
    x, _ = data.sample(8192, torch.Generator().manual_seed(12345))  # tokens training never saw
    return data, source, dictionaries, x


def test_a_sweep_is_one_pass_over_the_data(recovery_sweep):
    _, source, dictionaries, _ = recovery_sweep
    assert set(dictionaries) == set(RECOVERY_CONFIGS)
    assert source.calls == 1
    assert source.drawn == math.ceil(RECOVERY_TOKENS / 1024)


@pytest.mark.parametrize("name", list(RECOVERY_CONFIGS))
def test_each_architecture_recovers_the_true_features(recovery_sweep, name):
    data, _, dictionaries, x = recovery_sweep
    d = dictionaries[name]
    recovery = feature_recovery(data.features, d.W_dec).mean().item()
    error = fvu(d, x)
    min_recovery, max_fvu = BARS[name]
    assert recovery >= min_recovery, f"{name}: mean max cosine {recovery:.3f} < {min_recovery}"
    assert error <= max_fvu, f"{name}: FVU {error:.3f} > {max_fvu}"


# ---- sweeps from plain iterables; outputs ---------------------------------------------------------
def test_plain_iterable_sweep_writes_dictionaries_with_metadata(tmp_path):
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=256, seed=1)
    batches = [data.batch(i)[:, :] for i in range(12)]
    source = IterableSource(batches)
    configs = [parse_dictionary_config({"architecture": "relu", "d_sae": 32, "l1_coefficient": c})
               for c in (0.5, 2.0)] + [parse_dictionary_config({"architecture": "topk", "k": 3, "d_sae": 32})]
    names = dictionary_names(configs)
    assert names == ["relu-l1_coefficient=0.5", "relu-l1_coefficient=2", "topk"]
    meta = {n: {"model_name": "synthetic", "dataset": "ground truth", "context_size": 1} for n in names}
    out = train_dictionaries(source, configs, total_tokens=10 * 256, out_dir=tmp_path, metadata=meta,
                             progress=False)
    assert source.iterations == 1
    x = torch.cat(batches[10:])
    for name in names:
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        assert cfg["architecture"] in ("relu", "topk") and cfg["d_in"] == 16 and cfg["d_sae"] == 32
        assert cfg["model_name"] == "synthetic" and cfg["dataset"] == "ground truth"
        assert cfg["tokens_trained"] == 2560 and cfg["library_version"] == sae.__version__
        assert "lr" in cfg["hyperparameters"]
        assert cfg["lr_used"] == out[name].lr > 0  # the default lr is resolved per architecture
        d = out[name]
        assert float(d.input_scale) == 1.0 and not d.training
        loaded = load_dictionary(tmp_path / name)
        for k, t in d.weights().items():
            assert torch.equal(loaded.weights()[k], t)
        torch.testing.assert_close(loaded(x), d(x))
    assert not (tmp_path / ckpt.CHECKPOINT_DIR).exists()


def test_names_are_built_from_what_was_written():
    """ReLU's recipe defaults are resolved in the config, but a name says only what differs in
    what was written (as the library always named them)."""
    configs = [parse_dictionary_config({"architecture": "relu", "d_sae": 32}),
               parse_dictionary_config({"architecture": "relu", "d_sae": 32, "recipe": "april2024"})]
    assert configs[0].l1_coefficient != configs[1].l1_coefficient
    assert dictionary_names(configs) == ["relu-recipe=classic", "relu-recipe=april2024"]


def test_duplicate_names_are_refused():
    cfg = parse_dictionary_config({"architecture": "topk", "d_sae": 8, "k": 2, "name": "a"})
    with pytest.raises(ConfigError, match="unique"):
        dictionary_names([cfg, cfg])


def test_lr_schedule_warms_up_and_decays_to_zero():
    f = [lr_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[99] == pytest.approx(1 / 20)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))


def test_wandb_logs_metrics_and_frequency_histograms(monkeypatch):
    logged = []

    class FakeRun:
        def log(self, row, step=None):
            logged.append(row)

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Histogram=lambda values, num_bins: ("hist", len(values)),
                                 util=types.SimpleNamespace(generate_id=lambda: "abc"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=2)
    cfg = parse_dictionary_config({"architecture": "topk", "k": 3, "d_sae": 32, "name": "t"})
    train_dictionaries(data, [cfg], total_tokens=40 * 128, progress=False,
                       wandb={"mode": "offline", "log_every": 5, "histogram_every_tokens": 10 * 128})
    assert logged and all("t/loss" in r and "t/l0" in r and "t/dead" in r for r in logged)
    assert any("t/log10_frequency" in r for r in logged)


# ---- divergence ----------------------------------------------------------------------------------
class PoisonedSource:
    def __init__(self, data, bad_step):
        self.data, self.bad_step = data, bad_step

    def batches(self, start_step=0):
        for i, b in enumerate(self.data.batches(start_step), start=start_step):
            if i == self.bad_step:
                b = {k: v.clone().fill_(float("inf")) for k, v in b.items()}
            yield b


def test_stop_on_divergence_stops_with_training_diverged_and_keeps_the_last_checkpoints(tmp_path):
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=3)
    cfgs = [parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "good"}),
            parse_dictionary_config({"architecture": "topk", "k": 3, "d_sae": 32, "name": "t"})]
    with pytest.raises(TrainingDiverged, match=r"'good'.*step 30.*checkpoint-0000000030.pt is kept"):
        train_dictionaries(PoisonedSource(data, 30), cfgs, total_tokens=100 * 128, out_dir=tmp_path,
                           checkpoint_every_tokens=10 * 128, progress=False, log_every=20, stop_on_divergence=True)
    for name in ("good", "t"):
        kept = ckpt.latest_path(ckpt.member_dir(tmp_path, name))
        assert kept is not None and kept.name == "checkpoint-0000000030.pt"
        state = torch.load(kept, weights_only=True)
        assert state["step"] == 30 and state["name"] == name
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
        assert not (tmp_path / name / "sae.safetensors").exists()


class TwoHooks:
    """Batches of two hook points; hook "b" turns inf at step `bad_step` (only what trains on it
    can diverge)."""

    def __init__(self, bad_step: int):
        self.a = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=3)
        self.b = PoisonedSource(SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=4), bad_step)

    def batches(self, start_step=0):
        for a, b in zip(self.a.batches(start_step), self.b.batches(start_step)):
            yield {"a": a["synthetic"], "b": b["synthetic"]}


DIVERGE_SWEEP = [{"architecture": "relu", "d_sae": 32, "name": "good", "hook_name": "a"},
                 {"architecture": "topk", "k": 3, "d_sae": 32, "name": "t", "hook_name": "a"},
                 {"architecture": "relu", "d_sae": 32, "name": "boom", "hook_name": "b"}]


def _diverge_sweep(out_dir, names, checkpoint_every_tokens=15 * 128, **kwargs):
    cfgs = [parse_dictionary_config(c) for c in DIVERGE_SWEEP if c["name"] in names]
    return train_dictionaries(TwoHooks(bad_step=7), cfgs, total_tokens=40 * 128, out_dir=out_dir,
                              checkpoint_every_tokens=checkpoint_every_tokens, log_every=5,
                              histogram_every_tokens=10 * 128, **kwargs)


def test_a_diverging_dictionary_leaves_and_the_others_finish_as_without_it(tmp_path, monkeypatch, capsys):
    """`boom`'s loss becomes inf at step 7 (its activations do); the check of step 10 notices it,
    restores its weights of the check of step 5, saves them with status: diverged, says so in the
    logs, the progress bar and wandb, and trains it no more. The others end with the very weights
    of the same sweep without it. (A huge lr diverges alike: tests/test_pipeline.py.)"""
    logged, summary = [], {}
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(log=lambda row, step=None: logged.append(row),
                                                                         finish=lambda: None, summary=summary),
                                 Histogram=lambda values, num_bins: "histogram", Image=lambda path: "image",
                                 util=types.SimpleNamespace(generate_id=lambda: "abc"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = _diverge_sweep(tmp_path / "with", ["good", "t", "boom"], wandb={"mode": "offline"})
    captured = capsys.readouterr()
    without = _diverge_sweep(tmp_path / "without", ["good", "t"], progress=False)
    for name in ("good", "t"):
        for k, w in without[name].weights().items():
            assert torch.equal(out[name].weights()[k], w), f"{name}/{k}"
        assert out[name].metadata.get("status") is None
    record = json.loads((tmp_path / "with" / "boom" / "cfg.json").read_text())
    assert record["status"] == "diverged" and record["hyperparameters"]["name"] == "boom"
    assert {k: v for k, v in record["divergence"].items() if k != "loss_tail"} == \
        {"step": 7, "tokens": 7 * 128, "restored_step": 5}
    tail = record["divergence"]["loss_tail"]
    assert [step for step, _ in tail] == [5, 10] and isinstance(tail[0][1], float) and tail[1][1] in ("nan", "inf")
    assert record["tokens_trained"] == 5 * 128
    saved = load_tensors(tmp_path / "with" / "boom" / "sae.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    # its weights of step 5: those of the checkpoint of step 5 of the same dictionary trained alone
    with pytest.raises(TrainingDiverged, match="'boom'.*step 7"):
        _diverge_sweep(tmp_path / "alone", ["boom"], stop_on_divergence=True, progress=False,
                       checkpoint_every_tokens=5 * 128)
    state = torch.load(ckpt.latest_path(ckpt.member_dir(tmp_path / "alone", "boom")), weights_only=True)
    assert state["step"] == 5
    reference = get_architecture("relu")(parse_dictionary_config(DIVERGE_SWEEP[2]), 16)
    reference.load_state_dict(state["model"])
    reference.fold_input_scale()
    assert {k: torch.equal(saved[k], w) for k, w in reference.weights().items()} == dict.fromkeys(saved, True)
    assert out["boom"].metadata["status"] == "diverged"
    assert "[train] boom: diverged (loss nan in the window ending at step 10, first non-finite at step 7); its " \
           "weights of step 5 are saved with status: diverged" in captured.out, captured.out
    assert captured.out.strip().splitlines()[-1].startswith("[train] 1 of 3 dictionaries diverged: boom (step 7)")
    assert "1 diverged" in captured.err  # the progress bar's last line
    assert any(row.get("boom/diverged_at_step") == 7 for row in logged) and summary["boom/status"] == "diverged"
    assert [row["train_step"] for row in logged if "boom/loss" in row] == [5]
    assert not (tmp_path / "with" / ckpt.CHECKPOINT_DIR).exists()


def test_a_rerun_resumes_unchanged_dictionaries_and_restarts_changed_ones(tmp_path, capsys):
    """Each dictionary checkpoints on its own: a rerun with one hyperparameter of one changed
    resumes the other at its checkpoint (ending bit-identical to the first run) and trains the
    changed one from step 0 in its own pass (bit-identical to training it alone). Another batch
    size is refused before anything is written."""
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=4)
    t3 = parse_dictionary_config({"architecture": "topk", "k": 3, "d_sae": 32, "name": "t"})
    t4 = parse_dictionary_config({"architecture": "topk", "k": 4, "d_sae": 32, "name": "t"})
    r = parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "r"})
    kwargs = dict(total_tokens=20 * 128, out_dir=tmp_path, checkpoint_every_tokens=5 * 128, progress=False)
    first = train_dictionaries(data, [t3, r], keep_checkpoint=True, **kwargs)
    assert {n: ckpt.latest_path(ckpt.member_dir(tmp_path, n)).name for n in ("t", "r")} == \
        {"t": "checkpoint-0000000015.pt", "r": "checkpoint-0000000015.pt"}
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    half = SyntheticFeatures(d_in=16, n_features=32, batch_size=64, seed=4)
    with pytest.raises(ConfigError, match=r"trained on batches of 128 rows but the batches now have 64"):
        train_dictionaries(half, [t3, r], **kwargs)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    capsys.readouterr()
    source = CountingSource(data)
    second = train_dictionaries(source, [t4, r], **kwargs)
    said = capsys.readouterr().out
    assert f"[train] r: resumes at step 15 ({ckpt.member_dir(tmp_path, 'r') / 'checkpoint-0000000015.pt'})" in said
    assert "[train] t: restarts at step 0: its checkpoint" in said and "(dictionary.k: 3 -> 4)" in said
    assert source.calls == 2 and source.drawn == 5 + 20  # r from step 15, then t from 0
    for k, w in first["r"].weights().items():
        assert torch.equal(second["r"].weights()[k], w), f"r/{k}"
    alone = train_dictionaries(data, [t4], total_tokens=20 * 128, progress=False)
    for k, w in alone["t"].weights().items():
        assert torch.equal(second["t"].weights()[k], w), f"t/{k}"
    assert json.loads((tmp_path / "t" / "cfg.json").read_text())["hyperparameters"]["k"] == 4
    assert not (tmp_path / ckpt.CHECKPOINT_DIR).exists()


def test_a_checkpoint_of_the_single_file_format_is_refused(tmp_path):
    """Checkpoints of sae-dict before per-dictionary checkpoints held every dictionary in one
    file, in checkpoints/ (or checkpoints/rank-<r>/): refused, named, not touched."""
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=4)
    cfg = parse_dictionary_config({"architecture": "topk", "k": 3, "d_sae": 32, "name": "t"})
    for folder in ("checkpoints", "checkpoints/rank-001"):
        old = tmp_path / folder / "checkpoint-0000000032.pt"
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_bytes(b"written by an earlier version")
        with pytest.raises(ConfigError, match=rf"{old} is a checkpoint of an earlier sae-dict \(one file for every "
                                              rf"dictionary\), which this version cannot resume"):
            train_dictionaries(data, [cfg], total_tokens=10 * 128, out_dir=tmp_path, progress=False)
        assert old.read_bytes() == b"written by an earlier version" and not (tmp_path / "t").exists()
        old.unlink()


# ---- resume after SIGKILL --------------------------------------------------------------------------
RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from sae.dictionaries import parse_dictionary_config
    from sae.synthetic import SyntheticFeatures
    from sae.trainer import train_dictionaries

    out_dir, die_at, members = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class Source:
        def __init__(self):
            self.data = SyntheticFeatures(d_in=16, n_features=48, batch_size=128, seed=5)
        def batches(self, start_step=0):
            for i, b in enumerate(self.data.batches(start_step), start=start_step):
                if i == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield b

    common = {"d_sae": 64, "dead_after_tokens": 1000, "lr_warmup_fraction": 0.1}
    configs = [parse_dictionary_config({**common, **c}) for c in [
        {"name": "topk", "architecture": "topk", "k": 3, "aux_k": 8},
        {"name": "batchtopk", "architecture": "batchtopk", "k": 3},
        {"name": "relu", "architecture": "relu", "resample_every_tokens": 2560, "l1_coefficient": 3.0},
        {"name": "april", "architecture": "relu", "recipe": "april2024", "lr": 1e-3},
        {"name": "jumprelu", "architecture": "jumprelu"},
        {"name": "gated", "architecture": "gated"},
        {"name": "topk5", "architecture": "topk", "k": 5},
    ] if c["name"] in members.split(",")]
    train_dictionaries(Source(), configs, total_tokens=90 * 128, out_dir=out_dir,
                       checkpoint_every_tokens=16 * 128, progress=False,
                       metadata={c.name: {"model_name": "synthetic"} for c in configs})
""")
ALL = ["topk", "batchtopk", "relu", "april", "jumprelu", "gated", "topk5"]


def _run(script: Path, out_dir: Path, die_at: int, members: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(out_dir), str(die_at), ",".join(members)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_killed_sweep_rerun_with_a_dictionary_removed_and_one_added_resumes_bit_identically(tmp_path):
    """A sweep of six is SIGKILLed at step 41 (after the checkpoints of step 32); rerun without
    `topk`, with `topk5` added, and SIGKILLed again at step 70; then rerun to the end. The five
    kept end bit-identical to an uninterrupted run, the added one trains from step 0 in its own
    pass and ends as it does in the uninterrupted run, and the removed one's checkpoint is kept."""
    script = tmp_path / "train_script.py"
    script.write_text(RESUME_SCRIPT)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = _run(script, straight, -1, ALL)
    assert r.returncode == 0, r.stderr
    first, rest = ALL[:6], ALL[1:]
    r = _run(script, killed, 41, first)
    assert r.returncode == -signal.SIGKILL
    assert {ckpt.latest_path(ckpt.member_dir(killed, n)).name for n in first} == {"checkpoint-0000000032.pt"}
    r = _run(script, killed, 70, rest)
    assert r.returncode == -signal.SIGKILL
    assert all(f"[train] {n}: resumes at step 32" in r.stdout for n in ALL[1:6]), r.stdout
    assert {ckpt.latest_path(ckpt.member_dir(killed, n)).name for n in ALL[1:6]} == {"checkpoint-0000000064.pt"}
    assert ckpt.latest_path(ckpt.member_dir(killed, "topk5")) is None  # its pass was to come
    r = _run(script, killed, -1, rest)
    assert r.returncode == 0, r.stderr
    assert "[train] topk5: new, starts at step 0" in r.stdout
    assert "[train] kept the checkpoints of topk (not in this run)" in r.stdout
    names = sorted(p.name for p in killed.iterdir() if p.is_dir() and p.name != ckpt.CHECKPOINT_DIR)
    assert names == sorted(rest)
    for name in names:
        a, b = load_tensors(straight / name / "sae.safetensors"), load_tensors(killed / name / "sae.safetensors")
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}/{k} differs after resume"
        assert (straight / name / "cfg.json").read_text() == (killed / name / "cfg.json").read_text()
    assert ckpt.members_with_checkpoints(killed) == ["topk"]


def test_trainer_checks_d_in(tmp_path):
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=64, seed=6)
    cfg = parse_dictionary_config({"architecture": "topk", "k": 3, "d_sae": 32})
    with pytest.raises(ConfigError, match="d_in is 8"):
        Trainer([cfg], total_tokens=640, d_in=8, progress=False).fit(data)


@pytest.mark.parametrize("min_frequency", [None, 0.3])
def test_resampling_low_frequency_features_reinitialises_exactly_those(monkeypatch, min_frequency):
    """resample_min_frequency (the dual of pruning high-frequency features): at a resampling, the
    features that fired on fewer than that fraction of the period's tokens are re-initialised, and
    no others but the dead ones (silent for resample_dead_tokens = half the period by default)."""
    d_in, d_sae, B, P = 8, 48, 64, 4  # P batches per resampling period
    g = torch.Generator().manual_seed(0)
    offset = 2.0 * torch.randn(d_in, generator=g)  # spreads the features' firing rates over (0, 1)
    batches = [offset + torch.randn(B, d_in, generator=g) for _ in range(P + 2)]
    cfg = {"architecture": "relu", "d_sae": d_sae, "lr": 1e-12, "grad_clip": None, "seed": 3,
           "normalize_activations": False, "b_dec_init": "zeros", "resample_every_tokens": P * B}
    if min_frequency is not None:
        cfg["resample_min_frequency"] = min_frequency
    seen = {}
    original = SparseDictionary.resample

    def spy(self, x, dead_mask, generator=None, shards=WHOLE_BATCH):
        with torch.no_grad():  # the period's frequencies, measured independently of the tracker
            fired = torch.stack([(self.encode(b) > 0).double().mean(0) for b in batches[:P]])
        seen["freq"], seen["dead"] = fired.mean(0), fired[P // 2:].sum(0) == 0
        seen["W_dec"] = self.W_dec.detach().clone()
        seen["mask"] = dead_mask.clone()
        return original(self, x, dead_mask, generator, shards)

    monkeypatch.setattr(SparseDictionary, "resample", spy)
    out = train_dictionaries(IterableSource(batches), [parse_dictionary_config(cfg)],
                             total_tokens=(P + 2) * B, progress=False)
    d = next(iter(out.values()))
    freq = seen["freq"]
    expected = seen["dead"] if min_frequency is None else seen["dead"] | (freq < min_frequency)
    assert 0 < int(expected.sum()) < d_sae
    if min_frequency is not None:
        assert int((freq < min_frequency).sum()) > int(seen["dead"].sum())  # more than the dead ones
    assert torch.equal(seen["mask"], expected)
    changed = (d.W_dec.detach() - seen["W_dec"]).abs().amax(dim=1) > 1e-6
    assert torch.equal(changed, expected)
    assert d.metadata["features_resampled"] == int(expected.sum())


def test_a_checkpoint_from_before_a_new_config_field_resumes_while_that_field_is_at_its_default(tmp_path, capsys):
    """A checkpoint written by an earlier version lacks the config fields added since: at their
    defaults they change nothing it was trained with (it resumes); set otherwise, it restarts."""
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=4)
    r = parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "r"})
    kwargs = dict(total_tokens=20 * 128, out_dir=tmp_path, checkpoint_every_tokens=5 * 128, progress=False)
    train_dictionaries(data, [r], keep_checkpoint=True, **kwargs)
    path = ckpt.latest_path(ckpt.member_dir(tmp_path, "r"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["fingerprint"]["dictionary"]["skip_adam_betas"]  # as an earlier version wrote it
    torch.save(state, path)
    capsys.readouterr()
    train_dictionaries(data, [r], keep_checkpoint=True, **kwargs)
    assert "[train] r: resumes at step 15" in capsys.readouterr().out
    other = parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "r", "skip_adam_betas": [0.5, 0.9]})
    train_dictionaries(data, [other], **kwargs)
    assert "r: restarts at step 0" in capsys.readouterr().out


def test_a_checkpoint_from_before_jumprelu_and_gated_defaults_changed_resumes_with_the_old_values_written(
        tmp_path, capsys):
    """JumpReLU's threshold_init and normalize_decoder and Gated's b_gate_init changed defaults. A
    JumpReLU checkpoint holds the values it was trained at (0.1, true: the fields existed); a Gated
    one from before b_gate_init lacks it (trained at 0). Both resume when a config writes those old
    values, and restart under another value or the new defaults."""
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=4)
    old = {"j": {"architecture": "jumprelu", "threshold_init": 0.1, "normalize_decoder": True},
           "g": {"architecture": "gated", "b_gate_init": 0.0}}
    configs = [parse_dictionary_config({"d_sae": 32, "name": n, **c}) for n, c in old.items()]
    kwargs = dict(total_tokens=20 * 128, out_dir=tmp_path, checkpoint_every_tokens=5 * 128, progress=False,
                  keep_checkpoint=True)
    train_dictionaries(data, configs, **kwargs)
    for name, written in old.items():
        path = ckpt.latest_path(ckpt.member_dir(tmp_path, name))
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["fingerprint"]["dictionary"]["threshold_init" if name == "j" else "b_gate_init"] is not None
        if name == "g":  # as a version before b_gate_init wrote it
            del state["fingerprint"]["dictionary"]["b_gate_init"]
        torch.save(state, path)
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy")
    capsys.readouterr()
    train_dictionaries(data, configs, **kwargs)
    out = capsys.readouterr().out
    assert "[train] j: resumes at step 15" in out and "[train] g: resumes at step 15" in out
    other = parse_dictionary_config({"architecture": "gated", "d_sae": 32, "name": "g", "b_gate_init": -0.5})
    train_dictionaries(data, [other], **kwargs)
    assert "g: restarts at step 0" in capsys.readouterr().out
    # the new defaults (left out of the config) are not what those checkpoints were trained with
    defaults = [parse_dictionary_config({"d_sae": 32, "name": n, "architecture": c["architecture"]})
                for n, c in old.items()]
    train_dictionaries(data, defaults, **{**kwargs, "out_dir": tmp_path.parent / f"{tmp_path.name}-copy"})
    out = capsys.readouterr().out
    assert "j: restarts at step 0" in out and "g: restarts at step 0" in out


def test_relu_b_enc_learns_at_the_weights_lr_times_root_d_in(tmp_path):
    """ReLU's b_enc has its own Adam group at √d_in times the weights' lr (with normalised inputs,
    through the lr schedule); raw inputs and other architectures keep one lr; cfg.json says which."""
    from sae.trainer import Trainer

    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=4)
    configs = [parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "relu"}),
               parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "raw",
                                        "normalize_activations": False}),
               parse_dictionary_config({"architecture": "topk", "k": 4, "d_sae": 32, "name": "topk"})]
    seen = {}
    trainer = Trainer(configs, total_tokens=10 * 128, out_dir=tmp_path, progress=False)
    original = trainer._train_step

    def spy(batch):
        original(batch)
        seen[trainer.step] = {s.name: [g["lr"] for g in s.optimizer.param_groups] for s in trainer.slots}

    trainer._train_step = spy
    trainer.fit(data)
    weights_lr, b_enc_lr = seen[10]["relu"]  # the last step: inside the lr decay of the last fifth
    assert weights_lr < seen[1]["relu"][0] and b_enc_lr == pytest.approx(4.0 * weights_lr)
    assert len(seen[10]["raw"]) == 1 and len(seen[10]["topk"]) == 1
    used = {n: json.loads((tmp_path / n / "cfg.json").read_text())["b_enc_lr_scale_used"] for n in ("relu", "raw")}
    assert used == {"relu": 4.0, "raw": 1.0}


def test_a_relu_checkpoint_from_before_b_enc_had_its_own_lr(tmp_path, capsys):
    """Such a checkpoint (one Adam group, no b_enc_lr_scale in its fingerprint) restarts under the
    default with a line saying how to resume it, and resumes with b_enc_lr_scale: 1."""
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=128, seed=4)
    old = parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "r", "b_enc_lr_scale": 1.0})
    kwargs = dict(total_tokens=20 * 128, checkpoint_every_tokens=5 * 128, progress=False, keep_checkpoint=True)
    train_dictionaries(data, [old], out_dir=tmp_path / "a", **kwargs)
    path = ckpt.latest_path(ckpt.member_dir(tmp_path / "a", "r"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["fingerprint"]["dictionary"]["b_enc_lr_scale"]  # as an earlier version wrote it
    torch.save(state, path)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    train_dictionaries(data, [parse_dictionary_config({"architecture": "relu", "d_sae": 32, "name": "r"})],
                       out_dir=tmp_path / "a", **kwargs)
    assert ("r: restarts at step 0: its checkpoint" in (out := capsys.readouterr().out)
            and "1 Adam parameter group(s) -> 2; `b_enc_lr_scale: 1` resumes a checkpoint from before" in out)
    train_dictionaries(data, [old], out_dir=tmp_path / "b", **kwargs)
    assert "[train] r: resumes at step 15" in capsys.readouterr().out
