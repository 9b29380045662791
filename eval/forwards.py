"""The model forwards of one evaluation: per batch one clean forward, then the logits of every
variant (zero, mean, each dictionary) of the activation at each hook.

A variant is a function of the clean activation at its hook ([b, pos, d] -> [b, pos, d]). Where
`sae.partial_forward` can run the model on from the hook, the clean forward records what that
needs and the variants run only the layers after the hook, `per_forward` of them stacked along
the batch dimension in one forward; elsewhere (a hook or model it refuses, or `full=True`) every
variant reruns the whole model with the variant spliced in by a hook, as before. Both give the
same numbers up to float summation order (tests/test_partial_forward.py).

A transcoder's variant at its output hook is a function of the clean activation at its input
hook, an earlier hook of the same forward (so the same in every run): the clean forward also
records the activations at `inputs`, read by `recorded(hook)`, and runs go on from the output
hook as for any other variant.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from sae import partial_forward as P

Variant = tuple[str, Callable[[Tensor], Tensor]]  # (key, clean activation -> what flows on from the hook)

CPU_STACK_BYTES = 1 << 30  # on CPU, stack variants while their logits and activations fit in 1 GiB
_CUDA_FREE_SHARE = 4  # on CUDA, a quarter of the free memory


class Forwards:
    """Runs one evaluation's forwards. hooks: the hooks with variants; full: every variant reruns
    the whole model; per_forward: variants stacked per forward after the hook (None: as many as
    memory allows, `stack_size`)."""

    def __init__(self, model, hooks: Iterable[str], full: bool = False, per_forward: int | None = None,
                 inputs: Iterable[str] = ()):
        if per_forward is not None and per_forward < 1:
            raise ValueError(f"per_forward must be >= 1 or None, got {per_forward}")
        self.model = model
        self.inputs = sorted(set(inputs))  # hooks whose clean activations the variants read (transcoders)
        self._recorded: dict[str, Tensor] = {}
        self.per_forward = per_forward
        self.sites: dict[str, P.HookSite] = {} if full else self._locate(hooks)
        self._unverified = set(self.sites)
        self._toks: Tensor | None = None
        self._recording: P.Recording | None = None
        self._d_vocab = 0

    def _locate(self, hooks: Iterable[str]) -> dict[str, P.HookSite]:
        sites = {}
        for hook in hooks:
            try:
                sites[hook] = P.locate(self.model, hook)
            except P.CannotContinue as e:
                _warn_full(hook, e)
        return sites

    def clean(self, toks: Tensor) -> Tensor:
        """The clean logits [b, pos, vocab] of a batch; records what the variants of this batch need."""
        self._recorded = {}
        with P.recording(self.model, list(self.sites.values())) as rec, self._recording_inputs():
            logits = self.model(toks, return_type="logits")
        self._toks, self._recording, self._d_vocab = toks, rec, logits.shape[-1]
        for hook in sorted(self._unverified):
            self._verify(hook, logits)
        return logits

    def _recording_inputs(self):
        if not self.inputs:
            return contextlib.nullcontext()

        def recorder(name: str):  # keyed by the name asked for (hook.name may be an alias's target)
            def record(x: Tensor, hook) -> Tensor:
                self._recorded[name] = x.detach()
                return x
            return record

        return self.model.hooks(fwd_hooks=[(h, recorder(h)) for h in self.inputs])

    def recorded(self, hook: str) -> Tensor:
        """The clean activation [b, pos, d] at one of `inputs` in the last `clean` batch."""
        return self._recorded[hook]

    def _verify(self, hook: str, clean_logits: Tensor) -> None:
        """Once per evaluation and hook, on the first batch: a hook whose run-on does not give the
        clean logits falls back to full forwards."""
        self._unverified.discard(hook)
        try:
            P.verify(self.model, self.sites[hook], self._recording.captured(self.sites[hook]), clean_logits,
                     copies=min(2, self.per_forward or 2))
        except P.CannotContinue as e:
            _warn_full(hook, e)
            del self.sites[hook]

    def logits(self, hook: str, variants: Sequence[Variant]) -> Iterator[tuple[str, Tensor]]:
        """(key, logits [b, pos, vocab]) of each variant at `hook` for the last `clean` batch."""
        if hook in self.sites:
            yield from self._run_on(self.sites[hook], variants)
        else:
            yield from self._full(hook, variants)

    def _full(self, hook: str, variants: Sequence[Variant]) -> Iterator[tuple[str, Tensor]]:
        for key, fn in variants:
            yield key, self.model.run_with_hooks(self._toks, fwd_hooks=[(hook, lambda x, hook, fn=fn: fn(x))],
                                                 return_type="logits")

    def _run_on(self, site: P.HookSite, variants: Sequence[Variant]) -> Iterator[tuple[str, Tensor]]:
        captured = self._recording.captured(site)
        x = captured.activation
        b = x.shape[0]
        size = self.per_forward or stack_size(x, self._d_vocab, len(variants))
        for start in range(0, len(variants), size):
            chunk = variants[start:start + size]
            stacked = torch.cat([fn(x) for _, fn in chunk])  # [len(chunk) * b, pos, d]
            logits = P.continue_from(self.model, site, captured, stacked)
            for i, (key, _) in enumerate(chunk):
                yield key, logits[i * b:(i + 1) * b]


def stack_size(x: Tensor, d_vocab: int, n_variants: int) -> int:
    """How many variants of the activation x [b, pos, d] one forward after the hook can stack:
    each costs about its float32 logits and eight activation-sized tensors; the budget is
    CPU_STACK_BYTES on CPU, a quarter of the free memory on CUDA."""
    b, pos, d = x.shape
    per_variant = b * pos * (d_vocab + 8 * d) * 4
    if x.device.type == "cuda":
        budget = torch.cuda.mem_get_info(x.device)[0] // _CUDA_FREE_SHARE
    else:
        budget = CPU_STACK_BYTES
    return max(1, min(n_variants, budget // per_variant))


def _warn_full(hook: str, reason: Exception) -> None:
    warnings.warn(f"{hook}: every variant reruns the whole model ({reason})", stacklevel=4)
