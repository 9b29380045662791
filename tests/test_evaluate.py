"""The evaluator on a tiny random Llama: exact values for identity/zero dictionaries, batch-size
invariance, hand-computed numbers, clear errors, and the command line's outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eval import metrics as M
from eval.evaluate import EvalTarget, evaluate_dictionaries, reconstruction_metrics
from eval.outputs import read_frequency
from eval_helpers import HOOK, IdentityDict, RandomReLU, ZeroDict, make_tokens
from sae.errors import HookError, UserError
from sae.means import means_from_model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformer_lens.model_bridge import TransformerBridge

    m = TransformerBridge.boot_transformers(str(tiny_model_dir), device="cpu")
    m.eval()
    return m


@pytest.fixture(scope="module")
def data(model):
    return make_tokens(model.tokenizer)


@pytest.fixture(scope="module")
def train_mean(model, data):
    tokens, keep = make_tokens(model.tokenizer, n_ctx=9, seed=1)
    return means_from_model(model, [HOOK], tokens, keep)[HOOK]


def _eval(model, data, dicts, mean, batch_size=4, **kw):
    tokens, keep = data
    return evaluate_dictionaries(model, dicts, tokens, keep, train_means={HOOK: mean}, batch_size=batch_size,
                                 progress=False, **kw)


def test_training_mean_is_the_mean_over_kept_tokens(model):
    """x̄ from model forwards (in batches, the forward stopped after the hook) equals the plain
    mean of run_with_cache's activations over the kept tokens, on two hooks at once."""
    tokens, keep = make_tokens(model.tokenizer, n_ctx=9, seed=1)
    hooks = [HOOK, "blocks.1.hook_mlp_out"]
    means = means_from_model(model, hooks, tokens, keep, batch_size=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    for h in hooks:
        expected = cache[h][keep].double().mean(dim=0).float()
        assert means[h].dtype == torch.float32 and means[h].shape == (32,)
        torch.testing.assert_close(means[h], expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(UserError, match="no kept tokens"):
        means_from_model(model, hooks, tokens, torch.zeros_like(keep))


def test_every_metrics_key_is_reported(model, data, train_mean):
    r = _eval(model, data, {"relu": RandomReLU.make(d_sae=64)}, train_mean)["relu"]
    for key in M.METRIC_KEYS + ("tokens_evaluated", "model", "hook", "dataset"):
        assert key in r.metrics, key
    tokens, keep = data
    assert r["tokens_evaluated"] == int(keep.sum())
    assert r["predictions_evaluated"] == int(M.prediction_mask(keep).sum())
    assert r.frequency.shape == (64,)
    assert r["hook"] == HOOK and r["d_sae"] == 64


def test_identity_dictionary_recovers_everything(model, data, train_mean):
    r = _eval(model, data, {"id": IdentityDict.make()}, train_mean)["id"]
    assert r["fvu"] == 0 and r["mse"] == 0 and r["sse_per_token"] == 0
    assert r["explained_variance"] == 1
    assert r["ce_sae"] == r["ce_clean"] and r["ce_delta"] == 0
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert r["loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=1e-6)
    assert r["kl_sae"] == pytest.approx(0.0, abs=1e-6) and r["kl_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert r["cossim"] == pytest.approx(1.0, abs=1e-6) and r["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert r["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert r["ce_zero"] != r["ce_clean"] and r["kl_zero"] > 0  # the baseline changes the model (random: CE may even drop)


def test_zero_dictionary_recovers_nothing(model, data, train_mean):
    r = _eval(model, data, {"zero": ZeroDict.make(d_sae=16)}, train_mean)["zero"]
    assert r["ce_sae"] == r["ce_zero"] and r["kl_sae"] == r["kl_zero"]
    assert r["loss_recovered"] == 0.0 and r["kl_recovered"] == 0.0
    assert r["l0"] == 0 and r["dead"] == 16 and r["frac_alive"] == 0
    assert r["fvu"] > 1  # x_hat = 0 is worse than predicting the mean


def test_mean_dictionary_matches_mean_ablation(model, data, train_mean):
    d = ZeroDict.make()
    with torch.no_grad():
        d.b_dec.copy_(train_mean)  # x_hat = x̄_train at every token
    r = _eval(model, data, {"mean": d}, train_mean)["mean"]
    assert r["ce_sae"] == pytest.approx(r["ce_mean"], abs=1e-6)
    assert r["loss_recovered_mean_ablation"] == pytest.approx(0.0, abs=1e-5)


def test_batch_size_changes_no_number(model, data, train_mean):
    dicts = {"relu": RandomReLU.make(d_sae=64), "id": IdentityDict.make()}
    ref = _eval(model, data, dicts, train_mean, batch_size=64)
    for bs in (1, 7):
        out = _eval(model, data, dicts, train_mean, batch_size=bs)
        for name in dicts:
            a, b = out[name].metrics, ref[name].metrics
            assert a["tokens_evaluated"] == b["tokens_evaluated"]
            assert torch.equal(out[name].frequency, ref[name].frequency)
            for key in M.METRIC_KEYS:
                if isinstance(b[key], float) and math.isnan(b[key]):
                    continue
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, key, bs)


def test_several_dictionaries_equal_one_at_a_time(model, data, train_mean):
    relu, ident = RandomReLU.make(d_sae=64), IdentityDict.make()
    both = _eval(model, data, {"relu": relu, "id": ident}, train_mean)
    alone = _eval(model, data, {"relu": relu}, train_mean)
    for key in M.METRIC_KEYS:
        assert both["relu"][key] == pytest.approx(alone["relu"][key], rel=1e-6, abs=1e-9)


def test_dictionaries_on_several_hooks(model, data):
    """Dictionaries on different hooks (residual, MLP output, attention output) in one call give
    the numbers of separate calls; each hook gets its own zero/mean baselines."""
    tokens, keep = data
    hooks = [HOOK, "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"]
    means = means_from_model(model, hooks, tokens, keep)
    dicts = {h: RandomReLU.make(d_sae=48, seed=i, metadata={"hook_name": h}) for i, h in enumerate(hooks)}
    together = evaluate_dictionaries(model, dicts, tokens, keep, train_means=means, progress=False)
    for h, d in dicts.items():
        alone = evaluate_dictionaries(model, {h: d}, tokens, keep, train_means=means, progress=False)[h]
        for key in M.METRIC_KEYS:
            assert together[h][key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), (h, key)
    assert len({round(together[h]["ce_zero"], 6) for h in hooks}) == 3
    assert len({together[h]["ce_clean"] for h in hooks}) == 1


def test_resid_mid_carries_a_caveat(model, data):
    tokens, keep = data
    hook = "blocks.1.hook_resid_mid"
    d = RandomReLU.make(metadata={"hook_name": hook})
    with pytest.warns(UserWarning, match="resid_mid"):
        r = evaluate_dictionaries(model, {"m": d}, tokens, keep, train_means={hook: torch.zeros(32)},
                                  progress=False)["m"]
    assert "MLP input" in r["splice_caveat"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_model_dir, model, data, train_mean):
    from transformer_lens.model_bridge import TransformerBridge

    gpu_model = TransformerBridge.boot_transformers(str(tiny_model_dir), device="cuda").eval()
    d = RandomReLU.make(d_sae=64)
    cpu = _eval(model, data, {"d": d}, train_mean)["d"]
    gpu = _eval(gpu_model, data, {"d": RandomReLU.make(d_sae=64).cuda()}, train_mean.cuda())["d"]
    for key in M.METRIC_KEYS:
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-5), key


def test_hand_computed_values(model, data, train_mean):
    """Reconstruction and downstream numbers recomputed with plain torch on the same tokens."""
    d = RandomReLU.make(d_sae=64)
    r = _eval(model, data, {"relu": d}, train_mean)["relu"]
    tokens, keep = data
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        x = cache[HOOK]
        f = d.encode(x)
        x_hat = d.decode(f)
        xk, xhk, fk = x[keep].double(), x_hat[keep].double(), f[keep]
        assert r["l0"] == pytest.approx((fk != 0).sum(-1).double().mean().item(), rel=1e-6)
        assert r["mse"] == pytest.approx(F.mse_loss(xhk, xk).item(), rel=1e-5)
        fvu = (xk - xhk).pow(2).sum() / (xk - xk.mean(0)).pow(2).sum()
        assert r["fvu"] == pytest.approx(fvu.item(), rel=1e-5)

        def splice(act, hook):
            return torch.where(keep[..., None], x_hat, act)

        sae_logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, splice)])
        pred = keep[:, :-1] & keep[:, 1:]
        targets = tokens[:, 1:][pred]

        def ce(logits):
            return F.cross_entropy(logits[:, :-1][pred].float(), targets).item()

        assert r["ce_clean"] == pytest.approx(ce(clean_logits), rel=1e-5)
        assert r["ce_sae"] == pytest.approx(ce(sae_logits), rel=1e-5)
        mean_logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: torch.where(keep[..., None], train_mean, a))])
        assert r["ce_mean"] == pytest.approx(ce(mean_logits), rel=1e-5)
        lp_clean = torch.log_softmax(clean_logits[:, :-1][pred].float(), -1)
        lp_sae = torch.log_softmax(sae_logits[:, :-1][pred].float(), -1)
        kl = F.kl_div(lp_sae, lp_clean, log_target=True, reduction="batchmean").item()
        assert r["kl_sae"] == pytest.approx(kl, rel=1e-4)
        zero_logits = model.run_with_hooks(
            tokens, fwd_hooks=[(HOOK, lambda a, hook: torch.where(keep[..., None], torch.zeros_like(a), a))])
        assert r["ce_zero"] == pytest.approx(ce(zero_logits), rel=1e-5)
        lp_zero = torch.log_softmax(zero_logits[:, :-1][pred].float(), -1)
        kl_zero = F.kl_div(lp_zero, lp_clean, log_target=True, reduction="batchmean").item()
        assert r["kl_zero"] == pytest.approx(kl_zero, rel=1e-4)


