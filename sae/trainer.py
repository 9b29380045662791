"""Train many sparse dictionaries from one stream of activation batches: `train_dictionaries`.

`source` is a batch source (`batches(start_step) -> Iterator[dict[hook_name, Tensor[batch, d_in]]]`,
deterministic given its own seed, like the activation-cache reader) or a re-iterable collection of
`[batch, d_in]` tensors. Every step draws ONE batch and every dictionary takes one optimiser step on
it (its hook's tensor): a sweep costs one pass over the data. A step (`_Slot.step`):

    lr = base_lr · warm-up · decay-to-0           (from the step alone: nothing to save)
    out = dictionary.training_loss(x, progress, dead_mask, shards)   (bf16 autocast if asked)
    out.loss.backward(); dictionary.before_optimizer_step()   (e.g. unit-norm projection)
    clip_grad_norm_; adam.step(); dictionary.after_optimizer_step()
    tracker.update(features fired)

Nothing in a step reads a value back to the host: statistics stay on the device until they are
logged (`log_every` steps) or a checkpoint is due, which is also when a non-finite loss (or
weight) is noticed. A dictionary found so leaves the run: its weights of the last check that found
them finite are saved with status "diverged", and the others train on (`stop_on_divergence`
stops everything instead).

Each dictionary checkpoints on its own (`out_dir/checkpoints/<name>/`, see sae.checkpoint), with
everything its next step depends on and the settings it was trained with, so resuming is
bit-identical on CPU and a sweep whose entries changed resumes the unchanged dictionaries and
restarts the others. Dictionaries that resume at different steps (or start at 0) train in separate
passes over the batches, each from its own step: every dictionary sees exactly the batches an
uninterrupted run of it would have seen.

Under torchrun, `placement` "data_parallel" gives each rank its shard of every batch (gradients
averaged; the losses get `sae.distributed.RankShards` for whole-batch statistics; rank 0 writes),
and "dictionary_per_rank" gives each rank its share of the dictionaries (it trains, checkpoints
and saves them itself; a dictionary's checkpoint resumes on whichever rank owns it next).
"feature_sharded" gives each rank a shard of every dictionary's features (`sae.sharding`: the
losses get its `MeshShards`, each rank checkpoints its shard, rank 0 saves the gathered whole).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

import sae
from sae import checkpoint as ckpt
from sae import distributed as dist
from sae import sharding
from sae.cache.device_feed import to_device
from sae.dictionaries.base import (WHOLE_BATCH, BatchShards, DictionaryConfig, SparseDictionary, TrainStep,
                                   geometric_median, unit_norm_scale)
from sae.dictionaries.naming import dictionary_names
from sae.dictionaries.registry import get_architecture
from sae.errors import ConfigError, TrainingDiverged, UserError
from sae.progress import token_bar
from sae.training_history import TrainingHistory

DEFAULT_HOOK = "activations"  # the hook key of batches given as plain tensors
CHECKPOINT_FORMAT = 2  # 1: one file for every dictionary (refused)
_BDEC_INIT_ROWS = 16384  # rows of the first batch used to initialise b_dec and the input scale


# ---- batch sources ------------------------------------------------------------------------------
class BatchSource(Protocol):
    def batches(self, start_step: int = 0) -> Iterator[Mapping[str, Tensor]]:
        """Batches from step `start_step` on, exactly as an uninterrupted iteration yields them."""


class IterableSource:
    """Adapts a re-iterable collection of `[batch, d_in]` tensors (or of {hook: tensor} dicts) to the
    batch-source protocol. Resuming re-iterates it and skips the batches already trained on, so it
    must yield the same batches each time it is iterated (a list, a Dataset, a generator
    *function* wrapped as an iterable class, ...). A one-shot iterator can train but not resume.
    """

    def __init__(self, data: Iterable[Tensor] | Iterable[Mapping[str, Tensor]]):
        self.data = data
        self.iterations = 0  # how many passes were started (tests count them)

    def batches(self, start_step: int = 0) -> Iterator[Mapping[str, Tensor]]:
        it = iter(self.data)
        if (start_step > 0 or self.iterations) and it is self.data:
            raise UserError("cannot resume from a one-shot iterator: pass a re-iterable collection "
                            "(a list, or an object whose __iter__ restarts), or a batch source "
                            "with batches(start_step), or delete the checkpoint to start over")
        self.iterations += 1
        for item in itertools.islice(it, start_step, None):
            yield item if isinstance(item, Mapping) else {DEFAULT_HOOK: item}


def as_batch_source(source: Any) -> BatchSource:
    if hasattr(source, "batches") and callable(source.batches):
        return source
    if isinstance(source, Tensor):
        raise UserError("pass an iterable of [batch, d_in] tensors (e.g. tensor.split(4096)), not one tensor")
    if isinstance(source, Iterable):
        return IterableSource(source)
    raise UserError(f"cannot train from a {type(source).__name__}: give a batch source with "
                    "batches(start_step) or an iterable of [batch, d_in] tensors")


def _centre(x: Tensor, how: str) -> Tensor:
    """[d] the centre of x [n, d] that b_dec (and a transcoder's b_in) start at (`b_dec_init`)."""
    if how == "geometric_median":
        return geometric_median(x)
    return x.mean(dim=0) if how == "mean" else torch.zeros_like(x[0])


# ---- schedules ---------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up over the first `warmup_fraction` of the steps, linear decay to 0 over the last
    `decay_fraction` (reaching 1/decay_steps on the last step)."""
    factor = 1.0
    warm = math.ceil(warmup_fraction * total_steps)
    if warm > 0 and step < warm:
        factor = (step + 1) / warm
    decay = math.ceil(decay_fraction * total_steps)
    if decay > 0 and step >= total_steps - decay:
        factor = min(factor, (total_steps - step) / decay)
    return factor


# ---- dead / dense feature tracking ---------------------------------------------------------------
class FiringCounts:
    """How many tokens each feature fired on over a stretch of training, and the stretch's length."""

    def __init__(self, d_sae: int, device: torch.device):
        self.counts = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.tokens = 0

    def add(self, counts: Tensor, n_tokens: int) -> None:
        self.counts += counts
        self.tokens += n_tokens

    def frequencies(self) -> Tensor:
        return self.counts.double() / max(self.tokens, 1)

    def restart(self) -> None:
        self.counts.zero_()
        self.tokens = 0


class FeatureTracker:
    """Per feature: tokens since it last fired, and how often it fired over the current logging
    window and since the last resampling (two independent stretches).

    All on the device; nothing is read back until a frequency or the dead mask is asked for."""

    def __init__(self, d_sae: int, device: torch.device):
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.window = FiringCounts(d_sae, device)
        self.period = FiringCounts(d_sae, device)
        self.resampled = 0  # features re-initialised so far (all resamplings together)

    def update(self, counts: Tensor, n_tokens: int) -> None:
        fired = counts > 0
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + n_tokens)
        counts = counts.to(torch.long)
        self.window.add(counts, n_tokens)
        self.period.add(counts, n_tokens)

    def dead_mask(self, after_tokens: int) -> Tensor:
        return self.tokens_since_fired >= after_tokens

    def reset(self, ids: Tensor) -> None:
        self.tokens_since_fired[ids] = 0
        self.window.counts[ids] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_since_fired": self.tokens_since_fired,
                "window_counts": self.window.counts, "window_tokens": self.window.tokens,
                "period_counts": self.period.counts, "period_tokens": self.period.tokens,
                "resampled": self.resampled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tokens_since_fired = state["tokens_since_fired"].to(self.tokens_since_fired.device)
        self.window.counts = state["window_counts"].to(self.window.counts.device)
        self.window.tokens = int(state["window_tokens"])
        self.period.counts = state["period_counts"].to(self.period.counts.device)
        self.period.tokens = int(state["period_tokens"])
        self.resampled = int(state["resampled"])


