"""python -m eval {evaluate,prune,ablate-frequency,features} ..."""

from __future__ import annotations

import argparse
import sys

from eval import features, report
from eval.ablate import ablate_dir
from eval.evaluate import DEFAULT_BATCH_CONTEXTS
from eval.folders import DEFAULT_EVAL_TOKENS, evaluate_dirs
from eval.prune import prune_dir
from sae import distributed as dist
from sae.config import DEFAULT_FREQUENCY_TOKENS
from sae.errors import cli_errors
from sae.means import MEAN_TOKENS


def _common(p: argparse.ArgumentParser, tokens: bool = True) -> None:
    if tokens:
        p.add_argument("--tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                       help=f"held-out tokens to evaluate on (default {DEFAULT_EVAL_TOKENS}; rounded up to whole contexts)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_CONTEXTS,
                   help=f"contexts per model forward (default {DEFAULT_BATCH_CONTEXTS}); changes no number, only memory")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16, float16")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="held-out text source instead of the one in cfg.json (shakespeare, a local file, a hub id)")
    p.add_argument("--mean-tokens", type=int, default=MEAN_TOKENS,
                   help="training tokens for the mean-ablation baseline's x̄ when a folder has no "
                        f"activation_mean.safetensors (default {MEAN_TOKENS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _kill_frequency_args(p: argparse.ArgumentParser) -> None:
    """Where the frequencies that decide the kill set come from (never the held-out tokens scored on)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cache", default=None, metavar="CACHE_DIR",
                       help="measure them on the first --frequency-tokens tokens of this activation cache (the "
                            "training run's cache/) instead of on model forwards over the training split")
    where.add_argument("--frequency-file", default=None, metavar="FILE",
                       help="take them from this file (a frequency.safetensors: tensor 'frequency' [d_sae]) "
                            "instead of measuring them on training tokens")
    p.add_argument("--frequency-tokens", type=int, default=DEFAULT_FREQUENCY_TOKENS,
                   help=f"training tokens to measure them on (default {DEFAULT_FREQUENCY_TOKENS})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=(
        "Evaluate sparse dictionaries on held-out tokens (metrics of METRICS.md), prune them by feature "
        "frequency, and run frequency ablations."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("evaluate", help="evaluate dictionary folders; writes eval.json, frequency.safetensors, "
                                        "frequency_histogram.png into each",
                       description="Evaluate dictionary folders (cfg.json + sae.safetensors) on held-out tokens of "
                                   "the text they were trained on. Dictionaries of the same model and text share "
                                   "the model's forward passes.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="dictionary folders, or run folders (every dictionary in them)")
    p.add_argument("--summary", default=None, metavar="FOLDER", help="also write summary.md/.json into FOLDER")
    p.add_argument("--feature-sharded", action="store_true",
                   help="under torchrun: each rank loads only its shard of every dictionary's features (for "
                        "dictionaries too wide for one device, e.g. saved as feature shards); same numbers")
    _common(p)

    p = sub.add_parser("prune", help="kill features outside a frequency band; write and evaluate the smaller dictionary",
                       description="Kill the features with frequency > --max-frequency and/or <= --min-frequency "
                                   "(and --kill-ids), write the smaller dictionary to --out (its cfg.json records "
                                   "the killed original ids, thresholds, mode, frequency source and the new->original "
                                   "id map), evaluate it and print before/after on held-out tokens. The frequencies "
                                   "that decide the kill set are measured on training tokens: a training-split pass "
                                   "over the dictionary's text, or --cache; or read from --frequency-file.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--max-frequency", type=float, default=None, help="kill features with frequency > F")
    p.add_argument("--min-frequency", type=float, default=None, help="kill features with frequency <= F (0: the dead)")
    p.add_argument("--kill-ids", default=None, help="comma-separated feature ids to kill as well")
    p.add_argument("--mode", choices=["after", "before"], default="after",
                   help="TopK-style only: kill after the top-k selection (L0 drops) or before it (L0 stays k)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the pruned dictionary")
    _kill_frequency_args(p)
    _common(p)

    p = sub.add_parser("ablate-frequency", help="kill features above each threshold in turn; ablation.json/.md/.png",
                       description="For each threshold t, kill (at run time) the features with frequency > t and "
                                   "evaluate on held-out tokens; the unpruned dictionary and --compare dictionaries "
                                   "are reference points on the same tokens. The frequencies are measured on training "
                                   "tokens (as for prune). Writes ablation.json, ablation.md, ablation.png.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--thresholds", required=True, help="comma-separated frequencies, e.g. 0.2,0.1,0.05,0.038,0.02,0.01")
    p.add_argument("--compare", nargs="*", default=[], metavar="OTHER_DIR", help="other dictionaries to plot")
    p.add_argument("--mode", choices=["after", "before"], default="after", help="TopK-style kill mode")
    p.add_argument("--out", default=None, metavar="OUT_DIR", help="where to write (default DIR)")
    _kill_frequency_args(p)
    _common(p)

    features.add_arguments(sub.add_parser("features", help="inspect features: top contexts, logit lens; "
                                                           "features.html + features.json"))
    return parser


def _evaluate(args: argparse.Namespace) -> None:
    started = dist.init_from_env() if args.feature_sharded else False
    try:
        results = evaluate_dirs(args.dirs, n_tokens=args.tokens, batch_size=args.batch_size, device=args.device,
                                dtype=args.dtype, data_source=args.data, mean_tokens=args.mean_tokens,
                                progress=not args.no_progress, feature_sharded=args.feature_sharded)
        if dist.is_main():
            report.print_results(results)
            if args.summary:
                md, js = report.write_summary(args.summary, results)
                print(f"wrote {md} and {js}")
    finally:
        if started:
            dist.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    with cli_errors("python -m eval"):
        if args.command == "evaluate":
            _evaluate(args)
        elif args.command == "prune":
            prune_dir(args.dir, args.out, max_frequency=args.max_frequency, min_frequency=args.min_frequency,
                      kill_ids=args.kill_ids, mode=args.mode, n_tokens=args.tokens, batch_size=args.batch_size,
                      device=args.device, dtype=args.dtype, data_source=args.data, mean_tokens=args.mean_tokens,
                      frequency_file=args.frequency_file, cache_dir=args.cache,
                      frequency_tokens=args.frequency_tokens, progress=not args.no_progress)
        elif args.command == "ablate-frequency":
            ablate_dir(args.dir, args.thresholds, compare=args.compare, mode=args.mode, out_dir=args.out,
                       n_tokens=args.tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                       data_source=args.data, mean_tokens=args.mean_tokens, frequency_file=args.frequency_file,
                       cache_dir=args.cache, frequency_tokens=args.frequency_tokens, progress=not args.no_progress)
        elif args.command == "features":
            features.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
