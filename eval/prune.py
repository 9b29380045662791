"""Pruning: kill the features whose frequency lies outside a band and write the smaller dictionary.

The kept band is min_frequency < frequency <= max_frequency (so `min_frequency 0` kills exactly the
dead features), minus any `kill_ids`. The smaller dictionary comes from
`SparseDictionary.pruned(keep_ids, mode)` and encodes exactly like the original with the other
features killed. Its cfg.json `pruning` block records the original ids (new feature i is original
feature kept_feature_ids[i], composed through earlier prunings), the rule, the kill mode and where
the frequencies came from (training tokens, by default: eval/kill_frequency.py) and their token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from eval import report
from eval.folders import counts_or_defaults, load_groups
from eval.kill_frequency import folder_kill_frequencies
from eval.outputs import write_outputs
from sae import io
from sae.errors import UserError
from sae.means import copy_mean


def parse_ids(text: str | Iterable[int] | None) -> list[int]:
    if text is None:
        return []
    if isinstance(text, str):
        try:
            return [int(t) for t in text.replace(" ", "").split(",") if t]
        except ValueError:
            raise UserError(f"--kill-ids {text!r}: expected comma-separated integers like 3,17,42") from None
    return [int(t) for t in text]


def kill_mask_from_frequency(frequency: Tensor, max_frequency: float | None = None,
                             min_frequency: float | None = None, kill_ids: Iterable[int] | None = None) -> Tensor:
    """[d_sae] bool, True = killed: frequency > max_frequency, frequency <= min_frequency, or in kill_ids."""
    # Compared in float32, the precision frequencies are stored in (so a frequency printed as 0.001
    # and a threshold of 0.001 compare equal).
    frequency = frequency.detach().flatten().cpu().float()
    d_sae = frequency.numel()
    killed = torch.zeros(d_sae, dtype=torch.bool)
    if max_frequency is not None:
        if not 0 <= max_frequency <= 1:
            raise UserError(f"max_frequency must be in [0, 1], got {max_frequency}")
        killed |= frequency > torch.tensor(max_frequency, dtype=torch.float32)
    if min_frequency is not None:
        if not 0 <= min_frequency <= 1:
            raise UserError(f"min_frequency must be in [0, 1], got {min_frequency}")
        killed |= frequency <= torch.tensor(min_frequency, dtype=torch.float32)
    ids = parse_ids(kill_ids)
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise UserError(f"kill ids {bad[:5]} out of range: the dictionary has features 0..{d_sae - 1}")
    if ids:
        killed[torch.tensor(ids, dtype=torch.long)] = True
    return killed


@dataclass
class PruneResult:
    dictionary: Any  # the smaller SparseDictionary
    kill_mask: Tensor  # [original d_sae] bool, relative to the dictionary that was pruned
    record: dict[str, Any]  # what went into cfg.json's `pruning` block


@torch.no_grad()
def prune_dictionary(dictionary, kill_mask: Tensor, mode: str = "after", *, max_frequency: float | None = None,
                     min_frequency: float | None = None, kill_ids: Iterable[int] | None = None,
                     frequency_source: str | None = None, frequency_tokens: int | None = None,
                     name: str | None = None) -> PruneResult:
    """The smaller dictionary without the killed features, with its provenance in metadata["pruning"]."""
    if mode not in ("after", "before"):
        raise UserError(f"kill mode must be 'after' or 'before', got {mode!r}")
    kill_mask = kill_mask.detach().to(torch.bool).cpu().flatten()
    if kill_mask.numel() != dictionary.d_sae:
        raise ValueError(f"kill_mask has {kill_mask.numel()} entries, the dictionary {dictionary.d_sae} features")
    keep_ids = (~kill_mask).nonzero().flatten()
    if keep_ids.numel() == 0:
        raise UserError(f"these thresholds kill all {dictionary.d_sae} features; nothing would be left to "
                        f"write (raise --max-frequency or lower --min-frequency)")
    previous = dict(dictionary.metadata.get("pruning") or {})
    pruned = dictionary.pruned(keep_ids, mode)
    record = dict(pruned.metadata.get("pruning") or {})
    if previous.get("kept_feature_ids") is not None:
        # Compose with the earlier pruning so ids always refer to the first, unpruned dictionary.
        prev_kept = torch.tensor(previous["kept_feature_ids"], dtype=torch.long)
        original_d_sae = int(previous.get("original_d_sae", dictionary.d_sae))
        kept = prev_kept[keep_ids]
        killed_all = torch.ones(original_d_sae, dtype=torch.bool)
        killed_all[kept] = False
        record["original_d_sae"] = original_d_sae
        record["kept_feature_ids"] = kept.tolist()
        record["killed_feature_ids"] = killed_all.nonzero().flatten().tolist()
        record["previous"] = {k: v for k, v in previous.items() if k not in ("kept_feature_ids", "killed_feature_ids")}
    else:
        record.setdefault("original_d_sae", dictionary.d_sae)
        record["kept_feature_ids"] = keep_ids.tolist()
        record["killed_feature_ids"] = kill_mask.nonzero().flatten().tolist()
    record.update({
        "kill_mode": mode,
        "max_frequency": max_frequency,
        "min_frequency": min_frequency,
        "kill_ids": parse_ids(kill_ids),
        "killed": int(kill_mask.sum()),
        "frequency_source": frequency_source,
        "frequency_tokens": frequency_tokens,
    })
    pruned.metadata["pruning"] = record
    if name is not None and hasattr(pruned.cfg, "name"):
        pruned.cfg = pruned.cfg.model_copy(update={"name": name})
    return PruneResult(pruned, kill_mask, record)


def original_ids(dictionary) -> Tensor:
    """new feature id -> original feature id (identity for an unpruned dictionary)."""
    record = dictionary.metadata.get("pruning") or {}
    if record.get("kept_feature_ids") is None:
        return torch.arange(dictionary.d_sae)
    return torch.tensor(record["kept_feature_ids"], dtype=torch.long)


def save_pruned(result: PruneResult, out_dir: str | Path, source_dir: str | Path | None = None) -> Path:
    """Write the pruned dictionary (sae.safetensors + cfg.json) and carry the source folder's
    training mean along (same hook, same training tokens)."""
    out_dir = Path(out_dir)
    if source_dir is not None and Path(source_dir).resolve() == out_dir.resolve():
        raise UserError(f"--out {out_dir} is the dictionary's own folder; write the pruned dictionary elsewhere")
    result.dictionary.save(out_dir)
    if source_dir is not None:
        copy_mean(source_dir, out_dir)
    return out_dir


def describe(record: dict[str, Any], d_sae: int) -> str:
    parts = []
    if record.get("max_frequency") is not None:
        parts.append(f"frequency > {record['max_frequency']:g}")
    if record.get("min_frequency") is not None:
        parts.append(f"frequency <= {record['min_frequency']:g}")
    if record.get("kill_ids"):
        parts.append(f"{len(record['kill_ids'])} listed ids")
    rule = " or ".join(parts) or "no rule"
    killed = record.get("killed", 0)
    what = "kills no feature" if killed == 0 else f"kills {killed} of {d_sae} features"
    source = str(record.get("frequency_source"))
    if record.get("frequency_tokens") is not None:
        source += f", {record['frequency_tokens']} tokens"
    return f"{rule}: {what} (mode {record.get('kill_mode')}; frequencies from {source})"


def threshold_label(t: float) -> str:
    """How a frequency threshold is printed and named (folder names, ablation keys): `%g`."""
    return f"{t:g}"


def check_distinct_labels(thresholds: Iterable[float], what: str = "thresholds") -> None:
    """UserError when two different thresholds print the same (`threshold_label`): their folders
    or ablation rows would share a name and one would silently replace the other."""
    seen: dict[str, float] = {}
    for t in thresholds:
        label = threshold_label(t)
        if label in seen and seen[label] != t:
            raise UserError(f"{what} {seen[label]!r} and {t!r} both print as {label}, so their results would "
                            f"share a name; make them differ within 6 significant digits or drop one")
        seen.setdefault(label, t)


def prune_dir(directory: str | Path, out_dir: str | Path, *, max_frequency: float | None = None,
              min_frequency: float | None = None, kill_ids: str | Iterable[int] | None = None, mode: str = "after",
              n_tokens: int | None = None, batch_size: int | None = None, device: str = "auto",
              dtype: str | None = None, data_source: str | None = None, mean_tokens: int | None = None,
              frequency_file: str | Path | None = None, cache_dir: str | Path | None = None,
              frequency_tokens: int | None = None, progress: bool = True):
    """`python -m eval prune`: prune a dictionary folder into OUT (the kill set chosen on training
    tokens, see eval.kill_frequency), evaluate both on held-out tokens, print side by side.
    Returns (before EvalResult, after EvalResult, PruneResult)."""
    if max_frequency is None and min_frequency is None and not parse_ids(kill_ids):
        raise UserError("nothing to kill: give --max-frequency, --min-frequency and/or --kill-ids")
    n_tokens, batch_size, mean_tokens = counts_or_defaults(n_tokens, batch_size, mean_tokens)
    directory, out_dir = Path(directory), Path(out_dir)
    if directory.resolve() == out_dir.resolve():
        raise UserError(f"--out {out_dir} is the dictionary's own folder; write the pruned dictionary elsewhere")
    (group,) = load_groups([directory], device=device, dtype=dtype, data_source=data_source)
    (name,) = group.names
    d = group.dictionaries[name]
    found = folder_kill_frequencies(group, name, frequency_file=frequency_file, cache_dir=cache_dir,
                                    n_tokens=frequency_tokens, batch_contexts=batch_size, progress=progress)
    kill = kill_mask_from_frequency(found.frequency[name], max_frequency, min_frequency, kill_ids)
    result = prune_dictionary(d, kill, mode, max_frequency=max_frequency, min_frequency=min_frequency,
                              kill_ids=kill_ids, frequency_source=found.source, frequency_tokens=found.tokens,
                              name=out_dir.name)
    print(describe(result.record, d.d_sae), flush=True)
    save_pruned(result, out_dir, source_dir=directory)
    pruned_name = out_dir.name if out_dir.name != name else f"{name}-pruned"
    group.prepare(n_tokens, batch_size, mean_tokens)
    out = group.evaluate({name: d, pruned_name: result.dictionary}, batch_size, progress,
                         means_of={pruned_name: name})  # shared forwards
    write_outputs(out_dir, out[pruned_name])
    before, after = out[name], out[pruned_name]
    print(report.side_by_side(before, after, labels=(name, pruned_name)))
    _write_prune_md(out_dir / "prune.md", result, before, after, (name, pruned_name), d.d_sae)
    return before, after, result


def _write_prune_md(path: Path, result: PruneResult, before, after, labels: tuple[str, str], d_sae: int) -> None:
    name, pruned_name = labels
    io.write_text(path, f"# {pruned_name}: {name} pruned\n\n{describe(result.record, d_sae)}\n\n"
                  + report.side_by_side(before, after, labels=labels, markdown=True)
                  + f"\nBoth evaluated on the same {after.metrics['tokens_evaluated']} held-out tokens.\n")
