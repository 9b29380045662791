"""`train.py CONFIG.yaml` as a sequence of steps: load the model and check the config against it,
harvest (or stream) the training activations, train every dictionary in one pass, save each one's
training mean x̄, evaluate on held-out text, prune and ablate, write the summary.

Re-running the same command resumes every step (see resume.py for what is reused), also after
the sweep was edited: dictionaries already trained are reused, the others trained (each resumes
from its own checkpoint when it has one), and only what has no evaluation yet is evaluated. A
dictionary whose loss became NaN/inf is saved with status "diverged" and the others go on; the
last line says how many diverged (`train.py` then exits with status 3). Under torchrun every rank
runs the same steps; rank 0 alone writes the config and the means and evaluates, once every
dictionary is saved; dictionaries saved as feature shards (`distributed.saved_as`) are evaluated by
every rank together, each holding its own features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from eval import report
from eval.kill_frequency import run_training_activations
from eval.outputs import eval_info, write_all
from eval.run import check_prune_config, evaluate_run
from eval.sharded import evaluate_shards
from pipeline.resume import (Saved, check_same_run, completed_run, dictionary_metadata, divergence_summary,
                             diverged_dictionaries, kept_evaluations, pruned_names, same_evaluation,
                             saved_dictionaries, to_evaluate)

from sae import distributed as dist
from sae import sharding
from sae import io
from sae.cache import CacheReader, StreamingSource, harvest
from sae.config import RunConfig, dump_run_config
from sae.dictionaries import DictionaryConfig, SparseDictionary
from sae.errors import ConfigError
from sae.means import MEAN_TOKENS, means_from_cache, means_from_model, read_mean, save_mean
from sae.models import check_hooks, hook_d_in, hook_order, load_model, resolve_device
from sae.text import keep_mask, load_contexts
from sae.trainer import BatchSource, train_dictionaries

DIVERGED_STATUS = 3  # train.py's exit status when dictionaries diverged (and the others finished)


def say(message: str) -> None:
    if dist.is_main():
        print(f"[train.py] {message}", flush=True)


def autocast_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    choice = run.train.autocast
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if choice == "none" else getattr(torch, choice)


@dataclass
class _Loaded:
    """The run's model, checked against the config, and what the later steps need of it."""

    model: Any  # TransformerBridge
    device: torch.device
    d_in: dict[str, int]  # hook -> activation width


def run_experiment(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, Any]:
    """Harvest, train, save, evaluate and prune as `run` says; returns {name: EvalResult or its
    eval.json dict} of the evaluated dictionaries (eval.json as an earlier run wrote it for those
    not evaluated again), or {name: dictionary} when evaluation is disabled. Under torchrun, ranks
    other than 0 return the dictionaries they trained once training is over."""
    started = dist.init_from_env(run.distributed.backend, run.distributed.timeout_minutes)
    try:
        return _run_experiment(run, configs)
    finally:
        if started:
            dist.shutdown()


def _run_experiment(run: RunConfig, configs: list[DictionaryConfig]) -> dict[str, Any]:
    done = completed_run(run, configs)
    if done is not None:
        _print_summary(run)
        _say_diverged(run, configs)
        return done
    check_same_run(run, configs)  # before anything is written
    _check_layout(run, configs, {})
    to_train = _to_train(run, configs, saved_dictionaries(run, configs))
    same_eval = same_evaluation(run)  # (config.yaml is rewritten next)
    if run.eval.enabled:
        check_prune_config(run.prune)
    loaded = _load_model(run, configs)
    # Read now so that too little held-out text fails before the harvest and training, not after.
    evaluates = dist.is_main() or _in_feature_shards(run)
    heldout = _tokens(run, loaded.model, "heldout", run.eval_tokens) if run.eval.enabled and evaluates else None
    _write_config(run)  # once every check has passed: a refused run leaves the folder as it was
    trained = _train(run, to_train, loaded) if to_train else {}
    if _in_feature_shards(run):  # every rank evaluates, each with its own features
        if run.eval.enabled:
            reusable = {c.name for c in configs if c not in to_train} if same_eval else set()
            _evaluate_feature_shards(run, configs, loaded, heldout, reusable)
        _say_diverged(run, configs)
        return trained
    if not dist.is_main():  # rank 0 alone evaluates and prunes
        return trained
    saved = saved_dictionaries(run, configs)  # now with every rank's
    dictionaries = {n: trained[n] if n in trained else s.dictionary for n, s in saved.items()}
    if run.eval.enabled:
        reusable = {c.name for c in configs if c not in to_train} if same_eval else set()
        dictionaries = _evaluate(run, configs, loaded, dictionaries, heldout, reusable)
    _say_diverged(run, configs)
    return dictionaries


