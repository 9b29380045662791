"""The files of one dictionary's evaluation, in its folder: eval.json (the metrics, with
`eval_info`'s description of the text), frequency.safetensors (per-feature firing frequency) and
frequency_histogram.png; and reading a stored frequency back (an explicit --frequency-file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from safetensors import safe_open
from torch import Tensor

from sae.plots import plot_frequency_histogram
from eval.metrics import jsonable
from sae import io
from sae.errors import UserError

EVAL_FILE = "eval.json"
FREQUENCY_FILE = "frequency.safetensors"
HISTOGRAM_FILE = "frequency_histogram.png"


def eval_info(data_cfg) -> dict[str, Any]:
    """The eval.json keys that say what text was evaluated: the data config (its `split` is the
    source's own split, e.g. a hub split) and `evaluated_split` = "heldout" (sae.text's hash split)."""
    return {"dataset": data_cfg.model_dump(mode="json"), "evaluated_split": "heldout"}


def write_outputs(directory: str | Path, result) -> None:
    """eval.json, frequency.safetensors (+ its tokens_evaluated) and frequency_histogram.png of an
    EvalResult."""
    directory = Path(directory)
    io.write_json(directory / EVAL_FILE, jsonable(result.metrics))
    meta = {"tokens_evaluated": str(result.metrics["tokens_evaluated"]),
            "hook": str(result.metrics.get("hook")), "model": str(result.metrics.get("model")),
            "source": "eval"}
    io.save_tensors(directory / FREQUENCY_FILE, {"frequency": result.frequency}, metadata=meta)
    plot_frequency_histogram(result.frequency, directory / HISTOGRAM_FILE, title=result.name,
                             tokens_evaluated=result.metrics["tokens_evaluated"])


def write_all(results: Mapping[str, object], directories: Mapping[str, str | Path]) -> None:
    """write_outputs for each result that has a folder in `directories`."""
    for name, directory in directories.items():
        if name in results:
            write_outputs(directory, results[name])


def read_frequency(directory: str | Path, d_sae: int | None = None) -> tuple[Tensor, dict[str, str]] | None:
    """(frequency [d_sae], metadata) from a folder's frequency.safetensors, or None when absent."""
    path = Path(directory) / FREQUENCY_FILE
    return read_frequency_file(path, d_sae) if path.is_file() else None


def read_frequency_file(path: str | Path, d_sae: int | None = None) -> tuple[Tensor, dict[str, str]]:
    """(frequency [d_sae], metadata) from a frequency file (its tensor `frequency`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = dict(f.metadata() or {}), set(f.keys())
            freq = f.get_tensor("frequency") if "frequency" in names else None
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if freq is None:
        raise UserError(f"{path} holds no tensor 'frequency' (it holds {sorted(names)})")
    if d_sae is not None and freq.numel() != d_sae:
        raise UserError(f"{path} has {freq.numel()} frequencies but the dictionary has {d_sae} features: "
                        f"it belongs to another dictionary")
    return freq, meta


def frequency_tokens(meta: Mapping[str, str]) -> int | None:
    """The tokens a stored frequency was measured on (its `tokens_evaluated`), None when unrecorded."""
    value = str(meta.get("tokens_evaluated", "")).strip()
    return int(value) if value.isdigit() else None


def with_tokens(source: str, tokens: int | None) -> str:
    """'SOURCE (N tokens)', or SOURCE alone when the token count is unknown."""
    return source if tokens is None else f"{source} ({tokens} tokens)"
