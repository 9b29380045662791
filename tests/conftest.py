"""Shared fixtures: a tiny randomly initialised Llama-style HF model with its own tokenizer,
saved to a temp folder (seconds to build, loads through TransformerBridge like a real one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog . "
    "To be or not to be , that is the question . "
    "All the world is a stage , and all the men and women merely players . "
    "Now is the winter of our discontent made glorious summer by this sun of York . "
    "Friends , Romans , countrymen , lend me your ears ; I come to bury Caesar , not to praise him . "
)


def make_tiny_model(path: Path, n_layers: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """A random LlamaForCausalLM + WordLevel tokenizer (BOS/EOS/PAD/UNK) saved at `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set(TINY_TEXT.split()) | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    """A small local text corpus in paragraphs (blank-line separated)."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    rng = torch.Generator().manual_seed(0)
    words = TINY_TEXT.split()
    paragraphs = []
    for _ in range(300):
        n = int(torch.randint(5, 40, (1,), generator=rng))
        idx = torch.randint(0, len(words), (n,), generator=rng)
        paragraphs.append(" ".join(words[i] for i in idx))
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path