def _to_train(run: RunConfig, configs: list[DictionaryConfig], saved: dict[str, Saved]) -> list[DictionaryConfig]:
    """The dictionaries to train: those not saved yet, and those that diverged with other settings.
    One line says what happens to each one an earlier run saved."""
    to_train = [c for c in configs if c.name not in saved or (saved[c.name].diverged and saved[c.name].changed)]
    for name, s in saved.items():
        if s.old_defaults:
            say(f"{name}: trained under earlier defaults ({'; '.join(s.old_defaults)}); reused as trained")
    if not to_train:
        say(f"every dictionary is already trained in {run.run_dir}" + ("; evaluating" if run.eval.enabled else ""))
        return []
    for name, s in saved.items():
        if not s.diverged:
            say(f"{name}: already trained, reused")
        elif s.changed:
            say(f"{name}: trains again: it diverged with other settings ({'; '.join(s.changed)})")
        else:
            say(f"{name}: diverged at step {s.header.metadata['divergence']['step']} in an earlier run: "
                f"skipped (change its settings, e.g. a lower lr, or delete its folder to train it again)")
    return to_train


def _say_diverged(run: RunConfig, configs: list[DictionaryConfig]) -> None:
    """The run's last line when dictionaries diverged (train.py then exits with DIVERGED_STATUS)."""
    diverged = diverged_dictionaries(run, configs)
    if diverged:
        names = ", ".join(f"{name} (step {record['step']})" for name, record in diverged.items())
        say(f"{len(diverged)} of {len(configs)} dictionaries diverged: {names}; each folder holds its last good "
            f"weights with status: diverged, the others finished")


def _print_summary(run: RunConfig) -> None:
    say(f"run {run.run_name} is complete with this config (delete {run.run_dir}/summary.md to "
        f"evaluate again); its summary:")
    if dist.is_main():
        print((run.run_dir / "summary.md").read_text(), flush=True)


def _write_config(run: RunConfig) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        io.write_text(run.run_dir / "config.yaml", dump_run_config(run))


def _load_model(run: RunConfig, configs: list[DictionaryConfig]) -> _Loaded:
    """The model, and every setting that needs it checked before any harvest or training."""
    device = dist.device_for_rank(resolve_device(run.device))
    ranks = f", {dist.world_size()} ranks ({run.distributed.placement})" if dist.is_distributed() else ""
    say(f"run {run.run_name}: {len(configs)} dictionaries on {', '.join(run.hooks)} of {run.model} "
        f"({device}{ranks})")
    model = load_model(run.model, device=device, dtype=run.model_dtype)
    check_hooks(model, run.hooks)
    d_in = {h: hook_d_in(model, h) for h in run.hooks}
    if dist.is_distributed() and run.distributed.placement == "data_parallel":
        dist.check_batch_divisible(run.train.batch_size, "train.batch_size")
    _check_layout(run, configs, d_in)
    for cfg in configs:
        cfg.require_width(d_in[cfg.reads_hook])
    _check_transcoder_order(model, configs)
    return _Loaded(model, device, d_in)


