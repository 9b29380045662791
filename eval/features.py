"""python -m eval features DICTIONARY_DIR [--features 4,27,56 | --random 10] [--min-frequency F] [--max-frequency F]

What a researcher otherwise does by hand for a few features of a dictionary, written as one
self-contained HTML page (no network needed to read it) plus the same data as JSON:

- frequency: the fraction of held-out tokens on which the feature fires (f != 0);
- top-activating contexts: the held-out contexts with the highest activation, each shown as a
  window around its most active token with every token highlighted by its activation;
- random activating contexts across quantiles: the contexts where the feature fires, sorted by
  their maximum activation, cut into --quantiles bins, a few drawn at random from each bin;
- logit lens: the tokens the decoder direction W_dec[i] promotes and suppresses through the
  unembedding (W_dec[i] · W_U, no final norm);
- nearest tokens: the token embeddings (rows of W_E) with the highest cosine similarity to W_dec[i].

The two last ones need d_in = d_model (residual stream, MLP or attention output hooks).

Text, model and hook come from the dictionary's cfg.json as for `python -m eval evaluate`
(eval.folders.load_groups / heldout_tokens): the held-out split of the text it was trained on.
Features are chosen with --features, or --random N (among the features that fire at all, within
--min-frequency / --max-frequency when given; default: 10 at random). Two passes over the held-out
tokens: one encodes everything (frequencies, each context's maximum per feature), one re-runs
only the contexts shown, for per-token activations of the chosen features.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eval.evaluate import DEFAULT_BATCH_CONTEXTS
from eval.folders import check_counts, heldout_tokens, load_groups
from eval.kill_frequency import input_hook
from sae import io
from sae.errors import UserError
from sae.models import stop_layer

HTML_FILE = "features.html"
JSON_FILE = "features.json"
DEFAULT_TOKENS = 16_384
DEFAULT_RANDOM = 10
WINDOW_BEFORE, WINDOW_AFTER = 24, 8  # tokens shown around an example's most active token
N_LENS = 10  # tokens listed by the logit lens (each way) and as nearest embeddings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[1]
    p.add_argument("dir", metavar="DICTIONARY_DIR", help="a dictionary folder (cfg.json + sae.safetensors)")
    p.add_argument("--features", default=None, help="comma-separated feature ids, e.g. 4,27,56,138")
    p.add_argument("--random", type=int, default=None, metavar="N",
                   help=f"N features at random among those that fire (default {DEFAULT_RANDOM} when no --features)")
    p.add_argument("--min-frequency", type=float, default=None, help="random features with frequency >= F")
    p.add_argument("--max-frequency", type=float, default=None, help="random features with frequency <= F")
    p.add_argument("--top", type=int, default=10, help="top-activating contexts per feature (default 10)")
    p.add_argument("--quantiles", type=int, default=4, help="activation quantile bins for random examples (default 4)")
    p.add_argument("--per-quantile", type=int, default=2, help="random examples per quantile bin (default 2)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"held-out tokens to scan (default {DEFAULT_TOKENS}; rounded up to whole contexts)")
    p.add_argument("--out", default=None, metavar="OUT_DIR", help="where to write (default DICTIONARY_DIR/features)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices (default 0)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_CONTEXTS, help="contexts per model forward")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16, float16")
    p.add_argument("--data", default=None, metavar="SOURCE", help="held-out text source instead of cfg.json's")


def run(args: argparse.Namespace) -> None:
    features = parse_ids(args.features) if args.features else None
    html, js = feature_pages(args.dir, features=features, n_random=args.random, min_frequency=args.min_frequency,
                             max_frequency=args.max_frequency, top=args.top, quantiles=args.quantiles,
                             per_quantile=args.per_quantile, n_tokens=args.tokens, out_dir=args.out,
                             seed=args.seed, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                             data_source=args.data)
    print(f"wrote {html} and {js}")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"--features {text!r}: expected comma-separated integers, e.g. 4,27,56") from None
    if not ids:
        raise UserError("--features is empty")
    return ids


# ---- the two passes -------------------------------------------------------------------------

def _encode_batches(model, d, hook: str, tokens: Tensor, batch_size: int):
    """Yield (start, f [b, pos, d_sae]) for each batch of contexts (the forward stops after the hook)."""
    device = next(model.parameters()).device
    for start in range(0, tokens.shape[0], batch_size):
        grabbed: dict[str, Tensor] = {}

        def grab(x: Tensor, hook) -> None:
            grabbed["x"] = x

        model.run_with_hooks(tokens[start:start + batch_size].to(device), fwd_hooks=[(hook, grab)],
                             stop_at_layer=stop_layer([hook]))
        yield start, d.encode(grabbed["x"].to(device=d.W_enc.device, dtype=d.W_enc.dtype)).float()


@torch.no_grad()
def scan(model, d, hook: str, tokens: Tensor, keep: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(frequency [d_sae], each context's maximum activation [n_ctx, d_sae]) over kept tokens."""
    counts = torch.zeros(d.d_sae, dtype=torch.float64)
    ctx_max = torch.zeros(tokens.shape[0], d.d_sae)
    for start, f in _encode_batches(model, d, hook, tokens, batch_size):
        k = keep[start:start + f.shape[0]].to(f.device)[..., None]
        f = (f * k).cpu()
        counts += (f != 0).sum(dim=(0, 1)).double()
        ctx_max[start:start + f.shape[0]] = f.amax(dim=1)
    return (counts / max(1, int(keep.sum()))).float(), ctx_max


