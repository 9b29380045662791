"""Transcoders (input_hook: read one hook, predict another) and skip connections (W_skip), for
every architecture: ground-truth recovery, raw-to-raw saving, splicing and the evaluator on the
tiny model, exact resume after a kill, and the one-line refusals of train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sae
from eval.evaluate import evaluate_dictionaries
from sae.dictionaries import get_architecture, parse_dictionary_config
from sae.models import load_model
from sae.synthetic import SyntheticTranscoding, feature_recovery
from sae.trainer import train_dictionaries
from test_splice import _ce, data, model  # noqa: F401 (the tiny model and its tokens: fixtures)

REPO = Path(__file__).resolve().parents[1]
IN_HOOK, OUT_HOOK = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
ARCHITECTURES = {"relu": {}, "topk": {"k": 4}, "batchtopk": {"k": 4}, "jumprelu": {}, "gated": {},
                 "matryoshka_batchtopk": {"k": 4, "group_sizes": [0.25, 0.75]}}


def _transcoder(arch: str, d_in: int, d_out: int, d_sae: int = 64, seed: int = 0, skip: bool = False,
                input_hook: str = IN_HOOK, hook_name: str = OUT_HOOK, **extra):
    cls = get_architecture(arch)
    cfg = cls.Config(architecture=arch, d_sae=d_sae, seed=seed, input_hook=input_hook, hook_name=hook_name,
                     skip_connection=skip, **{**ARCHITECTURES[arch], **extra})
    return cls(cfg, d_in, metadata={"hook_name": hook_name, "model_name": "tiny", "context_size": 16}, d_out=d_out)


def _randomise(d, seed: int = 0):
    """Every tensor random (and the scales and the input centre away from their defaults), so that
    each of them matters."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, t in d.weights().items():
            if name in ("W_enc", "W_dec", "W_skip"):
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[0] ** 0.5)
            elif name == "threshold":
                t.copy_(0.3 * torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
        d.input_scale.fill_(2.5)
        d.output_scale.fill_(0.4)
        d.b_in.copy_(0.3 * torch.randn(d.d_in, generator=g))
    return d.eval()


# ---- ground truth ------------------------------------------------------------------------------
# x_in and x_out come from the same sparse codes (32 features, ~3 active per token) through two
# different known dictionaries (48 and 24 dims); measured (2026-12-01, CPU, 300k tokens) in comments.
def _codes_recovery(d, data: SyntheticTranscoding) -> float:
    """Mean over the true features of the best correlation of any latent's activation with the
    feature's true code (the transcoder reads the input dictionary's features off x_in)."""
    x_feat, codes = data.codes.sample(8192, torch.Generator().manual_seed(7))
    x_in = torch.cat([x_feat, torch.zeros(len(x_feat), data.n_dense)], dim=1)
    with torch.no_grad():
        f = d.encode(x_in)
    c = (codes - codes.mean(0)) / codes.std(0).clamp_min(1e-9)
    a = (f - f.mean(0)) / f.std(0).clamp_min(1e-9)
    return float((c.T @ a / len(c)).max(dim=1).values.mean())


@pytest.fixture(scope="module")
def recovered():
    plain = SyntheticTranscoding(48, 24, 32, batch_size=1024, mean_active=3, seed=0)
    skip = SyntheticTranscoding(56, 24, 32, n_dense=8, batch_size=1024, mean_active=3, seed=0)
    common = {"d_sae": 64, "hook_name": "out", "input_hook": "in"}
    cfgs = [parse_dictionary_config({**common, "name": "topk", "architecture": "topk", "k": 4}),
            parse_dictionary_config({**common, "name": "jumprelu", "architecture": "jumprelu", "l0_coefficient": 1.0})]
    skip_cfgs = [parse_dictionary_config({**common, "name": "skip", "architecture": "topk", "k": 4,
                                          "skip_connection": True}),
                 parse_dictionary_config({**common, "name": "no_skip", "architecture": "topk", "k": 4})]
    out = train_dictionaries(plain, cfgs, total_tokens=300_000, progress=False)
    out.update(train_dictionaries(skip, skip_cfgs, total_tokens=300_000, progress=False))
    return plain, skip, out


@pytest.mark.parametrize("name", ["topk", "jumprelu"])
def test_a_transcoder_recovers_the_output_dictionary_and_reads_the_input_features(recovered, name):
    plain, _, out = recovered
    d = out[name]
    x_in, x_out = plain.sample(8192, torch.Generator().manual_seed(12345))
    with torch.no_grad():
        fvu = float((x_out - d(x_in)).pow(2).sum() / (x_out - x_out.mean(0)).pow(2).sum())
    assert feature_recovery(plain.features_out, d.W_dec).mean() >= 0.95  # topk 0.991, jumprelu 1.000
    assert _codes_recovery(d, plain) >= 0.9  # topk 0.970, jumprelu 0.981
    assert fvu <= 0.1  # topk 0.036, jumprelu 0.014


def _fvu(d, data) -> float:
    x_in, x_out = data.sample(8192, torch.Generator().manual_seed(12345))
    with torch.no_grad():
        return float((x_out - d(x_in)).pow(2).sum() / (x_out - x_out.mean(0)).pow(2).sum())


def test_a_skip_transcoder_recovers_the_linear_map(recovered):
    """The dense inputs reach the output through `linear` only: the skip path carries exactly that,
    and removes the error a plain transcoder of the same width and k leaves. (Its decoder rows are
    not F_out: with 32 features in 48 dimensions the codes are a linear function of x_in, so the
    skip path may take the feature part too.)"""
    _, data, out = recovered
    d = out["skip"]
    err = (d.W_skip[-data.n_dense:].detach() - data.linear).norm() / data.linear.norm()
    assert err <= 0.05  # 0.0003
    assert _fvu(d, data) <= 0.3 * _fvu(out["no_skip"], data)  # 3e-5 against 0.203


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_trains_as_a_skip_transcoder(arch):
    """A few steps of each architecture as a skip transcoder: its loss falls and W_skip moves."""
    data = SyntheticTranscoding(24, 16, 32, n_dense=4, batch_size=256, seed=1)
    cfg = parse_dictionary_config({"architecture": arch, "d_sae": 64, "hook_name": "out", "input_hook": "in",
                                   "skip_connection": True, "name": "t", **ARCHITECTURES[arch]})
    d = train_dictionaries(data, [cfg], total_tokens=30 * 256, progress=False)["t"]
    x_in, x_out = data.sample(2048, torch.Generator().manual_seed(3))
    with torch.no_grad():
        fvu = float((x_out - d(x_in)).pow(2).sum() / (x_out - x_out.mean(0)).pow(2).sum())
    assert d.W_skip.abs().sum() > 0 and d.d_out == 16 and d.d_in == 24
    assert fvu < 0.9, f"{arch}: FVU {fvu:.3f}"


# ---- saving: raw activations in, raw activations out ------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("skip", [False, True])
def test_a_saved_transcoder_maps_raw_to_raw(tmp_path, arch, skip):
    """Both scales and the input centre are folded into the weights at save: the loaded transcoder
    (scales 1) predicts what the one in training units did, from the same raw inputs."""
    d = _randomise(_transcoder(arch, 32, 20, skip=skip))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        expected, f = d(x), d.encode(x)
    d.save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert cfg["d_out"] == 20 and cfg["hyperparameters"]["input_hook"] == IN_HOOK
    loaded = sae.load(tmp_path / "t")
    assert float(loaded.input_scale) == 1.0 and float(loaded.output_scale) == 1.0 and not loaded.b_in.any()
    assert (loaded.W_skip is not None) == skip and loaded.cfg.input_hook == IN_HOOK
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x), f, rtol=1e-4, atol=1e-5)


