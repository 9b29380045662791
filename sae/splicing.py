"""`sae.splice`: dictionaries spliced into a `TransformerBridge` at their hook points (x -> x̂),
and `sae.feature_activations`: every token's features for some text in one call.

With `keep_error=True` the hook returns x.detach() + (x̂ − x̂.detach()): exactly x in value (the
outputs are the clean model's, bit for bit) while gradients flow through the features. By default
(`mask="auto"`) the positions whose token the dictionary's training excluded (its cfg.json
`dataset.exclude_tokens`, else `DataConfig`'s default) keep their activation, as in the
evaluator, so a spliced forward's CE is its `ce_sae`; the token ids are read by a pre-hook on the
model's embedding. Features are recorded at every position either way.

A transcoder (input_hook set) replaces its output hook (hook_name) with its prediction from the
activation at its input hook in the same forward (recorded by a hook there, which must fire
first); `feature_activations` gives its features of the input hook.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from sae.errors import HookError, UserError
from sae.models import check_hooks, model_device, stop_layer
from sae.text import DataConfig, keep_mask


def _name_of(d, i: int, n: int) -> str:
    cfg = getattr(d, "cfg", None)
    name = getattr(cfg, "name", None) if cfg is not None else None
    if name:
        return str(name)
    imported = d.metadata.get("imported_from") if hasattr(d, "metadata") else None
    if imported:
        return Path(imported).name
    return "dictionary" if n == 1 else f"dictionary_{i}"


def as_named(dictionaries) -> dict[str, Any]:
    """A dictionary, a sequence of them or {name: dictionary} -> {name: dictionary}."""
    if isinstance(dictionaries, Mapping):
        return dict(dictionaries)
    if isinstance(dictionaries, torch.nn.Module):
        return {_name_of(dictionaries, 0, 1): dictionaries}
    if isinstance(dictionaries, Sequence):
        out: dict[str, Any] = {}
        for i, d in enumerate(dictionaries):
            name = _name_of(d, i, len(dictionaries))
            if name in out:
                name = f"{name}_{i}"
            out[name] = d
        return out
    raise TypeError("dictionaries: a dictionary module, a list of them or {name: dictionary}")


def hook_of(d, override: str | None = None) -> str:
    hook = override or d.cfg.hook_name  # the metadata's, else the one the dictionary was configured with
    if not hook:
        raise UserError("the dictionary records no hook_name (metadata); pass hook_names={name: 'blocks.N.hook_...'}")
    return hook


def excluded_tokens_of(d) -> list[str]:
    """The `exclude_tokens` of the data config a dictionary records (cfg.json `dataset`), read as
    the evaluator reads it (eval.folders.data_config_for): a recorded list wins, otherwise
    `sae.text.DataConfig`'s default (["bos", "pad"])."""
    dataset = d.metadata.get("dataset") if hasattr(d, "metadata") else None
    if isinstance(dataset, Mapping) and dataset.get("exclude_tokens") is not None:
        exclude = dataset["exclude_tokens"]
        if not isinstance(exclude, (list, tuple)) or not all(isinstance(t, str) for t in exclude):
            raise UserError(f"the dictionary's recorded dataset.exclude_tokens {exclude!r} is not a list of "
                            f"token names; pass splice(..., mask=...) explicitly")
        return list(exclude)
    return list(DataConfig.model_fields["exclude_tokens"].get_default(call_default_factory=True))