def _check_transcoder_order(model, configs: list[DictionaryConfig]) -> None:
    """A transcoder's input_hook must come before the hook it writes: the evaluator and sae.splice
    replace the output from an input the same forward has already computed."""
    pairs = {(c.input_hook, c.hook_name) for c in configs if c.input_hook is not None and c.input_hook != c.hook_name}
    if not pairs:
        return
    order = hook_order(model, sorted({h for pair in pairs for h in pair}))
    for c in configs:
        if (c.input_hook, c.hook_name) in pairs and order.index(c.input_hook) > order.index(c.hook_name):
            raise ConfigError(f"{c.name}: input_hook {c.input_hook!r} comes after hook_name {c.hook_name!r} in the "
                              f"forward; a transcoder reads an earlier hook than the one it writes")


def _check_layout(run: RunConfig, configs: list[DictionaryConfig], d_in: dict[str, int]) -> None:
    """feature_sharded under torchrun: the feature shards divide the ranks and every d_sae (those
    given as expansion factors once d_in is known), the data groups the batch size."""
    if not dist.is_distributed() or run.distributed.placement != "feature_sharded":
        return
    layout = sharding.layout_for(dist.world_size(), dist.rank(), run.distributed.feature_shards)
    sharding.check_widths(configs, [c.name for c in configs], d_in, layout.feature_shards)
    dist.check_batch_divisible(run.train.batch_size, "train.batch_size", layout.data_groups)