def test_an_autoencoder_with_a_skip_connection_saves_and_loads(tmp_path):
    cls = get_architecture("topk")
    d = cls(cls.Config(d_sae=64, k=4, skip_connection=True), 32)
    _randomise_autoencoder = torch.Generator().manual_seed(5)
    with torch.no_grad():
        d.W_skip.copy_(torch.randn(32, 32, generator=_randomise_autoencoder) * 0.1)
        d.input_scale.fill_(2.0)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = d(x)
    d.save(tmp_path / "s")
    assert "d_out" not in json.loads((tmp_path / "s" / "cfg.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(sae.load(tmp_path / "s")(x), expected, rtol=1e-4, atol=1e-5)


def test_pruning_a_transcoder_keeps_its_output_side(tmp_path):
    d = _randomise(_transcoder("matryoshka_batchtopk", 32, 20, skip=True))
    keep = torch.tensor([0, 3, 5, 17, 20, 40, 63])
    p = d.pruned(keep)
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        d.set_killed(~torch.isin(torch.arange(64), keep))
        torch.testing.assert_close(p(x), d(x), rtol=1e-5, atol=1e-6)
    assert p.d_out == 20 and p.cfg.group_sizes == [3, 4]  # ids < 16, ids >= 16


# ---- the tiny model: splicing and the evaluator ------------------------------------------------
@pytest.mark.parametrize("full", [False, True])
def test_a_spliced_transcoder_gives_the_evaluators_ce_sae(tmp_path, model, data, full):
    """sae.splice replaces the output hook with the transcoder's prediction from the input hook of
    the same forward: its CE is the evaluator's ce_sae (running on from the output hook, or full
    forwards), and eval.json names both hooks; the reconstruction metrics compare with x_out."""
    tokens, keep = data
    _randomise(_transcoder("topk", 32, 32, skip=True)).save(tmp_path / "t")
    d = sae.load(tmp_path / "t")
    r = evaluate_dictionaries(model, {"t": d}, tokens, keep, train_means={OUT_HOOK: torch.zeros(32)},
                              batch_size=3, progress=False, full_forwards=full)["t"]
    with torch.no_grad(), sae.splice(model, d, mask=keep) as s:
        logits = model(tokens, return_type="logits")
    assert _ce(logits, tokens, keep) == pytest.approx(r["ce_sae"], rel=1e-5)
    assert r["ce_sae"] != pytest.approx(r["ce_clean"], rel=1e-3)
    assert r["hook"] == OUT_HOOK and r["input_hook"] == IN_HOOK
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[IN_HOOK, OUT_HOOK])
        x_in, x_out = cache[IN_HOOK][keep], cache[OUT_HOOK][keep]
        mse = float((d(x_in) - x_out).pow(2).mean())  # METRICS.md: per element
    assert r["mse"] == pytest.approx(mse, rel=1e-4)
    assert s.f.shape == (*tokens.shape, 64)
    feats = sae.feature_activations(model, d, tokens, keep_error=True)
    torch.testing.assert_close(feats.f, d.encode(cache[IN_HOOK]), rtol=1e-5, atol=1e-6)


def test_a_transcoder_that_reproduces_its_output_hook_recovers_all_the_loss(model, data):
    """An exact construction: a ReLU transcoder reading the MLP output (the earlier hook of the
    forward is the same hook point here) and writing it back through a perfect dictionary,
    x = ReLU(x) - ReLU(-x): loss_recovered is 1 on both baselines."""
    tokens, keep = data
    d = _transcoder("relu", 32, 32, input_hook=OUT_HOOK, hook_name=OUT_HOOK)
    eye = torch.eye(32)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        d.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        d.b_enc.zero_()
        d.b_dec.zero_()
    r = evaluate_dictionaries(model, {"t": d.eval()}, tokens, keep, train_means={OUT_HOOK: torch.zeros(32)},
                              batch_size=6, progress=False)["t"]
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert r["loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=1e-5)
    assert r["fvu"] == pytest.approx(0.0, abs=1e-10)


# ---- resume after a kill -----------------------------------------------------------------------
RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from sae.dictionaries import parse_dictionary_config
    from sae.synthetic import SyntheticTranscoding
    from sae.trainer import train_dictionaries

    out_dir, die_at = sys.argv[1], int(sys.argv[2])

    class Source:
        def __init__(self):
            self.data = SyntheticTranscoding(20, 12, 48, n_dense=4, batch_size=128, seed=5)
        def batches(self, start_step=0):
            for i, b in enumerate(self.data.batches(start_step), start=start_step):
                if i == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield b

    common = {"d_sae": 64, "dead_after_tokens": 1000, "hook_name": "out", "input_hook": "in"}
    configs = [parse_dictionary_config({**common, **c}) for c in [
        {"name": "tc", "architecture": "topk", "k": 3, "aux_k": 8},
        {"name": "skip", "architecture": "batchtopk", "k": 3, "skip_connection": True},
        {"name": "relu", "architecture": "relu", "resample_every_tokens": 2560, "l1_coefficient": 3.0},
    ]]
    train_dictionaries(Source(), configs, total_tokens=60 * 128, out_dir=out_dir,
                       checkpoint_every_tokens=16 * 128, progress=False)
""")


def _run(script: Path, out_dir: Path, die_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(out_dir), str(die_at)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_transcoders_killed_mid_run_resume_bit_identically(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(RESUME_SCRIPT)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(script, straight, -1).returncode == 0
    r = _run(script, killed, 41)
    assert r.returncode == -signal.SIGKILL
    r = _run(script, killed, -1)
    assert r.returncode == 0, r.stderr
    assert "[train] tc: resumes at step 32" in r.stdout
    for name in ("tc", "skip", "relu"):
        a, b = sae.load(straight / name), sae.load(killed / name)
        for key, w in a.weights().items():
            assert torch.equal(w, b.weights()[key]), f"{name}.{key}"


# ---- train.py: a transcoder end to end, and its refusals ---------------------------------------
RUN = """
run_name: tc
output_dir: {out}
model: {model}
hooks: [{in_hook}, {out_hook}]
data: {{source: {text}, context_size: 16}}
train_tokens: 2048
eval_tokens: 256
harvest: {{contexts_per_shard: 64}}
train: {{batch_size: 256}}
dictionaries:
  - {{name: tc, architecture: topk, k: 4, d_sae: 64, input_hook: {in_hook}, hook_name: {out_hook}}}
  - {{name: skip, architecture: topk, k: 4, d_sae: 64, input_hook: {in_hook}, hook_name: {out_hook},
      skip_connection: true}}
"""


def _write(tmp_path, tiny_model_dir, tiny_text_file, in_hook=IN_HOOK) -> Path:
    path = tmp_path / "tc.yaml"
    path.write_text(textwrap.dedent(RUN).format(out=tmp_path / "runs", model=tiny_model_dir, text=tiny_text_file,
                                                in_hook=in_hook, out_hook=OUT_HOOK))
    return path


def test_train_py_trains_and_evaluates_transcoders_from_one_harvest(tmp_path, tiny_model_dir, tiny_text_file):
    path = _write(tmp_path, tiny_model_dir, tiny_text_file)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tc"
    for name in ("tc", "skip"):
        metrics = json.loads((run / name / "eval.json").read_text())
        assert metrics["hook"] == OUT_HOOK and metrics["input_hook"] == IN_HOOK
        assert 0 <= metrics["fvu"] < 1.0 and metrics["l0"] <= 4
        cfg = json.loads((run / name / "cfg.json").read_text())
        assert cfg["input_hook"] == IN_HOOK and cfg["hook_name"] == OUT_HOOK


def test_train_py_refuses_an_input_hook_the_model_lacks_in_one_line(tmp_path, tiny_model_dir, tiny_text_file):
    path = _write(tmp_path, tiny_model_dir, tiny_text_file, in_hook="blocks.0.ln2.hook_normalised")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and "blocks.0.ln2.hook_normalised" in lines[0], proc.stderr
    assert "blocks.0.ln2.hook_normalized" in lines[0]  # the close name is suggested
    assert not (tmp_path / "runs" / "tc" / "cache").exists()


def test_an_input_hook_missing_from_hooks_is_one_line(tmp_path, tiny_model_dir, tiny_text_file):
    path = _write(tmp_path, tiny_model_dir, tiny_text_file)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), f"hooks=[{OUT_HOOK}]"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"train.py: error: dictionaries[0].input_hook: '{IN_HOOK}' is not in hooks "
                                   f"['{OUT_HOOK}']; list it in hooks (the harvest captures every hook there in "
                                   f"one pass)")


def test_an_input_hook_after_the_output_hook_is_one_line_before_any_work(tmp_path, tiny_model_dir, tiny_text_file):
    """Reading a later hook than the one written cannot be spliced into one forward: refused."""
    path = tmp_path / "late.yaml"
    path.write_text(textwrap.dedent(RUN).format(out=tmp_path / "runs", model=tiny_model_dir, text=tiny_text_file,
                                                in_hook="blocks.1.hook_resid_post", out_hook=OUT_HOOK))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"train.py: error: tc: input_hook 'blocks.1.hook_resid_post' comes after hook_name '{OUT_HOOK}' in the "
        f"forward; a transcoder reads an earlier hook than the one it writes")
    assert not (tmp_path / "runs" / "tc" / "cache").exists()


# ---- eval prune / ablate-frequency / features on a Matryoshka skip transcoder --------------------
def test_eval_prune_ablate_and_features_on_a_matryoshka_skip_transcoder(tmp_path, tiny_model_dir, tiny_text_file,
                                                                        capsys):
    """The kill frequencies are of the features read off the input hook, the pruned transcoder keeps
    its groups and its output side, ablate-frequency kills the same features, and the features page
    scans the input hook (its logit lens uses the decoder rows: the output side)."""
    from eval.__main__ import main

    src = tmp_path / "t"
    d = _randomise(_transcoder("matryoshka_batchtopk", 32, 32, d_sae=96, skip=True, k=8, group_sizes=[16, 32, 48]))
    with torch.no_grad():
        d.threshold.fill_(2.0)  # features fire on 13-30 % of the tokens (10th-90th percentile)
    d.metadata.update({"model_name": str(tiny_model_dir), "context_size": 16,
                       "dataset": {"source": str(tiny_text_file), "context_size": 16, "heldout_fraction": 0.3}})
    d.save(src)
    common = ["--tokens", "256", "--batch-size", "6", "--device", "cpu", "--no-progress", "--mean-tokens", "256",
              "--frequency-tokens", "1024"]
    main(["prune", str(src), "--max-frequency", "0.3", "--out", str(tmp_path / "pruned"), *common])
    capsys.readouterr()
    cfg = json.loads((tmp_path / "pruned" / "cfg.json").read_text())
    killed = torch.zeros(96, dtype=torch.bool)
    killed[cfg["pruning"]["killed_feature_ids"]] = True
    assert 0 < int(killed.sum()) < 96
    survivors = [int((~killed[a:b]).sum()) for a, b in ((0, 16), (16, 48), (48, 96))]
    assert cfg["hyperparameters"]["group_sizes"] == [n for n in survivors if n]
    pruned = sae.load(tmp_path / "pruned")
    assert pruned.is_transcoder and pruned.W_skip is not None and pruned.cfg.input_hook == IN_HOOK
    metrics = json.loads((tmp_path / "pruned" / "eval.json").read_text())
    assert metrics["input_hook"] == IN_HOOK and metrics["hook"] == OUT_HOOK and metrics["d_sae"] == sum(survivors)

    main(["ablate-frequency", str(src), "--thresholds", "0.5,0.3", *common])
    rows = {r["threshold"]: r for r in json.loads((src / "ablation.json").read_text())["thresholds"]}
    assert rows[0.3]["killed"] == int(killed.sum())  # the same features as the pruned transcoder's

    main(["features", str(src), "--features", "0,1,2", "--tokens", "128", "--device", "cpu"])
    page = json.loads((src / "features" / "features.json").read_text())
    assert page["input_hook"] == IN_HOOK and page["hook"] == OUT_HOOK
    saved = sae.load(src)
    with torch.no_grad():
        lens = saved.W_dec[0] @ load_model(str(tiny_model_dir)).W_U  # the output side, in raw units
    assert page["features"][0]["id"] == 0
    assert page["features"][0]["promoted"][0][1] == pytest.approx(float(lens.max()), rel=1e-3)


# ---- sparsify's format -----------------------------------------------------------------------------
@pytest.mark.parametrize("transcode,skip", [(True, True), (True, False), (False, True)])
def test_a_sparsify_transcoder_or_skip_folder_loads_with_its_outputs(tmp_path, transcode, skip):
    """sparsify's SparseCoder, written from its source: the encoder reads x (centred on b_dec only
    when not transcoding), f = TopK(ReLU(x Wᵀ + b)), x̂ = f W_dec + b_dec (+ x W_skipᵀ)."""
    g = torch.Generator().manual_seed(5)
    w = {"encoder.weight": torch.randn(64, 32, generator=g) / 5, "encoder.bias": torch.randn(64, generator=g) / 5,
         "W_dec": torch.randn(64, 32, generator=g) / 5, "b_dec": torch.randn(32, generator=g)}
    if skip:
        w["W_skip"] = torch.randn(32, 32, generator=g) / 10
    folder = tmp_path / "run" / "layers.3.mlp"
    folder.mkdir(parents=True)
    sae.io.save_tensors(folder / "sae.safetensors", w)
    (folder / "cfg.json").write_text(json.dumps(
        {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 64, "k": 7,
         "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": 32}))
    d = sae.load(folder)
    assert d.is_transcoder == transcode and (d.W_skip is not None) == skip
    assert d.cfg.hook_name == OUT_HOOK.replace("0", "3")
    if transcode:
        assert d.cfg.input_hook == "blocks.3.ln2.hook_normalized"
    x = torch.randn(40, 32, generator=g) * 2
    post = torch.nn.functional.relu(torch.nn.functional.linear(x if transcode else x - w["b_dec"],
                                                               w["encoder.weight"], w["encoder.bias"]))
    top = post.topk(7, dim=-1)
    f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    y = f @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].mT if skip else 0)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d(x), y, rtol=1e-5, atol=1e-5)


def test_convert_a_skip_transcoder_to_sparsify_and_back(tmp_path, capsys):
    from sae.convert import main as convert_main

    d = _randomise(_transcoder("topk", 32, 32, skip=True))
    d.save(tmp_path / "ours")
    convert_main([str(tmp_path / "ours"), str(tmp_path / "sp"), "--to", "sparsify"])  # checked by load-back
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["skip_connection"] is True and cfg["k"] == 4
    back = sae.load(tmp_path / "sp")
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(back(x), d(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,d_out,expected", [
    ("relu", 32, "sparsify's format holds topk dictionaries only, not relu"),
    ("topk", 20, "d_in = d_out), not d_in=32, d_out=20"),
])
def test_sparsify_export_refuses_what_it_cannot_express_in_one_line(tmp_path, capsys, arch, d_out, expected):
    from sae.convert import main as convert_main

    _randomise(_transcoder(arch, 32, d_out)).save(tmp_path / "ours")
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "ours"), str(tmp_path / "sp"), "--to", "sparsify"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err
    assert not (tmp_path / "sp").exists()


# ---- SAELens 6's transcoders -----------------------------------------------------------------------
def _saelens_transcoder_forward(w: dict, arch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sae_lens.saes.transcoder, written from its source: the input is not centred;
    transcoder / skip_transcoder: f = ReLU(x W_enc + b_enc); jumprelu_transcoder: ReLU(pre)·1[pre > θ];
    x̂ = f W_dec + b_dec (+ x W_skipᵀ)."""
    pre = x @ w["W_enc"] + w["b_enc"]
    f = torch.relu(pre)
    if arch == "jumprelu_transcoder":
        f = f * (pre > w["threshold"])
    y = f @ w["W_dec"] + w["b_dec"]
    return f, y + x @ w["W_skip"].T if "W_skip" in w else y


@pytest.mark.parametrize("arch,skip,expected", [("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
                                                ("jumprelu", False, "jumprelu_transcoder"),
                                                ("batchtopk", False, "jumprelu_transcoder"),
                                                ("matryoshka_batchtopk", False, "jumprelu_transcoder")])
def test_saelens_export_of_transcoders_is_what_saelens_computes_and_loads_back(tmp_path, capsys, arch, skip, expected):
    from sae.convert import main as convert_main

    d = _randomise(_transcoder(arch, 32, 20, skip=skip))
    d.save(tmp_path / "ours")
    convert_main([str(tmp_path / "ours"), str(tmp_path / "sl"), "--to", "saelens"])  # checked by load-back
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == expected and cfg["d_out"] == 20 and cfg["d_in"] == 32
    assert cfg["metadata"]["hook_name"] == IN_HOOK and cfg["hook_name_out"] == OUT_HOOK
    assert cfg["apply_b_dec_to_input"] is False
    w = sae.io.load_tensors(tmp_path / "sl" / "sae_weights.safetensors")
    assert w["W_dec"].shape == (64, 20) and ("W_skip" in w) == skip and (not skip or w["W_skip"].shape == (20, 32))
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(4)) * 3
    f, y = _saelens_transcoder_forward(w, expected, x)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), f, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(d(x), y, rtol=1e-4, atol=1e-5)
    back = sae.load(tmp_path / "sl")
    assert back.architecture == arch and back.cfg.input_hook == IN_HOOK and back.cfg.hook_name == OUT_HOOK


