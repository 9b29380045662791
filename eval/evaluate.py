"""Model + dictionaries + held-out tokens -> every metric of METRICS.md, sharing the forwards.

Per batch of contexts `evaluate_dictionaries` runs
- one clean forward: the reference CE and the p_clean of the KLs;
- per hook point one zero-ablated run, and one mean-ablated run per distinct training mean at that
  hook (kept positions replaced by 0 / by x̄_train);
- per dictionary one spliced run (kept positions replaced by x̂ = decode(encode(x))); the same
  activation feeds x, x̂ and f to the reconstruction accumulator, so what is measured is what is spliced.
  A transcoder (input_hook set) is spliced at its output hook: x̂_out = transcoder(x_in), x_in the
  clean activation at its input hook (recorded by the clean forward); every reconstruction metric
  compares x̂_out with the clean x_out, and the zero / mean baselines ablate the output hook.
The clean forward records the activation at each hook, and the other runs start there: only the
layers after the hook run again, several variants stacked in one forward (`eval.forwards`,
`sae.partial_forward`); a hook or model that cannot be run on from there (or `full_forwards=True`)
reruns the whole model per variant instead, with the same numbers.

Excluded positions keep their activation in every run and count in no metric; CE and KL count the
predictions whose token and target are both kept (`eval.metrics.prediction_mask`). Everything
accumulates as sums, so the batch size changes no number.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from eval import metrics as M
from eval.forwards import Forwards, Variant
from sae.errors import HookError, UserError
from sae.models import check_hooks, hook_d_in, model_device
from sae.progress import token_bar

DEFAULT_BATCH_CONTEXTS = 8

# Hooks where writing does not replace what flows on in TL 4.3's bridge: hook_resid_mid is an
# alias of ln2.hook_in, so a replacement reaches the MLP's input but not the residual stream.
_SPLICE_CAVEATS = {
    "hook_resid_mid": "TransformerBridge (TL 4.3) aliases hook_resid_mid to ln2.hook_in: the spliced "
                      "x_hat reaches the MLP input only, not the residual stream; downstream metrics "
                      "(ce_*, kl_*, loss_recovered*) understate the damage",
}


@dataclass
class EvalTarget:
    """One thing to evaluate: a dictionary at a hook, optionally with features killed at run time
    (`set_killed(kill_mask, kill_mode)` for the duration of its runs; how ablations evaluate many
    thresholds of one dictionary without copying it)."""

    dictionary: Any  # SparseDictionary
    hook_name: str | None = None  # None: dictionary.metadata["hook_name"]
    kill_mask: Tensor | None = None
    kill_mode: str = "after"
    train_mean: Tensor | None = None  # x̄ over training tokens, [d_in]; None: from `train_means`
    info: dict[str, Any] = field(default_factory=dict)  # extra keys for eval.json

    def resolved_hook(self) -> str:
        hook = self.hook_name or self.dictionary.metadata.get("hook_name")
        if not hook:
            raise UserError("a dictionary without a hook_name in its metadata; give EvalTarget.hook_name")
        return hook

    def input_hook(self) -> str | None:
        """The hook a transcoder reads (None: an autoencoder, which reads the hook it writes)."""
        return input_hook_of(self.dictionary)


def input_hook_of(d) -> str | None:
    """A dictionary's input_hook (a transcoder's), or None."""
    cfg = getattr(d, "cfg", None)
    return getattr(cfg, "input_hook", None) if getattr(d, "is_transcoder", False) else None


def decode_from(d, f: Tensor, x_in: Tensor) -> Tensor:
    """x̂ from the features f of input x_in: decode(f), plus the skip path of a dictionary with one."""
    return d.decode(f, x_in) if getattr(d, "W_skip", None) is not None else d.decode(f)


def d_out_of(d) -> int:
    """The width of what a dictionary writes (d_in for an autoencoder)."""
    return int(getattr(d, "d_out", d.d_in))


@dataclass
class EvalResult:
    """What one dictionary's evaluation gives: `metrics` is exactly eval.json; `frequency` [d_sae]."""

    name: str
    metrics: dict[str, Any]
    frequency: Tensor

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]


@dataclass
class _MeanRuns:
    """The distinct mean-ablation runs, one per (hook, distinct training mean), and which one
    serves each target."""

    runs: list[tuple[str, Tensor]]  # (hook, x̄ [d_in] on the model's device)
    of: dict[str, int]  # target name -> index into runs


