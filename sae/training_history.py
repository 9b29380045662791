"""What training looked like, per dictionary: L0, FVU, loss and dead features at every log window,
and the feature-frequency histogram (with its dense counts) at several points of training, so one
sees whether and when a spike of high-frequency features forms.

The trainer feeds it (`update` every log window, `snapshot` when it logs frequency histograms),
keeps it in the checkpoint (`state_dict`: plain lists and numbers, so a resumed run's curves are
complete), and `save`s it next to the dictionary:

    training_history.json         every row and snapshot (to redraw or compare runs), and
                                  `last_fifth`: how far L0 and FVU moved over the last fifth
    training_curves.png           L0, FVU, dead and dense features against tokens trained
    frequency_over_training.png   the METRICS.md frequency histogram at up to 6 points of training
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from sae import io
from sae.plots import FrequencyHistogram, draw_frequency_histogram, frequency_histogram, pyplot, save_figure

HISTORY_FILE = "training_history.json"
CURVES_FILE = "training_curves.png"
HISTOGRAMS_FILE = "frequency_over_training.png"
_ROW_KEYS = ("loss", "l0", "fvu", "dead")  # of the trainer's window statistics
_PANELS = 6  # histograms drawn (evenly spread over the snapshots, the last always among them)
_END = 0.05  # share of training averaged at each end of the last fifth (one window is noisy)


class TrainingHistory:
    """Rows (tokens, step, loss, l0, fvu, dead) and frequency snapshots of one dictionary's training.
    dead_after_tokens: the tracker's window behind `dead` (a feature silent that long)."""

    def __init__(self, dead_after_tokens: int | None = None):
        self.dead_after_tokens = dead_after_tokens
        self.rows: list[dict[str, float]] = []
        self.snapshots: list[dict[str, Any]] = []  # tokens, window_tokens, dead, counts, dense_1e-2, dense_1e-1

    def update(self, tokens: int, step: int, stats: Mapping[str, float]) -> None:
        """One log window's averages (the trainer's `_read_stats` row of this dictionary)."""
        self.rows.append({"tokens": int(tokens), "step": int(step), **{k: float(stats[k]) for k in _ROW_KEYS}})

    def snapshot(self, tokens: int, frequency: Tensor, window_tokens: int) -> None:
        """The frequency histogram of the window of `window_tokens` tokens that ends at `tokens`."""
        h = frequency_histogram(frequency)
        self.snapshots.append({"tokens": int(tokens), "window_tokens": int(window_tokens), "dead": h.dead,
                               "counts": h.counts, "dense_1e-2": h.dense_1e_2, "dense_1e-1": h.dense_1e_1})

    def state_dict(self) -> dict[str, Any]:
        return {"dead_after_tokens": self.dead_after_tokens, "rows": self.rows, "snapshots": self.snapshots}

    def last_fifth(self) -> dict[str, float] | None:
        """How much L0 and FVU moved over the last fifth of training, relative to where it began:
        (mean over the last 5 % of training - mean over the 5 % before 80 %) / the latter (the usual
        test of convergence: both under 2 %). None without enough rows to tell."""
        if len(self.rows) < 2:
            return None
        total = self.rows[-1]["tokens"]
        start = [r for r in self.rows if (0.8 - _END) * total < r["tokens"] <= 0.8 * total]
        end = [r for r in self.rows if r["tokens"] > (1 - _END) * total]
        if not start or start[-1] is self.rows[-1]:
            return None

        def change(key: str) -> float | None:  # None: from 0 to something (no relative change)
            before = sum(r[key] for r in start) / len(start)
            after = sum(r[key] for r in end) / len(end)
            if before == 0:
                return 0.0 if after == 0 else None
            return (after - before) / before

        return {"l0": change("l0"), "fvu": change("fvu"), "from_tokens": start[-1]["tokens"], "to_tokens": total}

    def describe_last_fifth(self) -> str | None:
        """One line on `last_fifth` for the log (None when it cannot tell)."""
        moved = self.last_fifth()
        if moved is None or not all(isinstance(moved[k], float) and math.isfinite(moved[k]) for k in ("l0", "fvu")):
            return None
        verdict = "converged (both under 2 %)" if max(abs(moved["l0"]), abs(moved["fvu"])) < 0.02 else "still moving"
        return (f"over the last fifth of training L0 moved {moved['l0']:+.1%}, FVU {moved['fvu']:+.1%}: {verdict}")

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """From `state_dict`; None (a checkpoint written before histories were kept): start empty."""
        state = state or {}
        self.rows = [dict(r) for r in state.get("rows", [])]
        self.snapshots = [dict(s) for s in state.get("snapshots", [])]
        self.dead_after_tokens = state.get("dead_after_tokens", self.dead_after_tokens)

    def save(self, folder: str | Path, title: str = "") -> list[Path]:
        """training_history.json and the two figures (those there is data for) into `folder`."""
        folder = Path(folder)
        io.write_json(folder / HISTORY_FILE, {**self.state_dict(), "last_fifth": self.last_fifth()})
        written = [folder / HISTORY_FILE]
        if self.rows:
            written.append(plot_curves(self, folder / CURVES_FILE, title))
        if self.snapshots:
            written.append(plot_snapshots(self, folder / HISTOGRAMS_FILE, title))
        return written


