"""The evaluation step at the end of a training run: evaluate every trained dictionary on the
held-out tokens, prune and ablate as the run config's `prune:` block says (the kill sets chosen on
training tokens, eval.kill_frequency), write each dictionary's outputs and the run's
summary.md/.json, and print the table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from eval import report
from eval.ablate import AblationResult, ablation_table, run_ablation, write_ablation
from eval.evaluate import DEFAULT_BATCH_CONTEXTS, EvalResult, evaluate_dictionaries
from eval.kill_frequency import KillFrequencies, TrainingActivations, measure_kill_frequencies
from eval.outputs import write_all
from eval.prune import (PruneResult, check_distinct_labels, describe, kill_mask_from_frequency, prune_dictionary,
                        save_pruned, threshold_label)


def pruned_name(name: str, max_frequency: float | None, min_frequency: float | None = None) -> str:
    parts = [name, "pruned"]
    if max_frequency is not None:
        parts.append(threshold_label(max_frequency))
    if min_frequency is not None:
        parts.append(f"min{threshold_label(min_frequency)}")
    return "-".join(parts)


def check_prune_config(prune: Any) -> None:
    """Refuse (UserError) a `prune:` block whose thresholds would share a folder or ablation row name
    (e.g. 0.1 and 0.1000001, both printed 0.1); called before anything is evaluated."""
    if prune is None:
        return
    check_distinct_labels(prune.max_frequency or [], "prune.max_frequency")
    ablation = getattr(prune, "ablation", None)
    if ablation is not None:
        check_distinct_labels(ablation.thresholds, "prune.ablation.thresholds")


@dataclass
class _HeldOut:
    """What every evaluation of a run shares: the model, the held-out tokens, the settings."""

    model: Any
    tokens: Tensor
    keep_mask: Tensor
    batch_size: int
    info: Mapping[str, Any] | None
    progress: bool

    def evaluate(self, dictionaries: Mapping[str, Any], train_means: Mapping[str, Tensor]) -> dict[str, EvalResult]:
        return evaluate_dictionaries(self.model, dictionaries, self.tokens, self.keep_mask, train_means=train_means,
                                     batch_size=self.batch_size, info=self.info, progress=self.progress)

    def ablate(self, ablation: Any, dictionaries: Mapping[str, Any], results: Mapping[str, EvalResult],
               train_means: Mapping[str, Tensor], kill: KillFrequencies) -> AblationResult:
        """The `prune.ablation` block: one dictionary's frequency ablation (kill sets from `kill`)
        against the others, whose results are reused."""
        name = ablation.dictionary
        return run_ablation(self.model, dictionaries[name], kill.frequency[name], ablation.thresholds,
                            self.tokens, self.keep_mask, train_means, name=name, mode=ablation.mode,
                            references={k: results[k] for k in [name, *ablation.compare]},
                            batch_size=self.batch_size, info=self.info, progress=self.progress,
                            frequency_source=kill.source, frequency_tokens=kill.tokens)


@dataclass
class _Pruned:
    """The pruned dictionaries of a run, their folders and training means (keyed like train_means)."""

    dictionaries: dict[str, Any] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)
    means: dict[str, Tensor] = field(default_factory=dict)


def evaluate_run(model, dictionaries: Mapping[str, Any], out_dirs: Mapping[str, str | Path], run_dir: str | Path,
                 tokens: Tensor, keep_mask: Tensor, train_means: Mapping[str, Tensor], *,
                 batch_size: int = DEFAULT_BATCH_CONTEXTS, prune: Any = None,
                 training_activations: TrainingActivations | None = None,
                 info: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, EvalResult]:
    """Evaluate a run's dictionaries (+ the `prune:` block of the run config) and write the summary.

    dictionaries: name -> trained SparseDictionary (saved, raw-activation units, on the model's device).
    out_dirs: name -> its folder (eval.json etc. go there). run_dir: where summary.md/.json go.
    tokens, keep_mask: held-out contexts and their keep mask (sae.text.load_contexts(split="heldout"),
      sae.text.keep_mask). train_means: x̄ over training tokens keyed by dictionary name or hook name.
    prune: sae.config.PruneConfig or None (fields dictionaries, max_frequency, min_frequency, mode,
      ablation{dictionary, thresholds, compare, mode}).
    training_activations: where the prune block's kill decisions are measured (training tokens:
      eval.kill_frequency's CacheSlice or TrainingSplitPass); required with a prune block.
    Returns name -> EvalResult for every evaluated dictionary, pruned ones included.
    """
    check_prune_config(prune)
    if prune is not None and training_activations is None:
        raise ValueError("a prune block needs training_activations: the kill decisions are measured on "
                         "training tokens, never on the held-out tokens they are scored on")
    run_dir = Path(run_dir)
    out_dirs = {k: Path(v) for k, v in out_dirs.items()}
    heldout = _HeldOut(model, tokens, keep_mask, batch_size, info, progress)
    kill, pruned = None, _Pruned(means=dict(train_means))
    if prune is not None:  # the kill sets do not depend on the held-out tokens: pruned first
        kill = kill_frequencies(prune, dictionaries, training_activations, progress)
        pruned = prune_run(prune, dictionaries, kill, out_dirs, run_dir, train_means)
    results = heldout.evaluate({**dictionaries, **pruned.dictionaries}, pruned.means)  # shared forwards
    write_all(results, {**out_dirs, **pruned.dirs})
    if kill is not None and getattr(prune, "ablation", None) is not None:
        ablation = heldout.ablate(prune.ablation, dictionaries, results, train_means, kill)
        write_ablation(run_dir / "ablation", ablation)
        print(ablation_table(ablation), flush=True)
    report.write_summary(run_dir, results)
    report.print_results(results)
    return results


def kill_frequencies(prune: Any, dictionaries: Mapping[str, Any], activations: TrainingActivations,
                     progress: bool = True) -> KillFrequencies:
    """The frequencies, on training tokens, of every dictionary the prune block kills features of
    (one pass over the tokens for all of them)."""
    ablated = [prune.ablation.dictionary] if getattr(prune, "ablation", None) is not None else []
    names = list(dict.fromkeys([*prune.dictionaries, *ablated]))
    kill = measure_kill_frequencies({n: dictionaries[n] for n in names}, activations, progress)
    print(f"kill decisions from feature frequencies on {kill.source}, {kill.tokens} tokens", flush=True)
    return kill


def prune_run(prune: Any, dictionaries: Mapping[str, Any], kill: KillFrequencies,
              out_dirs: Mapping[str, Path], run_dir: Path, train_means: Mapping[str, Tensor]) -> _Pruned:
    """Prune each listed dictionary at each max_frequency (frequencies from `kill`) and save it
    as `<name>-pruned-<t>` in the run."""
    pruned = _Pruned(means=dict(train_means))
    for name in prune.dictionaries:
        d = dictionaries[name]
        for t in dict.fromkeys(prune.max_frequency or [None]):  # an exact repeat is pruned once
            new = pruned_name(name, t, prune.min_frequency)
            res = _prune_one(prune, name, d, kill, t, new)
            if res is None:
                continue
            save_pruned(res, run_dir / new, source_dir=out_dirs.get(name))
            pruned.dictionaries[new], pruned.dirs[new] = res.dictionary, run_dir / new
            mean = train_means.get(name, train_means.get(d.metadata.get("hook_name")))
            if mean is not None:
                pruned.means[new] = mean
    return pruned


def _prune_one(prune: Any, name: str, d, kill: KillFrequencies, max_frequency: float | None,
               new: str) -> PruneResult | None:
    """`d` without the features outside the band, or None (said) when nothing would be left."""
    freq = kill.frequency[name]
    mask = kill_mask_from_frequency(freq, max_frequency=max_frequency, min_frequency=prune.min_frequency)
    if bool(mask.all()):
        record = {"max_frequency": max_frequency, "min_frequency": prune.min_frequency, "killed": int(mask.sum()),
                  "kill_mode": prune.mode, "frequency_tokens": kill.tokens, "frequency_source": kill.source}
        print(f"prune {name}: {describe(record, d.d_sae)}; skipped (nothing would be left; "
              f"its lowest feature frequency is {float(freq.min()):.3g})", flush=True)
        return None
    res = prune_dictionary(d, mask, prune.mode, max_frequency=max_frequency, min_frequency=prune.min_frequency,
                           frequency_source=kill.source, frequency_tokens=kill.tokens, name=new)
    print(f"prune {name} -> {new}: {describe(res.record, d.d_sae)}", flush=True)
    return res
