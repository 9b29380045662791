"""Running a TransformerBridge from one of its hook points onward, from what a clean forward
captured there: the rest of the hooked block, the later blocks, the final norm and the unembedding.

Every run that only changes the activation at a hook computes the same layers before it as the
clean run, so only the layers after it need to run again. TL 4.3's `start_at_layer` still runs the
blocks before its start and starts at block boundaries only, hence this module.

Where the hook sits in its block (a sequential pre-norm block: h_mid = h_pre + attn(ln1(h_pre)),
h_post = h_mid + mlp(ln2(h_mid)), as in Llama, Mistral, Qwen2, GPT-2) decides what finishing the
block takes; the position is found by the identity of the hook point, so aliases need no table:

    position    hook point (alias)                     the rest of block L from v, the activation there
    resid_pre   hook_in (hook_resid_pre)               all of block L from h_pre = v
    attn_out    attn.hook_out (hook_attn_out)          h_mid = h_pre + v; h_mid + mlp(ln2(h_mid))
    ln2_in      ln2.hook_in (hook_resid_mid)           h_mid + mlp(ln2(v)): TL 4.3 aliases
                                                       hook_resid_mid to ln2's input, so the residual
                                                       keeps the clean h_mid
    mlp_in      ln2.hook_out, mlp.hook_in              h_mid + mlp(v)
    mlp_out     mlp.hook_out (hook_mlp_out)            h_mid + v
    resid_post  hook_out (hook_resid_post)             nothing

Each later block is called with the arguments the clean forward passed it (attention mask, rotary
cos/sin, position ids), its KV cache dropped. Any other hook (attention or norm internals,
embeddings, the inside of a parallel, post-norm or scaled-residual block) raises CannotContinue,
and so does `verify` when continuing from the clean activation does not give the clean logits
(a model whose forward does more than its components, e.g. logit soft-capping).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from sae.models import hook_layer

# position -> the block's hook points there (paths inside the block)
_HOOK_POINTS = {"resid_pre": ["hook_in"], "attn_out": ["attn.hook_out"], "ln2_in": ["ln2.hook_in"],
                "mlp_in": ["ln2.hook_out", "mlp.hook_in"], "mlp_out": ["mlp.hook_out"], "resid_post": ["hook_out"]}
POSITIONS = tuple(_HOOK_POINTS)
_INSIDE = {"attn_out", "ln2_in", "mlp_in", "mlp_out"}  # positions that need the block's structure
# position -> the hook point whose output is the residual the rest of the block adds to
_RESIDUAL_AT = {"attn_out": "hook_in", "ln2_in": "ln2.hook_in", "mlp_in": "ln2.hook_in", "mlp_out": "ln2.hook_in"}
_PRIMITIVES = (bool, int, float, str, type(None))


class CannotContinue(Exception):
    """This hook (or this model) cannot be continued from; run full forwards instead."""


@dataclass(frozen=True)
class HookSite:
    hook_name: str
    layer: int
    position: str  # one of POSITIONS

    @property
    def first_block(self) -> int:
        """The first block run whole after the hook."""
        return self.layer if self.position == "resid_pre" else self.layer + 1


@dataclass
class Captured:
    """What a clean forward of b contexts leaves for continuing from one hook."""

    activation: Tensor  # [b, pos, d] at the hook
    residual: Tensor | None  # [b, pos, d] what the rest of the block adds to (h_pre or h_mid); None at block edges
    block_args: list[tuple[tuple, dict]]  # per block from site.first_block: (args after hidden_states, kwargs)


# ---- where a hook sits -------------------------------------------------------------------------

def _submodule(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def locate(model, hook_name: str) -> HookSite:
    """The hook's block and position (CannotContinue, with the reason, for anything else)."""
    layer = hook_layer(hook_name)
    blocks = getattr(model, "blocks", None)
    hook_point = getattr(model, "hook_dict", {}).get(hook_name)
    if layer is None or blocks is None or hook_point is None or layer >= len(blocks):
        raise CannotContinue(f"{hook_name} is not in a decoder block")
    for part in ("ln_final", "unembed"):
        if getattr(model, part, None) is None:
            raise CannotContinue(f"the model has no {part} component")
    block = blocks[layer]
    for position, paths in _HOOK_POINTS.items():
        if any(_submodule(block, p) is hook_point for p in paths):
            if position in _INSIDE:
                _check_sequential(block, hook_name)
            return HookSite(hook_name, layer, position)
    raise CannotContinue(f"{hook_name} is inside a block at none of {', '.join(POSITIONS)}")


