"""EleutherAI sparsify (and its predecessor `sae`): one folder per hook point, each with
cfg.json + sae.safetensors; a training run's folder holds one such folder per hook point (named
after the Hugging Face module, e.g. `layers.6`) and usually a config.json with the model name.

Weights: `encoder.weight [num_latents, d_in]`, `encoder.bias [num_latents]`,
`W_dec [num_latents, d_in]`, `b_dec [d_in]` (`W_skip` for skip transcoders). cfg.json: `k`,
`num_latents` / `expansion_factor`, `activation` ("topk" or "groupmax"), `transcode`,
`skip_connection`, `d_in`. The encoder is f = TopK_k(ReLU((x - b_dec) Wᵀ + b)) and the decoder
x̂ = f W_dec + b_dec: our `topk` (TopK then ReLU keeps the same non-zero set).

Transcoders (`transcode: true`: the encoder reads a module's input, not centred on b_dec, and
predicts its output) import as our transcoders, and a skip connection (x̂ += x W_skipᵀ, W_skip
[d_out, d_in], with or without `transcode`) as our `W_skip` (transposed). A sparsify transcoder of
`layers.N.mlp` reads `blocks.N.ln2.hook_normalized` and writes `blocks.N.hook_mlp_out`; for
another hook point its input hook is recorded as `<hookpoint>.input`. `export` writes our topk
dictionaries (transcoders and skip connections included, d_out = d_in) back in this layout.

Hook points map to TransformerLens names where the pattern is clear: `layers.N` (a decoder
layer's output) -> `blocks.N.hook_resid_post`, `layers.N.mlp` -> `blocks.N.hook_mlp_out`; the
original name is kept as metadata `source_hookpoint`.
"""

from __future__ import annotations

import re
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
    if "W_skip" in tensors:
        t["W_skip"] = tensors["W_skip"].T.contiguous()  # theirs [d_out, d_in]: x̂ += x @ W_skip.mT
    d_sae, d_in = t["W_dec"].shape
    metadata = _metadata(directory)
    hyper: dict[str, Any] = {"k": int(cfg["k"]), "skip_connection": "W_skip" in t}
    if cfg.get("transcode"):
        hyper["input_hook"] = _input_hook_of(metadata.get("hook_name"), directory.name)
        metadata["input_hook"] = hyper["input_hook"]
    return Imported(architecture="topk", d_in=int(cfg.get("d_in", d_in)), d_sae=int(d_sae), tensors=t,
                    hyperparameters=hyper, metadata=metadata, dtype=dtype_name(t["W_enc"].dtype))


def _input_hook_of(hook_name: str | None, hookpoint: str) -> str:
    """The hook a sparsify transcoder of `hookpoint` reads: its module's input."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_mlp_out", hook_name or "")
    return f"blocks.{m.group(1)}.ln2.hook_normalized" if m else f"{hookpoint}.input"


def _check_supported(cfg: dict[str, Any], tensors: dict[str, Any], directory: Path) -> None:
    """A UserError for what is not a TopK dictionary with all its tensors and k."""
    if bool(cfg.get("skip_connection")) != ("W_skip" in tensors):
        raise UserError(f"{directory}: cfg.json says skip_connection={cfg.get('skip_connection')} but "
                        f"{WEIGHTS_FILE} {'has' if 'W_skip' in tensors else 'has no'} W_skip")
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


# ---- export ------------------------------------------------------------------------------------

def export(dictionary, out_dir: str | Path) -> Path:
    """Write a topk dictionary (a transcoder, a skip connection) as sparsify's cfg.json +
    sae.safetensors, in raw-activation units; a UserError names what sparsify cannot express."""
    d = _exportable(dictionary).in_raw_units()
    if d.is_transcoder and bool((d.b_in != 0).any()):  # (in_raw_units folds it; kept as a guard)
        raise UserError("a transcoder's input centre must be folded before export")
    tensors = {"encoder.weight": d.W_enc.T, "encoder.bias": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip.T
    cfg = {"activation": "topk", "expansion_factor": max(1, d.d_sae // d.d_in), "normalize_decoder": True,
           "num_latents": d.d_sae, "k": int(d.cfg.k), "multi_topk": False,
           "skip_connection": d.W_skip is not None, "transcode": d.is_transcoder, "d_in": d.d_in}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.save_tensors(out / WEIGHTS_FILE, {k: v.detach().contiguous() for k, v in tensors.items()})
    io.write_json(out / CFG_FILE, cfg)
    return out


def _exportable(d):
    if d.architecture != "topk":
        raise UserError(f"sparsify's format holds topk dictionaries only, not {d.architecture}")
    if getattr(d, "W_enc_shadow", None) is not None:
        raise UserError("sparsify's format has no place for a pruned topk dictionary's shadow encoder "
                        "(pruned in mode 'after'); prune in mode 'before', or export to ours")
    if d.d_out != d.d_in:
        raise UserError(f"sparsify's format holds dictionaries whose output is as wide as their input "
                        f"(d_in = d_out), not d_in={d.d_in}, d_out={d.d_out}")
    return d