@torch.no_grad()
def token_activations(model, d, hook: str, tokens: Tensor, keep: Tensor, ids: list[int],
                      batch_size: int) -> Tensor:
    """[n_ctx, pos, len(ids)] activations of features `ids` at every kept token of `tokens`."""
    out = []
    for start, f in _encode_batches(model, d, hook, tokens, batch_size):
        out.append((f[..., ids] * keep[start:start + f.shape[0]].to(f.device)[..., None]).cpu())
    return torch.cat(out) if out else torch.zeros(0, tokens.shape[1], len(ids))


# ---- choosing features and examples -----------------------------------------------------------

def select_features(frequency: Tensor, features: list[int] | None, n_random: int | None,
                    min_frequency: float | None, max_frequency: float | None, seed: int) -> tuple[list[int], str]:
    """(feature ids, a sentence saying how they were chosen)."""
    d_sae = frequency.numel()
    if features is not None:
        if n_random is not None or min_frequency is not None or max_frequency is not None:
            raise UserError("give either --features or --random / a frequency band, not both")
        bad = [i for i in features if not 0 <= i < d_sae]
        if bad:
            raise UserError(f"feature ids {bad} out of range: the dictionary has features 0..{d_sae - 1}")
        return list(dict.fromkeys(features)), "given"
    lo = -math.inf if min_frequency is None else min_frequency
    hi = math.inf if max_frequency is None else max_frequency
    candidates = ((frequency > 0) & (frequency >= lo) & (frequency <= hi)).nonzero().flatten()
    band = f" with {min_frequency or 0:g} <= frequency <= {hi:g}" if (min_frequency, max_frequency) != (None, None) else ""
    if candidates.numel() == 0:
        raise UserError(f"no feature fires{band} on these tokens; widen the band or scan more --tokens")
    n = min(n_random or DEFAULT_RANDOM, candidates.numel())
    g = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(candidates.numel(), generator=g)[:n]].sort().values
    return chosen.tolist(), f"{n} at random (seed {seed}) of the {candidates.numel()} features that fire{band}"


