"""What each hook is worth to the model: the CE increase (nats per predicted token) when every
layer's MLP output, or its residual stream, is zero- or mean-ablated on held-out text.

Percent loss recovered divides by exactly these gaps (METRICS.md), so a dictionary on a hook whose
ablation costs little gives percentages that swing past 100 % on noise: pick hooks from this
table. The means are taken over training tokens, as the evaluator's are.

    python benchmarks/hook_costs.py                         # smollm2-135m on the embedded Shakespeare
    python benchmarks/hook_costs.py --model /path/to/hf_folder --tokens 4096 --json costs.json

Cost: (2 x hooks + 1) full forwards over the held-out tokens, plus one forward over the training
tokens for the means (SmolLM2-135M, 60 hooks, 2,048 tokens: ~35 min on 2 busy CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import metrics as M  # noqa: E402
from sae.means import means_from_model  # noqa: E402
from sae.models import load_model, model_device  # noqa: E402
from sae.text import DataConfig, keep_mask, load_contexts  # noqa: E402


def hook_names(n_layers: int) -> list[str]:
    return ([f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
            + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)])


def summed_ce(model, tokens: torch.Tensor, keep: torch.Tensor, hook: str | None = None,
              replace=None) -> float:
    """Σ CE over the predicted positions of one batch, with `hook`'s kept positions replaced."""
    if hook is None:
        logits = model(tokens, return_type="logits")
    else:
        keep3 = keep[..., None].to(model_device(model))
        logits = model.run_with_hooks(tokens, return_type="logits",
                                      fwd_hooks=[(hook, lambda x, hook: torch.where(keep3, replace(x), x))])
    ce = M.token_ce(M.token_log_probs(logits), tokens.to(logits.device))
    return float(ce[M.prediction_mask(keep).to(ce.device)].sum())


@torch.no_grad()
def hook_costs(model, hooks: list[str], tokens: torch.Tensor, keep: torch.Tensor,
               means: dict[str, torch.Tensor], batch_contexts: int) -> dict:
    clean, zero, mean, n = 0.0, dict.fromkeys(hooks, 0.0), dict.fromkeys(hooks, 0.0), 0
    for start in range(0, tokens.shape[0], batch_contexts):
        t, k = tokens[start:start + batch_contexts], keep[start:start + batch_contexts]
        clean += summed_ce(model, t, k)
        n += int(M.prediction_mask(k).sum())
        for h in hooks:
            zero[h] += summed_ce(model, t, k, h, torch.zeros_like)
            mu = means[h].to(model_device(model))
            mean[h] += summed_ce(model, t, k, h, lambda x, mu=mu: mu.to(x.dtype).expand_as(x))
        print(f"  {start + len(t)}/{tokens.shape[0]} contexts", flush=True)
    return {"ce_clean": clean / n, "predicted_tokens": n,
            "zero": {h: zero[h] / n - clean / n for h in hooks},
            "mean": {h: mean[h] / n - clean / n for h in hooks}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--source", default="shakespeare", help="data.source of the text")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored")
    p.add_argument("--mean-tokens", type=int, default=8192, help="training tokens for the means")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-contexts", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()

    model = load_model(args.model, device=args.device, dtype="float32")
    data = DataConfig(source=args.source, context_size=args.context_size)
    hooks = hook_names(model.cfg.n_layers)
    train = load_contexts(data, model.tokenizer, "train", args.mean_tokens)
    means = means_from_model(model, hooks, train, keep_mask(train, model.tokenizer, data.exclude_tokens),
                             args.batch_contexts)
    heldout = load_contexts(data, model.tokenizer, "heldout", args.tokens)
    costs = hook_costs(model, hooks, heldout, keep_mask(heldout, model.tokenizer, data.exclude_tokens),
                       means, args.batch_contexts)
    print(f"clean CE {costs['ce_clean']:.3f} nats over {costs['predicted_tokens']:,} predicted held-out tokens")
    print(f"{'hook':28s} {'zero-ablated':>13s} {'mean-ablated':>13s}  (CE increase, nats)")
    for h in hooks:
        print(f"{h:28s} {costs['zero'][h]:>+13.3f} {costs['mean'][h]:>+13.3f}")
    if args.json:
        args.json.write_text(json.dumps(costs, indent=1))


if __name__ == "__main__":
    main()