def _check_sequential(block, hook_name: str) -> None:
    """A hook inside the block needs a sequential pre-norm block (ln2 before the MLP, no post-norms,
    unscaled residual adds)."""
    aliases = getattr(block, "hook_aliases", {}) or {}
    sequential = (all(_submodule(block, p) is not None for p in ("ln2", "mlp", "attn"))
                  and _submodule(block, "ln1_post") is None and _submodule(block, "ln2_post") is None
                  and aliases.get("hook_resid_mid") == "ln2.hook_in"
                  and not getattr(block, "mlp_reads_resid_directly", False))
    if not sequential:
        raise CannotContinue(f"{hook_name} is inside a block that is not a sequential pre-norm block "
                             f"({type(block).__name__})")


# ---- capturing during the clean forward --------------------------------------------------------

def _keep_arg(value: Any) -> Any:
    """A block argument as a rerun needs it: tensors and plain values kept, anything else (the KV
    cache) dropped, so a rerun neither reads nor extends the clean run's cache."""
    if isinstance(value, (Tensor, *_PRIMITIVES)):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (Tensor, *_PRIMITIVES)) for v in value):
        return value
    return None


@dataclass
class Recording:
    """What one clean forward left for continuing from some sites (filled by `recording`)."""

    n_blocks: int
    outputs: dict[str, Tensor] = field(default_factory=dict)  # hook name or "L:path" -> its output
    block_args: dict[int, tuple[tuple, dict]] = field(default_factory=dict)  # block index -> its arguments

    def captured(self, site: HookSite) -> Captured:
        res = _RESIDUAL_AT.get(site.position)
        missing = [i for i in range(site.first_block, self.n_blocks) if i not in self.block_args]
        if site.hook_name not in self.outputs or missing:
            raise CannotContinue(f"the clean forward did not reach {site.hook_name} and every later block")
        return Captured(self.outputs[site.hook_name],
                        None if res is None else self.outputs[f"{site.layer}:{res}"],
                        [self.block_args[i] for i in range(site.first_block, self.n_blocks)])