def choose_contexts(ctx_max: Tensor, top: int, quantiles: int, per_quantile: int,
                    g: torch.Generator) -> tuple[list[int], list[dict[str, Any]]]:
    """For one feature's per-context maxima [n_ctx]: (top context ids, [{"label", "contexts"}] per
    quantile bin of the other activating contexts, lowest bin first)."""
    active = (ctx_max > 0).nonzero().flatten()
    order = active[ctx_max[active].argsort(descending=True, stable=True)]
    top_ids = order[:top].tolist()
    rest = order[top:].flip(0)  # ascending
    bins = []
    if rest.numel() and quantiles > 0 and per_quantile > 0:
        for q, chunk in enumerate(torch.tensor_split(rest, min(quantiles, rest.numel()))):
            picks = chunk[torch.randperm(chunk.numel(), generator=g)[:per_quantile]]
            lo, hi = ctx_max[chunk[0]].item(), ctx_max[chunk[-1]].item()
            bins.append({"label": f"quantile {q + 1}/{min(quantiles, rest.numel())} (max activation "
                                  f"{lo:.3g} to {hi:.3g})", "contexts": sorted(picks.tolist())})
    return top_ids, bins


# ---- the page's data --------------------------------------------------------------------------

class _Tokens:
    """Token id -> display string (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = self.tokenizer.decode([i])
        return self.cache[i]


def _example(tokens: Tensor, acts: Tensor, ctx: int, show: _Tokens) -> dict[str, Any]:
    """A window of context `ctx` around its most active token; acts [pos] of one feature."""
    pos = int(acts.argmax())
    a, b = max(0, pos - WINDOW_BEFORE), min(acts.numel(), pos + WINDOW_AFTER + 1)
    return {"context": ctx, "position": pos, "max": round(float(acts[pos]), 4),
            "tokens": [show(int(t)) for t in tokens[a:b]],
            "activations": [round(float(v), 4) for v in acts[a:b]], "highlight": pos - a}


def _lens(d, model, ids: list[int], show: _Tokens) -> dict[int, dict[str, Any]]:
    """Logit lens and nearest embeddings per feature, from its decoder row (the output side of a
    transcoder); {} when the decoder's width is not the model width."""
    W_U, W_E = getattr(model, "W_U", None), getattr(model, "W_E", None)
    if W_U is None or W_E is None or W_U.shape[0] != d.W_dec.shape[1]:
        return {}
    dirs = d.W_dec.detach()[ids].float().cpu()
    logits = dirs @ W_U.detach().float().cpu()
    cos = torch.nn.functional.normalize(dirs, dim=-1) @ torch.nn.functional.normalize(W_E.detach().float().cpu(), dim=-1).T
    n = min(N_LENS, logits.shape[1])

    def listed(values: Tensor, idx: Tensor) -> list[list]:
        return [[show(int(i)), round(float(v), 4)] for v, i in zip(values, idx)]

    out = {}
    for row, fid in enumerate(ids):
        up, down, near = logits[row].topk(n), (-logits[row]).topk(n), cos[row].topk(n)
        out[fid] = {"promoted": listed(up.values, up.indices), "suppressed": listed(-down.values, down.indices),
                    "nearest_tokens": listed(near.values, near.indices)}
    return out


