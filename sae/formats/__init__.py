"""What the format readers share: `Imported` (a dictionary read from a folder, in our layout
and names, which `sae.loading.build_dictionary` makes into a module) and the foldings that make
another library's conventions compute the same function in ours:

- input not centred on b_dec before encoding (SAELens `apply_b_dec_to_input: false`,
  dictionary_learning's JumpReluAutoEncoder / AutoEncoderNew): b_enc += b_dec @ W_enc;
- a finetuning scale on the features before decoding (old SAELens): folded into W_dec rows;
- negative JumpReLU thresholds: clamped to 0 (their ReLU makes those activations 0 anyway).

One module per format (ours, saelens, dictionary_learning, sparsify), each with
`detect(folder) -> bool` and `read(folder) -> Imported`; `sae.loading` picks one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

OURS = "ours"
SAELENS = "saelens"
DICTIONARY_LEARNING = "dictionary_learning"
SPARSIFY = "sparsify"
FORMATS = (OURS, SAELENS, DICTIONARY_LEARNING, SPARSIFY)


@dataclass
class Imported:
    """A dictionary read from a folder (ours or another library's), in our layout and names."""

    architecture: str
    d_in: int
    d_sae: int
    tensors: dict[str, Tensor]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # the file's dtype name ("float32", ...), the default load dtype
    d_out: int | None = None  # a transcoder's output width (None: d_in)


def fold_input_centering(tensors: dict[str, Tensor], bias_names: tuple[str, ...] = ("b_enc",),
                         weight_for: dict[str, Tensor] | None = None) -> None:
    """Make `(x - b_dec) @ W + b'` equal `x @ W + b` for encoders that do not centre x:
    b' = b + b_dec @ W (computed in float64). `weight_for` maps a bias name to its weight
    when it is not W_enc (gated's magnitude path)."""
    b_dec = tensors["b_dec"].double()
    for name in bias_names:
        W = (weight_for or {}).get(name, tensors["W_enc"]).double()
        tensors[name] = (tensors[name].double() + b_dec @ W).to(tensors[name].dtype)


def clamp_threshold(t: Tensor) -> Tensor:
    """JumpReLU thresholds below 0 act like 0 when a ReLU follows (theirs) but not in ours
    (f = pre·1[pre > θ]); clamping makes both the same function."""
    return t.clamp(min=0.0)


_HOOK_PATTERNS = [
    # (regex on a submodule / hookpoint name, TransformerLens hook name template)
    (r"^(?:resid_post|resid_out|resid)_layer_?(\d+)$", "blocks.{}.hook_resid_post"),
    (r"^resid_pre_layer_?(\d+)$", "blocks.{}.hook_resid_pre"),
    (r"^mlp_out_layer_?(\d+)$", "blocks.{}.hook_mlp_out"),
    (r"^attn_out_layer_?(\d+)$", "blocks.{}.hook_attn_out"),
    (r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)$", "blocks.{}.hook_resid_post"),
    (r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)\.mlp$", "blocks.{}.hook_mlp_out"),
    (r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attention|attn)$",
     "blocks.{}.hook_attn_out"),
    (r"^embed(?:_in|_tokens)?$", "hook_embed"),
]


def guess_hook_name(name: str | None) -> str | None:
    """Another library's hook point name -> the TransformerLens hook name it corresponds to
    (None when unknown). `resid_out_layer3` / `layers.3` -> `blocks.3.hook_resid_post`, ..."""
    if not name:
        return None
    if re.match(r"^blocks\.\d+\.hook_\w+$", name) or name.startswith("hook_"):
        return name
    for pattern, template in _HOOK_PATTERNS:
        m = re.match(pattern, name)
        if m:
            return template.format(*m.groups())
    return None
