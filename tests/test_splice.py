"""Splicing dictionaries into a TransformerBridge: the evaluator's ce_sae, the error term, several
hooks, gradients to features, and feature activations for a sentence."""

from __future__ import annotations

import pytest
import torch

import sae
from eval import metrics as M
from eval.evaluate import evaluate_dictionaries, heldout_tokens
from eval_helpers import make_tokens
from loading_helpers import HOOK, random_dictionary
from sae.errors import HookError, UserError
from sae.models import load_model
from sae.text import DataConfig


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def data(model):
    return make_tokens(model.tokenizer, n_ctx=6, ctx=16)


def _ce(logits, tokens, keep) -> float:
    pred = M.prediction_mask(keep)
    ce = M.token_ce(M.token_log_probs(logits), tokens)
    return float(ce[pred].double().mean())


@pytest.mark.parametrize("arch,hyper", [("relu", {}), ("topk", {"k": 6})])
def test_splice_gives_the_evaluators_ce_sae(tmp_path, model, data, arch, hyper):
    tokens, keep = data
    random_dictionary(arch, **hyper).save(tmp_path / "d")
    d = sae.load(tmp_path / "d")
    r = evaluate_dictionaries(model, {"d": d}, tokens, keep, train_means={HOOK: torch.zeros(32)},
                              batch_size=len(tokens), progress=False)["d"]
    with torch.no_grad(), sae.splice(model, d, mask=keep) as s:  # the evaluator splices kept tokens only
        logits = model(tokens, return_type="logits")
    assert _ce(logits, tokens, keep) == pytest.approx(r["ce_sae"], rel=1e-6)
    assert r["ce_sae"] != pytest.approx(r["ce_clean"], rel=1e-3)  # the splice changed the model
    assert s.f.shape == (*tokens.shape, 96)
    with torch.no_grad():  # outside the `with` the model is clean again
        assert _ce(model(tokens, return_type="logits"), tokens, keep) == pytest.approx(r["ce_clean"], rel=1e-6)


def test_default_splice_keeps_the_dictionarys_excluded_tokens_like_the_evaluator(tmp_path, model,
                                                                                  tiny_text_file):
    """Without a mask, splice leaves the tokens the dictionary's data config excluded (here BOS, pad
    and the literal token 'the', recorded in its cfg.json) at their original activation, so a
    spliced forward's CE is the evaluator's ce_sae; mask="all" (or None) splices BOS too."""
    data_cfg = DataConfig(source=str(tiny_text_file), context_size=16, exclude_tokens=["bos", "pad", "the"])
    tokens, keep = heldout_tokens(model, data_cfg, n_tokens=6 * 16)
    assert not keep[:, 0].any() and not keep[:, 1:].all()  # BOS and some 'the' are excluded
    random_dictionary("topk", k=6, metadata={"hook_name": HOOK, "model_name": "tiny", "context_size": 16,
                                             "dataset": data_cfg.model_dump(mode="json")}).save(tmp_path / "d")
    d = sae.load(tmp_path / "d")
    r = evaluate_dictionaries(model, {"d": d}, tokens, keep, train_means={HOOK: torch.zeros(32)},
                              batch_size=len(tokens), progress=False)["d"]
    later = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=[later])
        with sae.splice(model, d) as s:
            logits = model(tokens, return_type="logits")
            _, default = model.run_with_cache(tokens, names_filter=[later])
        assert _ce(logits, tokens, keep) == pytest.approx(r["ce_sae"], rel=1e-6)
        assert list(s.excluded_tokens.values()) == [["bos", "pad", "the"]]
        with sae.splice(model, d, mask="all"):
            every = model(tokens, return_type="logits")
            _, spliced_bos = model.run_with_cache(tokens, names_filter=[later])
        with sae.splice(model, d, mask=None):  # None: every position, as before
            assert torch.equal(model(tokens, return_type="logits"), every)
    assert _ce(every, tokens, keep) != pytest.approx(r["ce_sae"], rel=1e-5)  # differs by 6.5e-5 relative
    # position 0 (BOS) sees only itself: unspliced by default, it is exactly the clean model's downstream
    assert torch.equal(default[later][:, 0], clean[later][:, 0])
    assert not torch.allclose(spliced_bos[later][:, 0], clean[later][:, 0], atol=1e-3)
    assert not torch.allclose(default[later][:, 1:], clean[later][:, 1:], atol=1e-3)
    with pytest.raises(UserError, match="mask='everything'"):
        with sae.splice(model, d, mask="everything"):
            pass