def plot_curves(history: TrainingHistory, path: str | Path, title: str = "") -> Path:
    """L0, FVU (log scale), dead and dense features against tokens trained."""
    fig, axes = pyplot().subplots(2, 2, figsize=(10, 6.4), dpi=110, sharex=True)
    from matplotlib.ticker import EngFormatter  # here: matplotlib loads on first drawing (sae.plots.pyplot)

    tokens = [r["tokens"] for r in history.rows]
    axes[0, 0].plot(tokens, [r["l0"] for r in history.rows], color="#3b75af")
    axes[0, 0].set_ylabel("L0 (active features per token)")
    axes[0, 1].plot(tokens, [r["fvu"] for r in history.rows], color="#3b75af")
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_ylabel("FVU (training batches)")
    silent = f"silent for {history.dead_after_tokens:,} tokens" if history.dead_after_tokens else "dead"
    axes[1, 0].plot(tokens, [r["dead"] for r in history.rows], color="#c0392b", label=silent)
    axes[1, 0].set_ylabel("dead features")
    axes[1, 0].set_ylim(0, 1.1 * max(1, *(r["dead"] for r in history.rows)))
    _dense_panel(axes[1, 1], history.snapshots)
    axes[1, 0].legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("tokens trained")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M: no overlapping labels
    fig.suptitle(f"{title}: training curves" if title else "training curves", fontsize=10)
    return save_figure(fig, path)


def _dense_panel(ax, snapshots: list[dict[str, Any]]) -> None:
    """Dense counts of each snapshot's window (and its features that never fired in it)."""
    tokens = [s["tokens"] for s in snapshots]
    for key, color in (("dense_1e-1", "#555"), ("dense_1e-2", "#3b75af"), ("dead", "#c0392b")):
        label = {"dense_1e-1": "frequency > 1e-1", "dense_1e-2": "frequency > 1e-2",
                 "dead": "never fired in the window"}[key]
        ax.plot(tokens, [s[key] for s in snapshots], "-o", ms=3, color=color, label=label)
    ax.set_ylabel("features (per histogram window)")
    ax.legend(fontsize=8)


def plot_snapshots(history: TrainingHistory, path: str | Path, title: str = "") -> Path:
    """The frequency histogram at up to _PANELS points of training, evenly spread, the last included."""
    shown = _spread(history.snapshots, _PANELS)
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), dpi=100, squeeze=False)
    for i, (ax, snap) in enumerate(zip(axes.flat, shown)):
        hist = FrequencyHistogram(snap["dead"], snap["counts"], snap["dense_1e-2"], snap["dense_1e-1"])
        draw_frequency_histogram(ax, hist, tokens=snap["window_tokens"], legend=i == 0)
        ax.set_title(f"at {snap['tokens']:,} tokens trained (window of {snap['window_tokens']:,})", fontsize=9)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: feature frequencies during training (each over the window ending there)"
                 if title else "feature frequencies during training", fontsize=10)
    return save_figure(fig, path)


def _spread(items: list[Any], n: int) -> list[Any]:
    """At most n of items, evenly spaced, always the last."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]