def test_excluded_positions_keep_their_activation(model, data, train_mean):
    """At the hook, excluded positions (BOS, padding) keep their clean activation exactly and kept
    ones get x_hat; BOS (position 0) sees only itself, so it stays clean downstream and its logits
    are unchanged by any splice; every excluded token counts in no metric."""
    tokens, keep = data
    from eval.evaluate import _splice

    d = ZeroDict.make()  # x_hat = 0 at every kept position
    acc = M.ReconstructionAccumulator(d.d_in, d.d_sae)
    splice = _splice(EvalTarget(d), keep, acc)
    later = "blocks.1.hook_resid_post"
    captured = {}
    with torch.no_grad():
        clean = model(tokens)
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK, later])
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: splice(a)),
                                                          (HOOK, lambda a, hook: captured.setdefault("at_hook", a)),
                                                          (later,
                                                           lambda a, hook: captured.setdefault("x", a))])
    assert (~keep[:, 1:]).any()  # the data has excluded positions after BOS (padding) too
    assert torch.equal(captured["at_hook"][~keep], cache[HOOK][~keep])
    assert (captured["at_hook"][keep] == 0).all() and (cache[HOOK][keep] != 0).all(dim=-1).all()
    assert torch.equal(captured["x"][:, 0], cache[later][:, 0])
    assert not torch.allclose(captured["x"][:, 1:], cache[later][:, 1:])
    assert torch.equal(spliced[:, 0], clean[:, 0])
    assert not torch.allclose(spliced[:, 1:], clean[:, 1:])
    assert acc.n == int(keep.sum())


