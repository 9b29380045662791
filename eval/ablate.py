"""Feature-frequency ablation: for each threshold t, the dictionary with the features of frequency
> t killed at run time (`set_killed`; nothing is written per threshold), so the row for t equals
`python -m eval prune --max-frequency t` followed by an evaluation. Every threshold and reference
dictionary is evaluated in one `evaluate_dictionaries` call (shared forwards). Outputs:
ablation.json, ablation.md, ablation.png (L0 against percent loss recovered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from torch import Tensor

from eval import report
from eval.evaluate import DEFAULT_BATCH_CONTEXTS, EvalTarget, evaluate_dictionaries
from eval.folders import counts_or_defaults, load_groups
from eval.kill_frequency import folder_kill_frequencies
from eval.metrics import jsonable
from eval.outputs import eval_info, with_tokens
from eval.prune import check_distinct_labels, kill_mask_from_frequency, threshold_label
from sae import io, plots
from sae.errors import UserError

ABLATION_JSON, ABLATION_MD, ABLATION_PNG = "ablation.json", "ablation.md", "ablation.png"
ROW_KEYS = ["l0", "l1", "mse", "fvu", "explained_variance", "cossim", "ce_sae", "loss_recovered",
            "loss_recovered_mean_ablation", "kl_sae", "kl_recovered", "dead", "dense_1e-2", "dense_1e-1"]


def parse_thresholds(text: str | Iterable[float]) -> list[float]:
    if isinstance(text, str):
        try:
            values = [float(t) for t in text.replace(" ", "").split(",") if t]
        except ValueError:
            raise UserError(f"--thresholds {text!r}: expected comma-separated numbers like 0.2,0.1,0.05") from None
    else:
        values = [float(t) for t in text]
    if not values:
        raise UserError("no thresholds given")
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise UserError(f"thresholds are frequencies in [0, 1]; got {bad}")
    values = sorted(set(values), reverse=True)
    check_distinct_labels(values)  # each row is keyed and printed by its label
    return values


@dataclass
class AblationResult:
    dictionary: str
    mode: str
    frequency_source: str
    tokens_evaluated: int
    rows: list[dict[str, Any]]  # one per threshold, highest first
    unpruned: dict[str, Any]
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    frequency_tokens: int | None = None  # tokens the deciding frequencies were measured on

    def to_json(self) -> dict[str, Any]:
        return jsonable({"dictionary": self.dictionary, "kill_mode": self.mode,
                         "rule": "threshold t kills the features with frequency > t",
                         "frequency_source": self.frequency_source, "frequency_tokens": self.frequency_tokens,
                         "tokens_evaluated": self.tokens_evaluated,
                         "unpruned": self.unpruned, "thresholds": self.rows, "references": self.references})


def _row(metrics: Mapping[str, Any], **extra) -> dict[str, Any]:
    m = metrics.metrics if hasattr(metrics, "metrics") else metrics
    return {**extra, **{k: m.get(k) for k in ROW_KEYS}, "d_sae": m.get("d_sae")}


def run_ablation(model, dictionary, frequency: Tensor, thresholds: Iterable[float], tokens: Tensor,
                 keep_mask: Tensor, train_means: Mapping[str, Tensor], *, name: str = "dictionary",
                 mode: str = "after", compare: Mapping[str, Any] | None = None,
                 references: Mapping[str, Any] | None = None, batch_size: int = DEFAULT_BATCH_CONTEXTS,
                 frequency_source: str = "given", frequency_tokens: int | None = None,
                 info: Mapping[str, Any] | None = None, progress: bool = True) -> AblationResult:
    """Evaluate `dictionary` with the features above each threshold killed (`write_ablation` writes
    the result).

    frequency: [d_sae] per-feature frequency deciding what each threshold kills (measured on other
      tokens than `tokens`: eval.kill_frequency), frequency_source / frequency_tokens: where, how many.
    train_means: as in evaluate_dictionaries (keyed by `name`, the compare names, or hook names).
    compare: name -> SparseDictionary/EvalTarget evaluated alongside (same tokens, shared forwards).
    references: name -> already computed EvalResult/metrics on the *same* tokens (no re-evaluation);
      `references[name]`, when present, is used as the unpruned point instead of evaluating it again.
    """
    thresholds = parse_thresholds(thresholds)
    if mode not in ("after", "before"):
        raise UserError(f"kill mode must be 'after' or 'before', got {mode!r}")
    frequency = frequency.flatten()
    if frequency.numel() != dictionary.d_sae:
        raise UserError(f"{frequency.numel()} frequencies for a dictionary with {dictionary.d_sae} features")
    references = dict(references or {})
    masks = {t: kill_mask_from_frequency(frequency, max_frequency=t) for t in thresholds}
    keys = {t: f"{name}@>{threshold_label(t)}" for t in thresholds}
    targets = _targets(dictionary, masks, keys, mode, name, compare or {}, references, train_means)
    results = evaluate_dictionaries(model, targets, tokens, keep_mask, train_means=train_means,
                                    batch_size=batch_size, info=info, progress=progress)
    rows = [_threshold_row(results[keys[t]], t, masks[t], dictionary.d_sae) for t in thresholds]
    evaluated = {k: v for k, v in results.items() if k not in keys.values()}
    all_refs = {**references, **evaluated}
    return AblationResult(dictionary=name, mode=mode, frequency_source=frequency_source,
                          tokens_evaluated=int(results[next(iter(results))].metrics["tokens_evaluated"]),
                          rows=rows, unpruned=_row(all_refs[name], threshold=None, killed=0),
                          references={k: _row(v) for k, v in all_refs.items() if k != name},
                          frequency_tokens=frequency_tokens)


def _targets(dictionary, masks: Mapping[float, Tensor], keys: Mapping[float, str], mode: str, name: str,
             compare: Mapping[str, Any], references: Mapping[str, Any],
             train_means: Mapping[str, Tensor]) -> dict[str, EvalTarget]:
    """One target per threshold, plus the unpruned dictionary and the compared ones unless their
    results are given as references."""
    hook = dictionary.metadata.get("hook_name")
    mean = train_means.get(name, train_means.get(hook)) if hook is not None else train_means.get(name)
    targets = {keys[t]: EvalTarget(dictionary, kill_mask=kill, kill_mode=mode, train_mean=mean)
               for t, kill in masks.items()}
    if name not in references:
        targets[name] = EvalTarget(dictionary, train_mean=mean)
    for other, d in compare.items():
        if other not in references:
            targets[other] = d if isinstance(d, EvalTarget) else EvalTarget(d)
    return targets


def _threshold_row(result, threshold: float, kill: Tensor, d_sae: int) -> dict[str, Any]:
    killed = int(kill.sum())
    note = ""
    if killed == 0:
        note = "kills nothing (same as unpruned)"
    elif killed == d_sae:
        note = "kills every feature (x_hat = b_dec)"
    return _row(result, threshold=threshold, killed=killed, alive_features=d_sae - killed, note=note)


ABLATION_COLUMNS = [("threshold", "threshold", "g"), ("killed", "killed", "d"), ("L0", "l0", ".1f"),
                    ("MSE", "mse", ".4g"), ("FVU", "fvu", ".4f"), ("% loss rec. (zero)", "loss_recovered", "pct"),
                    ("% loss rec. (mean)", "loss_recovered_mean_ablation", "pct"), ("KL", "kl_sae", ".4f"),
                    ("note", "note", "s")]


def ablation_table(result: AblationResult, markdown: bool = False) -> str:
    def cells(row, label=None):
        out = []
        for _, key, spec in ABLATION_COLUMNS:
            if key == "threshold" and label is not None:
                out.append(label)
            elif spec == "g":
                out.append("n/a" if row.get(key) is None else f"> {row[key]:g}")
            elif key == "note":
                out.append(row.get("note") or "")
            else:
                out.append(report.fmt(row.get(key), spec))
        return out

    rows = [cells(result.unpruned, f"{result.dictionary} (unpruned)")]
    rows += [cells(r) for r in result.rows]
    rows += [cells({**r, "killed": None}, f"{k} (reference)") for k, r in result.references.items()]
    for r in rows:
        if r[1] == "n/a":
            r[1] = "-"
    headers = [c[0] for c in ABLATION_COLUMNS]
    return report.markdown_table(rows, headers) if markdown else report.text_table(rows, headers)


def read_ablation(path: str | Path) -> AblationResult:
    """An AblationResult back from its ablation.json (e.g. to draw the plot again:
    `plot_ablation(read_ablation(".../ablation.json"), "ablation.png")`)."""
    j = io.read_json(Path(path))
    return AblationResult(dictionary=j["dictionary"], mode=j["kill_mode"], frequency_source=j["frequency_source"],
                          tokens_evaluated=j["tokens_evaluated"], rows=j["thresholds"], unpruned=j["unpruned"],
                          references=j.get("references") or {}, frequency_tokens=j.get("frequency_tokens"))


def write_ablation(out_dir: str | Path, result: AblationResult) -> None:
    """ablation.json, ablation.md and ablation.png into out_dir."""
    out_dir = Path(out_dir)
    io.write_json(out_dir / ABLATION_JSON, result.to_json())
    md = (f"# Frequency ablation of {result.dictionary}\n\n"
          f"Each threshold t kills the features whose frequency (on "
          f"{with_tokens(result.frequency_source, result.frequency_tokens)}) is > t, "
          f"mode `{result.mode}`; every row is evaluated on the same {result.tokens_evaluated} held-out tokens.\n\n"
          + ablation_table(result, markdown=True) + f"\n![L0 against loss recovered]({ABLATION_PNG})\n")
    io.write_text(out_dir / ABLATION_MD, md)
    plot_ablation(result, out_dir / ABLATION_PNG)


def point_labels(points: Iterable[tuple[float, float, float, int]], x_tol: float = 0.0,
                 y_tol: float = 0.0) -> list[tuple[float, float, str]]:
    """(l0, y, threshold, killed) per threshold -> (l0, y, label) per drawn point: thresholds that
    land on the same point (the same features killed, or the same numbers), or within x_tol / y_tol
    of it, share one label instead of printing on top of each other, e.g. ">0.05, >0.038, >0.02
    (-96)"; thresholds killing different numbers of features are separated by "; "."""
    def close(a, b, tol):
        return abs(a - b) <= tol or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)

    groups: list[list[tuple[float, float, float, int]]] = []
    for p in points:
        for g in groups:
            x, y, _, k = g[0]
            if k == p[3] or (close(x, p[0], x_tol) and close(y, p[1], y_tol)):
                g.append(p)
                break
        else:
            groups.append([p])
    out = []
    for g in groups:
        by_killed: dict[int, list[float]] = {}
        for _, _, t, k in g:
            by_killed.setdefault(k, []).append(t)
        text = "; ".join(", ".join(f">{threshold_label(t)}" for t in ts) + f" (-{k})" for k, ts in by_killed.items())
        out.append((g[0][0], g[0][1], text))
    return out


