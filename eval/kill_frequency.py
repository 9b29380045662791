"""The feature frequencies that decide what pruning and the frequency ablation kill, measured on
training tokens.

The pruned dictionaries are scored on held-out tokens; choosing the kill set on those same tokens
would fit the choice to the test. So the kill decision reads frequencies from training tokens:
`CacheSlice`, the first tokens of an activation cache (a training run's, by default), or
`TrainingSplitPass`, model forwards over contexts of the training split (a run streamed from the
model, or `python -m eval prune` without --cache). The frequency in eval.json and the histogram
stays the held-out measurement (METRICS.md: frequency over the evaluated tokens).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from eval.outputs import frequency_tokens, read_frequency_file
from sae.cache import ActivationCapture, Manifest, load_shard, open_cache
from sae.config import DEFAULT_FREQUENCY_TOKENS
from sae.errors import CacheError, UserError
from sae.progress import token_bar
from sae.text import DataConfig, keep_mask, load_contexts

_ENCODE_ROWS = 4096  # rows per encoder call: bounds the [rows, d_sae] activations in memory


@dataclass
class KillFrequencies:
    """Per-dictionary feature frequencies and where they were measured (for cfg.json's `pruning`
    block and ablation.json)."""

    frequency: dict[str, Tensor]  # name -> [d_sae] float32, fraction of the tokens with f_i != 0
    source: str  # a phrase: what tokens, from where
    tokens: int | None  # tokens counted (None: a file that does not record it)


class TrainingActivations(Protocol):
    """Activations of training tokens, in batches: {hook: [rows, d_in]}, the same rows for each hook."""

    description: str

    def batches(self, hooks: Sequence[str], progress: bool = True) -> Iterator[dict[str, Tensor]]: ...


class CacheSlice:
    """The first `n_tokens` kept tokens of an activation cache, in text order (whole shards, the last
    one cut); all of them when the cache holds fewer."""

    def __init__(self, cache_dir: str | Path, n_tokens: int = DEFAULT_FREQUENCY_TOKENS):
        self.manifest = open_cache(cache_dir)
        self.n_tokens = min(int(n_tokens), self.manifest.n_tokens)
        self.description = f"training tokens of the activation cache {self.manifest.cache_dir}"

    def batches(self, hooks: Sequence[str], progress: bool = True) -> Iterator[dict[str, Tensor]]:
        m = self.manifest
        missing = [h for h in hooks if h not in m.hooks]
        if missing:
            raise CacheError(f"activation cache {m.cache_dir} has no hook point(s) {missing} (it holds "
                             f"{m.hooks}); give the cache of the run that trained the dictionary")
        left = self.n_tokens
        with token_bar(self.n_tokens, desc="kill frequencies (cache)", enabled=progress) as bar:
            for shard in sorted(m.shards, key=lambda s: s.index):
                if left <= 0:
                    return
                rows = load_shard(m, shard.index, list(hooks))
                take = min(left, shard.n_tokens)
                yield {h: rows[h][:take] for h in hooks}
                left -= take
                bar.update(take)


class TrainingSplitPass:
    """Model forwards over training-split contexts [n_ctx, ctx] (their kept tokens)."""

    def __init__(self, model: Any, tokens: Tensor, keep: Tensor, batch_contexts: int, description: str):
        self.model, self.tokens, self.keep = model, tokens, keep
        self.batch_contexts = int(batch_contexts)
        self.description = description

    def batches(self, hooks: Sequence[str], progress: bool = True) -> Iterator[dict[str, Tensor]]:
        with ActivationCapture(self.model, list(hooks)) as capture, \
                token_bar(int(self.keep.sum()), desc="kill frequencies (model)", enabled=progress) as bar:
            for start in range(0, self.tokens.shape[0], self.batch_contexts):
                keep = self.keep[start:start + self.batch_contexts]
                yield capture.kept_rows(self.tokens[start:start + self.batch_contexts], keep)
                bar.update(int(keep.sum()))


def training_split_pass(model: Any, data_cfg: DataConfig, n_tokens: int, batch_contexts: int) -> TrainingSplitPass:
    """The first n_tokens (whole contexts) of the training split of `data_cfg`'s text."""
    try:
        tokens = load_contexts(data_cfg, model.tokenizer, split="train", n_tokens=n_tokens)
    except UserError as e:  # "data source X has only N train tokens, M asked for; <advice for training>"
        raise UserError(f"{str(e).split(';')[0]}: these are the training tokens the kill decisions are measured "
                        f"on; lower --frequency-tokens (prune.frequency_tokens)") from e
    keep = keep_mask(tokens, model.tokenizer, data_cfg.exclude_tokens)
    return TrainingSplitPass(model, tokens, keep, batch_contexts,
                             f"a training-split pass over {data_cfg.source} (model forwards)")


def run_training_activations(cache_dir: str | Path | None, model: Any, data_cfg: DataConfig, n_tokens: int,
                             batch_contexts: int) -> TrainingActivations:
    """A training run's: its activation cache when it has a complete one, else (a streamed run, or a
    cache deleted since) a training-split pass over the same first tokens it trained on."""
    if cache_dir is not None:
        try:
            if Manifest.load(cache_dir).complete:
                return CacheSlice(cache_dir, n_tokens)
        except CacheError:
            pass  # no cache (deleted, or never harvested): the model pass below
    return training_split_pass(model, data_cfg, n_tokens, batch_contexts)