class _ForwardTokens:
    """The token ids of the forward in progress (a pre-hook on the model's embedding), and the
    keep mask of each exclusion list for them (sae.text.keep_mask), computed once per forward."""

    def __init__(self, model):
        self.model = model
        self.tokens: Tensor | None = None
        self._masks: dict[tuple[str, ...], Tensor] = {}
        embed = getattr(model, "embed", None)
        if not isinstance(embed, torch.nn.Module):
            raise UserError("splice: the model has no `embed` module, so the excluded tokens (BOS, ...) cannot be "
                            "found; pass mask=[batch, pos] bool or mask='all'")
        self._handle = embed.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs) -> None:
        t = args[0] if args else kwargs.get("input_ids", kwargs.get("tokens", kwargs.get("input")))
        self.tokens = t if isinstance(t, Tensor) and not t.is_floating_point() else None
        self._masks = {}

    def keep(self, exclude: list[str], shape: torch.Size, hook_name: str) -> Tensor:
        tokens = self.tokens
        if tokens is None or tokens.dim() != 2 or tuple(tokens.shape) != tuple(shape):
            raise UserError(f"splice could not see the token ids of this forward at {hook_name} (activations "
                            f"{list(shape)} [batch, pos]), needed to keep excluded tokens {exclude} unspliced; "
                            f"pass mask=[batch, pos] bool or mask='all'")
        key = tuple(exclude)
        if key not in self._masks:
            tokenizer = getattr(self.model, "tokenizer", None)
            if tokenizer is None:
                raise UserError(f"the model has no tokenizer to find the excluded tokens {exclude}; "
                                f"pass mask=[batch, pos] bool or mask='all'")
            self._masks[key] = keep_mask(tokens, tokenizer, exclude)
        return self._masks[key]

    def remove(self) -> None:
        self._handle.remove()


def _only_features(features: Mapping[str, Tensor]) -> Tensor:
    if len(features) != 1:
        raise ValueError(f"{len(features)} dictionaries; use .features[name]")
    return next(iter(features.values()))


@dataclass
class Splice:
    """What `splice` yields: the hooked dictionaries and, after each forward, their features."""

    dictionaries: dict[str, Any]
    hook_names: dict[str, str]
    keep_error: bool
    features: dict[str, Tensor] = field(default_factory=dict)  # name -> f [batch, pos, d_sae], last forward
    errors: dict[str, Tensor] = field(default_factory=dict)  # name -> x − x̂ (only with record_errors)
    excluded_tokens: dict[str, list[str]] = field(default_factory=dict)  # name -> left unspliced (mask="auto")

    @property
    def f(self) -> Tensor:
        """The features of the only dictionary."""
        return _only_features(self.features)


@dataclass(eq=False)  # hashable by identity, like the function a hook usually is
class _SpliceHook:
    """One dictionary's forward hook: x -> x̂ (or x with the error kept) where the mask allows,
    recording its features (and errors) in `state`."""

    state: Splice
    name: str
    dictionary: Any
    keep_error: bool
    features_require_grad: bool
    record_errors: bool
    mask: Tensor | None = None  # [batch, pos] bool: splice only there (None: everywhere)
    forward_tokens: _ForwardTokens | None = None  # with `exclude`: the mask comes from each forward's tokens
    exclude: list[str] | None = None
    inputs: "_InputRecorder | None" = None  # a transcoder's input-hook activation of this forward

    def __call__(self, x: Tensor, hook) -> Tensor:
        mask = self._mask(x, hook.name)
        x_hat = self._reconstruct(x)
        out = x.detach() + (x_hat - x_hat.detach()) if self.keep_error else x_hat  # keep_error: value exactly x
        if mask is None:
            return out
        return torch.where(mask.to(x.device)[(...,) + (None,) * (x.dim() - 2)], out, x)

    def _mask(self, x: Tensor, hook_name: str) -> Tensor | None:
        mask = self.mask
        if self.exclude is not None and self.forward_tokens is not None:
            mask = self.forward_tokens.keep(self.exclude, x.shape[:2], hook_name)
        if mask is not None and mask.shape != x.shape[:2]:
            raise UserError(f"splice mask has shape {list(mask.shape)} but the activations at {hook_name} "
                            f"are {list(x.shape[:2])} [batch, pos]")
        return mask

    def _reconstruct(self, x: Tensor) -> Tensor:
        """x̂ in x's device and dtype, computed in the dictionary's."""
        d = self.dictionary
        xd = x.to(device=d.W_enc.device, dtype=d.W_enc.dtype)
        x_in = xd if self.inputs is None else self.inputs.take(self.name).to(device=d.W_enc.device,
                                                                             dtype=d.W_enc.dtype)
        f = d.encode(x_in)
        if self.features_require_grad:
            f = f.detach().requires_grad_(True)
        x_hat = d.decode(f, x_in) if getattr(d, "W_skip", None) is not None else d.decode(f)
        self.state.features[self.name] = f
        if self.record_errors:
            self.state.errors[self.name] = (xd - x_hat).detach()
        return x_hat.to(device=x.device, dtype=x.dtype)