def analyse(model, d, hook: str, tokens: Tensor, keep: Tensor, *, features: list[int] | None = None,
            n_random: int | None = None, min_frequency: float | None = None, max_frequency: float | None = None,
            top: int = 10, quantiles: int = 4, per_quantile: int = 2, seed: int = 0,
            batch_size: int = 8) -> dict[str, Any]:
    """The features page's data (what features.json holds, less the run's description)."""
    frequency, ctx_max = scan(model, d, hook, tokens, keep, batch_size)
    ids, how = select_features(frequency, features, n_random, min_frequency, max_frequency, seed)
    g = torch.Generator().manual_seed(seed)
    chosen = {fid: choose_contexts(ctx_max[:, fid], top, quantiles, per_quantile, g) for fid in ids}
    shown = sorted({c for top_ids, bins in chosen.values() for c in top_ids + sum((b["contexts"] for b in bins), [])})
    acts = token_activations(model, d, hook, tokens[shown], keep[shown], ids, batch_size)
    row_of = {c: r for r, c in enumerate(shown)}
    show = _Tokens(model.tokenizer)
    lens = _lens(d, model, ids, show)

    def example(ctx: int, col: int) -> dict[str, Any]:
        return _example(tokens[ctx], acts[row_of[ctx], :, col], ctx, show)

    out = []
    for col, fid in enumerate(ids):
        top_ids, bins = chosen[fid]
        out.append({
            "id": fid,
            "frequency": float(frequency[fid]),
            "max_activation": round(float(ctx_max[:, fid].max()), 4),
            "active_contexts": int((ctx_max[:, fid] > 0).sum()),
            "top_examples": [example(c, col) for c in top_ids],
            "quantile_examples": [{"label": b["label"], "examples": [example(c, col) for c in b["contexts"]]}
                                  for b in bins],
            **lens.get(fid, {}),
        })
    return {"selection": how, "tokens_scanned": int(keep.sum()), "contexts_scanned": int(tokens.shape[0]),
            "features": out}


def feature_pages(directory: str | Path, *, features: list[int] | None = None, n_random: int | None = None,
                  min_frequency: float | None = None, max_frequency: float | None = None, top: int = 10,
                  quantiles: int = 4, per_quantile: int = 2, n_tokens: int = DEFAULT_TOKENS,
                  out_dir: str | Path | None = None, seed: int = 0, batch_size: int = 8, device: str = "auto",
                  dtype: str | None = None, data_source: str | None = None) -> tuple[Path, Path]:
    """`python -m eval features`: write features.html and features.json; returns their paths."""
    if top < 1:
        raise UserError("--top must be at least 1")
    check_counts(n_tokens, batch_size)
    (group,) = load_groups([directory], device=device, dtype=dtype, data_source=data_source)
    (name,) = group.names
    d = group.dictionaries[name]
    if not d.metadata.get("hook_name"):
        raise UserError(f"{directory}/cfg.json records no hook_name")
    hook = input_hook(d)  # what the features read (a transcoder's input hook)
    tokens, keep = heldout_tokens(group.model, group.data_cfg, n_tokens)
    print(f"scanning {int(keep.sum())} held-out tokens for {name} ({d.architecture}, d_sae={d.d_sae}) at {hook}",
          flush=True)
    data = analyse(group.model, d, hook, tokens, keep, features=features, n_random=n_random,
                   min_frequency=min_frequency, max_frequency=max_frequency, top=top, quantiles=quantiles,
                   per_quantile=per_quantile, seed=seed, batch_size=batch_size)
    data = {"dictionary": str(directory), "name": name, "architecture": d.architecture, "d_in": d.d_in,
            "d_sae": d.d_sae, "model": group.model_name, "hook": d.metadata["hook_name"],
            **({"input_hook": hook} if hook != d.metadata["hook_name"] else {}),
            "dataset": group.data_cfg.model_dump(mode="json"), "evaluated_split": "heldout", **data}
    out = Path(out_dir) if out_dir is not None else Path(directory) / "features"
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / JSON_FILE, data)
    io.write_text(out / HTML_FILE, render_html(data))
    return out / HTML_FILE, out / JSON_FILE


# ---- the page ---------------------------------------------------------------------------------

