"""What a run reuses from an earlier run in the same folder.

- `check_same_run`: the earlier run (its config.yaml) must have read the same activation stream:
  same model, dataset, training tokens, batch size, ..., and each dictionary the same hook point.
  Another is refused with one line before anything is written (the sweep itself may change).
- `saved_dictionaries`: each dictionary an earlier run saved: trained (reused; refused when it was
  trained with other settings: a finished dictionary is never overwritten) or diverged (skipped
  with the same settings, trained again with changed ones).
- `completed_run`: the same config already ran to the end: its summary is printed, nothing redone.
- `same_evaluation`, `to_evaluate`, `kept_evaluations`: which evaluations already written (eval.json,
  pruned folders, the ablation) still hold, so that only new dictionaries are evaluated.
Per-dictionary checkpoints (resumed or restarted) are the trainer's (sae.trainer, sae.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from eval.ablate import ABLATION_JSON
from eval.outputs import EVAL_FILE
from eval.run import pruned_name
from sae import io
from sae.checkpoint import changed_settings
from sae.config import RunConfig, dump_run_config, expand_dictionaries
from sae.dictionaries import DictionaryConfig, SparseDictionary
from sae.dictionaries.base import CFG_FILE
from sae.errors import ConfigError, UserError
from sae.formats import ours
from sae.loading import Header, load_dictionary, read_header
from sae.models import hook_layer

CONFIG_FILE = "config.yaml"
# The run settings that make the activation stream: a run folder resumes only with the same.
STREAM_KEYS = ("model", "model_dtype", "data", "train_tokens", "seed", "train.batch_size", "train.epochs",
               "harvest.mode", "harvest.dtype", "harvest.contexts_per_shard")
# The settings the evaluations (eval.json, pruned dictionaries, ablation) were made with.
EVAL_KEYS = ("eval_tokens", "eval", "prune")


def dictionary_metadata(run: RunConfig, cfg: DictionaryConfig) -> dict[str, Any]:
    """What each cfg.json records about where the dictionary's activations came from and the
    run-level settings it was trained with."""
    return {
        "model_name": run.model,
        "model_dtype": run.model_dtype,
        "hook_name": cfg.hook_name,
        "hook_layer": hook_layer(cfg.hook_name),
        "context_size": run.data.context_size,
        "prepend_bos": True,
        "dataset": run.data.model_dump(mode="json"),  # includes exclude_tokens
        "run_name": run.run_name,
        "training": {"train_tokens": run.train_tokens, "batch_size": run.train.batch_size,
                     "epochs": run.train.epochs, "harvest_dtype": run.harvest.dtype, "seed": run.seed},
    }


# ---- the run: same stream, same hooks ------------------------------------------------------------
def _earlier_config(run: RunConfig) -> dict[str, Any] | None:
    path = run.run_dir / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_same_run(run: RunConfig, configs: list[DictionaryConfig]) -> None:
    """ConfigError (one line, naming what differs) when the earlier run in this folder read
    another activation stream, or trained a dictionary of the same name on another hook point."""
    before = _earlier_config(run)
    if before is None:
        return
    now = run.model_dump(mode="json")
    changed = changed_settings({k: _dotted(before, k) for k in STREAM_KEYS}, {k: _dotted(now, k) for k in STREAM_KEYS})
    if changed:
        raise ConfigError(f"{run.run_dir} was trained with other settings ({'; '.join(changed)}): a run folder "
                          f"resumes only with the same model, data and training settings; use another run_name "
                          f"(or output_dir), or set them back")
    hooks = _earlier_hooks(before)
    for cfg in configs:
        if hooks.get(cfg.name, cfg.hook_name) != cfg.hook_name:
            raise ConfigError(f"dictionary {cfg.name!r} of {run.run_dir} was trained on {hooks[cfg.name]}, this "
                              f"config puts it on {cfg.hook_name}: give it another name, or use another run_name")


def _earlier_hooks(before: dict[str, Any]) -> dict[str, str]:
    """{name: hook point} of the earlier run's dictionaries ({} when its config no longer validates)."""
    try:
        return {c.name: c.hook_name for c in expand_dictionaries(RunConfig.model_validate(before))}
    except (ValidationError, UserError):
        return {}


def same_evaluation(run: RunConfig) -> bool:
    """Whether the earlier run in this folder evaluated with this run's settings (so its eval.json
    files, pruned dictionaries and ablation still hold). Read before config.yaml is rewritten."""
    before = _earlier_config(run)
    now = run.model_dump(mode="json")
    return before is not None and all(_dotted(before, k) == _dotted(now, k) for k in EVAL_KEYS)


# ---- each dictionary's folder ----------------------------------------------------------------------
@dataclass
class Saved:
    """A dictionary an earlier run saved in its folder (its weights read only when asked for: a
    dictionary saved as feature shards may not fit in one process)."""

    folder: Path
    header: Header  # its cfg.json
    changed: list[str]  # the settings it was trained with that differ from today's ("k: 4 -> 5")
    old_defaults: list[str] = field(default_factory=list)  # hyperparameters left at a default that changed since

    @property
    def diverged(self) -> bool:
        return self.header.metadata.get("status") == "diverged"

    @cached_property
    def dictionary(self) -> SparseDictionary:
        """Its weights (a diverged one's last good weights)."""
        return load_dictionary(self.folder)