@contextlib.contextmanager
def recording(model, sites: Sequence[HookSite]) -> Iterator[Recording]:
    """Within the block, a forward of the model records what continuing from `sites` needs; its
    outputs are unchanged."""
    blocks = model.blocks if sites else []
    rec = Recording(len(blocks))
    handles = []
    try:
        for key, point in _capture_points(model, sites).items():
            handles.append(point.register_forward_hook(_store_output(rec, key)))
        for i in range(min((s.first_block for s in sites), default=len(blocks)), len(blocks)):
            handles.append(blocks[i].register_forward_pre_hook(_store_args(rec, i), with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


def _capture_points(model, sites: Sequence[HookSite]) -> dict[str, torch.nn.Module]:
    """key -> hook point: each site's own hook, and the hook point of the residual it needs."""
    points = {}
    for s in sites:
        points[s.hook_name] = model.hook_dict[s.hook_name]
        res = _RESIDUAL_AT.get(s.position)
        if res is not None:
            points[f"{s.layer}:{res}"] = _submodule(model.blocks[s.layer], res)
    return points


def _store_output(rec: Recording, key: str):
    def hook(module, args, output):
        rec.outputs[key] = output

    return hook


def _store_args(rec: Recording, index: int):
    def hook(module, args, kwargs):
        rec.block_args[index] = (tuple(_keep_arg(a) for a in args[1:]),
                                 {k: (False if k == "use_cache" else _keep_arg(v)) for k, v in kwargs.items()})

    return hook


# ---- running on ----------------------------------------------------------------------------------

def _per_row(value: Any, b: int, fn) -> Any:
    """fn applied to every tensor in value (nested tuples/lists/dicts) whose first dimension is the
    batch b; everything else (broadcast tensors such as position ids [1, pos], flags) as it is."""
    if isinstance(value, Tensor):
        return fn(value) if value.ndim and value.shape[0] == b else value
    if isinstance(value, (tuple, list)):
        return type(value)(_per_row(v, b, fn) for v in value)
    if isinstance(value, dict):
        return {k: _per_row(v, b, fn) for k, v in value.items()}
    return value


def _tile(value: Any, b: int, n: int) -> Any:
    """value for n variants of b contexts stacked variant-major ([n*b, ...])."""
    if n == 1:
        return value
    return _per_row(value, b, lambda t: t.repeat(n, *([1] * (t.ndim - 1))))


def _finish_block(block, position: str, v: Tensor, residual: Tensor | None) -> Tensor:
    """Block L's output (h_post) when the activation at `position` is v."""
    if position in ("resid_pre", "resid_post"):
        return v
    if position == "attn_out":
        h_mid = residual + v
        return h_mid + block.mlp(block.ln2(h_mid))
    if position == "ln2_in":
        return residual + block.mlp(block.ln2(v))
    if position == "mlp_in":
        return residual + block.mlp(v)
    return residual + v  # mlp_out


def continue_from(model, site: HookSite, captured: Captured, replaced: Tensor) -> Tensor:
    """Logits [n*b, pos, vocab] of the model run on from the hook with `replaced` [n*b, pos, d]
    (n variants of the b captured contexts, variant-major) in place of the activation there."""
    b = captured.activation.shape[0]
    n, rest = divmod(replaced.shape[0], b)
    if rest or replaced.shape[1:] != captured.activation.shape[1:]:
        raise ValueError(f"replaced activations {list(replaced.shape)} are not n copies of "
                         f"{list(captured.activation.shape)}")
    h = _finish_block(model.blocks[site.layer], site.position, replaced, _tile(captured.residual, b, n))
    for block, (args, kwargs) in zip(model.blocks[site.first_block:], captured.block_args):
        out = block(h, *_tile(args, b, n), **_tile(kwargs, b, n))
        h = out[0] if isinstance(out, tuple) else out
    return model.unembed(model.ln_final(h))


def first_context(captured: Captured) -> Captured:
    """The captures of the first context alone (b = 1)."""
    b = captured.activation.shape[0]
    if b == 1:
        return captured
    first = lambda t: t[:1]  # noqa: E731
    return Captured(first(captured.activation), _per_row(captured.residual, b, first),
                    _per_row(captured.block_args, b, first))


def verify(model, site: HookSite, captured: Captured, clean_logits: Tensor, copies: int = 2) -> None:
    """CannotContinue unless running on from the clean activation of the first context, stacked
    `copies` times, gives that context's clean logits: to 1e-4 of the largest logit in 32/64-bit
    (the same operations on the same numbers; only stacking may reorder a sum), 2e-2 in 16-bit."""
    one = first_context(captured)
    try:
        logits = continue_from(model, site, one, one.activation.repeat(copies, 1, 1))
    except Exception as e:  # a model whose blocks want more than their recorded arguments
        raise CannotContinue(f"running on from {site.hook_name} failed ({type(e).__name__}: {e})") from e
    ref = clean_logits[:1].expand(copies, *clean_logits.shape[1:]).float()
    err = float((logits.float() - ref).abs().max())
    scale = float(ref.abs().max())
    tol = 1e-4 if clean_logits.dtype in (torch.float32, torch.float64) else 2e-2
    if not err <= tol * scale:
        raise CannotContinue(f"running on from {site.hook_name} does not give the clean logits "
                             f"(max |diff| {err:.3g}, largest logit {scale:.3g})")