def render_html(data: dict[str, Any]) -> str:
    """One self-contained page: the data inlined as JSON, rendered by a small inline script."""
    payload = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")
    title = f"features of {data.get('name', 'dictionary')}".replace("&", "&amp;").replace("<", "&lt;")
    return _PAGE.replace("{{TITLE}}", title).replace("{{DATA}}", payload)


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin: 0 0 .3em; } h3 { font-size: 1em; margin: .8em 0 .3em; }
.meta { color: #555; } .feature { border: 1px solid #ccc; border-radius: 6px; padding: .8em 1em; margin: 1em 0; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: .2em 0; padding: .2em .4em;
  background: #fafafa; border-left: 3px solid #ddd; }
.example .val { color: #888; font-size: .85em; margin-right: .6em; }
.tok { border-radius: 2px; } .tok.peak { outline: 1px solid #c60; }
.lists { display: flex; gap: 2em; flex-wrap: wrap; } .lists ol { margin: .2em 0; padding-left: 1.6em; }
.lists code { background: #f1f1f1; padding: 0 .2em; }
</style></head>
<body>
<noscript>This page draws its content with the inline script; the same data is in features.json.</noscript>
<div id="header"></div><div id="features"></div>
<script type="application/json" id="feature-data">{{DATA}}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("feature-data").textContent);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) { return Math.abs(v) >= 100 || v === 0 ? v.toFixed(0) : v.toPrecision(3); }
function example(ex, scale) {
  const div = el("div", "example");
  div.appendChild(el("span", "val", fmt(ex.max)));
  ex.tokens.forEach((t, i) => {
    const a = ex.activations[i];
    const s = el("span", "tok" + (i === ex.highlight ? " peak" : ""), t.replace(/\n/g, "\u21b5"));
    if (a > 0) s.style.background = "rgba(255, 120, 0, " + Math.min(1, a / scale).toFixed(3) + ")";
    s.title = "activation " + fmt(a);
    s.dataset.act = a;
    div.appendChild(s);
  });
  return div;
}
function tokenList(title, rows) {
  const box = el("div");
  box.appendChild(el("h3", null, title));
  const ol = el("ol");
  rows.forEach(([tok, v]) => {
    const li = el("li");
    li.appendChild(el("code", null, JSON.stringify(tok)));
    li.appendChild(document.createTextNode(" " + fmt(v)));
    ol.appendChild(li);
  });
  box.appendChild(ol);
  return box;
}
const header = document.getElementById("header");
header.appendChild(el("h1", null, "Features of " + data.name));
header.appendChild(el("p", "meta", data.architecture + ", d_in " + data.d_in + ", d_sae " + data.d_sae +
  " | model " + data.model + " at " + data.hook + " | " + data.tokens_scanned + " held-out tokens of " +
  data.dataset.source + " | features: " + data.selection));
const root = document.getElementById("features");
data.features.forEach(f => {
  const card = el("section", "feature");
  card.id = "feature-" + f.id;
  card.appendChild(el("h2", null, "Feature " + f.id));
  card.appendChild(el("p", "meta", "frequency " + (100 * f.frequency).toPrecision(3) + "% of tokens | max activation " +
    fmt(f.max_activation) + " | fires in " + f.active_contexts + " of " + data.contexts_scanned + " contexts"));
  const scale = f.max_activation > 0 ? f.max_activation : 1;
  const top = el("div", "top-examples");
  top.appendChild(el("h3", null, "Top-activating contexts"));
  if (!f.top_examples.length) top.appendChild(el("p", "meta", "never fires on these tokens"));
  f.top_examples.forEach(ex => top.appendChild(example(ex, scale)));
  card.appendChild(top);
  f.quantile_examples.forEach(q => {
    const box = el("div", "quantile-examples");
    box.appendChild(el("h3", null, "Random contexts, " + q.label));
    q.examples.forEach(ex => box.appendChild(example(ex, scale)));
    card.appendChild(box);
  });
  if (f.promoted) {
    const lists = el("div", "lists");
    lists.appendChild(tokenList("Logit lens: promoted", f.promoted));
    lists.appendChild(tokenList("Logit lens: suppressed", f.suppressed));
    lists.appendChild(tokenList("Nearest token embeddings (cosine)", f.nearest_tokens));
    card.appendChild(lists);
  }
  root.appendChild(card);
});
document.body.dataset.rendered = String(data.features.length);
</script>
</body></html>
"""