# ---- checks --------------------------------------------------------------------------------

def check_compatibility(model, targets: Mapping[str, EvalTarget]) -> None:
    """Every target's hook (and a transcoder's input hook) exists in the model and carries activations
    of the dictionary's width (HookError)."""
    hooks = sorted({t.resolved_hook() for t in targets.values()} | set(_input_hooks(targets)))
    check_hooks(model, hooks)
    widths = {h: hook_d_in(model, h) for h in hooks}
    for name, t in targets.items():
        pairs = [(t.resolved_hook(), d_out_of(t.dictionary), "d_out" if t.input_hook() else "d_in")]
        if t.input_hook():
            pairs.append((t.input_hook(), t.dictionary.d_in, "d_in"))
        for hook, width, key in pairs:
            if widths[hook] != width:
                raise HookError(f"dictionary {name!r} has {key}={width} but the model's {hook} activations "
                                f"are {widths[hook]} wide; was it trained on another model or hook?")


def _check_tokens(tokens: Tensor, keep_mask: Tensor, batch_size: int) -> None:
    if tokens.ndim != 2 or keep_mask.shape != tokens.shape:
        raise ValueError(f"tokens {list(tokens.shape)} and keep_mask {list(keep_mask.shape)} must both be "
                         f"[n_contexts, context_size]")
    if tokens.shape[1] < 2:
        raise UserError("contexts need at least 2 tokens (one prediction)")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if not bool(keep_mask.any()):
        raise UserError("every token is excluded (keep_mask is all False): nothing to evaluate")


def as_targets(dictionaries: Mapping[str, Any]) -> dict[str, EvalTarget]:
    return {name: d if isinstance(d, EvalTarget) else EvalTarget(d) for name, d in dictionaries.items()}


def _accumulator(d) -> M.ReconstructionAccumulator:
    """A dictionary's reconstruction accumulator; a feature shard seen as the whole dictionary
    (eval.sharded.ShardView) brings its own, which adds the shards' per-feature sums up."""
    own = getattr(d, "reconstruction_accumulator", None)
    return own() if own is not None else M.ReconstructionAccumulator(d_out_of(d), d.d_sae, _dict_param(d).device)


def _dict_param(d) -> Tensor:
    return d.W_enc if hasattr(d, "W_enc") else next(d.parameters())


# ---- the core ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_dictionaries(model, dictionaries: Mapping[str, Any], tokens: Tensor, keep_mask: Tensor,
                          train_means: Mapping[str, Tensor] | None = None,
                          batch_size: int = DEFAULT_BATCH_CONTEXTS, info: Mapping[str, Any] | None = None,
                          progress: bool = True, full_forwards: bool = False,
                          variants_per_forward: int | None = None) -> dict[str, EvalResult]:
    """Evaluate several dictionaries on the same tokens, sharing the model's forward passes.

    model: a TransformerBridge (any HookedTransformer-like model with run_with_hooks/hook_dict).
    dictionaries: name -> SparseDictionary or EvalTarget.
    tokens: LongTensor [n_ctx, ctx] of held-out contexts; keep_mask: BoolTensor [n_ctx, ctx],
      True where the token counts (`sae.text.keep_mask`).
    train_means: x̄ over training tokens, [d_in], for the mean-ablation baseline, keyed by
      dictionary name or by hook name (a target's own `train_mean` wins). Required.
    batch_size: contexts per forward. info: extra keys for every result's metrics (e.g. dataset).
    full_forwards: rerun the whole model for every variant (the reference path) instead of only
      the layers after the hook. variants_per_forward: variants (zero, mean, dictionaries) stacked
      along the batch in one forward after the hook; None: as many as memory allows.
    Every dictionary is evaluated in inference mode (`.eval()`); its training flag is restored after.
    Returns name -> EvalResult (metrics = the eval.json dict, frequency = [d_sae] tensor); writes
    nothing (`eval.outputs.write_outputs` does).
    """
    targets = as_targets(dictionaries)
    if not targets:
        return {}
    _check_tokens(tokens, keep_mask, batch_size)
    check_compatibility(model, targets)
    device = model_device(model)
    mean_runs = _mean_runs(targets, dict(train_means or {}), device)
    recon = {name: _accumulator(t.dictionary) for name, t in targets.items()}
    sums = M.SumAccumulator()
    forwards = Forwards(model, _hooks(targets), full=full_forwards, per_forward=variants_per_forward,
                        inputs=_input_hooks(targets))
    bar = token_bar(tokens.numel(), desc=f"evaluating {len(targets)}", enabled=progress, leave=False)
    with bar, _inference_mode(targets):
        for start in range(0, tokens.shape[0], batch_size):
            toks = tokens[start:start + batch_size].to(device)
            _evaluate_batch(forwards, targets, mean_runs, recon, sums, toks,
                            keep_mask[start:start + batch_size].to(device))
            bar.update(toks.numel())
    return {name: _result(model, name, t, recon[name], sums, mean_runs.of[name], info)
            for name, t in targets.items()}


