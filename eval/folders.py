"""Evaluating dictionary folders (`python -m eval evaluate`, and the loading behind prune,
ablate-frequency and features): each folder's cfg.json names the model and the text it was trained
on; folders that share both form one group, evaluated on the same held-out tokens with shared
forwards, each with its training mean x̄ (its activation_mean.safetensors, else computed)."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from eval.evaluate import DEFAULT_BATCH_CONTEXTS, EvalResult, as_targets, evaluate_dictionaries
from eval.outputs import eval_info, write_all
from eval.sharded import ShardView
from sae import distributed as dist
from sae import sharding
from sae.errors import UserError
from sae.loading import detect_format, load_dictionary
from sae.means import MEAN_FILE, MEAN_TOKENS, means_from_model, read_mean
from sae.models import load_model, resolve_device
from sae.text import DataConfig, keep_mask, load_contexts

DEFAULT_EVAL_TOKENS = 16_384  # the CLI's --tokens default (= the run config's eval_tokens default)


def check_counts(n_tokens: int | None = None, batch_size: int | None = None,
                 mean_tokens: int | None = None) -> None:
    """The command line's counts (--tokens, --batch-size, --mean-tokens) must be positive integers
    (UserError); None: not given, nothing to check."""
    for flag, value in (("--tokens", n_tokens), ("--batch-size", batch_size), ("--mean-tokens", mean_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise UserError(f"{flag} must be a positive integer, got {value!r}")


def counts_or_defaults(n_tokens: int | None, batch_size: int | None,
                       mean_tokens: int | None) -> tuple[int, int, int]:
    """The command line's counts with the defaults filled in for those not given, checked."""
    counts = (DEFAULT_EVAL_TOKENS if n_tokens is None else n_tokens,
              DEFAULT_BATCH_CONTEXTS if batch_size is None else batch_size,
              MEAN_TOKENS if mean_tokens is None else mean_tokens)
    check_counts(*counts)
    return counts


@dataclass
class LoadedGroup:
    """Dictionaries that share a model and a held-out token set (one forward pass serves them all);
    `prepare` loads the tokens and the training means, `evaluate` runs."""

    model: Any
    model_name: str
    data_cfg: DataConfig
    names: list[str]
    dirs: dict[str, Path]
    dictionaries: dict[str, Any]
    tokens: Tensor | None = None
    keep: Tensor | None = None
    means: dict[str, Tensor] = field(default_factory=dict)
    mean_sources: dict[str, str] = field(default_factory=dict)

    def prepare(self, n_tokens: int, batch_size: int, mean_tokens: int = MEAN_TOKENS) -> "LoadedGroup":
        self.tokens, self.keep = heldout_tokens(self.model, self.data_cfg, n_tokens)
        self.means, self.mean_sources = training_means(self, batch_size, mean_tokens)
        return self

    def evaluate(self, targets: Mapping[str, Any], batch_size: int, progress: bool = True,
                 means_of: Mapping[str, str] | None = None) -> dict[str, EvalResult]:
        """Evaluate on the group's tokens. means_of: target name -> the loaded dictionary whose
        training mean it uses (default: its own name)."""
        means_of = dict(means_of or {})
        prepared = {}
        for name, t in as_targets(targets).items():
            source = means_of.get(name, name)
            t.train_mean = self.means[source] if t.train_mean is None else t.train_mean
            t.info = {"mean_ablation_source": self.mean_sources[source], **t.info}
            prepared[name] = t
        return evaluate_dictionaries(self.model, prepared, self.tokens, self.keep, batch_size=batch_size,
                                     info=eval_info(self.data_cfg), progress=progress)


def unique_folder_names(dirs: list[Path]) -> list[str]:
    """Folder names, made unique with parent folders where two collide (the names results go by)."""
    names = [d.resolve().name for d in dirs]
    for i, d in enumerate(dirs):
        if names.count(names[i]) > 1:
            names[i] = f"{d.resolve().parent.name}/{d.resolve().name}"
    if len(set(names)) != len(names):
        names = [str(d) for d in dirs]
    return names


def data_config_for(dictionary, data_source: str | None = None) -> DataConfig:
    """The DataConfig of the text the dictionary was trained on (its held-out split is evaluated)."""
    raw = dictionary.metadata.get("dataset")
    if raw is None and data_source is None:
        raise UserError("the dictionary's cfg.json records no dataset; pass --data SOURCE (e.g. shakespeare, "
                        "a local text file or a hub dataset id) to choose the held-out text")
    if isinstance(raw, str):
        raw = {"source": raw}
    raw = dict(raw or {})
    if data_source is not None:
        raw["source"] = data_source
    ctx = dictionary.metadata.get("context_size")
    if ctx is not None and "context_size" not in raw:
        raw["context_size"] = ctx
    try:
        return DataConfig.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: one line
        raise UserError(f"dataset recorded in cfg.json is not a valid data config: {str(e).splitlines()[0]}") from e