@dataclass(eq=False)
class _InputRecorder:
    """A forward hook at a transcoder's input hook: keeps the activation for its splice hook."""

    hook_name: str
    x: Tensor | None = None

    def __call__(self, x: Tensor, hook) -> Tensor:
        self.x = x
        return x

    def take(self, name: str) -> Tensor:
        x, self.x = self.x, None
        if x is None:
            raise UserError(f"transcoder {name!r}: its input hook {self.hook_name} did not run before its output "
                            f"hook in this forward; a transcoder must read a hook that comes before the one it writes")
        return x


def _input_recorders(model, named: dict[str, Any]) -> dict[str, _InputRecorder]:
    """{name: recorder} for the transcoders among the dictionaries (HookError for a missing hook)."""
    inputs = {name: d.cfg.input_hook for name, d in named.items() if getattr(d, "is_transcoder", False)}
    missing = sorted(set(inputs.values()) - set(getattr(model, "hook_dict", {}) or {}))
    if missing:
        check_hooks(model, missing)
    return {name: _InputRecorder(hook) for name, hook in inputs.items()}


def _hook_points(model, named: dict[str, Any], hook_names: Mapping[str, str] | str | None) -> dict[str, str]:
    """{name: hook point} from `hook_names` or each dictionary's own; a HookError for a hook the
    model does not have."""
    if isinstance(hook_names, str):
        if len(named) != 1:
            raise UserError("hook_names as one string needs exactly one dictionary; give {name: hook}")
        hook_names = {next(iter(named)): hook_names}
    hooks = {name: hook_of(d, (hook_names or {}).get(name)) for name, d in named.items()}
    missing = sorted(set(hooks.values()) - set(getattr(model, "hook_dict", {}) or {}))
    if missing:
        check_hooks(model, missing)  # raises a HookError with suggestions
        raise HookError(f"model has no hook {missing[0]!r}")
    return hooks


def _positions(model, named: dict[str, Any], mask: Tensor | str | None,
               keep_error: bool) -> tuple[Tensor | None, dict[str, list[str]], _ForwardTokens | None]:
    """splice's `mask` -> (a fixed [batch, pos] mask or None, {name: excluded tokens}, the token
    reader those exclusions need, or None)."""
    if isinstance(mask, Tensor) or mask is None:
        return mask, {}, None
    if mask not in ("auto", "all"):
        raise UserError(f"splice mask={mask!r}: use 'auto' (keep excluded tokens such as BOS unspliced), "
                        f"'all', or a [batch, pos] bool tensor")
    if mask == "all" or keep_error:  # with keep_error every output is the clean model's anyway
        return None, {}, None
    excluded = {name: excluded_tokens_of(d) for name, d in named.items()}
    return None, excluded, (_ForwardTokens(model) if any(excluded.values()) else None)


