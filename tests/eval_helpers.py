"""Test-only dictionaries and data for the evaluator/pruning tests (registered on import under
`test_*` architecture names; nothing outside the tests sees them)."""

from __future__ import annotations

import torch

from sae.dictionaries.base import SparseDictionary
from sae.dictionaries.registry import ARCHITECTURES, register

HOOK = "blocks.0.hook_resid_post"
D_MODEL = 32  # conftest.make_tiny_model's default width


class _TestDict(SparseDictionary):
    @classmethod
    def make(cls, d_in: int = D_MODEL, d_sae: int | None = None, seed: int = 0, metadata=None):
        cfg = cls.Config(architecture=cls.architecture, d_sae=d_sae or d_in, seed=seed)
        return cls(cfg, d_in, metadata=metadata or {"hook_name": HOOK}).eval()


def _register(cls):
    return cls if ARCHITECTURES.get(cls.architecture) is cls else register(cls)


@_register
class IdentityDict(_TestDict):
    """encode = x, decode = f (W_enc = W_dec = I, zero biases): x_hat == x exactly."""

    architecture = "test_identity"

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.W_enc.copy_(torch.eye(self.d_in, self.d_sae))
            self.W_dec.copy_(torch.eye(self.d_sae, self.d_in))
            self.b_enc.zero_()
            self.b_dec.zero_()

    def activation(self, pre):
        return pre


@_register
class RandomReLU(_TestDict):
    """A random ReLU dictionary (encoder = decoder transpose, a small negative bias)."""

    architecture = "test_relu"

    def reset_parameters(self) -> None:
        super().reset_parameters()
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        with torch.no_grad():
            self.b_enc.copy_(-0.3 * torch.rand(self.d_sae, generator=g))
            self.b_dec.copy_(0.1 * torch.randn(self.d_in, generator=g))

    def activation(self, pre):
        return torch.relu(pre)


@_register
class ZeroDict(_TestDict):
    """f = 0 and x_hat = 0 everywhere."""

    architecture = "test_zero"

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.W_enc, self.W_dec, self.b_enc, self.b_dec):
                p.zero_()

    def activation(self, pre):
        return torch.relu(pre)


def make_tokens(tokenizer, n_ctx: int = 13, ctx: int = 16, seed: int = 0, pad_tail: bool = True):
    """Contexts like sae.text.load_contexts's: BOS first, then random ordinary tokens; a few rows
    end in padding. Returns (tokens, keep) with BOS and padding excluded."""
    g = torch.Generator().manual_seed(seed)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    idx = torch.randint(0, len(vocab), (n_ctx, ctx), generator=g)
    tokens = torch.tensor(vocab)[idx]
    tokens[:, 0] = tokenizer.bos_token_id
    if pad_tail:
        tokens[1, -3:] = tokenizer.pad_token_id
        tokens[4, -1:] = tokenizer.pad_token_id
    keep = (tokens != tokenizer.bos_token_id) & (tokens != tokenizer.pad_token_id)
    return tokens, keep
