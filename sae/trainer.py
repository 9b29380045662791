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
logged (`log_every` steps) or a checkpoint is due, which is also when a non-finite loss is noticed.
A checkpoint holds everything the next step depends on, so resuming is bit-identical on CPU.

Under torchrun, `placement` "data_parallel" gives each rank its shard of every batch (gradients
averaged; the losses get `sae.distributed.RankShards` for whole-batch statistics; rank 0 writes),
and "dictionary_per_rank" gives each rank its share of the dictionaries (it trains, checkpoints in
`checkpoints/rank-<r>/` and saves them itself).
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
from sae.dictionaries.base import (WHOLE_BATCH, BatchShards, DictionaryConfig, SparseDictionary, TrainStep,
                                   geometric_median, unit_norm_scale)
from sae.dictionaries.naming import dictionary_names
from sae.dictionaries.registry import get_architecture
from sae.errors import ConfigError, TrainingDiverged, UserError
from sae.progress import token_bar
from sae.training_history import TrainingHistory

DEFAULT_HOOK = "activations"  # the hook key of batches given as plain tensors
CHECKPOINT_FORMAT = 1
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
        if start_step > 0 and it is self.data:
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


@dataclass
class _Slot:
    name: str
    cfg: DictionaryConfig
    hook: str
    dictionary: SparseDictionary
    optimizer: torch.optim.Optimizer
    tracker: FeatureTracker
    generator: torch.Generator
    stats: dict[str, Tensor] = field(default_factory=dict)
    stat_steps: int = 0
    bad_step: Tensor | None = None  # first step with a non-finite loss (-1: none), on device

    def zero_stats(self, device: torch.device) -> None:
        self.stats = {k: torch.zeros((), dtype=torch.float64, device=device) for k in _STAT_KEYS}
        self.stat_steps = 0

    def step(self, x: Tensor, step: int, total_steps: int, autocast_dtype: torch.dtype | None,
             shards: BatchShards) -> None:
        """One optimiser step on x, one of `shards` of the batch (gradients and feature counts
        are reduced over all of them)."""
        self._set_lr(step, total_steps)
        out = self._loss(x, step / total_steps, autocast_dtype, shards)
        self._optimizer_step(out.loss, shards)
        counts, n_rows = shards.sum(out.counts()), x.shape[0] * shards.count
        self.tracker.update(counts, n_rows)
        self._accumulate_stats(x, out, counts, n_rows, step)

    def _set_lr(self, step: int, total_steps: int) -> None:
        cfg = self.cfg
        lr = self.dictionary.lr * lr_factor(step, total_steps, cfg.lr_warmup_fraction, cfg.lr_decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _loss(self, x: Tensor, progress: float, autocast_dtype: torch.dtype | None,
              shards: BatchShards) -> TrainStep:
        dead = self.tracker.dead_mask(self.cfg.dead_after_tokens)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            return self.dictionary.training_loss(x, progress, dead, shards)

    def _optimizer_step(self, loss: Tensor, shards: BatchShards) -> None:
        d = self.dictionary
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if shards.count > 1:
            dist.average_gradients(list(d.parameters()))
        d.before_optimizer_step()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(d.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        d.after_optimizer_step()

    @torch.no_grad()
    def _accumulate_stats(self, x: Tensor, out: TrainStep, counts: Tensor, n_rows: int, step: int) -> None:
        """Window sums for logging, and the first step whose loss was not finite (on the device)."""
        loss = out.loss.detach().double()
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss),
                                    torch.full_like(self.bad_step, step), self.bad_step)
        xs = self.dictionary.scale_input(x).double()
        self.stats["loss"] += loss
        self.stats["sse"] += (out.x_hat.detach().double() - xs).pow(2).sum()
        self.stats["var"] += (xs - xs.mean(dim=0)).pow(2).sum()
        self.stats["l0"] += counts.double().sum() / n_rows
        self.stat_steps += 1


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
                 placement: str | None = None):
        _check_arguments(configs, total_tokens, out_dir, checkpoint_every_tokens)
        self.configs = list(configs)
        self.names = dictionary_names(self.configs)
        all_names = list(self.names)
        self._place(placement, d_in)
        self.total_tokens = int(total_tokens)
        self.d_in = d_in
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every_tokens = checkpoint_every_tokens
        self.metadata = {k: dict(v) for k, v in (metadata or {}).items()}
        unknown = set(self.metadata) - set(all_names)
        if unknown:
            raise ConfigError(f"metadata given for unknown dictionaries {sorted(unknown)}; names are {self.names}")
        self.wandb_cfg = dict(wandb or {})
        self.log_every = int(log_every or self.wandb_cfg.get("log_every", 20))
        self.histogram_every_tokens = histogram_every_tokens or self.wandb_cfg.get("histogram_every_tokens")
        self.autocast_dtype = autocast_dtype
        self.progress = progress and dist.is_main()
        self.keep_checkpoint = keep_checkpoint
        self.slots: list[_Slot] = []
        self.step = 0
        self.tokens_seen = 0
        self.total_steps: int | None = None
        self.batch_size: int | None = None
        self._wandb_run = None
        self._wandb_id: str | None = None
        self._last_checkpoint: Path | None = None
        self._histogram_tokens = 0  # tokens_seen when the frequency histograms were last logged
        self.histories: dict[str, TrainingHistory] = {}  # name -> curves over training (saved beside it)

    def _place(self, placement: str | None, d_in: int | Mapping[str, int] | None) -> None:
        """Several processes (torchrun; see sae.distributed): how they share the work. None on one."""
        if placement is not None and placement not in dist.PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(dist.PLACEMENTS)}, not {placement!r}")
        self.world, self.rank = dist.world_size(), dist.rank()
        self.placement = (placement or "data_parallel") if self.world > 1 else None
        # what the losses reduce whole-batch statistics over: this rank's shard and the others'
        self.shards = dist.RankShards() if self.data_parallel else WHOLE_BATCH
        if self.placement == "dictionary_per_rank":
            owners = dist.assign_dictionaries(self.configs, self.world, d_in)
            mine = [i for i, owner in enumerate(owners) if owner == self.rank]
            self.configs = [self.configs[i] for i in mine]
            self.names = [self.names[i] for i in mine]

    # -- fingerprint of what determines the result --------------------------------------------
    def fingerprint(self) -> str:
        configs = [c.as_written().model_dump(mode="json") for c in self.configs]
        return json.dumps({"names": self.names, "configs": configs, "total_tokens": self.total_tokens},
                          sort_keys=True)

    @property
    def checkpoint_dir(self) -> Path | None:
        if self.out_dir is None:
            return None
        if self.placement == "dictionary_per_rank":  # each rank checkpoints its own dictionaries
            return ckpt.checkpoint_dir(self.out_dir) / f"rank-{self.rank:03d}"
        return ckpt.checkpoint_dir(self.out_dir)

    @property
    def data_parallel(self) -> bool:
        return self.placement == "data_parallel"

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints and dictionaries (data parallel: rank 0 only)."""
        return not self.data_parallel or self.rank == 0

    # -- building --------------------------------------------------------------------------------
    def _hook_for(self, cfg: DictionaryConfig, batch: Mapping[str, Tensor]) -> str:
        keys = [k for k, v in batch.items() if isinstance(v, Tensor) and v.ndim == 2 and v.is_floating_point()]
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

    def _build(self, batch: Mapping[str, Tensor]) -> None:
        for cfg, name in zip(self.configs, self.names):
            hook = self._hook_for(cfg, batch)
            x = batch[hook]
            d_in = x.shape[1]
            expected = self._expected_d_in(hook)
            if expected is not None and expected != d_in:
                raise ConfigError(f"{name}: d_in is {expected} but the batches of {hook!r} have width {d_in}")
            cfg.require_width(d_in, name)
            cls = get_architecture(cfg.architecture)
            dictionary = cls(cfg, d_in).to(self.device)
            optimizer = torch.optim.Adam(dictionary.parameters(), lr=dictionary.lr, betas=tuple(cfg.adam_betas))
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
            slot = _Slot(name, cfg, hook, dictionary, optimizer, FeatureTracker(dictionary.d_sae, self.device),
                         generator, bad_step=torch.full((), -1, dtype=torch.long, device=self.device))
            slot.zero_stats(self.device)
            self.slots.append(slot)

    @torch.no_grad()
    def _init_from_data(self, batch: Mapping[str, Tensor]) -> None:
        """Input scale (E‖s·x‖² = d_in) and b_dec (geometric median / mean / zeros) from the first batch."""
        for slot in self.slots:
            d, cfg = slot.dictionary, slot.cfg
            x = batch[slot.hook][:_BDEC_INIT_ROWS].to(self.device, torch.float32)
            if cfg.normalize_activations:
                d.input_scale.fill_(unit_norm_scale(x))
            xs = d.scale_input(x)
            if cfg.b_dec_init == "geometric_median":
                d.b_dec.copy_(geometric_median(xs))
            elif cfg.b_dec_init == "mean":
                d.b_dec.copy_(xs.mean(dim=0))
            else:
                d.b_dec.zero_()

    # -- checkpoints --------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "library_version": sae.__version__,
            "fingerprint": self.fingerprint(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "total_steps": self.total_steps,
            "batch_size": self.batch_size,
            "world_size": self.world,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "wandb_id": self._wandb_id or "",
            "dictionaries": {
                s.name: {"model": s.dictionary.state_dict(), "optimizer": s.optimizer.state_dict(),
                         "tracker": s.tracker.state_dict(), "generator": s.generator.get_state(),
                         "history": self.histories[s.name].state_dict(),
                         "window_stats": {**s.stats, "steps": s.stat_steps},  # the log window so far
                         "d_in": s.dictionary.d_in, "hook": s.hook}
                for s in self.slots},
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.total_steps, self.batch_size = int(state["total_steps"]), int(state["batch_size"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self._wandb_id = state["wandb_id"] or None
        for s in self.slots:
            st = state["dictionaries"][s.name]
            s.dictionary.prepare_for_weights(st["model"])
            s.dictionary.load_state_dict(st["model"])
            s.optimizer.load_state_dict(st["optimizer"])
            s.tracker.load_state_dict(st["tracker"])
            self.histories[s.name].load_state_dict(st.get("history"))
            if "window_stats" in st:
                s.stat_steps = int(st["window_stats"]["steps"])
                s.stats = {k: st["window_stats"][k].to(self.device) for k in _STAT_KEYS}
            s.generator.set_state(st["generator"])

    def _save_checkpoint(self) -> None:
        self._check_finite()
        if self.writes:
            self._last_checkpoint = ckpt.save_checkpoint(self.checkpoint_dir, self.step, self._state())
        else:
            self._last_checkpoint = self.checkpoint_dir / f"checkpoint-{self.step:010d}.pt"

    def _find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        if self.checkpoint_dir is None:
            return None
        found = ckpt.load_latest(self.checkpoint_dir)
        if found is None:
            return None
        path, state = found
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != self.fingerprint():
            ranks = state.get("world_size")
            if self.placement == "dictionary_per_rank" and ranks is not None and ranks != self.world:
                raise ConfigError(f"{path} was written by a dictionary_per_rank run on {ranks} ranks; each "
                                  f"rank's dictionaries depend on the rank count: relaunch with "
                                  f"--nproc-per-node {ranks} (now {self.world})")
            raise ConfigError(f"{path} was written by a run with different dictionaries or total_tokens; "
                              f"use another out_dir, or delete {self.checkpoint_dir} to start over")
        return path, state

    # -- divergence -----------------------------------------------------------------------------------
    def _check_finite(self) -> None:
        for s in self.slots:
            bad = int(dist.all_reduce(s.bad_step, "max")) if self.data_parallel else int(s.bad_step)
            if bad >= 0:
                kept = (f"the last good checkpoint {self._last_checkpoint} is kept"
                        if self._last_checkpoint is not None else "no checkpoint had been written")
                raise TrainingDiverged(
                    f"dictionary {s.name!r}: the loss became NaN or inf at step {bad} "
                    f"(about {bad * (self.batch_size or 0):,} tokens in); {kept}. Lower its lr, "
                    f"keep grad_clip on, or check the activations for inf/NaN")

    # -- logging ----------------------------------------------------------------------------------------
    def _read_stats(self) -> dict[str, dict[str, float]]:
        """One host sync: every dictionary's window averages, then a fresh window."""
        out = {}
        for s in self.slots:
            n = max(s.stat_steps, 1)
            vals = torch.stack([s.stats[k] for k in _STAT_KEYS]).tolist()
            st = dict(zip(_STAT_KEYS, vals))
            dead = int(s.tracker.dead_mask(s.cfg.dead_after_tokens).sum())
            out[s.name] = {"loss": st["loss"] / n, "fvu": st["sse"] / max(st["var"], 1e-30),
                           "l0": st["l0"] / n, "dead": dead, "lr": s.optimizer.param_groups[0]["lr"]}
            if s.dictionary.resample_every_tokens():
                out[s.name]["resampled"] = s.tracker.resampled
            s.zero_stats(self.device)
        return out

    def _postfix(self, stats: dict[str, dict[str, float]]) -> str:
        parts = []
        for name, st in list(stats.items())[:4]:
            short = name if len(stats) == 1 else name[:24]
            parts.append(f"{short}: loss {st['loss']:.3g} L0 {st['l0']:.1f} fvu {st['fvu']:.3f} dead {st['dead']}")
        if len(stats) > 4:
            parts.append(f"+{len(stats) - 4} more")
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

    def _log(self, stats: dict[str, dict[str, float]], histograms: bool) -> None:
        if self._wandb_run is None:
            return
        import wandb  # imported by _start_wandb already

        row: dict[str, Any] = {"tokens": self.tokens_seen}
        for name, st in stats.items():
            row.update({f"{name}/{k}": v for k, v in st.items()})
        if histograms:
            for s in self.slots:
                freq = s.tracker.window.frequencies().cpu()
                live = freq[freq > 0]
                row[f"{s.name}/dead_in_window"] = int((freq == 0).sum())
                row[f"{s.name}/dense_1e-2"] = int((freq > 1e-2).sum())
                row[f"{s.name}/dense_1e-1"] = int((freq > 1e-1).sum())
                if live.numel():
                    row[f"{s.name}/log10_frequency"] = wandb.Histogram(live.log10().numpy(), num_bins=64)
        self._wandb_run.log(row, step=self.step)

    def _record_history(self, stats: dict[str, dict[str, float]], histograms: bool) -> None:
        for s in self.slots:
            self.histories[s.name].update(self.tokens_seen, self.step, stats[s.name])
            if histograms:
                self.histories[s.name].snapshot(self.tokens_seen, s.tracker.window.frequencies(),
                                                s.tracker.window.tokens)

    def _save_history(self, name: str) -> None:
        """The curves beside the saved dictionary, and into wandb when it logs."""
        written = self.histories[name].save(self.out_dir / name, title=name)
        if self._wandb_run is not None:
            import wandb  # imported by _start_wandb already

            self._wandb_run.log({f"{name}/{p.stem}": wandb.Image(str(p)) for p in written if p.suffix == ".png"},
                                step=self.step)

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, source: Any) -> dict[str, SparseDictionary]:
        """Train every dictionary on `source` (see module docstring); returns {name: dictionary}."""
        if self.slots:
            raise RuntimeError("a Trainer trains once; make a new one")
        if not self.configs:  # dictionary_per_rank with more ranks than dictionaries
            dist.barrier()
            return {}
        first, rest = self._start(as_batch_source(source))
        bar = None
        try:
            self._start_wandb()
            # whole batches: the last one may run past total_tokens
            bar = token_bar(self.total_steps * self.batch_size, desc="train", initial=self.tokens_seen,
                            enabled=self.progress)
            for batch in self._batches_to_train(first, rest):
                self._train_step(batch)
                bar.update(self.tokens_seen - bar.n)
                if self.step % self.log_every == 0 or self.tokens_seen >= self.total_tokens:
                    self._log_window(bar)
                if self._checkpoint_due():
                    self._save_checkpoint()
            self._check_finite()
            return self._finish()
        finally:
            self._close(bar)

    def _start(self, source: BatchSource) -> tuple[Mapping[str, Tensor], Iterator[Mapping[str, Tensor]]]:
        """Build the dictionaries and resume them from the latest checkpoint, or initialise them
        from the first batch; returns (the first batch to train on, the batches after it)."""
        found = self._find_checkpoint()
        state, start_step = None, 0
        if found is not None:
            self._last_checkpoint, state = found
            start_step = int(state["step"])
        if self.data_parallel:
            self._check_same_start(start_step)
        rest = source.batches(start_step)
        first = next(rest, None)
        if first is None:
            raise UserError("the batch source yielded no batches")
        self._build(first)
        self.histories = {s.name: TrainingHistory(s.cfg.dead_after_tokens) for s in self.slots}
        if self.data_parallel:
            self._check_same_batches(first)
        if state is not None:
            self._load_state(state)
        else:
            self._init_from_data(first)  # data parallel: the whole batch, on every rank alike
            self.batch_size = int(first[self.slots[0].hook].shape[0])
            self.total_steps = math.ceil(self.total_tokens / self.batch_size)
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
        """Every dictionary's optimiser step on this batch (data parallel: on this rank's shard)."""
        B = int(batch[self.slots[0].hook].shape[0])
        shard = self._own_shard(batch, B)
        for s in self.slots:
            s.step(shard[s.hook], self.step, self.total_steps, self.autocast_dtype, self.shards)
        self.tokens_seen += B
        self.step += 1
        for s in self.slots:
            every = s.dictionary.resample_every_tokens()
            if every and self.tokens_seen < self.total_tokens and self._crossed(every, B):
                # data parallel: the whole batch, identically on every rank
                x = batch[s.hook].to(self.device, torch.float32) if self.data_parallel else shard[s.hook]
                self._resample(s, x)

    def _own_shard(self, batch: Mapping[str, Tensor], B: int) -> dict[str, Tensor]:
        """{hook: this process's rows of the batch, on the training device} (data parallel: its
        contiguous slice; otherwise the whole batch)."""
        lo, hi = 0, B
        if self.data_parallel:
            dist.check_batch_divisible(B)
            lo, hi = self.rank * B // self.world, (self.rank + 1) * B // self.world
        hooks = dict.fromkeys(s.hook for s in self.slots)
        return {h: batch[h][lo:hi].to(self.device, torch.float32, non_blocking=True) for h in hooks}

    def _crossed(self, every: int, batch_size: int) -> bool:
        """Whether the last batch took tokens_seen past a multiple of `every`."""
        return self.tokens_seen // every > (self.tokens_seen - batch_size) // every

    def _checkpoint_due(self) -> bool:
        every = self.checkpoint_every_tokens
        if not every or self.tokens_seen >= self.total_tokens:
            return False
        return self._crossed(every, self.batch_size or 1)

    def _log_window(self, bar: Any) -> None:
        """Read the window's statistics (one host sync), show and log them, and add them to the
        training histories; frequency histograms every `histogram_every_tokens` (and at the end)."""
        self._check_finite()
        stats = self._read_stats()
        bar.set_postfix_str(self._postfix(stats), refresh=False)
        every = self.histogram_every_tokens
        window = self.tokens_seen - self._histogram_tokens
        # the last window too, unless it is too short to say much
        histograms = window >= every or (self.tokens_seen >= self.total_tokens and 2 * window >= every)
        self._log(stats, histograms)
        self._record_history(stats, histograms)
        if histograms:
            for s in self.slots:
                s.tracker.window.restart()
            self._histogram_tokens = self.tokens_seen

    def _check_same_start(self, start_step: int) -> None:
        """Data parallel: every rank must resume from the same checkpoint."""
        steps = dist.all_gather(torch.tensor([start_step])).tolist()
        if len(set(steps)) > 1:
            raise UserError(f"the ranks found different checkpoints to resume from (steps {steps}): "
                            f"every rank must see the same out_dir {self.out_dir}")

    def _check_same_batches(self, batch: Mapping[str, Tensor]) -> None:
        """Data parallel: every rank must draw the same global batches (same source and seed)."""
        sums = dist.all_gather(torch.stack([batch[s.hook].double().sum() for s in self.slots]).cpu()
                               .reshape(1, -1))
        if not torch.equal(sums.min(dim=0).values, sums.max(dim=0).values):
            raise UserError("data-parallel ranks drew different batches: give every rank the same batch "
                            "source with the same seed (each rank trains on its slice of every batch)")

    def _resample(self, s: _Slot, x: Tensor) -> None:
        dead = s.tracker.dead_mask(s.dictionary.resample_dead_tokens() or s.cfg.dead_after_tokens)
        floor = s.dictionary.resample_min_frequency()
        if floor is not None and s.tracker.period.tokens:
            dead |= s.tracker.period.frequencies() < floor
        s.tracker.period.restart()
        ids = s.dictionary.resample(x, dead, s.generator)
        if ids.numel():
            reset_optimizer_rows(s.optimizer, s.dictionary, ids)
            s.tracker.reset(ids)
            s.tracker.resampled += int(ids.numel())

    # -- the end ------------------------------------------------------------------------------------------
    def _finish(self) -> dict[str, SparseDictionary]:
        """Fold, annotate and save every dictionary; then the checkpoints go."""
        result = {s.name: self._finished_dictionary(s) for s in self.slots}
        if self.out_dir is not None and not self.keep_checkpoint and self.writes:
            ckpt.remove_checkpoints(self.checkpoint_dir)
        dist.barrier()
        if self.placement == "dictionary_per_rank" and self.rank == 0 and not self.keep_checkpoint \
                and self.out_dir is not None:  # every rank has removed its own folder in it
            ckpt.remove_checkpoints(ckpt.checkpoint_dir(self.out_dir))
        return result

    def _finished_dictionary(self, s: _Slot) -> SparseDictionary:
        d = s.dictionary
        d.fold_input_scale()
        d.eval()
        d.metadata.update(self.metadata.get(s.name, {}))
        d.metadata.setdefault("hook_name", s.hook if s.hook != DEFAULT_HOOK else None)
        d.metadata["tokens_trained"] = self.tokens_seen
        d.metadata["lr_used"] = d.lr  # the hyperparameters keep lr: null when it was the default
        if d.resample_every_tokens():
            d.metadata["features_resampled"] = s.tracker.resampled
        d.metadata["library_version"] = sae.__version__
        if self.out_dir is not None and self.writes:
            d.save(self.out_dir / s.name)
            self._save_history(s.name)
        return d

    def _close(self, bar: Any) -> None:
        if bar is not None:
            bar.close()
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
        checkpoint_every_tokens: write a checkpoint into `out_dir/checkpoints/` this often; an
            existing checkpoint there is resumed from.
        metadata: {dictionary name: {...}} written into each cfg.json (model_name, hook_name,
            dataset, context_size, ...).
        wandb: {"mode": "disabled" | "offline" | "online", "project": ..., "log_every": steps,
            "histogram_every_tokens": ...}; None or mode "disabled" logs nothing.
        autocast_dtype: e.g. torch.bfloat16 to run the forward/backward under autocast (master
            weights and Adam stay fp32); None runs in fp32.
        progress: show a progress bar (tokens/s, ETA, and loss, L0, FVU, dead per dictionary).
        placement: under torchrun, "data_parallel" (default) or "dictionary_per_rank" (see the
            module docstring); ignored by a single process.

    Returns:
        {name: dictionary}, folded to raw-activation units (input_scale 1) and in eval mode. Names
        are `cfg.name`, or the architecture plus the keys that differ between configs.

    Raises:
        TrainingDiverged: a loss became NaN/inf (names the dictionary and step; the last good
            checkpoint is kept). ConfigError: bad or inconsistent configs, or a checkpoint in
            `out_dir` made by other configs.
    """
    trainer = Trainer(configs, total_tokens=total_tokens, d_in=d_in, device=device, out_dir=out_dir,
                      checkpoint_every_tokens=checkpoint_every_tokens, metadata=metadata, wandb=wandb,
                      autocast_dtype=autocast_dtype, progress=progress, **trainer_kwargs)
    return trainer.fit(source)