def test_keep_error_leaves_outputs_exact_and_exposes_features(model, data):
    tokens, _ = data
    d = random_dictionary("relu")
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        with sae.splice(model, d, keep_error=True, record_errors=True) as s:
            kept = model(tokens, return_type="logits")
    assert torch.equal(kept, clean)
    x = cache[HOOK]
    assert torch.equal(s.features["dictionary"], d.encode(x))
    assert torch.allclose(s.errors["dictionary"], x - d(x), atol=1e-6)


def test_features_require_grad_gives_attributions(model, data):
    tokens, _ = data
    d = random_dictionary("relu")
    with sae.splice(model, d, keep_error=True, features_require_grad=True) as s:
        logits = model(tokens[:1], return_type="logits")
    logits[0, -1, 5].backward()
    f = s.f
    assert f.grad is not None and f.grad.shape == f.shape

    # with the error term kept, d(logit)/d(f) = W_dec · d(logit)/d(x) at the hook
    grabbed = {}

    def leaf(x, hook):
        grabbed["x"] = x.detach().requires_grad_(True)
        return grabbed["x"]

    model.run_with_hooks(tokens[:1], fwd_hooks=[(HOOK, leaf)], return_type="logits")[0, -1, 5].backward()
    expected = grabbed["x"].grad @ d.W_dec.detach().T
    assert expected.abs().max() > 0 and torch.allclose(f.grad, expected, atol=1e-6)


def test_several_dictionaries_on_several_hooks(model, data):
    tokens, _ = data
    hooks = [HOOK, "blocks.1.hook_mlp_out"]
    ds = {h: random_dictionary("topk", k=4, seed=i, metadata={"hook_name": h}) for i, h in enumerate(hooks)}
    with torch.no_grad():
        with sae.splice(model, ds) as s:
            both = model(tokens, return_type="logits")
        with sae.splice(model, ds[HOOK]):
            first = model(tokens, return_type="logits")
    assert set(s.features) == set(hooks) and not torch.equal(both, first)
    assert s.hook_names == {h: h for h in hooks}
    with pytest.raises(HookError, match="blocks.9.hook_resid_post"):
        with sae.splice(model, random_dictionary("relu", metadata={"hook_name": "blocks.9.hook_resid_post"})):
            pass


def test_feature_activations_for_a_sentence(model):
    d = random_dictionary("topk", k=4)
    acts = sae.feature_activations(model, d, "To be or not to be")
    assert acts.str_tokens == [["<s>", "To", "be", "or", "not", "to", "be"]]
    assert acts.f.shape == (1, 7, 96) and acts.tokens.shape == (1, 7)
    with torch.no_grad():
        _, cache = model.run_with_cache(acts.tokens, names_filter=[HOOK])
    assert torch.equal(acts.f, d.encode(cache[HOOK]))
    assert ((acts.f != 0).sum(-1) == 4).all()
    top = acts.top_features(3, n=2)
    assert len(top) == 2 and top[0][1] == pytest.approx(acts.f[0, 3].max().item())
    batch = sae.feature_activations(model, {"mine": d}, ["To be", "the lazy dog"], return_logits=True)
    assert batch.features["mine"].shape[0] == 2 and batch.logits.shape[:2] == batch.tokens.shape
