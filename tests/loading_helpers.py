"""Dictionaries of every registered architecture with random (non-trivial) weights, for the
loading / format / splicing / features tests."""

from __future__ import annotations

import torch

import sae.dictionaries  # noqa: F401  (registers every architecture)
from sae.dictionaries.registry import get_architecture

HOOK = "blocks.0.hook_resid_post"
D_IN = 32  # conftest.make_tiny_model's width

# (name, architecture, extra hyperparameters): every architecture and recipe we save
VARIANTS = [
    ("relu", "relu", {}),
    ("relu_april", "relu", {"recipe": "april2024", "l1_coefficient": 3.0}),
    ("topk", "topk", {"k": 5}),
    ("batchtopk", "batchtopk", {"k": 5}),
    ("matryoshka", "matryoshka_batchtopk", {"k": 5, "group_sizes": [0.25, 0.25, 0.5]}),
    ("jumprelu", "jumprelu", {"bandwidth": 0.01}),
    ("gated", "gated", {}),
]


def random_dictionary(architecture: str, d_in: int = D_IN, d_sae: int = 96, seed: int = 0, metadata=None,
                      **hyper):
    """A dictionary in eval mode whose every tensor is random, so that each of them matters."""
    cls = get_architecture(architecture)
    cfg = cls.Config(architecture=architecture, d_sae=d_sae, seed=seed, **hyper)
    d = cls(cfg, d_in, metadata=dict(metadata or {"hook_name": HOOK, "model_name": "tiny",
                                                   "context_size": 16}))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, t in d.weights().items():
            if name in ("W_enc", "W_dec"):
                t.copy_(torch.randn(t.shape, generator=g) / d_in ** 0.5)
            elif name == "threshold":
                t.copy_(0.3 * torch.rand(t.shape, generator=g))
            else:  # biases, r_mag
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return d.eval()


def random_inputs(d, n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d.d_in, generator=g) * 1.5 + d.b_dec.detach()
