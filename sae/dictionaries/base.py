"""What every sparse dictionary is: the shared config, weights, encode/decode, saving.

A dictionary maps an activation `x [..., d_in]` to feature activations
`f = activation(pre_acts(x)) [..., d_sae]` and back to `x_hat = f @ W_dec + b_dec`.
Architectures differ only in `activation` (ReLU, TopK, JumpReLU, ...), in their training
loss and in what they do after an optimiser step; each one is a subclass in its own file,
registered under its `architecture` string (see `registry.py`).

Weights follow the SAELens layout so that export is a rename: `W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from sae import io

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
    d_sae: int | None = None  # give d_sae or expansion_factor (d_sae = factor * d_in)
    expansion_factor: float | None = None

    lr: float | None = None  # None: the architecture's default (`default_lr`)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_fraction: float = 0.0  # linear warm-up over this fraction of the steps
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last fraction of the steps
    grad_clip: float | None = 1.0
    seed: int = 0
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    normalize_activations: bool = True  # scale inputs so E‖x‖² = d_in; folded back at save
    dead_after_tokens: int = 1_000_000  # a feature silent this long counts as dead

    @model_validator(mode="after")
    def _check_width(self) -> "DictionaryConfig":
        if self.d_sae is not None and self.expansion_factor is not None:
            raise ValueError("give either d_sae or expansion_factor, not both")
        if self.d_sae is None and self.expansion_factor is None:
            raise ValueError("give d_sae or expansion_factor")
        for key in ("lr_warmup_fraction", "lr_decay_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1]")
        return self

    def resolve_d_sae(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else int(round(self.expansion_factor * d_in))


@dataclass
class TrainStep:
    """What `training_loss` returns: the loss to minimise and what the trainer logs/tracks."""

    loss: Tensor  # scalar
    x_hat: Tensor  # [batch, d_in]
    f: Tensor  # [batch, d_sae], the activations used for L0 and dead-feature tracking
    metrics: dict[str, Tensor] = field(default_factory=dict)  # scalars, e.g. {"mse":..., "l1":...}


class SparseDictionary(nn.Module):
    architecture: ClassVar[str]
    Config: ClassVar[type[DictionaryConfig]] = DictionaryConfig

    def __init__(self, cfg: DictionaryConfig, d_in: int, metadata: dict[str, Any] | None = None):
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.d_sae = cfg.resolve_d_sae(d_in)
        # Where the dictionary came from (model_name, hook_name, dataset, context_size, ...).
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.empty(d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # Inputs are multiplied by input_scale before encoding during training; `fold_input_scale`
        # moves it into the weights at save time so saved dictionaries take raw activations.
        self.register_buffer("input_scale", torch.ones(()))
        # Runtime feature killing (pruning ablations); not saved: a pruned dictionary is saved
        # as a smaller dictionary by `prune`.
        self.kill_mask: Tensor | None = None  # [d_sae] bool, True = killed
        self.kill_mode: KillMode = "after"
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Decoder rows random unit vectors, encoder = decoder transpose (Gao et al. 2024)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        W_dec = torch.randn(self.d_sae, self.d_in, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        with torch.no_grad():
            self.W_dec.copy_(W_dec * self.init_decoder_norm())
            self.W_enc.copy_(W_dec.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def init_decoder_norm(self) -> float:
        return 1.0

    def default_lr(self) -> float:
        return 1e-3

    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr is not None else self.default_lr()

    # ---- forward ---------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae]"""
        x = x * self.input_scale
        return (x - self.b_dec) @ self.W_enc + self.b_enc

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

    def decode_scaled(self, f: Tensor) -> Tensor:
        """f [..., d_sae] -> x_hat [..., d_in] in normalised units (what training compares to x·s)."""
        return f @ self.W_dec + self.b_dec

    def decode(self, f: Tensor) -> Tensor:
        """f [..., d_sae] -> x_hat [..., d_in] in the units of the raw input."""
        return self.decode_scaled(f) / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ---- training hooks (the trainer calls these) -------------------------------------------
    def training_loss(self, x: Tensor, progress: float, dead_mask: Tensor | None) -> TrainStep:
        """One step's loss on raw x [batch, d_in], computed in normalised units (x·input_scale).

        progress in [0, 1] is the fraction of training done (for penalty warm-ups);
        dead_mask [d_sae] bool marks features the trainer considers dead (for AuxK), or None.
        """
        raise NotImplementedError

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """E.g. remove the gradient component parallel to unit-norm decoder rows."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """E.g. renormalise decoder rows."""

    # ---- killing and pruning -------------------------------------------------------------
    def set_killed(self, kill_mask: Tensor | None, mode: KillMode = "after") -> None:
        """Kill features at run time (no copy). mode only matters for TopK-style selection."""
        if kill_mask is not None:
            kill_mask = kill_mask.to(device=self.W_enc.device, dtype=torch.bool)
            if kill_mask.shape != (self.d_sae,):
                raise ValueError(f"kill_mask must have shape [{self.d_sae}], got {list(kill_mask.shape)}")
        self.kill_mask = kill_mask
        self.kill_mode = mode

    # ---- normalisation folding -------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Make the dictionary take raw activations with identical outputs.

        Trained on s·x:  f = act((s·x - b) W_enc + b_enc) = act((x - b/s)(s·W_enc) + b_enc)
        and x_hat = (f W_dec + b) / s = f (W_dec / s) + b / s.
        """
        s = float(self.input_scale)
        if s == 1.0:
            return
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self._fold_extra(s)
        self.input_scale.fill_(1.0)

    def _fold_extra(self, scale: float) -> None:
        """Architectures with more input-space tensors fold them here."""

    # ---- saving ----------------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        """The tensors written to sae.safetensors (architectures add e.g. `threshold`)."""
        return {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}

    def cfg_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            **self.metadata,
            "hyperparameters": self.cfg.model_dump(mode="json"),
        }

    def save(self, directory: str | Path) -> Path:
        """Write sae.safetensors + cfg.json (atomically), in raw-activation units."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        folded = self
        if float(self.input_scale) != 1.0:
            import copy

            folded = copy.deepcopy(self)
            folded.fold_input_scale()
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

    def extra_repr(self) -> str:
        return f"architecture={self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}"


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


def unit_norm_scale(x: Tensor) -> float:
    """The s with E‖s·x‖² = d_in, from a sample x [n, d_in]."""
    return math.sqrt(x.shape[1] / x.float().pow(2).sum(dim=1).mean().item())
