"""The sparse training step of the element-wise architectures (ReLU both recipes, JumpReLU, Gated)
equals the dense one: loss, x̂, feature counts and every gradient, in float32 and float64, alone
and through the trainer (resampling included); `sparse: auto` picks by density."""

from __future__ import annotations

import pytest
import torch

from sae.dictionaries import parse_dictionary_config
from sae.dictionaries.registry import get_architecture
from sae.trainer import train_dictionaries

ARCHS = ["relu", "relu_april", "jumprelu", "gated"]
D_IN, D_SAE, BATCH = 24, 96, 160


def make(arch: str, sparse, dtype=torch.float32, b_enc_shift: float = -1.0, **extra):
    """A dictionary with varied weights whose activations fire on roughly 15% of the pairs."""
    raw = {"architecture": arch, "d_sae": D_SAE, "seed": 0, "sparse": sparse, **extra}
    if arch == "relu_april":
        raw.update(architecture="relu", recipe="april2024")
    if arch in ("jumprelu", "gated", "relu_april"):
        raw.setdefault("sparsity_warmup_fraction", 0.0)
    cfg = parse_dictionary_config(raw)
    d = get_architecture(cfg.architecture)(cfg, D_IN)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        d.W_enc.div_(d.W_enc.norm(dim=0))  # the same pre-activation scale whatever the recipe's init
        d.b_enc.copy_(b_enc_shift + 0.3 * torch.randn(D_SAE, generator=g))
        d.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
        d.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=g))  # norms off 1: the april L1 weighs them
        if hasattr(d, "threshold"):
            d.threshold.copy_(0.5 * torch.rand(D_SAE, generator=g))
        if hasattr(d, "r_mag"):
            d.r_mag.copy_(0.3 * torch.randn(D_SAE, generator=g))
            d.b_mag.copy_(0.3 * torch.randn(D_SAE, generator=g))
        d.input_scale.fill_(0.7)
    return d.to(dtype).train()


def inputs(dtype=torch.float32, n: int = BATCH) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (2 * torch.randn(n, D_IN, generator=g) + 0.5).to(dtype)


def step(d, x, progress=0.5):
    """One training_loss and backward: (TrainStep, {parameter: gradient})."""
    d.zero_grad(set_to_none=True)
    out = d.training_loss(x, progress, None)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in d.named_parameters()}


def dense_and_sparse(arch, dtype=torch.float32, **extra):
    x = inputs(dtype)
    return step(make(arch, False, dtype, **extra), x), step(make(arch, True, dtype, **extra), x)