def make_optimizer(dictionary: SparseDictionary, cfg: DictionaryConfig) -> torch.optim.Adam:
    """Adam over the dictionary's parameters with `cfg.adam_betas`; a skip connection's W_skip, a
    dense linear map with a gradient from every token, takes `cfg.skip_adam_betas` (momentum: at
    TopK's β1 0.5 it missed the linear map of tests/test_transcoders.py, error 0.144)."""
    skip = dictionary.W_skip
    b_enc_scale = dictionary.b_enc_lr_scale
    b_enc = dictionary.b_enc if b_enc_scale != 1 else None
    groups = [{"params": [p for p in dictionary.parameters() if p is not skip and p is not b_enc],
               "betas": tuple(cfg.adam_betas)}]
    if skip is not None:
        groups.append({"params": [skip], "betas": tuple(cfg.skip_adam_betas)})
    if b_enc is not None:  # its lr is the weights' times lr_scale (_Slot._set_lr)
        groups.append({"params": [b_enc], "betas": tuple(cfg.adam_betas), "lr_scale": b_enc_scale})
    return torch.optim.Adam(groups, lr=dictionary.lr)


def adam_group_count(cfg: DictionaryConfig, d_in: int) -> int:
    """How many Adam groups `make_optimizer` makes for cfg (the weights, W_skip, a scaled b_enc)."""
    scaled_b_enc = get_architecture(cfg.architecture).b_enc_lr_scale_for(cfg, d_in) != 1
    return 1 + cfg.skip_connection + scaled_b_enc


def reset_optimizer_rows(optimizer: torch.optim.Optimizer, dictionary: SparseDictionary, ids: Tensor) -> None:
    """Zero the Adam moments of features `ids` in every feature-indexed parameter (resampling)."""
    params = {id(p): name for name, p in dictionary.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = params.get(id(p))
            dim = dictionary.feature_dims.get(name) if name else None
            state = optimizer.state.get(p)
            if dim is None or not state:
                continue
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key].index_fill_(dim, ids.to(state[key].device), 0.0)


# ---- one dictionary being trained -----------------------------------------------------------------
_STAT_KEYS = ("loss", "sse", "var", "l0")
LOSS_TAIL = 8  # window-average losses a divergence record keeps
_NO_BAD_STEP = 2 ** 62  # bad_step while every loss was finite (ranks agree on the earliest by a min)


