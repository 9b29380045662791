"""Dictionary quality against a known ground truth: the L0-FVU frontier and feature recovery of
every architecture, ours beside the peer libraries' (SAELens, dictionary_learning, sparsify).

The data (benchmarks/ground_truth.py): d_in 512, 4,096 unit-norm true features, 8 dense ones
firing on 10-30% of the tokens and Zipf-distributed rare ones, true L0 30, Exp(1) magnitudes,
noise std 0.02; 16,384 held-out tokens. Each architecture trains a small sweep of its sparsity
knob (L1 / L0 coefficient or k) at d_sae 4096, batch 4096, `--steps` steps, through
`sae.trainer.train_dictionaries`; each peer trains its own architectures on the same batches in
its own environment (benchmarks/.venvs/<peer>, made by `--setup-peers`) through a small worker
script (benchmarks/peer_<peer>.py), with that library's defaults.

Metrics on the held-out tokens: L0, FVU (centred, METRICS.md), MMCS (mean over the true features
of the best cosine with a decoder row) and the MMCS of the 8 dense features.

    python benchmarks/quality.py                          # 128 steps, every architecture, installed peers
    python benchmarks/quality.py --steps 1280             # the 10x budget
    python benchmarks/quality.py --quick                  # tiny sizes: a smoke test in a minute
    python benchmarks/quality.py --architectures topk relu --peers sae-lens
    python benchmarks/quality.py --set relu-classic:grad_clip=null   # an experiment on our side
    python benchmarks/quality.py --setup-peers            # create the peers' environments (PyPI)

Writes <out>/results.json, <out>/frontier.md (also printed) and <out>/frontier.png.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from ground_truth import GroundTruth, GroundTruthSpec, reconstruction_metrics, recovery  # noqa: E402
from sae.dictionaries import parse_dictionary_config  # noqa: E402
from sae.trainer import train_dictionaries  # noqa: E402

VENVS = BENCH / ".venvs"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on this machine's disk: pip never pulls a CUDA build
PEERS = {  # peer -> (PyPI requirements, worker script, packages to remove after)
    "sae-lens": (["sae-lens"], "peer_saelens.py", []),
    # its nnsight 0.3 needs transformers 4; the torchvision pip brings is built for another torch
    "dictionary-learning": (["dictionary-learning", "transformers<5"], "peer_dictionary_learning.py",
                            ["torchvision"]),
    "eai-sparsify": (["eai-sparsify"], "peer_sparsify.py", []),
}


@dataclass
class Sweep:
    """One architecture's sweep: a base config and the values of its sparsity knob."""

    family: str  # which frontier it belongs to (peers' runs are compared within a family)
    config: dict[str, Any]
    knob: str
    values: list[float]


# Matryoshka's nested groups, as fractions of d_sae (the paper's doubling widths, the remainder last);
# every library gets the same ones, each in its own form (sizes, fractions or cumulative widths)
MATRYOSHKA_GROUPS = [0.0625, 0.125, 0.25, 0.5625]

# Our sweeps, set on --size medium with the default lrs (roughly L0 5-120 there; 15-130 at full size
# needs other values: use --set SWEEP:KNOB=[...]).
OURS = {
    "relu-classic": Sweep("relu", {"architecture": "relu", "recipe": "classic"}, "l1_coefficient",
                          [0.5, 1.0, 2.0]),
    "relu-april2024": Sweep("relu", {"architecture": "relu", "recipe": "april2024"}, "l1_coefficient",
                            [0.5, 1.0, 2.0, 4.0]),
    "topk": Sweep("topk", {"architecture": "topk"}, "k", [16, 32, 64]),
    "batchtopk": Sweep("batchtopk", {"architecture": "batchtopk"}, "k", [16, 32, 64]),
    "jumprelu": Sweep("jumprelu", {"architecture": "jumprelu"}, "l0_coefficient", [0.1, 0.3, 1.0, 3.0]),
    "gated": Sweep("gated", {"architecture": "gated"}, "l1_coefficient", [0.5, 1.0, 2.0]),
    "matryoshka": Sweep("matryoshka", {"architecture": "matryoshka_batchtopk", "group_sizes": MATRYOSHKA_GROUPS},
                        "k", [16, 32, 64]),
}


@dataclass
class Run:
    """One dictionary to train: who trains it, with what, and (after) its metrics."""

    library: str  # "ours" or a peer's name
    label: str  # the sweep it belongs to, e.g. "relu-classic" or "sae-lens standard"
    family: str
    knob: str
    value: float
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.label}-{self.knob}={self.value:g}".replace(" ", "_")


