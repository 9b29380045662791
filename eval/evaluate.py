"""Model + dictionaries + held-out tokens -> every metric of METRICS.md.

The core is `evaluate_dictionaries`: it takes a loaded model, any number of dictionaries
(possibly on different hooks) and the token contexts with their keep mask, and shares the
model's forward passes between them. Per batch of contexts it runs

- one clean forward (no hooks): the reference logits, CE and the p_clean of the KLs;
- per hook point: one zero-ablated forward, and one mean-ablated forward per distinct
  training mean at that hook (kept positions replaced by 0 / by x̄_train);
- per dictionary: one spliced forward, the hook replacing x by x̂ = decode(encode(x)) at the
  kept positions; the same hook feeds x, x̂ and f of those positions to the reconstruction
  accumulator, so the activations measured are exactly the ones spliced.

Excluded positions (BOS, padding, ... per the data config) keep their original activation in
every run and count in no metric. CE and KL use the predictions at positions t whose token t and
target t+1 are both kept (`eval.metrics.prediction_mask`). Everything accumulates as sums, so
the batch size changes no number, and memory is bounded by the batch (a few [batch, pos, vocab]
tensors), not by the number of tokens.

TransformerBridge's `start_at_layer` (TL 4.3) still runs the blocks before the start layer (it
feeds the injected residual as inputs_embeds and swaps it in at block k), so it would save
nothing here; every run is a full forward.

The command-line side (`evaluate_dirs`) loads the dictionaries' model and held-out text from
their cfg.json, finds each dictionary's training mean, evaluates and writes per dictionary:
eval.json, frequency.safetensors and frequency_histogram.png.
"""

from __future__ import annotations

import json
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from eval import metrics as M
from sae.errors import HookError, UserError
from sae.models import model_device

EVAL_FILE = "eval.json"
FREQUENCY_FILE = "frequency.safetensors"
HISTOGRAM_FILE = "frequency_histogram.png"
MEAN_FILE = "activation_mean.safetensors"

DEFAULT_EVAL_TOKENS = 16_384  # the CLI's --tokens default (= the run config's eval_tokens default)
DEFAULT_MEAN_TOKENS = 32_768  # training tokens for x̄ when a dictionary folder has no activation_mean
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


@dataclass
class EvalResult:
    """What one dictionary's evaluation gives: `metrics` is exactly eval.json; `frequency` [d_sae]."""

    name: str
    metrics: dict[str, Any]
    frequency: Tensor

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]


# ---- checks --------------------------------------------------------------------------------

def check_compatibility(model, targets: Mapping[str, EvalTarget]) -> None:
    """Every target's hook exists in the model and carries d_in-wide activations (HookError)."""
    from sae.models import check_hooks, hook_d_in

    hooks = sorted({t.resolved_hook() for t in targets.values()})
    check_hooks(model, hooks)
    widths = {h: hook_d_in(model, h) for h in hooks}
    for name, t in targets.items():
        hook = t.resolved_hook()
        if widths[hook] != t.dictionary.d_in:
            raise HookError(f"dictionary {name!r} has d_in={t.dictionary.d_in} but the model's {hook} "
                            f"activations are {widths[hook]} wide; was it trained on another model or hook?")


def _as_targets(dictionaries: Mapping[str, Any]) -> dict[str, EvalTarget]:
    return {name: d if isinstance(d, EvalTarget) else EvalTarget(d) for name, d in dictionaries.items()}


def _dict_param(d) -> Tensor:
    return d.W_enc if hasattr(d, "W_enc") else next(d.parameters())


