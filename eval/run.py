"""The evaluation step of a training run (what train.py calls at the end of a run).

    from eval.run import evaluate_run
    results = evaluate_run(model, dictionaries, out_dirs, run_dir, tokens, keep_mask, train_means,
                           batch_size=run.eval.batch_contexts, prune=run.prune,
                           info={"dataset": {...}})

evaluates every trained dictionary on the held-out tokens (shared forwards), writes eval.json,
frequency.safetensors and frequency_histogram.png into each dictionary's folder; with a `prune:`
block, prunes the listed dictionaries at each max_frequency (frequencies from this very
evaluation), saves them as `<name>-pruned-<t>` folders in the run and evaluates them on the same
tokens; with `prune.ablation`, runs the frequency ablation into `<run_dir>/ablation/`; finally
writes `<run_dir>/summary.md` and `summary.json` and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from eval import evaluate as E
from eval import report
from eval.prune import (check_distinct_labels, describe, kill_mask_from_frequency, prune_dictionary, save_pruned,
                        threshold_label)


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


def evaluate_run(model, dictionaries: Mapping[str, Any], out_dirs: Mapping[str, str | Path], run_dir: str | Path,
                 tokens: Tensor, keep_mask: Tensor, train_means: Mapping[str, Tensor], *,
                 batch_size: int = E.DEFAULT_BATCH_CONTEXTS, prune: Any = None,
                 info: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, E.EvalResult]:
    """Evaluate a run's dictionaries (+ the `prune:` block of the run config) and write the summary.

    dictionaries: name -> trained SparseDictionary (saved, raw-activation units, on the model's device).
    out_dirs: name -> its folder (eval.json etc. go there). run_dir: where summary.md/.json go.
    tokens, keep_mask: held-out contexts and their keep mask (sae.text.load_contexts(split="heldout"),
      sae.text.keep_mask). train_means: x̄ over training tokens keyed by dictionary name or hook name.
    prune: sae.config.PruneConfig or None (fields dictionaries, max_frequency, min_frequency, mode,
      ablation{dictionary, thresholds, compare, mode}).
    Returns name -> EvalResult for every evaluated dictionary, pruned ones included.
    """
    check_prune_config(prune)
    run_dir = Path(run_dir)
    out_dirs = {k: Path(v) for k, v in out_dirs.items()}
    results = E.evaluate_dictionaries(model, dictionaries, tokens, keep_mask, train_means=train_means,
                                      out_dirs=out_dirs, batch_size=batch_size, info=info, progress=progress)
    if prune is not None:
        pruned: dict[str, Any] = {}
        pruned_dirs: dict[str, Path] = {}
        pruned_means: dict[str, Tensor] = dict(train_means)
        for name in prune.dictionaries:
            d = dictionaries[name]
            freq = results[name].frequency
            tokens_evaluated = results[name].metrics["tokens_evaluated"]
            for t in dict.fromkeys(prune.max_frequency or [None]):  # an exact repeat is pruned once
                kill = kill_mask_from_frequency(freq, max_frequency=t, min_frequency=prune.min_frequency)
                new = pruned_name(name, t, prune.min_frequency)
                if bool(kill.all()):
                    record = {"max_frequency": t, "min_frequency": prune.min_frequency, "killed": int(kill.sum()),
                              "kill_mode": prune.mode, "frequency_tokens": tokens_evaluated,
                              "frequency_source": f"evaluation of {name} on held-out tokens"}
                    print(f"prune {name}: {describe(record, d.d_sae)}; skipped (nothing would be left; "
                          f"its lowest feature frequency is {float(freq.min()):.3g})", flush=True)
                    continue
                res = prune_dictionary(d, kill, prune.mode, max_frequency=t, min_frequency=prune.min_frequency,
                                       frequency_source=f"evaluation of {name} on held-out tokens",
                                       frequency_tokens=tokens_evaluated, name=new)
                print(f"prune {name} -> {new}: {describe(res.record, d.d_sae)}", flush=True)
                save_pruned(res, run_dir / new, source_dir=out_dirs.get(name))
                pruned[new], pruned_dirs[new] = res.dictionary, run_dir / new
                hook = d.metadata.get("hook_name")
                mean = train_means.get(name, train_means.get(hook))
                if mean is not None:
                    pruned_means[new] = mean
        if pruned:
            results.update(E.evaluate_dictionaries(model, pruned, tokens, keep_mask, train_means=pruned_means,
                                                   out_dirs=pruned_dirs, batch_size=batch_size, info=info,
                                                   progress=progress))
        ablation = getattr(prune, "ablation", None)
        if ablation is not None:
            from eval.ablate import ablation_table, run_ablation

            name = ablation.dictionary
            refs = {k: results[k] for k in [name, *ablation.compare]}
            out = run_ablation(model, dictionaries[name], results[name].frequency, ablation.thresholds, tokens,
                               keep_mask, train_means, name=name, mode=ablation.mode, references=refs,
                               out_dir=run_dir / "ablation", batch_size=batch_size,
                               frequency_source=f"evaluation of {name} on {results[name].metrics['tokens_evaluated']} "
                                                f"held-out tokens", info=info, progress=progress)
            print(ablation_table(out), flush=True)
    report.write_summary(run_dir, results)
    report.print_results(results)
    return results
