"""EleutherAI sparsify (and its predecessor `sae`): one folder per hook point, each with
cfg.json + sae.safetensors; a training run's folder holds one such folder per hook point (named
after the Hugging Face module, e.g. `layers.6`) and usually a config.json with the model name.

Weights: `encoder.weight [num_latents, d_in]`, `encoder.bias [num_latents]`,
`W_dec [num_latents, d_in]`, `b_dec [d_in]` (`W_skip` for skip transcoders). cfg.json: `k`,
`num_latents` / `expansion_factor`, `activation` ("topk" or "groupmax"), `transcode`,
`skip_connection`, `d_in`. The encoder is f = TopK_k(ReLU((x - b_dec) Wᵀ + b)) and the decoder
x̂ = f W_dec + b_dec: our `topk` (TopK then ReLU keeps the same non-zero set).

Hook points map to TransformerLens names where the pattern is clear: `layers.N` (a decoder
layer's output) -> `blocks.N.hook_resid_post`, `layers.N.mlp` -> `blocks.N.hook_mlp_out`; the
original name is kept as metadata `source_hookpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from sae import io
from sae.errors import UserError
from sae.dtypes import dtype_name
from sae.formats import Imported, guess_hook_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def _weight_names(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def detect(directory: Path) -> bool:
    w = directory / WEIGHTS_FILE
    if not ((directory / CFG_FILE).is_file() and w.is_file()):
        return False
    try:
        return "encoder.weight" in _weight_names(w)
    except Exception:
        return False


def read(directory: Path) -> Imported:
    cfg = io.read_json(directory / CFG_FILE)
    tensors = io.load_tensors(directory / WEIGHTS_FILE)
    _check_supported(cfg, tensors, directory)
    t = {"W_enc": tensors["encoder.weight"].T.contiguous(), "b_enc": tensors["encoder.bias"],
         "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    d_sae, d_in = t["W_dec"].shape
    return Imported(architecture="topk", d_in=int(cfg.get("d_in", d_in)), d_sae=int(d_sae), tensors=t,
                    hyperparameters={"k": int(cfg["k"])}, metadata=_metadata(directory),
                    dtype=dtype_name(t["W_enc"].dtype))


def _check_supported(cfg: dict[str, Any], tensors: dict[str, Any], directory: Path) -> None:
    """A UserError for what is not a TopK autoencoder with all its tensors and k."""
    if cfg.get("transcode") or "W_skip" in tensors or cfg.get("skip_connection"):
        raise UserError(f"{directory}: transcoders / skip connections are not supported (autoencoders only)")
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{directory}: activation {cfg.get('activation')!r} is not supported (topk only)")
    for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if key not in tensors:
            raise UserError(f"{directory}/{WEIGHTS_FILE}: missing {key}")
    if cfg.get("k") is None:
        raise UserError(f"{directory}/{CFG_FILE}: no k")


def _metadata(directory: Path) -> dict[str, Any]:
    """The hook point (folder name), and the model, context size and dataset from the run's
    config.json beside it when there is one."""
    metadata: dict[str, Any] = {"source_format": "sparsify", "source_hookpoint": directory.name}
    hook = guess_hook_name(directory.name)
    if hook:
        metadata["hook_name"] = hook
    run_cfg_path = directory.parent / "config.json"
    if not run_cfg_path.is_file():
        return metadata
    try:
        run_cfg = io.read_json(run_cfg_path)
    except ValueError:
        return metadata
    if isinstance(run_cfg, dict):
        if isinstance(run_cfg.get("model"), str):
            metadata["model_name"] = run_cfg["model"]
        if run_cfg.get("ctx_len"):
            metadata["context_size"] = int(run_cfg["ctx_len"])
        if isinstance(run_cfg.get("dataset"), str):
            metadata["dataset"] = {"source": run_cfg["dataset"]}
    return metadata
