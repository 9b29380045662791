"""Evaluation of sparse dictionaries (every metric of METRICS.md), pruning and frequency ablations;
`python -m eval --help` for the commands.

metrics.py   accumulators, no model          evaluate.py  model + dictionaries + tokens -> metrics
forwards.py  the clean forward, then each variant run on from the hook (or full forwards)
outputs.py   eval.json, frequency, histogram  folders.py   dictionary folders -> groups -> evaluate
prune.py     kill features by frequency       ablate.py    one dictionary at many thresholds
kill_frequency.py  the frequencies, on training tokens, that decide what pruning kills
run.py       train.py's end-of-run step       report.py    summary tables; features.py  feature pages
"""
