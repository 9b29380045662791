"""`sae.load`: one call that loads a dictionary, a run's dictionaries, or another library's.

    import sae
    d = sae.load("runs/demo/topk_k32")            # a dictionary folder -> SparseDictionary
    ds = sae.load("runs/demo")                      # a run folder -> {name: SparseDictionary}
    d = sae.load("path/to/saelens_or_dictionary_learning_or_sparsify_folder")

What comes back is a `torch.nn.Module` in eval mode with `encode(x) -> f [..., d_sae]`,
`decode(f) -> x̂`, `forward(x) -> x̂`, `encode_sparse(x) -> (values, indices)`, the weights
`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`, `dtype`, `device`, `metadata`
(where it came from) and a `cfg` (a `DictionaryCfg`) that answers what SAELens / SAEBench code
asks of `sae.cfg`: `d_in`, `d_sae`, `architecture`, `model_name`, `hook_name`, `hook_layer`,
`context_size`, `dtype`, `device`, `apply_b_dec_to_input`, `prepend_bos`, `metadata.*`, ... and,
for everything else, the dictionary's own hyperparameters (`cfg.k`, `cfg.lr`, ...).

Formats are detected from the files (see `sae.formats`); `format=` forces one.

Our format is versioned by cfg.json's `format_version`. Older versions are upgraded in memory
by the chain in `_UPGRADES` (version n -> n+1); a version newer than this library reads is
refused with a one-line error that says to upgrade.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sae import io
from sae.dtypes import dtype_name, find_dtype
from sae.errors import UserError

# ---- our format's versions -----------------------------------------------------------------

_TOP_LEVEL = ("format_version", "architecture", "d_in", "d_sae", "dtype", "hyperparameters")


def _v0_to_v1(cfg: dict[str, Any]) -> dict[str, Any]:
    """Version 0: cfg.json written before `format_version` existed. Same keys as version 1, except
    that metadata could sit in a nested `metadata` block and `hyperparameters` could be absent
    (the architecture's defaults)."""
    out = {k: v for k, v in cfg.items() if k != "metadata"}
    if isinstance(cfg.get("metadata"), dict):
        for k, v in cfg["metadata"].items():
            out.setdefault(k, v)
    out.setdefault("hyperparameters", {})
    out["format_version"] = 1
    return out


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1}


def upgrade_cfg(cfg: dict[str, Any], where: str = "cfg.json") -> dict[str, Any]:
    """Any cfg.json version this library knows -> the current FORMAT_VERSION layout."""
    from sae.dictionaries.base import FORMAT_VERSION

    version = cfg.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise UserError(f"{where}: format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise UserError(f"{where}: format_version {version} was written by a newer version of this library "
                        f"(this one reads versions up to {FORMAT_VERSION}); upgrade it: pip install -U sae-dict")
    while version < FORMAT_VERSION:
        cfg = _UPGRADES[version](cfg)
        version += 1
        if cfg.get("format_version") != version:
            raise AssertionError(f"upgrade to format_version {version} did not set it")
    return cfg


# ---- the cfg view ---------------------------------------------------------------------------