def _tokens(run: RunConfig, model, split: str, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n_tokens (whole contexts) of a split of the run's text [n_ctx, ctx], and their keep mask."""
    tokens = load_contexts(run.data, model.tokenizer, split, n_tokens)
    return tokens, keep_mask(tokens, model.tokenizer, run.data.exclude_tokens)


def _train(run: RunConfig, configs: list[DictionaryConfig], loaded: _Loaded) -> dict[str, SparseDictionary]:
    """Train these dictionaries in one pass over the training activations (one per group resuming
    at the same step); rank 0 then saves each one's x̄. Returns the dictionaries this rank trained."""
    tokens, keep = _tokens(run, loaded.model, "train", run.train_tokens)
    source = _batch_source(run, loaded.model, tokens, keep, _hooks_needed(run, configs, loaded.d_in))
    trained = _train_dictionaries(run, configs, loaded, source)
    if not dist.is_main():
        return trained
    if run.harvest.mode == "stream":
        hook_means = _streamed_means(run, loaded.model, tokens, keep)
    else:
        hook_means = means_from_cache(run.cache_dir, list(run.hooks))
    _save_means(run, configs, hook_means)
    say(f"saved {len(configs)} dictionaries under {run.run_dir}/")
    return trained


def _hooks_needed(run: RunConfig, configs: list[DictionaryConfig], d_in: dict[str, int]) -> list[str]:
    """The hook points this process reads: all of them, except for dictionary_per_rank under
    torchrun, where only those of the dictionaries this rank trains."""
    if not dist.is_distributed() or run.distributed.placement != "dictionary_per_rank":
        return list(run.hooks)
    owners = dist.assign_dictionaries(configs, dist.world_size(), d_in)
    mine = {h for c, owner in zip(configs, owners) if owner == dist.rank() for h in (c.hook_name, c.input_hook)}
    return [h for h in run.hooks if h in mine] or list(run.hooks)


def _batch_source(run: RunConfig, model, tokens: torch.Tensor, keep: torch.Tensor, hooks: list[str]) -> BatchSource:
    """The trainer's batches: from the cache on disk (harvested first, or resumed), or streamed
    straight from the model."""
    if run.harvest.mode == "stream":
        say(f"streaming activations of {int(keep.sum()):,} training tokens straight from the model")
        return StreamingSource(model, tokens, keep, hooks, batch_size=run.train.batch_size,
                               seed=run.seed, contexts_per_chunk=run.harvest.contexts_per_shard,
                               batch_contexts=run.harvest.batch_contexts)
    identity = {"model": run.model, "model_dtype": run.model_dtype, "data": run.data.model_dump(mode="json")}
    say(f"harvesting {int(keep.sum()):,} training tokens into {run.cache_dir}/")
    harvest(model, tokens, keep, run.hooks, run.cache_dir, identity=identity, dtype=run.harvest.dtype,
            contexts_per_shard=run.harvest.contexts_per_shard, batch_contexts=run.harvest.batch_contexts,
            verify=run.harvest.verify, distributed=dist.is_distributed())
    return CacheReader(run.cache_dir, batch_size=run.train.batch_size, seed=run.seed, hooks=hooks)


def _train_dictionaries(run: RunConfig, configs: list[DictionaryConfig], loaded: _Loaded,
                        source: BatchSource) -> dict[str, SparseDictionary]:
    total_tokens = max(int(source.tokens_per_epoch * run.train.epochs), 1)
    return train_dictionaries(
        source, configs, total_tokens=total_tokens, d_in=loaded.d_in, device=loaded.device, out_dir=run.run_dir,
        checkpoint_every_tokens=run.train.checkpoint_every_tokens or max(total_tokens // 10, run.train.batch_size),
        metadata={c.name: dictionary_metadata(run, c) for c in configs},
        wandb={"mode": run.wandb.mode, "project": run.wandb.project, "entity": run.wandb.entity,
               "name": run.run_name},
        autocast_dtype=autocast_dtype(run, loaded.device), log_every=run.train.log_every_steps,
        placement=run.distributed.placement if dist.is_distributed() else None,
        feature_shards=run.distributed.feature_shards if dist.is_distributed() else None,
        saved_as=run.distributed.saved_as, stop_on_divergence=run.train.stop_on_divergence)


def _streamed_means(run: RunConfig, model, tokens: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """hook -> x̄ over the first MEAN_TOKENS of these training tokens, from model forwards."""
    n_ctx = max(1, math.ceil(MEAN_TOKENS / tokens.shape[1]))
    return means_from_model(model, run.hooks, tokens[:n_ctx], keep[:n_ctx], batch_size=run.harvest.batch_contexts)


def _save_means(run: RunConfig, configs: list[DictionaryConfig], hook_means: dict[str, torch.Tensor]) -> None:
    for cfg in configs:
        save_mean(run.run_dir / cfg.name, hook_means[cfg.hook_name])


def _training_means(run: RunConfig, configs: list[DictionaryConfig], model) -> dict[str, torch.Tensor]:
    """Each dictionary's x̄: from its folder, or (when an earlier run did not save it) computed
    from model forwards on training text and saved."""
    means = {c.name: read_mean(run.run_dir / c.name) for c in configs}
    missing = [c for c in configs if means[c.name] is None]
    if missing:
        hook_means = _streamed_means(run, model, *_tokens(run, model, "train", MEAN_TOKENS))
        _save_means(run, missing, hook_means)
        means.update({c.name: hook_means[c.hook_name] for c in missing})
    return means


def _evaluate(run: RunConfig, configs: list[DictionaryConfig], loaded: _Loaded,
              dictionaries: dict[str, SparseDictionary], heldout: tuple[torch.Tensor, torch.Tensor],
              reusable: set[str]) -> dict[str, Any]:
    """Evaluate, prune and ablate on the held-out tokens what has no evaluation yet (`reusable`: the
    dictionaries whose earlier evaluation holds, if they have one); write the summary of all, with
    a row for each diverged dictionary."""
    diverged = {n: divergence_summary(d) for n, d in dictionaries.items() if d.metadata.get("status") == "diverged"}
    names = [c.name for c in configs if c.name in dictionaries and c.name not in diverged]
    now = to_evaluate(run, names, reusable)
    results: dict[str, Any] = {}
    if now:
        prune = _prune_for(run.prune, now, diverged)
        means = _training_means(run, [c for c in configs if c.name in now], loaded.model)
        tokens, keep = heldout
        say(f"evaluating {len(now)} dictionaries on {int(keep.sum()):,} held-out tokens")
        results = evaluate_run(loaded.model, {n: dictionaries[n].to(loaded.device) for n in now},
                               {n: run.run_dir / n for n in now}, run.run_dir, tokens, keep, means,
                               batch_size=run.eval.batch_contexts, prune=prune,
                               training_activations=_kill_tokens(run, prune, loaded.model), info=eval_info(run.data))
    return _summarise(run, names, now, results, diverged)


def _summarise(run: RunConfig, names: list[str], now: list[str], results: dict[str, Any],
               diverged: dict[str, Any]) -> dict[str, Any]:
    """The run's summary (rank 0 writes it): this run's evaluations, the kept ones, the diverged."""
    kept = [n for n in names if n not in now]
    if kept:
        say(f"kept the evaluations of {', '.join(kept)} (made with these settings on the same weights)")
    everything = {**kept_evaluations(run, kept), **results}
    everything = {n: everything[n] for n in [*names, *pruned_names(run.prune, names)] if n in everything}
    if dist.is_main():
        report.write_summary(run.run_dir, everything, diverged=diverged)
    return everything


def _in_feature_shards(run: RunConfig) -> bool:
    """Whether this run's dictionaries are saved as feature shards and so evaluated by every rank."""
    return (dist.is_distributed() and run.distributed.placement == "feature_sharded"
            and run.distributed.saved_as == "feature_shards")


def _evaluate_feature_shards(run: RunConfig, configs: list[DictionaryConfig], loaded: _Loaded,
                             heldout: tuple[torch.Tensor, torch.Tensor], reusable: set[str]) -> dict[str, Any]:
    """Every rank loads its features of each dictionary to evaluate (`sharding.load_shard_of`) and
    they evaluate together (eval.sharded, the same numbers as one process); rank 0 writes."""
    saved = saved_dictionaries(run, configs)  # their cfg.json only
    diverged = {n: divergence_summary(s.header) for n, s in saved.items() if s.diverged}
    names = [c.name for c in configs if c.name in saved and c.name not in diverged]
    now = to_evaluate(run, names, reusable)
    results: dict[str, Any] = {}
    if now:
        with dist.failing_together("computing the training means"):
            if dist.is_main():
                _training_means(run, [c for c in configs if c.name in now], loaded.model)  # saved for every rank
        means = {n: read_mean(run.run_dir / n) for n in now}
        shards = sharding.make_mesh(sharding.layout_for(dist.world_size(), dist.rank(), run.distributed.feature_shards),
                                    loaded.device)
        tokens, keep = heldout
        say(f"evaluating {len(now)} dictionaries on {int(keep.sum()):,} held-out tokens, {dist.world_size()} ranks "
            f"each holding a shard of their features")
        results = evaluate_shards(loaded.model, {n: sharding.load_shard_of(run.run_dir / n, shards, loaded.device)
                                                 for n in now}, shards, tokens, keep, means,
                                  batch_size=run.eval.batch_contexts, info=eval_info(run.data))
        if dist.is_main():
            write_all(results, {n: run.run_dir / n for n in now})
            report.print_results(results)
    return _summarise(run, names, now, results, diverged)


def _prune_for(prune: Any, names: list[str], diverged: dict[str, Any]) -> Any:
    """The `prune:` block restricted to the dictionaries evaluated now (its ablation only when all
    of its dictionaries are)."""
    if prune is None:
        return None
    ablation = prune.ablation
    group = [ablation.dictionary, *ablation.compare] if ablation is not None else []
    if any(n in diverged for n in group):
        say(f"prune.ablation skipped: {', '.join(n for n in group if n in diverged)} diverged")
    keep_ablation = ablation is not None and all(n in names for n in group)
    if not keep_ablation and not any(p in names for p in prune.dictionaries):
        return None
    return prune.model_copy(update={"dictionaries": [p for p in prune.dictionaries if p in names],
                                    "ablation": ablation if keep_ablation else None})


def _kill_tokens(run: RunConfig, prune: Any, model) -> Any:
    """Where the prune block's kill decisions are measured: the first prune.frequency_tokens of the
    training tokens (from the cache when there is one), never the held-out ones."""
    if prune is None:
        return None
    cache = run.cache_dir if run.harvest.mode == "disk" else None
    return run_training_activations(cache, model, run.data, min(prune.frequency_tokens, run.train_tokens),
                                    run.eval.batch_contexts)
