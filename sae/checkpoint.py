"""Training checkpoints: one file holding everything needed to resume a run bit-identically.

`out_dir/checkpoints/checkpoint-<step>.pt` is a `torch.save` of plain containers of tensors,
numbers and strings (loadable with `torch.load(weights_only=True)`: no pickled code), written
atomically (temporary file + fsync + rename, see `sae.io`). A new checkpoint is complete on disk
before the previous one is removed, so at every moment (SIGKILL included) the directory holds at
least one good checkpoint once the first has been written. Temporary files a killed run left
behind are removed on the next save or load.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from sae import io

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _remove_stale_temporaries(directory: Path) -> None:
    for p in directory.glob(".checkpoint-*.tmp"):
        p.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as the checkpoint of `step`, then remove every older checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    path = directory / f"checkpoint-{step:010d}.pt"
    with io.atomic_path(path) as tmp:
        torch.save(state, tmp)
    for _, old in _checkpoints(directory):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, or None when there is none.

    A file that fails to load (it cannot happen through `save_checkpoint`, but disks fail) is
    reported and skipped in favour of an older one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    _remove_stale_temporaries(directory)
    for _, path in _checkpoints(directory):
        try:
            return path, torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to an older one
            warnings.warn(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); trying an older one")
    return None


def latest_path(directory: str | Path) -> Path | None:
    found = _checkpoints(Path(directory))
    return found[0][1] if found else None


def remove_checkpoints(directory: str | Path) -> None:
    directory = Path(directory)
    if not directory.is_dir():
        return
    for _, p in _checkpoints(directory):
        p.unlink(missing_ok=True)
    _remove_stale_temporaries(directory)
    try:
        directory.rmdir()
    except OSError:
        pass