# ---- data ---------------------------------------------------------------------------------------
SIZES = {  # name -> (spec, factor on k-like knob values, default steps)
    "full": (GroundTruthSpec(), 1.0, 128),
    # 64x cheaper per step (d_in, d_sae and batch each /4): for experiments on 2 CPU cores
    "medium": (GroundTruthSpec(d_in=128, n_features=1024, true_l0=8.0, zipf_offset=25.0, batch_size=1024,
                               heldout_tokens=8192), 0.25, 128),
    "quick": (GroundTruthSpec(d_in=32, n_features=128, n_dense=4, true_l0=4.0, zipf_offset=5.0,
                              batch_size=256, heldout_tokens=1024), 0.125, 16),
}


def make_spec(args: argparse.Namespace) -> GroundTruthSpec:
    return replace(SIZES[args.size][0], seed=args.seed)


def scaled(knob: str, value: float, size: str) -> float:
    """k-like knobs (k, target_l0) scale with the data's true L0."""
    if knob in ("k", "target_l0"):
        return max(1, int(round(value * SIZES[size][1])))
    return value


def d_sae_for(spec: GroundTruthSpec) -> int:
    return spec.n_features  # d_sae 4096 at full size, as many latents as true features


def evaluate(truth: GroundTruth, heldout: torch.Tensor, W_dec: torch.Tensor, x_hat: torch.Tensor,
             l0: torch.Tensor) -> dict[str, float]:
    """Held-out metrics of one trained dictionary (ours or a peer's: the same function)."""
    metrics = reconstruction_metrics(heldout, x_hat, l0)
    cos = recovery(truth.features, W_dec)
    metrics["mmcs"] = float(cos.mean())
    metrics["mmcs_dense"] = float(cos[truth.dense_ids].mean())
    return metrics


# ---- our dictionaries -----------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`sweep:key=value` (or `all:key=value`) -> {sweep: {key: value}}; values parsed as YAML."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, _, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not eq or not key:
            raise SystemExit(f"quality.py: --set {item!r}: expected SWEEP:KEY=VALUE, e.g. relu-classic:lr=3e-4")
        out.setdefault(target, {})[key] = yaml.safe_load(value)
    return out


def our_runs(args: argparse.Namespace, d_sae: int) -> list[Run]:
    overrides = parse_overrides(args.set)
    runs = []
    for label in args.architectures:
        sweep = OURS[label]
        extra = {**overrides.get("all", {}), **overrides.get(label, {})}
        values = extra.pop(sweep.knob, None)
        values = values if isinstance(values, list) else ([values] if values is not None else sweep.values)
        for value in values:
            config = {**sweep.config, "d_sae": d_sae, **extra, sweep.knob: value}
            if args.lr is not None:
                config.setdefault("lr", args.lr)
            value = scaled(sweep.knob, value, args.size)
            config[sweep.knob] = value
            runs.append(Run("ours", label, sweep.family, sweep.knob, value, config))
    return runs


def train_ours(runs: list[Run], truth: GroundTruth, heldout: torch.Tensor, steps: int) -> None:
    if not runs:
        return
    configs = [parse_dictionary_config({**r.config, "name": r.name}) for r in runs]
    start = time.perf_counter()
    trained = train_dictionaries(truth, configs, total_tokens=steps * truth.spec.batch_size, progress=False)
    seconds = time.perf_counter() - start
    for run in runs:
        d = trained[run.name]
        with torch.no_grad():
            f = d.encode(heldout)
            x_hat = d.decode(f)
        run.metrics = evaluate(truth, heldout, d.W_dec, x_hat, (f != 0).sum(dim=-1))
        run.metrics["lr"] = d.metadata["lr_used"]
        run.metrics["train_seconds_all"] = seconds
    print(f"ours: {len(runs)} dictionaries trained together in {seconds:.0f} s", file=sys.stderr)


