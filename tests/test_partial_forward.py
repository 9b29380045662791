"""Running the model on from a hook (sae.partial_forward, eval.forwards) against full forwards:
the same logits at every supported position, the same eval.json numbers for several dictionaries
and hooks, the forwards it saves, and the fallback to full forwards with a one-line warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from eval import forwards as F
from eval import metrics as M
from eval.evaluate import EvalTarget, evaluate_dictionaries
from eval_helpers import HOOK, IdentityDict, RandomReLU, ZeroDict, make_tokens
from sae import partial_forward as P
from sae.means import means_from_model

# every supported position, by alias and by hook-point name
POSITION_OF = {"blocks.0.hook_resid_pre": "resid_pre", "blocks.1.hook_resid_pre": "resid_pre",
               "blocks.0.hook_attn_out": "attn_out", "blocks.0.hook_resid_mid": "ln2_in",
               "blocks.1.ln2.hook_out": "mlp_in", "blocks.0.mlp.hook_in": "mlp_in",
               "blocks.0.hook_mlp_out": "mlp_out", "blocks.1.hook_mlp_out": "mlp_out",
               "blocks.0.hook_resid_post": "resid_post", "blocks.1.hook_out": "resid_post"}
FALLBACK = "reruns the whole model"


def _boot(path):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(path), device="cpu").eval()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return _boot(tiny_model_dir)


@pytest.fixture(scope="module")
def data(model):
    tokens, keep = make_tokens(model.tokenizer)
    assert not keep[:, 0].any() and (~keep[:, 1:]).any()  # BOS and padding are excluded
    return tokens, keep


def _tiny_hf(path, tokenizer_dir, kind: str):
    """A random 2-layer GPT-2 or Gemma-2 (logit soft-capping at 1) with the tiny Llama's tokenizer."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, pad_token_id=3, final_logit_softcapping=1.0)
        hf = transformers.Gemma2ForCausalLM(cfg)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return _boot(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, tiny_model_dir):
    return _tiny_hf(tmp_path_factory.mktemp("gpt2"), tiny_model_dir, "gpt2")


def _run_on_and_full(m, hook, tokens, replacements):
    """Logits of the run-on from `hook` for the stacked replacements, and of full forwards with each."""
    site = P.locate(m, hook)
    with torch.no_grad():
        with P.recording(m, [site]) as rec:
            clean = m(tokens, return_type="logits")
        captured = rec.captured(site)
        stacked = P.continue_from(m, site, captured, torch.cat([r(captured.activation) for r in replacements]))
        full = [m.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook, r=r: r(a))], return_type="logits")
                for r in replacements]
    return clean, stacked, full


@pytest.mark.parametrize("hook", sorted(POSITION_OF))
def test_run_on_gives_the_full_forward_logits(model, data, hook):
    """At every supported position, three different replacements stacked in one run-on give the
    logits of three full forwards with that replacement spliced in; the clean activation gives the
    clean logits."""
    tokens, _ = data
    assert P.locate(model, hook).position == POSITION_OF[hook]
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(tokens.shape[0], tokens.shape[1], 32, generator=g)
    replacements = [lambda a: a, lambda a: torch.zeros_like(a), lambda a: a + noise]
    clean, stacked, full = _run_on_and_full(model, hook, tokens, replacements)
    b = tokens.shape[0]
    torch.testing.assert_close(stacked[:b], clean, rtol=1e-5, atol=1e-5)
    for i, logits in enumerate(full):
        torch.testing.assert_close(stacked[i * b:(i + 1) * b], logits, rtol=1e-5, atol=1e-5)
    assert (full[2] - clean).abs().max() > 1e-2  # the replacement changes the logits


