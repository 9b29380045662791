"""Tables of evaluation results: markdown (summary.md, ablation.md), a compact terminal print,
and summary.json. Percentages are loss_recovered × 100 ("percent loss recovered")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from eval.metrics import jsonable
from sae import io

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"

# (column header, eval.json key, format). "pct" multiplies by 100.
SUMMARY_COLUMNS: list[tuple[str, str, str]] = [
    ("dictionary", "name", "s"),
    ("hook", "hook", "s"),
    ("d_sae", "d_sae", "d"),
    ("L0", "l0", ".1f"),
    ("MSE", "mse", ".4g"),
    ("FVU", "fvu", ".4f"),
    ("% loss rec. (zero)", "loss_recovered", "pct"),
    ("% loss rec. (mean)", "loss_recovered_mean_ablation", "pct"),
    ("KL", "kl_sae", ".4f"),
    ("dead", "dead", "d"),
    ("dense>1e-2", "dense_1e-2", "d"),
    ("dense>1e-1", "dense_1e-1", "d"),
]

# The per-dictionary summary row of summary.json (and its "status": "trained" or "diverged").
SUMMARY_KEYS = ["name", "architecture", "hook", "d_in", "d_sae", "l0", "mse", "fvu", "explained_variance",
                "loss_recovered", "loss_recovered_mean_ablation", "ce_clean", "ce_sae", "ce_zero", "ce_mean",
                "kl_sae", "dead", "dense_1e-2", "dense_1e-1", "frac_alive", "tokens_evaluated"]

# The table of the dictionaries whose training diverged (their rows hold no metrics).
DIVERGED_COLUMNS: list[tuple[str, str, str]] = [
    ("dictionary", "name", "s"),
    ("hook", "hook", "s"),
    ("d_sae", "d_sae", "d"),
    ("lr", "lr", ".3g"),
    ("diverged at step", "step", "d"),
    ("weights saved of step", "restored_step", "d"),
    ("last window losses", "loss_tail", "losses"),
]
DIVERGED_NOTE = ("\nDiverged: the training loss became NaN or inf (first at the step given); the dictionary "
                 "stopped training there and its folder holds its weights of the last check that found them "
                 "finite, with `status: diverged` in cfg.json. Not evaluated.\n\n")


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if spec == "s":
        return str(value)
    if spec == "d":
        return str(int(value))
    if spec == "pct":
        return f"{100.0 * value:.1f}"
    if spec == "losses":  # [[step, loss], ...]: the losses ('nan' and 'inf' are strings)
        return ", ".join(v if isinstance(v, str) else f"{v:.3g}" for _, v in value)
    return format(value, spec)


def _metrics(result: Any) -> Mapping[str, Any]:
    return result.metrics if hasattr(result, "metrics") else result


def table_rows(results: Iterable[Any], columns=SUMMARY_COLUMNS) -> list[list[str]]:
    return [[fmt(_metrics(r).get(key), spec) for _, key, spec in columns] for r in results]


def markdown_table(rows: list[list[str]], headers: list[str]) -> str:
    out = ["| " + " | ".join(headers) + " |",
           "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def text_table(rows: list[list[str]], headers: list[str]) -> str:
    """Aligned plain text: first column left, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def results_table(results: Mapping[str, Any] | Iterable[Any], markdown: bool = False,
                  columns=SUMMARY_COLUMNS) -> str:
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    rows = table_rows(items, columns)
    headers = [c[0] for c in columns]
    return markdown_table(rows, headers) if markdown else text_table(rows, headers)


def print_results(results: Mapping[str, Any] | Iterable[Any]) -> None:
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not items:
        return
    first = _metrics(items[0])
    print(results_table(items))
    tokens = {int(_metrics(r)["tokens_evaluated"]) for r in items}
    print(f"held-out tokens evaluated: {', '.join(map(str, sorted(tokens)))}; "
          f"% loss rec. = 100 x loss_recovered against zero- and mean-ablation; "
          f"ce_clean = {fmt(first.get('ce_clean'), '.4f')}", flush=True)


