"""Capturing the activations of several hook points of a TransformerBridge in one forward pass."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from sae.errors import HookError
from sae.models import check_hooks, model_device, stop_layer


class ActivationCapture:
    """Hooks on `hook_names` for the lifetime of a `with` block; `run(tokens)` returns each hook's
    activations [batch, pos, d_in] (trailing dims flattened), exactly the tensors `run_with_cache`
    stores, and stops the forward as soon as the last of them has fired."""

    def __init__(self, model: Any, hook_names: Sequence[str]):
        check_hooks(model, list(hook_names))
        self.model = model
        self.hook_names = list(hook_names)
        self.stop_at_layer = stop_layer(hook_names, len(model.blocks) if hasattr(model, "blocks") else None)
        self.device = model_device(model)
        self._got: dict[str, torch.Tensor] = {}
        self._ctx = None

    def _make_hook(self, name: str) -> Callable:
        # imported here: transformer_lens takes seconds to import, and reading a cache needs none of it
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def hook(tensor: Any, *, hook: Any) -> Any:
            t = tensor[0] if isinstance(tensor, tuple) else tensor
            self._got[name] = t.detach()
            if len(self._got) == len(self.hook_names):
                # Everything captured: end the forward here (the bridge catches this exception,
                # the same one its own stop_at_layer raises, and returns normally).
                raise StopAtLayerException(t)
            return tensor
        return hook

    def __enter__(self) -> "ActivationCapture":
        self._ctx = self.model.hooks(fwd_hooks=[(h, self._make_hook(h)) for h in self.hook_names])
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(*exc)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self._ctx is not None, "use ActivationCapture inside a `with` block"
        self._got = {}
        tokens = tokens.to(self.device)
        self.model(tokens, stop_at_layer=self.stop_at_layer, return_type=None)
        missing = [h for h in self.hook_names if h not in self._got]
        if missing:
            raise HookError(f"hook point(s) {missing} did not fire during the forward pass (a hook "
                            f"that needs an opt-in such as use_attn_result, or one that this "
                            f"architecture does not run); choose other hook points")
        b, p = tokens.shape
        out = {}
        for h in self.hook_names:
            t = self._got[h]
            if t.dim() < 3 or tuple(t.shape[:2]) != (b, p):
                raise HookError(f"hook point {h!r} gives shape {tuple(t.shape)}, not [batch, pos, ...]: "
                                f"only per-token activations can be cached")
            out[h] = t.reshape(b, p, -1)
        self._got = {}
        return out

    def kept_rows(self, tokens: torch.Tensor, keep_mask: torch.Tensor,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{hook: [n_kept, d_in]} for kept tokens, row-major over (context, pos), on the model's device."""
        acts = self.run(tokens)
        flat = keep_mask.to(self.device).reshape(-1)
        return {h: a.reshape(-1, a.shape[-1])[flat].to(dtype or a.dtype) for h, a in acts.items()}

    def d_in(self, tokens: torch.Tensor) -> dict[str, int]:
        """{hook: width} from one forward over the first context of `tokens`."""
        return {h: int(a.shape[-1]) for h, a in self.run(tokens[:1]).items()}