@pytest.mark.parametrize("hook", ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"])
def test_run_on_a_gpt2(gpt2, data, hook):
    """Another architecture (learned positions, fused QKV, LayerNorm): the same logits."""
    tokens, _ = data
    noise = torch.randn(tokens.shape[0], tokens.shape[1], 32, generator=torch.Generator().manual_seed(2))
    clean, stacked, full = _run_on_and_full(gpt2, hook, tokens, [lambda a: a + noise, lambda a: a])
    b = tokens.shape[0]
    torch.testing.assert_close(stacked[:b], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked[b:], clean, rtol=1e-5, atol=1e-5)


def test_hooks_it_cannot_run_on_from(model):
    for hook, reason in [("hook_embed", "not in a decoder block"), ("ln_final.hook_normalized", "not in a decoder block"),
                         ("blocks.0.attn.hook_pattern", "at none of"), ("blocks.1.ln2.hook_normalized", "at none of")]:
        with pytest.raises(P.CannotContinue, match=reason):
            P.locate(model, hook)


# ---- the evaluator on both paths -------------------------------------------------------------

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.1.hook_resid_pre"]


def _targets(hooks):
    out = {}
    for i, h in enumerate(hooks):
        meta = {"hook_name": h}
        out[f"relu{i}"] = RandomReLU.make(d_sae=48, seed=i, metadata=meta)
        out[f"wide{i}"] = RandomReLU.make(d_sae=96, seed=10 + i, metadata=meta)
    out["id"] = IdentityDict.make(metadata={"hook_name": HOOKS[1]})
    out["zero"] = ZeroDict.make(metadata={"hook_name": HOOKS[0]})
    kill = torch.zeros(48, dtype=torch.bool)
    kill[::3] = True
    out["killed"] = EvalTarget(RandomReLU.make(d_sae=48, seed=0, metadata={"hook_name": HOOKS[0]}), kill_mask=kill)
    return out


def _evaluate(model, data, hooks, **kw):
    tokens, keep = data
    means = means_from_model(model, hooks, tokens, keep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate_dictionaries(model, _targets(hooks), tokens, keep, train_means=means, batch_size=5,
                                    progress=False, **kw)
    return out, [str(w.message) for w in caught]


def _assert_same(a, b):
    for name in b:
        assert torch.equal(a[name].frequency, b[name].frequency), name
        for key in M.METRIC_KEYS + ("tokens_evaluated", "predictions_evaluated"):
            x, y = a[name][key], b[name][key]
            if isinstance(y, float) and math.isnan(y):
                assert math.isnan(x), (name, key)
            else:
                assert x == pytest.approx(y, rel=1e-5, abs=1e-6), (name, key)


@pytest.mark.parametrize("per_forward", [None, 1, 3])
def test_eval_numbers_equal_the_full_forward_path(model, data, per_forward):
    """Several dictionaries (a killed one, identity, zero) on hooks at block edges and inside blocks,
    BOS and padding excluded: every eval.json number of the run-on path equals the full path's, with
    all variants stacked, one per forward, or three per forward."""
    full, full_warned = _evaluate(model, data, HOOKS, full_forwards=True)
    part, warned = _evaluate(model, data, HOOKS, variants_per_forward=per_forward)
    assert not [w for w in warned + full_warned if FALLBACK in w]
    _assert_same(part, full)
    assert part["id"]["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert part["zero"]["ce_sae"] == pytest.approx(part["zero"]["ce_zero"], rel=1e-6)
    zero = {h: part[f"relu{i}"]["ce_zero"] for i, h in enumerate(HOOKS)}
    assert zero["blocks.0.hook_resid_post"] == pytest.approx(zero["blocks.1.hook_resid_pre"], rel=1e-6)  # one tensor
    assert len({round(v, 6) for v in zero.values()}) == 3


def _count_block_calls(model):
    counts = [0] * len(model.blocks)
    handles = [b.register_forward_pre_hook(lambda mod, args, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(model.blocks)]
    return counts, handles


@pytest.mark.parametrize("full,per_forward,budget_variants,block_calls", [
    (True, None, None, [21, 21]),  # 3 batches x (clean + 6 variants), whole model each time
    (False, 1, None, [3, 22]),  # block 0: the clean forwards; block 1: 3 x (clean + 6) + the check
    (False, None, 3, [3, 10]),  # a budget of 3 variants per forward: 3 x (clean + 2 stacks) + 1
    (False, None, 100, [3, 7]),  # all 6 stacked: 3 x (clean + 1) + 1
])
def test_forwards_run_only_the_layers_after_the_hook(model, data, monkeypatch, full, per_forward, budget_variants,
                                                     block_calls):
    """Four dictionaries at blocks.1.hook_resid_pre (6 variants with zero and mean), 13 contexts in
    batches of 5: how often each block runs. On the run-on path block 0 runs only in the clean
    forwards, block 1 once per stack of variants (and once for the check on the first batch); the
    automatic stack size follows the memory budget."""
    import eval.evaluate as E

    tokens, keep = data
    hook = "blocks.1.hook_resid_pre"
    dicts = {f"d{i}": RandomReLU.make(d_sae=40, seed=i, metadata={"hook_name": hook}) for i in range(4)}
    if budget_variants is not None:  # a budget that fits exactly this many variants of 5 contexts
        per_variant = 5 * tokens.shape[1] * (model.cfg.d_vocab + 8 * 32) * 4
        monkeypatch.setattr(F, "CPU_STACK_BYTES", budget_variants * per_variant)
    monkeypatch.setattr(E, "check_compatibility", lambda m, t: None)  # its probe forward is not counted
    counts, handles = _count_block_calls(model)
    try:
        evaluate_dictionaries(model, dicts, tokens, keep, train_means={hook: torch.zeros(32)}, batch_size=5,
                              progress=False, full_forwards=full, variants_per_forward=per_forward)
    finally:
        for h in handles:
            h.remove()
    assert counts == block_calls


def test_unsupported_hook_falls_back_with_one_line_warning(model, data):
    """A hook inside the attention's norm cannot be run on from: full forwards, the same numbers
    as with full_forwards=True, and one warning naming the hook."""
    tokens, keep = data
    hook = "blocks.1.ln1.hook_normalized"
    d = {"n": RandomReLU.make(d_sae=40, metadata={"hook_name": hook})}
    means = {hook: torch.zeros(32)}
    with pytest.warns(UserWarning, match=FALLBACK) as caught:
        part = evaluate_dictionaries(model, d, tokens, keep, train_means=means, progress=False)
    messages = [str(w.message) for w in caught if FALLBACK in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and hook in messages[0]
    full = evaluate_dictionaries(model, d, tokens, keep, train_means=means, progress=False, full_forwards=True)
    _assert_same(part, full)


def test_model_whose_forward_does_more_falls_back(tmp_path, tiny_model_dir, data):
    """Gemma-2 soft-caps its logits after the unembedding: running on from the hook does not give
    the clean logits, so the check on the first batch falls back to full forwards, with a warning,
    and the numbers are the full path's."""
    gemma = _tiny_hf(tmp_path / "gemma2", tiny_model_dir, "gemma2")
    tokens, keep = data
    d = {"g": RandomReLU.make(d_sae=40)}
    means = {HOOK: torch.zeros(32)}
    with pytest.warns(UserWarning, match="does not give the clean logits"):
        part = evaluate_dictionaries(gemma, d, tokens, keep, train_means=means, progress=False)
    full = evaluate_dictionaries(gemma, d, tokens, keep, train_means=means, progress=False, full_forwards=True)
    _assert_same(part, full)


def test_benchmark_runs_on_the_tiny_model(tiny_model_dir, monkeypatch, capsys):
    """benchmarks/evaluate.py at a tiny size: one row per dictionary count and hook, both paths."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--model", str(tiny_model_dir), "--device", "cpu",
                                      "--hook", "blocks.0.hook_mlp_out", "--hook", "blocks.1.hook_resid_post",
                                      "--tokens", "64", "--context-size", "16", "--batch-contexts", "2",
                                      "--dictionaries", "1,3"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "bare full forward" in out and out.count("bare run-on") == 2
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("1 ", "3 ")]
    assert [r[0] for r in rows] == ["1", "3", "1", "3"]
    assert all(r[-1].replace(".", "").isdigit() for r in rows)  # run-on / target, a number
