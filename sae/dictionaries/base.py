"""What every sparse dictionary is: the shared config, weights, encode/decode, saving.

A dictionary maps an activation `x [..., d_in]` to feature activations
`f = activation(pre_acts(x)) [..., d_sae]` and back to `x_hat = f @ W_dec + b_dec`.

A *transcoder* (`input_hook` set) reads one hook and predicts another: x is the input hook's
activation, x_hat `[..., d_out]` the prediction of the output hook's (`hook_name`), d_out may
differ from d_in, and the encoder centres x on `b_in` (its own input-space centre, set from the
data and not trained; b_dec lives in output space), folded into b_enc at save time. A
`skip_connection` adds a linear path `x @ W_skip [d_in, d_out]` (zero at init, trained jointly)
to x_hat, for transcoders and autoencoders alike. Input and output are normalised separately
(`input_scale`, `output_scale`); both are folded into the weights at save time.
Architectures differ in `activation`, in their training loss and in what they do around an
optimiser step; each is a subclass in its own file, registered under its `architecture`.

Weights follow the SAELens layout so that export is a rename: `W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_out]`, `b_enc [d_sae]`, `b_dec [d_out]` (d_out = d_in for an autoencoder).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from sae import io
from sae.dictionaries.cfg_view import DictionaryCfg
from sae.dtypes import dtype_name
from sae.errors import ConfigError

FORMAT_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"

KillMode = Literal["after", "before"]


class DictionaryConfig(BaseModel):
    """Hyperparameters of one dictionary; architectures subclass it to add their own.

    Training hyperparameters live here (not in a global trainer config) so that a sweep can
    vary any of them across dictionaries trained from the same activation stream.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    architecture: str
    name: str | None = None
    hook_name: str | None = None  # None: the run's only hook point
    d_sae: int | None = Field(None, ge=1)  # give d_sae or expansion_factor (d_sae = factor * d_in)
    expansion_factor: float | None = Field(None, gt=0)

    lr: float | None = Field(None, gt=0)  # None: the architecture's default (`default_lr`)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # b_enc's lr over the weights' (its own Adam group when not 1); None: the architecture's
    # (relu: √d_in with normalised inputs, see ReLUDictionary.default_b_enc_lr_scale; others 1)
    b_enc_lr_scale: float | None = Field(None, gt=0, json_schema_extra={"absent_means": 1.0})
    lr_warmup_fraction: float = Field(0.0, ge=0, le=1)  # linear warm-up over this fraction of the steps
    lr_decay_fraction: float = Field(0.2, ge=0, le=1)  # linear decay to 0 over the last fraction of the steps
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    normalize_activations: bool = True  # scale inputs so E‖x‖² = d_in; folded back at save
    dead_after_tokens: int = Field(1_000_000, ge=1)  # a feature silent this long counts as dead
    # Transcoder: the hook read (hook_name is the hook written and scored on); None: an autoencoder
    input_hook: str | None = None
    skip_connection: bool = False  # add x_in @ W_skip [d_in, d_out] (zero init) to the prediction
    skip_adam_betas: tuple[float, float] = (0.9, 0.999)  # W_skip's Adam betas (a dense map: with momentum)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str | None) -> str | None:
        # the name is the dictionary's folder inside the run: it must stay inside it
        if name is not None and (not name or "/" in name or "\\" in name or name.startswith(".")):
            raise ValueError("a dictionary name must be a plain folder name (no '/' or '\\', not starting with '.')")
        return name

    @property
    def is_transcoder(self) -> bool:
        return self.input_hook is not None

    @property
    def reads_hook(self) -> str | None:
        """The hook whose activations the encoder reads (input_hook, else hook_name)."""
        return self.input_hook if self.input_hook is not None else self.hook_name

    @model_validator(mode="after")
    def _check_width(self) -> "DictionaryConfig":
        if self.d_sae is not None and self.expansion_factor is not None:
            raise ValueError("give either d_sae or expansion_factor, not both")
        if self.d_sae is None and self.expansion_factor is None:
            raise ValueError("give d_sae or expansion_factor")
        for key in ("adam_betas", "skip_adam_betas"):
            if not all(0.0 <= b < 1.0 for b in getattr(self, key)):
                raise ValueError(f"{key} must both be in [0, 1), got {list(getattr(self, key))}")
        return self

    def resolve_d_sae(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else int(round(self.expansion_factor * d_in))

    def check_for_width(self, d_in: int) -> None:
        """Settings that depend on the activation width (known once the model is loaded): raises
        ValueError naming the key. Architectures add their own (TopK: k <= d_sae)."""
        if self.resolve_d_sae(d_in) < 1:
            raise ValueError(f"expansion_factor {self.expansion_factor} gives d_sae 0 for d_in {d_in}")

    def require_width(self, d_in: int, name: str | None = None) -> None:
        """`check_for_width` as the one-line ConfigError naming the dictionary (trainer and train.py)."""
        try:
            self.check_for_width(d_in)
        except ValueError as e:
            raise ConfigError(f"dictionary {name or self.name!r}: {e}") from None

    @classmethod
    def values_when_absent(cls) -> dict[str, Any]:
        """What a saved config or checkpoint without a field was trained with, for the fields
        added with a default other than the old behaviour (`absent_means` on the field; ReLU's
        b_enc_lr_scale: 1). Fields that existed before their default changed are saved with their
        value and need no entry."""
        extras = {name: f.json_schema_extra for name, f in cls.model_fields.items()}
        return {name: e["absent_means"] for name, e in extras.items() if isinstance(e, dict) and "absent_means" in e}

    def as_written(self) -> "DictionaryConfig":
        """This config with every field its author left out at its declared default, not at the
        value a validator resolved it to (ReLU's recipe defaults). Dictionary names and checkpoint
        fingerprints are built from it: they say what was asked for, as short as it was asked."""
        return type(self).model_construct(**{k: getattr(self, k) for k in self.model_fields_set})


def penalty_warmup(progress: float, fraction: float) -> float:
    """Linear 0 -> 1 over the first `fraction` of training (1 throughout when fraction = 0)."""
    return 1.0 if fraction <= 0 else min(1.0, progress / fraction)


class BatchShards:
    """The parts a training batch is split into, and sums, minima and maxima over all of them.

    Data parallel training gives each process one shard (`sae.distributed.RankShards`) and
    averages the gradients over them, so a loss that is a ratio of whole-batch sums (TopK's FVU)
    is `count · local_sum / whole_batch_denominator`. This default is the whole batch in one
    shard: every reduction returns its input."""

    count: int = 1

    def sum(self, t: Tensor) -> Tensor:
        return t

    def min(self, t: Tensor) -> Tensor:
        return t

    def max(self, t: Tensor) -> Tensor:
        return t

    def gather(self, t: Tensor) -> Tensor:
        """[count · n, ...]: every shard's t (the same shape on each), in shard order."""
        return t

    # A dictionary's features may be split too (`sae.sharding`, placement feature_sharded): this
    # process then holds features [feature_lo, feature_lo + its d_sae) of the whole dictionary,
    # and every feature shard sees the same rows. Here: one feature shard, every method identity.
    feature_count: int = 1
    feature_lo: int = 0

    def feature_sum(self, t: Tensor) -> Tensor:
        """Σ over the feature shards of each one's partial t (a partial decode, a penalty summed
        over its features): the same on every shard; its gradient passes back unchanged (every
        shard computes the same loss from it)."""
        return t

    def once(self, t: Tensor) -> Tensor:
        """t, a tensor every feature shard holds alike (b_dec), used where every shard computes the
        same thing from it: its gradient is counted on one feature shard only, so that summing the
        gradients of the replicated parameters over the feature shards counts it once."""
        return t

    def feature_gather(self, t: Tensor) -> Tensor:
        """[feature_count · n, ...]: every feature shard's t (the same shape on each), in shard
        order, without gradients."""
        return t

    # What the trainer does with the gradients between backward and the optimiser step.
    def reduce_gradients(self, dictionary: "SparseDictionary") -> None:
        """Make each gradient the whole batch's (and whole dictionary's): here it already is."""

    def clip_gradients(self, dictionary: "SparseDictionary", max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(dictionary.parameters(), max_norm)


WHOLE_BATCH = BatchShards()


@dataclass
class TrainStep:
    """What `training_loss` returns: the loss to minimise and what the trainer logs/tracks.

    Dense architectures return `f`; sparse paths (TopK-style) may return `f=None` and give
    `feature_counts` (tokens of the batch on which each feature fired) instead, so that no
    dense [batch, d_sae] tensor is ever built.
    """

    loss: Tensor  # scalar
    x_hat: Tensor  # [batch, d_out], in normalised units (compare with the target·output scale)
    f: Tensor | None  # [batch, d_sae], the activations used for L0 and dead-feature tracking
    metrics: dict[str, Tensor] = field(default_factory=dict)  # scalars, e.g. {"mse":..., "l1":...}
    feature_counts: Tensor | None = None  # [d_sae] how many tokens of the batch each feature fired on

    def counts(self) -> Tensor:
        """[d_sae] number of tokens of the batch on which each feature was non-zero."""
        if self.feature_counts is not None:
            return self.feature_counts
        assert self.f is not None
        return (self.f != 0).sum(dim=0)


class SparseDictionary(nn.Module):
    architecture: ClassVar[str]
    Config: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    # Which dimension of each saved tensor indexes features (d_sae). Pruning slices these,
    # resampling resets these rows of the optimizer state; tensors not listed (b_dec, a
    # shadow encoder) are feature-independent. Architectures extend it with their extras.
    feature_dims: ClassVar[dict[str, int]] = {"W_enc": 1, "W_dec": 0, "b_enc": 0}

    def __init__(self, cfg: DictionaryConfig, d_in: int, metadata: dict[str, Any] | None = None,
                 d_out: int | None = None):
        super().__init__()
        self.cfg = cfg  # stored as the DictionaryCfg view (the setter below)
        self.d_in = d_in
        self.d_out = d_in if d_out is None else d_out  # the width of x_hat (a transcoder's output hook)
        if self.d_out != d_in and not cfg.is_transcoder:
            raise ValueError(f"d_out={self.d_out} differs from d_in={d_in}: only a transcoder (input_hook set) "
                             f"maps one width to another")
        self.d_sae = cfg.resolve_d_sae(d_in)
        # the whole dictionary's width when this one holds a shard of its features (sae.sharding)
        self.d_sae_total = self.d_sae
        # Where the dictionary came from (model_name, hook_name, dataset, context_size, ...).
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.empty(d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        # Inputs are multiplied by input_scale before encoding during training; `fold_input_scale`
        # moves it into the weights at save time so saved dictionaries take raw activations.
        self.register_buffer("input_scale", torch.ones(()))
        if cfg.is_transcoder:
            # the output hook's own scale (an autoencoder's output is its input: input_scale), and
            # the encoder's input centre (b_dec is an output-space bias). Centring the input on its
            # median trains far better than leaving it to b_enc (tests/test_transcoders.py: mean
            # max cosine 0.86 against 0.79 on the same data); saved folded into b_enc.
            self.register_buffer("output_scale", torch.ones(()))
            self.register_buffer("b_in", torch.zeros(d_in))
        self.W_skip = nn.Parameter(torch.zeros(d_in, self.d_out)) if cfg.skip_connection else None
        # Runtime feature killing (pruning ablations); not saved: a pruned dictionary is saved
        # as a smaller dictionary by `prune`.
        self.kill_mask: Tensor | None = None  # [d_sae] bool, True = killed
        self.kill_mode: KillMode = "after"
        self.reset_parameters()

    @property
    def cfg(self) -> DictionaryCfg:
        """The SAELens/SAEBench-style view (`cfg.d_in`, `cfg.hook_name`, `cfg.to_dict()`, ...); any
        other name is a hyperparameter (`cfg.k`), and `cfg.hyperparameters` the pydantic Config."""
        return self._cfg

    @cfg.setter
    def cfg(self, hyperparameters: DictionaryConfig) -> None:
        if not isinstance(hyperparameters, DictionaryConfig):
            raise TypeError(f"a dictionary's cfg is set from a DictionaryConfig, not {type(hyperparameters).__name__}")
        self._cfg = DictionaryCfg(self, hyperparameters)

    # ---- initialisation -------------------------------------------------------------------
    def reset_parameters(self, first_feature: int = 0) -> None:
        """Decoder rows random unit vectors, encoder = decoder transpose (Gao et al. 2024); a
        transcoder's encoder columns are random unit vectors of their own (it reads another space);
        W_skip stays zero. A feature shard (sae.sharding) whose first feature is the whole
        dictionary's `first_feature` gets its rows of the whole dictionary's initialisation."""
        rows = (first_feature, first_feature + self.d_sae)
        W_dec = initial_directions(self.cfg.seed, self.d_sae_total, self.d_out, rows)
        W_enc = W_dec if not self.is_transcoder else initial_directions(self.cfg.seed + 1, self.d_sae_total,
                                                                        self.d_in, rows)
        with torch.no_grad():
            self.W_dec.copy_(W_dec * self.init_decoder_norm())
            self.W_enc.copy_((W_enc * self.init_encoder_norm()).T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def init_decoder_norm(self) -> float:
        return 1.0

    def init_encoder_norm(self) -> float:
        """Norm of the encoder columns at init (the decoder rows' transpose, rescaled)."""
        return self.init_decoder_norm()

    def default_lr(self) -> float:
        return 1e-3

    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr is not None else self.default_lr()

    @classmethod
    def default_b_enc_lr_scale(cls, cfg: "DictionaryConfig", d_in: int) -> float:
        return 1.0

    @classmethod
    def b_enc_lr_scale_for(cls, cfg: "DictionaryConfig", d_in: int) -> float:
        """b_enc's learning rate over the weights' (`cfg.b_enc_lr_scale`, else the default)."""
        given = cfg.b_enc_lr_scale
        return given if given is not None else cls.default_b_enc_lr_scale(cfg, d_in)

    @property
    def b_enc_lr_scale(self) -> float:
        return self.b_enc_lr_scale_for(self.cfg.hyperparameters, self.d_in)

    # ---- transcoders and skip connections --------------------------------------------------
    @property
    def is_transcoder(self) -> bool:
        return self.cfg.hyperparameters.is_transcoder

    @property
    def b_pre(self) -> Tensor:
        """[d_in] what the encoder subtracts from its (normalised) input: b_dec for an autoencoder,
        b_in for a transcoder."""
        return self.b_in if self.is_transcoder else self.b_dec

    @property
    def target_scale(self) -> Tensor:
        """The scale of the output's units: output_scale for a transcoder, else input_scale."""
        return self.output_scale if self.is_transcoder else self.input_scale

    def scale_target(self, y: Tensor) -> Tensor:
        """Raw output-hook activations -> normalised units, in the weights' dtype."""
        return y.to(self.W_dec.dtype) * self.target_scale

    def decoder_offset(self, xs: Tensor) -> Tensor:
        """What x_hat adds to f @ W_dec, in normalised units: b_dec [d_out], plus the skip path
        xs @ W_skip [..., d_out] when there is one (xs: the normalised input)."""
        if self.W_skip is None:
            return self.b_dec
        return self.b_dec + xs.to(self.W_skip.dtype) @ self.W_skip

    def training_io(self, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(xs, ys): the encoder's input [B, d_in] and the reconstruction target [B, d_out] of a
        training batch in normalised units; an autoencoder's target is its input (target None)."""
        xs = self.scale_input(x)
        if target is None:
            if self.is_transcoder:
                raise ValueError("a transcoder trains on (input, target) pairs: pass target=")
            return xs, xs
        return xs, self.scale_target(target)

    # ---- forward ---------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae]"""
        return (self.scale_input(x) - self.b_pre) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """[..., d_sae] pre-activations -> [..., d_sae] feature activations (architecture's own)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] -> f [..., d_sae]; killed features are 0."""
        pre = self.pre_acts(x)
        if self.kill_mask is not None and self.kill_mode == "before":
            pre = pre.masked_fill(self.kill_mask, -torch.inf)
            f = self.activation(pre)
            return f.masked_fill(self.kill_mask, 0.0)  # -inf inputs may map to nan/-inf
        f = self.activation(pre)
        if self.kill_mask is not None:
            f = f.masked_fill(self.kill_mask, 0.0)
        return f

    def decode_scaled(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """f [..., d_sae] -> x_hat [..., d_out] in normalised units (what training compares to the
        scaled target); x: the raw input, for the skip path (None: without it)."""
        offset = self.b_dec if x is None else self.decoder_offset(self.scale_input(x))
        return f @ self.W_dec + offset

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """f [..., d_sae] -> x_hat [..., d_out] in raw units (the weights' dtype). A dictionary with
        a skip connection adds x @ W_skip when given its input x (`forward` does)."""
        return self.decode_scaled(f.to(self.W_dec.dtype), x) / self.target_scale

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> x_hat [..., d_out]: the reconstruction, or a transcoder's prediction."""
        return self.decode(self.encode(x), x)

    # ---- training hooks (the trainer calls these) -------------------------------------------
    def scale_input(self, x: Tensor) -> Tensor:
        """Raw activations -> the normalised units the dictionary trains in, in the weights' dtype
        (so a dictionary loaded in bfloat16 takes the model's float32 activations as they are)."""
        return x.to(self.W_enc.dtype) * self.input_scale

    @property
    def unit_norm_decoder(self) -> bool:
        """True: decoder rows are kept at unit norm (gradient projection + renormalisation)."""
        return bool(getattr(self.cfg, "normalize_decoder", False))

    def resample_every_tokens(self) -> int | None:
        """Tokens between dead-feature resamplings (None: never); see `resample`."""
        return None

    def resample_dead_tokens(self) -> int | None:
        """Silence after which a feature counts as dead at a resampling (None: dead_after_tokens)."""
        return None

    def resample_min_frequency(self) -> float | None:
        """Also resample live features that fired on fewer than this fraction of the tokens since
        the last resampling (None: dead features only)."""
        return None

    def training_loss(self, x: Tensor, progress: float, dead_mask: Tensor | None,
                      shards: BatchShards = WHOLE_BATCH, target: Tensor | None = None) -> TrainStep:
        """One step's loss on raw x [batch, d_in], computed in normalised units (x·input_scale).

        progress in [0, 1] is the fraction of training done (for penalty warm-ups);
        dead_mask [d_sae] bool marks features the trainer considers dead (for AuxK), or None;
        x is one of `shards` of the batch (losses built from whole-batch statistics reduce over
        them; per-token means need nothing); target [batch, d_out] is what a transcoder predicts
        (the output hook's activations of the same tokens; None for an autoencoder).
        """
        raise NotImplementedError

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to unit-norm decoder rows (when constrained)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g.sub_((g * W).sum(dim=1, keepdim=True) * W / W.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows to unit norm (when constrained)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def resample(self, x: Tensor, dead_mask: Tensor, generator: torch.Generator | None = None,
                 shards: BatchShards = WHOLE_BATCH, target: Tensor | None = None) -> Tensor:
        """Re-initialise dead features from inputs the dictionary reconstructs badly.

        Towards Monosemanticity / dictionary_learning style: inputs are drawn from the batch `x`
        (raw units) with probability proportional to their squared reconstruction error
        ‖x - x̂‖²; each dead feature gets the direction of one drawn input (centred on b_dec) as
        its decoder row (unit norm) and as its encoder column, scaled to 0.2 × the mean norm of
        the live encoder columns; its encoder bias is set to 0. A transcoder (target: the output
        hook's activations of the same tokens) takes the decoder row from the drawn token's target
        (centred on b_dec) and the encoder column from its input. Returns the ids re-initialised
        (the trainer then resets their optimizer state and their dead-feature counters).
        Feature shards (`shards`, each with the whole batch x) draw the whole dictionary's inputs
        alike and each takes those of its own dead features.
        """
        ids = dead_mask.nonzero().flatten()
        dead_per_shard = shards.feature_gather(ids.new_tensor([ids.numel()])).tolist()
        if sum(dead_per_shard) == 0:
            return ids
        xs, ys = self.training_io(x.to(self.W_enc.dtype), target)
        x_hat = shards.feature_sum(self.encode(x) @ self.W_dec) + self.decoder_offset(xs)  # decode_scaled
        err = (x_hat - ys).pow(2).sum(dim=1)
        if not torch.isfinite(err).all() or err.sum() <= 0:
            err = torch.ones_like(err)
        gen_device = generator.device if generator is not None else err.device
        picks = torch.multinomial(err.to(gen_device), sum(dead_per_shard), replacement=True,
                                  generator=generator).to(err.device)
        first = sum(dead_per_shard[:shards.feature_lo // self.d_sae])  # dead features of the shards before
        picks = picks[first:first + ids.numel()]
        live = ~dead_mask  # the norms are collectives: every shard takes part, dead features or none
        enc_norm = _mean_of_shards(self.W_enc[:, live].norm(dim=0), shards, self.W_enc.new_tensor(1.0))
        dec_norm = _mean_of_shards(self.W_dec[live].norm(dim=1), shards, 1.0) if not self.unit_norm_decoder else 1.0
        if ids.numel() == 0:
            return ids
        v_out = _unit_rows(ys[picks] - self.b_dec)
        v_in = v_out if not self.is_transcoder else _unit_rows(xs[picks] - self.b_pre)
        self.W_dec[ids] = v_out * dec_norm
        self.W_enc[:, ids] = (v_in * (0.2 * enc_norm)).T
        self.b_enc[ids] = 0.0
        self._resample_extra(ids)
        return ids

    def _resample_extra(self, ids: Tensor) -> None:
        """Architectures with more per-feature parameters re-initialise them here."""

    # ---- killing and pruning -------------------------------------------------------------
    def set_killed(self, kill_mask: Tensor | None, mode: KillMode = "after") -> None:
        """Kill features at run time (no copy). mode only matters for TopK-style selection."""
        if kill_mask is not None:
            kill_mask = kill_mask.to(device=self.W_enc.device, dtype=torch.bool)
            if kill_mask.shape != (self.d_sae,):
                raise ValueError(f"kill_mask must have shape [{self.d_sae}], got {list(kill_mask.shape)}")
        self.kill_mask = kill_mask
        self.kill_mode = mode

    @torch.no_grad()
    def pruned(self, keep_ids: Tensor, mode: KillMode = "after") -> "SparseDictionary":
        """A new, smaller dictionary with only the features `keep_ids` (in that order).

        It encodes exactly like this dictionary with every other feature killed in `mode`:
        `pruned(keep).encode(x) == (self with kill_mask = not keep).encode(x)[..., keep]`.
        For element-wise activations both modes are the same and the killed features are simply
        dropped; TopK overrides this for mode "after" (the killed features keep competing for the
        top-k slots through a shadow encoder). `metadata["pruning"]` records the original width,
        the killed original feature ids and the mode (pruning code may add its threshold).
        """
        keep_ids = torch.as_tensor(keep_ids, dtype=torch.long).flatten().to(self.W_enc.device)
        if keep_ids.numel() and (keep_ids.min() < 0 or keep_ids.max() >= self.d_sae):
            raise ValueError(f"keep_ids must lie in [0, {self.d_sae})")
        if keep_ids.unique().numel() != keep_ids.numel():
            raise ValueError("keep_ids has duplicates")
        tensors = self._pruned_tensors(keep_ids, mode)
        killed = torch.ones(self.d_sae, dtype=torch.bool, device=keep_ids.device)
        killed[keep_ids] = False
        metadata = dict(self.metadata)
        metadata["pruning"] = {**dict(self.metadata.get("pruning", {})),
                               "original_d_sae": self.d_sae,
                               "killed_feature_ids": killed.nonzero().flatten().tolist(),
                               "kept_feature_ids": keep_ids.tolist(),
                               "kill_mode": mode}
        new = type(self)(self._pruned_config(keep_ids), self.d_in, metadata=metadata, d_out=self.d_out)
        new.prepare_for_weights(tensors)
        new.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        new.load_weights(tensors)
        new.input_scale.copy_(self.input_scale)
        new.target_scale.copy_(self.target_scale)
        if self.is_transcoder:
            new.b_in.copy_(self.b_in)
        new.train(self.training)
        return new

    def _pruned_config(self, keep_ids: Tensor) -> DictionaryConfig:
        """The hyperparameters of the dictionary keeping only `keep_ids` (Matryoshka also shrinks
        its groups)."""
        return self.cfg.hyperparameters.model_copy(update={"d_sae": int(keep_ids.numel()), "expansion_factor": None})

    def _pruned_tensors(self, keep_ids: Tensor, mode: KillMode) -> dict[str, Tensor]:
        """weights() with every feature-indexed tensor sliced to keep_ids."""
        out = {}
        for name, t in self.weights().items():
            dim = self.feature_dims.get(name)
            out[name] = t.detach().index_select(dim, keep_ids).clone() if dim is not None else t.detach().clone()
        return out

    # ---- normalisation folding -------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Make the dictionary take raw activations with identical outputs.

        Trained on s·x:  f = act((s·x - b) W_enc + b_enc) = act((x - b/s)(s·W_enc) + b_enc)
        and x_hat = (f W_dec + b) / s = f (W_dec / s) + b / s. A transcoder's output has its own
        scale t (and its encoder no centring): x_hat = (f W_dec + b + s·x W_skip) / t
        = f (W_dec / t) + b / t + x (W_skip · s / t).
        """
        if self.is_transcoder:
            self._fold_input_centre()
        s, t = float(self.input_scale), float(self.target_scale)
        if s == 1.0 and t == 1.0:
            return
        self.W_enc.mul_(s)
        self.W_dec.div_(t)
        self.b_dec.div_(t)
        if self.W_skip is not None:
            self.W_skip.mul_(s / t)
        self._fold_extra(s)
        self.input_scale.fill_(1.0)
        self.target_scale.fill_(1.0)

    def _fold_extra(self, scale: float) -> None:
        """Architectures with more input-space tensors fold them here."""

    def _fold_input_centre(self) -> None:
        """A transcoder's (x - b_in) W + b = x W + (b - b_in W): b_in moves into the encoder biases."""
        centre = self.b_in.clone()
        if bool((centre == 0).all()):
            return
        self.b_enc.sub_(centre @ self.W_enc)
        self._fold_centre_extra(centre)
        self.b_in.zero_()

    def _fold_centre_extra(self, centre: Tensor) -> None:
        """Architectures with more encoder biases fold a transcoder's input centre into them here."""

    def _in_raw_units(self) -> bool:
        centred = self.is_transcoder and bool((self.b_in != 0).any())
        return float(self.input_scale) == 1.0 and float(self.target_scale) == 1.0 and not centred

    def in_raw_units(self) -> "SparseDictionary":
        """This dictionary, or a copy with its input scale folded in when it has one: what is saved
        and exported (takes raw activations)."""
        if self._in_raw_units():
            return self
        folded = copy.deepcopy(self)
        folded.fold_input_scale()
        return folded

    # ---- saving ----------------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        """The tensors written to sae.safetensors (architectures add e.g. `threshold`)."""
        w = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.W_skip is not None:
            w["W_skip"] = self.W_skip
        return w

    def cfg_dict(self) -> dict[str, Any]:
        out = {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": dtype_name(self.W_enc.dtype),
            **self.metadata,
            "hyperparameters": self.cfg.hyperparameters.model_dump(mode="json"),
        }
        if self.is_transcoder:  # an autoencoder's cfg.json stays as it was
            out["d_out"] = self.d_out
        return out

    def save(self, directory: str | Path) -> Path:
        """Write sae.safetensors + cfg.json (atomically), in raw-activation units."""
        from sae.formats import feature_shards  # (here: sae.formats imports this module)

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        feature_shards.remove_shards(directory)  # an earlier save as feature shards would be read first
        folded = self.in_raw_units()
        io.save_tensors(directory / WEIGHTS_FILE, folded.weights())
        io.write_json(directory / CFG_FILE, folded.cfg_dict())
        return directory

    def prepare_for_weights(self, tensors: dict[str, Tensor]) -> None:
        """Create optional tensors a saved file carries (e.g. a pruned TopK's shadow encoder)
        before `load_weights` copies into them."""

    def load_weights(self, tensors: dict[str, Tensor]) -> None:
        expected = set(self.weights())
        missing, extra = expected - set(tensors), set(tensors) - expected
        if missing or extra:
            raise ValueError(f"weights do not match a {self.architecture} dictionary: "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        with torch.no_grad():
            for name, param in self.weights().items():
                if param.shape != tensors[name].shape:
                    raise ValueError(f"{name}: expected shape {list(param.shape)}, got {list(tensors[name].shape)}")
                param.copy_(tensors[name])

    # ---- interop (sae.load, SAEBench's custom-SAE interface) ---------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (SAEBench reads `sae.dtype`)."""
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        """device of the weights (SAEBench reads `sae.device`)."""
        return self.W_enc.device

    def max_active(self) -> int | None:
        """The most features any token can activate, when the architecture fixes it (TopK: k)."""
        return None

    def encode_sparse(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """x [..., d_in] -> (values [..., k], indices [..., k]) of the k largest feature
        activations, largest first. k defaults to `max_active()` or, when the architecture fixes
        none, to the largest number of active features of any row of this x; rows with fewer
        active features are padded with value 0 (their padding indices mean nothing)."""
        f = self.encode(x)
        if k is None:
            k = self.max_active()
        if k is None:
            k = int((f != 0).sum(dim=-1).max()) if f.numel() else 0
        k = max(0, min(int(k), self.d_sae))
        return f.topk(k, dim=-1, sorted=True)

    def extra_repr(self) -> str:
        out = f", d_out={self.d_out}, input_hook={self.cfg.input_hook}" if self.is_transcoder else ""
        skip = ", skip_connection=True" if self.W_skip is not None else ""
        return f"architecture={self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{out}{skip}"


def _unit_rows(v: Tensor) -> Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _mean_of_shards(values: Tensor, shards: BatchShards, empty: Any) -> Any:
    """The mean of the whole dictionary's values, given this feature shard's [n] (`empty` when
    there are none)."""
    if shards.feature_count == 1:
        return values.mean() if values.numel() else empty
    total = shards.feature_sum(torch.stack([values.sum(), values.new_tensor(float(values.numel()))]))
    return total[0] / total[1] if total[1] > 0 else empty


def initial_directions(seed: int, d_sae: int, d_in: int, rows: tuple[int, int] | None = None) -> Tensor:
    """[hi - lo, d_in] rows lo..hi (default all) of the random unit decoder directions of a
    dictionary of width d_sae: the same numbers whichever rows are asked for, drawn in blocks of
    a multiple of 16 values (torch's CPU normal sampler then draws them alike) so that a feature
    shard never holds the whole matrix."""
    lo, hi = rows if rows is not None else (0, d_sae)
    g = torch.Generator().manual_seed(seed)
    block = 16 * 4096  # rows per draw: 16·4096·d_in values, a multiple of 16
    parts = []
    for start in range(0, hi, block):
        drawn = torch.randn(min(block, d_sae - start), d_in, generator=g)
        parts.append(drawn[max(lo - start, 0):max(hi - start, 0)])
    W = torch.cat(parts) if parts else torch.empty(0, d_in)
    return W / W.norm(dim=1, keepdim=True)


def geometric_median(x: Tensor, iterations: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; x [n, d] -> [d]."""
    median = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, median.norm().item()):
            return new
        median = new
    return median


MAX_DEFAULT_LR = 2e-2  # the largest lr the defaults were measured at (d_sae 256-4096)


def width_scaled_lr(lr_at_16k: float, d_sae: int) -> float:
    """A default lr that falls as 1/√d_sae: lr_at_16k at 16,384 features (Gao et al.'s law),
    capped at MAX_DEFAULT_LR for tiny dictionaries, where the law would give 0.1 and more."""
    return min(lr_at_16k / math.sqrt(d_sae / 16384), MAX_DEFAULT_LR)


def unit_norm_scale(x: Tensor) -> float:
    """The s with E‖s·x‖² = d_in, from a sample x [n, d_in]."""
    return math.sqrt(x.shape[1] / x.float().pow(2).sum(dim=1).mean().item())