def _trained_with(hyperparameters: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """Everything that shapes a trained dictionary: its own hyperparameters and the run's settings."""
    return {**hyperparameters, **(metadata.get("training") or {}),
            **{k: metadata.get(k) for k in ("model_name", "model_dtype", "dataset")}}


def _changed(run: RunConfig, cfg: DictionaryConfig, header: Header) -> list[str]:
    saved = _trained_with(header.hyperparameters.model_dump(mode="json"), header.metadata)
    # a loaded dictionary states its width as d_sae: compare widths, not how they were asked for
    as_width = cfg.model_copy(update={"d_sae": cfg.resolve_d_sae(header.d_in), "expansion_factor": None})
    wanted = _trained_with(as_width.model_dump(mode="json"), dictionary_metadata(run, cfg))
    return changed_settings(saved, wanted)


def saved_dictionaries(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, Saved]:
    """{name: Saved} of the dictionaries an earlier run saved in this run's folder.

    A trained (not diverged) dictionary whose settings changed is an error, not silently
    retrained over: its folder holds a finished result."""
    found: dict[str, Saved] = {}
    for cfg in configs:
        folder = run.run_dir / cfg.name
        if not ours.detect(folder):
            continue
        header = read_header(folder)
        changed = _changed(run, cfg, header)
        unset = set(type(cfg).model_fields) - cfg.model_fields_set - {"d_sae", "expansion_factor"}
        old_defaults = [c for c in changed if c.split(":")[0] in unset]  # not asked for: a newer default
        saved = Saved(folder, header, [c for c in changed if c not in old_defaults], old_defaults)
        if saved.changed and not saved.diverged:
            raise ConfigError(f"{folder} was trained with other settings ({'; '.join(saved.changed)}); pick "
                              f"another run_name or dictionary name, or delete that folder to retrain")
        found[cfg.name] = saved
    return found


def divergence_summary(d: SparseDictionary) -> dict[str, Any]:
    """A diverged dictionary's row for the run's summary (eval.report.write_summary)."""
    return {"architecture": d.architecture, "hook": d.metadata.get("hook_name"), "d_in": d.d_in, "d_sae": d.d_sae,
            "lr": d.metadata.get("lr_used"), **d.metadata["divergence"]}


def diverged_dictionaries(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, dict[str, Any]]:
    """{name: its divergence record (step, tokens, restored_step, loss_tail)} of the run's
    dictionaries saved with status "diverged" (from their cfg.json alone)."""
    found = {}
    for cfg in configs:
        path = run.run_dir / cfg.name / CFG_FILE
        record = io.read_json(path) if path.is_file() else {}
        if record.get("status") == "diverged":
            found[cfg.name] = record["divergence"]
    return found


def completed_run(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, Any] | None:
    """{name: eval.json} when this exact config already ran to the end (same config.yaml, every
    dictionary saved and evaluated (or diverged), the summary written for all), else None."""
    run_dir = run.run_dir
    config_file, summary = run_dir / CONFIG_FILE, run_dir / "summary.md"
    # (under torchrun every rank reads the same files and so returns alike, with no collective)
    if not run.eval.enabled or not (config_file.is_file() and summary.is_file()):
        return None
    if config_file.read_text() != dump_run_config(run) or not (run_dir / "summary.json").is_file():
        return None
    summarised = {row["name"] for row in io.read_json(run_dir / "summary.json")["dictionaries"]}
    saved = saved_dictionaries(run, configs)
    for cfg in configs:
        s = saved.get(cfg.name)
        if s is None or cfg.name not in summarised or not (s.diverged or (run_dir / cfg.name / EVAL_FILE).is_file()):
            return None
    return {name: io.read_json(run_dir / name / EVAL_FILE) for name, s in saved.items() if not s.diverged}


# ---- evaluations -----------------------------------------------------------------------------------
def pruned_names(prune: Any, names: list[str]) -> list[str]:
    """The folders the `prune:` block makes from the dictionaries in `names`, in its order."""
    if prune is None:
        return []
    return [pruned_name(p, t, prune.min_frequency) for p in prune.dictionaries if p in names
            for t in dict.fromkeys(prune.max_frequency or [None])]


def to_evaluate(run: RunConfig, names: list[str], reusable: set[str]) -> list[str]:
    """Which of `names` (trained, not diverged) to evaluate now: those whose earlier evaluation may
    not be kept (not in `reusable`: trained in this run, or evaluated with other settings) or that
    have none, and those whose pruned folders or ablation must be made again."""
    need = {n for n in names if n not in reusable or not (run.run_dir / n / EVAL_FILE).is_file()}
    prune = run.prune
    for p in (prune.dictionaries if prune is not None else []):
        if p in names and not all((run.run_dir / n / EVAL_FILE).is_file() for n in pruned_names(prune, [p])):
            need.add(p)
    ablation = getattr(prune, "ablation", None)
    if ablation is not None:
        group = [ablation.dictionary, *ablation.compare]
        if need & set(group) or not (run.run_dir / "ablation" / ABLATION_JSON).is_file():
            need.update(n for n in group if n in names)
    return [n for n in names if n in need]


def kept_evaluations(run: RunConfig, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: eval.json} of `names` and their pruned folders, as an earlier run wrote them."""
    folders = [*names, *pruned_names(run.prune, names)]
    return {n: io.read_json(run.run_dir / n / EVAL_FILE) for n in folders if (run.run_dir / n / EVAL_FILE).is_file()}