@dataclass
class _Slot:
    name: str
    cfg: DictionaryConfig
    hook: str  # the hook it reconstructs (a transcoder: the hook it predicts)
    input_hook: str  # the hook it reads (hook, except for a transcoder)
    dictionary: SparseDictionary
    optimizer: torch.optim.Optimizer
    tracker: FeatureTracker
    generator: torch.Generator
    fingerprint: dict[str, Any]  # what its result depends on besides the batches (Trainer.fingerprint)
    shards: BatchShards = WHOLE_BATCH  # how its batches (and features) are split over the ranks
    stats: dict[str, Tensor] = field(default_factory=dict)
    stat_steps: int = 0
    bad_step: Tensor | None = None  # first step with a non-finite loss (_NO_BAD_STEP: none), on device
    loss_tail: list[tuple[int, float]] = field(default_factory=list)  # (step, window-average loss)
    good: dict[str, Tensor] = field(default_factory=dict)  # its weights when last found finite
    good_at: tuple[int, int] = (0, 0)  # (step, tokens trained) of `good`
    divergence: dict[str, Any] | None = None  # set when it diverged: it trains no more
    finished: SparseDictionary | None = None  # what _finished_dictionary made of it (sharded: the whole)
    last_checkpoint: Path | None = None

    def zero_stats(self, device: torch.device) -> None:
        self.stats = {k: torch.zeros((), dtype=torch.float64, device=device) for k in _STAT_KEYS}
        self.stat_steps = 0

    def remember_good(self, step: int, tokens: int) -> None:
        """Keep a copy of the weights (checked finite) to fall back on should it diverge later."""
        for k, v in self.dictionary.state_dict().items():
            kept = self.good.get(k)
            if kept is not None and kept.shape == v.shape and kept.dtype == v.dtype:
                kept.copy_(v)
            else:
                self.good[k] = v.detach().clone()
        self.good_at = (step, tokens)

    def nonfinite_weights(self) -> Tensor:
        """1 (on the device, no host sync) when any weight or buffer is NaN or inf, else 0."""
        floats = [t for t in self.dictionary.state_dict().values() if t.is_floating_point()]
        return torch.stack([~torch.isfinite(t).all() for t in floats]).any().long()

    def inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(x, target) of this dictionary from a batch {hook: rows}: target None for an autoencoder."""
        return batch[self.input_hook], batch[self.hook] if self.cfg.is_transcoder else None

    def step(self, x: Tensor, step: int, total_steps: int, autocast_dtype: torch.dtype | None,
             shards: BatchShards, target: Tensor | None = None) -> None:
        """One optimiser step on x (and a transcoder's target: the same tokens' output hook), one of
        `shards` of the batch (gradients and feature counts are reduced over all of them)."""
        self._set_lr(step, total_steps)
        out = self._loss(x, target, step / total_steps, autocast_dtype, shards)
        self._optimizer_step(out.loss, shards)
        counts, n_rows = shards.sum(out.counts()), x.shape[0] * shards.count
        self.tracker.update(counts, n_rows)
        self._accumulate_stats(x if target is None else target, out, counts, n_rows, step)

    def _set_lr(self, step: int, total_steps: int) -> None:
        cfg = self.cfg
        lr = self.dictionary.lr * lr_factor(step, total_steps, cfg.lr_warmup_fraction, cfg.lr_decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _loss(self, x: Tensor, target: Tensor | None, progress: float, autocast_dtype: torch.dtype | None,
              shards: BatchShards) -> TrainStep:
        dead = self.tracker.dead_mask(self.cfg.dead_after_tokens)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            if target is None:  # an autoencoder's call, as before
                return self.dictionary.training_loss(x, progress, dead, shards)
            return self.dictionary.training_loss(x, progress, dead, shards, target=target)

    def _optimizer_step(self, loss: Tensor, shards: BatchShards) -> None:
        d = self.dictionary
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        shards.reduce_gradients(d)
        d.before_optimizer_step()
        if self.cfg.grad_clip is not None:
            shards.clip_gradients(d, self.cfg.grad_clip)
        self.optimizer.step()
        d.after_optimizer_step()

    @torch.no_grad()
    def _accumulate_stats(self, y: Tensor, out: TrainStep, counts: Tensor, n_rows: int, step: int) -> None:
        """Window sums for logging, and the first step whose loss was not finite (on the device);
        y: what x̂ is compared with (the input of an autoencoder, a transcoder's target)."""
        loss = out.loss.detach().double()
        self.bad_step = torch.where(torch.isfinite(loss), self.bad_step, self.bad_step.clamp(max=step))
        xs = self.dictionary.scale_target(y).double()
        self.stats["loss"] += loss
        self.stats["sse"] += (out.x_hat.detach().double() - xs).pow(2).sum()
        self.stats["var"] += (xs - xs.mean(dim=0)).pow(2).sum()
        self.stats["l0"] += counts.double().sum() / n_rows
        self.stat_steps += 1


def _loss_value(loss: float) -> float | str:
    """A loss as JSON can hold it: 'nan' and 'inf' as strings."""
    return loss if math.isfinite(loss) else str(loss)


Found = tuple[Path, dict[str, Any]]  # a checkpoint to resume from: (path, state)


# ---- the trainer ------------------------------------------------------------------------------------
class Trainer:
    """Trains `configs` on one batch stream; see `train_dictionaries` for the arguments."""

    def __init__(self, configs: Sequence[DictionaryConfig], *, total_tokens: int,
                 d_in: int | Mapping[str, int] | None = None, device: str | torch.device = "cpu",
                 out_dir: str | Path | None = None, checkpoint_every_tokens: int | None = None,
                 metadata: Mapping[str, Mapping[str, Any]] | None = None,
                 wandb: Mapping[str, Any] | None = None, autocast_dtype: torch.dtype | None = None,
                 progress: bool = True, log_every: int | None = None,
                 histogram_every_tokens: int | None = None, keep_checkpoint: bool = False,
                 placement: str | None = None, feature_shards: int | None = None,
                 saved_as: str = "one_file", stop_on_divergence: bool = False):
        _check_arguments(configs, total_tokens, out_dir, checkpoint_every_tokens)
        self.configs = list(configs)
        self.names = dictionary_names(self.configs)
        self.all_names = list(self.names)  # every rank's (dictionary_per_rank keeps its own in names)
        self.device = torch.device(device)
        self._place(placement, d_in, feature_shards)
        self.saved_as = saved_as if self.sharded else "one_file"
        self.total_tokens = int(total_tokens)
        self.d_in = d_in
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every_tokens = checkpoint_every_tokens
        self.metadata = {k: dict(v) for k, v in (metadata or {}).items()}
        unknown = set(self.metadata) - set(self.all_names)
        if unknown:
            raise ConfigError(f"metadata given for unknown dictionaries {sorted(unknown)}; names are {self.names}")
        self.wandb_cfg = dict(wandb or {})
        self.log_every = int(log_every or self.wandb_cfg.get("log_every", 20))
        self.histogram_every_tokens = histogram_every_tokens or self.wandb_cfg.get("histogram_every_tokens")
        self.autocast_dtype = autocast_dtype
        self.progress = progress and dist.is_main()
        self.keep_checkpoint = keep_checkpoint
        self.stop_on_divergence = stop_on_divergence
        self.diverged: dict[str, dict[str, Any]] = {}  # name -> its divergence record
        self.slots: list[_Slot] = []  # the dictionaries of the pass over the batches under way
        self.step = 0  # of that pass: the position of its dictionaries in the batch stream
        self.tokens_seen = 0
        self.total_steps: int | None = None
        self.batch_size: int | None = None
        self._fitted = False
        self._wandb_run = None
        self._wandb_id: str | None = None
        self._histogram_tokens = 0  # tokens_seen when the frequency histograms were last logged
        self.histories: dict[str, TrainingHistory] = {}  # name -> curves over training (saved beside it)

    def _place(self, placement: str | None, d_in: int | Mapping[str, int] | None,
               feature_shards: int | None) -> None:
        """Several processes (torchrun; see sae.distributed): how they share the work. None on one."""
        if placement is not None and placement not in dist.PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(dist.PLACEMENTS)}, not {placement!r}")
        if feature_shards is not None and placement != "feature_sharded":
            raise ConfigError(f"feature_shards {feature_shards} needs placement feature_sharded, not {placement!r}")
        self.world, self.rank = dist.world_size(), dist.rank()
        self.placement = (placement or "data_parallel") if self.world > 1 else None
        # what the losses reduce whole-batch statistics over: this rank's shard and the others'
        self.shards = dist.RankShards() if self.data_parallel else WHOLE_BATCH
        self.data_index, self.data_count = (self.rank, self.world) if self.data_parallel else (0, 1)
        if self.placement == "feature_sharded":
            layout = sharding.layout_for(self.world, self.rank, feature_shards)
            sharding.check_widths(self.configs, self.names, d_in, layout.feature_shards)
            self.shards = sharding.make_mesh(layout, self.device)
            self.data_index, self.data_count = layout.data_index, layout.data_groups
        if self.placement == "dictionary_per_rank":
            owners = dist.assign_dictionaries(self.configs, self.world, d_in)
            mine = [i for i, owner in enumerate(owners) if owner == self.rank]
            self.configs = [self.configs[i] for i in mine]
            self.names = [self.names[i] for i in mine]

    # -- what a dictionary's result depends on -------------------------------------------------------
    def fingerprint(self, cfg: DictionaryConfig, name: str) -> dict[str, Any]:
        """Everything but the batches that shapes dictionary `name`: its checkpoint is resumed only
        under the same fingerprint (and the same batch size, checked against the first batch)."""
        record = {"dictionary": cfg.as_written().model_dump(mode="json"), "total_tokens": self.total_tokens,
                  "metadata": self.metadata.get(name, {})}
        return json.loads(json.dumps(record, sort_keys=True, default=str))

    def _comparable(self, cfg: DictionaryConfig, name: str, saved: Mapping[str, Any]) -> dict[str, Any]:
        """This run's fingerprint of `name` without the config fields a checkpoint written by an
        earlier version lacks while they are at their defaults (fields added since, e.g.
        skip_adam_betas, change nothing it was trained with)."""
        wanted = self.fingerprint(cfg, name)
        old = saved.get("dictionary") or {}
        fields, when_absent = type(cfg).model_fields, type(cfg).values_when_absent()
        for key in [k for k in wanted["dictionary"] if k not in old and k in fields]:
            # what versions without the field did (e.g. Gated's b_gate_init 0), else its default
            before = when_absent.get(key, fields[key].default)
            if ckpt.changed_settings({key: wanted["dictionary"][key]}, {key: before}) == []:
                del wanted["dictionary"][key]
        return wanted

    @property
    def data_parallel(self) -> bool:
        return self.placement == "data_parallel"

    @property
    def sharded(self) -> bool:
        return self.placement == "feature_sharded"

    @property
    def together(self) -> bool:
        """Whether every rank trains every dictionary (data parallel, feature sharded): they step,
        resume and leave off together."""
        return self.data_parallel or self.sharded

    @property
    def writes(self) -> bool:
        """Whether this process writes dictionaries (data parallel, feature sharded: rank 0 only)."""
        return not self.together or self.rank == 0

    def _say(self, message: str) -> None:
        """One line about this process's dictionaries (data parallel: rank 0 speaks for all)."""
        if self.writes:
            rank = f" rank {self.rank}" if self.placement == "dictionary_per_rank" else ""
            print(f"[train{rank}] {message}", flush=True)

    # -- the plan: who resumes where -----------------------------------------------------------------
    def _plan(self) -> dict[str, Found | None]:
        """Each dictionary's checkpoint to resume from, or None: it starts at step 0. One line names
        each one resumed or restarted (and, when there were checkpoints, each new one)."""
        if self.out_dir is None:
            return {name: None for name in self.names}
        ckpt.refuse_single_file_checkpoints(self.out_dir, self.all_names)
        had_checkpoints = bool(ckpt.members_with_checkpoints(self.out_dir))
        plan = {name: self._resumable(cfg, name) for cfg, name in zip(self.configs, self.names)}
        if had_checkpoints:
            for name in (n for n, found in plan.items() if found is None):
                if ckpt.latest_path(ckpt.member_dir(self.out_dir, name)) is None:
                    self._say(f"{name}: new, starts at step 0")
        if self.together:
            self._check_same_plan(plan)
        self._wandb_id = next((f[1]["wandb_id"] for f in plan.values() if f and f[1]["wandb_id"]), None)
        return plan

    def _resumable(self, cfg: DictionaryConfig, name: str) -> Found | None:
        """The latest checkpoint of dictionary `name`, if it was made with the same fingerprint."""
        member = ckpt.member_dir(self.out_dir, name)
        if self.sharded:  # this shard's, at the latest step every shard holds
            found = sharding.load_shard(member, self.shards.layout, name)
        else:
            sharding.refuse_other_layout(member, None, name)
            found = ckpt.load_latest(member)
        if found is None:
            return None
        path, state = found
        if state.get("format") != CHECKPOINT_FORMAT:
            changed = [f"checkpoint format {state.get('format')} -> {CHECKPOINT_FORMAT}"]
        else:
            changed = ckpt.changed_settings(state["fingerprint"], self._comparable(cfg, name, state["fingerprint"]))
        groups = len(state["optimizer"]["param_groups"])
        want = adam_group_count(cfg, int(state["d_in"]))
        if not changed and groups != want:  # W_skip's and b_enc's own Adam groups came later
            older = groups == want - 1 and adam_group_count(cfg.model_copy(update={"b_enc_lr_scale": 1.0}),
                                                            int(state["d_in"])) == groups
            hint = "; `b_enc_lr_scale: 1` resumes a checkpoint from before b_enc's own lr" if older else ""
            changed = [f"{groups} Adam parameter group(s) -> {want}{hint}"]
        if changed:
            self._say(f"{name}: restarts at step 0: its checkpoint {path} was made with other settings "
                      f"({'; '.join(changed)}); it is replaced at the next checkpoint")
            return None
        self._say(f"{name}: resumes at step {state['step']} ({path})")
        return found

    def _check_same_plan(self, plan: Mapping[str, Found | None]) -> None:
        """Data parallel: every rank must resume every dictionary from the same checkpoint."""
        mine = sorted((name, int(found[1]["step"]) if found else 0) for name, found in plan.items())
        differs = torch.tensor([int(dist.broadcast_object(mine) != mine)])
        if int(dist.all_reduce(differs, "max")):
            raise UserError(f"the ranks found different checkpoints to resume from: every rank must see "
                            f"the same out_dir {self.out_dir}")

    @staticmethod
    def _passes(plan: Mapping[str, Found | None]) -> list[tuple[int, list[str]]]:
        """The dictionaries grouped by the step they start at, the most advanced first: one pass
        over the batches for each group, so that every dictionary sees the batches an uninterrupted
        run would have given it."""
        starts: dict[int, list[str]] = {}
        for name, found in plan.items():
            starts.setdefault(int(found[1]["step"]) if found else 0, []).append(name)
        return sorted(starts.items(), reverse=True)

    # -- building --------------------------------------------------------------------------------
    def _hook_for(self, cfg: DictionaryConfig, batch: Mapping[str, Tensor]) -> str:
        keys = [k for k, v in batch.items() if isinstance(v, Tensor) and v.ndim == 2 and v.is_floating_point()]
        if cfg.is_transcoder:
            missing = [h for h in (cfg.input_hook, cfg.hook_name) if h not in batch]
            if cfg.hook_name is None or missing:
                raise ConfigError(f"transcoder {cfg.name!r} reads input_hook {cfg.input_hook!r} and writes hook_name "
                                  f"{cfg.hook_name!r}: the batches must hold both (they hold {sorted(keys)})")
            return cfg.hook_name
        if cfg.hook_name is not None:
            if cfg.hook_name not in batch:
                raise ConfigError(f"hook_name {cfg.hook_name!r} is not in the batches (they hold {sorted(keys)})")
            return cfg.hook_name
        if len(keys) != 1:
            raise ConfigError(f"the batches hold several hook points {sorted(keys)}: give each dictionary a hook_name")
        return keys[0]

    def _expected_d_in(self, hook: str) -> int | None:
        if self.d_in is None or isinstance(self.d_in, int):
            return self.d_in
        return self.d_in.get(hook)

    def _build(self, batch: Mapping[str, Tensor], names: Sequence[str]) -> list[_Slot]:
        slots = []
        for cfg, name in zip(self.configs, self.names):
            if name not in names:
                continue
            hook = self._hook_for(cfg, batch)
            input_hook = cfg.input_hook or hook
            d_in, d_out = batch[input_hook].shape[1], batch[hook].shape[1]
            for key, h, width in (("d_in", input_hook, d_in), ("d_out", hook, d_out)):
                expected = self._expected_d_in(h)
                if expected is not None and expected != width:
                    raise ConfigError(f"{name}: {key} is {expected} but the batches of {h!r} have width {width}")
            cfg.require_width(d_in, name)
            shards = self.shards.for_width(cfg.resolve_d_sae(d_in), name) if self.sharded else self.shards
            dictionary = (sharding.build_shard(cfg, d_in, shards, name, d_out=d_out) if self.sharded else
                          get_architecture(cfg.architecture)(cfg, d_in, d_out=d_out)).to(self.device)
            optimizer = make_optimizer(dictionary, cfg)
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
            slot = _Slot(name, cfg, hook, input_hook, dictionary, optimizer,
                         FeatureTracker(dictionary.d_sae, self.device), generator, self.fingerprint(cfg, name), shards,
                         bad_step=torch.full((), _NO_BAD_STEP, dtype=torch.long, device=self.device))
            slot.zero_stats(self.device)
            slots.append(slot)
        return slots

    @torch.no_grad()
    def _init_from_data(self, slot: _Slot, batch: Mapping[str, Tensor]) -> None:
        """Input scale (E‖s·x‖² = d_in), a transcoder's output scale (the same for its target), and
        b_dec (geometric median / mean / zeros of the target) from the first batch."""
        d, cfg = slot.dictionary, slot.cfg
        x, target = (t if t is None else t[:_BDEC_INIT_ROWS].to(self.device, torch.float32)
                     for t in slot.inputs(batch))
        if cfg.normalize_activations:
            d.input_scale.fill_(unit_norm_scale(x))
            if target is not None:
                d.output_scale.fill_(unit_norm_scale(target))
        xs, ys = d.training_io(x, target)
        d.b_dec.copy_(_centre(ys, cfg.b_dec_init))
        if target is not None:  # a transcoder's input centre, the same way
            d.b_in.copy_(_centre(xs, cfg.b_dec_init))

    def _set_batch_size(self, batch_size: int, plan: Mapping[str, Found | None]) -> None:
        """The first batch fixes the batch size (and so the steps); a checkpoint made with another
        cannot resume (checked for every dictionary before any trains)."""
        for name, found in plan.items():
            if found is not None and int(found[1]["batch_size"]) != batch_size:
                raise ConfigError(f"{found[0]} was trained on batches of {found[1]['batch_size']} rows but the "
                                  f"batches now have {batch_size}: resume with the same batch size, or delete "
                                  f"{found[0].parent} to train {name} from the start")
        self.batch_size, self.total_steps = batch_size, math.ceil(self.total_tokens / batch_size)

    # -- checkpoints --------------------------------------------------------------------------------
    def _member_state(self, s: _Slot) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "library_version": sae.__version__,
            "name": s.name,
            "fingerprint": s.fingerprint,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "total_steps": self.total_steps,
            "batch_size": self.batch_size,
            "wandb_id": self._wandb_id or "",
            "model": s.dictionary.state_dict(), "optimizer": s.optimizer.state_dict(),
            "tracker": s.tracker.state_dict(), "generator": s.generator.get_state(),
            "d_in": s.dictionary.d_in, "hook": s.hook,
            **({"d_out": s.dictionary.d_out, "input_hook": s.input_hook} if s.cfg.is_transcoder else {}),
            "loss_tail": [[step, loss] for step, loss in s.loss_tail],
            "history": self.histories[s.name].state_dict(),
            "window_stats": {**s.stats, "steps": s.stat_steps},  # the log window so far
        }

    def _load_member(self, s: _Slot, found: Found) -> None:
        path, state = found
        if int(state["d_in"]) != s.dictionary.d_in:
            raise ConfigError(f"{path}: {s.name} was trained on activations of width {state['d_in']} but the "
                              f"batches of {s.hook!r} now have width {s.dictionary.d_in}")
        s.dictionary.prepare_for_weights(state["model"])
        s.dictionary.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.tracker.load_state_dict(state["tracker"])
        s.generator.set_state(state["generator"])
        self.histories[s.name].load_state_dict(state.get("history"))
        if "window_stats" in state:
            s.stat_steps = int(state["window_stats"]["steps"])
            s.stats = {k: state["window_stats"][k].to(self.device) for k in _STAT_KEYS}
        s.loss_tail = [(int(step), float(loss)) for step, loss in state["loss_tail"]]
        s.last_checkpoint = path

    def _save_checkpoint(self) -> None:
        self._check_divergence()  # a checkpoint holds finite states only
        for s in self._live():
            directory = ckpt.member_dir(self.out_dir, s.name)
            if self.sharded:  # every shard its own (the first data group's ranks write)
                s.last_checkpoint = sharding.save_shard(directory, self.shards.layout, self.step,
                                                        self._member_state(s), self.data_index == 0)
            elif self.writes:
                s.last_checkpoint = ckpt.save_checkpoint(directory, self.step, self._member_state(s))
            else:
                s.last_checkpoint = directory / f"checkpoint-{self.step:010d}.pt"

    # -- divergence -----------------------------------------------------------------------------------
    def _live(self) -> list[_Slot]:
        return [s for s in self.slots if s.divergence is None]

    def _check_divergence(self) -> None:
        """One host sync: which dictionaries' losses or weights stopped being finite since the last
        check. Those leave the run (or stop it: stop_on_divergence); the others' weights are kept
        as their last good state."""
        live = self._live()
        if not live:
            return
        flags = torch.stack([torch.stack([s.bad_step, s.nonfinite_weights()]) for s in live])  # [n, 2]
        if self.together:  # the earliest bad step of any rank; broken weights on any
            flags = torch.stack([dist.all_reduce(flags[:, 0], "min"), dist.all_reduce(flags[:, 1], "max")], dim=1)
        for s, (bad, broken) in zip(live, flags.tolist()):
            if bad == _NO_BAD_STEP and not broken:
                s.remember_good(self.step, self.tokens_seen)
            else:  # weights broken by the last update show in the next loss
                self._diverged(s, min(bad, self.step))

    def _diverged(self, s: _Slot, bad: int) -> None:
        """Dictionary s's loss became NaN/inf at step `bad`: stop the run (stop_on_divergence), or
        restore its last good weights, save them with status "diverged" and go on without it."""
        tokens = bad * (self.batch_size or 0)
        if self.stop_on_divergence:
            kept = (f"its last good checkpoint {s.last_checkpoint} is kept" if s.last_checkpoint is not None
                    else "no checkpoint of it had been written")
            raise TrainingDiverged(f"dictionary {s.name!r}: the loss became NaN or inf at step {bad} (about "
                                   f"{tokens:,} tokens in); {kept}. Lower its lr, keep grad_clip on, or "
                                   f"check the activations for inf/NaN")
        window_loss = float(s.stats["loss"] / max(s.stat_steps, 1))
        tail = [*s.loss_tail, (self.step, window_loss)][-LOSS_TAIL:]
        s.divergence = {"step": bad, "tokens": tokens, "restored_step": s.good_at[0],
                        "loss_tail": [[step, _loss_value(loss)] for step, loss in tail]}
        s.dictionary.load_state_dict(s.good)
        self.diverged[s.name] = s.divergence
        s.finished = self._finished_dictionary(s)  # feature_sharded: the gathered whole
        self._say(f"{s.name}: diverged (loss {window_loss:.3g} in the window ending at step {self.step}, first "
                  f"non-finite at step {bad}); its weights of step {s.good_at[0]} are saved with status: "
                  f"diverged and it trains no more ({len(self._live())} others of this pass go on)")
        self._log_divergence(s)

    # -- logging ----------------------------------------------------------------------------------------
    def _read_stats(self) -> dict[str, dict[str, float]]:
        """One host sync: every live dictionary's window averages, then a fresh window."""
        live = self._live()
        if not live:
            return {}
        rows = torch.stack([torch.stack([*(s.stats[k] for k in _STAT_KEYS),
                                         s.tracker.dead_mask(s.cfg.dead_after_tokens).sum().double()])
                            for s in live])
        if self.sharded:  # L0 and dead features: every feature shard's part
            rows = torch.cat([rows[:, :3], self.shards.feature_sum(rows[:, 3:])], dim=1)
        rows = rows.tolist()
        out = {}
        for s, row in zip(live, rows):
            n = max(s.stat_steps, 1)
            st = dict(zip(_STAT_KEYS, row))
            out[s.name] = {"loss": st["loss"] / n, "fvu": st["sse"] / max(st["var"], 1e-30),
                           "l0": st["l0"] / n, "dead": int(row[-1]), "lr": s.optimizer.param_groups[0]["lr"]}
            if s.dictionary.resample_every_tokens():
                out[s.name]["resampled"] = s.tracker.resampled
            s.loss_tail = [*s.loss_tail, (self.step, out[s.name]["loss"])][-LOSS_TAIL:]
            s.zero_stats(self.device)
        return out

    def _postfix(self, stats: dict[str, dict[str, float]]) -> str:
        parts = []
        for name, st in list(stats.items())[:4]:
            short = name if len(stats) == 1 else name[:24]
            parts.append(f"{short}: loss {st['loss']:.3g} L0 {st['l0']:.1f} fvu {st['fvu']:.3f} dead {st['dead']}")
        if len(stats) > 4:
            parts.append(f"+{len(stats) - 4} more")
        if self.diverged:
            parts.append(f"{len(self.diverged)} diverged")
        return " | ".join(parts)

    def _start_wandb(self) -> None:
        mode = self.wandb_cfg.get("mode", "disabled")
        if mode == "disabled" or not dist.is_main():
            return
        import wandb  # here, not at the top: importing wandb takes seconds

        if self._wandb_id is None:
            self._wandb_id = wandb.util.generate_id()
        self._wandb_run = wandb.init(
            project=self.wandb_cfg.get("project", "sae"), name=self.wandb_cfg.get("name"),
            entity=self.wandb_cfg.get("entity"), mode=mode, id=self._wandb_id, resume="allow",
            dir=str(self.out_dir) if self.out_dir is not None else None,
            config={"total_tokens": self.total_tokens,
                    "dictionaries": {n: c.model_dump(mode="json") for n, c in zip(self.names, self.configs)}})

    def _log(self, stats: dict[str, dict[str, float]], histograms: dict[str, Tensor]) -> None:
        """One wandb row (wandb counts the rows itself: a later pass starts again at a lower step)."""
        if self._wandb_run is None:
            return
        import wandb  # imported by _start_wandb already

        row: dict[str, Any] = {"tokens": self.tokens_seen, "train_step": self.step}
        for name, st in stats.items():
            row.update({f"{name}/{k}": v for k, v in st.items()})
        for name, freq in histograms.items():
            freq = freq.cpu()
            live = freq[freq > 0]
            row[f"{name}/dead_in_window"] = int((freq == 0).sum())
            row[f"{name}/dense_1e-2"] = int((freq > 1e-2).sum())
            row[f"{name}/dense_1e-1"] = int((freq > 1e-1).sum())
            if live.numel():
                row[f"{name}/log10_frequency"] = wandb.Histogram(live.log10().numpy(), num_bins=64)
        self._wandb_run.log(row)

    def _log_divergence(self, s: _Slot) -> None:
        if self._wandb_run is None:
            return
        self._wandb_run.log({f"{s.name}/diverged_at_step": s.divergence["step"], "tokens": self.tokens_seen,
                             "train_step": self.step})
        summary = getattr(self._wandb_run, "summary", None)
        if summary is not None:
            summary[f"{s.name}/status"] = "diverged"

    def _log_window(self, bar: Any) -> None:
        """Check for divergence, read the window's statistics (one host sync each), show and log
        them, and add them to the training histories; frequency histograms every
        `histogram_every_tokens` (and at the end)."""
        self._check_divergence()
        stats = self._read_stats()
        bar.set_postfix_str(self._postfix(stats), refresh=False)
        every = self.histogram_every_tokens
        window = self.tokens_seen - self._histogram_tokens
        # the last window too, unless it is too short to say much
        histograms = window >= every or (self.tokens_seen >= self.total_tokens and 2 * window >= every)
        # {name: [d_sae] firing frequencies over the window} (feature sharded: every shard's)
        frequencies = {s.name: s.shards.feature_gather(s.tracker.window.frequencies())
                       for s in self._live()} if histograms else {}
        self._log(stats, frequencies)
        self._record_history(stats, frequencies)
        if histograms:
            for s in self._live():
                s.tracker.window.restart()
            self._histogram_tokens = self.tokens_seen

    def _record_history(self, stats: dict[str, dict[str, float]], frequencies: dict[str, Tensor]) -> None:
        for s in self._live():
            self.histories[s.name].update(self.tokens_seen, self.step, stats[s.name])
            if s.name in frequencies:
                self.histories[s.name].snapshot(self.tokens_seen, frequencies[s.name],
                                                s.tracker.window.tokens)

    def _save_history(self, name: str, diverged: bool = False) -> None:
        """The curves beside the saved dictionary, and into wandb when it logs; how far it still
        moved at the end (not for a diverged one: its rows stop at the divergence)."""
        written = self.histories[name].save(self.out_dir / name, title=name)
        moved = None if diverged else self.histories[name].describe_last_fifth()
        if moved is not None:
            self._say(f"{name}: {moved}")
        if self._wandb_run is not None:
            import wandb  # imported by _start_wandb already

            # unstepped, as _log: a later pass or a resumed run counts its steps from lower down
            self._wandb_run.log({"tokens": self.tokens_seen, "train_step": self.step,
                                 **{f"{name}/{p.stem}": wandb.Image(str(p)) for p in written if p.suffix == ".png"}})

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, source: Any) -> dict[str, SparseDictionary]:
        """Train every dictionary on `source` (see module docstring); returns {name: dictionary}."""
        if self._fitted:
            raise RuntimeError("a Trainer trains once; make a new one")
        self._fitted = True
        if not self.configs:  # dictionary_per_rank with more ranks than dictionaries
            dist.barrier()
            return {}
        source = as_batch_source(source)
        plan = self._plan()
        trained: dict[str, SparseDictionary] = {}
        try:
            self._start_wandb()
            passes = self._passes(plan)
            for i, (start, names) in enumerate(passes):
                desc = "train" if len(passes) == 1 else f"train {i + 1}/{len(passes)}"
                trained.update(self._train_pass(source, start, {n: plan[n] for n in names}, plan, desc))
        finally:
            self._close()
        self._end()
        return {name: trained[name] for name in self.names if name in trained}

    def _train_pass(self, source: BatchSource, start: int, found: Mapping[str, Found | None],
                    plan: Mapping[str, Found | None], desc: str) -> dict[str, SparseDictionary]:
        """One pass over the batches from step `start` for the dictionaries that start there."""
        first, rest = self._open(source, start, found, plan)
        bar = token_bar(self.total_steps * self.batch_size, desc=desc, initial=self.tokens_seen,
                        enabled=self.progress)  # whole batches: the last one may run past total_tokens
        try:
            for batch in self._batches_to_train(first, rest):
                self._train_step(batch)
                bar.update(self.tokens_seen - bar.n)
                if self.step % self.log_every == 0 or self.tokens_seen >= self.total_tokens:
                    self._log_window(bar)
                if self._checkpoint_due():
                    self._save_checkpoint()
                if not self._live():  # every dictionary of this pass diverged
                    break
            self._check_divergence()
        finally:
            bar.close()
        done = {s.name: s.finished if s.divergence else self._finished_dictionary(s) for s in self.slots}
        self.slots = []
        return done

    def _open(self, source: BatchSource, start: int, found: Mapping[str, Found | None],
              plan: Mapping[str, Found | None]) -> tuple[Mapping[str, Tensor], Iterator[Mapping[str, Tensor]]]:
        """Build the dictionaries of a pass and resume them from their checkpoints, or initialise
        them from the first batch; returns (the first batch to train on, the batches after it)."""
        rest = to_device(source.batches(start), self.device)  # on CUDA: copied a step ahead
        first = next(rest, None)
        if first is None:
            raise UserError("the batch source yielded no batches")
        self.slots = self._build(first, list(found))
        self.histories.update({s.name: TrainingHistory(s.cfg.dead_after_tokens) for s in self.slots})
        if self.batch_size is None:
            self._set_batch_size(int(first[self.slots[0].hook].shape[0]), plan)
        if self.together:
            self._check_same_batches(first)
        self.step, self.tokens_seen = start, 0
        for s in self.slots:
            if found[s.name] is not None:
                self._load_member(s, found[s.name])
                self.tokens_seen = int(found[s.name][1]["tokens_seen"])
            else:  # data parallel: the whole batch, on every rank alike
                self._init_from_data(s, first)
            s.remember_good(self.step, self.tokens_seen)
        self._histogram_tokens = self.tokens_seen - self.slots[0].tracker.window.tokens  # (resumed: its window)
        self.histogram_every_tokens = self.histogram_every_tokens or max(self.total_tokens // 20, 1)
        # a log window (one row of the curves) at least once per histogram window: >= 20 in a short run
        self.log_every = max(1, min(self.log_every, math.ceil(self.histogram_every_tokens / self.batch_size)))
        return first, rest

    def _batches_to_train(self, first: Mapping[str, Tensor],
                          rest: Iterator[Mapping[str, Tensor]]) -> Iterator[Mapping[str, Tensor]]:
        """`first`, then the batches of `rest`, until total_tokens have been trained on."""
        batch: Mapping[str, Tensor] | None = first
        while self.tokens_seen < self.total_tokens:
            if batch is None:
                batch = next(rest, None)
                if batch is None:
                    warnings.warn(f"the batch source ran out after {self.tokens_seen:,} of "
                                  f"{self.total_tokens:,} tokens; saving what was trained")
                    return
            yield batch
            batch = None

    def _train_step(self, batch: Mapping[str, Tensor]) -> None:
        """Every live dictionary's optimiser step on this batch (data parallel: on this rank's shard)."""
        live = self._live()
        B = int(batch[live[0].hook].shape[0])
        shard = self._own_shard(batch, B, live)
        for s in live:
            x, target = s.inputs(shard)
            s.step(x, self.step, self.total_steps, self.autocast_dtype, s.shards, target)
        self.tokens_seen += B
        self.step += 1
        for s in live:
            every = s.dictionary.resample_every_tokens()
            if every and self.tokens_seen < self.total_tokens and self._crossed(every, B):
                # data parallel, feature sharded: the whole batch, identically on every rank
                x, target = s.inputs(batch if self.together else shard)
                to = (lambda t: t if t is None else t.to(self.device, torch.float32))
                self._resample(s, to(x), to(target))

    def _own_shard(self, batch: Mapping[str, Tensor], B: int, slots: Sequence[_Slot]) -> dict[str, Tensor]:
        """{hook: this process's rows of the batch, on the training device} (data parallel, and
        each data group of a feature-sharded mesh: its contiguous slice; otherwise the whole batch)."""
        lo, hi = 0, B
        if self.data_count > 1:
            dist.check_batch_divisible(B, parts=self.data_count)
            lo, hi = self.data_index * B // self.data_count, (self.data_index + 1) * B // self.data_count
        hooks = dict.fromkeys(h for s in slots for h in (s.input_hook, s.hook))
        return {h: batch[h][lo:hi].to(self.device, torch.float32, non_blocking=True) for h in hooks}

    def _crossed(self, every: int, batch_size: int) -> bool:
        """Whether the last batch took tokens_seen past a multiple of `every`."""
        return self.tokens_seen // every > (self.tokens_seen - batch_size) // every

    def _checkpoint_due(self) -> bool:
        every = self.checkpoint_every_tokens
        if not every or self.tokens_seen >= self.total_tokens:
            return False
        return self._crossed(every, self.batch_size or 1)

    def _check_same_batches(self, batch: Mapping[str, Tensor]) -> None:
        """Data parallel: every rank must draw the same global batches (same source and seed)."""
        sums = dist.all_gather(torch.stack([batch[s.hook].double().sum() for s in self.slots]).cpu()
                               .reshape(1, -1))
        if not torch.equal(sums.min(dim=0).values, sums.max(dim=0).values):
            raise UserError("data-parallel ranks drew different batches: give every rank the same batch "
                            "source with the same seed (each rank trains on its slice of every batch)")

    def _resample(self, s: _Slot, x: Tensor, target: Tensor | None) -> None:
        dead = s.tracker.dead_mask(s.dictionary.resample_dead_tokens() or s.cfg.dead_after_tokens)
        floor = s.dictionary.resample_min_frequency()
        if floor is not None and s.tracker.period.tokens:
            dead |= s.tracker.period.frequencies() < floor
        s.tracker.period.restart()
        extra = {} if target is None else {"target": target}  # an autoencoder's call, as before
        ids = s.dictionary.resample(x, dead, s.generator, s.shards, **extra)
        if ids.numel():
            reset_optimizer_rows(s.optimizer, s.dictionary, ids)
            s.tracker.reset(ids)
        # feature sharded: every shard counts the whole dictionary's
        s.tracker.resampled += int(s.shards.feature_sum(torch.tensor(ids.numel(), device=self.device)))

    # -- the end ------------------------------------------------------------------------------------------
    def _finished_dictionary(self, s: _Slot) -> SparseDictionary:
        """Fold, annotate and save a dictionary (trained, or diverged: its last good weights); its
        checkpoints then go. Feature sharded: rank 0 saves (and returns) the gathered whole, the
        other ranks return their shard."""
        d = s.dictionary
        d.fold_input_scale()
        if self.saved_as == "one_file" and self.sharded:
            d = sharding.gather_whole(d, s.cfg, s.shards) or d
        d.eval()
        d.metadata.update(self.metadata.get(s.name, {}))
        d.metadata.setdefault("hook_name", s.hook if s.hook != DEFAULT_HOOK else None)
        if s.cfg.is_transcoder:
            d.metadata.setdefault("input_hook", s.input_hook)
        d.metadata["tokens_trained"] = self.tokens_seen if s.divergence is None else s.good_at[1]
        d.metadata["lr_used"] = d.lr  # the hyperparameters keep lr: null when it was the default
        d.metadata["b_enc_lr_scale_used"] = d.b_enc_lr_scale
        if d.resample_every_tokens():
            d.metadata["features_resampled"] = s.tracker.resampled
        if s.divergence is not None:
            d.metadata["status"] = "diverged"
            d.metadata["divergence"] = s.divergence
        d.metadata["library_version"] = sae.__version__
        if self.out_dir is not None and self.saved_as == "feature_shards":
            sharding.save_feature_shards(d, s.cfg, s.shards, self.out_dir / s.name, self.data_index == 0)
            if self.writes:
                self._save_history(s.name, s.divergence is not None)
        elif self.out_dir is not None and self.writes:
            d.save(self.out_dir / s.name)
            if not self.keep_checkpoint and not self.sharded:
                ckpt.remove_checkpoints(ckpt.member_dir(self.out_dir, s.name))
            self._save_history(s.name, s.divergence is not None)
        if self.out_dir is not None and self.sharded and not self.keep_checkpoint:
            sharding.remove_shards(ckpt.member_dir(self.out_dir, s.name), self.shards.layout, self.data_index == 0)
        return d

    def _end(self) -> None:
        """Once every rank is done: remove the checkpoints folder if nothing is left in it (the
        checkpoints of dictionaries not in this run are kept, and named), and say how many diverged."""
        dist.barrier()
        if self.out_dir is not None and dist.is_main() and not self.keep_checkpoint:
            others = [n for n in ckpt.members_with_checkpoints(self.out_dir) if n not in self.all_names]
            if others:
                print(f"[train] kept the checkpoints of {', '.join(others)} (not in this run): add them back to "
                      f"resume them, or delete their folders in {ckpt.checkpoint_dir(self.out_dir)}", flush=True)
            ckpt.remove_if_empty(ckpt.checkpoint_dir(self.out_dir))
        if self.diverged:
            names = ", ".join(f"{n} (step {r['step']})" for n, r in self.diverged.items())
            self._say(f"{len(self.diverged)} of {len(self.names)} dictionaries diverged: {names}; their last "
                      f"good weights are saved with status: diverged")

    def _close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _check_arguments(configs: Sequence[DictionaryConfig], total_tokens: int, out_dir: str | Path | None,
                     checkpoint_every_tokens: int | None) -> None:
    if not configs:
        raise ConfigError("no dictionaries to train")
    if total_tokens <= 0:
        raise ConfigError(f"total_tokens must be positive, got {total_tokens}")
    if checkpoint_every_tokens is not None and out_dir is None:
        raise ConfigError("checkpoint_every_tokens needs an out_dir to write checkpoints into")


def train_dictionaries(source: Any, configs: Sequence[DictionaryConfig], *, total_tokens: int,
                       d_in: int | Mapping[str, int] | None = None, device: str | torch.device = "cpu",
                       out_dir: str | Path | None = None, checkpoint_every_tokens: int | None = None,
                       metadata: Mapping[str, Mapping[str, Any]] | None = None,
                       wandb: Mapping[str, Any] | None = None, autocast_dtype: torch.dtype | None = None,
                       progress: bool = True, **trainer_kwargs: Any) -> dict[str, SparseDictionary]:
    """Train one or many sparse dictionaries from one pass over a stream of activation batches.

    Args:
        source: a batch source (`batches(start_step) -> Iterator[dict[hook_name, Tensor[batch, d_in]]]`)
            or a re-iterable collection of `[batch, d_in]` tensors. Every dictionary trains on every
            batch (its `hook_name`'s tensor), one optimiser step each.
        configs: dictionary configs (`sae.dictionaries.parse_dictionary_config({...})` or an
            architecture's `Config(...)`); each carries its own lr, seed, sparsity settings, ...
        total_tokens: tokens (batch rows) to train on; the lr schedule and penalty warm-ups follow it.
        d_in: expected activation width (or {hook_name: width}) to check the batches against;
            None takes it from the first batch.
        device: where the dictionaries train ("cpu", "cuda", ...); batches are moved there.
        out_dir: where `<name>/sae.safetensors` + `cfg.json` (+ the training curves of
            sae.training_history) and the checkpoints go (None: nothing is written; the trained
            dictionaries are only returned).
        checkpoint_every_tokens: write each dictionary's checkpoint into
            `out_dir/checkpoints/<name>/` this often. Calling again with the same out_dir resumes
            each dictionary from its checkpoint when it was made with the same settings (config as
            written, total_tokens, metadata; same batch size) and restarts it otherwise; one line
            names each one resumed or restarted.
        metadata: {dictionary name: {...}} written into each cfg.json (model_name, hook_name,
            dataset, context_size, ...).
        wandb: {"mode": "disabled" | "offline" | "online", "project": ..., "log_every": steps,
            "histogram_every_tokens": ...}; None or mode "disabled" logs nothing.
        autocast_dtype: e.g. torch.bfloat16 to run the forward/backward under autocast (master
            weights and Adam stay fp32); None runs in fp32.
        progress: show a progress bar (tokens/s, ETA, and loss, L0, FVU, dead per dictionary).
        placement: under torchrun, "data_parallel" (default), "dictionary_per_rank" or
            "feature_sharded" (see the module docstring); ignored by a single process.
        feature_shards: feature_sharded: how many ranks share each dictionary's features (a divisor
            of the ranks; the rest are data-parallel groups); None: all of them.
        saved_as: feature_sharded: "one_file" (the shards gathered into one sae.safetensors on rank
            0, which returns the whole dictionary) or "feature_shards" (each rank saves its own
            features, sae.formats.feature_shards, and every rank returns its shard).
        stop_on_divergence: stop everything (TrainingDiverged) when one dictionary's loss becomes
            NaN/inf, instead of letting that one leave and the others go on (the default).
        log_every: steps between statistics read-backs (progress bar, wandb, divergence checks).

    Returns:
        {name: dictionary}, folded to raw-activation units (input_scale 1) and in eval mode. Names
        are `cfg.name`, or the architecture plus the keys that differ between configs. A dictionary
        that diverged is there too, with its last good weights and `metadata["status"] ==
        "diverged"` (`metadata["divergence"]`: step, tokens, restored_step, loss_tail).

    Raises:
        TrainingDiverged: with stop_on_divergence, a loss became NaN/inf (names the dictionary and
            step; its last good checkpoint is kept). ConfigError: bad or inconsistent configs, a
            checkpoint in `out_dir` made with another batch size or by an earlier format.
    """
    trainer = Trainer(configs, total_tokens=total_tokens, d_in=d_in, device=device, out_dir=out_dir,
                      checkpoint_every_tokens=checkpoint_every_tokens, metadata=metadata, wandb=wandb,
                      autocast_dtype=autocast_dtype, progress=progress, **trainer_kwargs)
    return trainer.fit(source)