def _hooks(targets: Mapping[str, EvalTarget]) -> list[str]:
    return sorted({t.resolved_hook() for t in targets.values()})


def _input_hooks(targets: Mapping[str, EvalTarget]) -> list[str]:
    return sorted({t.input_hook() for t in targets.values() if t.input_hook()})


def _mean_runs(targets: Mapping[str, EvalTarget], train_means: Mapping[str, Tensor],
               device: torch.device) -> _MeanRuns:
    """One mean-ablation run per (hook, distinct training mean); UserError for a missing or
    misshapen mean."""
    out = _MeanRuns([], {})
    for name, t in targets.items():
        hook = t.resolved_hook()
        mean = t.train_mean if t.train_mean is not None else train_means.get(name, train_means.get(hook))
        if mean is None:
            raise UserError(f"no training-token mean for dictionary {name!r} at {hook} (needed by ce_mean); "
                            f"pass train_means={{{name!r} or {hook!r}: tensor[d_in]}}")
        mean = torch.as_tensor(mean).flatten().to(device=device, dtype=torch.float32)
        if mean.numel() != d_out_of(t.dictionary):
            raise UserError(f"training mean for {name!r} at {hook} has {mean.numel()} entries, the dictionary "
                            f"writes {d_out_of(t.dictionary)}")
        same = [i for i, (h, m) in enumerate(out.runs) if h == hook and torch.equal(m, mean)]
        if not same:
            out.runs.append((hook, mean))
        out.of[name] = same[0] if same else len(out.runs) - 1
    return out


@contextlib.contextmanager
def _inference_mode(targets: Mapping[str, EvalTarget]) -> Iterator[None]:
    """Every dictionary in eval mode for the evaluation (a BatchTopK dictionary in training mode
    selects per batch, so its numbers would depend on the batch); each one's own training flag and
    kill mask are restored afterwards, also on error."""
    saved = {name: (t.dictionary.kill_mask, t.dictionary.kill_mode, t.dictionary.training)
             for name, t in targets.items()}
    try:
        for t in targets.values():
            t.dictionary.eval()
        yield
    finally:
        for name, t in targets.items():
            kill_mask, kill_mode, training = saved[name]
            t.dictionary.set_killed(kill_mask, kill_mode)
            t.dictionary.train(training)


def _evaluate_batch(forwards: Forwards, targets: Mapping[str, EvalTarget], mean_runs: _MeanRuns,
                    recon: Mapping[str, M.ReconstructionAccumulator], sums: M.SumAccumulator,
                    toks: Tensor, keep: Tensor) -> None:
    """One batch of contexts [b, ctx]: the clean forward, then at each hook its zero- and
    mean-ablated runs and each dictionary's spliced run; their CE and KL go into `sums`."""
    pred = M.prediction_mask(keep)
    clean = M.CleanLogProbs.of(forwards.clean(toks))
    sums.add("ce_clean", M.token_ce(clean.log_probs, toks), pred)
    for hook in _hooks(targets):
        for key, logits in forwards.logits(hook, _variants(hook, targets, mean_runs, recon, keep, forwards)):
            lp = M.token_log_probs(logits)
            sums.add("ce:" + key, M.token_ce(lp, toks), pred)
            sums.add("kl:" + key, M.token_kl(clean, lp), pred)


def _variants(hook: str, targets: Mapping[str, EvalTarget], mean_runs: _MeanRuns,
              recon: Mapping[str, M.ReconstructionAccumulator], keep: Tensor, forwards: Forwards) -> list[Variant]:
    """The runs at one hook: zero-ablated, mean-ablated per distinct mean, each dictionary spliced."""
    keep3 = keep[..., None]
    runs: list[Variant] = [("zero:" + hook, lambda x: torch.where(keep3, torch.zeros_like(x), x))]
    runs += [(f"mean:{i}", lambda x, mean=mean: torch.where(keep3, mean.to(x.dtype), x))
             for i, (h, mean) in enumerate(mean_runs.runs) if h == hook]
    runs += [("sae:" + name, _splice(t, keep, recon[name], forwards))
             for name, t in targets.items() if t.resolved_hook() == hook]
    return runs


