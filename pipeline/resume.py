"""What a run reuses from an earlier run of the same config: dictionaries already saved (loaded
instead of retrained; refused when trained with other settings) and a run that already finished
(its summary is printed, nothing is redone)."""

from __future__ import annotations

from typing import Any

from sae import io
from sae.config import RunConfig, dump_run_config
from sae.dictionaries import DictionaryConfig, SparseDictionary
from sae.loading import load_dictionary
from sae.errors import ConfigError
from sae.models import hook_layer


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


def _trained_with(hyperparameters: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """Everything that shapes a trained dictionary: its own hyperparameters and the run's settings."""
    return {**hyperparameters, **(metadata.get("training") or {}),
            **{k: metadata.get(k) for k in ("model_name", "model_dtype", "dataset")}}


def finished_dictionaries(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, SparseDictionary] | None:
    """The run's dictionaries when an earlier run of this config saved all of them, else None.

    A saved dictionary trained with other settings is an error, not silently reused."""
    found: dict[str, SparseDictionary] = {}
    for cfg in configs:
        folder = run.run_dir / cfg.name
        if not (folder / "sae.safetensors").is_file() or not (folder / "cfg.json").is_file():
            return None
        d = load_dictionary(folder)
        saved = _trained_with(d.cfg.hyperparameters.model_dump(mode="json"), d.metadata)
        # a loaded dictionary states its width as d_sae: compare widths, not how they were asked for
        as_width = cfg.model_copy(update={"d_sae": cfg.resolve_d_sae(d.d_in), "expansion_factor": None})
        wanted = _trained_with(as_width.model_dump(mode="json"), dictionary_metadata(run, cfg))
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if changed:
            what = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
            raise ConfigError(f"{folder} was trained with other settings ({what}); pick another run_name "
                              f"or delete that folder to retrain")
        found[cfg.name] = d
    return found


def completed_run(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, Any] | None:
    """{name: eval.json} when this exact config already ran to the end (same config.yaml, every
    dictionary saved and evaluated, summary written), else None."""
    run_dir = run.run_dir
    config_file, summary = run_dir / "config.yaml", run_dir / "summary.md"
    # (under torchrun every rank reads the same files and so returns alike, with no collective)
    if not run.eval.enabled or not (config_file.is_file() and summary.is_file()):
        return None
    if config_file.read_text() != dump_run_config(run):
        return None
    folders = [run_dir / c.name for c in configs]
    if not all((f / "eval.json").is_file() and (f / "sae.safetensors").is_file() for f in folders):
        return None
    finished_dictionaries(run, configs)  # refuses dictionaries trained with other settings
    return {f.name: io.read_json(f / "eval.json") for f in folders}