def test_reconstruction_metrics_centred_under_offset():
    """A constant offset added to the activations and to b_dec changes no reconstruction number."""
    d = RandomReLU.make(d_sae=64)
    x = torch.randn(300, d.d_in, generator=torch.Generator().manual_seed(0))
    base, freq = reconstruction_metrics(d, x, batch_size=64)
    shift = torch.full((d.d_in,), 25.0)
    with torch.no_grad():
        d.b_dec.add_(shift)
    moved, freq2 = reconstruction_metrics(d, x + shift, batch_size=64)
    assert torch.equal(freq, freq2)
    for key in ("fvu", "mse", "l0", "l1"):
        assert moved[key] == pytest.approx(base[key], rel=1e-4), key


def test_hook_and_width_mismatch_are_clear_errors(model, data, train_mean):
    with pytest.raises(HookError, match="blocks.7.hook_resid_post"):
        _eval(model, data, {"bad": RandomReLU.make(metadata={"hook_name": "blocks.7.hook_resid_post"})}, train_mean)
    with pytest.raises(HookError, match="hook_resid_pots"):
        _eval(model, data, {"bad": RandomReLU.make(metadata={"hook_name": "blocks.0.hook_resid_pots"})}, train_mean)
    with pytest.raises(HookError, match="d_in=16"):
        _eval(model, data, {"narrow": RandomReLU.make(d_in=16, d_sae=32)}, torch.zeros(16))
    with pytest.raises(UserError, match="mean"):
        tokens, keep = data
        evaluate_dictionaries(model, {"relu": RandomReLU.make()}, tokens, keep, progress=False)
    assert issubclass(HookError, UserError)


def test_kill_mask_is_restored(model, data, train_mean):
    d = RandomReLU.make(d_sae=64)
    kill = torch.zeros(64, dtype=torch.bool)
    kill[:10] = True
    r = _eval(model, data, {"k": EvalTarget(d, kill_mask=kill)}, train_mean)["k"]
    assert d.kill_mask is None
    assert r["killed"] == 10 and (r.frequency[:10] == 0).all() and r["dead"] >= 10


def _batchtopk(d_sae=64, k=4):
    import sae.dictionaries  # noqa: F401  (registers every architecture)
    from sae.dictionaries.registry import ARCHITECTURES

    cls = ARCHITECTURES["batchtopk"]
    d = cls(cls.Config(architecture="batchtopk", d_sae=d_sae, k=k), 32, metadata={"hook_name": HOOK})
    with torch.no_grad():
        d.threshold.fill_(0.2)  # as if trained: inference keeps pre-activations above it
    return d