def _splice(t: EvalTarget, keep: Tensor, acc: M.ReconstructionAccumulator, forwards: Forwards | None = None):
    """A dictionary's spliced activation (with the target's kill mask for the call); feeds its
    accumulator. A transcoder encodes the clean activation at its input hook."""
    d = t.dictionary
    p = _dict_param(d)

    def splice(x: Tensor) -> Tensor:
        saved_kill = (d.kill_mask, d.kill_mode)
        d.set_killed(t.kill_mask, t.kill_mode)
        try:
            xd = x.to(device=p.device, dtype=p.dtype)
            x_in = xd if t.input_hook() is None else forwards.recorded(t.input_hook()).to(p.device, p.dtype)
            f = d.encode(x_in)
            x_hat = decode_from(d, f, x_in)
        finally:
            d.set_killed(*saved_kill)
        k = keep.to(p.device)
        acc.update(xd[k], x_hat[k], f[k])
        return torch.where(keep[..., None], x_hat.to(device=x.device, dtype=x.dtype), x)

    return splice


def _result(model, name: str, t: EvalTarget, recon: M.ReconstructionAccumulator, sums: M.SumAccumulator,
            mean_run: int, info: Mapping[str, Any] | None) -> EvalResult:
    """One target's EvalResult from the accumulated sums (warns about a hook with a splice caveat)."""
    hook = t.resolved_hook()
    d = t.dictionary
    rec = recon.result()
    down = M.downstream_metrics(
        ce_clean=sums.mean("ce_clean"), ce_sae=sums.mean("ce:sae:" + name),
        ce_zero=sums.mean("ce:zero:" + hook), ce_mean=sums.mean(f"ce:mean:{mean_run}"),
        kl_sae=sums.mean("kl:sae:" + name), kl_zero=sums.mean("kl:zero:" + hook))
    metadata = d.metadata
    out: dict[str, Any] = {
        "name": name,
        "architecture": getattr(d, "architecture", type(d).__name__),
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "model": metadata.get("model_name") or getattr(model.cfg, "model_name", None),
        "hook": hook,
        **({"input_hook": t.input_hook(), "d_out": d_out_of(d)} if t.input_hook() else {}),
        "dataset": metadata.get("dataset"),
        "tokens_evaluated": rec.pop("tokens_evaluated"),
        "predictions_evaluated": sums.counts["ce_clean"],
        **{key: rec[key] for key in M.RECONSTRUCTION_KEYS},
        **down,
        **{key: rec[key] for key in M.FEATURE_KEYS},
    }
    if t.kill_mask is not None:
        out["killed"] = int(t.kill_mask.sum())
        out["kill_mode"] = t.kill_mode
    caveat = _SPLICE_CAVEATS.get(hook.rsplit(".", 1)[-1])
    if caveat is not None:
        out["splice_caveat"] = caveat
        warnings.warn(f"{name}: {caveat}", stacklevel=3)
    out.update(dict(info or {}))
    out.update(t.info)
    return EvalResult(name, out, recon.frequency())


@torch.no_grad()
def reconstruction_metrics(dictionary, activations: Tensor, batch_size: int = 4096,
                           targets: Tensor | None = None) -> tuple[dict[str, Any], Tensor]:
    """Reconstruction and feature metrics (no model, no CE/KL) of a dictionary on activations
    [n, d_in] that are all to be counted (e.g. read from the activation cache); a transcoder's
    prediction is compared with `targets` [n, d_out] (its output hook's activations of the same
    tokens). Returns (metrics, frequency)."""
    p = _dict_param(dictionary)
    acc = _accumulator(dictionary)
    was_training = dictionary.training
    try:
        dictionary.eval()  # inference mode, as in evaluate_dictionaries
        for start in range(0, activations.shape[0], batch_size):
            x = activations[start:start + batch_size].to(device=p.device, dtype=p.dtype)
            y = x if targets is None else targets[start:start + batch_size].to(device=p.device, dtype=p.dtype)
            f = dictionary.encode(x)
            acc.update(y, decode_from(dictionary, f, x), f)
    finally:
        dictionary.train(was_training)
    return acc.result(), acc.frequency()