def plot_ablation(result: AblationResult, path: str | Path) -> Path:
    plt = plots.pyplot()
    panels = [("loss_recovered", "% loss recovered (zero-ablation baseline)"),
              ("loss_recovered_mean_ablation", "% loss recovered (mean-ablation baseline)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    markers = ["s", "^", "D", "v", "P", "X", "o"]
    for ax, (key, label) in zip(axes, panels):
        pts = [(r["l0"], r[key], r["threshold"], r["killed"]) for r in result.rows
               if r.get(key) is not None and r.get("l0") is not None]
        u = result.unpruned
        if pts:
            xs, ys = [p[0] for p in pts], [100 * p[1] for p in pts]
            if u.get(key) is not None:  # the curve starts at the unpruned dictionary
                ax.plot([u["l0"], xs[0]], [100 * u[key], ys[0]], ":", color="#3b75af", lw=1)
            ax.plot(xs, ys, "-o", color="#3b75af", ms=4, label=f"{result.dictionary}, killed by frequency")
            # Labels of points this close (a label is wide and low) would overlap: one label for them.
            every = [(p[0], 100 * p[1]) for p in pts] + [
                (r["l0"], 100 * r[key]) for r in (u, *result.references.values())
                if r.get(key) is not None and r.get("l0") is not None]
            x_span = max(x for x, _ in every) - min(0.0, min(x for x, _ in every))
            y_span = max(y for _, y in every) - min(y for _, y in every)
            for x, y, text in point_labels([(x, 100 * y, t, k) for x, y, t, k in pts], 0.06 * x_span, 0.03 * y_span):
                right = x > 0.6 * max(x for x, _ in every)  # labels on the right half extend leftwards
                ax.annotate(text, (x, y), fontsize=7, xytext=(-6 if right else 4, 3), textcoords="offset points",
                            ha="right" if right else "left")
        if u.get(key) is not None:
            ax.plot([u["l0"]], [100 * u[key]], "*", color="black", ms=12, label=f"{result.dictionary} (unpruned)")
        for i, (name, r) in enumerate(result.references.items()):
            if r.get(key) is not None:
                ax.plot([r["l0"]], [100 * r[key]], markers[i % len(markers)], ms=8, label=name)
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    axes[0].legend(fontsize=7, loc="best")  # "best" also avoids the labels
    fig.suptitle(f"Killing high-frequency features of {result.dictionary} (mode {result.mode}, "
                 f"{result.tokens_evaluated} held-out tokens)", fontsize=10)
    return plots.save_figure(fig, path)


def ablate_dir(directory: str | Path, thresholds: str | Iterable[float], *, compare: list[str | Path] | None = None,
               mode: str = "after", out_dir: str | Path | None = None, n_tokens: int | None = None,
               batch_size: int | None = None, device: str = "auto", dtype: str | None = None,
               data_source: str | None = None, mean_tokens: int | None = None,
               frequency_file: str | Path | None = None, cache_dir: str | Path | None = None,
               frequency_tokens: int | None = None, progress: bool = True) -> AblationResult:
    """`python -m eval ablate-frequency`: the kill sets chosen on training tokens (eval.kill_frequency),
    everything evaluated on the held-out text of DIR's dictionary."""
    n_tokens, batch_size, mean_tokens = counts_or_defaults(n_tokens, batch_size, mean_tokens)
    thresholds = parse_thresholds(thresholds)
    directory = Path(directory)
    groups = load_groups([directory, *map(Path, compare or [])], device=device, dtype=dtype, data_source=data_source)
    if len(groups) != 1:
        raise UserError("--compare dictionaries must be of the same model and text as the ablated one "
                        "(they are evaluated on the same held-out tokens)")
    (group,) = groups
    name = group.names[0]
    found = folder_kill_frequencies(group, name, frequency_file=frequency_file, cache_dir=cache_dir,
                                    n_tokens=frequency_tokens, batch_contexts=batch_size, progress=progress)
    group.prepare(n_tokens, batch_size, mean_tokens)
    result = run_ablation(group.model, group.dictionaries[name], found.frequency[name], thresholds, group.tokens,
                          group.keep, group.means, name=name, mode=mode,
                          compare={n: group.dictionaries[n] for n in group.names[1:]}, batch_size=batch_size,
                          frequency_source=found.source, frequency_tokens=found.tokens,
                          info=eval_info(group.data_cfg), progress=progress)
    out_dir = Path(out_dir or directory)
    write_ablation(out_dir, result)
    print(ablation_table(result))
    print(f"wrote {out_dir / ABLATION_MD}, {ABLATION_JSON}, {ABLATION_PNG}", flush=True)
    return result