def summary_markdown(results: Mapping[str, Any] | Iterable[Any], title: str = "",
                     diverged: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    head = f"# {title}\n\n" if title else ""
    return head + _evaluated_markdown(items) + _diverged_markdown(diverged or {})


def _evaluated_markdown(items: list[Any]) -> str:
    if not items:
        return "No dictionaries were evaluated.\n"
    tokens = sorted({int(_metrics(r)["tokens_evaluated"]) for r in items})
    ce = sorted({str(_metrics(r).get("hook")): _metrics(r).get("ce_clean") for r in items}.items())
    note = (f"\nEvaluated on {', '.join(map(str, tokens))} held-out tokens (never trained on). "
            "L0, MSE (per element), FVU (centred) and the loss recovered are defined in METRICS.md; "
            "% loss rec. = 100 × (ce_ablated − ce_sae) / (ce_ablated − ce_clean) with the hook's "
            "activation zero-ablated or mean-ablated (training mean). Dead = never fired on these tokens. "
            "Clean CE: " + ", ".join(fmt(v, ".4f") for _, v in ce) + ".\n")
    return results_table(items, markdown=True) + note


def _diverged_markdown(diverged: Mapping[str, Mapping[str, Any]]) -> str:
    if not diverged:
        return ""
    rows = [{"name": name, **record} for name, record in diverged.items()]
    return DIVERGED_NOTE + results_table(rows, markdown=True, columns=DIVERGED_COLUMNS)


def diverged_row(name: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json's row of a diverged dictionary: no metrics, its divergence record instead."""
    described = ("architecture", "hook", "d_in", "d_sae", "lr")
    return {**{k: None for k in SUMMARY_KEYS}, "name": name, "status": "diverged",
            **{k: record.get(k) for k in described},
            "divergence": {k: v for k, v in record.items() if k not in described}}


def write_summary(run_dir: str | Path, results: Mapping[str, Any] | Iterable[Any],
                  title: str | None = None, extra: Mapping[str, Any] | None = None,
                  diverged: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Path, Path]:
    """runs/<run>/summary.md and summary.json: one row per dictionary (L0, MSE, FVU, percent loss
    recovered against both baselines, dead and dense counts, ...), and one for each in `diverged`
    ({name: {architecture, hook, d_in, d_sae, lr, step, tokens, restored_step, loss_tail}})."""
    run_dir = Path(run_dir)
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    diverged = diverged or {}
    md = summary_markdown(items, title=title if title is not None else run_dir.name, diverged=diverged)
    rows = [{**{k: _metrics(r).get(k) for k in SUMMARY_KEYS}, "status": "trained"} for r in items]
    rows += [diverged_row(name, record) for name, record in diverged.items()]
    payload = {"dictionaries": rows, **dict(extra or {})}
    io.write_text(run_dir / SUMMARY_MD, md)
    io.write_json(run_dir / SUMMARY_JSON, jsonable(payload))
    return run_dir / SUMMARY_MD, run_dir / SUMMARY_JSON


# (label, key, format) of the before/after print of `prune`.
COMPARE_KEYS = [("d_sae", "d_sae", "d"), ("L0", "l0", ".2f"), ("L1", "l1", ".4g"), ("MSE", "mse", ".5g"),
                ("FVU", "fvu", ".4f"), ("cossim", "cossim", ".4f"), ("ce_sae", "ce_sae", ".4f"),
                ("% loss rec. (zero)", "loss_recovered", "pct"),
                ("% loss rec. (mean)", "loss_recovered_mean_ablation", "pct"),
                ("KL", "kl_sae", ".4f"), ("dead", "dead", "d"), ("dense>1e-2", "dense_1e-2", "d"),
                ("dense>1e-1", "dense_1e-1", "d")]


def side_by_side(before: Any, after: Any, labels: tuple[str, str] = ("before", "after"),
                 markdown: bool = False) -> str:
    b, a = _metrics(before), _metrics(after)
    rows = []
    for label, key, spec in COMPARE_KEYS:
        vb, va = b.get(key), a.get(key)
        delta = ""
        if isinstance(vb, (int, float)) and isinstance(va, (int, float)) and all(map(math.isfinite, (vb, va))):
            delta = fmt(va - vb, spec) if spec != "d" else f"{int(va) - int(vb):+d}"
            if spec != "d" and not delta.startswith("-"):
                delta = "+" + delta
        rows.append([label, fmt(vb, spec), fmt(va, spec), delta])
    headers = ["metric", *labels, "change"]
    return markdown_table(rows, headers) if markdown else text_table(rows, headers)