@contextlib.contextmanager
def splice(model, dictionaries, *, keep_error: bool = False, hook_names: Mapping[str, str] | str | None = None,
           mask: Tensor | str | None = "auto", features_require_grad: bool = False,
           record_errors: bool = False) -> Iterator[Splice]:
    """Put dictionaries into `model` at their hook points for the duration of the `with`.

    dictionaries: a dictionary, a list of them, or {name: dictionary}.
    keep_error: add the reconstruction error back (outputs equal the clean model's; features exposed).
    hook_names: {name: hook} (or one hook for a single dictionary) instead of metadata["hook_name"].
    mask: which positions are spliced; the others keep their original activation.
      "auto" (default): as the evaluator does, every position except those whose token the
        dictionary's data config excluded (its cfg.json `dataset.exclude_tokens`, e.g. BOS and
        padding; ["bos", "pad"] when none is recorded). A spliced forward then gives the
        evaluator's ce_sae. The token ids are read from the model's embedding input. With
        keep_error=True, whose outputs are the clean model's at every position anyway, "auto"
        splices every position, so that every feature (BOS's too) gets its gradient.
      "all" or None: every position, BOS and padding included.
      a [batch, pos] bool tensor: only where True.
    features_require_grad: each f is a leaf requiring grad (for attribution: f.grad after backward).
    record_errors: also keep x − x̂ per dictionary in `.errors`.
    Yields a `Splice` whose `.features` holds each dictionary's f of the latest forward, and whose
    `.excluded_tokens` names the tokens each dictionary leaves unspliced ({} when none are).
    """
    named = as_named(dictionaries)
    hooks = _hook_points(model, named, hook_names)
    if mask is not None and not isinstance(mask, (str, Tensor)):
        raise UserError("splice mask: 'auto', 'all', None or a [batch, pos] bool tensor")
    fixed_mask, excluded, forward_tokens = _positions(model, named, mask, keep_error)
    state = Splice(named, hooks, keep_error, excluded_tokens=excluded)
    inputs = _input_recorders(model, named)
    fwd = [(r.hook_name, r) for r in inputs.values()]  # before the splice hooks of the same hook point
    fwd += [(hooks[name], _SpliceHook(state, name, d, keep_error, features_require_grad, record_errors, fixed_mask,
                                      forward_tokens, excluded.get(name) or None, inputs.get(name)))
            for name, d in named.items()]
    try:
        with model.hooks(fwd_hooks=fwd):
            yield state
    finally:
        if forward_tokens is not None:
            forward_tokens.remove()


@dataclass
class FeatureActivations:
    """Feature activations for every token of some text (`feature_activations`)."""

    features: dict[str, Tensor]  # name -> f [batch, pos, d_sae]
    tokens: Tensor  # [batch, pos]
    str_tokens: list[list[str]]  # [batch][pos]
    hook_names: dict[str, str]
    logits: Tensor | None = None  # [batch, pos, vocab] when asked for

    @property
    def f(self) -> Tensor:
        """The features of the only dictionary."""
        return _only_features(self.features)

    def __getitem__(self, name: str) -> Tensor:
        return self.features[name]

    def top_features(self, position: int, n: int = 10, name: str | None = None,
                     batch: int = 0) -> list[tuple[int, float]]:
        """[(feature id, activation)] of the n most active features at one token."""
        f = self.features[name] if name is not None else self.f
        vals, idx = f[batch, position].float().topk(min(n, f.shape[-1]))
        return [(int(i), float(v)) for v, i in zip(vals, idx) if v > 0]


@torch.no_grad()
def feature_activations(model, dictionaries, text: str | list[str] | Tensor, *, prepend_bos: bool = True,
                        keep_error: bool = True, hook_names: Mapping[str, str] | str | None = None,
                        return_logits: bool = False, device: str | torch.device | None = "cpu") -> FeatureActivations:
    """Run the model on `text` (a string, a list of strings, or token ids [batch, pos]) with the
    dictionaries spliced in and return every token's feature activations.

    keep_error=True (default) measures the features of the clean model's activations (later
    dictionaries see the clean stream); keep_error=False runs the model on the reconstructions
    (except at the tokens each dictionary's data config excluded, as in `splice`). Features are
    returned for every token, BOS included.
    device: where the returned tensors go (None: leave them where they were computed).
    """
    if isinstance(text, Tensor):
        tokens = text if text.dim() == 2 else text[None]
    else:
        tokens = model.to_tokens(text, prepend_bos=prepend_bos)
    tokens = tokens.to(model_device(model))
    with splice(model, dictionaries, keep_error=keep_error, hook_names=hook_names) as s:
        if return_logits:
            logits = model(tokens, return_type="logits")
        else:  # stop after the last hooked block: nothing later is needed
            logits = model(tokens, return_type=None, stop_at_layer=stop_layer(list(s.hook_names.values())))
    str_tokens = [[model.tokenizer.decode([int(t)]) for t in row] for row in tokens.tolist()]

    def move(t: Tensor) -> Tensor:
        return t.detach().to(device) if device is not None else t.detach()

    return FeatureActivations(features={k: move(v) for k, v in s.features.items()}, tokens=move(tokens),
                              str_tokens=str_tokens, hook_names=dict(s.hook_names),
                              logits=move(logits) if return_logits else None)