# ---- peers ------------------------------------------------------------------------------------------
# Each peer's architectures under its own names, with sweep values spanning the same L0 range.
PEER_SWEEPS = {
    "sae-lens": {
        "standard": Sweep("relu", {}, "l1_coefficient", [0.5, 1.0, 2.0, 5.0]),
        "topk": Sweep("topk", {}, "k", [16, 32, 64]),
        "batchtopk": Sweep("batchtopk", {}, "k", [16, 32, 64]),
        "jumprelu": Sweep("jumprelu", {}, "l0_coefficient", [0.3, 1.0, 3.0]),
        "gated": Sweep("gated", {}, "l1_coefficient", [1.0, 2.0, 5.0]),
        "matryoshka_batchtopk": Sweep("matryoshka", {"group_fractions": MATRYOSHKA_GROUPS}, "k", [16, 32, 64]),
    },
    "dictionary-learning": {
        "standard": Sweep("relu", {}, "l1_penalty", [0.03, 0.1, 0.3, 1.0, 2.0, 4.0]),
        "topk": Sweep("topk", {}, "k", [16, 32, 64]),
        "batchtopk": Sweep("batchtopk", {}, "k", [16, 32, 64]),
        "jumprelu": Sweep("jumprelu", {}, "target_l0", [20, 40, 80]),
        "gated": Sweep("gated", {}, "l1_penalty", [0.3, 1.0, 3.0]),
        "matryoshka_batchtopk": Sweep("matryoshka", {"group_fractions": MATRYOSHKA_GROUPS}, "k", [16, 32, 64]),
    },
    "eai-sparsify": {
        "topk": Sweep("topk", {}, "k", [16, 32, 64]),
    },
}
FAMILY_OF_OURS = {label: sweep.family for label, sweep in OURS.items()}


def peer_python(peer: str) -> Path:
    return VENVS / peer / "bin" / "python"


