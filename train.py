#!/usr/bin/env python
"""Launch a run from a YAML file: harvest activations, train every dictionary, evaluate, prune.

    python train.py configs/demo.yaml [dotted.key=value ...]

Everything the run writes goes to <output_dir>/<run_name>/ (default runs/<run_name>/):
config.yaml (the resolved config), cache/ (activations), one folder per dictionary
(sae.safetensors, cfg.json, eval.json, frequency histogram), summary.md/.json.
Re-running the same command resumes: the cache continues from its last complete shard and each
dictionary from its last checkpoint; finished steps are not redone. Exit status 3: the run
finished, but some dictionaries diverged (the last line names them).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.batch_size=2048")
    parser.add_argument("--check", action="store_true", help="validate the config, print the dictionaries, stop")
    args = parser.parse_args(argv)

    # imported after parsing the arguments: `train.py --help` answers without loading torch (~3 s)
    from sae.errors import cli_errors

    with cli_errors("train.py"):
        from pipeline import DIVERGED_STATUS, diverged_dictionaries, run_experiment
        from sae.config import load_run_config

        run, dictionaries = load_run_config(args.config, args.overrides)
        if args.check:
            for d in dictionaries:
                print(d.name, d.as_written().model_dump(exclude_defaults=True))
            return
        run_experiment(run, dictionaries)
        if diverged_dictionaries(run, dictionaries):  # the last line said how many
            sys.exit(DIVERGED_STATUS)


if __name__ == "__main__":
    main(sys.argv[1:])
