"""dictionary_learning (saprmarks/dictionary_learning): a folder with ae.pt + config.json.

`ae.pt` is a pickled state_dict. It is read with `torch.load(weights_only=True)` and nothing
else: a pickle that needs more than tensors and plain containers (a class instance, a function,
...) is refused, and so is a file whose top level is not a flat {name: tensor} dict.

config.json: `{"trainer": {"dict_class", "activation_dim", "dict_size", "k", "lm_name",
"layer", "submodule_name", ...}, "buffer": {"ctx_len", ...}}`. Without it (or without
`dict_class`) the class is told from the state_dict's names.

Classes and their conventions (`nn.Linear` weights are [out, in]):
- AutoEncoder: `encoder.weight [d_sae, d_in]`, `encoder.bias`, `decoder.weight [d_in, d_sae]`,
  `bias` (b_dec); f = ReLU((x - bias) Wᵀ + b), x̂ = f W_decᵀ + bias  -> relu
- AutoEncoderNew: as AutoEncoder with `decoder.bias` and no input centring  -> relu (folded)
- GatedAutoEncoder: `encoder.weight` (no bias), `decoder.weight`, `decoder_bias`, `r_mag`,
  `gate_bias`, `mag_bias`  -> gated
- JumpReluAutoEncoder: `W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold`; x not centred
  (apply_b_dec_to_input is False and not saved)  -> jumprelu (folded)
- AutoEncoderTopK: `encoder.*`, `decoder.weight`, `b_dec`, `k`, `threshold`; per-token TopK  -> topk
- BatchTopKSAE: same names; `encode` uses the threshold by default  -> batchtopk
- MatryoshkaBatchTopKSAE: `W_enc`, `b_enc`, `W_dec`, `b_dec`, `k`, `threshold`, `group_sizes`
  -> batchtopk (all groups active, as after loading)

Feature activations are imported as the state_dict computes them (dictionary_learning's
`from_pretrained(normalize_decoder=True)` rescales AutoEncoder features to unit-norm decoder
rows; outputs x̂ are the same either way).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae import io
from sae.errors import UserError
from sae.dtypes import dtype_name
from sae.formats import Imported, clamp_threshold, fold_input_centering, guess_hook_name

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"

_KEYSETS = {
    "AutoEncoder": {"encoder.weight", "encoder.bias", "decoder.weight", "bias"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "GatedAutoEncoder": {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "BatchTopKSAE": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
}


def weights_path(directory: Path) -> Path | None:
    p = directory / WEIGHTS_FILE
    return p if p.is_file() else None


def detect(directory: Path) -> bool:
    return weights_path(directory) is not None


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat {name: tensor} state dict from a .pt pickle, with `weights_only=True` only."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: refused: not a plain pickled state_dict of tensors; only torch.load("
                        f"weights_only=True) is used, and it said: {reason[:200]}") from None
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: refused: expected a state_dict ({{name: tensor}}), found {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{path}: refused: entries that are not tensors ({', '.join(map(str, bad[:5]))}); "
                        f"expected a flat state_dict of tensors")
    return dict(state)


def _dict_class(state: dict[str, Tensor], config: dict[str, Any], path: Path) -> str:
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    name = trainer.get("dict_class") or config.get("dict_class")
    keys = set(state)
    if name:
        name = str(name).rsplit(".", 1)[-1].strip("<>'\" ")
        if name not in _KEYSETS:
            raise UserError(f"{path}: dict_class {name!r} is not supported ({', '.join(_KEYSETS)})")
        optional = {"threshold"} if name in ("AutoEncoderTopK", "BatchTopKSAE") else set()
        if not (_KEYSETS[name] - optional <= keys <= _KEYSETS[name]):
            raise UserError(f"{path}: the state_dict's names {sorted(keys)} do not match a {name}")
        return name
    # (AutoEncoderTopK and BatchTopKSAE have the same names; without config.json it is taken as TopK)
    for cand in ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder",
                 "MatryoshkaBatchTopKSAE", "AutoEncoderTopK"):
        if keys == _KEYSETS[cand] or (cand == "AutoEncoderTopK" and keys == _KEYSETS[cand] - {"threshold"}):
            return cand
    raise UserError(f"{path}: cannot tell the dictionary class from the state_dict's names {sorted(keys)} and "
                    f"there is no config.json with trainer.dict_class")


def read(directory: Path) -> Imported:
    wpath = weights_path(directory)
    if wpath is None:
        raise UserError(f"{directory}: no {WEIGHTS_FILE}")
    state = load_state_dict(wpath)
    cpath = directory / CONFIG_FILE
    config = io.read_json(cpath) if cpath.is_file() else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    buffer = config.get("buffer") if isinstance(config.get("buffer"), dict) else {}
    cls = _dict_class(state, config, wpath)
    state = {k: v.detach() for k, v in state.items()}
    arch, tensors = _our_tensors(cls, state, trainer)
    hyper = {"k": _k_of(cls, state, trainer, wpath)} if arch in ("topk", "batchtopk") else {}
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    d_sae, d_in = tensors["W_dec"].shape
    return Imported(architecture=arch, d_in=int(d_in), d_sae=int(d_sae), tensors=tensors, hyperparameters=hyper,
                    metadata=_metadata(directory, cls, trainer, buffer),
                    dtype=dtype_name(tensors["W_enc"].dtype))


def _k_of(cls: str, state: dict[str, Tensor], trainer: dict[str, Any], wpath: Path) -> int:
    k = state["k"].item() if "k" in state else trainer.get("k")
    if k is None:
        raise UserError(f"{wpath}: a {cls} without k (no `k` tensor, no trainer.k in config.json)")
    return int(k)


def _our_tensors(cls: str, s: dict[str, Tensor], trainer: dict[str, Any]) -> tuple[str, dict[str, Tensor]]:
    """(our architecture, the state_dict in our names and conventions) for a dictionary_learning class."""
    if cls in ("AutoEncoder", "AutoEncoderNew"):
        t = {"W_enc": s["encoder.weight"].T, "b_enc": s["encoder.bias"], "W_dec": s["decoder.weight"].T}
        if cls == "AutoEncoder":
            t["b_dec"] = s["bias"]
        else:
            t["b_dec"] = s["decoder.bias"]
            fold_input_centering(t)
        return "relu", t
    if cls == "GatedAutoEncoder":
        return "gated", {"W_enc": s["encoder.weight"].T, "b_enc": s["gate_bias"], "r_mag": s["r_mag"],
                         "b_mag": s["mag_bias"], "W_dec": s["decoder.weight"].T, "b_dec": s["decoder_bias"]}
    if cls == "JumpReluAutoEncoder":
        t = {k: s[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        t["threshold"] = clamp_threshold(s["threshold"])
        if not trainer.get("apply_b_dec_to_input", False):
            fold_input_centering(t)
        return "jumprelu", t
    if cls == "MatryoshkaBatchTopKSAE":
        t = {k: s[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    else:  # AutoEncoderTopK, BatchTopKSAE: nn.Linear encoder and decoder
        t = {"W_enc": s["encoder.weight"].T, "b_enc": s["encoder.bias"], "W_dec": s["decoder.weight"].T,
             "b_dec": s["b_dec"]}
    if cls == "AutoEncoderTopK":
        return "topk", t
    # BatchTopKSAE, MatryoshkaBatchTopKSAE: inference uses the (scalar) threshold
    threshold = s.get("threshold", torch.tensor(-1.0)).float().reshape(-1)
    t["threshold"] = threshold.expand(t["b_enc"].shape[0]).clone() if threshold.numel() == 1 else threshold
    return "batchtopk", t


def _metadata(directory: Path, cls: str, trainer: dict[str, Any], buffer: dict[str, Any]) -> dict[str, Any]:
    """model_name, hook_name (from the submodule's or the folders' names), context_size, and where
    the dictionary came from."""
    submodule = trainer.get("submodule_name")
    layer = trainer.get("layer")
    hook = guess_hook_name(submodule) or guess_hook_name(directory.parent.name) or guess_hook_name(directory.name)
    if hook is None and isinstance(layer, int) and buffer.get("io", "out") == "out" and not submodule:
        hook = f"blocks.{layer}.hook_resid_post"
    metadata: dict[str, Any] = {"source_format": "dictionary_learning", "source_class": cls}
    if trainer.get("lm_name"):
        metadata["model_name"] = trainer["lm_name"]
    if hook:
        metadata["hook_name"] = hook
    if submodule or layer is not None:
        metadata["source_submodule"] = submodule or f"layer {layer}"
    if buffer.get("ctx_len"):
        metadata["context_size"] = int(buffer["ctx_len"])
    return metadata
