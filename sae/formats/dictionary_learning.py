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
  -> matryoshka_batchtopk with those group sizes (all groups active, as after loading)

Feature activations are imported as the state_dict computes them (dictionary_learning's
`from_pretrained(normalize_decoder=True)` rescales AutoEncoder features to unit-norm decoder
rows; outputs x̂ are the same either way).

`export` writes a matryoshka_batchtopk dictionary as a MatryoshkaBatchTopKSAE folder: ae.pt, the
plain state_dict `MatryoshkaBatchTopKSAE.from_pretrained` loads (`k` int32, one scalar `threshold`,
`group_sizes`), and config.json with the `trainer` block its trainer writes, plus our own `sae_dict`
block (architecture, hyperparameters, metadata), which `read` restores.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae import __version__, io
from sae.errors import UserError
from sae.dtypes import dtype_name
from sae.formats import Imported, clamp_threshold, fold_input_centering, guess_hook_name
from sae.formats.saelens import EMBEDDED_MODEL_HUB_ID
from sae.models import EMBEDDED_SMOLLM2, hook_layer

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
EXTRA_KEY = "sae_dict"  # our own block inside an exported config.json (dictionary_learning ignores it)

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
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    d_sae, d_in = tensors["W_dec"].shape
    block = config.get(EXTRA_KEY) if isinstance(config.get(EXTRA_KEY), dict) else {}
    own = block if block.get("architecture") == arch else {}  # our own export: what the file cannot say
    hyper = {**(own.get("hyperparameters") or {}), **_hyperparameters(cls, arch, state, trainer, wpath)}
    metadata = {**_metadata(directory, cls, trainer, buffer), **(own.get("metadata") or {})}
    return Imported(architecture=arch, d_in=int(d_in), d_sae=int(d_sae), tensors=tensors, hyperparameters=hyper,
                    metadata=metadata, dtype=dtype_name(tensors["W_enc"].dtype))


def _hyperparameters(cls: str, arch: str, state: dict[str, Tensor], trainer: dict[str, Any],
                     wpath: Path) -> dict[str, Any]:
    """What the file says of our hyperparameters: k (TopK-style), group_sizes (Matryoshka)."""
    hyper: dict[str, Any] = {}
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        hyper["k"] = _k_of(cls, state, trainer, wpath)
    if arch == "matryoshka_batchtopk":
        hyper["group_sizes"] = [int(s) for s in state["group_sizes"].flatten().tolist()]
    return hyper


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
    return ("matryoshka_batchtopk" if cls == "MatryoshkaBatchTopKSAE" else "batchtopk"), t


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


# ---- export ---------------------------------------------------------------------------------

TO_DICTIONARY_LEARNING = {"matryoshka_batchtopk": "MatryoshkaBatchTopKSAE"}
# our hook names -> dictionary_learning's submodule names (read back by guess_hook_name)
_SUBMODULES = {"hook_resid_post": "resid_post_layer_{}", "hook_resid_pre": "resid_pre_layer_{}",
               "hook_mlp_out": "mlp_out_layer_{}", "hook_attn_out": "attn_out_layer_{}"}


def export(dictionary, out_dir: str | Path) -> Path:
    """Write `dictionary` (a matryoshka_batchtopk SparseDictionary) as a dictionary_learning folder
    (ae.pt + config.json); returns the folder."""
    if dictionary.architecture not in TO_DICTIONARY_LEARNING:
        raise UserError(f"architecture {dictionary.architecture!r} has no dictionary_learning export here "
                        f"(exportable: {', '.join(sorted(TO_DICTIONARY_LEARNING))})")
    d = dictionary.in_raw_units()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out / WEIGHTS_FILE) as tmp:
        torch.save(matryoshka_state_dict(d), tmp)
    io.write_json(out / CONFIG_FILE, _config(d))
    return out


def matryoshka_state_dict(d) -> dict[str, Tensor]:
    """MatryoshkaBatchTopKSAE's state_dict: its parameters, `k` (int32), one scalar `threshold`,
    `group_sizes` (int64)."""
    threshold = d.threshold.detach().float()
    if threshold.numel() and not bool((threshold == threshold[0]).all()):
        raise UserError("this dictionary's features have different thresholds; dictionary_learning's "
                        "MatryoshkaBatchTopKSAE has one threshold for all of them")
    return {"W_enc": d.W_enc.detach().clone(), "b_enc": d.b_enc.detach().clone(),
            "W_dec": d.W_dec.detach().clone(), "b_dec": d.b_dec.detach().clone(),
            "k": torch.tensor(int(d.cfg.k), dtype=torch.int32), "threshold": threshold[0].clone(),
            "group_sizes": torch.tensor(d.group_sizes, dtype=torch.int64)}


def _config(d) -> dict[str, Any]:
    """config.json: the `trainer` block MatryoshkaBatchTopKTrainer writes (what their loaders and
    ours read), `buffer.ctx_len`, and our own block."""
    sizes, hook = d.group_sizes, d.cfg.hook_name
    model_name = d.cfg.model_name
    trainer = {
        "trainer_class": "MatryoshkaBatchTopKTrainer", "dict_class": TO_DICTIONARY_LEARNING[d.architecture],
        "activation_dim": d.d_in, "dict_size": d.d_sae, "k": int(d.cfg.k), "group_sizes": sizes,
        "group_fractions": [s / d.d_sae for s in sizes], "group_weights": [1 / len(sizes)] * len(sizes),
        "lr": d.lr, "auxk_alpha": d.cfg.aux_coefficient, "top_k_aux": d.aux_k,
        "threshold_beta": d.cfg.threshold_beta, "seed": d.cfg.seed,
        "lm_name": EMBEDDED_MODEL_HUB_ID if model_name == EMBEDDED_SMOLLM2 else model_name,
        "layer": hook_layer(hook) if hook else None, "submodule_name": _submodule_name(hook),
    }
    config: dict[str, Any] = {"trainer": trainer}
    if d.cfg.context_size:
        config["buffer"] = {"ctx_len": int(d.cfg.context_size)}
    config[EXTRA_KEY] = {"architecture": d.architecture, "hyperparameters": d.cfg.hyperparameters.model_dump(mode="json"),
                         "metadata": dict(d.metadata), "library_version": __version__}
    return config


def _submodule_name(hook: str | None) -> str | None:
    """`blocks.3.hook_resid_post` -> `resid_post_layer_3` (dictionary_learning's naming); other hooks as they are."""
    m = re.match(r"^blocks\.(\d+)\.(hook_\w+)$", hook or "")
    if m and m.group(2) in _SUBMODULES:
        return _SUBMODULES[m.group(2)].format(m.group(1))
    return hook
