"""benchmarks/hook_costs.py on the tiny model: the clean CE and a zero-ablated hook's cost are
those of a forward spliced by hand, over the same predicted positions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from eval import metrics as M
from sae.means import means_from_model
from sae.models import load_model
from sae.text import DataConfig, keep_mask, load_contexts

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hook_costs.py"


def _module():
    spec = importlib.util.spec_from_file_location("hook_costs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_costs_match_a_hand_spliced_forward(tiny_model_dir, tiny_text_file):
    hc = _module()
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    data = DataConfig(source=str(tiny_text_file), context_size=16)
    hooks = hc.hook_names(model.cfg.n_layers)
    assert hooks[0] == "blocks.0.hook_mlp_out" and len(hooks) == 2 * model.cfg.n_layers
    train = load_contexts(data, model.tokenizer, "train", 256)
    means = means_from_model(model, hooks, train, keep_mask(train, model.tokenizer, data.exclude_tokens))
    tokens = load_contexts(data, model.tokenizer, "heldout", 64)
    keep = keep_mask(tokens, model.tokenizer, data.exclude_tokens)
    costs = hc.hook_costs(model, hooks, tokens, keep, means, batch_contexts=3)

    hook = "blocks.1.hook_resid_post"  # by hand: zeros at every kept position of that hook
    with torch.no_grad():
        clean = M.token_ce(M.token_log_probs(model(tokens, return_type="logits")), tokens)
        zeroed = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[
            (hook, lambda x, hook: torch.where(keep[..., None], torch.zeros_like(x), x))])
        zero_ce = M.token_ce(M.token_log_probs(zeroed), tokens)
    pred = M.prediction_mask(keep)
    assert abs(costs["ce_clean"] - float(clean[pred].mean())) < 1e-5
    assert abs(costs["zero"][hook] - float((zero_ce[pred] - clean[pred]).mean())) < 1e-5
    assert costs["zero"][hook] > 0.01 and set(costs["mean"]) == set(hooks)