def test_dictionaries_are_evaluated_in_eval_mode(model, data, train_mean):
    """A BatchTopK dictionary handed over in training mode (batch-wide top-k selection, which would
    make every number depend on the batch) gives its eval-mode numbers, and is left in training mode."""
    d = _batchtopk()
    ref = _eval(model, data, {"b": d.eval()}, train_mean)["b"]
    d.train()
    for bs in (2, 13):
        r = _eval(model, data, {"b": d}, train_mean, batch_size=bs)["b"]
        assert d.training
        assert torch.equal(r.frequency, ref.frequency)
        for key in M.METRIC_KEYS:
            if isinstance(ref[key], float) and math.isnan(ref[key]):
                continue
            assert r[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (key, bs)
    assert ref["l0"] != pytest.approx(4.0, abs=0.05)  # the eval threshold, not exactly k per token
    metrics, freq = reconstruction_metrics(d, torch.randn(50, 32, generator=torch.Generator().manual_seed(0)))
    assert d.training
    d.eval()
    again, freq2 = reconstruction_metrics(d, torch.randn(50, 32, generator=torch.Generator().manual_seed(0)))
    assert not d.training and torch.equal(freq, freq2) and metrics["l0"] == again["l0"]


def test_training_flag_and_kill_mask_restored_on_error(model, data, train_mean):
    d = RandomReLU.make(d_sae=64).train()
    kill = torch.zeros(64, dtype=torch.bool)
    kill[:5] = True

    def broken(f):
        raise RuntimeError("decode failed")

    d.decode = broken  # instance attribute: fails inside the spliced forward
    with pytest.raises(RuntimeError, match="decode failed"):
        _eval(model, data, {"k": EvalTarget(d, kill_mask=kill)}, train_mean)
    assert d.training and d.kill_mask is None
    del d.decode
    r = _eval(model, data, {"k": d}, train_mean)["k"]  # the model's hooks were cleaned up too
    assert d.training and r["tokens_evaluated"] == int(data[1].sum())


# ---- the command line ----------------------------------------------------------------------

def save_test_dictionary(path, model_dir, text_file, cls=RandomReLU, d_sae=64, ctx=16, seed=0):
    d = cls.make(d_sae=d_sae, seed=seed, metadata={
        "model_name": str(model_dir), "hook_name": HOOK, "context_size": ctx,
        "dataset": {"source": str(text_file), "context_size": ctx, "heldout_fraction": 0.3}})
    d.save(path)
    return d


def test_cli_evaluate_writes_outputs(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    from eval.__main__ import main

    a = tmp_path / "a"
    b = tmp_path / "b"
    save_test_dictionary(a, tiny_model_dir, tiny_text_file, seed=0)
    save_test_dictionary(b, tiny_model_dir, tiny_text_file, cls=IdentityDict, d_sae=32)
    main(["evaluate", str(tmp_path),  # a run folder: every dictionary in it
          "--tokens", "256", "--batch-size", "5", "--device", "cpu",
          "--no-progress", "--mean-tokens", "512", "--summary", str(tmp_path)])
    out = capsys.readouterr().out
    assert "no activation_mean.safetensors" in out and "% loss rec. (zero)" in out
    for folder in (a, b):
        ev = json.loads((folder / "eval.json").read_text())
        for key in M.METRIC_KEYS + ("tokens_evaluated", "model", "hook", "dataset"):
            assert key in ev, key
        assert ev["evaluated_split"] == "heldout" and ev["tokens_evaluated"] > 0
        assert "training-split" in ev["mean_ablation_source"]
        freq, meta = read_frequency(folder)
        assert int(meta["tokens_evaluated"]) == ev["tokens_evaluated"]
        assert (folder / "frequency_histogram.png").stat().st_size > 1000
    assert json.loads((b / "eval.json").read_text())["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["name"] for row in summary["dictionaries"]] == ["a", "b"]
    assert "| a |" in (tmp_path / "summary.md").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from eval.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(tmp_path / "missing"), "--device", "cpu"])
    assert e.value.code == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--tokens", "0"), ("--batch-size", "0"), ("--batch-size", "-3"),
                                        ("--mean-tokens", "0")])
def test_cli_non_positive_counts_are_one_line_errors(tmp_path, capsys, flag, value):
    """evaluate, prune and ablate-frequency (and features) refuse a non-positive count before loading
    anything, instead of silently evaluating one context or falling back to the default."""
    from eval.__main__ import main

    commands = [["evaluate", str(tmp_path)], ["prune", str(tmp_path), "--max-frequency", "0.1", "--out",
                                              str(tmp_path / "out")],
                ["ablate-frequency", str(tmp_path), "--thresholds", "0.1"]]
    if flag != "--mean-tokens":
        commands.append(["features", str(tmp_path)])
    for command in commands:
        with pytest.raises(SystemExit) as e:
            main([*command, flag, value, "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2, command
        assert err.strip() == f"python -m eval: error: {flag} must be a positive integer, got {int(value)}", command