def check_counts(n_tokens: int | None = None, batch_size: int | None = None,
                 mean_tokens: int | None = None) -> None:
    """The command line's counts (--tokens, --batch-size, --mean-tokens) must be positive integers
    (UserError); None: not given, nothing to check."""
    for flag, value in (("--tokens", n_tokens), ("--batch-size", batch_size), ("--mean-tokens", mean_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise UserError(f"{flag} must be a positive integer, got {value!r}")


def counts_or_defaults(n_tokens: int | None, batch_size: int | None,
                       mean_tokens: int | None) -> tuple[int, int, int]:
    """The command line's counts with the defaults filled in for those not given, checked."""
    counts = (DEFAULT_EVAL_TOKENS if n_tokens is None else n_tokens,
              DEFAULT_BATCH_CONTEXTS if batch_size is None else batch_size,
              DEFAULT_MEAN_TOKENS if mean_tokens is None else mean_tokens)
    check_counts(*counts)
    return counts


# ---- the core ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_dictionaries(model, dictionaries: Mapping[str, Any], tokens: Tensor, keep_mask: Tensor,
                          train_means: Mapping[str, Tensor] | None = None,
                          out_dirs: Mapping[str, str | Path] | None = None,
                          batch_size: int = DEFAULT_BATCH_CONTEXTS, info: Mapping[str, Any] | None = None,
                          progress: bool = True, histograms: bool = True) -> dict[str, EvalResult]:
    """Evaluate several dictionaries on the same tokens, sharing the model's forward passes.

    model: a TransformerBridge (any HookedTransformer-like model with run_with_hooks/hook_dict).
    dictionaries: name -> SparseDictionary or EvalTarget.
    tokens: LongTensor [n_ctx, ctx] of held-out contexts; keep_mask: BoolTensor [n_ctx, ctx],
      True where the token counts (`sae.text.keep_mask`).
    train_means: x̄ over training tokens, [d_in], for the mean-ablation baseline, keyed by
      dictionary name or by hook name (a target's own `train_mean` wins). Required.
    out_dirs: name -> folder; where given, eval.json, frequency.safetensors and (histograms=True)
      frequency_histogram.png are written there.
    batch_size: contexts per forward. info: extra keys for every eval.json (e.g. dataset).
    Every dictionary is evaluated in inference mode (`.eval()`); its training flag is restored after.
    Returns name -> EvalResult (metrics = the eval.json dict, frequency = [d_sae] tensor).
    """
    targets = _as_targets(dictionaries)
    if not targets:
        return {}
    if tokens.ndim != 2 or keep_mask.shape != tokens.shape:
        raise ValueError(f"tokens {list(tokens.shape)} and keep_mask {list(keep_mask.shape)} must both be "
                         f"[n_contexts, context_size]")
    if tokens.shape[1] < 2:
        raise UserError("contexts need at least 2 tokens (one prediction)")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if not bool(keep_mask.any()):
        raise UserError("every token is excluded (keep_mask is all False): nothing to evaluate")
    check_compatibility(model, targets)
    device = model_device(model)
    train_means = dict(train_means or {})

    # Distinct mean-ablation runs: one per (hook, distinct training mean).
    means_for: dict[str, int] = {}  # target name -> index into mean_runs
    mean_runs: list[tuple[str, Tensor]] = []
    for name, t in targets.items():
        hook = t.resolved_hook()
        mean = t.train_mean if t.train_mean is not None else train_means.get(name, train_means.get(hook))
        if mean is None:
            raise UserError(f"no training-token mean for dictionary {name!r} at {hook} (needed by ce_mean); "
                            f"pass train_means={{{name!r} or {hook!r}: tensor[d_in]}}")
        mean = torch.as_tensor(mean).flatten().to(device=device, dtype=torch.float32)
        if mean.numel() != t.dictionary.d_in:
            raise UserError(f"training mean for {name!r} has {mean.numel()} entries, d_in is {t.dictionary.d_in}")
        for i, (h, m) in enumerate(mean_runs):
            if h == hook and torch.equal(m, mean):
                means_for[name] = i
                break
        else:
            means_for[name] = len(mean_runs)
            mean_runs.append((hook, mean))
    hooks = sorted({t.resolved_hook() for t in targets.values()})

    recon = {name: M.ReconstructionAccumulator(t.dictionary.d_in, t.dictionary.d_sae, _dict_param(t.dictionary).device)
             for name, t in targets.items()}
    sums = M.SumAccumulator()
    n_ctx = tokens.shape[0]
    from sae.progress import token_bar

    bar = token_bar(tokens.numel(), desc=f"evaluating {len(targets)}", enabled=progress, leave=False)
    saved_kill = {name: (t.dictionary.kill_mask, t.dictionary.kill_mode) for name, t in targets.items()}
    # Inference mode for the evaluation (a BatchTopK dictionary in training mode selects per batch,
    # so its numbers would depend on the batch); each dictionary's own flag is restored afterwards.
    saved_training = {name: t.dictionary.training for name, t in targets.items()}
    try:
        for t in targets.values():
            t.dictionary.eval()
        for start in range(0, n_ctx, batch_size):
            toks = tokens[start:start + batch_size].to(device)
            keep = keep_mask[start:start + batch_size].to(device)
            pred = M.prediction_mask(keep)
            keep3 = keep[..., None]

            clean_lp = M.token_log_probs(model(toks, return_type="logits"))
            sums.add("ce_clean", M.token_ce(clean_lp, toks), pred)

            def run(key: str, hook: str, fn) -> None:
                lp = M.token_log_probs(model.run_with_hooks(toks, fwd_hooks=[(hook, fn)], return_type="logits"))
                sums.add("ce:" + key, M.token_ce(lp, toks), pred)
                sums.add("kl:" + key, M.token_kl(clean_lp, lp), pred)

            for hook in hooks:
                run("zero:" + hook, hook, lambda x, hook: torch.where(keep3, torch.zeros_like(x), x))
            for i, (hook, mean) in enumerate(mean_runs):
                run(f"mean:{i}", hook, lambda x, hook, mean=mean: torch.where(keep3, mean.to(x.dtype), x))
            for name, t in targets.items():
                d = t.dictionary
                d.set_killed(t.kill_mask, t.kill_mode)
                run("sae:" + name, t.resolved_hook(), _splice_hook(d, keep, recon[name]))
                d.set_killed(*saved_kill[name])
            bar.update(toks.numel())
    finally:
        bar.close()
        for name, t in targets.items():
            t.dictionary.set_killed(*saved_kill[name])
            t.dictionary.train(saved_training[name])

    results: dict[str, EvalResult] = {}
    for name, t in targets.items():
        hook = t.resolved_hook()
        d = t.dictionary
        rec = recon[name].result()
        down = M.downstream_metrics(
            ce_clean=sums.mean("ce_clean"), ce_sae=sums.mean("ce:sae:" + name),
            ce_zero=sums.mean("ce:zero:" + hook), ce_mean=sums.mean(f"ce:mean:{means_for[name]}"),
            kl_sae=sums.mean("kl:sae:" + name), kl_zero=sums.mean("kl:zero:" + hook))
        md = d.metadata
        out: dict[str, Any] = {
            "name": name,
            "architecture": getattr(d, "architecture", type(d).__name__),
            "d_in": d.d_in,
            "d_sae": d.d_sae,
            "model": md.get("model_name") or getattr(model.cfg, "model_name", None),
            "hook": hook,
            "dataset": md.get("dataset"),
            "tokens_evaluated": rec.pop("tokens_evaluated"),
            "predictions_evaluated": sums.counts["ce_clean"],
        }
        for key in M.RECONSTRUCTION_KEYS:
            out[key] = rec[key]
        out.update(down)
        for key in M.FEATURE_KEYS:
            out[key] = rec[key]
        if t.kill_mask is not None:
            out["killed"] = int(t.kill_mask.sum())
            out["kill_mode"] = t.kill_mode
        suffix = hook.rsplit(".", 1)[-1]
        if suffix in _SPLICE_CAVEATS:
            out["splice_caveat"] = _SPLICE_CAVEATS[suffix]
        out.update(dict(info or {}))
        out.update(t.info)
        results[name] = EvalResult(name, out, recon[name].frequency())
        if suffix in _SPLICE_CAVEATS:
            warnings.warn(f"{name}: {_SPLICE_CAVEATS[suffix]}", stacklevel=2)
    if out_dirs:
        for name, directory in out_dirs.items():
            if name in results:
                write_outputs(directory, results[name], histogram=histograms)
    return results


def _splice_hook(d, keep: Tensor, acc: M.ReconstructionAccumulator):
    """The forward hook of a dictionary's spliced run (also feeds its accumulator)."""
    p = _dict_param(d)

    def hook_fn(x: Tensor, hook) -> Tensor:
        xd = x.to(device=p.device, dtype=p.dtype)
        f = d.encode(xd)
        x_hat = d.decode(f)
        k = keep.to(p.device)
        acc.update(xd[k], x_hat[k], f[k])
        return torch.where(keep[..., None], x_hat.to(device=x.device, dtype=x.dtype), x)

    return hook_fn


@torch.no_grad()
def reconstruction_metrics(dictionary, activations: Tensor, batch_size: int = 4096) -> tuple[dict[str, Any], Tensor]:
    """Reconstruction and feature metrics (no model, no CE/KL) of a dictionary on activations
    [n, d_in] that are all to be counted (e.g. read from the activation cache). Returns
    (metrics, frequency)."""
    p = _dict_param(dictionary)
    acc = M.ReconstructionAccumulator(dictionary.d_in, dictionary.d_sae, p.device)
    was_training = dictionary.training
    try:
        dictionary.eval()  # inference mode, as in evaluate_dictionaries
        for start in range(0, activations.shape[0], batch_size):
            x = activations[start:start + batch_size].to(device=p.device, dtype=p.dtype)
            f = dictionary.encode(x)
            acc.update(x, dictionary.decode(f), f)
    finally:
        dictionary.train(was_training)
    return acc.result(), acc.frequency()


@torch.no_grad()
def compute_activation_means(model, hook_names: Iterable[str], tokens: Tensor, keep_mask: Tensor,
                             batch_size: int = DEFAULT_BATCH_CONTEXTS) -> dict[str, Tensor]:
    """hook -> mean activation [d_in] (float32, CPU) over the kept tokens, accumulated in float64.

    For the mean-ablation baseline when a dictionary folder has no activation_mean.safetensors:
    pass *training*-split contexts here (METRICS.md: x̄ from training tokens)."""
    from sae.models import check_hooks, stop_layer

    hook_names = sorted(set(hook_names))
    check_hooks(model, hook_names)
    device = model_device(model)
    totals: dict[str, Tensor] = {}
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        toks = tokens[start:start + batch_size].to(device)
        keep = keep_mask[start:start + batch_size].to(device)
        count += int(keep.sum())

        def grabber(name: str):
            def grab(x: Tensor, hook) -> None:
                s = x[keep].to(torch.float64).sum(dim=0)
                totals[name] = totals[name] + s if name in totals else s
            return grab

        fwd = [(h, grabber(h)) for h in hook_names]
        model.run_with_hooks(toks, fwd_hooks=fwd, stop_at_layer=stop_layer(hook_names))
    if count == 0:
        raise UserError("no kept tokens to compute the activation mean from")
    return {h: (totals[h] / count).float().cpu() for h in hook_names}


# ---- outputs -------------------------------------------------------------------------------

def write_outputs(directory: str | Path, result: EvalResult, histogram: bool = True) -> None:
    """eval.json, frequency.safetensors (+ its tokens_evaluated) and frequency_histogram.png."""
    from sae import io

    directory = Path(directory)
    io.write_json(directory / EVAL_FILE, M.jsonable(result.metrics))
    meta = {"tokens_evaluated": str(result.metrics["tokens_evaluated"]),
            "hook": str(result.metrics.get("hook")), "model": str(result.metrics.get("model")),
            "source": "eval"}
    io.save_tensors(directory / FREQUENCY_FILE, {"frequency": result.frequency}, metadata=meta)
    if histogram:
        from eval.histogram import plot_frequency_histogram

        plot_frequency_histogram(result.frequency, directory / HISTOGRAM_FILE, title=result.name,
                                 tokens_evaluated=result.metrics["tokens_evaluated"])


def read_frequency(directory: str | Path, d_sae: int | None = None) -> tuple[Tensor, dict[str, str]] | None:
    """(frequency [d_sae], metadata) from a folder's frequency.safetensors, or None when absent."""
    from safetensors import safe_open

    path = Path(directory) / FREQUENCY_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        freq = f.get_tensor("frequency")
    if d_sae is not None and freq.numel() != d_sae:
        raise UserError(f"{path} has {freq.numel()} frequencies but the dictionary has {d_sae} features; "
                        f"delete it to measure again")
    return freq, meta


def frequency_tokens(meta: Mapping[str, str]) -> int | None:
    """The tokens a stored frequency was measured on (its `tokens_evaluated`), None when unrecorded."""
    value = str(meta.get("tokens_evaluated", "")).strip()
    return int(value) if value.isdigit() else None


def frequency_source(path: str | Path, meta: Mapping[str, str]) -> str:
    """Where a stored frequency came from, for messages and the `frequency_source` records: the path,
    and, when it records no token count (e.g. written by `python -m sae.convert` from SAELens's
    training-time sparsity), its own `source` metadata and a warning that it is no held-out measurement."""
    if frequency_tokens(meta) is not None:
        return str(path)
    origin = meta.get("source") or "origin not recorded"
    return (f"{path} ({origin}; no token count recorded, so not known to be measured on held-out tokens: "
            f"delete the file to measure them)")


def with_tokens(source: str, tokens: int | None) -> str:
    """'SOURCE (N tokens)', or SOURCE alone when the token count is unknown."""
    return source if tokens is None else f"{source} ({tokens} tokens)"


# ---- the command line's loading ------------------------------------------------------------

@dataclass
class LoadedGroup:
    """Dictionaries that share a model and a held-out token set (one forward pass serves them all);
    `prepare` loads the tokens and the training means, `evaluate` runs."""

    model: Any
    model_name: str
    data_cfg: Any  # sae.text.DataConfig
    names: list[str]
    dirs: dict[str, Path]
    dictionaries: dict[str, Any]
    tokens: Tensor | None = None
    keep: Tensor | None = None
    means: dict[str, Tensor] = field(default_factory=dict)
    mean_sources: dict[str, str] = field(default_factory=dict)

    def prepare(self, n_tokens: int, batch_size: int, mean_tokens: int = DEFAULT_MEAN_TOKENS) -> "LoadedGroup":
        self.tokens, self.keep = heldout_tokens(self.model, self.data_cfg, n_tokens)
        self.means, self.mean_sources = train_means_for(self, batch_size, mean_tokens)
        return self

    def evaluate(self, targets: Mapping[str, Any], out_dirs: Mapping[str, Path] | None, batch_size: int,
                 progress: bool = True, means_of: Mapping[str, str] | None = None) -> dict[str, EvalResult]:
        """Evaluate on the group's tokens. means_of: target name -> the loaded dictionary whose
        training mean it uses (default: its own name)."""
        means_of = dict(means_of or {})
        prepared = {}
        for name, t in _as_targets(targets).items():
            source = means_of.get(name, name)
            t.train_mean = self.means[source] if t.train_mean is None else t.train_mean
            t.info = {"mean_ablation_source": self.mean_sources[source], **t.info}
            prepared[name] = t
        return evaluate_dictionaries(self.model, prepared, self.tokens, self.keep, out_dirs=out_dirs,
                                     batch_size=batch_size, info=eval_info(self.data_cfg), progress=progress)

    def frequency(self, name: str, batch_size: int, progress: bool = True):
        """(frequency, source, tokens it was measured on, EvalResult or None) of a loaded dictionary:
        its folder's frequency.safetensors, or measured now on the held-out tokens (then its
        eval.json etc. are written too, and the EvalResult is returned)."""
        directory, d = self.dirs[name], self.dictionaries[name]
        found = read_frequency(directory, d.d_sae)
        if found is not None:
            frequency, meta = found
            tokens = frequency_tokens(meta)
            source = frequency_source(directory / FREQUENCY_FILE, meta)
            print(f"frequencies from {with_tokens(source, tokens)}", flush=True)
            return frequency, source, tokens, None
        print(f"no {FREQUENCY_FILE} in {directory}: measuring frequencies on {int(self.keep.sum())} held-out "
              f"tokens", flush=True)
        result = self.evaluate({name: d}, {name: directory}, batch_size, progress)[name]
        return (result.frequency, f"evaluation of {directory} on held-out tokens",
                result.metrics["tokens_evaluated"], result)


def dictionary_names(dirs: list[Path]) -> list[str]:
    """Folder names, made unique with parent folders where two collide."""
    names = [d.resolve().name for d in dirs]
    for i, d in enumerate(dirs):
        if names.count(names[i]) > 1:
            names[i] = f"{d.resolve().parent.name}/{d.resolve().name}"
    if len(set(names)) != len(names):
        names = [str(d) for d in dirs]
    return names


def data_config_for(dictionary, data_source: str | None = None):
    """The DataConfig of the text the dictionary was trained on (its held-out split is evaluated)."""
    from sae.text import DataConfig

    raw = dictionary.metadata.get("dataset")
    if raw is None and data_source is None:
        raise UserError("the dictionary's cfg.json records no dataset; pass --data SOURCE (e.g. shakespeare, "
                        "a local text file or a hub dataset id) to choose the held-out text")
    if isinstance(raw, str):
        raw = {"source": raw}
    raw = dict(raw or {})
    if data_source is not None:
        raw["source"] = data_source
    ctx = dictionary.metadata.get("context_size")
    if ctx is not None and "context_size" not in raw:
        raw["context_size"] = ctx
    try:
        return DataConfig.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: one line
        raise UserError(f"dataset recorded in cfg.json is not a valid data config: {str(e).splitlines()[0]}") from e


def load_groups(dirs: list[str | Path], device: str = "auto", dtype: str | None = None,
                data_source: str | None = None) -> list[LoadedGroup]:
    """Load dictionaries from folders and their models; one group per (model, held-out text)."""
    import sae.dictionaries  # noqa: F401  (registers every architecture)
    from sae.loading import load_dictionary
    from sae.models import load_model, resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    paths = [Path(p) for p in dirs]
    names = dictionary_names(paths)
    groups: dict[tuple, dict] = {}
    for name, path in zip(names, paths):
        d = load_dictionary(path, device=dev)
        model_name = d.metadata.get("model_name")
        if not model_name:
            raise UserError(f"{path}/cfg.json records no model_name; cannot tell which model to run")
        data_cfg = data_config_for(d, data_source)
        key = (model_name, json.dumps(data_cfg.model_dump(mode="json"), sort_keys=True))
        g = groups.setdefault(key, {"model_name": model_name, "data_cfg": data_cfg, "names": [], "dirs": {},
                                    "dictionaries": {}})
        g["names"].append(name)
        g["dirs"][name] = path
        g["dictionaries"][name] = d
    out = []
    for g in groups.values():
        model_dtype = dtype or next(iter(g["dictionaries"].values())).metadata.get("model_dtype") or "float32"
        print(f"loading model {g['model_name']} ({model_dtype}) on {dev}", flush=True)
        model = load_model(g["model_name"], device=dev, dtype=model_dtype)
        out.append(LoadedGroup(model=model, **g))
    return out


def eval_info(data_cfg) -> dict[str, Any]:
    """The eval.json keys that say what text was evaluated: the data config (its `split` is the
    source's own split, e.g. a hub split) and `evaluated_split` = "heldout" (sae.text's hash split)."""
    return {"dataset": data_cfg.model_dump(mode="json"), "evaluated_split": "heldout"}


def heldout_tokens(model, data_cfg, n_tokens: int) -> tuple[Tensor, Tensor]:
    from sae.text import keep_mask, load_contexts

    tokens = load_contexts(data_cfg, model.tokenizer, split="heldout", n_tokens=n_tokens)
    return tokens, keep_mask(tokens, model.tokenizer, data_cfg.exclude_tokens)


def train_means_for(group: LoadedGroup, batch_size: int, mean_tokens: int = DEFAULT_MEAN_TOKENS,
                    quiet: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Each dictionary's x̄ over training tokens: its folder's activation_mean.safetensors, or
    (computed once per hook) the mean over `mean_tokens` training-split tokens. Returns
    (name -> mean, name -> a sentence saying where it came from)."""
    from sae import io
    from sae.text import keep_mask, load_contexts

    means: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    missing: dict[str, list[str]] = {}
    for name, d in group.dictionaries.items():
        path = group.dirs[name] / MEAN_FILE
        if path.is_file():
            tensors = io.load_tensors(path)
            if "mean" not in tensors:
                raise UserError(f"{path} has no tensor 'mean'")
            means[name] = tensors["mean"].float()
            sources[name] = f"{MEAN_FILE} (training tokens)"
        else:
            missing.setdefault(d.metadata["hook_name"], []).append(name)
    if missing:
        try:
            tokens = load_contexts(group.data_cfg, group.model.tokenizer, split="train", n_tokens=mean_tokens)
        except UserError as e:
            raise UserError(f"{e} (these are the training tokens for the mean-ablation baseline's x̄, needed "
                            f"because there is no {MEAN_FILE}: lower --mean-tokens)") from e
        keep = keep_mask(tokens, group.model.tokenizer, group.data_cfg.exclude_tokens)
        n = int(keep.sum())
        if not quiet:
            print(f"no {MEAN_FILE} for {', '.join(sum(missing.values(), []))}: computing the mean activation "
                  f"for the mean-ablation baseline from {n} training-split tokens", flush=True)
        computed = compute_activation_means(group.model, list(missing), tokens, keep, batch_size)
        for hook, names in missing.items():
            for name in names:
                means[name] = computed[hook]
                sources[name] = f"computed from {n} training-split tokens"
    return means, sources


def expand_run_dirs(dirs: list[str | Path]) -> list[Path]:
    """Each folder that is not itself a dictionary but holds some (a run) -> those, sorted."""
    from sae.loading import detect_format

    out: list[Path] = []
    for d in map(Path, dirs):
        inside = [] if not d.is_dir() or detect_format(d) is not None else \
            sorted(p for p in d.iterdir() if p.is_dir() and detect_format(p) is not None)
        out.extend(inside or [d])
    return out


def evaluate_dirs(dirs: list[str | Path], n_tokens: int = DEFAULT_EVAL_TOKENS,
                  batch_size: int = DEFAULT_BATCH_CONTEXTS, device: str = "auto", dtype: str | None = None,
                  data_source: str | None = None, mean_tokens: int = DEFAULT_MEAN_TOKENS,
                  write: bool = True, progress: bool = True) -> dict[str, EvalResult]:
    """`python -m eval evaluate`: evaluate dictionary folders (a run folder stands for every
    dictionary in it), writing eval.json etc. into each."""
    check_counts(n_tokens, batch_size, mean_tokens)
    dirs = expand_run_dirs(dirs)
    results: dict[str, EvalResult] = {}
    for group in load_groups(dirs, device=device, dtype=dtype, data_source=data_source):
        group.prepare(n_tokens, batch_size, mean_tokens)
        results.update(group.evaluate(group.dictionaries, group.dirs if write else None, batch_size, progress))
    return results