def assert_same_step(dense, sparse, rtol, atol):
    (out_d, g_d), (out_s, g_s) = dense, sparse
    assert out_d.f is not None and out_s.f is None  # each really took its own path
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=rtol, atol=atol)
    assert torch.equal(out_s.counts(), out_d.counts().to(out_s.counts().dtype))
    assert out_s.metrics.keys() == out_d.metrics.keys()
    for key in out_d.metrics:
        torch.testing.assert_close(out_s.metrics[key], out_d.metrics[key], rtol=rtol, atol=atol, msg=key)
    assert g_s.keys() == g_d.keys()
    for name in g_d:
        assert g_d[name].abs().max() > 0, f"{name}: the gradient is really there"
        torch.testing.assert_close(g_s[name], g_d[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_the_dense_step(arch):
    dense, sparse = dense_and_sparse(arch)
    density = dense[0].counts().sum().item() / (BATCH * D_SAE)
    assert 0.02 < density < 0.4  # the batch is sparse, not empty
    assert_same_step(dense, sparse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_the_dense_step_in_float64(arch):
    dense, sparse = dense_and_sparse(arch, torch.float64)
    assert_same_step(dense, sparse, rtol=1e-12, atol=1e-14)


def test_relu_recipes_differ_in_the_l1_term():
    """The april2024 L1 weighs f by ‖W_dec,i‖: its W_dec gradient has a part along the rows that
    the classic recipe's lacks (so the comparisons above cover two different losses)."""
    (_, g_classic), _ = dense_and_sparse("relu", normalize_decoder=False)
    (_, g_april), (_, g_april_sparse) = dense_and_sparse("relu_april", l1_coefficient=1.0)
    difference = (g_april["W_dec"] - g_classic["W_dec"]).abs().max()
    assert difference > 1e-3
    torch.testing.assert_close(g_april_sparse["W_dec"], g_april["W_dec"], rtol=1e-5, atol=1e-6)


def test_jumprelu_band_below_the_threshold_is_handled():
    """θ's pseudo-derivatives are non-zero for pre in (θ - ε/2, θ], where f is 0: leaving those
    pairs out (touched = active only) changes θ's gradient; the sparse step keeps them."""
    x = inputs(torch.float64)
    extra = {"bandwidth": 0.5, "l0_coefficient": 0.3}
    (out_d, g_d) = step(make("jumprelu", False, torch.float64, **extra), x)
    d = make("jumprelu", True, torch.float64, **extra)
    pre = d.training_pre_acts(d.scale_input(x)).detach()
    theta = d.threshold.detach()
    below = ((pre > theta - 0.25) & (pre <= theta)).sum().item()
    assert below > 50  # many band pairs where the feature does not fire
    (_, g_s) = step(d, x)
    torch.testing.assert_close(g_s["threshold"], g_d["threshold"], rtol=1e-12, atol=1e-14)
    d.touched = lambda pre: pre > d.threshold.to(pre.dtype)  # what an active-only step would do
    (_, g_active_only) = step(d, x)
    assert (g_active_only["threshold"] - g_d["threshold"]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_where_nothing_fires(arch):
    x = inputs()
    (out_d, g_d), (out_s, g_s) = [step(make(arch, s, b_enc_shift=-1e3), x) for s in (False, True)]
    assert out_d.counts().sum() == 0 and out_s.counts().sum() == 0
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-6, atol=0)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_picks_the_step_by_density(arch):
    x = inputs()
    sparse_enough = make(arch, "auto", sparse_max_density=0.5).training_loss(x, 0.5, None)
    too_dense = make(arch, "auto", sparse_max_density=0.01).training_loss(x, 0.5, None)
    assert sparse_enough.f is None and too_dense.f is not None
    torch.testing.assert_close(sparse_enough.loss, too_dense.loss, rtol=1e-5, atol=1e-6)
    assert parse_dictionary_config({"architecture": arch.split("_")[0], "d_sae": 8}).sparse == "auto"


def test_a_diverged_step_is_not_hidden():
    """A NaN pre-activation reaches the loss in the sparse step as in the dense one (the trainer
    stops on a non-finite loss)."""
    for arch in ARCHS:
        for sparse in (False, True):
            d = make(arch, sparse)
            with torch.no_grad():
                d.W_enc[:, 3] = float("nan")
            assert not torch.isfinite(d.training_loss(inputs(), 0.5, None).loss), (arch, sparse)


TRAINER_CONFIGS = {
    "relu": {"architecture": "relu", "l1_coefficient": 3.0, "resample_every_tokens": 1024,
             "resample_min_frequency": 0.45},
    "relu_april": {"architecture": "relu", "recipe": "april2024", "l1_coefficient": 3.0, "lr": 1e-3},
    "jumprelu": {"architecture": "jumprelu", "l0_coefficient": 0.5},
    "gated": {"architecture": "gated", "l1_coefficient": 2.0, "normalize_decoder": False},
}


def test_training_runs_equal_with_and_without_the_sparse_step():
    """Whole runs through the trainer (Adam, decoder projection, threshold clamp, resampling of dead
    and rare features with its optimizer reset) end at the same weights, in float64."""
    g = torch.Generator().manual_seed(3)
    true_features = torch.randn(64, D_IN, generator=g, dtype=torch.float64)
    batches = [(torch.relu(torch.randn(256, 64, generator=g, dtype=torch.float64) - 1.5) @ true_features)
               for _ in range(12)]
    configs = [parse_dictionary_config({"name": f"{n}-{s}", "d_sae": D_SAE, "sparse": s, **c})
               for n, c in TRAINER_CONFIGS.items() for s in (False, True)]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trained = train_dictionaries(batches, configs, total_tokens=12 * 256, progress=False)
    finally:
        torch.set_default_dtype(default)
    for name in TRAINER_CONFIGS:
        dense, sparse = trained[f"{name}-False"], trained[f"{name}-True"]
        assert dense.W_enc.dtype == torch.float64
        for key, t in dense.weights().items():
            torch.testing.assert_close(sparse.weights()[key], t, rtol=1e-9, atol=1e-11, msg=f"{name} {key}")
    assert trained["relu-True"].metadata["features_resampled"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_under_bf16_autocast(arch):
    """Under autocast the dense step multiplies in bfloat16 and the sparse one decodes in float32:
    the same loss and gradients to bfloat16 precision, in the weights' dtype."""
    results = []
    for sparse in (False, True):
        d = make(arch, sparse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = d.training_loss(inputs(), 0.5, None)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in d.named_parameters()}))
    (out_d, g_d), (out_s, g_s) = results
    assert out_s.f is None and out_s.x_hat.dtype == torch.float32
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-2, atol=0)
    for name in g_d:
        assert g_s[name].dtype == torch.float32
        assert (g_s[name] - g_d[name]).norm() <= 0.02 * g_d[name].norm(), name
