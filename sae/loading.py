"""Dictionary folders (ours or another library's) -> SparseDictionary modules.

`load` is `sae.load` (a dictionary folder, or a folder of them, for analysis: eval mode, frozen);
`load_dictionary` is the trainer's and evaluator's (exactly one folder, trainable parameters).
Both detect the format from the files, read it into an `Imported` (one reader per format, in
sae/formats/) and make the module in `build_dictionary`, the one place a loaded module is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from sae.dictionaries import get_architecture
from sae.dtypes import find_dtype
from sae.errors import UserError
from sae.formats import (DICTIONARY_LEARNING, FORMATS, OURS, SAELENS, SPARSIFY, Imported, dictionary_learning,
                         ours, saelens, sparsify)
from sae.models import resolve_device

# Detection order matters: a sparsify folder also has cfg.json + sae.safetensors, like ours.
_READERS = {SAELENS: saelens, DICTIONARY_LEARNING: dictionary_learning, SPARSIFY: sparsify, OURS: ours}
_NOT_DICTIONARY_FOLDERS = ("cache", "checkpoints", "wandb", "__pycache__")  # a run's folders never searched


def detect_format(path: str | Path) -> str | None:
    """'ours' | 'saelens' | 'dictionary_learning' | 'sparsify' for a dictionary folder (or a file
    in one), None otherwise."""
    directory = _as_dir(Path(path))
    if not directory.is_dir():
        return None
    return next((fmt for fmt, reader in _READERS.items() if reader.detect(directory)), None)


def build_dictionary(imported: Imported, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                     trainable: bool = False):
    """A SparseDictionary of a registered architecture holding exactly `imported.tensors`, in eval
    mode; its parameters require grad only when `trainable`."""
    cls = get_architecture(imported.architecture)
    cfg, unknown = _validated_config(cls, imported)
    metadata = dict(imported.metadata)
    if unknown:
        metadata.setdefault("unknown_hyperparameters", unknown)
    d_out = int(imported.d_out) if imported.d_out is not None else None
    try:
        d = cls(cfg, int(imported.d_in), metadata=metadata, d_out=d_out)
    except ValueError as e:
        raise UserError(f"{imported.architecture} dictionary: {e}") from None
    tensors = {k: v.detach().to("cpu") for k, v in imported.tensors.items()}
    d.prepare_for_weights(tensors)
    try:
        d.load_weights(tensors)
    except ValueError as e:
        raise UserError(f"{imported.architecture} dictionary: {e}") from None
    d = d.to(device=device, dtype=dtype) if dtype is not None else d.to(device=device)
    d.requires_grad_(trainable)
    return d.eval()


class Header(NamedTuple):
    """What a dictionary folder of ours says about its dictionary, without reading its weights."""

    architecture: str
    d_in: int
    d_sae: int
    hyperparameters: Any  # the architecture's Config
    metadata: dict[str, Any]
    d_out: int | None  # a transcoder's output width (None: d_in)


def read_header(directory: str | Path) -> Header:
    """The cfg.json of a dictionary folder in our format, its hyperparameters validated as
    `load` validates them (a dictionary saved as feature shards may not fit in memory)."""
    imported = ours.read(Path(directory), with_tensors=False)
    cfg, _ = _validated_config(get_architecture(imported.architecture), imported)
    return Header(imported.architecture, int(imported.d_in), int(imported.d_sae), cfg, dict(imported.metadata),
                  None if imported.d_out is None else int(imported.d_out))


def _validated_config(cls, imported: Imported):
    """(the architecture's Config from the folder's hyperparameters at its width, the names it
    does not know, which are dropped)."""
    # a field the file lacks was not used when it was trained (ReLU's b_enc_lr_scale: 1), not the new default
    hyper = {**cls.Config.values_when_absent(), **imported.hyperparameters, "architecture": imported.architecture,
             "d_sae": int(imported.d_sae), "expansion_factor": None}
    known = set(cls.Config.model_fields)
    try:
        cfg = cls.Config.model_validate({k: v for k, v in hyper.items() if k in known})
    except Exception as e:  # pydantic ValidationError -> one line
        lines = str(e).splitlines()
        raise UserError(f"hyperparameters of a {imported.architecture} dictionary do not validate: "
                        f"{lines[0]} ({'; '.join(lines[1:3])})") from None
    return cfg, sorted(set(hyper) - known)


def _load_folder(directory: Path, fmt: str, device: torch.device, dtype: torch.dtype | None, trainable: bool):
    imported = _READERS[fmt].read(directory)
    if fmt != OURS:
        imported.metadata.setdefault("imported_from", str(directory))
    return build_dictionary(imported, device, dtype if dtype is not None else find_dtype(imported.dtype) or torch.float32, trainable)


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
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if format != "auto" and format not in FORMATS:
        raise UserError(f"format {format!r} unknown; use auto or one of {', '.join(FORMATS)}")
    dev, dt = _resolve(device, dtype)
    directory = _as_dir(p)
    fmt = detect_format(directory) if format == "auto" else format
    if fmt is not None:
        return _load_folder(directory, fmt, dev, dt, trainable=False)
    return {name: _load_folder(folder, fmt, dev, dt, trainable=False)
            for name, folder, fmt in dictionary_dirs(directory)}


def load_run(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> dict:
    """Like `load`, but always {name: dictionary} (a single dictionary folder gives one entry)."""
    out = load(path, device=device, dtype=dtype)
    if isinstance(out, dict):
        return out
    return {Path(path).expanduser().resolve().name: out}


def load_dictionary(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """One dictionary folder, any format `load` reads, with trainable parameters (eval mode): what
    the trainer and `python -m eval` load. A folder of dictionaries is refused, naming them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not found; give a dictionary folder (cfg.json + sae.safetensors)")
    fmt = detect_format(directory)
    if fmt is None:
        inside = sorted(p.name for p in directory.iterdir() if p.is_dir() and detect_format(p) is not None)
        if inside:
            raise UserError(f"{directory} holds several dictionaries ({', '.join(inside)}); give their folders, "
                            f"e.g. {directory / inside[0]}")
        raise UserError(f"{directory}: not a dictionary folder (no cfg.json + sae.safetensors, SAELens "
                        f"cfg.json + sae_weights.safetensors, or dictionary_learning ae.pt)")
    dev, dt = _resolve(device, dtype)
    return _load_folder(directory, fmt, dev, dt, trainable=True)


