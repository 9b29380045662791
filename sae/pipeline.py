"""What `train.py CONFIG.yaml` does, start to finish.

    config.yaml -> model -> text -> activations (cache on disk, or streamed) -> train every
    dictionary in one pass -> save -> activation means -> evaluate on held-out text -> prune,
    ablate -> summary table

Every step can be interrupted and re-run with the same command: the cache resumes from its last
complete shard, training from its last checkpoint, and dictionaries already saved by an earlier
run of the same config are loaded instead of retrained.

Under torchrun (`torchrun --nproc-per-node N train.py CONFIG.yaml`) the same steps run on every
rank: the harvest splits the shards between the ranks, training follows `distributed.placement`
(see sae.distributed), and rank 0 alone writes the config, the means, and evaluates and prunes
once every dictionary is saved.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sae import distributed as dist
from sae import io
from sae.config import RunConfig, dump_run_config
from sae.dictionaries import DictionaryConfig, SparseDictionary
from sae.errors import ConfigError
from sae.loading import load_dictionary
from sae.models import check_hooks, hook_d_in, hook_layer, load_model, resolve_device
from sae.text import keep_mask, load_contexts

MEAN_FILE = "activation_mean.safetensors"  # x̄ over training tokens, for the mean-ablation baseline
MEAN_TOKENS_STREAMED = 32_768  # training tokens for x̄ when there is no cache to read it from


def say(message: str) -> None:
    if dist.is_main():
        print(f"[train.py] {message}", flush=True)


def autocast_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    choice = run.train.autocast
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if choice == "none" else getattr(torch, choice)


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


def cache_means(cache_dir: Path, hooks: list[str]) -> dict[str, torch.Tensor]:
    """hook -> mean activation [d_in] over every cached (training) token, accumulated in float64."""
    from sae.cache import Manifest, load_shard

    manifest = Manifest.load(cache_dir)
    totals = {h: torch.zeros(manifest.d_in[h], dtype=torch.float64) for h in hooks}
    count = 0
    for shard in manifest.shards:
        tensors = load_shard(manifest, shard.index, hooks)
        for h in hooks:
            totals[h] += tensors[h].to(torch.float64).sum(dim=0)
        count += tensors[hooks[0]].shape[0]
    return {h: (totals[h] / max(count, 1)).float() for h in hooks}


def run_experiment(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, Any]:
    """Harvest, train, save, evaluate and prune as `run` says; returns {name: EvalResult} (or
    {name: dictionary} when evaluation is disabled, or {name: eval.json dict} when the same config
    already ran to the end and nothing is redone). Under torchrun, ranks other than 0 return
    the dictionaries they trained once training is over."""
    started = dist.init_from_env(run.distributed.backend, run.distributed.timeout_minutes)
    try:
        return _run_experiment(run, configs)
    finally:
        if started:
            dist.shutdown()


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


def _run_experiment(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, Any]:
    run_dir = run.run_dir
    done = completed_run(run, configs)
    if done is not None:
        say(f"run {run.run_name} is complete with this config (delete {run_dir}/summary.md to "
            f"evaluate again); its summary:")
        if dist.is_main():
            print((run_dir / "summary.md").read_text(), flush=True)
        return done
    if run.eval.enabled:
        from eval.run import check_prune_config

        check_prune_config(run.prune)  # thresholds that would share a folder: refused before any work
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        io.write_text(run_dir / "config.yaml", dump_run_config(run))
    device = dist.device_for_rank(resolve_device(run.device))
    ranks = f", {dist.world_size()} ranks ({run.distributed.placement})" if dist.is_distributed() else ""
    say(f"run {run.run_name}: {len(configs)} dictionaries on {', '.join(run.hooks)} of {run.model} "
        f"({device}{ranks})")

    model = load_model(run.model, device=device, dtype=run.model_dtype)
    check_hooks(model, run.hooks)
    d_in = {h: hook_d_in(model, h) for h in run.hooks}
    if dist.is_distributed() and run.distributed.placement == "data_parallel":
        dist.check_batch_divisible(run.train.batch_size, "train.batch_size")
    for cfg in configs:  # before any harvest or training: settings that need the width
        cfg.require_width(d_in[cfg.hook_name])
    tokenizer = model.tokenizer
    # Read now so that too little held-out text fails before the harvest and training, not after.
    heldout = (load_contexts(run.data, tokenizer, "heldout", run.eval_tokens)
               if run.eval.enabled and dist.is_main() else None)

    trained = finished_dictionaries(run, configs)
    if trained is not None and not dist.is_main():
        return trained
    if trained is not None:
        say(f"every dictionary is already trained in {run_dir}; evaluating")
        means = {name: io.load_tensors(run_dir / name / MEAN_FILE)["mean"] for name in trained
                 if (run_dir / name / MEAN_FILE).is_file()}
    else:
        tokens = load_contexts(run.data, tokenizer, "train", run.train_tokens)
        keep = keep_mask(tokens, tokenizer, run.data.exclude_tokens)
        source, hook_means = _batch_source(run, model, tokens, keep, _hooks_needed(run, configs, d_in))
        total_tokens = max(int(source.tokens_per_epoch * run.train.epochs), 1)
        every = run.train.checkpoint_every_tokens or max(total_tokens // 10, run.train.batch_size)
        from sae.trainer import train_dictionaries

        trained = train_dictionaries(
            source, configs, total_tokens=total_tokens, d_in=d_in, device=device, out_dir=run_dir,
            checkpoint_every_tokens=every,
            metadata={c.name: dictionary_metadata(run, c) for c in configs},
            wandb={"mode": run.wandb.mode, "project": run.wandb.project, "entity": run.wandb.entity,
                   "name": run.run_name},
            autocast_dtype=autocast_dtype(run, device), log_every=run.train.log_every_steps,
            placement=run.distributed.placement if dist.is_distributed() else None)
        if not dist.is_main():  # rank 0 alone writes the means, evaluates and prunes
            return trained
        if len(trained) < len(configs):  # dictionary_per_rank: the others' are on disk by now
            trained = finished_dictionaries(run, configs)
            if trained is None:
                raise ConfigError(f"some dictionaries of {run_dir} were not saved by their ranks")
        if hook_means is None:
            hook_means = _streamed_means(model, run, tokens, keep)
        means = {}
        for cfg in configs:
            means[cfg.name] = hook_means[cfg.hook_name]
            io.save_tensors(run_dir / cfg.name / MEAN_FILE, {"mean": means[cfg.name].contiguous()})
        say(f"saved {len(trained)} dictionaries under {run_dir}/")

    if not run.eval.enabled:
        return trained
    missing = [c for c in configs if c.name not in means]
    if missing:
        train_tokens = load_contexts(run.data, tokenizer, "train", MEAN_TOKENS_STREAMED)
        hook_means = _streamed_means(model, run, train_tokens, keep_mask(train_tokens, tokenizer,
                                                                          run.data.exclude_tokens))
        for cfg in missing:
            means[cfg.name] = hook_means[cfg.hook_name]
            io.save_tensors(run_dir / cfg.name / MEAN_FILE, {"mean": means[cfg.name].contiguous()})

    from eval.run import evaluate_run

    heldout_keep = keep_mask(heldout, tokenizer, run.data.exclude_tokens)
    say(f"evaluating on {int(heldout_keep.sum()):,} held-out tokens")
    dictionaries = {name: d.to(device) for name, d in trained.items()}
    return evaluate_run(model, dictionaries, {name: run_dir / name for name in dictionaries}, run_dir,
                        heldout, heldout_keep, means, batch_size=run.eval.batch_contexts, prune=run.prune,
                        info={"dataset": run.data.model_dump(mode="json"), "evaluated_split": "heldout"})


def _hooks_needed(run: RunConfig, configs: list[DictionaryConfig], d_in: dict[str, int]) -> list[str]:
    """The hook points this process reads: all of them, except for dictionary_per_rank under
    torchrun, where only those of the dictionaries this rank trains."""
    if not dist.is_distributed() or run.distributed.placement != "dictionary_per_rank":
        return list(run.hooks)
    owners = dist.assign_dictionaries(configs, dist.world_size(), d_in)
    mine = {c.hook_name for c, owner in zip(configs, owners) if owner == dist.rank()}
    return [h for h in run.hooks if h in mine] or list(run.hooks)


def _batch_source(run: RunConfig, model, tokens: torch.Tensor, keep: torch.Tensor, hooks: list[str]):
    """The trainer's batch source and, when it is cheap (a cache on disk), the training means
    (rank 0 only under torchrun)."""
    from sae.cache import CacheReader, StreamingSource

    if run.harvest.mode == "stream":
        say(f"streaming activations of {int(keep.sum()):,} training tokens straight from the model")
        source = StreamingSource(model, tokens, keep, hooks, batch_size=run.train.batch_size,
                                 seed=run.seed, contexts_per_chunk=run.harvest.contexts_per_shard,
                                 batch_contexts=run.harvest.batch_contexts)
        return source, None
    from sae.cache import harvest

    identity = {"model": run.model, "model_dtype": run.model_dtype, "data": run.data.model_dump(mode="json")}
    say(f"harvesting {int(keep.sum()):,} training tokens into {run.cache_dir}/")
    harvest(model, tokens, keep, run.hooks, run.cache_dir, identity=identity, dtype=run.harvest.dtype,
            contexts_per_shard=run.harvest.contexts_per_shard, batch_contexts=run.harvest.batch_contexts,
            verify=run.harvest.verify, distributed=dist.is_distributed())
    source = CacheReader(run.cache_dir, batch_size=run.train.batch_size, seed=run.seed, hooks=hooks)
    return source, cache_means(run.cache_dir, list(run.hooks)) if dist.is_main() else None


def _streamed_means(model, run: RunConfig, tokens: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    from eval.evaluate import compute_activation_means

    n_ctx = max(1, math.ceil(MEAN_TOKENS_STREAMED / tokens.shape[1]))
    return compute_activation_means(model, run.hooks, tokens[:n_ctx], keep[:n_ctx],
                                    batch_size=run.harvest.batch_contexts)
