"""The CUDA path: sparse kernels against the dense formulation, bf16 autocast steps against the
CPU's, and batches fed to the GPU with their copies overlapped with compute. Every test here needs a
CUDA GPU (marked `cuda`, skipped without one); `python benchmarks/gpu_check.py` runs them first."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from sae.cache import to_device
from test_architectures import ARCHS, TOPK_STYLE, inputs, make

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def loss_and_grads(d, x: torch.Tensor, autocast: torch.dtype | None = None):
    d.train().zero_grad()
    dead = torch.zeros(d.d_sae, dtype=torch.bool, device=x.device)
    dead[::3] = True  # exercises TopK's AuxK
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = d.training_loss(x, 0.5, dead)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.detach().float().cpu() for n, p in d.named_parameters()
                                       if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_the_dense_step_on_cuda(arch):
    """The sparse kernels (sae.sparse_ops: gathers, index_add, embedding_bag) on the GPU give the
    dense formulation's loss and gradients, in float32."""
    x = inputs(96).cuda()
    results = []
    for sparse in (True, False):
        d = make(arch, sparse=sparse).cuda()
        if arch in TOPK_STYLE and arch != "topk":
            d.threshold.fill_(-1.0)
        results.append(loss_and_grads(d, x))
    (loss_s, g_s), (loss_d, g_d) = results
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    assert set(g_s) == set(g_d)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_step_on_cuda_matches_the_cpu_step(arch):
    """The same step under bf16 autocast on both devices (the CPU one is what tests/test_bf16.py
    trains): bf16 rounding of the matmul inputs is the same, the accumulation order is not."""
    x = inputs(96)
    loss_cpu, g_cpu = loss_and_grads(make(arch), x, torch.bfloat16)
    loss_gpu, g_gpu = loss_and_grads(make(arch).cuda(), x.cuda(), torch.bfloat16)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=2e-2, atol=1e-3)
    for name, g in g_cpu.items():
        cos = F.cosine_similarity(g_gpu[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, f"{name}: cosine {cos:.4f} between the CUDA and CPU gradients"


def _step_seconds(batches, step, feed) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in feed(batches):
        step(b["x"].to("cuda", non_blocking=True))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def test_to_device_overlaps_the_copies_with_compute():
    """Batches from pinned memory through to_device: a loop of steps takes about as long as the
    same steps on one resident batch (the copies hide behind compute), while the plain copy on the
    step's stream adds each copy's time to its step."""
    batches = [{"x": torch.randn(8192, 2048).pin_memory()} for _ in range(8)]  # 64 MiB each
    resident = batches[0]["x"].cuda()
    copy = _step_seconds(batches, lambda x: x, iter) / len(batches)
    w = torch.randn(2048, 2048, device="cuda")
    torch.tanh(resident @ w)  # warm-up: cuBLAS's first call
    one = _step_seconds([{"x": resident}] * 3, lambda x: torch.tanh(x @ w), iter) / 3
    reps = max(1, round(4 * copy / one))  # a step four times one batch's copy

    def step(x):
        for _ in range(reps):
            x = torch.tanh(x @ w)
        return x

    compute = _step_seconds([{"x": resident}] * len(batches), step, iter)
    fed = _step_seconds(batches, step, lambda b: to_device(b, "cuda"))
    serial = _step_seconds(batches, step, lambda b: ({"x": v["x"].cuda()} for v in b))
    timings = f"to_device {fed:.4f}s, resident {compute:.4f}s, plain copies {serial:.4f}s"
    assert fed < 1.15 * compute, timings
    assert serial > 1.15 * compute, "the check cannot tell: " + timings
