"""Training under bf16 autocast (`train.autocast: bfloat16`, the default on CUDA) reaches the
float32 run's reconstruction and sparsity, for every architecture, on the same data (on CPU:
autocast there rounds the same matmul inputs to bf16 as on a GPU).

One run's FVU moves by a few percent with any perturbation of its trajectory (which features a
TopK picks, which die): float32 runs from two seeds differ by up to half here (jumprelu 0.120 and
0.177). So each architecture trains from several initialisations, and the means over them are
compared: that is the FVU a user can expect from a run, and it moves with the precision, not with
one run's luck. The architectures whose selections or thresholds flip (TopK, BatchTopK, JumpReLU,
Gated) move by up to 5% per run between float32 and bf16 and by up to 1.8% in a mean over 3 seeds
(2.5% for JumpReLU on another CPU); over 10 their means moved by at most 0.7% (12 seeds measured).
ReLU and Matryoshka move by under 0.2% per run: 3 seeds suffice.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from sae.dictionaries import parse_dictionary_config
from sae.synthetic import SyntheticFeatures, fvu
from sae.trainer import train_dictionaries

CONFIGS = {
    "relu": {"architecture": "relu", "l1_coefficient": 2.0},
    "relu_april": {"architecture": "relu", "recipe": "april2024", "l1_coefficient": 2.0, "lr": 3e-3},
    "topk": {"architecture": "topk", "k": 4},
    "batchtopk": {"architecture": "batchtopk", "k": 4},
    "matryoshka": {"architecture": "matryoshka_batchtopk", "k": 4, "group_sizes": [0.125, 0.375, 0.5]},
    "jumprelu": {"architecture": "jumprelu", "l0_coefficient": 1.0},
    "gated": {"architecture": "gated", "l1_coefficient": 3.0},
}
SEEDS = {"relu": 3, "relu_april": 3, "topk": 10, "batchtopk": 10, "matryoshka": 3, "jumprelu": 10, "gated": 10}
TOKENS = 100_000
MAX_RELATIVE = 0.02  # the issue's bar: bf16 FVU within 2% of float32's


def mean_fvu_and_l0(autocast_dtype: torch.dtype | None, data: SyntheticFeatures, x: torch.Tensor) -> dict:
    """{architecture: (mean FVU, mean L0) over SEEDS runs}, all trained in one sweep on `data`."""
    configs = [parse_dictionary_config({"name": f"{name}-{seed}", "d_sae": 256, "seed": seed, **raw})
               for name, raw in CONFIGS.items() for seed in range(SEEDS[name])]
    trained = train_dictionaries(data, configs, total_tokens=TOKENS, autocast_dtype=autocast_dtype,
                                 progress=False)
    out = {}
    for name in CONFIGS:
        runs = [trained[f"{name}-{seed}"] for seed in range(SEEDS[name])]
        with torch.no_grad():
            l0 = [float((d.encode(x) != 0).sum(dim=1).float().mean()) for d in runs]
        out[name] = (statistics.mean(fvu(d, x) for d in runs), statistics.mean(l0))
    return out


@pytest.fixture(scope="module")
def fp32_and_bf16():
    data = SyntheticFeatures(d_in=32, n_features=128, batch_size=1024, mean_active=4.0, seed=0)
    x, _ = data.sample(8192, torch.Generator().manual_seed(12345))  # tokens training never saw
    return mean_fvu_and_l0(None, data, x), mean_fvu_and_l0(torch.bfloat16, data, x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_autocast_training_matches_float32(fp32_and_bf16, name):
    """Measured (2026-12-02, CPU), mean FVU fp32 -> bf16: relu 0.2916 -> 0.2920, relu_april 0.3282
    -> 0.3282, topk 0.1666 -> 0.1671, batchtopk 0.1644 -> 0.1644, matryoshka 0.4633 -> 0.4633,
    jumprelu 0.1609 -> 0.1606, gated 0.1877 -> 0.1890 (+0.7%). JumpReLU's
    threshold compared in bf16 gave an L0 2.03% above float32's (FVU -1.7%): its comparisons now
    run in float32 (sae/dictionaries/jumprelu.py)."""
    (fvu32, l0_32), (fvu16, l0_16) = fp32_and_bf16[0][name], fp32_and_bf16[1][name]
    assert abs(fvu16 - fvu32) <= MAX_RELATIVE * fvu32, f"FVU fp32 {fvu32:.4f}, bf16 {fvu16:.4f}"
    assert abs(l0_16 - l0_32) <= MAX_RELATIVE * l0_32, f"L0 fp32 {l0_32:.3f}, bf16 {l0_16:.3f}"