def input_hook(dictionary: Any) -> str:
    """The hook whose activations the dictionary encodes (a transcoder's input_hook)."""
    cfg = getattr(dictionary, "cfg", None)
    if getattr(dictionary, "is_transcoder", False) and getattr(cfg, "input_hook", None):
        return cfg.input_hook
    hook = dictionary.metadata.get("hook_name")
    if not hook:
        raise UserError("a dictionary without a hook_name in its cfg.json: cannot tell which activations "
                        "its kill frequencies are measured on")
    return hook


@torch.no_grad()
def measure_kill_frequencies(dictionaries: Mapping[str, Any], activations: TrainingActivations,
                             progress: bool = True) -> KillFrequencies:
    """Each dictionary's feature frequencies over the tokens of `activations` (shared reads or forwards)."""
    hooks = {name: input_hook(d) for name, d in dictionaries.items()}
    counts = {name: torch.zeros(d.d_sae, dtype=torch.long, device=d.W_enc.device) for name, d in dictionaries.items()}
    n_rows = 0
    with _eval_mode(dictionaries.values()):
        for batch in activations.batches(sorted(set(hooks.values())), progress):
            for name, d in dictionaries.items():
                counts[name] += firing_counts(d, batch[hooks[name]], name)
            n_rows += next(iter(batch.values())).shape[0]
    if n_rows == 0:
        raise UserError(f"no kept tokens in {activations.description} to measure feature frequencies on")
    frequency = {name: (c.double() / n_rows).float().cpu() for name, c in counts.items()}
    return KillFrequencies(frequency, activations.description, n_rows)


def firing_counts(dictionary: Any, x: Tensor, name: str = "dictionary") -> Tensor:
    """[d_sae] long: on how many rows of x [rows, d_in] each feature fires (f_i != 0)."""
    if x.shape[-1] != dictionary.d_in:
        raise UserError(f"{name} takes d_in={dictionary.d_in} but the training activations have width "
                        f"{x.shape[-1]}: they are of another model or hook point")
    p = dictionary.W_enc
    counts = torch.zeros(dictionary.d_sae, dtype=torch.long, device=p.device)
    for start in range(0, x.shape[0], _ENCODE_ROWS):
        f = dictionary.encode(x[start:start + _ENCODE_ROWS].to(device=p.device, dtype=p.dtype))
        counts += (f != 0).sum(dim=0)
    return counts


@contextlib.contextmanager
def _eval_mode(dictionaries):
    """Inference mode for the duration (as the evaluator encodes: e.g. BatchTopK's learned threshold)."""
    was = [(d, d.training) for d in dictionaries]
    try:
        for d, _ in was:
            d.eval()
        yield
    finally:
        for d, training in was:
            d.train(training)


def read_kill_frequencies(path: str | Path, name: str, d_sae: int) -> KillFrequencies:
    """An explicit frequency file (--frequency-file: a frequency.safetensors or one like it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--frequency-file {path} not found")
    frequency, meta = read_frequency_file(path, d_sae)
    tokens = frequency_tokens(meta)
    origin = "the held-out evaluation" if meta.get("source") == "eval" else meta.get("source") or "origin not recorded"
    if meta.get("source") == "eval":
        print(f"note: {path} was measured on held-out tokens: the kill set is chosen on the tokens the pruned "
              f"dictionary is evaluated on (without --frequency-file: on training tokens)", flush=True)
    return KillFrequencies({name: frequency.float()}, f"{path} ({origin})", tokens)


def folder_kill_frequencies(group: Any, name: str, *, frequency_file: str | Path | None = None,
                            cache_dir: str | Path | None = None, n_tokens: int | None = None,
                            batch_contexts: int = 8, progress: bool = True) -> KillFrequencies:
    """The command line's kill frequencies of a loaded dictionary (`group`: an eval.folders
    LoadedGroup): --frequency-file, else the first --frequency-tokens of --cache, else a
    training-split pass over the text of its cfg.json (or --data)."""
    d = group.dictionaries[name]
    if frequency_file is not None and cache_dir is not None:
        raise UserError("give --frequency-file or --cache, not both")
    if frequency_file is not None:
        found = read_kill_frequencies(frequency_file, name, d.d_sae)
    else:
        n_tokens = DEFAULT_FREQUENCY_TOKENS if n_tokens is None else n_tokens
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise UserError(f"--frequency-tokens must be a positive integer, got {n_tokens!r}")
        if cache_dir is not None:
            activations = CacheSlice(cache_dir, n_tokens)
            _check_cache_model(activations.manifest, group.model_name)
        else:
            activations = training_split_pass(group.model, group.data_cfg, n_tokens, batch_contexts)
        found = measure_kill_frequencies({name: d}, activations, progress)
    tokens = "" if found.tokens is None else f", {found.tokens} tokens"
    print(f"kill decisions from the feature frequencies of {name} on {found.source}{tokens}", flush=True)
    return found


def _check_cache_model(manifest: Manifest, model_name: str) -> None:
    cached = manifest.identity.get("model")
    if cached is not None and cached != model_name:
        raise UserError(f"activation cache {manifest.cache_dir} holds activations of model {cached!r}, but the "
                        f"dictionary is of {model_name!r}: give the cache of the run that trained it")
