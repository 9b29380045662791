"""Training checkpoints: one folder per dictionary, each file enough to resume that dictionary
bit-identically.

`out_dir/checkpoints/<name>/checkpoint-<step>.pt` is a `torch.save` of plain containers of tensors,
numbers and strings (loadable with `torch.load(weights_only=True)`: no pickled code), written
atomically (temporary file + fsync + rename, see `sae.io`). A new checkpoint is complete on disk
before the previous one is removed, so at every moment (SIGKILL included) a dictionary's folder
holds at least one good checkpoint once the first has been written. Temporary files a killed run
left behind are removed on the next save or load. Each dictionary's checkpoint records its own
step (its position in the batch stream) and the settings it was trained with, so a sweep whose
entries change resumes the unchanged ones and restarts only the others, under any placement and
any number of ranks.

Checkpoints of sae-dict 0.x before per-dictionary checkpoints (one `checkpoint-<step>.pt` for
every dictionary, directly in `checkpoints/` or in `checkpoints/rank-<r>/`) are refused with one
line (`refuse_single_file_checkpoints`), never misread.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from sae import io
from sae.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def member_dir(out_dir: str | Path, name: str) -> Path:
    """Where the checkpoints of dictionary `name` of a run in `out_dir` go."""
    return checkpoint_dir(out_dir) / name


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _remove_stale_temporaries(directory: Path) -> None:
    for p in directory.glob(".checkpoint-*.tmp"):
        p.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep_older: bool = False) -> Path:
    """Write `state` as the checkpoint of `step`, then remove every other checkpoint in `directory`
    (`keep_older`: not yet; the feature shards of a dictionary remove theirs with `remove_others`
    once every shard has written the new one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    path = directory / f"checkpoint-{step:010d}.pt"
    with io.atomic_path(path) as tmp:
        torch.save(state, tmp)
    if not keep_older:
        remove_others(directory, step)
    return path


def remove_others(directory: str | Path, step: int) -> None:
    """Remove every checkpoint in `directory` but the one of `step`."""
    for old_step, old in _checkpoints(Path(directory)):
        if old_step != step:
            old.unlink(missing_ok=True)


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, or None when there is none.

    Its tensors are memory-mapped (a sweep's checkpoints are all opened before the first one is
    needed). A file that fails to load (it cannot happen through `save_checkpoint`, but disks
    fail) is reported and skipped in favour of an older one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    _remove_stale_temporaries(directory)
    for _, path in _checkpoints(directory):
        try:
            return path, torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to an older one
            warnings.warn(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); trying an older one")
    return None


def latest_path(directory: str | Path) -> Path | None:
    found = _checkpoints(Path(directory))
    return found[0][1] if found else None


def remove_checkpoints(directory: str | Path) -> None:
    """Remove a folder's checkpoints (and the folder, once empty)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for _, p in _checkpoints(directory):
        p.unlink(missing_ok=True)
    _remove_stale_temporaries(directory)
    remove_if_empty(directory)


def remove_if_empty(directory: str | Path) -> None:
    try:
        Path(directory).rmdir()
    except OSError:  # not empty (or already gone)
        pass


def members_with_checkpoints(out_dir: str | Path) -> list[str]:
    """The names of the dictionaries that have a checkpoint folder in `out_dir`."""
    root = checkpoint_dir(out_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _checkpoints(p)) if root.is_dir() else []


def refuse_single_file_checkpoints(out_dir: str | Path, names: list[str]) -> None:
    """ConfigError for a checkpoint written by the single-file format (every dictionary in one file,
    in `checkpoints/` or `checkpoints/rank-<r>/`; `names` are today's dictionaries, whose folders
    are not taken for rank folders)."""
    root = checkpoint_dir(out_dir)
    ranks = [d for d in sorted(root.glob("rank-[0-9][0-9][0-9]")) if d.name not in names]
    for directory in [root, *ranks]:
        found = latest_path(directory)
        if found is not None:
            raise ConfigError(f"{found} is a checkpoint of an earlier sae-dict (one file for every dictionary), "
                              f"which this version cannot resume: finish that run with the version that wrote "
                              f"it, or delete {root} to train from the start")


def changed_settings(saved: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'key: saved -> wanted' for every (nested, dotted) key whose value differs between two records
    of what a dictionary was trained with."""
    out = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _plain(value: Any) -> Any:
    """Compare as JSON would store it (tuples as lists)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