def dictionary_dirs(root: Path, max_depth: int = 2) -> list[tuple[str, Path, str]]:
    """(name relative to root, folder, format) of the dictionary folders under a run folder
    (breadth first); a UserError when there is none."""
    found = list(_walk_dictionary_dirs(root, max_depth))
    if not found:
        raise UserError(f"{root}: neither a dictionary folder (cfg.json + sae.safetensors, cfg.json + "
                        f"sae_weights.safetensors, or ae.pt) nor a folder holding some")
    return found


def _walk_dictionary_dirs(root: Path, max_depth: int) -> Iterator[tuple[str, Path, str]]:
    level = [root]
    for _ in range(max_depth):
        deeper = []
        for folder in level:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                fmt = detect_format(child)
                if fmt is not None:
                    yield str(child.relative_to(root)), child, fmt
                elif child.name not in _NOT_DICTIONARY_FOLDERS:
                    deeper.append(child)
        level = deeper


def _as_dir(path: Path) -> Path:
    """A file of a dictionary folder (cfg.json, sae.safetensors, ae.pt, ...) -> its folder."""
    return path.parent if path.is_file() else path


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype | None]:
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dtype is None or isinstance(dtype, torch.dtype):
        return dev, dtype
    dt = find_dtype(dtype)
    if dt is None:
        raise UserError(f"dtype {dtype!r} unknown; use float32, bfloat16 or float16")
    return dev, dt