def setup_peers(peers: list[str]) -> None:
    """Create benchmarks/.venvs/<peer> for each peer: CPU torch first, then the peer from PyPI."""
    for peer in peers:
        requirements, _, remove = PEERS[peer]
        venv = VENVS / peer
        print(f"setting up {peer} in {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(peer_python(peer)), "-m", "pip"]
        subprocess.run(pip + ["install", "-q", TORCH_PIN], check=True)
        subprocess.run(pip + ["install", "-q", *requirements, TORCH_PIN], check=True)  # torch stays pinned
        if remove:
            subprocess.run(pip + ["uninstall", "-y", "-q", *remove], check=True)


def peer_runs(args: argparse.Namespace, peer: str) -> list[Run]:
    families = {FAMILY_OF_OURS[label] for label in args.architectures}
    overrides = parse_overrides(args.set)
    runs = []
    for arch, sweep in PEER_SWEEPS[peer].items():
        if sweep.family not in families:
            continue
        values = overrides.get(f"{peer} {arch}", {}).get(sweep.knob, sweep.values)
        for value in values if isinstance(values, list) else [values]:
            value = scaled(sweep.knob, value, args.size)
            runs.append(Run(peer, f"{peer} {arch}", sweep.family, sweep.knob, value,
                            {**sweep.config, "architecture": arch, sweep.knob: value}))
    return runs


def train_peer(peer: str, runs: list[Run], truth: GroundTruth, heldout: torch.Tensor, steps: int,
               d_sae: int, lr: float | None, work: Path) -> None:
    """Train `runs` with the peer's worker in its own environment; fill in their metrics."""
    work.mkdir(parents=True, exist_ok=True)
    request = {"spec": truth.spec.to_dict(), "steps": steps, "d_sae": d_sae, "lr": lr,
               "out_dir": str(work), "runs": [{"name": r.name, **r.config} for r in runs]}
    (work / "request.json").write_text(json.dumps(request, indent=1))
    worker = BENCH / PEERS[peer][1]
    start = time.perf_counter()
    done = subprocess.run([str(peer_python(peer)), str(worker), str(work / "request.json")])
    print(f"{peer}: {len(runs)} dictionaries in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if done.returncode != 0:
        print(f"{peer}: worker failed (exit {done.returncode}); its runs are left out", file=sys.stderr)
    for run in runs:
        result = work / f"{run.name}.pt"
        if not result.exists():
            continue
        out = torch.load(result, weights_only=True)
        run.metrics = evaluate(truth, heldout, out["W_dec"], out["x_hat"], out["l0"])
        run.metrics.update(json.loads((work / f"{run.name}.json").read_text()))


def installed_peers(wanted: list[str]) -> list[str]:
    found = []
    for peer in wanted:
        if peer_python(peer).exists():
            found.append(peer)
        else:
            print(f"peer {peer}: not installed ({VENVS / peer} missing; `python benchmarks/quality.py "
                  f"--setup-peers` makes it), skipped", file=sys.stderr)
    return found


# ---- reporting ---------------------------------------------------------------------------------------
def metric_at(runs: list[Run], l0: float, key: str = "fvu") -> float | None:
    """A sweep's metric at this L0, interpolated linearly in log L0 (None outside its L0 range)."""
    points = sorted((r.metrics["l0"], r.metrics[key]) for r in runs if r.metrics and r.metrics["l0"] > 0)
    for (l0_a, m_a), (l0_b, m_b) in zip(points, points[1:]):
        if l0_a <= l0 <= l0_b and l0_b > l0_a:
            t = (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
            return m_a + t * (m_b - m_a)
    exact = [m for x, m in points if abs(x - l0) <= 0.02 * l0]
    return exact[0] if exact else None


def best_peer(run: Run, peers: dict[str, list[Run]], same_family: bool = True) -> tuple[str, float, float] | None:
    """The peer sweep with the lowest FVU at this run's L0 (of this run's family, or of any):
    (label, its FVU, its MMCS there)."""
    best = None
    for label, sweep in peers.items():
        if same_family and sweep[0].family != run.family:
            continue
        fvu = metric_at(sweep, run.metrics["l0"])
        if fvu is not None and (best is None or fvu < best[1]):
            best = (label, fvu, metric_at(sweep, run.metrics["l0"], "mmcs"))
    return best


def group(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.label, []).append(run)
    return out


def versus(m: dict[str, float], peer: tuple[str, float, float] | None) -> str:
    if peer is None:
        return "| | "
    return f"{peer[0]} ({peer[1]:.3f}, {peer[2]:.2f}) | {100 * (m['fvu'] / peer[1] - 1):+.1f}% | {m['mmcs'] - peer[2]:+.2f}"


def table(runs: list[Run], steps: int) -> str:
    """Every run; ours beside the best peer of the same architecture family at the same L0 (FVU
    and MMCS interpolated in log L0 along the peer's sweep; blank outside its L0 range) and
    beside the best peer of any architecture."""
    peers = {label: rs for label, rs in group(runs).items() if rs[0].library != "ours"}
    lines = [f"Held-out metrics after {steps} steps (d_sae {runs[0].config.get('d_sae', '')}); peer columns: "
             "the best peer sweep at this L0 (its FVU, MMCS) and our FVU and MMCS relative to it." if runs else "", "",
             "| dictionary | knob | lr | L0 | FVU | MMCS | MMCS dense | best peer, same architecture | FVU | MMCS "
             "| best peer, any architecture | FVU | MMCS |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for run in runs:
        m = run.metrics
        if not m:
            lines.append(f"| {run.label} | {run.knob}={run.value:g} | | failed | | | | | | | | | |")
            continue
        ours = run.library == "ours"
        same = versus(m, best_peer(run, peers)) if ours else "| | "
        anyarch = versus(m, best_peer(run, peers, same_family=False)) if ours else "| | "
        lines.append(f"| {run.label} | {run.knob}={run.value:g} | {m.get('lr', float('nan')):.2g} | "
                     f"{m['l0']:.1f} | {m['fvu']:.3f} | {m['mmcs']:.3f} | {m['mmcs_dense']:.3f} | {same} | {anyarch} |")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    families = sorted({r.family for r in runs})
    cols = min(3, len(families))
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(families):]:
        ax.set_visible(False)
    for ax, family in zip(axes.flat, families):
        for label, rs in group([r for r in runs if r.family == family and r.metrics]).items():
            pts = sorted((r.metrics["l0"], r.metrics["fvu"]) for r in rs)
            ours = rs[0].library == "ours"
            ax.plot(*zip(*pts), marker="o" if ours else "s", linestyle="-" if ours else "--",
                    linewidth=2 if ours else 1, label=label)
        ax.set_xscale("log")
        # 1-2-5 ticks labelled as plain numbers: the default labels every minor tick of an axis
        # spanning about a decade in scientific notation, and they overlap
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(0, 1.1)  # a peer that failed to train sits above, out of view
        ax.set_title(family)
        ax.set_xlabel("L0")
        ax.set_ylabel("FVU (held out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"L0-FVU frontier, {steps} steps (ours: solid; peers: dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(runs: list[Run], spec: GroundTruthSpec, truth: GroundTruth, args, out: Path) -> None:
    header = {"size": args.size, "spec": spec.to_dict(), "steps": args.steps, "max_abs_cos": truth.max_abs_cos(),
              "overrides": args.set, "lr": args.lr}
    write_payload(header, runs, out)


def write_payload(header: dict[str, Any], runs: list[Run], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {**header, "runs": [{"library": r.library, "label": r.label, "family": r.family, "knob": r.knob,
                                   "value": r.value, "config": r.config, **r.metrics} for r in runs]}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out / "results.json")
    md = table(runs, header["steps"])
    (out / "frontier.md").write_text(md + "\n")
    plot(runs, out / "frontier.png", header["steps"])
    print(md)
    print(f"\nwrote {out}/results.json, frontier.md, frontier.png", file=sys.stderr)


def merged(paths: list[Path]) -> tuple[dict[str, Any], list[Run]]:
    """The header (ground truth, steps) the results.json files share and their runs (ours first),
    for one table and one plot; files measured on other data or steps are refused."""
    files = [json.loads(path.read_text()) for path in paths]
    header = {k: v for k, v in files[0].items() if k != "runs"}
    for path, other in zip(paths[1:], files[1:]):
        for key in ("spec", "steps"):
            if other.get(key) != header.get(key):
                raise SystemExit(f"--merge: {path} has other {key} than {paths[0]} "
                                 f"({other.get(key)} vs {header.get(key)}); merge runs of one ground truth and step count")
        for key in ("overrides", "lr"):  # kept when the files agree
            if other.get(key) != header.get(key):
                header[key] = "differ between the merged files"
    runs = []
    for raw in (raw for f in files for raw in f["runs"]):
        keys = ("library", "label", "family", "knob", "value", "config")
        metrics = {k: v for k, v in raw.items() if k not in keys}
        runs.append(Run(*(raw[k] for k in keys), metrics=metrics))
    return header, sorted(runs, key=lambda r: r.library != "ours")


# ---- command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 128; --quick: 16)")
    p.add_argument("--size", choices=list(SIZES), default="full",
                   help="full: the issue's setting (d_in 512, 4096 features, batch 4096); medium: each /4 "
                        "(true L0 8), 64x cheaper per step; quick: tiny, a smoke test")
    p.add_argument("--quick", action="store_true", help="same as --size quick")
    p.add_argument("--architectures", nargs="+", default=list(OURS), choices=list(OURS), metavar="ARCH",
                   help=f"our sweeps to run (default all: {' '.join(OURS)})")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS), metavar="PEER",
                   help="peers to train beside ours when installed (default all; none: --peers)")
    p.add_argument("--lr", type=float, default=None, help="one lr for every dictionary, peers included "
                   "(default: each library's own default)")
    p.add_argument("--set", action="append", default=[], metavar="SWEEP:KEY=VALUE",
                   help="override a key of our sweep SWEEP (or 'all'), e.g. relu-classic:grad_clip=null; "
                        "the sweep's knob takes a list: relu-classic:l1_coefficient=[1,2]; a peer's sweep "
                        "takes its knob's values: 'sae-lens topk:k=[32]'")
    p.add_argument("--seed", type=int, default=0, help="seed of the ground truth and its batches")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="output folder")
    p.add_argument("--peers-only", action="store_true",
                   help="train only the peers (for the families of --architectures), none of ours")
    p.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="no training: tabulate and plot the runs of these results.json files together")
    p.add_argument("--setup-peers", action="store_true", help="create the peers' environments and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.size = "quick"
    if args.steps is None:
        args.steps = SIZES[args.size][2]
    peer_labels = [f"{peer} {arch}" for peer, sweeps in PEER_SWEEPS.items() for arch in sweeps]
    bad = [s for s in args.set if s.partition(":")[0] not in (*OURS, "all", *peer_labels)]
    if bad:
        p.error(f"--set {bad[0]!r}: the part before ':' must be one of {', '.join(OURS)}, 'all', "
                f"or a peer's sweep ('{peer_labels[0]}': its knob's values only)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.setup_peers:
        setup_peers(args.peers)
        return
    if args.merge:
        write_payload(*merged(args.merge), args.out)
        return
    spec = make_spec(args)
    truth = GroundTruth(spec)
    heldout = truth.heldout()
    d_sae = d_sae_for(spec)
    runs = [] if args.peers_only else our_runs(args, d_sae)
    train_ours(runs, truth, heldout, args.steps)
    for peer in installed_peers(args.peers):
        mine = peer_runs(args, peer)
        train_peer(peer, mine, truth, heldout, args.steps, d_sae, args.lr, args.out / "peers" / peer)
        runs += mine
    write_results(runs, spec, truth, args, args.out)


if __name__ == "__main__":
    main()