def load_groups(dirs: list[str | Path], device: str = "auto", dtype: str | None = None,
                data_source: str | None = None, load: Callable[..., Any] = load_dictionary) -> list[LoadedGroup]:
    """Load dictionaries from folders and their models; one group per (model, held-out text).
    load(folder, device=): how a folder becomes a dictionary (default: whole, in this process)."""
    dev = dist.device_for_rank(resolve_device(device) if isinstance(device, str) else torch.device(device))
    paths = [Path(p) for p in dirs]
    groups: dict[tuple, dict] = {}
    for name, path in zip(unique_folder_names(paths), paths):
        d = load(path, device=dev)
        model_name = d.metadata.get("model_name")
        if not model_name:
            raise UserError(f"{path}/cfg.json records no model_name; cannot tell which model to run")
        data_cfg = data_config_for(d, data_source)
        key = (model_name, json.dumps(data_cfg.model_dump(mode="json"), sort_keys=True))
        g = groups.setdefault(key, {"model_name": model_name, "data_cfg": data_cfg, "names": [], "dirs": {},
                                    "dictionaries": {}})
        g["names"].append(name)
        g["dirs"][name] = path
        g["dictionaries"][name] = d
    out = []
    for g in groups.values():
        model_dtype = dtype or next(iter(g["dictionaries"].values())).metadata.get("model_dtype") or "float32"
        if dist.is_main():
            print(f"loading model {g['model_name']} ({model_dtype}) on {dev}", flush=True)
        model = load_model(g["model_name"], device=dev, dtype=model_dtype)
        out.append(LoadedGroup(model=model, **g))
    return out


def heldout_tokens(model, data_cfg: DataConfig, n_tokens: int) -> tuple[Tensor, Tensor]:
    tokens = load_contexts(data_cfg, model.tokenizer, split="heldout", n_tokens=n_tokens)
    return tokens, keep_mask(tokens, model.tokenizer, data_cfg.exclude_tokens)


def training_means(group: LoadedGroup, batch_size: int,
                   mean_tokens: int = MEAN_TOKENS) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Each dictionary's x̄ over training tokens: its folder's activation_mean.safetensors, or
    (computed once per hook) the mean over `mean_tokens` training-split tokens. Returns
    (name -> mean, name -> a sentence saying where it came from)."""
    means: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    missing: dict[str, list[str]] = {}  # hook -> names
    for name, d in group.dictionaries.items():
        mean = read_mean(group.dirs[name])
        if mean is None:
            missing.setdefault(d.metadata["hook_name"], []).append(name)
        else:
            means[name], sources[name] = mean, f"{MEAN_FILE} (training tokens)"
    if missing:
        tokens, keep = _mean_tokens(group, mean_tokens)
        n = int(keep.sum())
        if dist.is_main():
            print(f"no {MEAN_FILE} for {', '.join(sum(missing.values(), []))}: computing the mean activation "
                  f"for the mean-ablation baseline from {n} training-split tokens", flush=True)
        computed = means_from_model(group.model, list(missing), tokens, keep, batch_size)
        for hook, names in missing.items():
            for name in names:
                means[name], sources[name] = computed[hook], f"computed from {n} training-split tokens"
    return means, sources


def _mean_tokens(group: LoadedGroup, n_tokens: int) -> tuple[Tensor, Tensor]:
    try:
        tokens = load_contexts(group.data_cfg, group.model.tokenizer, split="train", n_tokens=n_tokens)
    except UserError as e:
        raise UserError(f"{e} (these are the training tokens for the mean-ablation baseline's x̄, needed "
                        f"because there is no {MEAN_FILE}: lower --mean-tokens)") from e
    return tokens, keep_mask(tokens, group.model.tokenizer, group.data_cfg.exclude_tokens)


def expand_run_dirs(dirs: list[str | Path]) -> list[Path]:
    """Each folder that is not itself a dictionary but holds some (a run) -> those, sorted."""
    out: list[Path] = []
    for d in map(Path, dirs):
        inside = [] if not d.is_dir() or detect_format(d) is not None else \
            sorted(p for p in d.iterdir() if p.is_dir() and detect_format(p) is not None)
        out.extend(inside or [d])
    return out


def evaluate_dirs(dirs: list[str | Path], n_tokens: int = DEFAULT_EVAL_TOKENS,
                  batch_size: int = DEFAULT_BATCH_CONTEXTS, device: str = "auto", dtype: str | None = None,
                  data_source: str | None = None, mean_tokens: int = MEAN_TOKENS,
                  write: bool = True, progress: bool = True, feature_sharded: bool = False) -> dict[str, EvalResult]:
    """`python -m eval evaluate`: evaluate dictionary folders (a run folder stands for every
    dictionary in it), writing eval.json etc. into each. feature_sharded (under torchrun): every
    rank loads only its shard of each dictionary's features and they evaluate together
    (eval.sharded: the same numbers); rank 0 writes."""
    check_counts(n_tokens, batch_size, mean_tokens)
    dirs = expand_run_dirs(dirs)
    load = _shard_loader(device) if feature_sharded else load_dictionary
    results: dict[str, EvalResult] = {}
    for group in load_groups(dirs, device=device, dtype=dtype, data_source=data_source, load=load):
        group.prepare(n_tokens, batch_size, mean_tokens)
        group_results = group.evaluate(group.dictionaries, batch_size, progress and dist.is_main())
        if write and dist.is_main():
            write_all(group_results, group.dirs)
        results.update(group_results)
    return results


def _shard_loader(device: str) -> Callable[..., Any]:
    """load(folder, device=) giving this rank's shard of the dictionary's features, seen as the
    whole dictionary (eval.sharded.ShardView); the mesh spans every rank of torchrun."""
    if not dist.is_distributed():
        raise UserError("--feature-sharded splits each dictionary's features over the ranks of torchrun: "
                        "launch with torchrun --nproc-per-node N -m eval evaluate ... --feature-sharded")
    dev = dist.device_for_rank(resolve_device(device))
    shards = sharding.make_mesh(sharding.layout_for(dist.world_size(), dist.rank(), None), dev)
    return lambda folder, device: ShardView(sharding.load_shard_of(folder, shards, device), shards)