class _Namespace(dict):
    """A dict whose keys read as attributes too; missing ones read as None (like SAELens's
    SAEMetadata)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)


class DictionaryCfg:
    """`cfg` of a loaded dictionary: SAELens / SAEBench field names, live from the module, plus
    the dictionary's hyperparameters (its pydantic Config, `hyperparameters`) for any other name.

    Setting an attribute sets the hyperparameter (validated). `to_dict()` gives the SAELens-style
    fields. Dictionaries that were not loaded through `sae.load` have the plain Config as `cfg`.
    """

    __slots__ = ("_module", "hyperparameters")
    SAELENS_FIELDS = ("architecture", "d_in", "d_sae", "dtype", "device", "model_name", "hook_name", "hook_layer",
                      "hook_head_index", "context_size", "prepend_bos", "exclude_special_tokens",
                      "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
                      "finetuning_scaling_factor", "activation_fn_str", "activation_fn_kwargs", "dataset_path",
                      "dataset_trust_remote_code", "seqpos_slice", "training_tokens", "model_from_pretrained_kwargs",
                      "sae_lens_training_version", "neuronpedia_id")

    def __init__(self, module, hyperparameters):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "hyperparameters", hyperparameters)

    # -- the SAELens / SAEBench names --
    @property
    def architecture(self) -> str:
        return self._module.architecture

    @property
    def d_in(self) -> int:
        return self._module.d_in

    @property
    def d_sae(self) -> int:
        return self._module.d_sae

    @property
    def dtype(self) -> str:
        return dtype_name(self._module.W_enc.dtype)

    @property
    def device(self) -> str:
        return str(self._module.W_enc.device)

    @property
    def model_name(self) -> str | None:
        return self._module.metadata.get("model_name")

    @property
    def hook_name(self) -> str | None:
        return self._module.metadata.get("hook_name") or getattr(self.hyperparameters, "hook_name", None)

    @property
    def hook_layer(self) -> int | None:
        from sae.models import hook_layer

        return hook_layer(self.hook_name) if self.hook_name else None

    @property
    def hook_head_index(self) -> None:
        return None

    @property
    def context_size(self) -> int | None:
        md = self._module.metadata
        ds = md.get("dataset")
        return md.get("context_size") or (ds.get("context_size") if isinstance(ds, dict) else None)

    @property
    def prepend_bos(self) -> bool:
        return bool(self._module.metadata.get("prepend_bos", True))

    @property
    def exclude_special_tokens(self) -> Any:
        md = self._module.metadata
        if "exclude_special_tokens" in md:
            return md["exclude_special_tokens"]
        ds = md.get("dataset")
        return ds.get("exclude_tokens") if isinstance(ds, dict) else None

    @property
    def apply_b_dec_to_input(self) -> bool:
        return True  # imports fold other conventions into b_enc

    @property
    def normalize_activations(self) -> str:
        return "none"  # the input scale is folded into the weights at save time

    @property
    def reshape_activations(self) -> str:
        return "none"

    @property
    def finetuning_scaling_factor(self) -> bool:
        return False

    @property
    def activation_fn_str(self) -> str:
        return {"topk": "topk"}.get(self.architecture, "relu")

    @property
    def activation_fn_kwargs(self) -> dict[str, Any]:
        k = getattr(self.hyperparameters, "k", None)
        return {"k": k} if self.architecture == "topk" and k is not None else {}

    @property
    def dataset_path(self) -> str | None:
        ds = self._module.metadata.get("dataset")
        return ds.get("source") if isinstance(ds, dict) else ds

    @property
    def dataset_trust_remote_code(self) -> bool:
        return False

    @property
    def seqpos_slice(self) -> tuple:
        return (None,)

    @property
    def training_tokens(self) -> int | None:
        return self._module.metadata.get("tokens_trained")

    @property
    def model_from_pretrained_kwargs(self) -> dict:
        return {}

    @property
    def sae_lens_training_version(self) -> None:
        return None

    @property
    def neuronpedia_id(self) -> str | None:
        return self._module.metadata.get("neuronpedia_id")

    @property
    def metadata(self) -> _Namespace:
        """SAELens 6's `cfg.metadata` block."""
        keys = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                "exclude_special_tokens", "dataset_path", "neuronpedia_id", "seqpos_slice",
                "model_from_pretrained_kwargs")
        return _Namespace({k: getattr(self, k) for k in keys})

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.SAELENS_FIELDS}
        out["metadata"] = dict(self.metadata)
        return out

    # -- everything else: the hyperparameters --
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in DictionaryCfg.__slots__:
            raise AttributeError(name)
        return getattr(self.hyperparameters, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DictionaryCfg.__slots__:
            object.__setattr__(self, name, value)
        elif isinstance(getattr(type(self), name, None), property):
            raise AttributeError(f"cfg.{name} is derived from the dictionary and read-only")
        else:
            setattr(self.hyperparameters, name, value)

    def __repr__(self) -> str:
        return (f"DictionaryCfg(architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"model_name={self.model_name!r}, hook_name={self.hook_name!r}, "
                f"hyperparameters={self.hyperparameters!r})")


def attach_cfg_view(dictionary):
    """Give a SparseDictionary the SAELens/SAEBench-style `cfg` (idempotent); returns it."""
    if not isinstance(dictionary.cfg, DictionaryCfg):
        dictionary.cfg = DictionaryCfg(dictionary, dictionary.cfg)
    return dictionary


# ---- building -------------------------------------------------------------------------------

def _resolve(device, dtype) -> tuple[torch.device, torch.dtype | None]:
    from sae.models import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dtype is None or isinstance(dtype, torch.dtype):
        return dev, dtype
    dt = find_dtype(dtype)
    if dt is None:
        raise UserError(f"dtype {dtype!r} unknown; use float32, bfloat16 or float16")
    return dev, dt


def build_dictionary(architecture: str, d_in: int, d_sae: int, tensors: dict[str, torch.Tensor],
                     hyperparameters: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A SparseDictionary of a registered architecture holding exactly `tensors` (eval mode)."""
    import sae.dictionaries  # noqa: F401  (registers every architecture)
    from sae.dictionaries.registry import get_architecture

    cls = get_architecture(architecture)
    hyper = dict(hyperparameters or {})
    hyper.update(architecture=architecture, d_sae=int(d_sae), expansion_factor=None)
    valid = set(cls.Config.model_fields)
    dropped = sorted(set(hyper) - valid)
    hyper = {k: v for k, v in hyper.items() if k in valid}
    try:
        cfg = cls.Config.model_validate(hyper)
    except Exception as e:  # pydantic ValidationError -> one line
        raise UserError(f"hyperparameters of a {architecture} dictionary do not validate: "
                        f"{str(e).splitlines()[0]} ({'; '.join(str(e).splitlines()[1:3])})") from None
    md = dict(metadata or {})
    if dropped:
        md.setdefault("unknown_hyperparameters", dropped)
    d = cls(cfg, int(d_in), metadata=md)
    tensors = {k: v.detach().to("cpu") for k, v in tensors.items()}
    d.prepare_for_weights(tensors)
    try:
        d.load_weights(tensors)
    except ValueError as e:
        raise UserError(f"{architecture} dictionary: {e}") from None
    d = d.to(device=device, dtype=dtype) if dtype is not None else d.to(device=device)
    for p in d.parameters():
        p.requires_grad_(False)
    return attach_cfg_view(d.eval())


def _load_ours(directory: Path, device, dtype):
    from sae.dictionaries.base import CFG_FILE, WEIGHTS_FILE

    cfg = upgrade_cfg(io.read_json(directory / CFG_FILE), str(directory / CFG_FILE))
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise UserError(f"{directory / CFG_FILE}: no {key!r}; not a dictionary cfg.json")
    metadata = {k: v for k, v in cfg.items() if k not in _TOP_LEVEL}
    tensors = io.load_tensors(directory / WEIGHTS_FILE)
    dt = dtype if dtype is not None else find_dtype(cfg.get("dtype")) or torch.float32
    return build_dictionary(cfg["architecture"], cfg["d_in"], cfg["d_sae"], tensors,
                            cfg.get("hyperparameters") or {}, metadata, device, dt)


def _load_imported(directory: Path, fmt: str, device, dtype):
    from sae.formats import read

    imp = read(directory, fmt)
    imp.metadata.setdefault("imported_from", str(directory))
    dt = dtype if dtype is not None else find_dtype(imp.dtype) or torch.float32
    return build_dictionary(imp.architecture, imp.d_in, imp.d_sae, imp.tensors, imp.hyperparameters,
                            imp.metadata, device, dt)


# ---- the entry point ------------------------------------------------------------------------

def _as_dir(path: Path) -> Path:
    """A file of a dictionary folder (cfg.json, sae.safetensors, ae.pt, ...) -> its folder."""
    return path.parent if path.is_file() else path


def detect_format(path: str | Path) -> str | None:
    """'ours' | 'saelens' | 'dictionary_learning' | 'sparsify' for a dictionary folder, None otherwise."""
    from sae.formats import detect

    return detect(_as_dir(Path(path)))


def _dictionary_dirs(root: Path, max_depth: int = 2) -> list[tuple[str, Path, str]]:
    """(name, folder, format) for dictionary folders under a run folder (breadth first); a
    UserError when there is none."""
    found = list(_walk_dictionary_dirs(root, max_depth))
    if not found:
        raise UserError(f"{root}: neither a dictionary folder (cfg.json + sae.safetensors, cfg.json + "
                        f"sae_weights.safetensors, or ae.pt) nor a folder holding some")
    return found


def _walk_dictionary_dirs(root: Path, max_depth: int) -> Iterator[tuple[str, Path, str]]:
    from sae.formats import detect

    level = [root]
    for _ in range(max_depth):
        nxt = []
        for folder in level:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                fmt = detect(child)
                if fmt is not None:
                    yield str(child.relative_to(root)), child, fmt
                elif child.name not in ("cache", "checkpoints", "wandb", "__pycache__"):
                    nxt.append(child)
        level = nxt


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         format: str = "auto"):
    """Load a dictionary folder (-> SparseDictionary) or a folder of them (-> {name: dictionary}).

    path: a dictionary folder in our format (cfg.json + sae.safetensors), SAELens's
        (cfg.json + sae_weights.safetensors), dictionary_learning's (ae.pt + config.json) or
        sparsify's (cfg.json + sae.safetensors with encoder.weight); a file inside one; or a
        folder holding dictionary folders (a run, a sparsify run, a dictionary_learning sweep),
        which gives {relative folder name: dictionary}.
    device: "cpu", "cuda", "cuda:N" or "auto". dtype: None keeps the file's dtype.
    format: "auto" (detect) or one of "ours", "saelens", "dictionary_learning", "sparsify".
    """
    from sae.formats import FORMATS, OURS

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if format != "auto" and format not in FORMATS:
        raise UserError(f"format {format!r} unknown; use auto or one of {', '.join(FORMATS)}")
    dev, dt = _resolve(device, dtype)
    directory = _as_dir(p)
    fmt = detect_format(directory) if format == "auto" else format
    if fmt is not None:
        return _load_ours(directory, dev, dt) if fmt == OURS else _load_imported(directory, fmt, dev, dt)
    out = {}
    for name, folder, fmt in _dictionary_dirs(directory):
        out[name] = _load_ours(folder, dev, dt) if fmt == OURS else _load_imported(folder, fmt, dev, dt)
    return out


def load_run(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> dict:
    """Like `load`, but always {name: dictionary} (a single dictionary folder gives one entry)."""
    out = load(path, device=device, dtype=dtype)
    if isinstance(out, dict):
        return out
    return {Path(path).expanduser().resolve().name: out}
