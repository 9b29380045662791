"""The run orchestration: what `train.py CONFIG.yaml` does, start to finish (experiment.py), and
what it reuses from an earlier run of the same config (resume.py). It sits above the library
(`sae`) and the evaluator (`eval`); neither imports it."""

from pipeline.experiment import DIVERGED_STATUS, run_experiment  # noqa: F401
from pipeline.resume import diverged_dictionaries  # noqa: F401
