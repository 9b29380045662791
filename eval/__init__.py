"""Evaluation of sparse dictionaries (every metric of METRICS.md), pruning and frequency ablations.

Command line: `python -m eval {evaluate,prune,ablate-frequency,features} ...` (see --help).
From Python:
- `eval.evaluate.evaluate_dictionaries(model, {name: dictionary}, tokens, keep_mask, train_means, ...)`
- `eval.run.evaluate_run(...)`: the end-of-run step of train.py (evaluate, prune, ablate, summary)
- `eval.report.write_summary(run_dir, results)`
- `eval.prune.prune_dictionary(...)`, `eval.ablate.run_ablation(...)`
Submodules are imported on use so that `import eval` stays cheap.
"""
