"""Drawing, for the library and the evaluator alike: matplotlib on a file-only backend, figures
written atomically, and the feature-frequency histogram of METRICS.md: log10(frequency) of the live
features in bins from -8 to 0, the dead features as a separate bar at the left, the dense
thresholds (1e-2, 1e-1) marked, so a spike of high-frequency features shows up on the right."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class FrequencyHistogram:
    """What the histogram draws, without the frequencies themselves (small enough to keep one per
    point of training): dead features, live features per bin of log10 frequency, dense counts."""

    dead: int
    counts: list[int]  # [n_bins]: BINS_PER_DECADE bins per decade from LOG_MIN to LOG_MAX
    dense_1e_2: int  # features with frequency > 1e-2 (METRICS.md `dense_1e-2`)
    dense_1e_1: int  # features with frequency > 1e-1

    @property
    def d_sae(self) -> int:
        return self.dead + sum(self.counts)


def bin_edges() -> Tensor:
    """[n_bins + 1] edges of the log10-frequency bins."""
    n_bins = int((LOG_MAX - LOG_MIN) * BINS_PER_DECADE)
    return torch.linspace(LOG_MIN, LOG_MAX, n_bins + 1, dtype=torch.float64)


def frequency_histogram(frequency: Tensor) -> FrequencyHistogram:
    """The histogram of a [d_sae] frequency tensor (live features below 1e-8 go in the first bin)."""
    frequency = frequency.detach().double().cpu().flatten()
    live = frequency[frequency > 0].log10().clamp(LOG_MIN, LOG_MAX)
    n_bins = bin_edges().numel() - 1
    counts = torch.histc(live, bins=n_bins, min=LOG_MIN, max=LOG_MAX) if live.numel() else torch.zeros(n_bins)
    return FrequencyHistogram(dead=int((frequency == 0).sum()), counts=[int(c) for c in counts.tolist()],
                              dense_1e_2=int((frequency > 1e-2).sum()), dense_1e_1=int((frequency > 1e-1).sum()))


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
    fig, ax = pyplot().subplots(figsize=(7.5, 3.8), dpi=110)
    draw_frequency_histogram(ax, frequency_histogram(frequency), title, tokens_evaluated)
    return save_figure(fig, path)


def draw_frequency_histogram(ax, hist: FrequencyHistogram, title: str = "", tokens: int | None = None,
                             legend: bool = True) -> None:
    """The histogram on a matplotlib axis; `tokens`: the window it was measured over (its
    one-token floor is marked)."""
    edges = bin_edges()
    ax.bar(edges[:-1].numpy(), hist.counts, width=1.0 / BINS_PER_DECADE, align="edge", color="#3b75af",
           label=f"live ({hist.d_sae - hist.dead})")
    dead_x = LOG_MIN - 0.8
    ax.bar([dead_x], [hist.dead], width=0.5, color="#c0392b", label=f"dead ({hist.dead})")
    ax.axvline(-2, color="#888", ls="--", lw=0.8)
    ax.axvline(-1, color="#555", ls="--", lw=0.8)
    ymax = max(1, max(hist.counts, default=1), hist.dead)
    ax.text(-2, ymax * 1.02, f" >1e-2: {hist.dense_1e_2}", fontsize=8, va="bottom")
    ax.text(-1, ymax * 0.92, f" >1e-1: {hist.dense_1e_1}", fontsize=8, va="bottom")
    if tokens:
        floor = -math.log10(tokens)
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
    window = f", {tokens} tokens" if tokens else ""
    ax.set_title(f"{title} (d_sae={hist.d_sae}{window})" if title else f"d_sae={hist.d_sae}{window}", fontsize=10)
    if legend:
        ax.legend(fontsize=8, loc="upper left")