def test_a_saelens_skip_transcoder_written_by_saelens_loads(tmp_path):
    """A folder as SAELens 6 saves a SkipTranscoder (no block of ours): its hooks and weights."""
    g = torch.Generator().manual_seed(3)
    w = {"W_enc": torch.randn(32, 48, generator=g) / 6, "b_enc": torch.randn(48, generator=g) / 5,
         "W_dec": torch.randn(48, 24, generator=g) / 6, "b_dec": torch.randn(24, generator=g) / 5,
         "W_skip": torch.randn(24, 32, generator=g) / 6}
    folder = tmp_path / "skip"
    folder.mkdir()
    sae.io.save_tensors(folder / "sae_weights.safetensors", w)
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "skip_transcoder", "d_in": 32, "d_sae": 48, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "d_out": 24, "hook_name_out": "blocks.2.hook_mlp_out", "hook_layer_out": 2, "hook_head_index_out": None,
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.2.ln2.hook_normalized", "hook_layer": 2,
                     "context_size": 128}}))
    d = sae.load(folder)
    assert (d.architecture, d.d_in, d.d_out, d.d_sae) == ("relu", 32, 24, 48)
    assert d.cfg.input_hook == "blocks.2.ln2.hook_normalized" and d.cfg.hook_name == "blocks.2.hook_mlp_out"
    x = torch.randn(16, 32, generator=g)
    f, y = _saelens_transcoder_forward(w, "skip_transcoder", x)
    with torch.no_grad():
        torch.testing.assert_close(d(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,expected", [
    (lambda: _transcoder("topk", 32, 20), "a topk transcoder has no SAELens form"),
    (lambda: _transcoder("jumprelu", 32, 20, skip=True), "a jumprelu transcoder with a skip connection has no SAELens"),
    (lambda: get_architecture("topk")(get_architecture("topk").Config(d_sae=64, skip_connection=True), 32),
     "SAELens has no autoencoder with a skip connection"),
])
def test_saelens_export_refuses_what_it_cannot_express_in_one_line(tmp_path, capsys, make, expected):
    from sae.convert import main as convert_main

    make().save(tmp_path / "ours")
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "ours"), str(tmp_path / "sl"), "--to", "saelens"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "sl").exists()
