"""The feature-frequency histogram of METRICS.md: log10(frequency) of the live features in bins
from -8 to 0, the dead features as a separate bar at the left, the dense thresholds (1e-2, 1e-1)
marked, so a spike of high-frequency features shows up on the right."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from sae import io

BINS_PER_DECADE = 10
LOG_MIN, LOG_MAX = -8.0, 0.0


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend. Imported on first drawing: it adds about a
    second to the start of every command, most of which (train.py --check, --help) draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram_counts(frequency: Tensor) -> tuple[int, Tensor, Tensor]:
    """(dead count, bin edges [n+1], counts [n]) of log10 frequency of live features."""
    frequency = frequency.detach().double().cpu().flatten()
    dead = int((frequency == 0).sum())
    live = frequency[frequency > 0].log10().clamp(LOG_MIN, LOG_MAX)
    n_bins = int((LOG_MAX - LOG_MIN) * BINS_PER_DECADE)
    edges = torch.linspace(LOG_MIN, LOG_MAX, n_bins + 1, dtype=torch.float64)
    counts = torch.histc(live, bins=n_bins, min=LOG_MIN, max=LOG_MAX) if live.numel() else torch.zeros(n_bins)
    return dead, edges, counts.long()


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG atomically, and close a matplotlib figure."""
    fig.tight_layout()
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return path


def plot_frequency_histogram(frequency: Tensor, path: str | Path, title: str = "",
                             tokens_evaluated: int | None = None) -> Path:
    plt = pyplot()
    dead, edges, counts = histogram_counts(frequency)
    d_sae = frequency.numel()
    width = 1.0 / BINS_PER_DECADE
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    ax.bar(edges[:-1].numpy(), counts.numpy(), width=width, align="edge", color="#3b75af",
           label=f"live ({d_sae - dead})")
    dead_x = LOG_MIN - 0.8
    ax.bar([dead_x], [dead], width=0.5, color="#c0392b", label=f"dead ({dead})")
    dense2 = int((frequency > 1e-2).sum())
    dense1 = int((frequency > 1e-1).sum())
    ax.axvline(-2, color="#888", ls="--", lw=0.8)
    ax.axvline(-1, color="#555", ls="--", lw=0.8)
    ymax = max(1, int(counts.max()) if counts.numel() else 1, dead)
    ax.text(-2, ymax * 1.02, f" >1e-2: {dense2}", fontsize=8, va="bottom")
    ax.text(-1, ymax * 0.92, f" >1e-1: {dense1}", fontsize=8, va="bottom")
    if tokens_evaluated:
        floor = -math.log10(tokens_evaluated)
        if floor > LOG_MIN:
            ax.axvline(floor, color="#bbb", ls=":", lw=0.8)
            ax.text(floor, ymax * 0.80, " 1 token", fontsize=7, color="#777", va="bottom")
    ticks = list(range(int(LOG_MIN), int(LOG_MAX) + 1))
    ax.set_xticks([dead_x] + ticks)
    ax.set_xticklabels(["dead"] + [str(t) for t in ticks])
    ax.set_xlim(dead_x - 0.5, LOG_MAX + 0.2)
    ax.set_ylim(0, ymax * 1.15)
    ax.set_xlabel("log10(feature frequency)")
    ax.set_ylabel("features")
    window = f", {tokens_evaluated} tokens" if tokens_evaluated else ""
    ax.set_title(f"{title} (d_sae={d_sae}{window})" if title else f"d_sae={d_sae}{window}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)
